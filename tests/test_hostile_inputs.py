"""Inputs built by a hostile hospital IT engineer (issue 8): each is refused with a specific reason,
never followed, merged, printed raw or leaked, and the batch goes on."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from medidiff.cli import main
from medidiff.errors import InputError
from medidiff.io.discovery import discover, open_source
from medidiff.io.loading import load_series, load_study
from tests.studies import ct_series_copies

CONTROL = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x202E)]


@contextmanager
def invalid_on_purpose():
    """Silence pydicom's validation while a test builds a hostile file."""
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        yield


def ct(path: Path, **attributes) -> Path:
    """CT_small.dcm with fresh UIDs and ``attributes`` set, saved at ``path``."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    with invalid_on_purpose():
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=False)
    return path


def reasons(inventory) -> dict[str, str]:
    return {r.path: r.reason for r in inventory.refused}


def run(*args) -> int:
    return main(["run", *map(str, args), "--no-progress"])


# --- item 3: one series, two patients ---------------------------------------------------------

def test_a_series_or_study_mixing_patients_is_refused_never_merged(tmp_path):
    study, series = generate_uid(), generate_uid()
    ct(tmp_path / "in" / "a.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P1",
       ImagePositionPatient=[0, 0, 0])
    ct(tmp_path / "in" / "b.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P2",
       ImagePositionPatient=[0, 0, 5])
    other_study = generate_uid()
    ct(tmp_path / "in" / "c.dcm", StudyInstanceUID=other_study, PatientID="P3")
    ct(tmp_path / "in" / "d.dcm", StudyInstanceUID=other_study, PatientID="P4")
    ct(tmp_path / "in" / "clean.dcm", PatientID="P5")
    inventory = discover(tmp_path / "in")
    assert [s.files[0].name for s in inventory.series] == ["clean.dcm"]
    why = reasons(inventory)
    assert "series mixes 2 patients" in why["a.dcm"] and "series mixes 2 patients" in why["b.dcm"]
    assert "study mixes 2 patients" in why["c.dcm"] and "study mixes 2 patients" in why["d.dcm"]
    assert all("P1" not in r and "P3" not in r for r in why.values())
    assert run("normalize-preview", tmp_path / "in", "-o", tmp_path / "out") == 0
    outputs = [p for p in (tmp_path / "out").rglob("*.dcm")]
    assert {str(pydicom.dcmread(p).PatientID) for p in outputs} == {"P5"}


# --- item 6: reading outside the input ------------------------------------------------------

def test_symlinks_out_of_a_folder_input_are_refused_without_naming_the_target(tmp_path):
    secret = tmp_path / "DOE_JANE_outside"
    ct(secret / "secret.dcm")
    ct_series_copies(tmp_path / "in", 1)
    (tmp_path / "in" / "link.dcm").symlink_to(secret / "secret.dcm")
    (tmp_path / "in" / "linked_folder").symlink_to(secret, target_is_directory=True)
    (tmp_path / "in" / "inside.dcm").symlink_to(tmp_path / "in" / "ct_00.dcm")
    (tmp_path / "in" / "dangling.dcm").symlink_to(tmp_path / "in" / "gone.dcm")
    os.mkfifo(tmp_path / "in" / "pipe.dcm")  # reading it would block forever
    (tmp_path / "in" / "loop_a.dcm").symlink_to(tmp_path / "in" / "loop_b.dcm")
    (tmp_path / "in" / "loop_b.dcm").symlink_to(tmp_path / "in" / "loop_a.dcm")
    inventory = discover(tmp_path / "in")
    assert all(secret not in f.resolve().parents for s in inventory.series for f in s.files)
    why = reasons(inventory)
    assert "outside the input folder" in why["link.dcm"] and "outside the input folder" in why["linked_folder"]
    assert "duplicate" in why["inside.dcm"]  # followed (inside), then found to be ct_00.dcm again
    assert "broken symbolic link" in why["dangling.dcm"]
    assert "not a regular file" in why["pipe.dcm"]
    assert "loop" in why["loop_a.dcm"] and "loop" in why["loop_b.dcm"]
    shown = json.dumps([[r.path, r.reason, r.to_local_dict(), r.to_public_dict()] for r in inventory.refused])
    assert "DOE_JANE" not in shown and str(tmp_path) not in shown


def test_dicomdir_references_outside_its_folder_are_refused(tmp_path, pydicom_files_dir):
    root = tmp_path / "media"
    shutil.copytree(pydicom_files_dir / "dicomdirtests", root)
    ct(tmp_path / "DOE_JANE_outside" / "secret.dcm")
    (root / "escape").symlink_to(tmp_path / "DOE_JANE_outside" / "secret.dcm")
    ds = pydicom.dcmread(root / "DICOMDIR")
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    with invalid_on_purpose():
        images[0].ReferencedFileID = ["..", "DOE_JANE_outside", "secret.dcm"]
        images[1].ReferencedFileID = "/etc/passwd"
        images[2].ReferencedFileID = "escape"
        ds.save_as(root / "DICOMDIR")
    inventory = discover(root / "DICOMDIR")
    used = {f.resolve() for s in inventory.series for f in s.files}
    assert used and all(root.resolve() in f.parents for f in used)
    outside = [r for r in inventory.refused if "outside the input folder" in r.reason]
    assert [r.path for r in outside] == ["DICOMDIR"] * 3
    shown = json.dumps([r.to_local_dict() for r in inventory.refused])
    assert "DOE_JANE" not in shown and "passwd" not in shown and "escape" not in shown
    assert len(inventory.series) >= 4  # the other records are still used


# --- item 7: zip bombs and temporary folders -------------------------------------------------

def zip_of_zeros(path: Path, size: int, name: str = "bomb.dcm") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w") as fh:
        for _ in range(size // 2**20):
            fh.write(bytes(2**20))
    return path


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """A private temporary directory, so extraction folders can be counted."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(folder))
    return folder


def test_zip_bomb_is_refused_by_ratio_and_size_caps_and_leaves_nothing(tmp_path, own_tmp, monkeypatch):
    bomb = zip_of_zeros(tmp_path / "bomb.zip", 50 * 2**20)
    assert bomb.stat().st_size < 2**20
    start = time.perf_counter()
    with pytest.raises(InputError, match="MEDIDIFF_ZIP_MAX_RATIO"), open_source(bomb):
        pass
    print(f"\n50 MB zip bomb ({bomb.stat().st_size} bytes) refused in {time.perf_counter() - start:.3f} s")
    monkeypatch.setenv("MEDIDIFF_ZIP_MAX_RATIO", "100000")
    monkeypatch.setenv("MEDIDIFF_ZIP_MAX_BYTES", str(10 * 2**20))
    with pytest.raises(InputError, match="MEDIDIFF_ZIP_MAX_BYTES"):
        load_study(bomb)
    monkeypatch.setenv("MEDIDIFF_ZIP_MAX_BYTES", str(2**30))
    monkeypatch.setenv("MEDIDIFF_ZIP_MAX_MEMBER_BYTES", str(20 * 2**20))
    with pytest.raises(InputError, match="MEDIDIFF_ZIP_MAX_MEMBER_BYTES"):
        discover(bomb)
    monkeypatch.setenv("MEDIDIFF_ZIP_MAX_MEMBER_BYTES", "lots")
    with pytest.raises(InputError, match="not a positive whole number"):
        discover(bomb)
    assert list(own_tmp.iterdir()) == []
    monkeypatch.delenv("MEDIDIFF_ZIP_MAX_MEMBER_BYTES")
    monkeypatch.setenv("MEDIDIFF_ZIP_MAX_BYTES", str(10 * 2**20))
    assert main(["inspect", str(bomb)]) == 2


def test_zip_member_lying_about_its_size_is_never_inflated_past_it(tmp_path, own_tmp):
    bomb = zip_of_zeros(tmp_path / "liar.zip", 50 * 2**20)
    data = bytearray(bomb.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 4096)  # declared uncompressed size: 4 kB
    bomb.write_bytes(bytes(data))
    assert zipfile.ZipFile(bomb).infolist()[0].file_size == 4096
    with pytest.raises(InputError, match="liar.zip"), open_source(bomb):
        pass
    corrupt = bytearray(zip_of_zeros(tmp_path / "corrupt.zip", 2**20).read_bytes())
    corrupt[100:140] = bytes(range(40))  # inside the deflate stream
    (tmp_path / "corrupt.zip").write_bytes(bytes(corrupt))
    with pytest.raises(InputError, match="corrupt.zip cannot be read"):
        discover(tmp_path / "corrupt.zip")
    assert list(own_tmp.iterdir()) == []


def test_zip_extraction_is_removed_on_every_exit_and_stale_ones_are_cleaned(tmp_path, own_tmp, pydicom_files_dir):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.write(pydicom_files_dir / "CT_small.dcm", "a/CT_small.dcm")
    with pytest.raises(RuntimeError), open_source(good) as root:
        assert (root / "a" / "CT_small.dcm").is_file()
        raise RuntimeError("the caller fails half-way")
    assert not root.exists()
    study = load_study(good)
    folder = study.series[0].files[0].parents[1]
    assert study[0].ndim == 3 and folder.name.startswith(f"medidiff-zip-{os.getpid()}-")
    del study
    gc.collect()
    assert not folder.exists()
    killed = subprocess.run(  # a run killed with SIGKILL mid-way leaves its extraction behind
        [sys.executable, "-c", "import os, signal, sys; from medidiff.io.discovery import open_source; "
         "source = open_source(sys.argv[1]); source.__enter__(); os.kill(os.getpid(), signal.SIGKILL)", str(good)],
        env={**os.environ, "TMPDIR": str(own_tmp)}, check=False)
    assert killed.returncode == -signal.SIGKILL
    (left,) = own_tmp.iterdir()
    assert (left / "a" / "CT_small.dcm").is_file()
    alive = own_tmp / f"medidiff-zip-{os.getppid()}-y"  # a live process's extraction is kept
    alive.mkdir()
    with open_source(good) as root:
        assert not left.exists() and alive.exists() and root.exists()


# --- item 8: header and size crashes become one-line reasons --------------------------------

def image(path: Path, rows: int, cols: int) -> Path:
    pixels = (np.arange(rows * cols) % 1000).astype(np.int16)
    return ct(path, Rows=rows, Columns=cols, PixelData=pixels.tobytes())


def test_zero_orientation_and_line_images_are_refused_and_the_batch_goes_on(tmp_path):
    ct(tmp_path / "in" / "iop_zero.dcm", ImageOrientationPatient=[0] * 6)
    for rows, cols in ((32, 65535), (65535, 1), (1, 65535)):
        image(tmp_path / "in" / f"{rows}x{cols}.dcm", rows, cols)
    ct_series_copies(tmp_path / "in", 1)
    assert run("normalize-preview", tmp_path / "in", "-o", tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["state"] for r in report["results"]] == ["done"]
    refused = sorted(r["reason"] for r in report["refused"])
    assert len(refused) == 4
    assert "ImageOrientationPatient 0.0\\0.0\\0.0\\0.0\\0.0\\0.0 is not two perpendicular unit vectors" in refused[0]
    assert [r.split(" pixels")[0] for r in refused[1:]] == [
        "image of 1x65535", "image of 32x65535", "image of 65535x1"]
    assert all("\n" not in r for r in refused)
    assert not (tmp_path / "out" / ".medidiff" / "errors.log").exists()


# --- item 9: header text is escaped and capped everywhere -----------------------------------

def test_control_characters_and_long_header_text_are_escaped_and_capped(tmp_path, capsys):
    description = "\x1b]0;pwned\x07\x1b[31mRED\nfake row  CT  1x1\x00\u202etail" + "A" * 10_000
    ct(tmp_path / "in" / "evil.dcm", SpecificCharacterSet="ISO_IR 192", SeriesDescription=description,
       BodyPartExamined="CHEST\x1b[2J", ViewPosition="PA\r\nAP")
    ct(tmp_path / "in" / "evil_modality.dcm", Modality="CT\x1b[5m\x9b")
    assert main(["inspect", str(tmp_path / "in")]) == 0
    table = capsys.readouterr().out
    assert not set(table) & set(CONTROL) - {"\n"}
    lines = table.splitlines()
    assert len(lines) == 1 + 2 + 2  # header, two series, a blank line and the count
    assert all(len(line) < 400 for line in lines)
    assert "\\x1b[31mRED\\nfake row" in table and "CHEST\\x1b[2J" in table and "PA\\r\\nAP" in table
    assert main(["inspect", "--json", str(tmp_path / "in")]) == 0
    series = json.loads(capsys.readouterr().out)["series"]
    for entry in series:
        text = json.dumps(entry, ensure_ascii=False)
        assert not set(text) & set(CONTROL) and len(entry["series_description"]) <= 64
    assert {e["modality"] for e in series} == {"CT", "CT\\x1b[5m\\x9b"}
    run("normalize-preview", tmp_path / "in", "-o", tmp_path / "out")
    for name in ("report.txt", "report.json"):
        text = (tmp_path / "out" / name).read_text()
        assert "CT\\x1b[5m" in text or "CT\\\\x1b[5m" in text  # the odd modality's skip reason, escaped
        assert not set(text) & set(CONTROL) - {"\n"}


# --- item 10: no paths in shareable outputs -------------------------------------------------

def test_refusals_and_load_errors_name_files_by_hash_not_path(tmp_path):
    folder = tmp_path / "in" / "DOE_JANE_MRN4711"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not dicom")
    shutil.copy(ct(folder / "ct.dcm"), folder / "ct_copy.dcm")
    broken = pydicom.dcmread(ct(folder / "broken.dcm"))
    broken.PixelData = encapsulate([b"\xff\xd8 not a codestream"])
    broken.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    broken.save_as(folder / "broken.dcm", enforce_file_format=False)
    inventory = discover(tmp_path / "in")
    assert sorted(r.path for r in inventory.refused) == ["DOE_JANE_MRN4711/ct_copy.dcm", "DOE_JANE_MRN4711/notes.txt"]
    public = json.dumps([r.to_public_dict() for r in inventory.refused] + [r.public_line() for r in inventory.refused])
    assert "DOE_JANE" not in public and "ct" not in public and "notes" not in public
    original = next(s for s in inventory.series if s.files[0].name == "ct.dcm")
    duplicate = next(r for r in inventory.refused if "duplicate" in r.reason)
    assert duplicate.public_reason().endswith(f"file {original.file_id(original.files[0])}")
    local = duplicate.to_local_dict()
    assert local["path"].startswith("DOE_JANE_MRN4711/") and "DOE_JANE_MRN4711/" in local["reason"]
    assert "DOE_JANE_MRN4711/notes.txt (file " in "\n".join(r.local_line() for r in inventory.refused)
    broken_series = next(s for s in inventory.series if s.files[0].name == "broken.dcm")
    with pytest.raises(InputError) as failure:
        load_series(broken_series)
    message = str(failure.value)
    assert "pixel data cannot be decoded" in message and broken_series.file_id(broken_series.files[0]) in message
    assert "DOE_JANE" not in message and str(tmp_path) not in message


# --- item 11: values and geometry that would be silently altered ----------------------------

def test_zero_slope_bad_spacing_and_1_bit_images_are_refused(tmp_path):
    ct(tmp_path / "in" / "slope0.dcm", RescaleSlope=0)
    for name, spacing in (("zero", [0, 0]), ("negative", [-0.5, 0.5]), ("nan", ["NaN", "NaN"]), ("one", [0.5])):
        ct(tmp_path / "in" / f"spacing_{name}.dcm", PixelSpacing=spacing)
    bits = np.packbits(np.arange(128 * 128) % 3 == 0).tobytes()
    ct(tmp_path / "in" / "bitmap.dcm", BitsAllocated=1, BitsStored=1, HighBit=0, PixelRepresentation=0,
       PixelData=bits)
    ct(tmp_path / "in" / "fine.dcm", PixelSpacing=[0.5, 0.5], RescaleSlope=2)
    inventory = discover(tmp_path / "in")
    assert [s.files[0].name for s in inventory.series] == ["fine.dcm"]
    why = reasons(inventory)
    assert why["slope0.dcm"].startswith("RescaleSlope is 0")
    for name in ("zero", "negative", "nan", "one"):
        assert "is not two positive numbers" in why[f"spacing_{name}.dcm"]
    assert why["bitmap.dcm"].startswith("1-bit pixel data")
    image = load_series(inventory.series[0])
    assert np.allclose(image.meta["spacing"][:2], [0.5, 0.5])
