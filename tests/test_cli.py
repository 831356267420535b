"""The command line: help, inspect, run, and a clear message + exit code for each bad input."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from tests.cli_runner import CLI, SLOW_STAGE, assert_user_error, medidiff
from tests.studies import ct_series_copies


def test_help_is_fast_and_lists_commands():
    start = time.perf_counter()
    result = medidiff("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    for command in ("inspect", "run", "stages", "train"):
        assert command in result.stdout
    assert elapsed < 5.0  # generous: the import of torch/monai alone would take several seconds
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, medidiff.cli; print(' '.join(sys.modules))"],
        capture_output=True, text=True,
    ).stdout.split()


def test_stages_lists_parameters():
    result = medidiff("stages")
    assert result.returncode == 0
    assert "normalize_intensity" in result.stdout and "lower_percentile = 1.0" in result.stdout
    assert "bone_suppression" in result.stdout


def test_inspect_shows_series_and_refusals(tmp_path):
    ct_series_copies(tmp_path / "in", 2)
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    result = medidiff("inspect", tmp_path / "in")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("CT") >= 2
    assert "notes.txt" in result.stdout
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert str(ds.PatientName) not in result.stdout and str(ds.PatientID) not in result.stdout


def test_run_writes_outputs_and_report(tmp_path):
    ct_series_copies(tmp_path / "in", 2)
    before = {p: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] and [r["state"] for r in report["results"]] == ["done", "done"]
    for entry in report["results"]:
        files = [tmp_path / "out" / f for f in entry["outputs"]]
        assert any(f.suffix == ".dcm" for f in files) and any(f.name == "panel.png" for f in files)
        assert all(f.is_file() for f in files)
    assert {p: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    shared = (tmp_path / "out" / "report.json").read_text() + (tmp_path / "out" / "report.txt").read_text()
    assert str(ds.PatientID) not in shared and str(ds.PatientName) not in shared


def _bad_inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    return folder


def test_bad_files_are_reported_and_the_run_fails(tmp_path):
    result = medidiff("run", "normalize-preview", _bad_inputs(tmp_path), "-o", tmp_path / "out", "--no-progress")
    assert_user_error(result, 1, "3 unreadable file(s)", "refused-local.log")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    shared = result.stdout + json.dumps(report) + (tmp_path / "out" / "report.txt").read_text()
    assert not any(name in shared for name in ("readme.txt", "truncated.dcm", "nopixels.dcm"))  # hashes only
    local = (tmp_path / "out" / ".medidiff" / "refused-local.log").read_text().lower().splitlines()
    reasons = {line.split(" (file ")[0]: line for line in local}
    assert "dicom" in reasons["readme.txt"]
    assert "truncat" in reasons["truncated.dcm"]
    assert "pixel data" in reasons["nopixels.dcm"]
    assert sorted(r["reason"].lower() in "".join(local) for r in report["refused"]) == [True] * 3


def test_one_bad_file_does_not_stop_the_batch(tmp_path):
    folder = _bad_inputs(tmp_path)
    ct_series_copies(folder, 1)
    result = medidiff("run", "normalize-preview", folder, "-o", tmp_path / "out", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 done" in result.stdout and "3 unreadable" in result.stdout


def test_wrong_modality_is_skipped_with_a_reason(tmp_path):
    ct_series_copies(tmp_path / "in", 1)
    pipeline = tmp_path / "dx-only.yaml"
    pipeline.write_text("name: dx-only\nselect: {modality: [DX, CR]}\nstages: [normalize_intensity]\n")
    result = medidiff("run", pipeline, tmp_path / "in", "-o", tmp_path / "out", "--no-progress")
    assert_user_error(result, 1, "modality CT is not one this pipeline accepts (DX, CR)", "no series matched")


def test_unreadable_transfer_syntax_is_refused(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = encapsulate([bytes(64)])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2 video: no decoder exists
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "video.dcm", enforce_file_format=False)
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out", "--no-progress")
    assert_user_error(result, 1, "MPEG2")
    assert "transfer syntax" in (tmp_path / "out" / "report.txt").read_text().lower()


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_empty_or_missing_input(tmp_path, case):
    target = tmp_path / "empty"
    if case == "empty":
        target.mkdir()
    result = medidiff("run", "normalize-preview", target, "-o", tmp_path / "out")
    assert_user_error(result, 2, str(target))


def test_unwritable_output(tmp_path):
    ct_series_copies(tmp_path / "in", 1)
    (tmp_path / "afile").write_text("x")
    result = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "afile" / "out")
    assert_user_error(result, 2, "cannot create output folder")


def test_bad_pipeline_file_names_the_line(tmp_path):
    ct_series_copies(tmp_path / "in", 1)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: p\nstages:\n  - normalize_intensity: {upper: 3}\n")
    result = medidiff("run", pipeline, tmp_path / "in", "-o", tmp_path / "out")
    assert_user_error(result, 2, "p.yaml", "line 3", "no parameter 'upper'")


def test_killed_run_resumes_without_redoing_or_losing_series(tmp_path):
    ct_series_copies(tmp_path / "in", 6)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "slowstage.py").write_text(SLOW_STAGE)
    pipeline = tmp_path / "slow.yaml"
    pipeline.write_text(
        "name: slow\nstages:\n  - normalize_intensity: {}\n  - slowstage.Sleep: {seconds: 1.0}\n"
        "outputs:\n  dicom: {}\n"
    )
    env = os.environ | {"PYTHONPATH": str(tmp_path / "plugins")}
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "run", str(pipeline), str(tmp_path / "in"), "-o", str(out), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / ".medidiff" / "journal.sqlite"
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and done < 2:
        time.sleep(0.2)
        if journal.exists():
            with sqlite3.connect(journal) as db, contextlib.suppress(sqlite3.OperationalError):  # no table yet
                done = db.execute("SELECT COUNT(*) FROM series_runs WHERE state='done'").fetchone()[0]
    proc.kill()
    proc.wait()
    assert 2 <= done < 6, "the run was not caught mid-batch"
    with sqlite3.connect(journal) as db:
        done_at_kill = db.execute("SELECT COUNT(*) FROM series_runs WHERE state='done'").fetchone()[0]

    result = medidiff("run", pipeline, tmp_path / "in", "-o", out, "--no-progress", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    states = [r["state"] for r in report["results"]]
    assert states.count("already done") == done_at_kill
    assert states.count("done") == 6 - done_at_kill
    series_dirs = [p for p in out.glob("*/*") if p.is_dir()]
    assert len(series_dirs) == 6 and not list(out.rglob("*.partial*"))
    assert all(len(list((d / "dicom").glob("*.dcm"))) == 1 for d in series_dirs)


def test_cli_lets_waiting_openmp_threads_sleep_unless_the_user_chose(monkeypatch, capsys):
    from medidiff import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["stages"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set before torch loads in a fresh process
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cli.main(["stages"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
