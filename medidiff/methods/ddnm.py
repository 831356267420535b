"""DDNM: zero-shot compressed-sensing reconstruction with a pretrained diffusion denoiser
(Wang, Yu & Zhang, "Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model", ICLR 2023).

At every respaced timestep the denoiser's clean-image estimate ``x0`` gets the measurement's range
part through the operator's range-null-space step (``x0 - A^+(A x0 - y)``, i.e. ``op.project``) and
keeps its own null-space part; then a DDIM-style update moves to the next timestep, mixing fresh
noise and the predicted noise as DDNM's code does (``eta = 0.85``). The last step returns the projected
``x0``, so the output is as consistent with ``y`` as the operator's pseudo-inverse allows (exactly for
block CS). DDNM's "time travel" (repeated sub-chains) is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medidiff.physics.measurements import Operator

# (x_t (B, 1, H, W), t: (B,) long training timesteps) -> predicted noise
EpsilonFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def respaced_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` training timesteps evenly spaced from ``T - 1`` down to 0 (as ``Process.set_timesteps``)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    return torch.linspace(num_train_timesteps - 1, 0, steps).round().long().tolist()


@torch.no_grad()
def ddnm(op: Operator, y: torch.Tensor, model_fn: EpsilonFn, alphas_cumprod: torch.Tensor, steps: int = 100,
         eta: float = 0.85, generator: torch.Generator | None = None,
         progress: Callable | None = None, x0_range: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """Reconstruct images (B, 1, H, W) from measurements ``y`` of ``op``.

    ``model_fn(x, t)`` predicts the noise of ``x`` at training timesteps ``t`` under ``alphas_cumprod``
    (the training schedule, 1-D); ``eta`` is the share of fresh noise in each update (0: deterministic
    DDIM); ``generator`` seeds the start noise and every update; ``progress`` wraps the timestep list
    (e.g. ``tqdm``); ``x0_range`` clips each clean-image estimate to the data range before the
    projection (guided diffusion's ``clip_denoised``; without it the first estimates, divided by
    ``sqrt(abar) ~ 0`` at ``t = T - 1``, are huge and the chain does not recover), ``None`` to skip.
    """
    abar = alphas_cumprod.double().tolist()
    timesteps = respaced_timesteps(len(abar), steps)
    batch = y.shape[0]
    dtype = y.real.dtype if y.is_complex() else y.dtype

    def noise() -> torch.Tensor:
        return torch.randn(batch, 1, *op.image_shape, generator=generator, dtype=dtype).to(y.device)

    x = noise()
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        eps = model_fn(x, torch.full((batch,), t, dtype=torch.long, device=y.device))
        x0 = (x - (1 - abar[t]) ** 0.5 * eps) / abar[t] ** 0.5
        x0 = op.project(x0.clamp(*x0_range) if x0_range else x0, y)
        if i + 1 < len(timesteps):
            a_next = abar[timesteps[i + 1]]
            x = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * (eta * noise() + (1 - eta**2) ** 0.5 * eps)
    return x0
