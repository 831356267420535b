"""Block caching for diffusion transformers: Delta-DiT (Chen et al., 2024) and profiled selective caching.

Both keep, for every transformer block, its Delta-Cache: the deviation ``block(x) - x`` of its output
from its input, refreshed whenever the block runs. A cached block does not run; it returns
``x + delta`` for its current input ``x``, so the fresh blocks before it still steer what it passes
on (the paper's point against caching a block's output itself). The deltas of consecutive cached
blocks add up to the delta of the whole range, so caching blocks one by one equals caching a range.

- :class:`DeltaDiT`: every ``interval``-th model call (the first included) runs whole; on the calls
  in between the ``cached`` rear blocks are cached while the timestep is above ``boundary`` (early
  sampling: the front blocks lay the outline) and the ``cached`` front blocks at or below it (late
  sampling: the rear blocks add the details), as the paper's stage-adaptive Delta-DiT.
- :class:`SelectiveBlockCache`: caches a given set of blocks between refreshes, from step ``start``
  on. :func:`block_changes` measures how much each block's delta moves from one call to the next in
  one sampling run, and :func:`profiled_block_cache` picks the blocks that move least and the step
  from which they have settled (the profiling idea of "Model Reveals What to Cache", measured on
  step-to-step similarity instead of attention maps).

Works on :class:`~medidiff.nets.dit.DiT` (``blocks``) and on diffusers transformers whose blocks are
``transformer_blocks`` (the first positional argument is the hidden states). Steps are model-function
calls since :meth:`ModelFunction.reset_hooks`; a new input shape or a rising timestep (the next tile)
starts over, as for DeepCache.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import HookRegistry
from torch import nn

from medidiff.acceleration.deepcache import _Schedule, _StepCounter
from medidiff.acceleration.transform import Transform, TransformError, has_hook
from medidiff.methods.base import ModelFunction

BLOCK_CACHES = ("delta_dit", "selective_block_cache")  # transform names; one block cache at a time


def find_blocks(model_fn: nn.Module, transform: str) -> nn.ModuleList:
    """The transformer blocks inside ``model_fn`` (refuses a model without any, and a second block cache)."""
    other = next((n for n in BLOCK_CACHES if n != transform and any(has_hook(m, n) for m in model_fn.modules())), None)
    if other is not None:
        raise TransformError(f"{transform} cannot be combined with {other}: both cache the transformer blocks; "
                             f"remove {other} first")
    for module in model_fn.modules():
        blocks = getattr(module, "transformer_blocks", None) or getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    net = getattr(model_fn, "net", model_fn)
    raise TransformError(f"{transform} caches transformer blocks; {type(net).__name__} has none (train a DiT "
                         "backbone, e.g. configs/restoration/ct_denoise_dit.yaml, or use deepcache on a U-Net)")


class _Steps(_Schedule):
    """The shared schedule plus which blocks are cached at the current call."""

    def __init__(self, interval: int, cached: Callable[[_Steps], frozenset[int]]):
        super().__init__(interval)
        self.cached = cached

    def caches(self, index: int) -> bool:
        return not self.refresh and index in self.cached(self)


class _DeltaBlock(ModelHook):
    """On block ``index``: runs it (keeping ``output - input``) unless the schedule caches it now."""

    _is_stateful = True

    def __init__(self, schedule: _Steps, index: int):
        super().__init__()
        self.schedule, self.index, self.delta = schedule, index, None

    def new_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if self.delta is not None and self.delta.shape == x.shape and self.schedule.caches(self.index):
            return x + self.delta
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.delta = out - x
        return out

    def reset_state(self, module):
        self.delta = None
        return module


class _BlockCache(Transform):
    """Shared part: a step counter on the model function and a delta hook on every block."""

    interval: int

    @abstractmethod
    def cached(self, schedule: _Steps) -> frozenset[int]:
        """The block indices cached at the schedule's current (non-refresh) call."""

    def attach(self, model_fn: ModelFunction) -> None:
        blocks = find_blocks(model_fn, self.name)
        self.check(len(blocks))
        schedule = _Steps(self.interval, self.cached)
        for index, block in enumerate(blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_DeltaBlock(schedule, index), self.name)
        model_fn.register_hook(_StepCounter(schedule), self.name)

    @abstractmethod
    def check(self, depth: int) -> None:
        """Refuse settings that do not fit a transformer of ``depth`` blocks."""


def _whole(name: str, key: str, value, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise TransformError(f"{name} {key} is {value!r}; expected a whole number >= {least}")


class DeltaDiT(_BlockCache):
    """Delta-DiT: refresh every ``interval`` calls; in between, Delta-Cache the ``cached`` rear blocks
    while the timestep is above ``boundary`` and the ``cached`` front blocks after (``boundary`` None:
    half the first call's timestep)."""

    name = "delta_dit"

    def __init__(self, interval: int = 2, cached: int = 2, boundary: float | None = None):
        _whole("delta_dit", "interval", interval, 1)
        _whole("delta_dit", "cached", cached, 1)
        if boundary is not None and (not isinstance(boundary, int | float) or isinstance(boundary, bool) or boundary < 0):
            raise TransformError(f"delta_dit boundary is {boundary!r}; expected a timestep >= 0")
        self.interval, self.count, self.boundary = interval, cached, boundary
        self.depth = 0

    def check(self, depth: int) -> None:
        if self.count >= depth:
            raise TransformError(f"delta_dit cached is {self.count}; this transformer has {depth} blocks, "
                                 f"cache at most {depth - 1}")
        self.depth = depth

    def cached(self, schedule: _Steps) -> frozenset[int]:
        if not schedule.timesteps:  # a model called without a timestep: the early stage throughout
            return frozenset(range(self.depth - self.count, self.depth))
        t, first = schedule.timesteps[-1].max(), schedule.timesteps[0].max()
        rear = bool((t > (first / 2 if self.boundary is None else self.boundary)).item())
        return frozenset(range(self.depth - self.count, self.depth) if rear else range(self.count))


class SelectiveBlockCache(_BlockCache):
    """Cache the blocks ``blocks`` (indices) between refreshes every ``interval`` calls, from call ``start``."""

    name = "selective_block_cache"

    def __init__(self, blocks: list[int], interval: int = 2, start: int = 0):
        _whole("selective_block_cache", "interval", interval, 1)
        _whole("selective_block_cache", "start", start, 0)
        if not blocks or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise TransformError(f"selective_block_cache blocks is {blocks!r}; expected block indices (>= 0)")
        self.blocks, self.interval, self.start = frozenset(blocks), interval, start

    def check(self, depth: int) -> None:
        if max(self.blocks) >= depth:
            raise TransformError(f"selective_block_cache blocks {sorted(self.blocks)}: this transformer has blocks "
                                 f"0..{depth - 1}")

    def cached(self, schedule: _Steps) -> frozenset[int]:
        return self.blocks if schedule.step >= self.start else frozenset()


def block_changes(model_fn: ModelFunction, run: Callable[[], object]) -> torch.Tensor:
    """(calls - 1, blocks): ``|d_k - d_(k-1)| / |d_(k-1)|`` of every block's delta ``d`` (output - input)
    between consecutive model calls of ``run()`` (one sampling run of one input, hooks reset first)."""
    blocks = find_blocks(model_fn, "profiling")
    deltas: list[list[torch.Tensor]] = [[] for _ in blocks]

    def keep(index):
        return lambda module, args, out: deltas[index].append((out - args[0]).detach().clone())

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return torch.tensor([[float((b - a).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(d, d[1:], strict=False)]
                         for d in deltas]).T


def profiled_block_cache(changes: torch.Tensor, count: int, interval: int = 2, settle: float = 1.5) -> SelectiveBlockCache:
    """The :class:`SelectiveBlockCache` of the ``count`` blocks whose deltas change least (mean over the
    profiled calls), cached from the first call whose change (mean over those blocks) is at most
    ``settle`` times their median change: the early calls, where the features still move fast, run whole."""
    calls, depth = changes.shape
    if not 1 <= count < depth:
        raise TransformError(f"profiled block cache count is {count}; expected 1..{depth - 1} (of {depth} blocks)")
    chosen = changes.mean(0).argsort()[:count]
    moving = changes[:, chosen].mean(1)
    settled = (moving <= settle * moving.median()).nonzero()
    start = int(settled[0]) + 1 if len(settled) else calls  # changes[k] is the move from call k to call k + 1
    return SelectiveBlockCache(sorted(int(b) for b in chosen), interval=interval, start=start)
