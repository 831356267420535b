"""The stage registry: stages register themselves by name, the pipeline engine looks them up.

A stage is a callable ``item -> item`` built from keyword parameters (a MONAI ``MapTransform`` is
one). Later modules add stages with :func:`register_stage` without touching the engine.

Example::

    @register_stage("clip_intensity", summary="Clip the image to a window.")
    class ClipIntensity:
        def __init__(self, lower: float = 0.0, upper: float = 1.0): ...
        def __call__(self, item: dict) -> dict: ...
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

# Modules whose import registers stages. Listed here so `medidiff stages` and pipeline files
# find every stage without importing the heavy ones at CLI start-up.
STAGE_MODULES = (
    "medidiff.stages.basic",
    "medidiff.stages.bone_suppression",
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
