"""Classical denoising baselines on model-unit images (N, 1, H, W): total variation and BM3D.

Both tune themselves from the noise level that ``estimate_noise`` measures in each image
(scikit-image's wavelet median-absolute-deviation estimate, Donoho & Johnstone), times a factor
chosen on training CT slices (never the held-out set). Bicubic upsampling, the super-resolution
baseline, is :func:`medidiff.physics.degradations.upsample`.

BM3D is the ``bm3d`` package (Tampere University; a wrapper around a prebuilt library, free for
non-commercial use only): an evaluation baseline, installed with the ``test`` extra, never a
dependency of the pipeline.
"""

from __future__ import annotations

import numpy as np
import torch

from medidiff.errors import InputError

# Chosen on three low-dose training CT slices (256 px centres, model units): TV weight factors 0.5-6
# peaked at 1-1.25 (+4 to +8 dB over the input); BM3D factors 0.75-3 peaked at 2 (FBP noise is
# correlated, and the wavelet estimate sees only its finest scale, so it reads low).
TV_WEIGHT_PER_SIGMA = 1.0  # Chambolle TV weight = this x the estimated noise std
BM3D_SIGMA_FACTOR = 2.0  # BM3D noise std = this x the estimated noise std


def _images(x: torch.Tensor, what: str) -> np.ndarray:
    if x.ndim != 4 or x.shape[1] != 1:
        raise InputError(f"{what} expects images of shape (N, 1, H, W), got {tuple(x.shape)}")
    return x.detach().cpu().double().numpy()[:, 0]


def _per_image(value: float | torch.Tensor, n: int, name: str) -> list[float]:
    """One value per image from a scalar or an (N,) sequence."""
    v = torch.as_tensor(value, dtype=torch.float64).flatten()
    if v.numel() not in (1, n):
        raise InputError(f"{name} has {v.numel()} values for {n} images; give one, or one per image")
    return v.expand(n).tolist()


def estimate_noise(x: torch.Tensor) -> torch.Tensor:
    """The Gaussian noise std of each image (N,) in its own units (wavelet MAD estimate)."""
    from skimage.restoration import estimate_sigma

    return torch.tensor([estimate_sigma(a) for a in _images(x, "estimate_noise")], dtype=torch.float64)


def tv_denoise(x: torch.Tensor, weight: float | torch.Tensor | None = None) -> torch.Tensor:
    """Chambolle total-variation denoising of each image; ``weight`` (per image or one for all)
    defaults to ``TV_WEIGHT_PER_SIGMA`` x the estimated noise std."""
    from skimage.restoration import denoise_tv_chambolle

    images = _images(x, "tv_denoise")
    weights = (TV_WEIGHT_PER_SIGMA * estimate_noise(x)).tolist() if weight is None else _per_image(
        weight, len(images), "weight")
    out = [denoise_tv_chambolle(a, weight=w) if w > 0 else a for a, w in zip(images, weights, strict=True)]
    return torch.from_numpy(np.stack(out)[:, None]).to(x.dtype)


def bm3d_denoise(x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
    """BM3D denoising of each image for white noise of std ``sigma`` (per image or one for all),
    by default ``BM3D_SIGMA_FACTOR`` x the estimated noise std. About 20 s per 512 x 512 image on
    one thread."""
    try:
        import bm3d
    except ImportError:
        raise InputError("the BM3D baseline needs the bm3d package (pip install 'medidiff[test]' or "
                         "pip install bm3d; free for non-commercial use only)") from None
    images = _images(x, "bm3d_denoise")
    sigmas = (BM3D_SIGMA_FACTOR * estimate_noise(x)).tolist() if sigma is None else _per_image(
        sigma, len(images), "sigma")
    out = [bm3d.bm3d(a, sigma_psd=s) if s > 0 else a for a, s in zip(images, sigmas, strict=True)]
    return torch.from_numpy(np.stack(out)[:, None]).to(x.dtype)
