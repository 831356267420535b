"""Batch runs that never lose, mix or duplicate a series: locking, journal key, salt, confinement, faults."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medidiff.output_folder import check_manifest
from tests.cli_runner import CLI, SLOW_STAGE, assert_user_error, medidiff
from tests.studies import ct_series_copies

SERIES = 5


def _slow_pipeline(folder: Path, seconds: float, until_exists: Path | None = None) -> tuple[Path, dict]:
    """(pipeline file, env) for a run that sleeps ``seconds`` per series (and waits for a file, if given)."""
    (folder / "plugins").mkdir()
    (folder / "plugins" / "slowstage.py").write_text(SLOW_STAGE)
    pipeline = folder / "slow.yaml"
    gate = f"{{seconds: {seconds}, until_exists: '{until_exists or ''}'}}"
    pipeline.write_text(
        f"name: slow\nstages:\n  - normalize_intensity: {{}}\n  - slowstage.Sleep: {gate}\n"
        "outputs:\n  dicom: {}\n  png: {panel: true}\n"
    )
    return pipeline, os.environ | {"PYTHONPATH": str(folder / "plugins")}


@pytest.fixture
def gated(tmp_path):
    """A run that holds its first series until the file ``tmp_path/release`` exists."""
    return (*_slow_pipeline(tmp_path, 0.0, tmp_path / "release"), tmp_path / "release")


@pytest.fixture
def brisk(tmp_path):
    """A run of ~0.4 s per series: many random kill points in a few seconds."""
    return _slow_pipeline(tmp_path, 0.4)


def _start(pipeline, inp, out, env) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", str(pipeline), str(inp), "-o", str(out), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _journal_rows(out: Path, state: str) -> list[str]:
    journal = out / ".medidiff" / "journal.sqlite"
    if not journal.exists():
        return []
    try:
        with sqlite3.connect(journal) as db:
            return [r[0] for r in db.execute("SELECT series_key FROM series_runs WHERE state=?", (state,))]
    except sqlite3.OperationalError:  # the table is not created yet
        return []


def _wait_for(condition, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _assert_complete(out: Path, expected: int) -> None:
    """Exactly ``expected`` series folders, each whole per its manifest, and nothing else."""
    series_dirs = sorted(p for p in out.glob("*/*") if p.is_dir() and p.parent.name != ".medidiff")
    assert len(series_dirs) == expected, series_dirs
    for folder in series_dirs:
        assert check_manifest(folder) is None, folder
        assert len(list((folder / "dicom").glob("*.dcm"))) == 1 and (folder / "panel.png").is_file()
    leftovers = [p for p in out.rglob(".*") if p.name != ".medidiff" and ".medidiff" not in p.parts[len(out.parts):]]
    assert not leftovers, leftovers


@pytest.mark.parametrize("then", ["finish", "kill"])
def test_second_run_on_the_same_output_is_refused_naming_the_holder(tmp_path, gated, then):
    """While a run holds the folder a second one exits 2; after the holder finishes or is killed -9,
    the folder is whole (a re-run after the kill redoes everything, leaving no partial folder)."""
    pipeline, env, release = gated
    ct_series_copies(tmp_path / "in", SERIES)
    out = tmp_path / "out"
    first = _start(pipeline, tmp_path / "in", out, env)
    _wait_for(lambda: _journal_rows(out, "running"))
    second = medidiff("run", pipeline, tmp_path / "in", "-o", out, "--no-progress", env=env)
    assert_user_error(second, 2, "in use by another medidiff run", f"pid {first.pid}")
    if then == "kill":
        first.send_signal(signal.SIGKILL)
        first.wait()
        release.touch()
        result = medidiff("run", pipeline, tmp_path / "in", "-o", out, "--no-progress", env=env)
        assert result.returncode == 0 and f"{SERIES} done, 0 already done" in result.stdout, result.stdout
    else:
        release.touch()
        assert first.wait(timeout=240) == 0, first.stderr.read()
    _assert_complete(out, SERIES)


def test_an_incomplete_done_series_is_redone(tmp_path):
    ct_series_copies(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, "--no-progress").returncode == 0
    damaged = next(out.glob("*/*/panel.png"))
    damaged.unlink()
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 done, 2 already done" in result.stdout
    assert damaged.is_file() and check_manifest(damaged.parent) is None
    report = json.loads((out / "report.json").read_text())
    assert [r["message"] for r in report["results"] if r["state"] == "done"] == [
        "redone: the previous output was incomplete (files are missing or unexpected)"]


def _ct(folder: Path, name: str, *, study: str, series: str, patient: str, z: float = 0.0) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series, patient
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, z]
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name)


def test_two_studies_sharing_a_series_uid_are_both_processed(tmp_path):
    series = generate_uid()
    _ct(tmp_path / "in" / "a", "a.dcm", study=generate_uid(), series=series, patient="PAT-A")
    _ct(tmp_path / "in" / "b", "b.dcm", study=generate_uid(), series=series, patient="PAT-B")
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 done, 0 already done" in result.stdout
    studies = {r["study"] for r in json.loads((tmp_path / "out" / "report.json").read_text())["results"]}
    assert len(studies) == 2 and len(list((tmp_path / "out").glob("*/*/dicom"))) == 2


def test_a_series_that_gains_slices_is_redone(tmp_path):
    study, series = generate_uid(), generate_uid()
    for z in (0.0, 5.0):
        _ct(tmp_path / "in", f"s{z:.0f}.dcm", study=study, series=series, patient="P", z=z)
    out = tmp_path / "out"
    assert medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, "--no-progress").returncode == 0
    assert len(list(out.glob("*/*/dicom/*.dcm"))) == 2
    _ct(tmp_path / "in", "s10.dcm", study=study, series=series, patient="P", z=10.0)
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, "--no-progress")
    assert result.returncode == 0 and "1 done, 0 already done" in result.stdout, result.stdout
    assert len(list(out.glob("*/*/dicom/*.dcm"))) == 3
    assert "instances changed" in (out / "report.json").read_text()


def test_unwritable_home_keeps_hashes_stable_through_the_output_salt(tmp_path):
    ct_series_copies(tmp_path / "in", 2)
    (tmp_path / "afile").write_text("HOME cannot be a folder below a file")
    env = {k: v for k, v in os.environ.items() if k != "MEDIDIFF_SALT"} | {"HOME": str(tmp_path / "afile" / "home")}
    out = tmp_path / "out"
    for _ in range(2):
        result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, "--no-progress", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "0 done, 2 already done" in result.stdout
    assert len(list(out.glob("*/*/dicom"))) == 2
    assert (out / ".medidiff" / "salt").stat().st_mode & 0o077 == 0
    assert_user_error(medidiff("inspect", tmp_path / "in", env=env), 2, "MEDIDIFF_SALT")
    changed = medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, env=env | {"MEDIDIFF_SALT": "other"})
    assert_user_error(changed, 2, "differs from the salt this output folder was written with")
    fixed = env | {"MEDIDIFF_SALT": "site-secret"}
    hashes = [medidiff("inspect", tmp_path / "in", "--json", env=fixed).stdout for _ in range(2)]
    assert hashes[0] == hashes[1] and json.loads(hashes[0])["series"]


@pytest.mark.parametrize("where", ["inside", "equal"])
def test_output_inside_the_input_is_refused(tmp_path, where):
    ct_series_copies(tmp_path / "in", 1)
    before = sorted(p.name for p in (tmp_path / "in").rglob("*"))
    out = tmp_path / "in" / "out" if where == "inside" else tmp_path / "in"
    assert_user_error(medidiff("run", "normalize-preview", tmp_path / "in", "-o", out), 2, "inside the input")
    assert sorted(p.name for p in (tmp_path / "in").rglob("*")) == before


def test_unusable_journal_is_a_one_line_error(tmp_path):
    ct_series_copies(tmp_path / "in", 1)
    (tmp_path / "out" / ".medidiff" / "journal.sqlite").mkdir(parents=True)
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out")
    assert_user_error(result, 2, "cannot write the run journal", "choose another output folder")


def test_unwritable_study_folder_fails_that_series_only(tmp_path):
    ct_series_copies(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, "--no-progress").returncode == 0
    study = next(p for p in out.iterdir() if p.is_dir() and p.name != ".medidiff")
    for child in study.iterdir():  # the study folder becomes a file: nothing can be written below it
        subprocess.run(["rm", "-rf", str(child)], check=True)
    study.rmdir()
    study.write_text("in the way")
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", out, "--no-progress")
    assert_user_error(result, 1, "1 failed", "file system error", f"{study.name}/ in the output folder is writable")
    assert "1 already done" in result.stdout


def test_random_kills_never_lose_or_duplicate_a_series(tmp_path, brisk):
    """Fault injection: kill -9 at random moments, re-run each time; the journal never claims an
    incomplete series, and the final state has every series exactly once, whole."""
    pipeline, env = brisk
    ct_series_copies(tmp_path / "in", SERIES)
    out = tmp_path / "out"
    rng = random.Random(1234)
    killed_mid_batch = 0
    for _ in range(5):
        proc = _start(pipeline, tmp_path / "in", out, env)
        target = rng.randint(0, SERIES - 1)  # kill once this many series are done, plus a random delay
        _wait_for(lambda: proc.poll() is not None or len(_journal_rows(out, "done")) >= target)  # noqa: B023
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid_batch += 1
        proc.wait()
        done = _journal_rows(out, "done")
        for key in done:
            assert check_manifest(out / key) is None, key
    assert killed_mid_batch >= 3 and len(done) < SERIES
    result = medidiff("run", pipeline, tmp_path / "in", "-o", out, "--no-progress", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_complete(out, SERIES)
    states = [r["state"] for r in json.loads((out / "report.json").read_text())["results"]]
    assert set(states) <= {"already done", "done"} and len(states) == SERIES
    assert states.count("already done") == len(done)


VANISH_STAGE = '''
import os


class Vanish:
    """Deletes the other series' file: another process changing the input mid-batch."""

    def __init__(self, paths: list = ()):
        self.paths = paths

    def __call__(self, item):
        for path in self.paths:
            if os.path.exists(path) and str(item["source"].files[0]) != path:
                os.remove(path)
        return item
'''


def test_a_file_that_vanishes_mid_batch_fails_its_series_only(tmp_path):
    files = [str(p) for p in ct_series_copies(tmp_path / "in", 2)]
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "vanish.py").write_text(VANISH_STAGE)
    pipeline = tmp_path / "vanish.yaml"
    pipeline.write_text(f"name: vanish\nstages:\n  - vanish.Vanish: {{paths: {files}}}\noutputs:\n  dicom: {{}}\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path / "plugins")}
    result = medidiff("run", pipeline, tmp_path / "in", "-o", tmp_path / "out", "--no-progress", env=env)
    assert_user_error(result, 1, "1 done", "1 failed", "changed or vanished while the batch ran")
