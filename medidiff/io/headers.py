"""Reading one DICOM file's header and deciding whether medidiff can use it unaltered.

A file is refused (with a one-line reason) when it is not an image medidiff processes, when its pixel
data cannot be decoded or is truncated, and when using it would silently change values or geometry:
a zero or non-numeric RescaleSlope, an ImageOrientationPatient that is not two perpendicular unit
vectors (e.g. all zeros), a pixel spacing that is not two positive numbers (an absent one means 1 mm, as
does 0\\0, "not calibrated", in a radiograph without patient coordinates),
1-bit pixel data, or a side more than ``MAX_ASPECT`` times the other. Header values quoted in reasons
are escaped and capped (``medidiff.io.text``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medidiff.io.text import clean_text, exception_text

log = logging.getLogger(__name__)

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
DICOMDIR_SOP = "1.2.840.10008.1.3.10"
# SOP class UID prefixes of objects that carry no image for medidiff, with the reason.
NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation/registration/surface object",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
}
GREYSCALE = {"MONOCHROME1", "MONOCHROME2"}
# pip packages that provide a decoder, per pydicom plugin name.
PLUGIN_PACKAGES = {
    "pylibjpeg": "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle",
    "gdcm": "python-gdcm",
    "pillow": "pillow",
    "pyjpegls": "pyjpegls",
}
MAX_PIXELS = 2**31  # larger series are refused as absurd
MAX_ASPECT = 64  # a longer side over 64x the shorter is a line, not an image (and breaks resizing/panels)
BITS_ALLOCATED = (8, 16, 32)  # 1-bit (bitmap) and odd sizes are refused
# ImageOrientationPatient must be two unit vectors at a right angle, within this tolerance.
ORIENTATION_TOLERANCE = 0.05


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log lines about sloppy headers (noise here: what matters is refused)."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_header(file: Path) -> pydicom.Dataset:
    """The header of ``file`` without pixel data, quietly (loading and writing use it)."""
    with quiet_pydicom():
        return pydicom.dcmread(file, stop_before_pixels=True, force=True)


def transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The dataset's transfer syntax (implicit VR little endian when it has no file meta)."""
    meta = getattr(ds, "file_meta", None)
    return UID(meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian) if meta else
               pydicom.uid.ImplicitVRLittleEndian)


def header_geometry(ds: pydicom.Dataset, frame: int = 0):
    """ImageOrientationPatient, ImagePositionPatient and PixelSpacing, also from enhanced functional groups."""
    groups = [ds]
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(name)
        if seq:
            groups.append(seq[min(frame, len(seq) - 1)] if name.startswith("Per") else seq[0])

    def find(keyword, container):
        for group in groups:
            if keyword in group:
                return group[keyword].value
            inner = group.get(container)
            if inner and keyword in inner[0]:
                return inner[0][keyword].value
        return None

    iop = find("ImageOrientationPatient", "PlaneOrientationSequence")
    ipp = find("ImagePositionPatient", "PlanePositionSequence")
    spacing = [find("PixelSpacing", "PixelMeasuresSequence"), ds.get("ImagerPixelSpacing")]
    if iop is None:  # a radiograph (CR/DX) with no patient coordinates writes 0\0 for "not calibrated"
        spacing = [v for v in spacing if _numbers(v) is None or any(_numbers(v))]
    return iop, ipp, next((v for v in spacing if v), None)


def _read(file: Path) -> pydicom.Dataset:
    """Read everything but large values (deferred)."""
    try:
        return pydicom.dcmread(file, defer_size="64 KB")
    except InvalidDicomError:
        ds = pydicom.dcmread(file, defer_size="64 KB", force=True)
        if "SOPClassUID" not in ds:
            raise
        log.debug("a file lacks the DICM preamble but parses as DICOM")
        return ds


def read_checked(file: Path) -> pydicom.Dataset | str:
    """The header of ``file`` if it is an image medidiff can use unaltered, else the reason why not (one line).

    Call it within ``quiet_pydicom()``: the headers it meets are often sloppy.
    """
    try:
        ds = _read(file)
    except InvalidDicomError:
        return "not a DICOM file (no DICM preamble)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or type(exc).__name__}"
    except (EOFError, ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        if file.stat().st_size < 132:
            return "not a DICOM file (too short)"
        return f"truncated file: the header cannot be read ({exception_text(exc, file)})"
    sop = str(ds.get("SOPClassUID", ""))
    if sop == DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        return "DICOMDIR (a media index, not an image); the images it references are scanned instead"
    kind = _non_image_kind(sop)
    if not any(tag in ds for tag in PIXEL_TAGS):
        return (f"no pixel data (e.g. a structured report or presentation state): {f'{kind}, ' if kind else ''}"
                f"SOP class {clean_text(UID(sop).name) if sop else '(none)'}")
    if kind:
        return f"{clean_text(UID(sop).name)} is {kind}, not an image medidiff processes"
    return _pixel_problem(ds, file) or _value_problem(ds) or _geometry_problem(ds) or ds


def _non_image_kind(sop: str) -> str | None:
    return next((kind for prefix, kind in NON_IMAGE_SOP_PREFIXES.items() if sop.startswith(prefix)), None)


def _pixel_problem(ds: pydicom.Dataset, file: Path) -> str | None:
    """Why the pixel data cannot be used (colour, size, bit depth, decoder, truncation), or None."""
    if 0x7FE00010 not in ds:
        return "float pixel data (parametric map) is not supported"
    photometric = clean_text(ds.get("PhotometricInterpretation", ""))
    if not photometric:
        return "image header lacks PhotometricInterpretation"
    if photometric not in GREYSCALE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return f"colour image ({photometric}): medidiff processes greyscale images only"
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, ValueError, TypeError):
        return "image header lacks a valid Rows, Columns, BitsAllocated or NumberOfFrames"
    if min(rows, cols, frames) < 1 or rows * cols * frames > MAX_PIXELS:
        return f"absurd image size {rows}x{cols}x{frames}"
    if max(rows, cols) > MAX_ASPECT * min(rows, cols):
        return (f"image of {rows}x{cols} pixels is a line, not an image: medidiff refuses sides more than "
                f"{MAX_ASPECT} times longer than the other")
    if bits not in BITS_ALLOCATED:
        return (f"{bits}-bit pixel data (BitsAllocated {bits}, e.g. a bitmap overlay or segmentation): "
                "medidiff processes 8-, 16- and 32-bit greyscale images only")
    syntax = transfer_syntax(ds)
    problem = _decoder_problem(syntax)
    if problem:
        return problem
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    if not (syntax.is_compressed or syntax.is_deflated) and element.length != 0xFFFFFFFF:
        expected = (rows * cols * frames * bits + 7) // 8
        size = file.stat().st_size
        end = getattr(element, "value_tell", None)
        if element.length < expected:
            return f"truncated file: pixel data holds {element.length} bytes, expected {expected}"
        if end is not None and end + expected > size:
            return (f"truncated file: pixel data needs {expected} bytes but the file ends "
                    f"{max(size - end, 0)} bytes into it")
    return None


def _decoder_problem(syntax: UID) -> str | None:
    """Why no installed plugin can decode ``syntax``, or None."""
    if not syntax.is_compressed:
        return None
    from pydicom.pixels import get_decoder

    name = clean_text(syntax.name)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported transfer syntax {name}: no decoder exists for it in pydicom"
    if decoder.is_available:
        return None
    plugins = [p for p in PLUGIN_PACKAGES if p in str(decoder.missing_dependencies)]
    packages = " or ".join(PLUGIN_PACKAGES[p] for p in plugins) or "a pydicom decoder plugin"
    return f"unsupported transfer syntax {name}: install {packages} (pip install ...)"


def _numbers(value) -> list[float] | None:
    """``value`` (a DICOM DS/multi-value) as floats, or None when any is not a number."""
    try:
        return [float(v) for v in as_list(value)]
    except (TypeError, ValueError):
        return None


def _value_problem(ds: pydicom.Dataset) -> str | None:
    """Why the Modality LUT would silently change the values (a zero or non-finite slope), or None."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        numbers = _numbers(value)
        if numbers is None or len(numbers) != 1 or not math.isfinite(numbers[0]):
            return f"{keyword} {_shown(value)} is not a number; the pixel values cannot be trusted"
        if keyword == "RescaleSlope" and numbers[0] == 0:
            return "RescaleSlope is 0: every pixel would become RescaleIntercept (a blank image); fix the header"
    return None


def _geometry_problem(ds: pydicom.Dataset) -> str | None:
    """Why the geometry would be wrong or crash (zero orientation, non-positive spacing), or None.

    An absent PixelSpacing means 1 mm (as in many secondary captures); a present but invalid one is refused.
    """
    iop, ipp, spacing = header_geometry(ds)
    if iop is not None:
        values = _numbers(iop)
        if values is None or len(values) != 6 or not all(map(math.isfinite, values)):
            return "ImageOrientationPatient is not six numbers; the image cannot be placed in space"
        row, col = np.asarray(values[:3]), np.asarray(values[3:])
        if (abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOLERANCE
                or abs(float(row @ col)) > ORIENTATION_TOLERANCE):
            return (f"ImageOrientationPatient {_shown(iop)} is not two perpendicular unit vectors "
                    "(e.g. all zeros); the image cannot be placed in space")
    if ipp is not None:
        values = _numbers(ipp)
        if values is None or len(values) != 3 or not all(map(math.isfinite, values)):
            return "ImagePositionPatient is not three numbers; the image cannot be placed in space"
    if spacing is not None and spacing != "":
        values = _numbers(spacing)
        if values is None or len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
            return (f"pixel spacing {_shown(spacing)} is not two positive numbers; medidiff will "
                    "not guess the pixel size (fix PixelSpacing/ImagerPixelSpacing)")
    return None


def _shown(value) -> str:
    """A header value as DICOM writes it (multiple values joined by backslashes), safe to print."""
    return clean_text("\\".join(str(v) for v in as_list(value)))


def as_list(value) -> list:
    """A DICOM value as a list (multi-values as they are, a single value wrapped)."""
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
