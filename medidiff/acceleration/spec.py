"""Transforms from a pipeline stage's ``accelerate:`` mapping, e.g. ``{deepcache: {interval: 3}}``;
quantization comes from a file written by :meth:`PostTrainingQuantization.save`: ``{quantization: {file: q.safetensors}}``."""

from __future__ import annotations

import inspect

from medidiff.acceleration.channel_pruning import ChannelPruning
from medidiff.acceleration.deepcache import DeepCache
from medidiff.acceleration.pruning import MagnitudePruning
from medidiff.acceleration.quantization import PostTrainingQuantization
from medidiff.acceleration.transform import Transform, TransformError

BUILDERS = {"deepcache": DeepCache, "pruning": MagnitudePruning, "channel_pruning": ChannelPruning}


def transforms_from_spec(spec: dict | None) -> list[Transform]:
    """The transforms named in ``spec`` (name -> options), in the order given."""
    if not spec:
        return []
    if not isinstance(spec, dict):
        raise TransformError(f"accelerate is {spec!r}; expected a mapping such as {{deepcache: {{interval: 3}}}}")
    transforms = []
    for name, options in spec.items():
        if name == "quantization":
            if not isinstance(options, dict) or set(options) != {"file"}:
                raise TransformError("quantization takes {file: <path>}: a quantization made from calibration data "
                                     "and written by PostTrainingQuantization.save (docs/acceleration.md)")
            transforms.append(PostTrainingQuantization.load(options["file"]))
            continue
        if name not in BUILDERS:
            raise TransformError(f"unknown transform {name!r}; expected one of {', '.join(BUILDERS)}, quantization")
        options = options or {}
        if not isinstance(options, dict):
            raise TransformError(f"{name} options are {options!r}; expected a mapping")
        try:
            inspect.signature(BUILDERS[name]).bind(**options)
        except TypeError as e:
            raise TransformError(f"{name}: {e}") from None
        transforms.append(BUILDERS[name](**options))
    return transforms
