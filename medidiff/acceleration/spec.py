"""Transforms from a pipeline stage's ``accelerate:`` mapping, e.g. ``{deepcache: {interval: 3}}``;
quantization comes from a file written by :meth:`PostTrainingQuantization.save`: ``{quantization: {file: q.safetensors}}``,
real int8 from one written by :meth:`Int8Quantization.save`: ``{int8: {file: unet-int8.safetensors}}``, or
``{int8: {}}``: the int8 model shipped beside the stage's model (:class:`ShippedInt8`)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path

from medidiff.acceleration.block_caching import DeltaDiT, SelectiveBlockCache
from medidiff.acceleration.bottleneck_sampling import BottleneckSampling
from medidiff.acceleration.cachequant import CacheQuant
from medidiff.acceleration.channel_pruning import ChannelPruning
from medidiff.acceleration.deepcache import DeepCache
from medidiff.acceleration.distillation import EfficientDM, QuEST
from medidiff.acceleration.faster_diffusion import FasterDiffusion
from medidiff.acceleration.float_formats import FloatWeightQuantization
from medidiff.acceleration.group_quant import GroupQuantization
from medidiff.acceleration.int8 import Int8Quantization, ShippedInt8
from medidiff.acceleration.pruning import MagnitudePruning
from medidiff.acceleration.quantization import PostTrainingQuantization
from medidiff.acceleration.transform import Transform, TransformError

BUILDERS = {"deepcache": DeepCache, "pruning": MagnitudePruning, "channel_pruning": ChannelPruning,
            "faster_diffusion": FasterDiffusion, "delta_dit": DeltaDiT, "selective_block_cache": SelectiveBlockCache,
            "bottleneck_sampling": BottleneckSampling}
FROM_FILE = {"quantization": PostTrainingQuantization, "int8": Int8Quantization, "cachequant": CacheQuant,
             "efficientdm": EfficientDM, "quest": QuEST, "fp_weights": FloatWeightQuantization,
             "group_quantization": GroupQuantization}  # made in Python (calibration data, training), saved


def transforms_from_spec(spec: dict | None) -> list[Transform]:
    """The transforms named in ``spec`` (name -> options), in the order given."""
    if not spec:
        return []
    if not isinstance(spec, dict):
        raise TransformError(f"accelerate is {spec!r}; expected a mapping such as {{deepcache: {{interval: 3}}}}")
    transforms = []
    for name, options in spec.items():
        if name == "int8" and options in (None, {}):
            transforms.append(ShippedInt8())
            continue
        if name in FROM_FILE:
            if not isinstance(options, dict) or set(options) != {"file"}:
                raise TransformError(f"{name} takes {{file: <path>}}: a quantization made from calibration data "
                                     f"and written by {FROM_FILE[name].__name__}.save (docs/acceleration.md)")
            transforms.append(FROM_FILE[name].load(options["file"]))
            continue
        if name not in BUILDERS:
            raise TransformError(f"unknown transform {name!r}; expected one of {', '.join([*BUILDERS, *FROM_FILE])}")
        options = options or {}
        if not isinstance(options, dict):
            raise TransformError(f"{name} options are {options!r}; expected a mapping")
        try:
            inspect.signature(BUILDERS[name]).bind(**options)
        except TypeError as e:
            raise TransformError(f"{name}: {e}") from None
        transforms.append(BUILDERS[name](**options))
    return transforms


def prepare_shipped_int8(transforms: list[Transform], weights: Iterable[Path]) -> None:
    """Read and check the shipped int8 models of the float ``weights`` files for an ``int8: {}`` among
    ``transforms`` (a stage calls this when it is built: a missing or stale file stops the pipeline
    before its first study)."""
    for transform in transforms:
        if isinstance(transform, ShippedInt8):
            for path in weights:
                transform.prepare(path)
