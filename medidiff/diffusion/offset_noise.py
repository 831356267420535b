"""Offset noise (BS-LDM training): Gaussian noise plus a per-sample, per-channel constant.

The constant component lets the model learn to change the low-frequency (mean) content of a
latent, which plain i.i.d. noise barely exposes at high SNR.
"""

from __future__ import annotations

import torch


def offset_noise(like: torch.Tensor, strength: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``eps + strength * c`` with eps ~ N(0,1) shaped like ``like`` and c ~ N(0,1) of shape (N,C,1,1)."""
    eps = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if strength == 0:
        return eps
    const = torch.randn((*like.shape[:2], *([1] * (like.ndim - 2))), generator=generator,
                        dtype=like.dtype, device=like.device)
    return eps + strength * const
