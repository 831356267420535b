"""The method contract: what every medidiff method (BS-LDM, the regression baseline, ...) provides.

A method is

- its networks (:meth:`Method.networks`), saved and loaded as ``<name>.safetensors`` + ``<name>.json``
  (the JSON holds the method's config: architecture, process, sampling settings, training record);
- its process (:meth:`Method.process`, a :class:`~medidiff.diffusion.process.Process`, or ``None``
  for one-pass methods);
- a call on tensors (``method(x, **options) -> tensor``);
- ONE model-function hook point, :attr:`Method.model_fn`, a :class:`ModelFunction` module whose
  ``forward(x, t, condition) -> output`` is every network evaluation the method makes while
  sampling. Acceleration transforms (feature caching, quantization, pruning) attach there, to any
  method, as diffusers ``ModelHook`` s (:meth:`ModelFunction.register_hook`) or by editing
  ``model_fn.net`` in place.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook
from safetensors.torch import load_file, save_file
from torch import nn

from medidiff.io.atomic import atomic_write


class ModelFunction(nn.Module):
    """``forward(x, t, condition) -> output`` around a network ``net``; subclasses define the call.
    ``weights_file``: the ``<name>.safetensors`` that ``net`` was loaded from (``None`` when built in
    Python), where files made from those weights ship beside it (e.g. the int8 model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.weights_file: Path | None = None

    def register_hook(self, hook: ModelHook, name: str) -> None:
        """Attach a diffusers ``ModelHook`` (pre/post-forward or ``new_forward``) under ``name``."""
        HookRegistry.check_if_exists_or_initialize(self).register_hook(hook, name)

    def remove_hook(self, name: str) -> None:
        """Detach the hook ``name`` (and hooks of that name on submodules)."""
        HookRegistry.check_if_exists_or_initialize(self).remove_hook(name)

    def reset_hooks(self) -> None:
        """Reset stateful hooks here and on submodules (e.g. feature caches); methods call it before
        every new input."""
        HookRegistry.check_if_exists_or_initialize(self).reset_stateful_hooks()


def read_component(folder: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON config and the safetensors weights of ``folder/<name>``."""
    folder = Path(folder)
    return json.loads((folder / f"{name}.json").read_text()), load_file(folder / f"{name}.safetensors")


def write_component(folder: Path, name: str, net: nn.Module, config: dict) -> Path:
    """Write ``net``'s weights (floats as float16, as shipped) and ``config``; returns the weights path."""
    path = Path(folder) / f"{name}.safetensors"
    with atomic_write(path) as tmp:
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}, tmp)
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return path


class Method(ABC):
    """Base class of methods. Subclasses set :attr:`model_fn` and :attr:`config` in ``__init__`` and
    implement :meth:`from_pretrained`, :meth:`networks` and ``__call__``."""

    model_fn: ModelFunction
    config: dict

    @classmethod
    @abstractmethod
    def from_pretrained(cls, folder: Path, name: str) -> Method:
        """Load the method saved as ``folder/<name>.json`` + ``.safetensors`` (and its parts)."""
        ...

    @abstractmethod
    def networks(self) -> dict[str, tuple[nn.Module, dict]]:
        """Every saved part: file stem -> (network, JSON config)."""
        ...

    def process(self, **options):
        """The sampling process for these options (``None`` for one-pass methods)."""
        return None

    def save_pretrained(self, folder: Path) -> None:
        """Write every part to ``folder`` (loadable again with :meth:`from_pretrained`)."""
        for stem, (net, config) in self.networks().items():
            write_component(folder, stem, net, config)

    @abstractmethod
    def __call__(self, x: torch.Tensor, **options) -> torch.Tensor:
        ...
