"""MixDQ-style mixed precision: each layer's weight bit width from its measured sensitivity.

:func:`layer_sensitivity` quantizes one Conv2d/Linear at a time to the low bit width and measures the
model output's relative error on calibration calls; :func:`mixed_bits` gives the high bit width to the
layers with the largest error per weight until an average bit budget is spent, the low one to the rest.
The result feeds :class:`~medidiff.acceleration.quantization.PostTrainingQuantization` (``layer_bits``).
MixDQ chooses among several bit widths by integer programming over separately measured quality and
content metrics; this is the greedy two-width version on one output-error metric.
"""

from __future__ import annotations

import torch

from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.fake_quant import weight_codes, weight_from_codes, weight_ranges
from medidiff.acceleration.layers import WeightOverride, override_weight, weight_layers
from medidiff.methods.base import ModelFunction

PROBE = "sensitivity-probe"


@torch.no_grad()
def layer_sensitivity(model_fn: ModelFunction, calibration: CalibrationSet, bits: int = 4,
                      samples: int = 4) -> dict[str, float]:
    """Per weight layer: mean relative output error on ``samples`` calibration calls (spread over the
    set) with only that layer's weights at ``bits`` bits (per channel, range search)."""
    calls = calibration.inputs[:: max(1, len(calibration.inputs) // samples)][:samples]

    def outputs() -> list[torch.Tensor]:
        model_fn.reset_hooks()  # every layer computes (no cache from another transform)
        return [type(model_fn).forward(model_fn, x, t, condition) for x, t, condition in calls]

    reference = outputs()
    errors = {}
    for name, layer in weight_layers(model_fn).items():
        w = layer.weight.detach()
        ranges = weight_ranges(w, bits)
        override_weight(layer, WeightOverride(weight_from_codes(weight_codes(w, ranges, bits), ranges, bits)), PROBE)
        try:
            errors[name] = sum(float((o - r).norm() / r.norm()) for o, r in zip(outputs(), reference, strict=True))
        finally:
            model_fn.remove_hook(PROBE)
        errors[name] /= len(calls)
    model_fn.reset_hooks()
    return errors


def mixed_bits(model_fn: ModelFunction, sensitivity: dict[str, float], budget: float, low: int = 4,
               high: int = 8) -> dict[str, int]:
    """Bits per weight layer averaging at most ``budget`` per weight: ``high`` for the layers with the
    largest sensitivity per weight (as many as fit), ``low`` for the rest."""
    if not low <= budget <= high:
        raise ValueError(f"bit budget {budget} is outside {low}..{high}")
    sizes = {name: layer.weight.numel() for name, layer in weight_layers(model_fn).items()}
    spare = (budget - low) * sum(sizes.values())  # extra bits to hand out
    bits = dict.fromkeys(sizes, low)
    for name in sorted(sizes, key=lambda n: sensitivity[n] / sizes[n], reverse=True):
        if (high - low) * sizes[name] <= spare:
            bits[name], spare = high, spare - (high - low) * sizes[name]
    return bits
