"""Temporal adaptive thresholding (BS-LDM sampling), a process step hook: clamp the predicted x0 to
[-r, r], r growing every step. Early (noisy) steps are held close to the data range, late steps
are left freer.

The reference grows r from ``r0`` by ``dr`` per step over ``ref_steps`` (1000) DDPM steps; with
fewer steps the growth per step is rescaled so that the final radius is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TemporalThreshold:
    """x0 step hook whose clamp radius grows linearly with the sampling step index."""

    r0: float = 1.45
    dr: float = 0.0025
    ref_steps: int = 1000

    def radius(self, step: int, n_steps: int) -> float:
        """Radius at sampling step ``step`` (0 = first, most noisy) of ``n_steps``."""
        return self.r0 + self.dr * step * self.ref_steps / n_steps

    def __call__(self, x0: torch.Tensor, step: int, n_steps: int) -> torch.Tensor:
        r = self.radius(step, n_steps)
        return x0.clamp(-r, r)
