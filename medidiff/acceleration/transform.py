"""The transform contract: attach hooks to a model function under one name, remove them by that name."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from medidiff.errors import MedidiffError
from medidiff.io.atomic import atomic_write
from medidiff.methods.base import ModelFunction


class TransformError(MedidiffError):
    """A transform cannot be applied to this model (wrong architecture, already applied, ...)."""


def has_hook(module: nn.Module, name: str) -> bool:
    """Whether ``module`` itself carries a diffusers hook called ``name``."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(name) is not None


class Transform(ABC):
    """A model-function transform; subclasses set :attr:`name` and implement :meth:`attach`."""

    name: str

    def apply(self, model_fn: ModelFunction) -> None:
        """Attach to ``model_fn`` (all or nothing); refuses a second application of the same name."""
        if any(has_hook(m, self.name) for m in model_fn.modules()):
            raise TransformError(f"{self.name} is already applied to this model; remove it first")
        try:
            self.attach(model_fn)
        except BaseException:
            self.remove(model_fn)
            raise

    @abstractmethod
    def attach(self, model_fn: ModelFunction) -> None:
        """Register this transform's hooks on ``model_fn`` and its submodules under :attr:`name`."""

    def remove(self, model_fn: ModelFunction) -> None:
        """Detach every hook of this transform; the model computes exactly as before."""
        model_fn.remove_hook(self.name)


def write_transform_file(path: str | Path, tensors: dict[str, torch.Tensor], key: str, meta: dict) -> Path:
    """Write a transform's tensors (safetensors, atomically) with its JSON ``meta`` under metadata ``key``."""
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={key: json.dumps(meta)})
    return path


def read_transform_file(path: str | Path, key: str, what: str, writer: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a file written by :func:`write_transform_file` under ``key``; for anything
    else a :class:`TransformError` saying it is not ``what`` and naming ``writer``, the method that writes one."""
    try:
        with safe_open(Path(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[key])
            return meta, {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise TransformError(f"{path}: not a {what} ({e}); write one with {writer}") from None


@contextmanager
def applied(model_fn: ModelFunction, *transforms: Transform) -> Iterator[ModelFunction]:
    """Apply ``transforms`` in order for the duration of the block, then remove them (also on errors)."""
    done: list[Transform] = []
    try:
        for transform in transforms:
            transform.apply(model_fn)
            done.append(transform)
        model_fn.reset_hooks()
        yield model_fn
    finally:
        for transform in reversed(done):
            transform.remove(model_fn)
