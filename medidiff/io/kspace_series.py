"""Raw k-space files as pipeline series: what discovery says of them, the image loading gives, and the
DICOM MR headers their reconstruction is written with (there is no source DICOM to derive one from).

A k-space file (:mod:`medidiff.io.kspace`) is one MR series whose ``source_format`` is ``k-space``.
Loading gives the zero-filled image, the root-sum-of-squares of the coil images of the k-space as
stored, in the pipeline layout ``(1, cols, rows[, slices])``: k-space ``(H, W)`` is (rows, columns).
Geometry: a stack of axial slices centred on the scanner origin, row and column spacing from the
ISMRMRD encoded field of view (its x along H, y along W) and its z as the slice thickness and step
(ISMRMRD's 2-D convention; the slice gap is not in the file); without one, 1 mm.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from medidiff.errors import InputError
from medidiff.io.kspace import SUFFIXES, KSpace, read_kspace
from medidiff.io.privacy import current_salt, hash_identifier
from medidiff.io.volumes import LPS_TO_RAS

KSPACE_FORMAT = "k-space"
NO_FIELD_OF_VIEW = ("the k-space file gives no field of view (ISMRMRD header): the DICOM series is written "
                    "with 1 mm pixels and 1 mm slices")


def is_kspace_file(path: Path) -> bool:
    """True for the file names :func:`medidiff.io.kspace.read_kspace` reads (.h5, .hdf5, .npy)."""
    return path.suffix.lower() in SUFFIXES


def _reason(exc: InputError, path: Path) -> str:
    """``read_kspace``'s message without the file's path (paths may name patients; reports are shared)."""
    rest = str(exc).removeprefix(str(path))
    return rest[2:] if rest.startswith(": ") else f"the file{rest}"


def describe_kspace(path: Path) -> dict | str:
    """Facts for the file's ``SeriesRef`` after reading and checking it whole, else the reason to refuse it."""
    try:
        kspace = read_kspace(path)
    except InputError as exc:
        return _reason(exc, path)
    slices, coils, rows, columns = kspace.kspace.shape
    sampling = "sampling mask given" if kspace.mask is not None else "no sampling mask"
    return {"format": "NumPy .npy" if path.suffix.lower() == ".npy" else "fastMRI HDF5",
            "rows": rows, "columns": columns, "frames": slices,
            "series_description": f"k-space, {coils} coil{'s' * (coils > 1)}, {sampling}"}


def read_series_kspace(series) -> KSpace:
    """The k-space of a discovered k-space ``SeriesRef``; errors name the file by its hash, never its path."""
    file = series.files[0]
    try:
        return read_kspace(file)
    except InputError as exc:  # the file changed since discovery proved it readable
        raise InputError(f"series {series.key}, file {series.file_id(file)}: {_reason(exc, file)}") from None


def field_of_view(kspace: KSpace) -> tuple[float, float, float] | None:
    """The file's encoded field of view (mm along H, W and the slice) when every value is usable, else None."""
    fov = kspace.field_of_view_mm
    return fov if fov is not None and all(math.isfinite(v) and v > 0 for v in fov) else None


def kspace_affine(kspace: KSpace) -> np.ndarray:
    """RAS affine of the zero-filled image ``(cols, rows, slices)``: axial slices centred on the origin."""
    slices, _, rows, columns = kspace.kspace.shape
    fov = field_of_view(kspace)
    dr, dc, dz = (fov[0] / rows, fov[1] / columns, fov[2]) if fov else (1.0, 1.0, 1.0)
    lps = np.diag([dc, dr, dz, 1.0])
    lps[:3, 3] = -np.array([(columns - 1) * dc, (rows - 1) * dr, (slices - 1) * dz]) / 2
    return LPS_TO_RAS @ lps


def zero_filled_volume(kspace: KSpace) -> np.ndarray:
    """The zero-filled image: float32 ``(cols, rows[, slices])``, root-sum-of-squares over coils."""
    from medidiff.physics.measurements import ifft2c, rss

    images = rss(ifft2c(kspace.kspace))[:, 0]  # (slices, H, W)
    volume = images.permute(2, 1, 0).numpy().astype(np.float32)
    return volume[..., 0] if volume.shape[-1] == 1 else volume


def _uid(series, purpose: str) -> str:
    """A UID stable for this file under the output's salt (re-runs keep their study), not traceable to it."""
    return generate_uid(entropy_srcs=[current_salt(), purpose, series.study_uid])


def mr_headers(series, affine: np.ndarray, shape: tuple[int, ...]) -> list[Dataset]:
    """One MR Image header per slice of an image of spatial ``shape`` (cols, rows[, slices]) placed by the
    RAS ``affine``, for :func:`medidiff.io.writers.write_derived_dicom` to derive the series from.

    Anonymous: PatientName empty, PatientID a salted hash of the file's relative path; the study
    and frame of reference UIDs are new, stable per file under the output folder's salt. Acquisition
    parameters the file does not hold are written empty (type 2) and the sequence as research mode.
    """
    lps = LPS_TO_RAS @ affine  # the flip is its own inverse: RAS -> LPS
    dc, dr, dz = (float(np.linalg.norm(lps[:3, i])) for i in range(3))
    orientation = [*(lps[:3, 0] / dc), *(lps[:3, 1] / dr)]
    study, frame = _uid(series, "k-space study"), _uid(series, "k-space frame of reference")
    headers = []
    for k in range(shape[2] if len(shape) == 3 else 1):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.PatientName, ds.PatientID = "", hash_identifier(f"k-space patient:{series.study_uid}")
        ds.PatientBirthDate = ds.PatientSex = ""
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame
        ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
        ds.Modality, ds.Laterality, ds.PatientPosition = "MR", "", ""
        ds.Manufacturer, ds.PositionReferenceIndicator = "", ""
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in orientation]
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.PixelSpacing = [format_number_as_ds(dr), format_number_as_ds(dc)]
        ds.SliceThickness = format_number_as_ds(dz)
        ds.Rows, ds.Columns = int(shape[1]), int(shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "2D"
        ds.ScanOptions = ds.EchoTime = ds.EchoTrainLength = ds.RepetitionTime = ""
        headers.append(ds)
    return headers
