"""Compressed-sensing measurement operators: adjointness, masks, pseudo-inverses, shape errors."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.errors import InputError
from medidiff.physics.measurements import (
    BlockCS,
    CartesianMRI,
    birdcage_sensitivities,
    cartesian_mask,
    fft2c,
    ifft2c,
    pad_to_multiple,
    rss,
)


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """Real inner product Re(sum(conj(a) * b)) in float64."""
    return float((a.conj() * b).real.sum() if a.is_complex() else (a * b).sum())


def _adjoint_gap(op, shape) -> float:
    """Relative gap between <A x, y> and <x, A^T y> for random x, y (float64)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *shape, generator=gen, dtype=torch.float64)
    ax = op(x)
    y = torch.randn(ax.shape, generator=gen, dtype=ax.dtype)
    lhs, rhs = _inner(ax, y), _inner(x, op.adjoint(y))
    return abs(lhs - rhs) / abs(lhs)


@pytest.mark.parametrize("ratio", [0.01, 0.04, 0.1, 0.3, 0.5, 1.0])
def test_block_cs_adjoint_and_exact_pinv(ratio):
    op = BlockCS(ratio, (64, 96))
    assert op.matrix.shape == (math.ceil(ratio * 1024), 1024)
    assert _adjoint_gap(op, (64, 96)) < 1e-12
    y = torch.randn(3, *op.measurement_shape)
    assert op(op.pinv(y)).shape == (3, op.rows, 2, 3)
    torch.testing.assert_close(op(op.pinv(y)), y, atol=1e-5, rtol=0)  # A A^+ = I


def test_block_cs_project_is_consistent_and_keeps_null_space():
    op = BlockCS(0.1, (64, 64))
    truth, guess = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    y = op(truth)
    x = op.project(guess, y)
    torch.testing.assert_close(op(x), y, atol=1e-5, rtol=0)
    # the null-space part of the guess survives: projecting the truth changes nothing
    torch.testing.assert_close(op.project(truth, y), truth, atol=1e-5, rtol=0)
    assert (x - truth).abs().mean() > 0.05  # 10 % of the measurements cannot pin down the image


def test_block_cs_matrix_is_seeded_orthonormal():
    a, b, c = BlockCS(0.3, (32, 32), seed=0), BlockCS(0.3, (32, 32), seed=0), BlockCS(0.3, (32, 32), seed=1)
    assert torch.equal(a.matrix, b.matrix) and not torch.equal(a.matrix, c.matrix)
    torch.testing.assert_close(a.matrix @ a.matrix.T, torch.eye(a.rows, dtype=torch.float64), atol=1e-12, rtol=0)


def test_block_cs_measures_each_tile_separately():
    op = BlockCS(0.1, (64, 64))
    x = torch.zeros(1, 1, 64, 64)
    x[..., 32:, :32] = torch.rand(32, 32)  # bottom-left tile only
    y = op(x)
    assert y[..., 1, 0].abs().sum() > 0 and y[..., 0, :].abs().sum() == 0 and y[..., 1, 1].abs().sum() == 0
    torch.testing.assert_close(y[0, :, 1, 0], op.matrix.float() @ x[0, 0, 32:, :32].reshape(-1))


@pytest.mark.parametrize("coils", [None, 4])
@pytest.mark.parametrize("kind", ["random", "equispaced"])
def test_mri_adjoint(coils, kind):
    shape = (48, 64)
    maps = None if coils is None else birdcage_sensitivities(shape, coils).to(torch.complex128)
    op = CartesianMRI(cartesian_mask(shape, 4, kind), maps)
    assert op.measurement_shape == (coils or 1, *shape)
    assert _adjoint_gap(op, shape) < 1e-12


def test_fft2c_is_centred_and_unitary():
    x = torch.ones(1, 1, 8, 8)
    k = fft2c(x)
    assert k[0, 0, 4, 4].abs().item() == pytest.approx(8.0)  # all energy at the centre, ||x|| kept
    torch.testing.assert_close(ifft2c(k).real, x)


@pytest.mark.parametrize("acceleration", [4, 8])
@pytest.mark.parametrize("kind", ["random", "equispaced"])
@pytest.mark.parametrize("width", [64, 100, 368])
def test_masks_meet_nominal_rate_and_hold_the_centre(acceleration, kind, width):
    mask = cartesian_mask((32, width), acceleration, kind, seed=3)
    assert mask.dtype == torch.bool and mask.shape == (32, width)
    assert torch.equal(mask, mask[:1].expand_as(mask))  # whole phase-encode columns
    columns = mask[0]
    assert abs(int(columns.sum()) - width / acceleration) <= 1
    center = round(0.32 / acceleration * width)
    assert columns[width // 2 - center // 2: width // 2 - center // 2 + center].all()
    assert not columns.all()


def test_masks_are_seeded_and_equispaced_is_even():
    assert torch.equal(cartesian_mask((16, 128), 4, seed=5), cartesian_mask((16, 128), 4, seed=5))
    assert not torch.equal(cartesian_mask((16, 128), 4, seed=5), cartesian_mask((16, 128), 4, seed=6))
    columns = cartesian_mask((16, 256), 8, "equispaced", center_fraction=0.0)[0].nonzero().flatten()
    gaps = columns.diff()
    assert int(gaps.max() - gaps.min()) <= 1 and int(gaps.median()) == 8


def test_single_coil_pinv_is_exact_for_complex_images():
    mask = cartesian_mask((32, 32), 4)
    y = torch.randn(2, 1, 32, 32, dtype=torch.complex64) * mask
    torch.testing.assert_close(fft2c(ifft2c(y)) * mask, y, atol=1e-5, rtol=0)  # A A^H y = y for complex x


def test_multicoil_full_sampling_recovers_the_image_and_rss_matches():
    shape = (32, 32)
    maps = birdcage_sensitivities(shape, 6)
    torch.testing.assert_close((maps.abs() ** 2).sum(0), torch.ones(shape), atol=1e-5, rtol=0)
    op = CartesianMRI(torch.ones(shape, dtype=torch.bool), maps)
    x = torch.rand(1, 1, *shape)
    torch.testing.assert_close(op.pinv(op(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rss(ifft2c(op(x))), x, atol=1e-5, rtol=0)  # sum |S|^2 = 1


def test_pad_to_multiple_round_trip():
    x = torch.rand(2, 1, 50, 70)
    padded, crop = pad_to_multiple(x, 32)
    assert padded.shape == (2, 1, 64, 96)
    assert torch.equal(crop(padded), x)
    small, crop_small = pad_to_multiple(torch.rand(1, 1, 10, 10), 32)  # padding > image: replicate
    assert small.shape == (1, 1, 32, 32) and crop_small(small).shape == (1, 1, 10, 10)


def test_bad_shapes_give_clear_errors():
    with pytest.raises(InputError, match="multiples of 32.*pad_to_multiple"):
        BlockCS(0.1, (64, 70))
    with pytest.raises(InputError, match=r"ratio must be in \(0, 1\]"):
        BlockCS(0.0, (64, 64))
    op = BlockCS(0.1, (64, 64))
    with pytest.raises(InputError, match=r"real images \(B, 1, 64, 64\), got \(1, 1, 32, 32\)"):
        op(torch.rand(1, 1, 32, 32))
    with pytest.raises(InputError, match="measurements must be"):
        op.adjoint(torch.rand(1, 5, 2, 2))
    mri = CartesianMRI(cartesian_mask((32, 32), 4))
    with pytest.raises(InputError, match="real images"):
        mri(torch.rand(1, 1, 32, 32, dtype=torch.complex64))
    with pytest.raises(InputError, match="complex k-space"):
        mri.adjoint(torch.rand(1, 1, 32, 32))
    with pytest.raises(InputError, match="sensitivities must be"):
        CartesianMRI(cartesian_mask((32, 32), 4), torch.ones(4, 32, 16, dtype=torch.complex64))
    with pytest.raises(InputError, match="mask kind"):
        cartesian_mask((32, 32), 4, "radial")


@pytest.mark.parametrize("make", [lambda: BlockCS(0.1, (64, 64)),
                                  lambda: CartesianMRI(cartesian_mask((64, 64), 4), birdcage_sensitivities((64, 64), 4))],
                         ids=["block-cs", "mri-4-coils"])
def test_operators_move_whole_to_another_device(make):
    """``to`` moves every tensor the operator holds (the meta device stands in for a GPU)."""
    op = make()
    moved = op.to("meta")
    x = torch.empty(2, 1, 64, 64, device="meta")
    y = moved(x)
    assert moved is op and y.device.type == "meta" and y.shape == (2, *op.measurement_shape)
    held = [v for v in vars(op).values() if isinstance(v, torch.Tensor)]
    assert held and all(v.device.type == "meta" for v in held)
    assert op.project(x, y).device.type == "meta"
