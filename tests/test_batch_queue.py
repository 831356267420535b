"""`medidiff batch` and its durable queue: a killed batch resumes without losing or repeating a study,
failed studies are retried then quarantined with their reason, and a full output disk leaves nothing
half-written or falsely done. In this process (``--workers 0``); tests/test_scaleout.py covers Dask."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pydicom
import pytest

from medidiff.batch import InProcess, run_batch
from medidiff.output_folder import check_manifest
from medidiff.pipeline import Pipeline
from tests.batch_stages import described_studies, journal_states, recording_pipeline, starts
from tests.cli_runner import CLI, assert_user_error, medidiff
from tests.disks import tiny_tmpfs
from tests.orthanc import wait_for
from tests.studies import ct_series_copies


def _history(out: Path) -> list[tuple[str, str, int]]:
    with closing(sqlite3.connect(out / ".medidiff" / "queue.sqlite")) as db:
        return db.execute("SELECT study, outcome, attempt FROM history ORDER BY rowid").fetchall()


def _series_folders(out: Path) -> list[Path]:
    """Every series folder (hidden partial ones included) outside .medidiff/."""
    return sorted(p for p in out.glob("*/*") if p.is_dir() and p.parent.name != ".medidiff")


def test_killed_batch_resumes_and_finishes_each_study_exactly_once(tmp_path):
    pipeline, env, log = recording_pipeline(tmp_path, hold_at=2)
    uids = [pydicom.dcmread(p).StudyInstanceUID for p in ct_series_copies(tmp_path / "in", 3)]
    out = tmp_path / "out"
    args = [*CLI, "batch", str(pipeline), str(tmp_path / "in"), "-o", str(out), "--workers", "0"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: log.exists() and len(starts(log)) == 2, "the second study's start")
    first.send_signal(signal.SIGKILL)  # mid-study: its series is held inside the pipeline
    first.communicate()
    (killed_key,) = [key for _, key in starts(log)[1:]]
    assert len(_series_folders(out)) == 1 and not list(out.glob("*/.*.partial-*"))

    (tmp_path / "release").touch()
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 studies" not in second.stdout and "2 done now, 1 already done" in second.stdout

    history = _history(out)
    done = [study for study, outcome, _ in history if outcome == "done"]
    assert len(done) == len(set(done)) == 3  # each study finished exactly once
    (interrupted,) = [(study, attempt) for study, outcome, attempt in history if outcome == "interrupted"]
    assert (interrupted[0], 2) in [(study, attempt) for study, outcome, attempt in history if outcome == "done"]
    keys = [key for _, key in starts(log)]
    assert keys.count(killed_key) == 2 and len(keys) == 4  # redone once; the others ran once
    folders = _series_folders(out)
    assert len(folders) == 3 and all(check_manifest(f) is None for f in folders)
    events = [json.loads(line) for line in second.stderr.splitlines()]
    assert [e["event"] for e in events].count("study_interrupted") == 1  # JSON lines, hashed keys only
    assert not any(uid in second.stdout + second.stderr for uid in uids)

    third = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "0 done now, 3 already done" in third.stdout, third.stdout + third.stderr
    assert len(starts(log)) == 4


def test_flaky_study_retried_failing_study_quarantined_with_its_reason(tmp_path, monkeypatch):
    pipeline_file, env, log = recording_pipeline(tmp_path)
    monkeypatch.syspath_prepend(env["PYTHONPATH"])
    paths = described_studies(tmp_path / "in", ["FINE", "FLAKY", "FAILS"])
    uids = [pydicom.dcmread(p).StudyInstanceUID for p in paths]
    pipeline, out = Pipeline.from_yaml(pipeline_file), tmp_path / "out"

    summary = run_batch(pipeline, tmp_path / "in", out, InProcess(pipeline), max_attempts=3, retry_delay=0.1)
    assert not summary.ok and summary.done_now == 2 and summary.retried == 3
    (quarantined,) = summary.quarantined
    assert quarantined["attempts"] == 3 and "this series is fails" in quarantined["reason"]
    outcomes = {}
    for study, outcome, _ in _history(out):
        outcomes.setdefault(study, []).append(outcome)
    assert sorted(outcomes.values()) == [["done"], ["failed", "done"], ["failed", "failed", "failed"]]
    assert len(_series_folders(out)) == 2

    status = medidiff("status", out)
    assert status.returncode == 0
    health = json.loads(status.stdout)
    assert health["queue"]["studies"] == {"pending": 0, "running": 0, "done": 2, "quarantined": 1}
    assert health["queue"]["quarantined"][0]["study"] == quarantined["study"]
    assert health["series"]["failed"] == 1 and health["queue"]["processed"] == 2
    assert not any(uid in status.stdout for uid in uids)

    before = len(starts(log))
    again = run_batch(pipeline, tmp_path / "in", out, InProcess(pipeline), max_attempts=3, retry_delay=0.1)
    assert len(starts(log)) == before and again.already_done == 2 and len(again.quarantined) == 1
    run_batch(pipeline, tmp_path / "in", out, InProcess(pipeline), max_attempts=1, retry_quarantined=True)
    assert len(starts(log)) == before + 1  # only the quarantined study, once more


def test_bad_options_are_one_line_errors(tmp_path):
    ct_series_copies(tmp_path / "in", 1)
    assert_user_error(medidiff("batch", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out",
                               "--workers", "-1"), 2, "--workers -1")
    assert_user_error(medidiff("batch", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out",
                               "--scheduler", "tcp://127.0.0.1:9"), 2, "cannot reach the Dask scheduler")
    assert_user_error(medidiff("status", tmp_path / "in"), 2, "not a medidiff output folder")


@pytest.fixture
def tiny_disk(tmp_path):
    """``tmp_path/out`` on a 4 MB tmpfs (needs root to mount)."""
    with tiny_tmpfs(tmp_path / "out", "4m") as mount:
        yield mount


def test_full_output_disk_fails_cleanly_then_the_retry_succeeds(tiny_disk, tmp_path):
    pipeline, env, log = recording_pipeline(tmp_path, hold_at=1, outputs="  png: {panel: true}\n  nifti: {}\n")
    ct_series_copies(tmp_path / "in", 1)
    args = [*CLI, "batch", str(pipeline), str(tmp_path / "in"), "-o", str(tiny_disk), "--workers", "0",
            "--retry-delay", "3"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: log.exists() and starts(log), "the study's start")
    filler = tiny_disk / "filler"
    stats = os.statvfs(tiny_disk)
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 160 * 1024))  # room for the journals, not outputs
    (tmp_path / "release").touch()
    wait_for(lambda: _queue_rows(tiny_disk, "SELECT reason FROM items WHERE state='pending' AND reason != ''"),
             "the failed first attempt")
    assert "No space left on device" in _queue_rows(tiny_disk, "SELECT reason FROM items")[0][0]
    assert not _series_folders(tiny_disk)  # no partial folder left
    assert journal_states(tiny_disk) == ["failed"]  # nothing marked done
    filler.unlink()
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stdout + stderr
    (folder,) = _series_folders(tiny_disk)
    assert check_manifest(folder) is None and journal_states(tiny_disk) == ["done"]
    failed = [json.loads(line) for line in stderr.splitlines() if '"study_failed"' in line]
    assert len(failed) == 1 and "file system error" in failed[0]["reason"]


def _queue_rows(out: Path, query: str) -> list:
    try:
        with closing(sqlite3.connect(out / ".medidiff" / "queue.sqlite")) as db:
            return db.execute(query).fetchall()
    except sqlite3.OperationalError:
        return []
