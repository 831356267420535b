"""Degradation physics: bicubic mapping, MR k-space truncation, low-resolution radiographs, the
parallel-beam CT projector with FBP, and low-dose CT noise."""

import math

import pytest
import torch

from medidiff.errors import InputError
from medidiff.physics.degradations import (
    ParallelBeam,
    hu_to_mu,
    kspace_consistency,
    kspace_truncation,
    low_dose_ct,
    mu_to_hu,
    radiograph_lowres,
    upsample,
    zero_filled,
)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (y, x) in pixels from the image centre."""
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.meshgrid(c, c, indexing="ij")


def _blobs(size: int) -> torch.Tensor:
    """A smooth phantom (1, 1, size, size) well inside the reconstruction circle."""
    yy, xx = _grid(size)
    f = (torch.exp(-((xx - 0.1 * size) ** 2 + (yy + 0.05 * size) ** 2) / (2 * (0.12 * size) ** 2))
         + 0.5 * torch.exp(-((xx + 0.2 * size) ** 2 + (yy - 0.15 * size) ** 2) / (2 * (0.06 * size) ** 2)))
    return f.float()[None, None]


def test_upsample_shapes_and_constants():
    x = torch.full((2, 1, 8, 12), 0.3)
    up = upsample(x, 4)
    assert up.shape == (2, 1, 32, 48)
    torch.testing.assert_close(up, torch.full_like(up, 0.3))
    same = upsample(x, 1)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    with pytest.raises(InputError, match=r"\(N, 1, H, W\)"):
        upsample(torch.zeros(8, 8), 2)


@pytest.mark.parametrize(("scale", "size"), [(2, 64), (4, 64), (2, 62), (4, 60)])  # odd low-res sizes too
def test_kspace_truncation_samples_a_band_limited_image_exactly(scale, size):
    low = size // scale
    yy, xx = _grid(size)
    # frequencies (cycles per image) below the low-resolution Nyquist limit low / 2

    def image(y, x):
        return (2 + torch.cos(2 * math.pi * (3 * x / size + 0.2)) + 0.5 * torch.sin(2 * math.pi * 5 * y / size)
                + 0.3 * torch.cos(2 * math.pi * ((low // 2 - 2) * x + 2 * y) / size))

    hr = image(yy, xx).float()[None, None]
    lr = kspace_truncation(hr, scale)
    assert lr.shape == (1, 1, low, low)
    # low-resolution pixel m sits at the centre of high-resolution pixels [scale m, scale m + scale)
    centres = scale * torch.arange(low, dtype=torch.float64) + (scale - 1) / 2 - (size - 1) / 2
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    torch.testing.assert_close(lr[0, 0].double(), image(cy, cx), atol=1e-4, rtol=1e-4)


def test_kspace_truncation_keeps_intensity_and_refuses_odd_sizes():
    x = torch.full((1, 1, 32, 48), 0.7)
    torch.testing.assert_close(kspace_truncation(x, 4), torch.full((1, 1, 8, 12), 0.7))
    with pytest.raises(InputError, match="not divisible by the scale 4"):
        kspace_truncation(torch.zeros(1, 1, 30, 32), 4)


@pytest.mark.parametrize(("scale", "size"), [(2, 64), (4, 64), (4, 60)])  # even and odd bands
def test_kspace_consistency_puts_the_measured_band_back(scale, size):
    hr = 1 + _blobs(size)  # smooth and positive: its low-resolution image is real
    lr = kspace_truncation(hr, scale)
    # a guess with the wrong low frequencies is made consistent with the measurement
    guess = upsample(lr, scale) * 0.5 + torch.rand(1, 1, size, size)
    fixed = kspace_consistency(guess, lr, scale)
    torch.testing.assert_close(kspace_truncation(fixed, scale), lr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kspace_consistency(fixed, lr, scale), fixed, atol=1e-5, rtol=1e-5)  # a projection
    assert (kspace_truncation(guess, scale) - lr).abs().max() > 0.1
    # an image that already fits the measurement keeps its values; zero-filling fills the band alone
    torch.testing.assert_close(kspace_consistency(hr, lr, scale), hr, atol=0.02, rtol=0)
    torch.testing.assert_close(zero_filled(lr, scale), kspace_consistency(torch.zeros_like(hr), lr, scale))
    assert (zero_filled(lr, scale) - hr).abs().mean() < (upsample(lr, scale) - hr).abs().mean()
    with pytest.raises(InputError, match="is not 4 x"):
        kspace_consistency(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 8, 8), 4)


def test_radiograph_lowres_blur_downsample_and_noise():
    x = torch.zeros(1, 1, 128, 128)
    x[..., 64:, :] = 1.0
    clean = radiograph_lowres(x, 4, blur_sigma=2.0, noise_std=0.0)
    assert clean.shape == (1, 1, 32, 32)
    assert clean[0, 0, 0, 0] == 0 and clean[0, 0, -1, 0] == pytest.approx(1.0)
    edge = clean[0, 0, 14:18, 5]
    assert (edge.diff() > 0).all() and 0.3 < float(edge[2]) < 0.9  # blurred across the edge
    noisy = radiograph_lowres(x, 4, blur_sigma=2.0, noise_std=0.05, generator=torch.Generator().manual_seed(1))
    assert float((noisy - clean).std()) == pytest.approx(0.05, rel=0.1)
    again = radiograph_lowres(x, 4, blur_sigma=2.0, noise_std=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)


def test_fbp_reproduces_a_smooth_phantom():
    size = 96
    op = ParallelBeam(size, views=144)
    assert op.detectors >= size * math.sqrt(2)
    f = _blobs(size)
    recon = op.fbp(op.forward(f))
    yy, xx = _grid(size)
    inside = (xx ** 2 + yy ** 2) < (size / 2) ** 2
    err = (recon - f)[0, 0][inside].norm() / f[0, 0][inside].norm()
    assert err < 0.01


def test_projection_geometry_disc_and_offset_blob():
    size = 64
    op = ParallelBeam(size, views=8)
    yy, xx = _grid(size)
    disc = ((xx ** 2 + yy ** 2) <= 20 ** 2).float()[None, None]
    p = op.forward(disc)
    centre = op.detectors // 2  # detector coordinate t = index - (detectors - 1) / 2
    # every view's central ray crosses the disc's diameter (~41 pixels long)
    assert torch.allclose(p[0, 0, :, centre], torch.full((8,), 41.0), atol=1.5)
    blob = torch.exp(-((xx - 10) ** 2 + (yy - 4) ** 2) / 2.0).float()[None, None]
    q = op.forward(blob)[0, 0]
    t = torch.arange(op.detectors, dtype=torch.float32) - (op.detectors - 1) / 2
    peak = (q * t).sum(dim=1) / q.sum(dim=1)  # centre of mass on the detector, per view
    expected = 10 * torch.cos(op.angles) + 4 * torch.sin(op.angles)  # t = x cos + y sin
    torch.testing.assert_close(peak, expected, atol=0.05, rtol=0)


def test_backprojection_is_close_to_the_adjoint_of_forward():
    size = 64
    op = ParallelBeam(size, views=90)
    g = torch.Generator().manual_seed(0)
    # smooth random fields: the two discretisations agree at low frequencies
    x = torch.nn.functional.avg_pool2d(torch.randn(1, 1, size, size, generator=g), 9, 1, 4)
    y = torch.nn.functional.avg_pool2d(torch.randn(1, 1, 90, op.detectors, generator=g), 9, 1, 4)
    lhs, rhs = float((op.forward(x) * y).sum()), float((x * op.backproject(y)).sum())
    assert abs(lhs - rhs) / abs(lhs) < 0.02


def test_projector_refuses_wrong_shapes():
    op = ParallelBeam(32, views=10)
    with pytest.raises(InputError, match="built for 32 x 32"):
        op.forward(torch.zeros(1, 1, 30, 30))
    with pytest.raises(InputError, match="does not fit"):
        op.backproject(torch.zeros(1, 1, 9, op.detectors))
    with pytest.raises(InputError, match="unknown FBP filter"):
        ParallelBeam(32, filter="hann")


def test_hu_mu_round_trip():
    hu = torch.tensor([-1000.0, 0.0, 40.0, 1200.0])
    torch.testing.assert_close(mu_to_hu(hu_to_mu(hu)), hu)
    assert float(hu_to_mu(torch.tensor(-2048.0))) == 0.0


def _water_disc(size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = _grid(size)
    r = (xx ** 2 + yy ** 2).sqrt()
    hu = torch.where(r < 40, 0.0, -1000.0).float()[None, None]
    return hu, r < 30


def test_low_dose_ct_noise_free_keeps_hu_and_noise_grows_as_dose_falls():
    hu, inside = _water_disc()
    original = hu.clone()
    clean = low_dose_ct(hu, 1.0, None, views=120)
    assert torch.equal(hu, original)  # input untouched
    assert clean.shape == hu.shape
    assert abs(float(clean[0, 0][inside].mean())) < 5 and float(clean[0, 0][inside].std()) < 8  # edge ripple
    stds = []
    for photons in (1e5, 1e4):
        noisy = low_dose_ct(hu, 1.0, photons, torch.Generator().manual_seed(0), views=120)
        stds.append(float((noisy - clean)[0, 0][inside].std()))
        assert abs(float(noisy[0, 0][inside].mean())) < 10  # unbiased
    # quantum noise: std ~ 1 / sqrt(photons)
    assert 2.5 < stds[1] / stds[0] < 4.0


def test_low_dose_ct_is_reproducible_and_electronic_noise_adds():
    hu, inside = _water_disc()
    a = low_dose_ct(hu, 1.0, 2e4, torch.Generator().manual_seed(3), views=60)
    b = low_dose_ct(hu, 1.0, 2e4, torch.Generator().manual_seed(3), views=60)
    assert torch.equal(a, b)
    c = low_dose_ct(hu, 1.0, 2e4, torch.Generator().manual_seed(3), views=60, electronic_noise=60.0)
    clean = low_dose_ct(hu, 1.0, None, views=60)
    assert float((c - clean)[0, 0][inside].std()) > 1.1 * float((a - clean)[0, 0][inside].std())
    with pytest.raises(InputError, match="square"):
        low_dose_ct(torch.zeros(1, 1, 32, 40), 1.0)
