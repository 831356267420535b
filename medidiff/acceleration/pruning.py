"""Unstructured magnitude pruning: in every Conv2d/Linear the ``sparsity`` fraction of weights with the
smallest magnitude is zeroed (per layer). Dense kernels still run, so this saves no time by itself."""

from __future__ import annotations

import torch

from medidiff.acceleration.layers import WeightOverride, override_weight, weight_layers
from medidiff.acceleration.transform import Transform, TransformError
from medidiff.methods.base import ModelFunction


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the weights kept: all but the round(sparsity * numel) smallest in magnitude."""
    k = round(sparsity * w.numel())
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    return w.abs() > w.abs().flatten().kthvalue(k).values


class MagnitudePruning(Transform):
    """Zero the smallest ``sparsity`` fraction of each weight layer's weights."""

    name = "pruning"

    def __init__(self, sparsity: float = 0.5):
        if not isinstance(sparsity, int | float) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
            raise TransformError(f"pruning sparsity is {sparsity!r}; expected 0 <= sparsity < 1")
        self.sparsity = float(sparsity)

    @torch.no_grad()
    def attach(self, model_fn: ModelFunction) -> None:
        for layer in weight_layers(model_fn).values():
            w = layer.weight.detach()
            override_weight(layer, WeightOverride(w * magnitude_mask(w, self.sparsity)), self.name)
