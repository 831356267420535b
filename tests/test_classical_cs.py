"""Classical CS baselines: the TV pieces are right, and FISTA-TV beats zero-filled on a phantom."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from skimage.data import shepp_logan_phantom

from medidiff.methods.classical_cs import (
    fista_tv,
    gradient,
    gradient_adjoint,
    operator_norm_squared,
    tv_prox,
    zero_filled,
)
from medidiff.physics.measurements import BlockCS, CartesianMRI, birdcage_sensitivities, cartesian_mask


def _psnr(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((x - truth) ** 2).mean()))


@pytest.fixture(scope="module")
def phantom() -> torch.Tensor:
    img = torch.from_numpy(shepp_logan_phantom()).float()[None, None]
    return F.interpolate(img, size=(64, 64), mode="bilinear", antialias=True).clamp(0, 1)


def _tv(x: torch.Tensor) -> torch.Tensor:
    g = gradient(x)
    return torch.hypot(g[..., 0, :, :], g[..., 1, :, :]).sum()


def test_gradient_adjoint_is_exact():
    gen = torch.Generator().manual_seed(0)
    x, p = torch.randn(2, 1, 9, 7, generator=gen, dtype=torch.float64), torch.randn(2, 1, 2, 9, 7, generator=gen,
                                                                                     dtype=torch.float64)
    assert float((gradient(x) * p).sum()) == pytest.approx(float((x * gradient_adjoint(p)).sum()), rel=1e-12)


def test_tv_prox_lowers_the_objective_and_keeps_the_mean(phantom):
    noisy = phantom + 0.1 * torch.randn(phantom.shape, generator=torch.Generator().manual_seed(0))
    weight = 0.05
    x, _ = tv_prox(noisy, weight, iterations=50)

    def objective(v):
        return float(0.5 * ((v - noisy) ** 2).sum() + weight * _tv(v))

    assert objective(x) < 0.7 * objective(noisy)
    assert objective(x) <= objective(phantom)  # the minimiser beats the clean image on its own objective
    assert float(x.mean()) == pytest.approx(float(noisy.mean()), abs=1e-5)  # TV ignores constants
    assert _psnr(x, phantom) > _psnr(noisy, phantom) + 3


def test_operator_norms_are_one():
    assert operator_norm_squared(BlockCS(0.1, (64, 64))) == pytest.approx(1.0, abs=1e-3)
    assert operator_norm_squared(CartesianMRI(cartesian_mask((64, 64), 4))) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("op", [BlockCS(0.1, (64, 64)), CartesianMRI(cartesian_mask((64, 64), 4)),
                                CartesianMRI(cartesian_mask((64, 64), 4), birdcage_sensitivities((64, 64), 4))],
                         ids=["block-cs-10%", "mri-4x", "mri-4x-4-coils"])
def test_fista_tv_beats_zero_filled(op, phantom):
    y = op(phantom)
    base = _psnr(zero_filled(op, y), phantom)
    tv = _psnr(fista_tv(op, y, iterations=60), phantom)
    assert tv > base + 5, (base, tv)


def test_fista_tv_is_batched(phantom):
    op = BlockCS(0.3, (64, 64))
    other = phantom.flip(-1)
    both = fista_tv(op, op(torch.cat([phantom, other])), iterations=5)
    torch.testing.assert_close(both[1:], fista_tv(op, op(other), iterations=5), atol=1e-5, rtol=0)
