"""Writers: derived DICOM series in the source's geometry and IOD, NIfTI, PNG previews and panels (atomic)."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medidiff import __version__
from medidiff.display import before_after_figure, display_slice, percentile_window
from medidiff.errors import OutputError
from medidiff.io.atomic import atomic_dir, atomic_write
from medidiff.io.discovery import MEDIDIFF_MANUFACTURER, PROJECTION_MODALITIES, SeriesRef
from medidiff.io.headers import as_list, header_geometry, read_header, transfer_syntax
from medidiff.io.loading import dicom_affine, stored_range

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# IODs whose Modality LUT is fixed to identity (RescaleSlope 1, RescaleIntercept 0) or absent.
FIXED_RESCALE_SOP = ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.3")
NO_RESCALE_MODALITIES = {"MR", "US", "NM", "XA", "RF"}
# Attributes that describe the source's pixels, not ours; dropped before writing.
DROP = (
    "PixelData", "SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue",
    "PixelPaddingRangeLimit", "SmallestPixelValueInSeries", "LargestPixelValueInSeries", "IconImageSequence",
    "DataSetTrailingPadding", "PixelDataProviderURL", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "ModalityLUTSequence", "VOILUTSequence", "RedPaletteColorLookupTableDescriptor", "PlanarConfiguration",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod", "SourceImageSequence",
    "ReferencedSeriesSequence", "DerivationCodeSequence", "InstanceCreatorUID",
)


def write_derived_dicom(
    image: torch.Tensor, source: SeriesRef, out_dir: Path, *, series_description: str,
    derivation_description: str, series_number: int | None = None, headers: list[Dataset] | None = None,
) -> list[Path]:
    """Write ``image`` as a new derived series of ``source``'s study into ``out_dir`` (replaced atomically).

    Each output instance copies its source instance's Patient/Study/Series/Equipment attributes, gets new
    Series/SOP Instance UIDs, ImageType DERIVED\\SECONDARY, a SourceImageSequence reference, geometry
    from the image's affine and a ContributingEquipmentSequence item naming medidiff (discovery recognises
    medidiff's outputs by it and never takes them as input). Intensities are mapped back to stored values
    (MONOCHROME1 restored), keeping the source's rescale when the values fit and choosing a new one
    otherwise. Returns the written paths.

    ``headers``: one header per slice to derive from instead of the source's files, for a source with no
    DICOM (raw k-space: ``medidiff.io.kspace_series.mr_headers``). Such a series references no source
    image, and its values, of arbitrary units, are scaled onto the stored range.
    """
    volume = _volume(image)
    template = headers is not None
    headers = headers if template else [read_header(f) for f in source.files]
    meta = getattr(image, "meta", {}) or {}
    if meta.get("medidiff_inverted"):
        lo, hi = meta["medidiff_range"]
        volume = (lo + hi) - volume
    affine = affine_of(image)
    series_uid = generate_uid()
    number = series_number if series_number is not None else int(headers[0].get("SeriesNumber", 0) or 0) + 1000
    multi_frame = len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) > 1
    slices = 1 if multi_frame or volume.ndim == 2 else volume.shape[2]
    stored, rescale = _quantise(volume, headers[0], arbitrary_units=template)
    source_affine = dicom_affine(headers, slices)
    same_grid = slices == len(headers) and np.allclose(affine, source_affine, atol=1e-4)
    offsets = _slice_offsets(headers, affine, source_affine, slices)
    now = dt.datetime.now()
    written = []
    with atomic_dir(out_dir) as tmp:
        for k in range(slices):
            src = headers[min(round(k * len(headers) / slices), len(headers) - 1)]
            pixels = stored if multi_frame or stored.ndim == 2 else stored[:, :, k]
            ds = _derived(src, pixels, rescale, None if same_grid else affine, offsets[k], headers[0], now,
                          reference=not template)
            ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, number
            ds.SeriesDescription = series_description[:64]
            ds.DerivationDescription = derivation_description[:1024]
            _contributing_equipment(ds, now, derivation_description)
            ds.InstanceNumber = k + 1
            name = f"IM{k + 1:05d}.dcm"
            pydicom.dcmwrite(tmp / name, ds, enforce_file_format=True)
            written.append(Path(out_dir) / name)
    return written


def write_nifti(image: torch.Tensor, path: str | Path) -> Path:
    """Write ``image`` (channel first) as NIfTI with its RAS affine; atomic."""
    import nibabel as nib

    path = Path(path)
    array = _as_numpy(image)
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    with atomic_write(path) as tmp:
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine_of(image)), str(tmp) + ".nii.gz")
        Path(str(tmp) + ".nii.gz").replace(tmp)
    return path


def write_png(image: torch.Tensor, path: str | Path, *, window: tuple[float, float] | None = None) -> Path:
    """Write the middle slice as an 8-bit greyscale PNG (rows down; percentile window unless given).

    No text chunks are written (nothing about the method or the patient); atomic.
    """
    from PIL import Image

    plane = display_slice(image)
    lo, hi = window if window is not None else percentile_window(plane)
    pixels = np.clip((plane - lo) / max(hi - lo, 1e-12) * 255 + 0.5, 0, 255).astype(np.uint8)
    with atomic_write(path) as tmp:
        Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
    return Path(path)


def write_panel(
    before: torch.Tensor, after: torch.Tensor, path: str | Path, *,
    titles: tuple[str, str] = ("before", "after"), extra: dict | None = None,
) -> Path:
    """Write a before | after | difference (| extra) panel of the middle slices as PNG; atomic."""
    fig = before_after_figure(before, after, titles=titles, extra=extra)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def _as_numpy(image) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return array.astype(np.float64)


def _volume(image) -> np.ndarray:
    """The single channel of ``image`` as (cols, rows[, slices]) float64; refuses NaNs and channels."""
    array = _as_numpy(image)
    if array.ndim not in (3, 4) or array.shape[0] != 1:
        raise OutputError(f"DICOM output needs a single-channel (1, cols, rows[, slices]) image, got {array.shape}")
    if not np.isfinite(array).all():
        raise OutputError("the image to write holds NaN or infinite values")
    return array[0]


def affine_of(image) -> np.ndarray:
    """The RAS affine of ``image`` (its ``affine`` or ``meta["affine"]``; identity without one)."""
    affine = getattr(image, "affine", None)
    if affine is None:
        affine = (getattr(image, "meta", {}) or {}).get("affine")
    return np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)


def _bits(header: Dataset) -> tuple[int, int, int]:
    """(BitsAllocated, BitsStored, PixelRepresentation) for the output: the source's if 8/16-bit, else 16."""
    allocated = int(header.get("BitsAllocated", 16))
    stored = int(header.get("BitsStored", allocated))
    if allocated not in (8, 16) or stored > allocated:
        allocated, stored = 16, 16
    return allocated, stored, int(header.get("PixelRepresentation", 0) or 0)


def _ds(value: float) -> float:
    """``value`` as it survives a DS string (16 characters)."""
    return float(format_number_as_ds(float(value)))


def _quantise(volume: np.ndarray, header: Dataset, *, arbitrary_units: bool = False
              ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Stored integer values for ``volume`` and the (slope, intercept) to write (None: write none);
    ``arbitrary_units``: values without a unit to keep, always stretched over the stored range."""
    _, bits, signed = _bits(header)
    smin, smax = stored_range(bits, bool(signed))
    has_rescale = "RescaleSlope" in header
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    candidate = np.rint((volume - intercept) / slope)
    if not arbitrary_units and candidate.min() >= smin and candidate.max() <= smax:
        return candidate, (slope, intercept) if has_rescale else None
    vmin, vmax = float(volume.min()), float(volume.max())
    fixed = arbitrary_units or str(header.get("SOPClassUID", "")) in FIXED_RESCALE_SOP or (
        not has_rescale and str(header.get("Modality", "")) in NO_RESCALE_MODALITIES)
    if fixed:  # identity Modality LUT required: stretch the values over the stored range
        scale = (smax - smin) / (vmax - vmin) if vmax > vmin else 1.0
        return np.rint((volume - vmin) * scale + smin), (1.0, 0.0) if has_rescale else None
    slope = _ds((vmax - vmin) / (smax - smin)) if vmax > vmin else 1.0
    slope = slope or 1.0
    intercept = _ds(vmin - slope * smin)
    return np.clip(np.rint((volume - intercept) / slope), smin, smax), (slope, intercept)


def _derived(src: Dataset, pixels: np.ndarray, rescale, affine: np.ndarray | None, offset: np.ndarray,
             first: Dataset, now: dt.datetime, *, reference: bool = True) -> Dataset:
    """A derived instance built from ``src``'s header with ``pixels`` (cols, rows[, frames]).

    ``affine`` None means the image is still on the source grid: ``src``'s geometry is kept as is.
    ``reference``: point at ``src`` as the source image (False for a template header, which is none).
    """
    ds = Dataset()  # a fresh dataset: no source encoding (e.g. big endian) carried over
    for element in src:
        ds.add(copy.deepcopy(element))
    ds.remove_private_tags()
    for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x60FF or 0x5000 <= t.group <= 0x50FF]:
        del ds[tag]
    for keyword in DROP:
        if keyword in ds:
            delattr(ds, keyword)
    if "PixelAspectRatio" in ds:  # square pixels are implied; a stale or empty ratio is an error
        del ds.PixelAspectRatio
    _series_laterality(ds)
    source_rows, source_cols = int(src.Rows), int(src.Columns)
    frames = pixels.shape[2] if pixels.ndim == 3 else 1
    ds.SOPInstanceUID = generate_uid()
    image_type = [str(v) for v in (src.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    if _lossy(src):
        ds.LossyImageCompression = "01"
    if reference:
        _reference(ds, src)
    _pixel_module(ds, pixels, rescale, first)
    if frames > 1:
        ds.NumberOfFrames = frames
    if affine is not None:
        _geometry(ds, src, affine, offset, source_rows, source_cols)
    _drop_uncalibrated_spacing(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    return ds


def _contributing_equipment(ds: Dataset, now: dt.datetime, description: str) -> None:
    """Append medidiff as processing equipment to the ContributingEquipmentSequence (the source's kept)."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "109102", "DCM", "Processing Equipment"
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    item.Manufacturer = MEDIDIFF_MANUFACTURER
    item.SoftwareVersions = __version__
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = description[:1024]
    ds.ContributingEquipmentSequence = Sequence([*(ds.get("ContributingEquipmentSequence") or []), item])


def _drop_uncalibrated_spacing(ds: Dataset) -> None:
    """Omit a radiograph's 0\\0 pixel spacing (its "not calibrated", invalid as written; read as absent)."""
    if "ImageOrientationPatient" in ds:
        return
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            zero = keyword in ds and not any(float(v) for v in as_list(ds[keyword].value))
        except (TypeError, ValueError):
            continue
        if zero:
            del ds[keyword]


def _series_laterality(ds: Dataset) -> None:
    """Drop an empty Series Laterality (type 2C) from projection images, where its condition fails."""
    projection = str(ds.get("Modality", "")) in PROJECTION_MODALITIES or "ImageLaterality" in ds
    if projection and "Laterality" in ds and not ds.Laterality:
        del ds.Laterality


def _lossy(ds: Dataset) -> bool:
    syntax = transfer_syntax(ds)
    return syntax.is_compressed and syntax not in (
        pydicom.uid.RLELossless, pydicom.uid.JPEGLossless, pydicom.uid.JPEGLosslessSV1,
        pydicom.uid.JPEGLSLossless, pydicom.uid.JPEG2000Lossless)


def _reference(ds: Dataset, src: Dataset) -> None:
    """SourceImageSequence and ReferencedSeriesSequence pointing at ``src``."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceImageSequence = Sequence([ref])
    instance = Dataset()
    instance.ReferencedSOPClassUID = src.SOPClassUID
    instance.ReferencedSOPInstanceUID = src.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = src.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence([instance])
    ds.ReferencedSeriesSequence = Sequence([series])


def _pixel_module(ds: Dataset, pixels: np.ndarray, rescale, first: Dataset) -> None:
    """Image Pixel module (uncompressed) plus Modality LUT attributes."""
    allocated, bits, signed = _bits(first)
    dtype = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16}[(allocated, signed)]
    frames = np.moveaxis(pixels, -1, 0) if pixels.ndim == 3 else pixels[None]
    data = np.ascontiguousarray(np.transpose(frames, (0, 2, 1))).astype(dtype)  # (frames, rows, cols)
    ds.Rows, ds.Columns = data.shape[1], data.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = str(first.PhotometricInterpretation)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits, bits - 1, signed
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in ds:
            delattr(ds, keyword)
    if rescale is not None:
        ds.RescaleIntercept = format_number_as_ds(float(rescale[1]))
        ds.RescaleSlope = format_number_as_ds(float(rescale[0]))
        if "RescaleType" in first:
            ds.RescaleType = first.RescaleType
    ds.PixelData = data.tobytes()
    ds["PixelData"].VR = "OW" if allocated > 8 else "OB"


def _slice_offsets(headers: list[Dataset], affine: np.ndarray, source_affine: np.ndarray, slices: int) -> list:
    """Each output slice's LPS offset from the first: the source slices' true offsets while the slice axis is
    the source's (an in-plane resample of an irregularly spaced series keeps its positions), else even steps."""
    step = (RAS_TO_LPS @ affine)[:3, 2]
    positions = [header_geometry(ds)[1] for ds in headers]
    if (slices == len(headers) > 1 and None not in positions
            and np.allclose(affine[:3, 2], source_affine[:3, 2], atol=1e-4)):
        first = np.asarray(positions[0], float)
        return [np.asarray(p, float) - first for p in positions]
    return [k * step for k in range(slices)]


def _geometry(ds: Dataset, src: Dataset, affine: np.ndarray, offset: np.ndarray, source_rows: int,
              source_cols: int) -> None:
    """Plane geometry from the image affine (``offset``: this slice's LPS offset from the first) when the
    source has it; else scale the source's spacing."""
    if "ImageOrientationPatient" in src and "ImagePositionPatient" in src:
        lps = RAS_TO_LPS @ affine
        dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
        row_dir, col_dir = lps[:3, 0] / dc, lps[:3, 1] / dr
        position = lps[:3, 3] + offset
        ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
        ds.PixelSpacing = [format_number_as_ds(float(dr)), format_number_as_ds(float(dc))]
        if "SliceLocation" in ds:
            ds.SliceLocation = format_number_as_ds(float(np.dot(np.cross(row_dir, col_dir), position)))
        return
    if "SharedFunctionalGroupsSequence" in src or "PerFrameFunctionalGroupsSequence" in src:
        _functional_group_geometry(ds, affine)
        return
    factor = (source_rows / int(ds.Rows), source_cols / int(ds.Columns))
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if keyword in src and src[keyword].value and factor != (1.0, 1.0):
            values = [float(v) for v in src[keyword].value]
            setattr(ds, keyword, [format_number_as_ds(values[0] * factor[0]),
                                  format_number_as_ds(values[1] * factor[1])])


def _functional_group_geometry(ds: Dataset, affine: np.ndarray) -> None:
    """An enhanced multi-frame image's plane geometry from the image affine: PixelSpacing in every
    PixelMeasuresSequence, and every frame's ImagePositionPatient moved as the first frame's (the grid changed
    in plane only, so the frames keep their offsets from the first)."""
    lps = RAS_TO_LPS @ affine
    spacing = [format_number_as_ds(float(np.linalg.norm(lps[:3, k]))) for k in (1, 0)]
    first = header_geometry(ds)[1]
    shift = lps[:3, 3] - np.asarray(first, float) if first is not None else np.zeros(3)
    for group in [*(ds.get("SharedFunctionalGroupsSequence") or []), *(ds.get("PerFrameFunctionalGroupsSequence") or [])]:
        for measures in group.get("PixelMeasuresSequence") or []:
            measures.PixelSpacing = spacing
        for plane in group.get("PlanePositionSequence") or []:
            position = np.asarray(plane.ImagePositionPatient, float) + shift
            plane.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
