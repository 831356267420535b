"""Floating-point low-bit weights (FP8 E4M3, FP4 E2M1), simulated, with optional learned rounding.

Every Conv2d/Linear weight is scaled per output channel onto the format's grid (the scale chosen as in
Q-Diffusion's range search: the channel's max shrunk in 1 % steps, least L2.4 error) and rounded to
nearest, or with AdaRound's learned rounding on the layer's inputs recorded from calibration runs
(:mod:`medidiff.acceleration.adaround`). Activations stay float. Simulation only: float kernels run
the rounded weights (this CPU has no FP8/FP4 arithmetic), so it shows quality, not speed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medidiff.acceleration.adaround import learn_rounding, round_nearest
from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.fake_quant import P_NORM, SHRINK
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.quantization import _pack, _unpack, attach_weights, checksum
from medidiff.acceleration.transform import (
    Transform,
    TransformError,
    read_transform_file,
    write_transform_file,
)
from medidiff.methods.base import ModelFunction

METADATA_KEY = "medidiff_fp_weights"
FORMATS = {"fp8": (4, 3), "fp4": (2, 1)}  # exponent and mantissa bits: E4M3 (OCP, no infinities), E2M1


def fp_grid(exp_bits: int, man_bits: int) -> torch.Tensor:
    """Every finite value of a sign + ``exp_bits`` + ``man_bits`` float format (exponent bias
    ``2**(exp_bits-1) - 1``, subnormals; E4M3's all-ones code is NaN), sorted."""
    bias = 2 ** (exp_bits - 1) - 1
    values = []
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            if exp_bits == 4 and man_bits == 3 and e == 15 and m == 7:
                continue  # E4M3fn's NaN
            values.append(m / 2**man_bits * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**man_bits) * 2.0 ** (e - bias))
    grid = torch.tensor(sorted(set(values)), dtype=torch.float32)
    return torch.cat([-grid.flip(0)[:-1], grid])


def channel_scales(w: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (broadcast to ``w``) of ``w`` on ``grid`` with the least L2.4 error."""
    rows = w.reshape(w.shape[0], -1)
    top = (rows.abs().amax(1, keepdim=True) / grid[-1]).clamp_min(1e-12)
    best, best_scale = torch.full_like(top, float("inf")), top.clone()
    for s in SHRINK:
        err = (round_nearest(rows / (top * s), grid) * (top * s) - rows).abs().pow(P_NORM).sum(1, keepdim=True)
        best_scale = torch.where(err < best, top * s, best_scale)
        best = torch.minimum(err, best)
    return best_scale.reshape((-1,) + (1,) * (w.ndim - 1))


def layer_inputs(model_fn: ModelFunction, calibration: CalibrationSet, samples: int) -> dict[str, list[torch.Tensor]]:
    """Each weight layer's inputs on ``samples`` calibration calls spread over the set (float model)."""
    calls = calibration.inputs[:: max(1, len(calibration.inputs) // samples)][:samples]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in weight_layers(model_fn)}
    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach()))
               for name, layer in weight_layers(model_fn).items()]
    try:
        with torch.no_grad():
            model_fn.reset_hooks()
            for x, t, condition in calls:
                type(model_fn).forward(model_fn, x, t, condition)
            model_fn.reset_hooks()
    finally:
        for handle in handles:
            handle.remove()
    return seen


class FloatWeightQuantization(Transform):
    """``fmt`` ("fp8" or "fp4") weights, rounded to nearest or (``calibration`` given) learned
    (AdaRound, ``iters`` steps per layer on ``samples`` recorded calls). Simulation only.
    :meth:`save` / :meth:`load`: each weight's grid indices (two per byte for FP4) and channel scales."""

    name = "fp-weights"

    def __init__(self, fmt: str = "fp8", calibration: CalibrationSet | None = None, iters: int = 200, samples: int = 8):
        if fmt not in FORMATS:
            raise TransformError(f"fp-weights format is {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt, self.calibration, self.iters, self.samples = fmt, calibration, iters, samples
        self.codes: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # layer -> (grid index, scale, checksum)
        self.weights: dict[str, tuple[torch.Tensor, float]] = {}  # layer -> (rounded weight, float checksum)

    @property
    def bits(self) -> int:
        """Bits per stored weight."""
        return 1 + sum(FORMATS[self.fmt])

    def attach(self, model_fn: ModelFunction) -> None:
        if not self.codes:
            self.codes = self._round(model_fn, weight_layers(model_fn))
        if not self.weights:
            grid = fp_grid(*FORMATS[self.fmt])
            self.weights = {name: (grid[index.long()] * scale, c) for name, (index, scale, c) in self.codes.items()}
        attach_weights(model_fn, self.weights, self.name)

    @torch.no_grad()
    def _round(self, model_fn: ModelFunction, found: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        grid = fp_grid(*FORMATS[self.fmt])
        inputs = layer_inputs(model_fn, self.calibration, self.samples) if self.calibration else {}
        rounded = {}
        for name, layer in found.items():
            w = layer.weight.detach()
            scale = channel_scales(w, grid)
            if inputs.get(name):
                q = learn_rounding(layer, scale, grid, inputs[name], self.iters) / scale
            else:
                q = round_nearest(w / scale, grid)
            index = torch.searchsorted((grid[1:] + grid[:-1]) / 2, q.contiguous())  # q's place on the grid
            rounded[name] = (index.to(torch.uint8), scale, checksum(w))
        return rounded

    def save(self, path: str | Path) -> Path:
        """Write the rounded weights (after an application) as safetensors."""
        if not self.codes:
            raise TransformError("fp-weights: nothing to save yet; apply it to the model first")
        tensors, layers = {}, {}
        for name, (index, scale, c) in self.codes.items():
            tensors |= {f"{name}.index": _pack(index, self.bits), f"{name}.scale": scale}
            layers[name] = {"shape": list(index.shape), "checksum": c}
        return write_transform_file(path, tensors, METADATA_KEY, {"fmt": self.fmt, "layers": layers})

    @classmethod
    def load(cls, path: str | Path) -> FloatWeightQuantization:
        """Rounded weights written by :meth:`save`, ready to apply."""
        meta, tensors = read_transform_file(path, METADATA_KEY, "medidiff FP weight file", "FloatWeightQuantization.save")
        transform = cls(meta["fmt"])
        transform.codes = {name: (_unpack(tensors[f"{name}.index"], transform.bits, info["shape"]),
                                  tensors[f"{name}.scale"], info["checksum"]) for name, info in meta["layers"].items()}
        return transform
