"""Q-Diffusion-style post-training quantization, simulated (fake quantization in float).

Every Conv2d and Linear runs with per-output-channel quantized weights (``weight_bits``) on a
per-tensor quantized input (``act_bits``; ``None`` keeps float activations). Ranges come from the
range search in :mod:`medidiff.acceleration.fake_quant`; activation ranges from the model's own
inputs recorded across the sampling timesteps (:func:`~medidiff.acceleration.calibration.record_model_inputs`),
run through the weight-quantized model. Split shortcut quantization: the shortcut convolution of each
up-block resnet, whose input is the concatenation [upsampled feature, skip feature] of two very
different ranges, quantizes each part (activations and the matching weight columns) separately.
The UNet's ``conv_in`` reads the sampler's state itself, whose range differs per input (noise
outliers): its input stays float. Rounding is to nearest (Q-Diffusion's AdaRound/BRECQ
reconstruction is not done).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.fake_quant import ActivationObserver, fake_quantize, quantize_weight
from medidiff.acceleration.layers import WeightOverride, override_weight, weight_layers
from medidiff.acceleration.transform import Transform, TransformError
from medidiff.methods.base import ModelFunction

FLOAT_INPUT = "conv_in"  # the UNet's first layer reads the sampler's state x_t (+ condition): kept float


def shortcut_splits(model: nn.Module) -> dict[nn.Module, int]:
    """Shortcut conv of each diffusers up-block resnet -> channels of the upsampled part of its input.

    diffusers up blocks feed resnet j ``cat([hidden, skip])``: ``hidden`` has the previous resnet's
    output channels (j > 0) or, for j = 0, the resnet's input minus the skip, which has the block's
    output channels when the block has several resnets.
    """
    splits = {}
    for unet in (m for m in model.modules() if hasattr(m, "up_blocks")):
        for block in unet.up_blocks:
            resnets = list(block.resnets)
            for j, resnet in enumerate(resnets):
                shortcut = getattr(resnet, "conv_shortcut", None)
                if shortcut is None or (j == 0 and len(resnets) == 1):
                    continue
                hidden = resnets[j - 1].out_channels if j else resnet.in_channels - resnet.out_channels
                if 0 < hidden < shortcut.in_channels:
                    splits[shortcut] = hidden
    return splits


def _parts(x: torch.Tensor, split: int) -> list[torch.Tensor]:
    return [x[:, :split], x[:, split:]] if split else [x]


def _observe(observers: list[ActivationObserver], split: int, x: torch.Tensor) -> torch.Tensor:
    for observer, part in zip(observers, _parts(x, split), strict=True):
        observer.observe(part)
    return x


def _quantize_input(ranges: list[tuple[torch.Tensor, torch.Tensor]], split: int, bits: int,
                    x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fake_quantize(part, lo, hi, bits) for part, (lo, hi) in zip(_parts(x, split), ranges, strict=True)], 1)


class PostTrainingQuantization(Transform):
    """W``weight_bits``A``act_bits`` fake quantization calibrated on ``calibration``."""

    name = "quantization"

    def __init__(self, calibration: CalibrationSet, weight_bits: int = 8, act_bits: int | None = 8,
                 split_shortcut: bool = True):
        for key, bits in (("weight_bits", weight_bits), ("act_bits", act_bits)):
            if bits is not None and not 2 <= bits <= 16:
                raise TransformError(f"quantization {key} is {bits}; expected 2..16")
        if act_bits is not None and not calibration.inputs:
            raise TransformError("quantization has no calibration inputs; record them with record_model_inputs")
        self.calibration, self.weight_bits, self.act_bits = calibration, weight_bits, act_bits
        self.split_shortcut = split_shortcut

    @torch.no_grad()
    def attach(self, model_fn: ModelFunction) -> None:
        splits = shortcut_splits(model_fn) if self.split_shortcut else {}
        observed = []
        for name, layer in weight_layers(model_fn).items():
            split = splits.get(layer, 0)
            hook = WeightOverride(quantize_weight(layer.weight.detach(), self.weight_bits, split))
            override_weight(layer, hook, self.name)
            if self.act_bits is not None and not name.endswith(FLOAT_INPUT):
                observers = [ActivationObserver(seed) for seed in range(2 if split else 1)]
                hook.input_fn = partial(_observe, observers, split)
                observed.append((hook, observers, split))
        if not observed:
            return
        # the class's forward skips hooks on the model function itself (e.g. DeepCache's step counter):
        # after the reset every layer computes, as in a refresh step
        model_fn.reset_hooks()
        for x, t, condition in self.calibration.inputs:
            type(model_fn).forward(model_fn, x, t, condition)
        model_fn.reset_hooks()
        for hook, observers, split in observed:
            reached = all(o.lo is not None for o in observers)
            hook.input_fn = (partial(_quantize_input, [o.range(self.act_bits) for o in observers], split, self.act_bits)
                             if reached else None)
