"""The weight layers that compression transforms change, and the hook that runs one with other weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import HookRegistry
from torch import nn

from medidiff.acceleration.transform import TransformError

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d / Linear inside ``model``, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


class LayerOverride(ModelHook):
    """A hook that computes its weight layer itself; one such hook per layer (they do not stack)."""


class WeightOverride(LayerOverride):
    """Runs a Conv2d/Linear with ``weight`` instead of its own, after ``input_fn`` on its input."""

    def __init__(self, weight: torch.Tensor, input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.weight, self.input_fn = weight, input_fn

    def new_forward(self, module, x):
        if self.input_fn is not None:
            x = self.input_fn(x)
        if isinstance(module, nn.Conv2d):
            return module._conv_forward(x, self.weight, module.bias)
        return F.linear(x, self.weight, module.bias)


def override_weight(module: nn.Module, hook: LayerOverride, name: str) -> None:
    """Attach ``hook`` to ``module`` under ``name``; one weight override per layer."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    others = [n for n, h in registry.hooks.items() if isinstance(h, LayerOverride)]
    if others:
        raise TransformError(f"{name} cannot be combined with {others[0]} on the same layers yet; "
                             f"remove {others[0]} first")
    registry.register_hook(hook, name)
