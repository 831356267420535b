"""Offset noise, temporal adaptive thresholding, DDIM/DDPM sampling with an x0 step hook."""

import pytest
import torch

from medidiff.diffusion.gaussian import cosine_alphas_cumprod, gaussian_process
from medidiff.diffusion.offset_noise import offset_noise
from medidiff.diffusion.sampling import sample
from medidiff.diffusion.thresholding import TemporalThreshold


def test_offset_noise_has_per_channel_constant_of_right_scale():
    like = torch.zeros(4000, 3, 16, 16)
    n = offset_noise(like, 0.1, torch.Generator().manual_seed(0))
    means = n.mean((2, 3))  # per sample and channel: const + mean of 256 i.i.d. N(0,1)
    expected_var = 0.1**2 + 1 / 256
    assert means.var().item() == pytest.approx(expected_var, rel=0.1)
    assert offset_noise(like, 0.0, torch.Generator().manual_seed(0)).mean((2, 3)).var().item() == pytest.approx(1 / 256, rel=0.1)
    # the total variance is 1 + strength^2 and the constant is shared across pixels
    assert n.var().item() == pytest.approx(1.01, rel=0.02)


def test_threshold_radius_grows_and_rescales_with_steps():
    th = TemporalThreshold(r0=1.45, dr=0.0025, ref_steps=1000)
    r1000 = [th.radius(i, 1000) for i in range(1000)]
    assert all(b > a for a, b in zip(r1000, r1000[1:], strict=False))
    assert r1000[0] == 1.45 and r1000[1] == pytest.approx(1.4525)
    # 20 steps: per-step growth x50, same final radius
    assert th.radius(1, 20) - th.radius(0, 20) == pytest.approx(50 * 0.0025)
    assert th.radius(19, 20) == pytest.approx(th.radius(950, 1000))
    x = torch.linspace(-10, 10, 101)
    assert th(x, 0, 20).abs().max().item() == pytest.approx(1.45)
    assert th(x, 10, 20).abs().max().item() == pytest.approx(th.radius(10, 20))


@pytest.mark.parametrize("method,steps", [("ddim", 10), ("ddpm", 10)])
def test_sampling_with_clamp_is_finite_and_shaped(method, steps):
    alphas = cosine_alphas_cumprod(1000)
    seen = []

    def clamp(x0, i, n):
        seen.append((i, n))
        return TemporalThreshold()(x0, i, n)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    process = gaussian_process(method, alphas, [clamp])
    process.set_timesteps(steps)
    out = sample(lambda x, t, c: 0.5 * x, process, noise, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert seen == [(i, steps) for i in range(steps)]
    assert out.abs().max() <= TemporalThreshold().radius(steps - 1, steps) + 1e-5


def test_schedule():
    a = cosine_alphas_cumprod(1000)
    assert a[0] > 0.99 and a[-1] < 1e-3 and torch.all(a[1:] < a[:-1])
