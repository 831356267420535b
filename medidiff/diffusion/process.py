"""The process contract: a forward corruption and its reverse step, kept apart from any network.

A process knows how a clean sample ``x0`` is corrupted at timestep ``t`` (:meth:`Process.add_noise`,
used by training), where sampling starts (:meth:`Process.initial_sample`) and how one reverse step
turns the model's output into the next, less corrupted sample (:meth:`Process.step`). The loop that
drives it is :func:`medidiff.diffusion.sampling.sample`, the same for every process and method.

Two families fit the same interface:

- Gaussian (:mod:`medidiff.diffusion.gaussian`, DDPM and DDIM):
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; sampling starts from pure noise; ``y`` unused.
- Residual shifting (ResShift, :mod:`medidiff.diffusion.resshift`; Resfusion and RDDM alike):
  ``x_t`` depends on ``x0``, the degraded image ``y`` and noise, e.g. ResShift's
  ``x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) eps``; sampling starts from the (noised) degraded
  image, so :meth:`initial_sample` and :meth:`add_noise` take ``y``.

Step hooks (``x0_hooks``) see the process's estimate of ``x0`` at every reverse step as
``hook(x0, step_index, num_steps) -> x0``; temporal adaptive thresholding
(:class:`~medidiff.diffusion.thresholding.TemporalThreshold`) is one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

# (x0 estimate, step index (0 = first, most corrupted), number of steps) -> x0
X0Hook = Callable[[torch.Tensor, int, int], torch.Tensor]


class NoiseBank:
    """Pre-drawn standard normal maps handed out in order in place of a generator: tiled sampling
    draws every step's noise for the whole image once, so overlapping tiles see the same noise."""

    def __init__(self, maps: Sequence[torch.Tensor]):
        self.maps = list(maps)

    def next(self, like: torch.Tensor) -> torch.Tensor:
        if not self.maps:
            raise RuntimeError("the noise bank is empty: the process drew more noise maps than were banked")
        return self.maps.pop(0).to(like.dtype).expand_as(like)


def draw_noise(like: torch.Tensor, generator: torch.Generator | NoiseBank | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, from ``generator`` or the next map of a :class:`NoiseBank`."""
    if isinstance(generator, NoiseBank):
        return generator.next(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype)


class Process(ABC):
    """Base class: subclasses set :attr:`num_train_timesteps` and :attr:`prediction`
    (what the network predicts: ``epsilon`` or ``sample`` = x0) and implement the three methods."""

    num_train_timesteps: int
    prediction: str
    output_channels = 1  # channels the network predicts

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                        y: torch.Tensor | None = None) -> torch.Tensor:
        """What the network is trained to output for ``add_noise(x0, noise, t, y)``."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        raise NotImplementedError(f"{type(self).__name__} must define its training target")

    def __init__(self, x0_hooks: Sequence[X0Hook] = ()):
        self.x0_hooks = list(x0_hooks)
        self.timesteps: list[int] = []

    def set_timesteps(self, steps: int | None = None, timesteps: Sequence[int] | None = None) -> None:
        """Choose the sampling timesteps: ``steps`` evenly spaced ones from ``T - 1`` down to 0, or an
        explicit descending list."""
        if (steps is None) == (timesteps is None):
            raise ValueError("give either steps or timesteps")
        if timesteps is None:
            if not 1 <= steps <= self.num_train_timesteps:
                raise ValueError(f"steps must be in 1..{self.num_train_timesteps}, got {steps}")
            timesteps = torch.linspace(self.num_train_timesteps - 1, 0, steps).round().long().tolist()
        if list(timesteps) != sorted(set(timesteps), reverse=True) or timesteps[-1] < 0:
            raise ValueError(f"timesteps must be distinct, descending and >= 0, got {list(timesteps)}")
        self.timesteps = [int(t) for t in timesteps]

    def index(self, t: int) -> int:
        """Position of timestep ``t`` in :attr:`timesteps`."""
        return self.timesteps.index(int(t))

    def previous(self, t: int) -> int:
        """The timestep after ``t`` in sampling order, -1 after the last."""
        i = self.index(t)
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def hooked_x0(self, x0: torch.Tensor, t: int) -> torch.Tensor:
        """``x0`` passed through every step hook."""
        for hook in self.x0_hooks:
            x0 = hook(x0, self.index(t), len(self.timesteps))
        return x0

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  y: torch.Tensor | None = None) -> torch.Tensor:
        """A sample of the forward marginal q(x_t | x0[, y]) for timesteps ``t`` of shape (N,)."""
        ...

    @abstractmethod
    def initial_sample(self, noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Where the reverse process starts, given standard normal ``noise``."""
        ...

    @abstractmethod
    def step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One reverse step from ``sample`` at timestep ``t`` to the next timestep."""
        ...
