"""Header-only scan of a source: group DICOM files into series, refuse the rest with a reason.

NIfTI, NRRD and MetaImage volume files (``medidiff.io.volumes``) are one series each, mixed with DICOM
or alone; their JSON sidecars are read with them, not scanned as DICOM. So are raw MRI k-space files
(``.h5``/``.hdf5`` fastMRI-style, ``.npy``; ``medidiff.io.kspace_series``): MR series of ``source_format``
``k-space``, read whole at discovery and refused with ``read_kspace``'s reason when unusable.

Inputs are treated as hostile: every file read is resolved and confined to the input root (symbolic
links and DICOMDIR references that leave it are refused without naming their target); zips are
extracted under caps (``medidiff.io.archive``); header text is escaped and capped before anything
shows it (``medidiff.io.text``); a study whose files carry different PatientIDs is refused whole,
never merged; headers whose geometry or values would be silently altered are refused with the reason.

A projection series (CR, DX, MG, ...) holds one radiograph per instance (PA and lateral, repeats, the same
image in several transfer syntaxes): each instance is a ``SeriesRef`` of its own (``instance_uid`` set),
processed image by image, never stacked into a volume. medidiff's own outputs and the reference series of
evaluation folders are found but carry a ``skip_reason``: no pipeline takes them as input.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from medidiff.errors import InputError
from medidiff.io.archive import Extraction, is_zip
from medidiff.io.headers import as_list, quiet_pydicom, read_checked, transfer_syntax
from medidiff.io.kspace_series import KSPACE_FORMAT, describe_kspace, is_kspace_file
from medidiff.io.privacy import hash_identifier
from medidiff.io.text import clean_text
from medidiff.io.volumes import describe_volume, file_digest, sidecar_of, volume_format

REFUSED_REASON_LIMIT = 300
OUTSIDE = "points outside the input folder (symbolic link or '..'); not followed"
PATH_LIMIT = 1024
# Modalities whose instances are each a radiograph of their own (never slices of one volume).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG"})
# medidiff marks the equipment item it adds to a derived image's ContributingEquipmentSequence so.
MEDIDIFF_MANUFACTURER = "medidiff"
REFERENCE_FOLDER = "reference"  # an evaluation folder's truth series (medidiff.evaluation.datasets)
# ViewCodeSequence codes (SNOMED CT, DICOM CID 4010) of the side views, as a ViewPosition would say them.
LATERAL_VIEW_CODES = {"399198007": "RL", "399173006": "LL", "399067008": "LATERAL", "399352003": "LM",
                      "399260004": "ML"}
FRONTAL_VIEW_CODES = {"272479007": "PA", "399348003": "AP"}


@dataclass
class SeriesRef:
    """One image series found on disk (identifiers kept for writing, never logged).

    Text fields hold header values already made safe to print (``clean_text``); ``root`` is the input
    root the files are confined to (their relative paths, hashed, name files in shareable messages).
    """

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
    root: Path | None = None
    keepalive: object = field(default=None, repr=False, compare=False)  # a zip extraction to keep
    source_format: str = "DICOM"  # or a volume format ("NIfTI", "NRRD", "MetaImage") or "k-space": no DICOM header
    instance_uid: str = ""  # the SOP Instance UID when this is one radiograph of a projection series
    skip_reason: str = ""  # why no pipeline takes it as input (medidiff's own output, an evaluation truth)

    @property
    def is_dicom(self) -> bool:
        """False for a research volume: nothing to derive a DICOM series from."""
        return self.source_format == "DICOM"

    @property
    def key(self) -> str:
        """Short hash of the SeriesInstanceUID (with the SOP Instance UID for one radiograph of a projection
        series): safe to log and to name output folders."""
        return hash_identifier(f"{self.series_uid}/{self.instance_uid}" if self.instance_uid else self.series_uid)

    @property
    def series_key(self) -> str:
        """Short hash of the SeriesInstanceUID alone (the series a radiograph belongs to)."""
        return hash_identifier(self.series_uid)

    @property
    def is_3d(self) -> bool:
        """True for a stack of slices or a multi-frame instance (the image gets a slice axis)."""
        return self.frames > 1

    def content_digest(self) -> str:
        """Digest of what the series holds: its instances (SOP Instance UIDs and file sizes) for DICOM, the
        file's sha256 for a volume (part of its key: a changed volume is a new series). It changes when the
        series does (the journal then redoes it)."""
        if not self.is_dicom:
            return self.series_uid.rsplit(":", 1)[1]
        parts = []
        for file in self.files:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            parts.append(f"{ds.get('SOPInstanceUID', '')}:{file.stat().st_size}")
        return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]

    def file_id(self, file: Path) -> str:
        """The shareable name of one of the files: the salted hash of its path relative to the root."""
        return file_id(relative_path(file, self.root or file.parent))

    def to_public_dict(self) -> dict:
        """A JSON-ready description without patient-identifying information (UIDs hashed)."""
        return {
            "key": self.key, "study": hash_identifier(self.study_uid), "patient": self.patient_hash,
            "modality": self.modality, "body_part": self.body_part, "image_type": list(self.image_type),
            "view_position": self.view_position, "rows": self.rows, "columns": self.columns,
            "frames": self.frames, "photometric": self.photometric,
            "transfer_syntaxes": list(self.transfer_syntaxes), "instances": len(self.files),
            "series_description": self.series_description, "series": self.series_key,
            "skip_reason": self.skip_reason,
        }


def file_id(relative: str) -> str:
    """The shareable name of a file: salted hash of its path relative to the input root."""
    return hash_identifier(f"file:{relative}")


@dataclass
class Refusal:
    """A file that cannot be used, with a specific reason (header values in it escaped and capped).

    ``path`` is relative to the input root. Folder and file names often carry patient names, so it is
    for the operator's own terminal (``medidiff inspect`` shows it, escaped, with the hash:
    ``local_line()``) and a local log (``to_local_dict()``) only; shareable reports (report.json,
    report.txt, journal) use ``to_public_dict()``/``public_line()``: the file as a salted hash (``file_id``). A reason about a second file (``other``, also a relative
    path; e.g. the file it duplicates) gets that file appended, by hash or by path.
    """

    path: str
    reason: str
    other: str | None = None

    def __post_init__(self):
        self.reason = clean_text(self.reason, REFUSED_REASON_LIMIT)

    @property
    def file_id(self) -> str:
        return file_id(self.path)

    def public_reason(self) -> str:
        """The reason with any second file named by its hash."""
        return self.reason if self.other is None else f"{self.reason}: file {file_id(self.other)}"

    def local_reason(self) -> str:
        """The reason with any second file named by its (escaped) relative path."""
        return self.reason if self.other is None else f"{self.reason}: {clean_text(self.other, PATH_LIMIT)}"

    def to_public_dict(self) -> dict:
        """For report.json/report.txt and the journal: ``{"file": hash, "reason": ...}``, no paths."""
        return {"file": self.file_id, "reason": self.public_reason()}

    def to_local_dict(self) -> dict:
        """For the operator's local, non-shared log: the public form plus the escaped relative path."""
        return {"file": self.file_id, "path": clean_text(self.path, PATH_LIMIT), "reason": self.local_reason()}

    def public_line(self) -> str:
        return f"file {self.file_id}: {self.public_reason()}"

    def local_line(self) -> str:
        return f"{clean_text(self.path, PATH_LIMIT)} (file {self.file_id}): {self.local_reason()}"


@dataclass
class Inventory:
    """What a source holds: usable series and refused files."""

    root: Path
    series: list[SeriesRef] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    keepalive: object = field(default=None, repr=False, compare=False)

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
    """Yield a path ``discover`` can scan: a .zip is extracted (``medidiff.io.archive`` caps) to a
    temporary folder removed on every exit path."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if not is_zip(path):
        yield path
        return
    extraction = Extraction(path)
    try:
        yield extraction.path
    finally:
        extraction.close()


def discover(path: str | Path) -> Inventory:
    """Scan a folder (recursively), a single file, a DICOMDIR or a .zip; group images into series.

    A .zip's extraction lives as long as the returned Inventory or any of its SeriesRefs.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if is_zip(path):
        extraction = Extraction(path)
        inventory = discover(extraction.path)
        inventory.root, inventory.keepalive = path, extraction
        for series in inventory.series:
            series.keepalive = extraction
        return inventory
    root = path if path.is_dir() else path.parent
    inventory = Inventory(root=path)
    if path.is_dir():
        files = _walk(path, inventory.refused)
        if not files and not inventory.refused:
            raise InputError(f"input folder {path} is empty")
    else:
        files = ([path] if volume_format(path) or is_kspace_file(path)
                 else _dicomdir_files(path, root, inventory.refused) or [path])
    volumes, files = _split_volumes(files)
    kspaces, files = [f for f in files if is_kspace_file(f)], [f for f in files if not is_kspace_file(f)]
    headers = []
    with quiet_pydicom():
        for file in files:
            header = _read_header(file, relative_path(file, root))
            if isinstance(header, Refusal):
                inventory.refused.append(header)
            else:
                headers.append((file, header))
        inventory.series = _group(headers, root, inventory.refused)
    for file, series_of in [*((f, _volume_series) for f in volumes), *((f, _kspace_series) for f in kspaces)]:
        found = series_of(file, root)
        (inventory.refused if isinstance(found, Refusal) else inventory.series).append(found)
    return inventory


def _split_volumes(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(volume files, the other files less the volumes' JSON sidecars)."""
    volumes = [f for f in files if volume_format(f)]
    sidecars = {sidecar_of(f) for f in volumes}
    return volumes, [f for f in files if f not in sidecars and not volume_format(f)]


def _volume_series(file: Path, root: Path) -> SeriesRef | Refusal:
    """A research volume as a series of its own, or the reason it is refused.

    Its key hashes the relative path and the file's sha256: files of the same name in different inputs
    run into one output folder never share an output, and a changed file is a new series."""
    rel = relative_path(file, root)
    sidecar = sidecar_of(file)
    usable = sidecar.exists() and _confinement_problem(sidecar, root.resolve()) is None  # else refused by _walk
    facts = describe_volume(file, sidecar if usable else None)
    if isinstance(facts, str):
        return Refusal(rel, facts)
    return SeriesRef(
        study_uid=f"volumes:{Path(rel).parent}", series_uid=f"volume:{rel}:{file_digest(file)}",
        patient_hash="-",
        modality=facts["modality"] or "OT", body_part=facts["body_part"], image_type=(), view_position="",
        rows=facts["rows"], columns=facts["columns"], frames=facts["frames"], photometric="MONOCHROME2",
        transfer_syntaxes=(facts["format"],), files=[file], series_description=facts["series_description"],
        root=root, source_format=facts["format"],
    )


def _kspace_series(file: Path, root: Path) -> SeriesRef | Refusal:
    """A raw k-space file as an MR series of its own (one study per file; keyed like a volume), or the
    reason it is refused."""
    rel = relative_path(file, root)
    facts = describe_kspace(file)
    if isinstance(facts, str):
        return Refusal(rel, facts)
    return SeriesRef(
        study_uid=f"k-space:{rel}", series_uid=f"k-space:{rel}:{file_digest(file)}", patient_hash="-",
        modality="MR", body_part="", image_type=(), view_position="", rows=facts["rows"],
        columns=facts["columns"], frames=facts["frames"], photometric="MONOCHROME2",
        transfer_syntaxes=(facts["format"],), files=[file], series_description=facts["series_description"],
        root=root, source_format=KSPACE_FORMAT,
    )


def relative_path(file: Path, root: Path) -> str:
    """``file`` relative to ``root`` (never an absolute path: the name alone if it lies elsewhere)."""
    try:
        return str(file.relative_to(root))
    except ValueError:
        return file.name


def _resolved(path: Path) -> Path | None:
    """The real path of ``path``, or None for a symbolic link loop or an impossible name (NUL byte)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError, ValueError):
        return None


def _confinement_problem(file: Path, base: Path) -> str | None:
    """Why ``file`` must not be read (it resolves outside ``base``, is missing or not a regular file)."""
    target = _resolved(file)
    if target is None:
        return "symbolic link loop or impossible file name; not followed"
    if not target.is_relative_to(base):
        return OUTSIDE
    try:
        mode = target.stat().st_mode
    except OSError:
        return "broken symbolic link or missing file" if file.is_symlink() else "missing file"
    return None if stat.S_ISREG(mode) else "not a regular file (device, FIFO or socket); not read"


def _walk(folder: Path, refused: list[Refusal]) -> list[Path]:
    """Every regular file under ``folder`` whose real path stays inside it; symlinks out are refused."""
    base = folder.resolve()
    files = []

    def unreadable(exc: OSError) -> None:
        refused.append(Refusal(relative_path(Path(exc.filename), folder),
                               f"folder cannot be read ({exc.strerror}); its files were not scanned"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):  # symlinked folders: not entered
        here = Path(dirpath)
        for name in dirnames:
            target = _resolved(here / name)
            if (here / name).is_symlink() and not (target and target.is_relative_to(base)):
                refused.append(Refusal(relative_path(here / name, folder),
                                       "symbolic link to a folder outside the input folder; not followed"))
        for name in filenames:
            file = here / name
            problem = _confinement_problem(file, base)
            if problem:
                refused.append(Refusal(relative_path(file, folder), problem))
            else:
                files.append(file)
    return sorted(files)


def _dicomdir_files(path: Path, root: Path, refused: list[Refusal]) -> list[Path]:
    """Files referenced by ``path`` if it is a DICOMDIR, else [].

    Each ReferencedFileID must resolve inside the DICOMDIR's folder; records that leave it (absolute or
    '..' IDs, symlinks out) and missing files are refused one by one, without naming foreign paths.
    (``pydicom.fileset.FileSet`` confines too, but refuses the whole DICOMDIR at the first bad record.)
    """
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return []
    if "DirectoryRecordSequence" not in ds:
        return []
    base, files = root.resolve(), []
    for index, record in enumerate(ds.DirectoryRecordSequence):
        ref = record.get("ReferencedFileID")
        if not ref:
            continue
        parts = [str(ref)] if isinstance(ref, str) else [str(p) for p in ref]
        candidate = Path(*parts)
        if candidate.anchor or ".." in candidate.parts:
            problem = OUTSIDE
        else:
            problem = _confinement_problem(root / candidate, base)
        if problem is None:
            files.append(root / candidate)
        elif problem == OUTSIDE:
            refused.append(Refusal(relative_path(path, root), f"DICOMDIR record {index + 1}: its file {problem}"))
        else:
            refused.append(Refusal(str(candidate), f"referenced by the DICOMDIR: {problem}"))
    if not files and not refused:
        raise InputError(f"DICOMDIR {path} references no files")
    return files


def _read_header(file: Path, rel: str) -> pydicom.Dataset | Refusal:
    """The header of ``file`` if it is a usable image, else a Refusal saying why."""
    header = read_checked(file)
    return Refusal(rel, header) if isinstance(header, str) else header


def _patient(ds: pydicom.Dataset) -> str:
    return str(ds.get("PatientID", "") or "")


def _group(headers: list[tuple[Path, pydicom.Dataset]], root: Path, refused: list[Refusal]) -> list[SeriesRef]:
    """Group readable image headers by study/series; refuse studies mixing patients, duplicates and misfits.

    A projection series gives one SeriesRef per instance; the others one per series."""
    groups: dict[tuple[str, str], list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for file, ds in headers:
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not study or not series:
            refused.append(Refusal(relative_path(file, root), "no StudyInstanceUID/SeriesInstanceUID"))
            continue
        groups[(study, series)].append((file, ds))
    _refuse_mixed_patients(groups, root, refused)
    result = []
    for (study, series), members in groups.items():
        if str(members[0][1].get("Modality", "")) in PROJECTION_MODALITIES:
            result += [_series_ref(study, series, [member], root, instance=True)
                       for member in _unique_instances(members, root, refused)]
        else:
            result.append(_series_ref(study, series, _dedupe(members, root, refused), root))
    _mark_evaluation_references(result, root)
    return sorted(result, key=lambda s: (s.study_uid, s.files[0]))


def _series_ref(study: str, series: str, kept: list[tuple[Path, pydicom.Dataset]], root: Path, *,
                instance: bool = False) -> SeriesRef:
    """The SeriesRef of ``kept`` (its first header describes it); ``instance``: one radiograph of a
    projection series."""
    first = kept[0][1]
    return SeriesRef(
        study_uid=study, series_uid=series, patient_hash=hash_identifier(_patient(first)),
        modality=clean_text(first.get("Modality", "")), body_part=clean_text(first.get("BodyPartExamined", "")),
        image_type=tuple(clean_text(v) for v in as_list(first.get("ImageType", [])) if v is not None),
        view_position=_view_position(first),
        rows=int(first.Rows), columns=int(first.Columns),
        frames=sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in kept),
        photometric=clean_text(first.PhotometricInterpretation),
        transfer_syntaxes=tuple(sorted({clean_text(transfer_syntax(ds).name) for _, ds in kept})),
        files=[f for f, _ in kept], series_description=clean_text(first.get("SeriesDescription", "")),
        root=root, instance_uid=str(first.get("SOPInstanceUID", "")) if instance else "",
        skip_reason=_medidiff_output_reason(first),
    )


def _view_position(ds: pydicom.Dataset) -> str:
    """ViewPosition, or the view its ViewCodeSequence codes when that is a side view or ViewPosition is
    empty (a lateral code wins over a frontal ViewPosition: the model must not take a side view)."""
    stated = clean_text(ds.get("ViewPosition", "")).strip()
    codes = [str(item.get("CodeValue", "")) for item in ds.get("ViewCodeSequence") or []]
    lateral = next((LATERAL_VIEW_CODES[c] for c in codes if c in LATERAL_VIEW_CODES), "")
    if lateral and stated not in LATERAL_VIEW_CODES.values():
        return lateral
    return stated or next((FRONTAL_VIEW_CODES[c] for c in codes if c in FRONTAL_VIEW_CODES), "")


def _medidiff_output_reason(ds: pydicom.Dataset) -> str:
    """The skip reason of an image medidiff derived ('' for any other): its ContributingEquipmentSequence
    names medidiff (outputs of earlier versions: their DerivationDescription does)."""
    equipment = ds.get("ContributingEquipmentSequence") or []
    marked = any(str(item.get("Manufacturer", "")) == MEDIDIFF_MANUFACTURER for item in equipment)
    if marked or MEDIDIFF_MANUFACTURER in str(ds.get("DerivationDescription", "")).lower():
        return "medidiff's own output (a derived image medidiff wrote); not processed again"
    return ""


def _mark_evaluation_references(series: list[SeriesRef], root: Path) -> None:
    """Give a skip reason to the series under ``root/reference/`` whose study has series elsewhere in the
    input: the truth of an evaluation folder (``medidiff evaluate``), not an input."""
    folder = root / REFERENCE_FOLDER
    inside = [s for s in series if folder in s.files[0].parents]
    elsewhere = {s.study_uid for s in series if folder not in s.files[0].parents}
    for s in inside:
        if s.study_uid in elsewhere and not s.skip_reason:
            s.skip_reason = (f"the reference series of an evaluation folder ({REFERENCE_FOLDER}/ holds the truth "
                             "to compare with); not an input")

def _refuse_mixed_patients(groups: dict, root: Path, refused: list[Refusal]) -> None:
    """Remove from ``groups`` every study whose files carry more than one PatientID, refusing its files.

    Output folders and the journal are keyed by study and series: one patient per study keeps them apart.
    """
    patients_of_study: dict[str, set[str]] = defaultdict(set)
    for (study, _), members in groups.items():
        patients_of_study[study] |= {_patient(ds) for _, ds in members}
    for (study, series) in [key for key in groups if len(patients_of_study[key[0]]) > 1]:
        members = groups.pop((study, series))
        in_series = len({_patient(ds) for _, ds in members})
        if in_series > 1:
            reason = (f"its series mixes {in_series} patients: files with different PatientIDs share one "
                      "StudyInstanceUID and SeriesInstanceUID; the whole series is refused, never merged")
        else:
            reason = (f"its study mixes {len(patients_of_study[study])} patients: series with different "
                      "PatientIDs share one StudyInstanceUID; the whole study is refused, never merged")
        refused.extend(Refusal(relative_path(file, root), reason) for file, _ in members)


def _unique_instances(members, root: Path, refused: list[Refusal]):
    """One file per SOP instance (the others refused as duplicates), in InstanceNumber order."""
    kept, seen = [], {}
    for file, ds in sorted(members, key=lambda m: str(m[0])):
        rel, sop = relative_path(file, root), str(ds.get("SOPInstanceUID", file))
        if sop in seen:
            refused.append(Refusal(rel, "duplicate of another file (same SOPInstanceUID)", seen[sop]))
        else:
            seen[sop] = rel
            kept.append((file, ds))
    return sorted(kept, key=lambda m: (int(m[1].get("InstanceNumber", 0) or 0), str(m[0])))


def _dedupe(members, root: Path, refused: list[Refusal]):
    """Keep one file per SOP instance and slice, of the series' size; sort along the slice normal."""
    kept = []
    members = sorted(_unique_instances(members, root, refused), key=lambda m: str(m[0]))
    size = (int(members[0][1].Rows), int(members[0][1].Columns))
    for file, ds in members:
        if (int(ds.Rows), int(ds.Columns)) != size:
            refused.append(Refusal(relative_path(file, root), f"size {ds.Rows}x{ds.Columns} differs from the rest "
                                                              f"of its series ({size[0]}x{size[1]})"))
        else:
            kept.append((file, ds))
    if len(kept) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in kept):
        first = relative_path(kept[0][0], root)
        for file, _ in kept[1:]:
            refused.append(Refusal(relative_path(file, root),
                                   "another instance of a multi-frame series; only one is used", first))
        return kept[:1]
    positions = [_slice_position(ds) for _, ds in kept]
    if len(kept) > 1 and all(p is not None for p in positions):
        order = sorted(range(len(kept)), key=lambda i: positions[i])
        unique = []
        for i in order:
            if unique and abs(positions[i] - positions[unique[-1]]) < 1e-4:
                refused.append(Refusal(relative_path(kept[i][0], root), "same slice position as another file",
                                       relative_path(kept[unique[-1]][0], root)))
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
