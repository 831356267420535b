"""Bottleneck Sampling (Tian et al., 2025): high-low-high resolution across the sampling steps.

The first and the last model calls of a sampling run see the full resolution; in between (calls whose
timestep ``t`` lies in ``(lower * t0, upper * t0]``, ``t0`` the run's first timestep) the model runs
on the input and the condition (e.g. the degraded ``y`` of a restoration method) average-pooled by
``factor`` (padded by replication to a multiple of ``factor`` times the network's own multiple), and
its output is upsampled back (bicubic) and cropped. Each such call cuts the work by about
``factor ** 2`` (more for global attention, quadratic in the tokens).

Shifted timesteps: pooling averages ``factor ** 2`` pixels, so the pooled input is less noisy than
its timestep says; as the paper re-shifts each stage's schedule by resolution, the low-resolution
calls get the timestep ``t0 * a s / (1 + (a - 1) s)`` for ``s = t / t0`` (SD3's resolution shift;
``a = shift``, by default ``1 / factor``: the ratio of the sides; ``shift: 1`` keeps the timestep).

Deviation from the paper (a latent flow-matching sampler): the sampler's state stays at full
resolution throughout, only the model calls are made small, so the resize and noise re-injection of
the paper's stage transitions are not needed (each step of the process draws full-resolution noise).
Combines with the block caches of :mod:`medidiff.acceleration.block_caching` applied after it (their
deltas are kept per resolution); refuses the U-Net feature caches (DeepCache, Faster Diffusion), whose
kept features have one size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medidiff.acceleration.block_caching import BLOCK_CACHES
from medidiff.acceleration.deepcache import _Schedule, _StepCounter
from medidiff.acceleration.transform import Transform, TransformError, has_hook
from medidiff.acceleration.unets import FEATURE_CACHES
from medidiff.methods.base import ModelFunction


def shifted(t: torch.Tensor, first: torch.Tensor, shift: float) -> torch.Tensor:
    """``t`` moved by the resolution shift ``shift`` on the scale ``0..first`` (same dtype; rounded for integers)."""
    s = t.double() / first.double().clamp_min(1e-12)
    moved = first.double() * shift * s / (1 + (shift - 1) * s)
    return moved.round().to(t.dtype) if not t.is_floating_point() else moved.to(t.dtype)


class _LowResolution(_StepCounter):
    """On the model function: counts the calls and runs those of the middle stage at low resolution."""

    def __init__(self, schedule: _Schedule, transform: BottleneckSampling, multiple: int):
        super().__init__(schedule)
        self.transform, self.multiple = transform, multiple

    def new_forward(self, module, *args, **kwargs):
        forward, schedule, b = self.fn_ref.original_forward, self.schedule, self.transform
        if schedule.step == 0:
            cache = next((n for n in FEATURE_CACHES if any(has_hook(m, n) for m in module.modules())), None)
            if cache is not None:
                raise TransformError(f"bottleneck_sampling cannot run with {cache}: its kept U-Net features have "
                                     f"one size; remove {cache} first")
        if len(args) < 2 or not torch.is_tensor(args[1]) or not schedule.timesteps:
            return forward(*args, **kwargs)
        x, t, rest = args[0], args[1], args[2:]
        first = schedule.timesteps[0].max()
        if not bool(((t <= b.upper * first) & (t > b.lower * first)).all()):
            return forward(*args, **kwargs)
        size, unit = x.shape[-2:], b.factor * self.multiple
        pad = (0, -size[1] % unit, 0, -size[0] % unit)

        def small(a):
            if not (torch.is_tensor(a) and a.ndim == x.ndim and a.shape[-2:] == size):
                return a
            return F.avg_pool2d(F.pad(a, pad, mode="replicate") if any(pad) else a, b.factor)

        out = forward(small(x), shifted(t, first, b.shift), *map(small, rest), **kwargs)
        return F.interpolate(out, scale_factor=b.factor, mode="bicubic", align_corners=False)[..., :size[0], :size[1]]


class BottleneckSampling(Transform):
    """Full resolution for the first and last calls, ``1 / factor`` for those with timestep in
    ``(lower * t0, upper * t0]``, at the shifted timestep (``shift``; None: ``1 / factor``)."""

    name = "bottleneck_sampling"

    def __init__(self, factor: int = 2, upper: float = 0.8, lower: float = 0.2, shift: float | None = None):
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
            raise TransformError(f"bottleneck_sampling factor is {factor!r}; expected a whole number >= 2")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (upper, lower)) or not 0 <= lower < upper <= 1:
            raise TransformError(f"bottleneck_sampling upper {upper!r} / lower {lower!r}: expected 0 <= lower < upper <= 1 "
                                 "(fractions of the first timestep)")
        if shift is not None and (not isinstance(shift, int | float) or isinstance(shift, bool) or shift <= 0):
            raise TransformError(f"bottleneck_sampling shift is {shift!r}; expected a number above 0")
        self.factor, self.upper, self.lower = factor, float(upper), float(lower)
        self.shift = 1 / factor if shift is None else float(shift)

    def attach(self, model_fn: ModelFunction) -> None:
        cache = next((n for n in BLOCK_CACHES if any(has_hook(m, n) for m in model_fn.modules())), None)
        if cache is not None:
            raise TransformError(f"apply bottleneck_sampling before {cache} (the block cache then counts the "
                                 "full-resolution calls); remove it and apply both in that order")
        multiple = int(getattr(getattr(model_fn, "net", None), "multiple", 1))
        model_fn.register_hook(_LowResolution(_Schedule(1), self, multiple), self.name)
