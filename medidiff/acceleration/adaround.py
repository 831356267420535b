"""AdaRound (Nagel et al., 2020): learn per weight whether to round down or up on a quantization grid.

Each weight lies between two neighbouring grid values ``lo <= w <= hi``; a continuous variable ``V``
mixes them through the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``.
Per layer, ``V`` is optimised so that the layer's output on its recorded inputs matches the float
layer's, plus a regulariser ``sum(1 - |2 h - 1| ** beta)`` (``beta`` annealed from 20 to 2) that drives
every ``h`` to 0 or 1; the result rounds ``h >= 0.5`` up. ``V`` starts where ``h`` reproduces ``w``.
Layer-wise, as in the paper (no block reconstruction as BRECQ); the grid may be non-uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
WARMUP = 0.2  # fraction of the iterations without the regulariser


def neighbours(w: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid values just below and above every entry of ``w`` (``grid`` sorted; clipped to its ends)."""
    w = w.clamp(grid[0], grid[-1])
    upper = torch.searchsorted(grid, w.contiguous()).clamp(1, len(grid) - 1)
    return grid[upper - 1], grid[upper]


def round_nearest(w: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to the nearest value of the sorted ``grid`` (clipped to its ends; ties down)."""
    return grid[torch.searchsorted((grid[1:] + grid[:-1]) / 2, w.contiguous())]


def _rectified(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A Conv2d / Linear on ``x`` with ``weight`` instead of its own."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


@torch.enable_grad()
def learn_rounding(layer: nn.Module, scale: torch.Tensor, grid: torch.Tensor, inputs: list[torch.Tensor],
                   iters: int = 200, lr: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """The weight of ``layer`` on the grid ``grid * scale`` (``scale`` per output channel, broadcast to
    the weight) with AdaRound's learned rounding on ``inputs`` (the layer's recorded inputs)."""
    w = layer.weight.detach() / scale
    lo, hi = neighbours(w, grid)
    rest = ((w.clamp(grid[0], grid[-1]) - lo) / (hi - lo)).clamp(0.01, 0.99)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
    optimizer = torch.optim.Adam([v], lr=lr)
    with torch.no_grad():
        targets = [layer_output(layer, x, layer.weight) for x in inputs]
    gen = torch.Generator().manual_seed(seed)
    for it in range(iters):
        i = int(torch.randint(len(inputs), (1,), generator=gen))
        h = _rectified(v)
        loss = (layer_output(layer, inputs[i], (lo + h * (hi - lo)) * scale) - targets[i]).pow(2).sum()
        progress = (it / iters - WARMUP) / (1 - WARMUP)
        if progress >= 0:
            beta = 2 + 18 * (1 - progress)
            loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.where(_rectified(v) >= 0.5, hi, lo) * scale
