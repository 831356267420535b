"""Header-only scan of a DICOM source: group files into series, refuse the rest with a reason."""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medidiff.errors import InputError
from medidiff.io.privacy import hash_identifier

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


@dataclass
class SeriesRef:
    """One image series found on disk (identifiers kept for writing, never logged)."""

    study_uid: str
    series_uid: str
    patient_hash: str
    modality: str
    body_part: str
    image_type: tuple[str, ...]
    view_position: str
    rows: int
    columns: int
    frames: int
    photometric: str
    transfer_syntaxes: tuple[str, ...]
    files: list[Path] = field(default_factory=list)
    series_description: str = ""

    @property
    def key(self) -> str:
        """Short hash of the SeriesInstanceUID: safe to log and to name output folders."""
        return hash_identifier(self.series_uid)

    @property
    def is_3d(self) -> bool:
        """True for a stack of slices or a multi-frame instance (the image gets a slice axis)."""
        return self.frames > 1

    def to_public_dict(self) -> dict:
        """A JSON-ready description without patient-identifying information (UIDs hashed)."""
        return {
            "key": self.key, "study": hash_identifier(self.study_uid), "patient": self.patient_hash,
            "modality": self.modality, "body_part": self.body_part, "image_type": list(self.image_type),
            "view_position": self.view_position, "rows": self.rows, "columns": self.columns,
            "frames": self.frames, "photometric": self.photometric,
            "transfer_syntaxes": list(self.transfer_syntaxes), "instances": len(self.files),
            "series_description": self.series_description,
        }


@dataclass
class Refusal:
    """A file that cannot be used, with a specific human-readable reason."""

    path: str
    reason: str


@dataclass
class Inventory:
    """What a source holds: usable series and refused files."""

    root: Path
    series: list[SeriesRef] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def summary_rows(self) -> list[tuple[str, ...]]:
        """Table rows (header first) for the CLI; no patient information."""
        rows = [("patient", "study", "series", "modality", "body part", "view", "size", "frames",
                 "transfer syntax", "description")]
        for s in sorted(self.series, key=lambda s: (s.patient_hash, s.study_uid)):
            rows.append((
                s.patient_hash, hash_identifier(s.study_uid), s.key, s.modality or "?", s.body_part or "-",
                s.view_position or "-", f"{s.rows}x{s.columns}", str(s.frames),
                ", ".join(s.transfer_syntaxes) or "-", s.series_description or "-",
            ))
        return rows

    def studies(self) -> dict[str, list[SeriesRef]]:
        """Series grouped by StudyInstanceUID (keys are the raw UIDs; hash them before logging)."""
        grouped: dict[str, list[SeriesRef]] = defaultdict(list)
        for s in self.series:
            grouped[s.study_uid].append(s)
        return dict(grouped)


@contextmanager
def open_source(path: str | Path) -> Iterator[Path]:
    """Yield a path ``discover`` can scan: a .zip is extracted to a temporary folder removed afterwards."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if not (path.is_file() and zipfile.is_zipfile(path)):
        yield path
        return
    tmp = extract_zip(path)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_zip(path: Path) -> Path:
    """Extract ``path`` into a temporary folder that is removed when the process exits."""
    tmp = Path(tempfile.mkdtemp(prefix="medidiff-zip-"))
    atexit.register(shutil.rmtree, tmp, True)
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.infolist():  # refuse path traversal
                if not (tmp / member.filename).resolve().is_relative_to(tmp.resolve()):
                    raise InputError(f"zip {path} holds an unsafe path {member.filename!r}")
            zf.extractall(tmp)
    except zipfile.BadZipFile as exc:
        raise InputError(f"zip {path} cannot be read: {exc}") from exc
    return tmp


def discover(path: str | Path) -> Inventory:
    """Scan a folder (recursively), a single file, a DICOMDIR or a .zip; group images into series."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_file() and zipfile.is_zipfile(path):
        inventory = discover(extract_zip(path))
        inventory.root = path
        return inventory
    root = path if path.is_dir() else path.parent
    inventory = Inventory(root=path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise InputError(f"input folder {path} is empty")
    else:
        files = _dicomdir_files(path, root, inventory.refused) or [path]
    headers = []
    for file in files:
        header = _read_header(file, _rel(file, root))
        if isinstance(header, Refusal):
            inventory.refused.append(header)
        else:
            headers.append((file, header))
    inventory.series = _group(headers, root, inventory.refused)
    return inventory


def _rel(file: Path, root: Path) -> str:
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)


def _dicomdir_files(path: Path, root: Path, refused: list[Refusal]) -> list[Path]:
    """Files referenced by ``path`` if it is a DICOMDIR (missing ones are refused), else []."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return []
    if "DirectoryRecordSequence" not in ds:
        return []
    files = []
    for record in ds.DirectoryRecordSequence:
        ref = record.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        file = path.parent.joinpath(*parts)
        if file.is_file():
            files.append(file)
        else:
            refused.append(Refusal(_rel(file, root), "referenced by the DICOMDIR but missing"))
    if not files and not refused:
        raise InputError(f"DICOMDIR {path} references no files")
    return files


def _read(file: Path) -> pydicom.Dataset:
    """Read everything but large values (deferred), quietly: warnings about sloppy headers are noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(file, defer_size="64 KB")
        except InvalidDicomError:
            ds = pydicom.dcmread(file, defer_size="64 KB", force=True)
            if "SOPClassUID" not in ds:
                raise
            log.debug("%s lacks the DICM preamble but parses as DICOM", file.name)
            return ds


def _read_header(file: Path, rel: str) -> pydicom.Dataset | Refusal:
    """The header of ``file`` if it is a usable image, else a Refusal saying why."""
    try:
        ds = _read(file)
    except InvalidDicomError:
        return Refusal(rel, "not a DICOM file (no DICM preamble)")
    except (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        if file.stat().st_size < 132:
            return Refusal(rel, "not a DICOM file (too short)")
        return Refusal(rel, f"truncated file: the header cannot be read ({type(exc).__name__}: {exc})"[:300])
    sop = str(ds.get("SOPClassUID", ""))
    if sop == DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        return Refusal(rel, "DICOMDIR (a media index, not an image); the images it references are scanned instead")
    if not any(tag in ds for tag in PIXEL_TAGS):
        what = f"{_non_image_kind(sop)}, " if _non_image_kind(sop) else ""
        return Refusal(rel, f"no pixel data (e.g. a structured report or presentation state): {what}"
                            f"SOP class {UID(sop).name if sop else '(none)'}")
    kind = _non_image_kind(sop)
    if kind:
        return Refusal(rel, f"{UID(sop).name} is {kind}, not an image medidiff processes")
    return _check_pixels(ds, file, rel)


def _non_image_kind(sop: str) -> str | None:
    return next((kind for prefix, kind in NON_IMAGE_SOP_PREFIXES.items() if sop.startswith(prefix)), None)


def _check_pixels(ds: pydicom.Dataset, file: Path, rel: str) -> pydicom.Dataset | Refusal:
    """Refuse colour, undecodable or truncated pixel data; return ``ds`` when it looks loadable."""
    if 0x7FE00010 not in ds:
        return Refusal(rel, "float pixel data (parametric map) is not supported")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if not photometric:
        return Refusal(rel, "image header lacks PhotometricInterpretation")
    if photometric not in GREYSCALE or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return Refusal(rel, f"colour image ({photometric}): "
                            "medidiff processes greyscale images only")
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, ValueError, TypeError):
        return Refusal(rel, "image header lacks a valid Rows, Columns, BitsAllocated or NumberOfFrames")
    if min(rows, cols, frames) < 1 or rows * cols * frames > MAX_PIXELS:
        return Refusal(rel, f"absurd image size {rows}x{cols}x{frames}")
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)
                 if hasattr(ds, "file_meta") else pydicom.uid.ImplicitVRLittleEndian)
    refusal = _check_decoder(syntax, rel)
    if refusal:
        return refusal
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    if not (syntax.is_compressed or syntax.is_deflated) and element.length != 0xFFFFFFFF:
        expected = (rows * cols * frames * bits + 7) // 8
        size = file.stat().st_size
        end = getattr(element, "value_tell", None)
        if element.length < expected:
            return Refusal(rel, f"truncated file: pixel data holds {element.length} bytes, expected {expected}")
        if end is not None and end + expected > size:
            return Refusal(rel, f"truncated file: pixel data needs {expected} bytes but the file ends "
                                f"{max(size - end, 0)} bytes into it")
    return ds


def _check_decoder(syntax: UID, rel: str) -> Refusal | None:
    """A Refusal when no installed plugin can decode ``syntax``."""
    if not syntax.is_compressed:
        return None
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return Refusal(rel, f"unsupported transfer syntax {syntax.name}: no decoder exists for it in pydicom")
    if decoder.is_available:
        return None
    plugins = [name for name in PLUGIN_PACKAGES if name in str(decoder.missing_dependencies)]
    packages = " or ".join(PLUGIN_PACKAGES[p] for p in plugins) or "a pydicom decoder plugin"
    return Refusal(rel, f"unsupported transfer syntax {syntax.name}: install {packages} (pip install ...)")


def _group(headers: list[tuple[Path, pydicom.Dataset]], root: Path, refused: list[Refusal]) -> list[SeriesRef]:
    """Group readable image headers by study/series; refuse duplicates and misfits within a series."""
    groups: dict[tuple[str, str], list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for file, ds in headers:
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not study or not series:
            refused.append(Refusal(_rel(file, root), "no StudyInstanceUID/SeriesInstanceUID"))
            continue
        groups[(study, series)].append((file, ds))
    result = []
    for (study, series), members in groups.items():
        kept = _dedupe(members, root, refused)
        first = kept[0][1]
        frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in kept)
        result.append(SeriesRef(
            study_uid=study, series_uid=series,
            patient_hash=hash_identifier(str(first.get("PatientID", ""))),
            modality=str(first.get("Modality", "")), body_part=str(first.get("BodyPartExamined", "")),
            image_type=tuple(str(v) for v in _as_list(first.get("ImageType", []))),
            view_position=str(first.get("ViewPosition", "")),
            rows=int(first.Rows), columns=int(first.Columns), frames=frames,
            photometric=str(first.PhotometricInterpretation),
            transfer_syntaxes=tuple(sorted({UID(_syntax(ds)).name for _, ds in kept})),
            files=[f for f, _ in kept], series_description=str(first.get("SeriesDescription", "")),
        ))
    return sorted(result, key=lambda s: (s.study_uid, s.files[0]))


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _syntax(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)) if meta else \
        pydicom.uid.ImplicitVRLittleEndian


def _dedupe(members, root: Path, refused: list[Refusal]):
    """Keep one file per SOP instance and slice, of the series' size; sort along the slice normal."""
    members = sorted(members, key=lambda m: str(m[0]))
    kept, seen = [], {}
    size = (int(members[0][1].Rows), int(members[0][1].Columns))
    for file, ds in members:
        rel = _rel(file, root)
        sop = str(ds.get("SOPInstanceUID", file))
        if sop in seen:
            refused.append(Refusal(rel, f"duplicate of {seen[sop]} (same SOPInstanceUID)"))
        elif (int(ds.Rows), int(ds.Columns)) != size:
            refused.append(Refusal(rel, f"size {ds.Rows}x{ds.Columns} differs from the rest of its series "
                                        f"({size[0]}x{size[1]})"))
        else:
            seen[sop] = rel
            kept.append((file, ds))
    if len(kept) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in kept):
        for file, _ in kept[1:]:
            refused.append(Refusal(_rel(file, root), "another instance of a multi-frame series; only "
                                                      f"{_rel(kept[0][0], root)} is used"))
        return kept[:1]
    positions = [_slice_position(ds) for _, ds in kept]
    if len(kept) > 1 and all(p is not None for p in positions):
        order = sorted(range(len(kept)), key=lambda i: positions[i])
        unique = []
        for i in order:
            if unique and abs(positions[i] - positions[unique[-1]]) < 1e-4:
                refused.append(Refusal(_rel(kept[i][0], root), "same slice position as "
                                                                f"{_rel(kept[unique[-1]][0], root)}"))
            else:
                unique.append(i)
        return [kept[i] for i in unique]
    return sorted(kept, key=lambda m: (int(m[1].get("InstanceNumber", 0) or 0), str(m[0])))


def _slice_position(ds: pydicom.Dataset) -> float | None:
    """Position of the slice along its normal, or None without geometry."""
    try:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    except (AttributeError, ValueError, TypeError):
        return None
    if iop.shape != (6,) or ipp.shape != (3,):
        return None
    return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))

