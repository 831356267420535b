"""DeepCache (Ma et al., 2023): reuse the deep UNet features, recompute only a shallow branch.

On a refresh step (every ``interval``-th model call since :meth:`ModelFunction.reset_hooks`, the
first included, or the steps of the paper's non-uniform schedule; a call with a new input shape
always refreshes) the UNet runs whole and every layer's output is kept. On the other steps the shallow
branch ``branch`` runs: ``conv_in``, the first ``branch`` down layers (a layer = resnet (+ its
attention) or a down-sampler) and the up resnets that consume their skip features; every other
layer (deeper down layers, the mid block, the earlier up layers) returns its cached output, so the
first recomputed up resnet gets the cached high-level feature concatenated with a fresh skip.
``branch=0`` (the paper's choice for Stable Diffusion) recomputes only ``conv_in``, the last up
resnet and the output head.

Works on any diffusers UNet with ``down_blocks``/``mid_block``/``up_blocks`` (``UNet2DModel``,
``UNet2DConditionModel``) found inside the model function. Steps are model-function calls: a
sampler that calls the model more than once per step (e.g. guidance) counts each call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import HookRegistry
from torch import nn

from medidiff.acceleration.transform import Transform, TransformError
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

    @property
    def refresh(self) -> bool:
        if self.refresh_steps is not None:
            return self.step in self.refresh_steps
        return self.step % self.interval == 0


class _StepCounter(ModelHook):
    """On the model function: counts its calls (the sampling steps)."""

    _is_stateful = True

    def __init__(self, schedule: _Schedule):
        super().__init__()
        self.schedule = schedule

    def pre_forward(self, module, *args, **kwargs):
        shape = tuple(args[0].shape) if args and torch.is_tensor(args[0]) else None
        if shape != self.schedule.shape:  # a new input without reset_hooks: start over, never reuse
            self.schedule.step, self.schedule.shape = 0, shape
        return args, kwargs

    def post_forward(self, module, output):
        self.schedule.step += 1
        return output

    def reset_state(self, module):
        self.schedule.step, self.schedule.shape = 0, None
        return module


class _CachedLayer(ModelHook):
    """On a deep layer: computes (and keeps) its output on refresh steps, returns the kept one otherwise."""

    _is_stateful = True

    def __init__(self, schedule: _Schedule):
        super().__init__()
        self.schedule, self.output = schedule, None

    def new_forward(self, module, *args, **kwargs):
        if self.schedule.refresh or self.output is None:
            self.output = self.fn_ref.original_forward(*args, **kwargs)
        return self.output

    def reset_state(self, module):
        self.output = None
        return module


def find_unet(model_fn: nn.Module) -> nn.Module:
    """The (first) diffusers UNet inside ``model_fn``."""
    for module in model_fn.modules():
        if all(hasattr(module, a) for a in ("down_blocks", "mid_block", "up_blocks", "conv_in")):
            return module
    raise TransformError(f"DeepCache needs a diffusers UNet (down_blocks/mid_block/up_blocks); "
                         f"{type(model_fn).__name__} has none")


def _layers(block: nn.Module, samplers: str) -> list[list[nn.Module]]:
    """A block's layers in call order: [resnet, attention?] pairs, then each resampler alone."""
    attentions = list(getattr(block, "attentions", None) or [])
    pairs = [[r] + ([attentions[i]] if i < len(attentions) else []) for i, r in enumerate(block.resnets)]
    return pairs + [[s] for s in (getattr(block, samplers, None) or [])]


def deep_layers(unet: nn.Module, branch: int) -> list[nn.Module]:
    """The modules that DeepCache caches for skip branch ``branch`` (0 = shallowest)."""
    down = [layer for block in unet.down_blocks for layer in _layers(block, "downsamplers")]
    if not 0 <= branch < len(down):
        raise TransformError(f"DeepCache branch is {branch}; this UNet has branches 0..{len(down) - 1}")
    up = [layer for block in unet.up_blocks for layer in _layers(block, "upsamplers")]
    # up resnets consume the skip features in reverse: the last branch + 1 of them (and what follows) run
    up_resnets = {id(r) for block in unet.up_blocks for r in block.resnets}
    first_fresh = [i for i, layer in enumerate(up) if id(layer[0]) in up_resnets][-(branch + 1)]
    cached = [m for layer in down[branch:] + up[:first_fresh] for m in layer]
    return cached + ([unet.mid_block] if unet.mid_block is not None else [])


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
        for module in deep_layers(find_unet(model_fn), self.branch):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_CachedLayer(schedule), self.name)
        model_fn.register_hook(_StepCounter(schedule), self.name)
