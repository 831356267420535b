"""The one sampling loop: any model function ``(x, t, condition) -> output`` with any process."""

from __future__ import annotations

from collections.abc import Callable

import torch

from medidiff.diffusion.process import NoiseBank, Process

# (x_t, t as (N,) long tensor, condition) -> model output (noise or x0, as the process expects)
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def sample(model: ModelFn, process: Process, noise: torch.Tensor, condition: torch.Tensor | None = None, *,
           y: torch.Tensor | None = None, generator: torch.Generator | NoiseBank | None = None,
           progress: Callable | None = None) -> torch.Tensor:
    """Run ``process`` (timesteps already set) backwards from ``process.initial_sample(noise, y)``;
    ``condition`` goes to the model unchanged, ``y`` (the degraded image) to residual processes;
    ``generator`` may be a :class:`NoiseBank` of the steps' noise maps."""
    x = process.initial_sample(noise, y)
    steps = process.timesteps
    for t in progress(steps) if progress else steps:
        out = model(x, torch.full((x.shape[0],), t, dtype=torch.long), condition)
        x = process.step(out, t, x, generator)
    return x
