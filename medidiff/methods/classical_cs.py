"""Classical compressed-sensing baselines for any measurement ``Operator``: zero-filled and FISTA-TV.

``fista_tv`` solves ``min_x 0.5 ||A x - y||^2 + lam * TV(x)`` (isotropic total variation) with FISTA
(Beck & Teboulle 2009); the TV proximal step is solved on its dual by their fast gradient projection
(FGP), warm-started from the previous outer iteration. Batched; no learning.
"""

from __future__ import annotations

import torch

from medidiff.physics.measurements import Operator


def zero_filled(op: Operator, y: torch.Tensor) -> torch.Tensor:
    """The pseudo-inverse reconstruction ``A^+ y`` (zero-filled k-space for MRI, ``Phi^T y`` for block CS)."""
    return op.pinv(y)


def gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences (..., 2, H, W) along rows and columns, zero at the far edge (Neumann)."""
    dy = torch.zeros_like(x)
    dx = torch.zeros_like(x)
    dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return torch.stack((dy, dx), dim=-3)


def gradient_adjoint(p: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``gradient`` (minus the divergence): (..., 2, H, W) -> (..., H, W)."""
    py, px = p[..., 0, :, :], p[..., 1, :, :]
    out = torch.zeros_like(py)
    out[..., :-1, :] -= py[..., :-1, :]
    out[..., 1:, :] += py[..., :-1, :]
    out[..., :, :-1] -= px[..., :, :-1]
    out[..., :, 1:] += px[..., :, :-1]
    return out


def tv_prox(b: torch.Tensor, weight: float, iterations: int = 20,
            dual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmin_x 0.5 ||x - b||^2 + weight * TV(x)`` by FGP on the dual; returns ``(x, dual)`` so the
    next call can start from ``dual``."""
    p = torch.zeros((*b.shape[:-2], 2, *b.shape[-2:]), dtype=b.dtype, device=b.device) if dual is None else dual
    if weight <= 0:
        return b, p
    r, t = p, 1.0
    for _ in range(iterations):
        step = r + gradient(b - weight * gradient_adjoint(r)) / (8.0 * weight)
        p_next = step / torch.hypot(step[..., 0, :, :], step[..., 1, :, :]).clamp(min=1.0).unsqueeze(-3)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        r = p_next + (t - 1) / t_next * (p_next - p)
        p, t = p_next, t_next
    return b - weight * gradient_adjoint(p), p


def operator_norm_squared(op: Operator, iterations: int = 20, seed: int = 0,
                          device: torch.device | str = "cpu") -> float:
    """``||A^T A||`` by power iteration from a seeded random image (on ``device``, the operator's)."""
    x = torch.randn(1, 1, *op.image_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    norm = 1.0
    for _ in range(iterations):
        x = op.adjoint(op(x))
        norm = float(torch.linalg.vector_norm(x))
        x = x / norm
    return norm


def fista_tv(op: Operator, y: torch.Tensor, lam: float = 0.003, iterations: int = 100,
             prox_iterations: int = 10, x0: torch.Tensor | None = None) -> torch.Tensor:
    """FISTA-TV reconstruction (B, 1, H, W) from measurements ``y``, starting at ``x0`` (default: the
    pseudo-inverse). ``lam`` weighs TV against data fit, for images in [0, 1]; the step is
    ``1 / ||A^T A||`` (1.01 x the power-iteration estimate, for safety).

    The defaults were the best of ``lam`` in {3e-4, 1e-3, 3e-3, 1e-2, 3e-2} on four training images
    (128 px) for block CS at 10-50 % and MRI at 4x and 8x; at 1 % block CS ``lam = 0.01`` does better.
    Smaller ``lam`` needs more iterations (``lam = 1e-3`` reaches its best only after ~300)."""
    step = 1.0 / (1.01 * operator_norm_squared(op, device=y.device))
    x = zero_filled(op, y) if x0 is None else x0
    z, t, dual = x, 1.0, None
    with torch.no_grad():
        for _ in range(iterations):
            x_next, dual = tv_prox(z - step * op.adjoint(op(z) - y), step * lam, prox_iterations, dual)
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            z = x_next + (t - 1) / t_next * (x_next - x)
            x, t = x_next, t_next
    return x
