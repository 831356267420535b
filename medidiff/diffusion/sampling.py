"""DDPM / DDIM sampling for epsilon-prediction models with a pluggable x0 clamp.

The noise schedule (``alphas_cumprod``) comes from MONAI's ``DDPMScheduler`` (cosine schedule);
the loops are written out here so that the predicted x0 can be clamped at every step
(:class:`~medidiff.diffusion.thresholding.TemporalThreshold`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDPMScheduler

# (x0, step index, number of steps) -> clamped x0
X0Clamp = Callable[[torch.Tensor, int, int], torch.Tensor]
# (x_t, t as (N,) long tensor) -> predicted noise
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """Cumulative alpha products of the cosine schedule (float64, length ``num_train_timesteps``)."""
    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="cosine")
    return sched.alphas_cumprod.double()


def timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``steps`` evenly spaced training timesteps, descending, ending at 0."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    return torch.linspace(num_train_timesteps - 1, 0, steps).round().long().tolist()


@torch.no_grad()
def sample(model: EpsModel, noise: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
           method: str = "ddim", clamp: X0Clamp | None = None,
           generator: torch.Generator | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Run the reverse process from ``noise`` (x_T). ``method``: ``ddim`` (eta = 0) or ``ddpm``
    (ancestral, posterior variance). With ``steps`` < T, DDPM uses the respaced schedule."""
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method must be 'ddim' or 'ddpm', got {method!r}")
    ts = timesteps(steps, len(alphas_cumprod))
    x = noise
    it = progress(range(len(ts))) if progress else range(len(ts))
    for i in it:
        t = ts[i]
        a_t = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if clamp is not None:
            x0 = clamp(x0, i, len(ts))
            eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        if method == "ddim" or i + 1 == len(ts):
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        else:
            beta = 1 - a_t / a_prev
            mean = (a_prev**0.5 * beta * x0 + (a_t / a_prev) ** 0.5 * (1 - a_prev) * x) / (1 - a_t)
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x
