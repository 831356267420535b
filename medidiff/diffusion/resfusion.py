"""Resfusion (Shi et al., 2023): the residual ``R = y - x0`` in the forward process, DDPM-form inference.

Forward marginal ``x_t = sqrt(abar_t) x0 + (1 - sqrt(abar_t)) R + sqrt(1 - abar_t) eps`` on a standard
linear beta schedule, truncated at the "acceleration step" ``T'`` where ``sqrt(abar)`` is nearest
0.5: there ``x_T' ~ 0.5 y + sqrt(1 - abar_T') eps`` holds no trace of ``x0``, so sampling starts
from the noised degraded image. The network predicts the "resnoise"
``eps + (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t * R``, which makes the reverse step exactly
DDPM's ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) resnoise) / sqrt(alpha_t) + sigma_t z``.

Written here as its equivalent: ``u_t = x_t - R`` is a plain DDPM chain started at ``x0 - R``, so a
step recovers ``x0`` (and with it ``R``) from the resnoise and ``y`` and takes the DDPM posterior of
``u``; on consecutive timesteps this is the DDPM-form update above, and it also allows few-step
respaced sampling (the paper samples in 5 steps). The process keeps ``y`` from
:meth:`Resfusion.initial_sample` for its steps.

``noise_scale`` (1 in the paper, whose degradations are a large part of the image range) runs the
same process in units of ``noise_scale``: ``x_t = sqrt(abar_t) x0 + (1 - sqrt(abar_t)) R +
noise_scale sqrt(1 - abar_t) eps`` and resnoise ``eps + c_t R / noise_scale``. For a degradation of
a few per cent (low-dose CT noise) unit noise would bury the residual the network has to find.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medidiff.diffusion.process import Process, X0Hook, draw_noise


def _view(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype)[t].view(-1, *([1] * (like.ndim - 1)))


class Resfusion(Process):
    """Resfusion on a linear beta schedule of ``schedule_timesteps`` steps, truncated at ``T'``."""

    prediction = "resnoise"

    def __init__(self, schedule_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 noise_scale: float = 1.0, x0_hooks: Sequence[X0Hook] = ()):
        super().__init__(x0_hooks)
        self.noise_scale = noise_scale
        betas = torch.linspace(beta_start, beta_end, schedule_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.truncation = int((alphas_cumprod.sqrt() - 0.5).abs().argmin())  # T'
        self.num_train_timesteps = self.truncation + 1  # training and sampling use t in 0..T'
        self.betas, self.alphas_cumprod = betas[: self.num_train_timesteps], alphas_cumprod[: self.num_train_timesteps]
        self._y: torch.Tensor | None = None

    def resnoise_weight(self) -> torch.Tensor:
        """``(1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t``, the residual's weight in the resnoise."""
        return (1 - (1 - self.betas).sqrt()) * (1 - self.alphas_cumprod).sqrt() / self.betas

    def add_noise(self, x0, noise, t, y=None):
        if y is None:
            raise ValueError("Resfusion needs the degraded image y")
        s = _view(self.alphas_cumprod, t, x0).sqrt()
        return s * x0 + (1 - s) * (y - x0) + self.noise_scale * (1 - s**2).sqrt() * noise

    def training_target(self, x0, noise, t, y=None):
        return noise + _view(self.resnoise_weight(), t, x0) * (y - x0) / self.noise_scale

    def initial_sample(self, noise, y=None):
        if y is None:
            raise ValueError("Resfusion starts from the degraded image y")
        self._y = y
        a = self.alphas_cumprod[-1].item()
        return a**0.5 * y + self.noise_scale * (1 - a) ** 0.5 * noise

    def step(self, model_output, t, sample, generator=None):
        y = self._y
        a_t = self.alphas_cumprod[t].item()
        s, sigma, c = a_t**0.5, (1 - a_t) ** 0.5, self.resnoise_weight()[t].item()
        x0 = (sample - (1 - s) * y - sigma * (self.noise_scale * model_output - c * y)) / (2 * s - 1 + sigma * c)
        x0 = self.hooked_x0(x0, t)
        prev = self.previous(t)
        if prev < 0:
            return x0
        a_prev = self.alphas_cumprod[prev].item()
        residual = y - x0
        u_t, u0 = sample - residual, x0 - residual
        beta = 1 - a_t / a_prev
        mean = (a_prev**0.5 * beta * u0 + (a_t / a_prev) ** 0.5 * (1 - a_prev) * u_t) / (1 - a_t)
        std = (beta * (1 - a_prev) / (1 - a_t)) ** 0.5
        return mean + residual + self.noise_scale * std * draw_noise(sample, generator)
