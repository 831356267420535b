"""DeepCache (Ma et al., 2023): reuse the deep UNet features, recompute only a shallow branch.

On a refresh step (every ``interval``-th model call since :meth:`ModelFunction.reset_hooks`, the
first included, or the steps of the paper's non-uniform schedule; a call with a new input shape or a
timestep above the previous call's, i.e. a new sampling run such as the next tile, starts over) the UNet runs whole and every layer's output is kept. On the other steps the shallow
branch ``branch`` runs: ``conv_in``, the first ``branch`` down layers (a layer = resnet (+ its
attention) or a down-sampler) and the up resnets that consume their skip features; every other
layer (deeper down layers, the mid block, the earlier up layers) returns its cached output, so the
first recomputed up resnet gets the cached high-level feature concatenated with a fresh skip.
``branch=0`` (the paper's choice for Stable Diffusion) recomputes only ``conv_in``, the last up
resnet and the output head.

Works on any diffusers UNet with ``down_blocks``/``mid_block``/``up_blocks`` (``UNet2DModel``,
``UNet2DConditionModel``) and on the reversible U-Net of restoration and IDM (branch ``b``: resolution
level ``b`` runs fresh on the down and the up path, every level below it is cached), found inside the
model function (:mod:`medidiff.acceleration.unets`). Steps are model-function calls: a
sampler that calls the model more than once per step (e.g. guidance) counts each call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import HookRegistry

from medidiff.acceleration.transform import Transform, TransformError
from medidiff.acceleration.unets import find_layout
from medidiff.methods.base import ModelFunction


def quadratic_refresh_steps(steps: int, refreshes: int, center: int, power: float = 1.4) -> list[int]:
    """DeepCache's non-uniform schedule: ``refreshes`` step indices out of ``steps`` (0 always one),
    spaced by ``c + sign(u) |u| ** power`` for ``u`` evenly spaced, so they crowd around step
    ``center``; ``power`` drops by 0.02 until the indices are distinct, as in the reference."""
    while power > 1:
        u = torch.linspace(-(center ** (1 / power)), (steps - center) ** (1 / power), refreshes + 1)
        picked = sorted({int(center + v) for v in (u.sign() * u.abs() ** power).tolist()} - {steps})
        indices = sorted({0, *picked[1:]})
        if len(indices) == refreshes:
            return indices
        power -= 0.02
    raise TransformError(f"DeepCache: no quadratic schedule of {refreshes} refreshes in {steps} steps "
                         f"around step {center}; use fewer refreshes (a larger interval) or move the center")


@dataclass
class _Schedule:
    """Model calls since the last reset and when to refresh, shared by all hooks of one application."""

    interval: int
    refresh_steps: frozenset[int] | None = None  # non-uniform: these steps; uniform: every interval-th
    step: int = 0
    shape: tuple | None = None
    timesteps: list[torch.Tensor] = field(default_factory=list)  # of the calls so far (since the restart)

    def refresh_at(self, step: int) -> bool:
        if self.refresh_steps is not None:
            return step in self.refresh_steps
        return step % self.interval == 0

    @property
    def refresh(self) -> bool:
        return self.refresh_at(self.step)


class _StepCounter(ModelHook):
    """On the model function: counts its calls (the sampling steps)."""

    _is_stateful = True

    def __init__(self, schedule: _Schedule):
        super().__init__()
        self.schedule = schedule

    def pre_forward(self, module, *args, **kwargs):
        shape = tuple(args[0].shape) if args and torch.is_tensor(args[0]) else None
        t = args[1].detach() if len(args) > 1 and torch.is_tensor(args[1]) else None
        previous = self.schedule.timesteps[-1] if self.schedule.timesteps else None
        rising = t is not None and previous is not None and bool((t.max() > previous.max()).item())
        if shape != self.schedule.shape or rising:  # a new input (tile) without reset_hooks: start over
            self.reset_state(module)
            self.schedule.shape = shape
        if t is not None:
            self.schedule.timesteps.append(t)
        return args, kwargs

    def post_forward(self, module, output):
        self.schedule.step += 1
        return output

    def reset_state(self, module):
        self.schedule.step, self.schedule.shape, self.schedule.timesteps = 0, None, []
        return module


def _repeat(value, times: int):
    """``value`` (a tensor or nested tuples of tensors) repeated ``times`` along the batch."""
    if torch.is_tensor(value):
        return value.repeat(times, *[1] * (value.ndim - 1))
    return type(value)(_repeat(v, times) for v in value)


def _batch(args: tuple, kwargs: dict) -> int | None:
    return next((len(a) for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)


class _CachedLayer(ModelHook):
    """On a deep layer: computes (and keeps) its output on refresh steps, returns the kept one otherwise."""

    _is_stateful = True

    def __init__(self, schedule: _Schedule):
        super().__init__()
        self.schedule, self.output, self.batch = schedule, None, None

    def new_forward(self, module, *args, **kwargs):
        if self.schedule.refresh or self.output is None:
            self.output = self.fn_ref.original_forward(*args, **kwargs)
            self.batch = _batch(args, kwargs)
            return self.output
        batch = _batch(args, kwargs)  # several steps decoded as one batch (Faster Diffusion): repeat the kept output
        return self.output if batch == self.batch or not batch else _repeat(self.output, batch // self.batch)

    def reset_state(self, module):
        self.output = None
        return module


class DeepCache(Transform):
    """DeepCache: the whole UNet every ``interval`` calls, the shallow branch ``branch`` in between.

    With ``center`` (and ``steps``, the sampler's step count) the ``ceil(steps / interval)`` refresh
    steps follow the paper's non-uniform schedule instead (:func:`quadratic_refresh_steps`); with
    ``refresh_steps`` they are given (e.g. from :func:`~medidiff.acceleration.profiling.profiled_refresh_steps`).
    """

    name = "deepcache"

    def __init__(self, interval: int = 3, branch: int = 0, center: int | None = None, steps: int | None = None,
                 power: float = 1.4, refresh_steps: list[int] | None = None):
        for key, value, least in (("interval", interval, 1), ("branch", branch, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise TransformError(f"DeepCache {key} is {value!r}; expected a whole number >= {least}")
        self.interval, self.branch = interval, branch
        self.refresh_steps = None
        if refresh_steps is not None:
            if center is not None or not refresh_steps or 0 not in refresh_steps:
                raise TransformError(f"DeepCache refresh_steps is {refresh_steps!r}; expected step indices that "
                                     "include 0 (the first step), without center")
            self.refresh_steps = frozenset(int(i) for i in refresh_steps)
        if center is not None:
            if not (isinstance(steps, int) and isinstance(center, int) and 0 < center < steps):
                raise TransformError(f"DeepCache center is {center!r} with steps {steps!r}; a non-uniform "
                                     "schedule needs the sampler's steps and 0 < center < steps")
            if not isinstance(power, int | float) or power <= 1:
                raise TransformError(f"DeepCache power is {power!r}; expected a number above 1")
            self.refresh_steps = frozenset(quadratic_refresh_steps(steps, -(-steps // self.interval), center, power))

    def attach(self, model_fn: ModelFunction) -> None:
        schedule = _Schedule(self.interval, self.refresh_steps)
        for module in find_layout(model_fn).deep(self.branch):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_CachedLayer(schedule), self.name)
        model_fn.register_hook(_StepCounter(schedule), self.name)
