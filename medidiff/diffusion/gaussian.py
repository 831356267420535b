"""Gaussian diffusion processes for epsilon-prediction models: ancestral DDPM and deterministic DDIM.

``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. With fewer sampling steps than training steps
DDPM runs on the respaced schedule (posterior variance between consecutive sampled timesteps).
Both match diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (checked in tests/test_processes.py);
they are written out so that step hooks can change the x0 estimate and so that the arithmetic of
the shipped BS-LDM results stays the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.schedulers import DDPMScheduler

from medidiff.diffusion.process import Process, X0Hook, draw_noise


def cosine_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """Cumulative alpha products of MONAI's cosine schedule (float64, length ``num_train_timesteps``)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="cosine").alphas_cumprod.double()


class GaussianProcess(Process):
    """Shared part of DDPM and DDIM: forward marginal, start from noise, x0 from the predicted noise."""

    prediction = "epsilon"

    def __init__(self, alphas_cumprod: torch.Tensor, x0_hooks: Sequence[X0Hook] = ()):
        super().__init__(x0_hooks)
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_train_timesteps = len(alphas_cumprod)

    def add_noise(self, x0, noise, t, y=None):
        a = self.alphas_cumprod.to(x0.dtype)[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def initial_sample(self, noise, y=None):
        return noise

    def _alphas(self, t: int) -> tuple[float, float]:
        prev = self.previous(t)
        return self.alphas_cumprod[t].item(), self.alphas_cumprod[prev].item() if prev >= 0 else 1.0

    def _x0_eps(self, eps: torch.Tensor, t: int, x: torch.Tensor, a_t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 from the predicted noise, through the step hooks; the noise made consistent with it."""
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if self.x0_hooks:
            x0 = self.hooked_x0(x0, t)
            eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        return x0, eps


class DDIM(GaussianProcess):
    """Deterministic DDIM (eta = 0)."""

    def step(self, model_output, t, sample, generator=None):
        a_t, a_prev = self._alphas(t)
        x0, eps = self._x0_eps(model_output, t, sample, a_t)
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


class DDPM(GaussianProcess):
    """Ancestral DDPM with the posterior ("fixed small") variance; no noise on the last step."""

    def step(self, model_output, t, sample, generator=None):
        a_t, a_prev = self._alphas(t)
        x0, eps = self._x0_eps(model_output, t, sample, a_t)
        if self.previous(t) < 0:
            return x0
        beta = 1 - a_t / a_prev
        mean = (a_prev**0.5 * beta * x0 + (a_t / a_prev) ** 0.5 * (1 - a_prev) * sample) / (1 - a_t)
        var = beta * (1 - a_prev) / (1 - a_t)
        return mean + var**0.5 * draw_noise(sample, generator)


PROCESSES = {"ddpm": DDPM, "ddim": DDIM}


def gaussian_process(method: str, alphas_cumprod: torch.Tensor, x0_hooks: Sequence[X0Hook] = ()) -> GaussianProcess:
    """``ddpm`` or ``ddim`` on the given schedule."""
    if method not in PROCESSES:
        raise ValueError(f"method must be one of {sorted(PROCESSES)}, got {method!r}")
    return PROCESSES[method](alphas_cumprod, x0_hooks)
