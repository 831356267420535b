"""Classical denoising baselines: noise estimate, TV and BM3D improve a noisy phantom."""

import sys

import numpy as np
import pytest
import torch

from medidiff.datasets.cs_images import ellipse_phantom
from medidiff.errors import InputError
from medidiff.methods.classical_restoration import bm3d_denoise, estimate_noise, tv_denoise
from medidiff.metrics import psnr


@pytest.fixture
def noisy_phantoms():
    rng = np.random.default_rng(0)
    clean = torch.stack([ellipse_phantom(96, rng) for _ in range(2)])[:, None]
    sigmas = torch.tensor([0.03, 0.08])
    noisy = clean + sigmas[:, None, None, None] * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    return clean, noisy, sigmas


def test_noise_estimate_follows_white_noise(noisy_phantoms):
    _, noisy, sigmas = noisy_phantoms
    torch.testing.assert_close(estimate_noise(noisy), sigmas.double(), rtol=0.2, atol=0)


@pytest.mark.parametrize("denoise", [tv_denoise, bm3d_denoise])
def test_denoisers_tune_themselves_and_improve_psnr(noisy_phantoms, denoise):
    clean, noisy, _ = noisy_phantoms
    before = noisy.clone()
    out = denoise(noisy)
    assert torch.equal(noisy, before) and out.shape == noisy.shape and out.dtype == noisy.dtype
    for i in range(2):
        assert psnr(out[i:i + 1], clean[i:i + 1]) > psnr(noisy[i:i + 1], clean[i:i + 1]) + 3


def test_explicit_strengths_and_errors(noisy_phantoms, monkeypatch):
    clean, noisy, _ = noisy_phantoms
    torch.testing.assert_close(tv_denoise(noisy, 0.0), noisy)  # no smoothing at weight 0
    assert not torch.equal(tv_denoise(noisy, [0.01, 0.1])[1], tv_denoise(noisy, 0.01)[1])
    with pytest.raises(InputError, match="weight has 3 values for 2 images"):
        tv_denoise(noisy, [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match=r"\(N, 1, H, W\)"):
        tv_denoise(noisy[:, 0])
    monkeypatch.setitem(sys.modules, "bm3d", None)
    with pytest.raises(InputError, match="needs the bm3d package"):
        bm3d_denoise(noisy)
