"""Q-Diffusion-style post-training quantization, simulated (fake quantization in float).

Every Conv2d and Linear runs with per-output-channel quantized weights (``weight_bits``) on a
per-tensor quantized input (``act_bits``; ``None`` keeps float activations). Ranges come from the
range search in :mod:`medidiff.acceleration.fake_quant`; activation ranges from the model's own
inputs recorded across the sampling timesteps (:func:`~medidiff.acceleration.calibration.record_model_inputs`),
run through the weight-quantized model. Split shortcut quantization: the shortcut convolution of each
up-block resnet, whose input is the concatenation [upsampled feature, skip feature] of two very
different ranges, quantizes each part (activations and the matching weight columns) separately.
The UNet's ``conv_in`` reads the sampler's state itself, whose range differs per input (noise
outliers): its input stays float. The first and last weight layers (``conv_in``, ``conv_out``) keep
at least ``head_stem_bits`` (8) bits, as BRECQ-derived PTQ code does (Q-Diffusion's own code quantizes
them like the rest; ``head_stem_bits=None`` does too). Rounding is to nearest (Q-Diffusion's
AdaRound/BRECQ reconstruction is not done).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.fake_quant import (
    ActivationObserver,
    channel_parts,
    fake_quantize,
    weight_codes,
    weight_from_codes,
    weight_ranges,
)
from medidiff.acceleration.layers import WeightOverride, override_weight, weight_layers
from medidiff.acceleration.transform import (
    Transform,
    TransformError,
    read_transform_file,
    write_transform_file,
)
from medidiff.methods.base import ModelFunction

METADATA_KEY = "medidiff_quantization"
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


def _quantize_input(ranges: torch.Tensor, split: int, bits: int, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fake_quantize(part, lo, hi, bits) for part, (lo, hi) in zip(channel_parts(x, split), ranges,
                                                                                  strict=True)], 1)


def _observe(observers: list[ActivationObserver], split: int, x: torch.Tensor) -> torch.Tensor:
    for observer, part in zip(observers, channel_parts(x, split), strict=True):
        observer.observe(part)
    return x


def checksum(w: torch.Tensor) -> float:
    """A fingerprint of a float weight (quantization made for other weights is refused)."""
    return float(w.detach().double().abs().sum())


def attach_weights(model_fn: ModelFunction, weights: dict[str, tuple[torch.Tensor, float]], name: str) -> None:
    """Run every weight layer with its weight from ``weights`` (layer -> (weight, :func:`checksum` of the
    float weight it was made from)) under ``name``; refuses a model whose weights differ."""
    found = weight_layers(model_fn)
    if set(found) != set(weights) or any(
            abs(checksum(found[n].weight) - c) > 1e-6 * max(1.0, c) for n, (_, c) in weights.items()):
        raise TransformError(f"{name} was made for other weights than this model's; apply a new {name} to it")
    for layer_name, (weight, _) in weights.items():
        override_weight(found[layer_name], WeightOverride(weight), name)


@dataclass
class QuantizedLayer:
    """One layer's quantization: weight codes and per-channel ranges, activation ranges, split."""

    codes: torch.Tensor  # uint8 (int32 above 8 bits), the weight's shape
    bits: int  # of the weight codes
    weight_ranges: torch.Tensor  # (parts, 2, out_channels)
    act_ranges: torch.Tensor | None  # (parts, 2) or None: float input
    split: int
    checksum: float


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes as stored: two 4-bit codes per byte when ``bits <= 4``."""
    flat = codes.flatten()
    if bits > 4:
        return flat
    flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    n = math.prod(shape)
    if bits > 4:
        return packed[:n].reshape(shape)
    return torch.stack([packed & 15, packed >> 4], 1).flatten()[:n].reshape(shape)


class PostTrainingQuantization(Transform):
    """W``weight_bits``A``act_bits`` fake quantization calibrated on ``calibration``.

    The first application quantizes and calibrates; the result (:attr:`layers`) is reused when the
    transform is applied again and written by :meth:`save` (uint8 codes, two per byte at 4 bits or fewer,
    safetensors), so :meth:`load` applies it without calibration data. Either way it is refused on a
    model whose weights differ from those it was made for. ``symmetric_weights``: ranges whose codes are
    signed integers (:func:`~medidiff.acceleration.fake_quant.symmetric_start`, for int8 kernels);
    ``quantized_input(name, layer)``: which layers' inputs are quantized (default: all but ``conv_in``);
    ``layer_bits``: weight bits of named layers (e.g. :func:`~medidiff.acceleration.mixed_precision.mixed_bits`).
    """

    name = "quantization"

    def __init__(self, calibration: CalibrationSet | None = None, weight_bits: int = 8, act_bits: int | None = 8,
                 split_shortcut: bool = True, head_stem_bits: int | None = 8, symmetric_weights: bool = False,
                 quantized_input: Callable[[str, nn.Module], bool] | None = None,
                 layer_bits: dict[str, int] | None = None):
        for key, bits in (("weight_bits", weight_bits), ("act_bits", act_bits), ("head_stem_bits", head_stem_bits),
                          *((f"layer_bits[{n!r}]", b) for n, b in (layer_bits or {}).items())):
            if bits is not None and not 2 <= bits <= 16:
                raise TransformError(f"quantization {key} is {bits}; expected 2..16")
        self.calibration, self.weight_bits, self.act_bits = calibration, weight_bits, act_bits
        self.split_shortcut, self.head_stem_bits = split_shortcut, head_stem_bits
        self.symmetric_weights, self.layer_bits = symmetric_weights, layer_bits or {}
        self.quantized_input = quantized_input or (lambda name, layer: not name.endswith(FLOAT_INPUT))
        self.layers: dict[str, QuantizedLayer] = {}
        self.source = "its first model"

    def attach(self, model_fn: ModelFunction) -> None:
        if not self.layers:
            self.layers = self.quantize_layers(model_fn)
        found = weight_layers(model_fn)
        if set(found) != set(self.layers) or any(
                abs(checksum(found[n].weight) - q.checksum) > 1e-6 * max(1.0, q.checksum) for n, q in self.layers.items()):
            raise TransformError(f"quantization from {self.source} was made for other weights than this model's; "
                                 "quantize this model anew")
        for name, q in self.layers.items():
            act = None if q.act_ranges is None else partial(_quantize_input, q.act_ranges, q.split, self.act_bits)
            override_weight(found[name], WeightOverride(weight_from_codes(q.codes, q.weight_ranges, q.bits, q.split), act),
                            self.name)

    @torch.no_grad()
    def quantize_layers(self, model_fn: ModelFunction) -> dict[str, QuantizedLayer]:
        """Quantize the weights, then calibrate activation ranges on the weight-quantized model."""
        if self.act_bits is not None and (self.calibration is None or not self.calibration.inputs):
            raise TransformError("quantization has no calibration inputs; record them with record_model_inputs")
        splits = shortcut_splits(model_fn) if self.split_shortcut else {}
        layers, observed = {}, {}
        found = weight_layers(model_fn)
        head_stem = {next(iter(found)), next(reversed(found))} if self.head_stem_bits else set()
        for name, layer in found.items():
            split, w = splits.get(layer, 0), layer.weight.detach()
            bits = max(self.weight_bits, self.head_stem_bits) if name in head_stem else self.weight_bits
            bits = self.layer_bits.get(name, bits)
            ranges = weight_ranges(w, bits, split, self.symmetric_weights)
            codes = weight_codes(w, ranges, bits, split)
            layers[name] = QuantizedLayer(codes, bits, ranges, None, split, checksum(w))
            hook = WeightOverride(weight_from_codes(codes, ranges, bits, split))
            if self.act_bits is not None and self.quantized_input(name, layer):
                observed[name] = [ActivationObserver(seed) for seed in range(2 if split else 1)]
                hook.input_fn = partial(_observe, observed[name], split)
            override_weight(layer, hook, self.name)
        if observed:
            # the class's forward skips hooks on the model function itself (e.g. DeepCache's step counter):
            # after the reset every layer computes, as in a refresh step
            model_fn.reset_hooks()
            for x, t, condition in self.calibration.inputs:
                type(model_fn).forward(model_fn, x, t, condition)
            model_fn.reset_hooks()
        model_fn.remove_hook(self.name)
        for name, observers in observed.items():
            if all(o.lo is not None for o in observers):  # layers the model never ran keep a float input
                layers[name].act_ranges = torch.stack([torch.stack(o.range(self.act_bits)) for o in observers])
        return layers

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(meta, tensors)`` of the quantization (after an application), as :meth:`save` writes them."""
        if not self.layers:
            raise TransformError("quantization: nothing to save yet; apply it to the model first")
        tensors, layers = {}, {}
        for name, q in self.layers.items():
            tensors[f"{name}.codes"] = _pack(q.codes, q.bits).contiguous()
            tensors[f"{name}.weight_ranges"] = q.weight_ranges.contiguous()
            if q.act_ranges is not None:
                tensors[f"{name}.act_ranges"] = q.act_ranges.contiguous()
            layers[name] = {"shape": list(q.codes.shape), "bits": q.bits, "split": q.split, "checksum": q.checksum}
        return {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "layers": layers}, tensors

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor], source: str) -> PostTrainingQuantization:
        """The quantization of :meth:`state`'s ``(meta, tensors)``, read from ``source``."""
        transform = cls(None, meta["weight_bits"], meta["act_bits"])
        transform.source = source
        for name, info in meta["layers"].items():
            transform.layers[name] = QuantizedLayer(
                _unpack(tensors[f"{name}.codes"], info["bits"], info["shape"]), info["bits"],
                tensors[f"{name}.weight_ranges"], tensors.get(f"{name}.act_ranges"), info["split"], info["checksum"])
        return transform

    def save(self, path: str | Path) -> Path:
        """Write the quantization (after an application) as safetensors; returns the path."""
        meta, tensors = self.state()
        return write_transform_file(path, tensors, METADATA_KEY, meta)

    @classmethod
    def load(cls, path: str | Path) -> PostTrainingQuantization:
        """A quantization written by :meth:`save`, ready to apply without calibration."""
        meta, tensors = read_transform_file(path, METADATA_KEY, "medidiff quantization file",
                                            "PostTrainingQuantization.save")
        return cls.from_state(meta, tensors, str(path))
