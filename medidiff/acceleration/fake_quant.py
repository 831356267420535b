"""Uniform affine fake quantization and Q-Diffusion's range search (simulated in float on any device).

A value is rounded to one of ``2**bits`` levels between ``lo`` and ``hi`` and mapped back to float.
The range is searched as in Q-Diffusion's ``mse`` scale method: ``lo`` and ``hi`` shrink together by
1 % steps (80 candidates) and the candidate with the least L2.4 error is kept.
"""

from __future__ import annotations

import torch

SHRINK = 1.0 - 0.01 * torch.arange(80)
P_NORM = 2.4
SAMPLES_PER_CALL = 1024  # other activation values sampled per calibration call and observer
TAIL = 64  # largest and smallest activation values kept exactly per calibration call


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to ``2**bits`` uniform levels on [lo, hi] (broadcast), returned as float."""
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def search_range(x: torch.Tensor, bits: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lo, hi) of ``x`` (rows, values) with the least L2.4 quantization error (values
    weighted by ``weight``, default 1); the search starts from the rows' min/max (or the given
    ``lo``/``hi``, shape (rows, 1))."""
    lo0 = x.amin(1, keepdim=True) if lo is None else lo
    hi0 = x.amax(1, keepdim=True) if hi is None else hi
    best = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for s in SHRINK:
        err = (fake_quantize(x, lo0 * s, hi0 * s, bits) - x).abs().pow(P_NORM)
        err = (err if weight is None else err * weight).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, lo0 * s, best_lo)
        best_hi = torch.where(better, hi0 * s, best_hi)
    return best_lo, best_hi


def quantize_weight(w: torch.Tensor, bits: int, split: int = 0) -> torch.Tensor:
    """Per-output-channel fake-quantized copy of ``w``; with ``split`` the input channels before and
    after it get separate ranges (split shortcut quantization)."""
    if split:
        return torch.cat([quantize_weight(w[:, :split], bits), quantize_weight(w[:, split:], bits)], 1)
    rows = w.reshape(w.shape[0], -1)
    lo, hi = search_range(rows, bits)
    return fake_quantize(rows, lo, hi, bits).reshape(w.shape)


class ActivationObserver:
    """Min, max and a weighted summary of the values seen; :meth:`range` searches the best clipping.

    Per call it keeps the ``TAIL`` largest and smallest values exactly (weight 1: clipping acts on
    them) and a fixed-seed uniform sample of the others, weighted by how many values each stands for.
    """

    def __init__(self, seed: int = 0):
        self.lo = self.hi = None
        self.values: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().flatten().float()
        lo, hi = flat.min(), flat.max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if flat.numel() <= SAMPLES_PER_CALL + 2 * TAIL:
            self.values.append(flat)
            self.weights.append(torch.ones_like(flat))
            return
        order = flat.argsort()
        rest = order[TAIL:-TAIL]
        pick = rest[torch.randint(rest.numel(), (SAMPLES_PER_CALL,), generator=self.gen).to(rest.device)]
        self.values.append(torch.cat([flat[order[:TAIL]], flat[order[-TAIL:]], flat[pick]]))
        self.weights.append(torch.cat([torch.ones(2 * TAIL, device=flat.device),
                                       torch.full((SAMPLES_PER_CALL,), rest.numel() / SAMPLES_PER_CALL,
                                                  device=flat.device)]))

    def range(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-tensor (lo, hi) for ``bits``-bit activations."""
        lo, hi = search_range(torch.cat(self.values)[None], bits, self.lo.reshape(1, 1), self.hi.reshape(1, 1),
                              torch.cat(self.weights)[None])
        return lo.squeeze(), hi.squeeze()
