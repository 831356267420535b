"""Research volumes (NIfTI, NRRD, MetaImage) as pipeline sources, and geometry-correct resampling (SimpleITK).

A volume file is one series: its key is the salted hash of its path relative to the input root and the
sha256 of its bytes (a changed file is a new series; same-named files of two inputs never collide). It carries no patient identifiers and no
DICOM header, so derived outputs are NIfTI and PNG only. The modality comes from a dcm2niix/BIDS JSON
sidecar (``brain.nii.gz`` + ``brain.json`` with ``"Modality": "MR"``), else from a MetaImage
``Modality`` field, else it is ``OT``. Arrays follow the pipeline's axis convention: index
``(i, j, k)`` is ITK's ``(x, y, z)``, i.e. the DICOM (column, row, slice), with a RAS affine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from medidiff.io.headers import MAX_ASPECT, MAX_PIXELS
from medidiff.io.text import clean_text

FORMATS = {".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".mha": "MetaImage"}
SIDECAR_LIMIT = 1 << 20  # bytes: a JSON sidecar is a few kB
SIDECAR_KEYS = {"modality": "Modality", "body_part": "BodyPartExamined", "series_description": "SeriesDescription"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
UNREADABLE = "truncated or corrupt {} file: its pixel data cannot be read whole"


def _sitk():
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK prints warnings (with paths) to stderr
    return sitk


def volume_format(path: Path) -> str | None:
    """``"NIfTI"``, ``"NRRD"`` or ``"MetaImage"`` for a volume file name, else None."""
    name = path.name.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar a volume file may have (``x.nii.gz`` -> ``x.json``)."""
    name = path.name
    suffix = next(s for s in FORMATS if name.lower().endswith(s))
    return path.with_name(name[: -len(suffix)] + ".json")


def describe_volume(file: Path, sidecar: Path | None = None) -> dict | str:
    """Header facts of a volume file (size, modality, ...) after proving its pixel data whole, else a reason.

    ``sidecar``: its JSON sidecar, already confined to the input by the caller (None: none to read).

    The whole image is read once here (SimpleITK does not notice every truncation: NIfTI is also checked
    by byte count), so that a bad file is refused at discovery, not halfway through a batch.
    """
    sitk = _sitk()
    fmt = volume_format(file)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return (f"not a readable {fmt} file (SimpleITK cannot read its header: another format, damaged, "
                "or axes that are not orthonormal)")
    size, spacing = reader.GetSize(), reader.GetSpacing()
    problem = _header_problem(reader, size, spacing)
    if problem:
        return problem
    if fmt == "NIfTI" and _nifti_short(file, reader, size):
        return UNREADABLE.format(fmt)
    try:
        reader.Execute()
    except RuntimeError:
        return UNREADABLE.format(fmt)
    facts = {"format": fmt, "columns": size[0], "rows": size[1], "frames": size[2] if len(size) == 3 else 1,
             "modality": _header_modality(reader), "body_part": "", "series_description": ""}
    extra = _read_sidecar(sidecar) if sidecar is not None else {}
    return extra if isinstance(extra, str) else facts | extra


def _header_problem(reader, size, spacing) -> str | None:
    """Why the header describes an image medidiff cannot use unaltered, or None."""
    if reader.GetDimension() not in (2, 3):
        return (f"a {reader.GetDimension()}-D volume: medidiff processes 2-D images and 3-D volumes "
                "(split time series or channels first)")
    if reader.GetNumberOfComponents() != 1:
        return (f"{reader.GetNumberOfComponents()} values per voxel (colour or vector image): medidiff "
                "processes greyscale images only")
    if min(size) < 1 or math.prod(size) > MAX_PIXELS:
        return f"absurd image size {'x'.join(map(str, size))}"
    if max(size[:2]) > MAX_ASPECT * min(size[:2]):
        return f"image of {size[0]}x{size[1]} pixels is a line, not an image"
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        return "voxel spacing is not positive numbers; the image cannot be placed in space"
    direction = np.asarray(reader.GetDirection(), float).reshape(len(size), len(size))
    if not np.allclose(direction.T @ direction, np.eye(len(size)), atol=1e-3):
        return "its direction cosines are not orthonormal; the image cannot be placed in space"
    return None


def _nifti_short(file: Path, reader, size) -> bool:
    """True when a NIfTI file holds fewer bytes than its header promises (ITK would read zeros)."""
    try:
        offset = int(float(reader.GetMetaData("vox_offset")))
        needed = offset + math.prod(size) * int(reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError):
        return True
    if not file.name.lower().endswith(".gz"):
        return file.stat().st_size < needed
    total = 0
    try:
        with gzip.open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError):
        return True
    return total < needed


def _header_modality(reader) -> str:
    """A MetaImage ``Modality = MET_MOD_CT`` as ``CT``; ``""`` when absent or unknown."""
    if "Modality" not in reader.GetMetaDataKeys():
        return ""
    value = reader.GetMetaData("Modality").strip().upper()
    value = value.removeprefix("MET_MOD_")
    return "" if value in ("", "UNKNOWN") else clean_text(value, 16)


def _read_sidecar(path: Path) -> dict | str:
    """The sidecar's modality, body part and description (only those present), or a reason to refuse."""
    if path.stat().st_size > SIDECAR_LIMIT:
        return f"its JSON sidecar {path.name!r} is over {SIDECAR_LIMIT} bytes; not read"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its JSON sidecar cannot be parsed; fix or remove it"
    if not isinstance(data, dict):
        return "its JSON sidecar is not an object; fix or remove it"
    return {key: clean_text(str(data[name]), 64) for key, name in SIDECAR_KEYS.items()
            if isinstance(data.get(name), (str, int, float))}


def read_volume(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of a volume file as float32 ``(cols, rows[, slices])`` and its RAS affine."""
    sitk = _sitk()
    image = sitk.ReadImage(str(file), sitk.sitkFloat32)
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).T)  # (z, y, x) -> (x, y, z)
    affine = ras_affine(image)
    if array.ndim == 3 and array.shape[-1] == 1:  # one slice: a 2-D image, as for DICOM
        array = array[..., 0]
    return array, affine


def ras_affine(image) -> np.ndarray:
    """The RAS 4x4 affine of a SimpleITK image (2-D images get an identity third axis)."""
    dim = image.GetDimension()
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), float).reshape(dim, dim)
    lps[:dim, :dim] = direction * np.asarray(image.GetSpacing(), float)
    lps[:dim, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def _to_sitk(array: np.ndarray, affine: np.ndarray):
    """A 3-D SimpleITK image of ``array`` ``(x, y, z)`` placed by the RAS ``affine``."""
    sitk = _sitk()
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if spacing[2] == 0:  # a 2-D image whose affine has no third axis: the plane normal, 1 mm
        lps[:3, 2] = np.cross(lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1])
        spacing[2] = 1.0
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T, dtype=np.float32))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def resample(image, *, spacing=None, size=None):
    """``image`` (a channel-first MetaTensor ``(C, x, y[, z])``) on a new grid of the same physical extent.

    Give ``size`` (voxels per spatial axis) or ``spacing`` (mm per axis). The outer edges of the image stay
    where they were in the world (so its centre does too); direction is kept; origin (the first voxel's
    centre) and spacing change so that ``size * spacing`` is unchanged. Linear interpolation, with a
    Gaussian anti-aliasing blur (sigma = (factor - 1) / 2 voxels, as scikit-image does) along every axis
    that is shrunk. Returns a MetaTensor whose ``affine``/``spacing``/``spatial_shape`` describe the new grid.
    """
    import torch
    from monai.data import MetaTensor

    sitk = _sitk()
    if (spacing is None) == (size is None):
        raise ValueError("give exactly one of spacing and size")
    meta = dict(getattr(image, "meta", {}) or {})
    affine = np.asarray(torch.as_tensor(meta.get("affine", torch.eye(4))).cpu(), dtype=np.float64)
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    shape = array.shape[1:]
    old_spacing = np.linalg.norm(affine[:3, : len(shape)], axis=0)
    if size is None:
        size = [max(1, round(n * s / t)) for n, s, t in zip(shape, old_spacing, spacing, strict=True)]
    size = [int(n) for n in size]
    if len(size) != len(shape) or min(size) < 1:
        raise ValueError(f"size {size} does not fit an image of spatial shape {tuple(shape)}")
    new_spacing = old_spacing * np.asarray(shape) / np.asarray(size)
    new_affine = affine.copy()
    new_affine[:3, : len(shape)] = affine[:3, : len(shape)] / old_spacing * new_spacing
    # keep the outer edge: first voxel centre moves by half the change of voxel size along each axis
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, : len(shape)] @ ((new_spacing / old_spacing - 1) / 2)
    pad = (1,) * (3 - len(shape))
    target = _to_sitk(np.zeros((*size, *pad), np.float32), new_affine)
    sigmas = [(t - s) / 2 for s, t in zip(old_spacing, new_spacing, strict=True)]  # mm; > 0 where shrunk
    channels = []
    for channel in array:
        source = _to_sitk(channel.reshape(*shape, *pad), affine)
        for axis, sigma in enumerate(sigmas):
            if sigma > 0 and shape[axis] >= 4:  # ITK's recursive Gaussian needs 4 voxels along the axis
                source = sitk.RecursiveGaussian(source, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder,
                                                axis)
        out = sitk.Resample(source, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
        channels.append(sitk.GetArrayFromImage(out).T.reshape(size))
    result = torch.from_numpy(np.stack(channels).astype(np.float32))
    meta.update(affine=torch.as_tensor(new_affine, dtype=torch.float64), spacing=new_spacing,
                spatial_shape=np.asarray(size))
    return MetaTensor(result, meta=meta)
