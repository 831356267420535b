"""Pipeline files: YAML -> validated :class:`Pipeline` (selection rules + stages + outputs).

A pipeline file::

    name: normalize-preview
    description: Percentile intensity normalisation and an in-plane resize, written back.
    select:
      modality: [CT, MR, CR, DX]
      min_size: 64
    stages:
      - normalize_intensity: {lower_percentile: 1, upper_percentile: 99}
      - monai.transforms.ScaleIntensityd: {keys: [image], minv: 0.0, maxv: 1.0}
    outputs:
      dicom: {series_description: "medidiff normalized"}
      png: {panel: true}

Every error names the file, the key and the line at fault. Loading also checks every stage
parameter (names, types and values: each stage is built once, see ``medidiff.stages.registry``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medidiff.errors import PipelineError, StageError
from medidiff.resources import pipeline_file, pipelines_dir

SELECT_KEYS = {"modality", "body_part", "image_type", "skip_image_type", "view_position", "min_size", "dimensions",
               "source_format"}
OUTPUT_KEYS = {"dicom", "nifti", "png"}
TOP_KEYS = {"name", "description", "select", "stages", "outputs"}


@dataclass(frozen=True)
class Selection:
    """Which series a pipeline accepts; :meth:`reason_to_skip` says why one is not accepted."""

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ()
    skip_image_type: tuple[str, ...] = ()  # ImageType values that exclude an image (e.g. LOCALIZER)
    view_position: tuple[str, ...] = ()
    min_size: int = 0
    dimensions: int | None = None
    source_format: tuple[str, ...] = ()  # DICOM, NIfTI, NRRD, MetaImage, k-space

    def reason_to_skip(self, series) -> str | None:
        """None if ``series`` (a SeriesRef) matches, else a sentence saying what does not."""
        checks = (
            ("modality", series.modality, self.modality),
            ("body part", series.body_part, self.body_part),
            ("view position", series.view_position, self.view_position),
            ("source format", series.source_format, self.source_format),
        )
        for label, value, allowed in checks:
            if allowed and (value or "").upper() not in allowed:
                shown = value or "(not set)"
                return f"{label} {shown} is not one this pipeline accepts ({', '.join(allowed)})"
        missing = [t for t in self.image_type if t not in {v.upper() for v in series.image_type}]
        if missing:
            return f"image type {'/'.join(series.image_type) or '(not set)'} lacks {', '.join(missing)}"
        excluded = [t for t in self.skip_image_type if t in {v.upper() for v in series.image_type}]
        if excluded:
            return f"image type {'/'.join(series.image_type)} is {', '.join(excluded)}, which this pipeline skips"
        if min(series.rows, series.columns) < self.min_size:
            return f"image size {series.rows}x{series.columns} is below the minimum {self.min_size}"
        if self.dimensions == 2 and series.is_3d:
            return "a 3-D series, but this pipeline takes 2-D images"
        if self.dimensions == 3 and not series.is_3d:
            return "a 2-D image, but this pipeline takes 3-D series"
        return None


@dataclass(frozen=True)
class StageCall:
    """One configured stage: its name (registry name or import path), parameters and lines."""

    name: str
    params: dict[str, Any]
    line: int
    param_lines: dict[str, int] = field(default_factory=dict)

    def build(self, instantiate: bool = True) -> Callable:
        """Check the parameters and instantiate the stage (a callable item -> item); with ``instantiate=False``
        check the names and types only (no model is loaded) and return the factory."""
        from medidiff.stages.registry import ParameterError, check_parameter_types

        factory = _resolve_factory(self.name, self.line)
        _check_names(self, factory)
        try:
            check_parameter_types(factory, self.params)
            return factory(**self.params) if instantiate else factory
        except ParameterError as exc:
            line = self.param_lines.get(exc.key, self.line)
            raise PipelineError(f"line {line}: stage {self.name!r}: {exc}") from None
        except (TypeError, ValueError, StageError) as exc:
            raise PipelineError(f"line {self.line}: stage {self.name!r}: {exc}") from None


@dataclass
class Pipeline:
    """A validated pipeline: selection rules, ordered stages and outputs."""

    name: str
    description: str = ""
    selection: Selection = field(default_factory=Selection)
    stages: list[StageCall] = field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<memory>"
    text: str = ""

    @classmethod
    def from_yaml(cls, path_or_name: str | Path, *, build: bool = True) -> Pipeline:
        """Load a pipeline from a YAML file or a built-in name (see :func:`resolve_pipeline_path`)."""
        path = resolve_pipeline_path(path_or_name)
        return cls.from_text(path.read_text(encoding="utf-8"), source=str(path), build=build)

    @classmethod
    def from_text(cls, text: str, source: str = "<text>", *, build: bool = True) -> Pipeline:
        """Parse and validate YAML text; errors name ``source``, the key and the line. ``build=False``: check the
        stages' names and parameter types without building them (no model loaded), for a process whose
        workers run the pipeline (they build it and report what the values do not allow)."""
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as exc:
            raise PipelineError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(root, yaml.MappingNode):
            raise PipelineError(f"{source}: a pipeline file must be a mapping with 'name' and 'stages'")
        try:
            pipeline = _parse(root, source, text)
            if build:
                pipeline._built = pipeline.build()
            else:
                for call in pipeline.stages:
                    call.build(instantiate=False)
        except PipelineError as exc:
            raise PipelineError(f"{source}: {exc}") from None
        return pipeline

    @property
    def digest(self) -> str:
        """Short hash of the pipeline text: the journal redoes work when the pipeline changes."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def task(self) -> str | None:
        """The task the pipeline performs: the ``task`` attribute of its last stage that declares one
        (e.g. ``"bone_suppression"``); evaluation picks that task's metrics and baseline."""
        declared = [getattr(_resolve_factory(call.name, call.line), "task", None) for call in self.stages]
        return next((task for task in reversed(declared) if isinstance(task, str)), None)

    def build(self) -> list[Callable]:
        """Instantiate every stage, in order."""
        return [call.build() for call in self.stages]

    def __call__(self, item: dict) -> dict:
        """Run every stage on one item (builds the stages on first use)."""
        if not hasattr(self, "_built"):
            self._built = self.build()
        for stage in self._built:
            item = apply_stage(stage, item)
        return item


def apply_stage(stage: Callable, item: dict) -> dict:
    """Apply one stage; a stage returning something other than a dict is a stage bug."""
    result = stage(item)
    if not isinstance(result, dict) or "image" not in result:
        raise StageError(f"stage {type(stage).__name__} returned no item with an 'image'")
    return result


def resolve_pipeline_path(path_or_name: str | Path) -> Path:
    """A pipeline file path, or the built-in pipeline file for a name (``medidiff.resources``)."""
    path = Path(path_or_name)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise PipelineError(f"pipeline file {path} does not exist")
        return path
    builtin = pipeline_file(str(path_or_name))
    if builtin.is_file():
        return builtin
    known = ", ".join(p.stem for p in sorted(pipelines_dir().glob("*.yaml")))
    raise PipelineError(f"no pipeline file or built-in pipeline named {path_or_name!r}; built-in: {known}")


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _mapping(node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise PipelineError(f"line {_line(node)}: {what} must be a mapping")
    return {k.value: (k, v) for k, v in node.value}


def _value(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _check_keys(entries: dict, allowed: set[str], what: str) -> None:
    for key, (knode, _) in entries.items():
        if key not in allowed:
            raise PipelineError(
                f"line {_line(knode)}: unknown key {key!r} in {what}; allowed: {', '.join(sorted(allowed))}"
            )


def _parse(root: yaml.MappingNode, source: str, text: str) -> Pipeline:
    top = _mapping(root, "the pipeline")
    _check_keys(top, TOP_KEYS, "the pipeline")
    for required in ("name", "stages"):
        if required not in top:
            raise PipelineError(f"missing required key {required!r}")
    name = _value(top["name"][1])
    if not isinstance(name, str) or not name:
        raise PipelineError(f"line {_line(top['name'][1])}: 'name' must be a non-empty string")
    description = _value(top["description"][1]) if "description" in top else ""
    selection = _parse_selection(top["select"][1]) if "select" in top else Selection()
    stages = _parse_stages(top["stages"][1])
    outputs = _parse_outputs(top["outputs"][1]) if "outputs" in top else {}
    return Pipeline(name, str(description or ""), selection, stages, outputs, source, text)


def _parse_selection(node: yaml.Node) -> Selection:
    entries = _mapping(node, "'select'")
    _check_keys(entries, SELECT_KEYS, "'select'")
    kwargs: dict[str, Any] = {}
    for key, (_, vnode) in entries.items():
        value = _value(vnode)
        if key in {"min_size", "dimensions"}:
            if not isinstance(value, int) or value < 0 or (key == "dimensions" and value not in (2, 3)):
                expected = "2 or 3" if key == "dimensions" else "a non-negative integer"
                raise PipelineError(f"line {_line(vnode)}: select.{key} must be {expected}, got {value!r}")
            kwargs[key] = value
        else:
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) and v for v in values):
                raise PipelineError(f"line {_line(vnode)}: select.{key} must be a string or a list of strings")
            kwargs[key] = tuple(v.upper() for v in values)
    return Selection(**kwargs)


def _parse_stages(node: yaml.Node) -> list[StageCall]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise PipelineError(f"line {_line(node)}: 'stages' must be a non-empty list")
    calls = []
    for entry in node.value:
        if isinstance(entry, yaml.ScalarNode):
            calls.append(StageCall(entry.value, {}, _line(entry)))
            continue
        items = _mapping(entry, "a stage entry")
        if len(items) != 1:
            raise PipelineError(f"line {_line(entry)}: a stage entry is one 'name: {{parameters}}' pair")
        ((name, (knode, vnode)),) = items.items()
        params = _value(vnode) or {}
        if not isinstance(params, dict):
            raise PipelineError(f"line {_line(vnode)}: parameters of stage {name!r} must be a mapping")
        lines = {k.value: _line(k) for k, _ in vnode.value} if isinstance(vnode, yaml.MappingNode) else {}
        calls.append(StageCall(name, params, _line(knode), lines))
    return calls


def _parse_outputs(node: yaml.Node) -> dict[str, dict[str, Any]]:
    entries = _mapping(node, "'outputs'")
    _check_keys(entries, OUTPUT_KEYS, "'outputs'")
    outputs = {}
    for key, (_, vnode) in entries.items():
        value = _value(vnode) or {}
        if not isinstance(value, dict):
            raise PipelineError(f"line {_line(vnode)}: outputs.{key} must be a mapping of options")
        outputs[key] = value
    return outputs


def _resolve_factory(name: str, line: int) -> Callable:
    if "." not in name:
        from medidiff.stages.registry import get_stage

        try:
            return get_stage(name).factory
        except KeyError as exc:
            raise PipelineError(f"line {line}: {exc.args[0]}") from None
    module_name, _, attr = name.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise PipelineError(f"line {line}: cannot import stage {name!r} (module.Class expected)") from None
    if not callable(factory):
        raise PipelineError(f"line {line}: {name!r} is not callable")
    return factory


def _check_names(call: StageCall, factory: Callable) -> None:
    """PipelineError for a parameter the factory does not take, or a required one that is missing."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    accepted = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        return
    for key in call.params:
        if key not in accepted:
            raise PipelineError(
                f"line {call.param_lines.get(key, call.line)}: stage {call.name!r} has no parameter {key!r}; "
                f"parameters: {', '.join(k for k in accepted if k != 'self') or '(none)'}"
            )
    missing = [
        k for k, p in accepted.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in call.params
    ]
    if missing:
        raise PipelineError(f"line {call.line}: stage {call.name!r} needs parameter(s) {', '.join(missing)}")
