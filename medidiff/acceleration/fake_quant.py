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


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and (float, whole-numbered) zero point of ``2**bits`` levels on [lo, hi]."""
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return scale, torch.round(-lo / scale)


def quantize_codes(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes 0..2**bits - 1 (as floats) of ``x`` on [lo, hi] (broadcast)."""
    scale, zero = scale_zero(lo, hi, bits)
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def dequantize(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The float values of ``codes`` made by :func:`quantize_codes` with the same range and bits."""
    scale, zero = scale_zero(lo, hi, bits)
    return (codes - zero) * scale


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to ``2**bits`` uniform levels on [lo, hi] (broadcast), returned as float."""
    return dequantize(quantize_codes(x, lo, hi, bits), lo, hi, bits)


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


def channel_parts(w: torch.Tensor, split: int) -> list[torch.Tensor]:
    """``w``'s input channels before and after ``split`` (split shortcut), or ``[w]``."""
    return [w[:, :split], w[:, split:]] if split else [w]


def symmetric_start(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [-2**(bits-1) s, (2**(bits-1) - 1) s] with s = max|row| / (2**(bits-1) - 1): on it the
    codes minus the zero point 2**(bits-1) are signed integers, as symmetric int8 kernels take them;
    shrinking both ends alike (:func:`search_range`) keeps it symmetric."""
    half = 2 ** (bits - 1)
    hi = rows.abs().amax(1, keepdim=True)
    return -hi * half / (half - 1), hi


def weight_ranges(w: torch.Tensor, bits: int, split: int = 0, symmetric: bool = False) -> torch.Tensor:
    """Per-output-channel ranges (parts, 2, out_channels) of ``w``; with ``split`` the input channels
    before and after it get separate ranges; ``symmetric``: ranges of :func:`symmetric_start`'s form."""
    rows = [part.reshape(part.shape[0], -1) for part in channel_parts(w, split)]
    ranges = [search_range(r, bits, *(symmetric_start(r, bits) if symmetric else (None, None))) for r in rows]
    return torch.stack([torch.stack([lo[:, 0], hi[:, 0]]) for lo, hi in ranges])


def signed_weight(codes: torch.Tensor, ranges: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` (one part, made on a :func:`symmetric_start` range) as int8 values and per-output-channel
    steps, so that ``int8 * step`` is :func:`weight_from_codes`'s weight."""
    scale, zero = scale_zero(ranges[0, 0], ranges[0, 1], bits)
    signed = codes.long() - zero.long().reshape((-1,) + (1,) * (codes.ndim - 1))
    if signed.min() < -128 or signed.max() > 127:
        raise ValueError("weight codes do not fit int8: quantize with symmetric ranges and 8 bits or fewer")
    return signed.to(torch.int8), scale


def _per_channel(r: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (-1,) + (1,) * (ndim - 1)
    return r[0].reshape(shape), r[1].reshape(shape)


def weight_codes(w: torch.Tensor, ranges: torch.Tensor, bits: int, split: int = 0) -> torch.Tensor:
    """Integer codes (uint8; int32 above 8 bits) of ``w`` for :func:`weight_ranges`."""
    codes = torch.cat([quantize_codes(part, *_per_channel(r, w.ndim), bits)
                       for part, r in zip(channel_parts(w, split), ranges, strict=True)], 1)
    return codes.to(torch.uint8 if bits <= 8 else torch.int32)


def weight_from_codes(codes: torch.Tensor, ranges: torch.Tensor, bits: int, split: int = 0) -> torch.Tensor:
    """The fake-quantized float weight of ``codes``."""
    return torch.cat([dequantize(part.float(), *_per_channel(r, codes.ndim), bits)
                      for part, r in zip(channel_parts(codes, split), ranges, strict=True)], 1)


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
