"""CacheQuant (Liu et al., CVPR 2025): DeepCache's refresh schedule chosen jointly with quantization,
and decoupled error correction of the cached and the quantized features.

Dynamic programming schedule: the quantized model (Q-Diffusion fake quantization,
:class:`~medidiff.acceleration.quantization.PostTrainingQuantization`) and the float model run the
calibration runs step by step; the feature DeepCache reuses is recorded from both. Caching it at step
``j`` and reusing it at step ``i`` costs ``mean |F_i(float) - F_j(quantized)|``: the caching error
and the quantization error of the kept feature together. :func:`optimal_refresh_steps` splits the
steps into as many stretches as there are refreshes (each of a bounded length, as in the reference
code) so that the summed cost is least, exactly, by dynamic programming.

Decoupled error correction: (1) on every cached step, the reused feature is corrected channel by
channel, ``a_c x + b_c`` per step, fitted by least squares to the float feature of that step; (2) with
(1) in place, every weight layer that runs on the shallow steps (the branch DeepCache recomputes) gets
a per-step, per-output-channel ``a y + b`` fitted from its quantized output to the float layer's
output on the same input. The reference corrects in (2) only the cached channels' contribution to the
layer that reads the cache; here the whole output of each shallow-branch layer is corrected.
Simulation only: fake quantization, float kernels.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import HookRegistry
from torch import nn

from medidiff.acceleration.adaround import layer_output
from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.deepcache import DeepCache
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.quantization import PostTrainingQuantization
from medidiff.acceleration.transform import (
    Transform,
    TransformError,
    has_hook,
    read_transform_file,
    write_transform_file,
)
from medidiff.acceleration.unets import find_layout
from medidiff.methods.base import ModelFunction

METADATA_KEY = "medidiff_cachequant"
Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def optimal_refresh_steps(errors: torch.Tensor, refreshes: int, min_gap: int = 1, max_gap: int | None = None) -> list[int]:
    """The refresh steps (0 first) that split steps ``0..T-1`` into ``refreshes`` stretches of
    ``min_gap..max_gap`` steps with the least total error, where ``errors[j, i]`` (``i >= j``) is the
    error at step ``i`` when the cache was last refreshed at step ``j`` (``errors[j, j]``: the refresh
    step's own error). Exact dynamic programming over (stretches so far, steps covered)."""
    steps = errors.shape[0]
    max_gap = steps if max_gap is None else max_gap
    row_sums = errors.double().triu().cumsum(1).tolist()  # row_sums[j][n - 1]: a stretch [j, n)'s error
    best = [[math.inf] * (steps + 1) for _ in range(refreshes + 1)]
    start = [[-1] * (steps + 1) for _ in range(refreshes + 1)]
    best[0][0] = 0.0
    for k in range(1, refreshes + 1):
        for n in range(1, steps + 1):
            for j in range(max(0, n - max_gap), n - min_gap + 1):
                cost = best[k - 1][j] + row_sums[j][n - 1]
                if cost < best[k][n]:
                    best[k][n], start[k][n] = cost, j
    if math.isinf(best[refreshes][steps]):
        raise TransformError(f"CacheQuant: {steps} steps cannot be split into {refreshes} refreshes of {min_gap} to "
                             f"{max_gap} steps each; change refreshes, min_gap or max_gap")
    picked, n = [], steps
    for k in range(refreshes, 0, -1):
        n = start[k][n]
        picked.append(n)
    return picked[::-1]


def sampling_runs(calibration: CalibrationSet) -> list[list[Call]]:
    """The calibration inputs split into sampling runs (a run restarts where the timestep rises);
    all must have the same number of steps (inputs recorded at every step: ``every=1``)."""
    runs: list[list[Call]] = []
    for call in calibration.inputs:
        if not runs or float(call[1].max()) > float(runs[-1][-1][1].max()):
            runs.append([])
        runs[-1].append(call)
    if not runs or len({len(run) for run in runs}) != 1 or len(runs[0]) < 2:
        raise TransformError("CacheQuant needs whole sampling runs of one sampler in its calibration; record them "
                             "with record_model_inputs(..., every=1)")
    return runs


class ChannelFit:
    """Least-squares ``y ≈ a x + b`` per step and channel (dim 1), accumulated over calls."""

    def __init__(self, steps: int, channels: int):
        self.sums = torch.zeros(5, steps, channels, dtype=torch.float64)

    def add(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = (v.detach().movedim(1, 0).reshape(v.shape[1], -1).double() for v in (x, y))
        self.sums[:, step] += torch.stack([torch.full_like(x[:, 0], x.shape[1]), x.sum(1), y.sum(1),
                                           (x * x).sum(1), (x * y).sum(1)])

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` (steps, channels); ``a = 1, b = 0`` where nothing (or a constant) was seen."""
        n, sx, sy, sxx, sxy = self.sums
        n1 = n.clamp_min(1)
        var, cov = sxx / n1 - (sx / n1) ** 2, sxy / n1 - sx * sy / n1**2
        a = torch.where((n > 0) & (var > 1e-12), cov / var.clamp_min(1e-12), torch.ones_like(var))
        b = torch.where(n > 0, (sy - a * sx) / n1, torch.zeros_like(var))
        return a.float(), b.float()


def _affine(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return y * a.reshape(shape) + b.reshape(shape)


class _Correction(ModelHook):
    """After a module: ``a[step] y + b[step]`` per channel, the step read from DeepCache's schedule."""

    def __init__(self, schedule, a: torch.Tensor, b: torch.Tensor, cached_only: bool):
        super().__init__()
        self.schedule, self.a, self.b, self.cached_only = schedule, a, b, cached_only

    def post_forward(self, module, output):
        step = self.schedule.step
        if step >= len(self.a) or (self.cached_only and self.schedule.refresh):
            return output
        return _affine(output, self.a[step], self.b[step])


def _run_features(model_fn: ModelFunction, runs: list[list[Call]], module: nn.Module) -> list[list[torch.Tensor]]:
    """``module``'s output at every call of every run (the whole model runs: hooks on the model function skipped)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        features = []
        for run in runs:
            model_fn.reset_hooks()
            for x, t, condition in run:
                type(model_fn).forward(model_fn, x, t, condition)
            features.append(seen[:])
            seen.clear()
        model_fn.reset_hooks()
    finally:
        handle.remove()
    return features


class CacheQuant(Transform):
    """DeepCache with ``refreshes`` refreshes placed by dynamic programming on the combined cache and
    quantization error, W``weight_bits``A``act_bits`` fake quantization, and (``correct``) decoupled
    error correction; ``calibration`` holds whole sampling runs of the sampler it is made for
    (``record_model_inputs(..., every=1)``; every ``every``-th input calibrates the activations).
    Stretches between refreshes are ``min_gap..max_gap`` steps (default: half to twice the average,
    as in the reference). Made for that sampler's step count: later steps run uncorrected on the last cache."""

    name = "cachequant"
    PARTS = ("deepcache", "quantization")  # the transforms it applies itself

    def __init__(self, calibration: CalibrationSet | None = None, refreshes: int = 17, weight_bits: int = 8,
                 act_bits: int | None = 8, branch: int = 0, min_gap: int | None = None, max_gap: int | None = None,
                 correct: bool = True, every: int = 5):
        if refreshes < 1 or every < 1:
            raise TransformError(f"CacheQuant refreshes {refreshes}, every {every}; expected whole numbers >= 1")
        self.calibration, self.refreshes, self.branch, self.correct, self.every = (calibration, refreshes, branch,
                                                                                   correct, every)
        self.weight_bits, self.act_bits, self.min_gap, self.max_gap = weight_bits, act_bits, min_gap, max_gap
        self.quant: PostTrainingQuantization | None = None
        self.refresh_steps: list[int] = []
        self.errors: torch.Tensor | None = None  # the DP's error table (steps, steps)
        self.cache_fix: tuple[torch.Tensor, torch.Tensor] | None = None  # (a, b): (steps, channels)
        self.layer_fix: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(self, model_fn: ModelFunction) -> None:
        part = next((p for p in self.PARTS if any(has_hook(m, p) for m in model_fn.modules())), None)
        if part is not None:
            raise TransformError(f"cachequant applies its own {part}; remove {part} first")
        super().apply(model_fn)

    def attach(self, model_fn: ModelFunction) -> None:
        if self.quant is None:
            self._make(model_fn)
        self._attach_parts(model_fn, correct=self.correct)

    def remove(self, model_fn: ModelFunction) -> None:
        for name in (self.name, *self.PARTS):
            model_fn.remove_hook(name)

    def _attach_parts(self, model_fn: ModelFunction, correct: bool, layers: bool = True) -> None:
        self.quant.apply(model_fn)
        DeepCache(refresh_steps=self.refresh_steps, branch=self.branch).apply(model_fn)
        if not correct:
            return
        schedule = HookRegistry.check_if_exists_or_initialize(model_fn).get_hook("deepcache").schedule
        reused = find_layout(model_fn).reused(self.branch)
        HookRegistry.check_if_exists_or_initialize(reused).register_hook(_Correction(schedule, *self.cache_fix, True),
                                                                         self.name)
        found = weight_layers(model_fn)
        for name, (a, b) in self.layer_fix.items() if layers else ():
            HookRegistry.check_if_exists_or_initialize(found[name]).register_hook(_Correction(schedule, a, b, False),
                                                                                  self.name)

    def shallow_layers(self, model_fn: ModelFunction) -> dict[str, nn.Module]:
        """The weight layers that run on cached steps too (outside DeepCache's deep modules)."""
        deep = {id(m) for module in find_layout(model_fn).deep(self.branch) for m in module.modules()}
        return {name: layer for name, layer in weight_layers(model_fn).items() if id(layer) not in deep}

    @torch.no_grad()
    def _make(self, model_fn: ModelFunction) -> None:
        if self.calibration is None:
            raise TransformError("CacheQuant has no calibration; record whole sampling runs with "
                                 "record_model_inputs(..., every=1)")
        runs = sampling_runs(self.calibration)
        steps = len(runs[0])
        if self.refreshes > steps:
            raise TransformError(f"CacheQuant refreshes is {self.refreshes}; the calibration runs have {steps} steps")
        quant = PostTrainingQuantization(CalibrationSet([c for run in runs for c in run[::self.every]]),
                                         self.weight_bits, self.act_bits)
        quant.layers = quant.quantize_layers(model_fn)
        reused = find_layout(model_fn).reused(self.branch)
        float_features = _run_features(model_fn, runs, reused)
        quant.apply(model_fn)
        try:
            quant_features = _run_features(model_fn, runs, reused)
        finally:
            quant.remove(model_fn)
        errors = torch.zeros(steps, steps, dtype=torch.float64)
        for fl, qu in zip(float_features, quant_features, strict=True):
            for j in range(steps):
                errors[j, j:] += torch.stack([(fl[i] - qu[j]).abs().mean() for i in range(j, steps)]).double()
        self.errors = errors / len(runs)
        mean_gap = steps / self.refreshes
        self.refresh_steps = optimal_refresh_steps(self.errors, self.refreshes,
                                                   self.min_gap or max(1, math.ceil(mean_gap / 2)),
                                                   self.max_gap or math.ceil(2 * mean_gap))
        self.quant = quant
        if not self.correct:
            return
        fit = ChannelFit(steps, float_features[0][0].shape[1])
        for fl, qu in zip(float_features, quant_features, strict=True):
            last = 0
            for i in range(steps):
                last = i if i in self.refresh_steps else last
                if i != last:
                    fit.add(i, qu[last], fl[i])
        self.cache_fix = fit.solve()
        self.layer_fix = self._fit_layers(model_fn, runs)

    def _fit_layers(self, model_fn: ModelFunction, runs: list[list[Call]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per shallow layer and step: its quantized output fitted to the float layer's on the same input,
        with the cache correction in place (calibration runs through the cached, quantized model)."""
        layers, steps = self.shallow_layers(model_fn), len(runs[0])
        fits = {name: ChannelFit(steps, layer.weight.shape[0]) for name, layer in layers.items()}
        step = [0]
        handles = [layer.register_forward_hook(
            lambda m, args, out, name=name: fits[name].add(step[0], out, layer_output(m, args[0], m.weight)))
            for name, layer in layers.items()]
        self._attach_parts(model_fn, correct=True, layers=False)
        try:
            for run in runs:
                model_fn.reset_hooks()
                for step[0], (x, t, condition) in enumerate(run):
                    model_fn(x, t, condition)
        finally:
            self.remove(model_fn)
            for handle in handles:
                handle.remove()
        return {name: fit.solve() for name, fit in fits.items()}

    def save(self, path: str | Path) -> Path:
        """Write the schedule, the quantization and the corrections (after an application) as safetensors."""
        if self.quant is None:
            raise TransformError("cachequant: nothing to save yet; apply it to the model first")
        quant_meta, quant_tensors = self.quant.state()
        tensors = {f"quantization/{k}": v for k, v in quant_tensors.items()}
        if self.correct:
            tensors |= {"cache.a": self.cache_fix[0], "cache.b": self.cache_fix[1]}
            tensors |= {f"layer/{n}.{k}": v for n, fix in self.layer_fix.items() for k, v in zip("ab", fix, strict=True)}
        meta = {"refresh_steps": self.refresh_steps, "branch": self.branch, "correct": self.correct,
                "corrected_layers": list(self.layer_fix), "quantization": quant_meta}
        return write_transform_file(path, tensors, METADATA_KEY, meta)

    @classmethod
    def load(cls, path: str | Path) -> CacheQuant:
        """A CacheQuant written by :meth:`save`, ready to apply without calibration."""
        meta, tensors = read_transform_file(path, METADATA_KEY, "medidiff CacheQuant file", "CacheQuant.save")
        transform = cls(None, len(meta["refresh_steps"]), branch=meta["branch"], correct=meta["correct"])
        prefix = "quantization/"
        transform.quant = PostTrainingQuantization.from_state(
            meta["quantization"], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, str(path))
        transform.refresh_steps = meta["refresh_steps"]
        if transform.correct:
            transform.cache_fix = tensors["cache.a"], tensors["cache.b"]
            transform.layer_fix = {n: (tensors[f"layer/{n}.a"], tensors[f"layer/{n}.b"]) for n in meta["corrected_layers"]}
        return transform
