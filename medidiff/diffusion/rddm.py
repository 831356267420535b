"""RDDM (Liu et al., 2024): residual denoising diffusion, the residual and the noise both predicted.

Forward marginal ``I_t = I_0 + abar_t I_res + bbar_t eps`` with ``I_res = y - I_0`` (degraded minus
clean); ``abar_t`` grows linearly to 1 and ``bbar_t^2`` linearly to ``noise_scale``, so ``I_T = y +
bbar_T eps`` and sampling starts from the noised degraded image. The network outputs two channels,
``[I_res, eps]``. The reverse step is RDDM's deterministic (DDIM-like, sigma = 0) update
``I_s = I_0 + abar_s I_res + bbar_s eps`` with ``I_0 = I_t - abar_t I_res - bbar_t eps``, which
needs few steps. ``noise_scale`` is RDDM's ``sum_scale`` (0.01 in its restoration settings; 1 for
generation). ``residual_scale`` (1 in the paper) sets the unit of the residual channel: the network
outputs ``I_res / residual_scale``, so a residual of a few per cent of the image range (low-dose CT
noise) is learnt at unit scale beside the unit-scale noise channel instead of drowning in its loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medidiff.diffusion.process import Process, X0Hook


class RDDM(Process):
    """Residual denoising diffusion on ``num_train_timesteps`` steps."""

    prediction = "residual+noise"
    output_channels = 2

    def __init__(self, num_train_timesteps: int = 1000, noise_scale: float = 0.01, residual_scale: float = 1.0,
                 x0_hooks: Sequence[X0Hook] = ()):
        super().__init__(x0_hooks)
        self.num_train_timesteps, self.residual_scale = num_train_timesteps, residual_scale
        ramp = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        self.residual_weights, self.noise_weights = ramp, (noise_scale * ramp).sqrt()  # abar_t, bbar_t

    def _weights(self, t, like):
        shape = (-1, *([1] * (like.ndim - 1)))
        return (self.residual_weights.to(like.dtype)[t].view(shape), self.noise_weights.to(like.dtype)[t].view(shape))

    def add_noise(self, x0, noise, t, y=None):
        if y is None:
            raise ValueError("RDDM needs the degraded image y")
        a, b = self._weights(t, x0)
        return x0 + a * (y - x0) + b * noise

    def training_target(self, x0, noise, t, y=None):
        return torch.cat([(y - x0) / self.residual_scale, noise], dim=1)

    def initial_sample(self, noise, y=None):
        if y is None:
            raise ValueError("RDDM starts from the degraded image y")
        return y + self.noise_weights[-1].item() * noise

    def step(self, model_output, t, sample, generator=None):
        residual, eps = model_output.chunk(2, dim=1)
        residual = self.residual_scale * residual
        a, b = self.residual_weights[t].item(), self.noise_weights[t].item()
        x0 = self.hooked_x0(sample - a * residual - b * eps, t)
        prev = self.previous(t)
        if prev < 0:
            return x0
        residual = (sample - b * eps - x0) / a
        return x0 + self.residual_weights[prev].item() * residual + self.noise_weights[prev].item() * eps
