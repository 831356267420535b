"""ResShift (Yue et al., 2023): residual shifting from the clean image ``x0`` to the degraded ``y``.

Forward marginal ``x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) eps`` with ``eta`` growing from
about 0 to about 1 in ``T`` steps, so ``x_T`` is the degraded image plus noise; the network predicts
``x0`` (``prediction = "sample"``). Reverse step: the posterior
``q(x_{t-1} | x_t, x0) = N(eta_{t-1}/eta_t x_t + alpha_t/eta_t x0, kappa^2 eta_{t-1}/eta_t alpha_t)``
with ``alpha_t = eta_t - eta_{t-1}``. The same ``T`` is used in training and sampling.
``deterministic``: the diffusion-ODE sampler instead (the noise implied by ``x_t`` is carried to the
next marginal, DDIM-like), whose only randomness is the start noise, the "boundary condition" that
:mod:`medidiff.methods.optimal_boundary` optimises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medidiff.diffusion.process import Process, X0Hook, draw_noise


def resshift_etas(num_train_timesteps: int = 15, kappa: float = 2.0, power: float = 0.3,
                  min_noise_level: float = 0.04, eta_end: float = 0.99) -> torch.Tensor:
    """The authors' non-uniform schedule: sqrt(eta_t) geometric in ((t-1)/(T-1))**power (float64)."""
    if num_train_timesteps < 2:
        raise ValueError(f"ResShift needs at least 2 timesteps, got {num_train_timesteps}")
    start = min(min_noise_level / kappa, min_noise_level)
    growth = math.exp(math.log(eta_end / start) / (num_train_timesteps - 1))
    exponent = torch.linspace(0, 1, num_train_timesteps, dtype=torch.float64) ** power * (num_train_timesteps - 1)
    return (growth**exponent * start) ** 2


class ResShift(Process):
    """The residual-shifting process; ``y`` is the degraded image (same shape as ``x0``)."""

    prediction = "sample"

    def __init__(self, num_train_timesteps: int = 15, kappa: float = 2.0, power: float = 0.3,
                 min_noise_level: float = 0.04, x0_hooks: Sequence[X0Hook] = ()):
        super().__init__(x0_hooks)
        self.num_train_timesteps, self.kappa = num_train_timesteps, kappa
        self.etas = resshift_etas(num_train_timesteps, kappa, power, min_noise_level)
        self.noise_weight: torch.Tensor | None = None  # per-pixel noise weighting (UPSR); None = 1
        self.deterministic = False  # True: the ODE sampler, the start noise is the only randomness
        self._y: torch.Tensor | None = None

    def _kappa(self, like: torch.Tensor) -> torch.Tensor | float:
        return self.kappa if self.noise_weight is None else self.kappa * self.noise_weight.to(like.dtype)

    def set_timesteps(self, steps=None, timesteps=None):
        super().set_timesteps(steps, timesteps)
        if len(self.timesteps) != self.num_train_timesteps:
            raise ValueError(f"ResShift samples with its training T = {self.num_train_timesteps} steps, "
                             f"got {len(self.timesteps)}")

    def add_noise(self, x0, noise, t, y=None):
        if y is None:
            raise ValueError("ResShift needs the degraded image y")
        eta = self.etas.to(x0.dtype)[t].view(-1, *([1] * (x0.ndim - 1)))
        return x0 + eta * (y - x0) + self._kappa(x0) * eta.sqrt() * noise

    def initial_sample(self, noise, y=None):
        if y is None:
            raise ValueError("ResShift starts from the degraded image y")
        self._y = y
        return y + self._kappa(y) * self.etas[-1].item() ** 0.5 * noise

    def step(self, model_output, t, sample, generator=None):
        x0 = self.hooked_x0(model_output, t)
        prev = self.previous(t)
        if prev < 0:
            return x0
        eta, eta_prev = self.etas[t].item(), self.etas[prev].item()
        if self.deterministic:  # the probability-flow (DDIM-like) step: keep the implied noise
            shift = x0 + eta * (self._y - x0)
            return x0 + eta_prev * (self._y - x0) + (eta_prev / eta) ** 0.5 * (sample - shift)
        alpha = eta - eta_prev
        mean = eta_prev / eta * sample + alpha / eta * x0
        std = self._kappa(sample) * (eta_prev / eta * alpha) ** 0.5
        return mean + std * draw_noise(sample, generator)


class UPSR(ResShift):
    """UPSR's uncertainty-guided noise weighting on ResShift: flat, certain regions of the degraded
    image get less noise. Uncertainty is ``|y - estimate|`` (``estimate``: a plain restoration of
    ``y``, here the regression U-Net), Gaussian-smoothed; the weight grows from ``min_weight`` (no
    uncertainty) to 1 at ``full_uncertainty``. Set it per input with :meth:`weigh_noise`."""

    def __init__(self, num_train_timesteps: int = 15, kappa: float = 2.0, power: float = 0.3,
                 min_noise_level: float = 0.04, min_weight: float = 0.25, full_uncertainty: float = 0.05,
                 x0_hooks: Sequence[X0Hook] = ()):
        super().__init__(num_train_timesteps, kappa, power, min_noise_level, x0_hooks)
        self.min_weight, self.full_uncertainty = min_weight, full_uncertainty

    def weigh_noise(self, y: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
        """Set (and return) the per-pixel noise weight for degraded ``y`` and its plain restoration."""
        from monai.networks.layers import GaussianFilter

        uncertainty = GaussianFilter(2, sigma=1.5)((y - estimate).abs())
        level = (uncertainty / self.full_uncertainty).clamp(0, 1)
        self.noise_weight = self.min_weight + (1 - self.min_weight) * level
        return self.noise_weight
