"""Load discovered series as MONAI MetaTensors: float32, modality units, MONOCHROME2, (1, cols, rows[, slices])."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import LoadImage
from pydicom.pixels import apply_modality_lut

from medidiff.errors import InputError
from medidiff.io.discovery import Refusal, SeriesRef, discover
from medidiff.io.headers import header_geometry, read_header
from medidiff.io.kspace_series import KSPACE_FORMAT, kspace_affine, read_series_kspace, zero_filled_volume
from medidiff.io.text import exception_text

# MONAI's reader probes for the GPU-only nvImageCodec decoder and warns when it is absent; on a CPU
# machine that is expected, and pydicom's own decoders (pylibjpeg plugins) are used.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    _LOADER = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_series(series: SeriesRef, kspace=None) -> MetaTensor:
    """Load ``series`` as a float32 MetaTensor ``(1, cols, rows[, slices])`` with a RAS ``affine``.

    Single-frame files are decoded by MONAI's ``LoadImage(PydicomReader)``, which already applies
    RescaleSlope/Intercept. Multi-frame files, Modality LUT sequences and files MONAI's reader fails on
    fall back to pydicom's ``pixel_array`` + ``apply_modality_lut`` (MONAI's reader would put the frame
    axis in the wrong place). The affine is always built here from the DICOM geometry (MONAI's reader
    ignores PixelSpacing when ImageOrientationPatient is absent, as in CR/DX). MONOCHROME1 images are
    inverted over their representable range; ``meta["medidiff_inverted"]`` and ``meta["medidiff_range"]``
    let the writer restore them. Errors name files by ``series.file_id`` (a salted hash), never by path.
    NIfTI/NRRD/MetaImage volumes are read by SimpleITK (``medidiff.io.volumes.read_volume``) into the same
    layout and meta; raw k-space files give their zero-filled image (``medidiff.io.kspace_series``; pass the
    ``KSpace`` as ``kspace`` when it is already read).
    """
    meta: dict = {"filename_or_obj": series.file_id(series.files[0]), "medidiff_inverted": False}  # no paths
    if series.source_format == KSPACE_FORMAT:
        kspace = kspace or read_series_kspace(series)
        volume, affine = zero_filled_volume(kspace), kspace_affine(kspace)
    elif not series.is_dicom:
        from medidiff.io.volumes import read_volume

        try:
            volume, affine = read_volume(series.files[0])
        except RuntimeError as exc:  # the file changed since discovery proved it whole
            raise InputError(f"series {series.key}, file {series.file_id(series.files[0])}: "
                             f"{series.source_format} file cannot be read") from exc
    else:
        headers = [read_header(f) for f in series.files]
        volume = np.concatenate([_pixels(series, f, ds) for f, ds in zip(series.files, headers, strict=True)],
                                axis=-1)
        first = headers[0]
        if str(first.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            lo, hi = _value_range(first)
            volume = (lo + hi) - volume
            meta.update(medidiff_inverted=True, medidiff_range=(lo, hi))
        if volume.shape[-1] == 1:
            volume = volume[..., 0]
        affine = dicom_affine(headers, volume.shape[-1] if volume.ndim == 3 else 1)
    if not np.isfinite(volume).all():
        raise InputError(f"series {series.key}: pixel data holds NaN or infinite values")
    spatial = volume.shape
    meta.update(
        affine=torch.as_tensor(affine, dtype=torch.float64),
        original_affine=affine.copy(),
        spacing=np.linalg.norm(affine[:3, : len(spatial)], axis=0),
        spatial_shape=np.asarray(spatial),
        space="RAS",
        original_channel_dim="no_channel",
        modality=series.modality,
    )
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(volume[None], dtype=np.float32)), meta=meta)


def load_item(series: SeriesRef) -> dict:
    """A pipeline item: ``{"image": t, "original": t.clone(), "source": series}``, and ``"kspace"`` (the
    checked ``KSpace``) for a raw k-space source, whose ``image`` is the zero-filled image."""
    kspace = read_series_kspace(series) if series.source_format == KSPACE_FORMAT else None
    image = load_series(series, kspace)
    item = {"image": image, "original": image.clone(), "source": series}
    return item if kspace is None else item | {"kspace": kspace}


class Study:
    """A notebook-friendly view of a source: ``study[i]`` loads series ``i``; the repr has no PHI.

    A .zip's temporary extraction lives as long as the Study (or its series) and is then removed.
    """

    def __init__(self, series: list[SeriesRef], refused: list[Refusal], root: Path):
        self.series, self.refused, self.root = series, refused, root

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, index: int) -> MetaTensor:
        return load_series(self.series[index])

    def item(self, index: int) -> dict:
        """The pipeline item for series ``index``."""
        return load_item(self.series[index])

    def __repr__(self) -> str:
        rows = [("#", "series", "modality", "body part", "size", "frames", "description")]
        rows += [(str(i), s.key, s.modality or "?", s.body_part or "-", f"{s.rows}x{s.columns}", str(s.frames),
                  s.series_description or "-") for i, s in enumerate(self.series)]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append(f"{len(self.series)} series; {len(self.refused)} file(s) refused")
        return "\n".join(lines)

    def show(self, index: int = 0, ax=None):
        """Draw the middle slice of series ``index`` (rows down, columns across) with matplotlib."""
        import matplotlib.pyplot as plt

        from medidiff.display import display_slice, percentile_window

        plane = display_slice(self[index])
        if ax is None:
            _, ax = plt.subplots()
        lo, hi = percentile_window(plane)
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{self.series[index].modality} {self.series[index].key}")
        ax.axis("off")
        return ax


def load_study(path: str | Path) -> Study:
    """Discover ``path`` (folder, file, DICOMDIR or .zip) and return a lazily loading ``Study``."""
    inventory = discover(path)
    return Study(inventory.series, inventory.refused, Path(path))


def _pixels(series: SeriesRef, file: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Pixel values of one file in modality units, shaped ``(cols, rows, frames)``."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        if frames == 1 and "ModalityLUTSequence" not in ds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    return np.asarray(_LOADER(str(file)))[0][..., None]
                except Exception:
                    pass  # fall back to pydicom below
        full = pydicom.dcmread(file, force=True)
        array = apply_modality_lut(full.pixel_array, full).astype(np.float32)
    except Exception as exc:
        raise InputError(f"series {series.key}, file {series.file_id(file)}: pixel data cannot be decoded "
                         f"({exception_text(exc, file)})") from exc
    array = array.reshape(frames, int(ds.Rows), int(ds.Columns))
    return np.transpose(array, (2, 1, 0))


def _value_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The representable range of stored values, in modality units."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    stored = stored_range(bits, bool(int(ds.get("PixelRepresentation", 0))))
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    values = sorted(v * slope + intercept for v in stored)
    return float(values[0]), float(values[1])


def stored_range(bits: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest stored value of ``bits``-bit pixels."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def dicom_affine(headers: list[pydicom.Dataset], slices: int) -> np.ndarray:
    """RAS affine mapping (col, row, slice) indices to millimetres (MONAI's swapped-ij convention).

    Irregularly spaced slices get the mean step (as MONAI does); the writer keeps their true positions.
    """
    first = headers[0]
    iop, ipp, spacing = header_geometry(first)  # discovery refused invalid values; absent spacing means 1 mm
    dr, dc = (float(v) for v in spacing) if spacing else (1.0, 1.0)
    if iop is None or ipp is None:
        depth = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1)) or 1)
        return np.diag([dc, dr, depth, 1.0])
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    origin = np.asarray(ipp, float)
    normal = np.cross(row_dir, col_dir)
    if slices > 1:
        last = (header_geometry(headers[-1])[1] if len(headers) > 1 else header_geometry(first, slices - 1)[1])
        step = (np.asarray(last, float) - origin) / (slices - 1) if last is not None else normal
        if not np.linalg.norm(step) > 0:
            step = normal * float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1)) or 1)
    else:
        step = normal * float(first.get("SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, step, origin
    return LPS_TO_RAS @ lps
