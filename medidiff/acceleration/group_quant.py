"""DGQ-style group quantization with outlier handling, on weights, simulated.

Each Conv2d/Linear weight is quantized in groups: per output channel, every ``group_size`` input
channels (with their kernel positions) get their own range (Q-Diffusion's range search), so one
large group does not coarsen the others; the ``outliers`` fraction of weights largest in magnitude
(per layer) is kept exactly, outside the groups' ranges. Activations stay float.
"""

from __future__ import annotations

import torch

from medidiff.acceleration.fake_quant import fake_quantize, search_range
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.pruning import magnitude_mask
from medidiff.acceleration.quantization import attach_weights, checksum
from medidiff.acceleration.transform import Transform, TransformError
from medidiff.methods.base import ModelFunction


def group_quantize(w: torch.Tensor, bits: int, group_size: int, outliers: float = 0.0) -> torch.Tensor:
    """``w`` (out, in, ...) fake-quantized per (output channel, ``group_size`` input channels), its
    ``outliers`` fraction of largest-magnitude weights kept exact."""
    keep = magnitude_mask(w, 1 - outliers) if outliers > 0 else torch.zeros_like(w, dtype=torch.bool)
    inner = w.masked_fill(keep, 0)  # outliers take no part in the groups' ranges
    out, cin = w.shape[:2]
    pad = -cin % group_size
    padded = torch.cat([inner, inner.new_zeros(out, pad, *w.shape[2:])], 1) if pad else inner
    rows = padded.reshape(out, (cin + pad) // group_size, -1).reshape(-1, group_size * padded[0, 0].numel())
    lo, hi = search_range(rows, bits)
    groups = fake_quantize(rows, lo, hi, bits).reshape(padded.shape)[:, :cin]
    return torch.where(keep, w, groups)


class GroupQuantization(Transform):
    """``bits``-bit weights in groups of ``group_size`` input channels, ``outliers`` kept exact."""

    name = "group-quantization"

    def __init__(self, bits: int = 4, group_size: int = 16, outliers: float = 0.005):
        if not 2 <= bits <= 8 or group_size < 1 or not 0 <= outliers < 0.5:
            raise TransformError(f"group quantization bits {bits}, group_size {group_size}, outliers {outliers}; "
                                 "expected bits 2..8, group_size >= 1 and 0 <= outliers < 0.5")
        self.bits, self.group_size, self.outliers = bits, group_size, outliers
        self.weights: dict[str, tuple[torch.Tensor, float]] = {}  # layer -> (quantized weight, float checksum)

    @torch.no_grad()
    def attach(self, model_fn: ModelFunction) -> None:
        if not self.weights:  # quantized once, reused by later applications
            self.weights = {name: (group_quantize(layer.weight.detach(), self.bits, self.group_size, self.outliers),
                                   checksum(layer.weight)) for name, layer in weight_layers(model_fn).items()}
        attach_weights(model_fn, self.weights, self.name)
