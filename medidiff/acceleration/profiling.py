"""Profiling-based DeepCache schedule: refresh where the reused feature actually changes.

One full-precision sampling run records the feature DeepCache would reuse (the input of the first
recomputed up resnet for the chosen branch) at every step. Its relative step-to-step change shows
where reuse is cheap (the feature barely moves) and where it is not; the refresh steps are placed so
that each cached stretch accumulates the same amount of change ("Model Reveals What to Cache"
measures the same kind of similarity to decide what to reuse).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medidiff.acceleration.unets import find_layout
from medidiff.methods.base import ModelFunction


def feature_changes(model_fn: ModelFunction, run: Callable[[], object], branch: int = 0) -> list[float]:
    """``|f_k - f_(k-1)| / |f_(k-1)|`` of the reused deep feature for every model call of ``run()``
    after the first (``run`` should sample one input, hooks reset first as methods do)."""
    last_cached = find_layout(model_fn).reused(branch)
    features: list[torch.Tensor] = []
    handle = last_cached.register_forward_hook(lambda m, args, out: features.append(out.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return [float((b - a).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(features, features[1:], strict=False)]


def profiled_refresh_steps(changes: list[float], refreshes: int) -> list[int]:
    """``refreshes`` step indices (0 first) that cut the cumulative change into equal parts: steps
    where the feature moves fast are refreshed more often."""
    steps = len(changes) + 1
    if not 1 <= refreshes <= steps:
        raise ValueError(f"refreshes is {refreshes}; expected 1..{steps}")
    cumulative = torch.tensor([0.0, *changes]).cumsum(0)
    targets = torch.arange(refreshes) * cumulative[-1] / refreshes
    chosen = sorted({int(i) for i in torch.searchsorted(cumulative, targets)})
    free = (i for i in range(steps) if i not in chosen)  # equal targets in a flat stretch: fill in order
    return sorted(chosen + [next(free) for _ in range(refreshes - len(chosen))])
