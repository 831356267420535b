"""The stage registry: stages register themselves by name, the pipeline engine looks them up.

A stage is a callable ``item -> item`` built from keyword parameters (a MONAI ``MapTransform`` is
one). Later modules add stages with :func:`register_stage` without touching the engine.

Parameters are checked when a pipeline file is loaded (exit 2, naming file, line and key): their
types against the ``__init__`` annotations (int, float, bool, str, list, dict, Literal, ``| None``),
their values by building the stage, whose ``__init__`` raises :class:`ParameterError` for a bad value
and must stay cheap (load models on first call, not in ``__init__``). A stage that performs a task
declares it as a class attribute (``task = "bone_suppression"``): evaluation reports that task's
metrics against its baseline (``medidiff.evaluation.tasks``).

Example::

    @register_stage("clip_intensity", summary="Clip the image to a window.")
    class ClipIntensity:
        def __init__(self, lower: float = 0.0, upper: float = 1.0):
            if not lower < upper:
                raise ParameterError("upper", upper, f"a value above lower ({lower})")
        def __call__(self, item: dict) -> dict: ...
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass

# Modules whose import registers stages. Listed here so `medidiff stages` and pipeline files
# find every stage without importing the heavy ones at CLI start-up.
STAGE_MODULES = (
    "medidiff.stages.basic",
    "medidiff.stages.bone_suppression",
    "medidiff.stages.cs_reconstruction",
    "medidiff.stages.restoration",
)


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name, a one-line summary and the factory that builds it."""

    name: str
    summary: str
    factory: Callable

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword parameters the factory accepts (name -> inspect.Parameter)."""
        params = inspect.signature(self.factory).parameters
        return {k: p for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD}


_REGISTRY: dict[str, StageSpec] = {}
_DESCRIPTIONS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                 list: "a list", tuple: "a list", dict: "a mapping", type(None): "null"}


class ParameterError(ValueError):
    """A stage parameter has a bad value; ``key`` names it (the pipeline loader reports its line)."""

    def __init__(self, key: str, value: object, expected: str):
        super().__init__(f"{key} is {value!r}; expected {expected}")
        self.key = key


def check_parameter_types(factory: Callable, params: dict) -> None:
    """ParameterError for the first value whose type does not fit the factory's annotation.

    Annotations other than the simple ones (see the module docstring) are not checked.
    """
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # unresolvable annotations (third-party factories): nothing to check against
        return
    for key, value in params.items():
        expected = _mismatch(hints.get(key, typing.Any), value)
        if expected:
            raise ParameterError(key, value, expected)


def _mismatch(annotation: object, value: object) -> str | None:
    """None if ``value`` fits ``annotation`` (or it is not a simple one), else what was expected."""
    origin = typing.get_origin(annotation) or annotation
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else "one of " + ", ".join(map(repr, choices))
    if origin in (typing.Union, types.UnionType):
        options = [_mismatch(arg, value) for arg in typing.get_args(annotation)]
        return None if None in options else " or ".join(options)
    if origin not in _DESCRIPTIONS:
        return None
    accepted = {float: (int, float), tuple: (list, tuple)}.get(origin, origin)
    fits = isinstance(value, accepted) and not (isinstance(value, bool) and origin in (int, float))
    return None if fits else _DESCRIPTIONS[origin]


def register_stage(name: str, summary: str) -> Callable:
    """Class/function decorator that registers a stage factory under ``name``."""

    def decorate(factory: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"stage {name!r} is registered twice")
        _REGISTRY[name] = StageSpec(name=name, summary=summary, factory=factory)
        return factory

    return decorate


def _load_all() -> None:
    for module in STAGE_MODULES:
        importlib.import_module(module)


def available_stages() -> dict[str, StageSpec]:
    """Every registered stage, by name (imports the stage modules on first use)."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_stage(name: str) -> StageSpec:
    """The stage registered under ``name``; KeyError names the known stages."""
    stages = available_stages()
    if name not in stages:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(stages)}")
    return stages[name]
