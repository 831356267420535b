"""`medidiff run --from dicomweb://... --query ... --to dicomweb://...` against a real Orthanc with its DICOMweb
plugin on loopback (QIDO-RS, WADO-RS, STOW-RS; no network mocks). A destination that is down gets the
derived series later: retried, queued in the output folder's outbox, delivered by the next run."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from contextlib import closing

import pydicom
import pytest

from medidiff.batch import InProcess, run_batch
from medidiff.pipeline import Pipeline
from tests.batch_stages import journal_states, recording_pipeline, starts
from tests.cli_runner import CLI, assert_user_error, medidiff
from tests.orthanc import derived_series, free_port, orthanc, orthanc_binary, upload, wait_for
from tests.studies import ct_series_copies


@pytest.fixture(scope="module")
def orthanc_path() -> str:
    binary = orthanc_binary()
    if not binary:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed and apt-get could not install it")
    return binary


@pytest.fixture
def tmpdir_env(tmp_path):
    """An environment whose temporary folder is an empty folder of the test (to see what is left in it)."""
    (tmp_path / "tmp").mkdir()
    return os.environ | {"TMPDIR": str(tmp_path / "tmp")}


def test_query_retrieve_run_and_store_back(orthanc_path, tmp_path, tmpdir_env):
    studies = ct_series_copies(tmp_path / "in", 3)
    for path, patient in zip(studies, ["P1", "P1", "P2"], strict=True):
        ds = pydicom.dcmread(path)
        ds.PatientID = patient
        ds.save_as(path)
    wanted = {pydicom.dcmread(p).StudyInstanceUID for p in studies[:2]}
    with orthanc(orthanc_path, tmp_path / "orthanc", free_port(), free_port()) as url:
        upload(url, studies)
        service = url.replace("http://", "dicomweb://") + "/dicom-web"
        result = medidiff("run", "normalize-preview", "--from", service, "--query", "PatientID=P1", "-o",
                          tmp_path / "out", "--to", service, "--no-progress", env=tmpdir_env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 done" in result.stdout and "nothing waiting" in result.stdout
        derived = derived_series(url)
        assert sorted(d["study_uid"] for d in derived) == sorted(wanted)
        assert all("DERIVED" in d["image_type"] for d in derived)

        again = medidiff("run", "normalize-preview", "--from", service, "--query", "PatientID=P1", "-o",
                         tmp_path / "out", "--to", service, "--no-progress", env=tmpdir_env)
        assert again.returncode == 0 and "2 already done" in again.stdout, again.stdout + again.stderr
        assert len(derived_series(url)) == 2

        nothing = medidiff("run", "normalize-preview", "--from", service, "--query", "PatientID=P9", "-o",
                           tmp_path / "out", env=tmpdir_env)
        assert_user_error(nothing, 2, "no study on", "matches the query")

        (batch_study,) = ct_series_copies(tmp_path / "batch-in", 1)
        pipeline = Pipeline.from_yaml("normalize-preview")
        run_batch(pipeline, tmp_path / "batch-in", tmp_path / "batch-out", InProcess(pipeline))  # without --to
        batch = medidiff("batch", "normalize-preview", tmp_path / "batch-in", "-o", tmp_path / "batch-out",
                         "--workers", "0", "--to", service)
        assert batch.returncode == 0 and "nothing waiting" in batch.stdout, batch.stdout + batch.stderr
        assert "1 already done" in batch.stdout  # done by the batch without --to, sent by this one
        assert pydicom.dcmread(batch_study).StudyInstanceUID in {d["study_uid"] for d in derived_series(url)}
    assert not list((tmp_path / "tmp").iterdir())  # every retrieved study was removed
    assert "P1" not in result.stdout + result.stderr


def test_store_to_a_stopped_server_is_queued_then_delivered_by_the_next_run(orthanc_path, tmp_path, tmpdir_env):
    study = ct_series_copies(tmp_path / "in", 1)
    http_port = free_port()
    service = f"dicomweb://127.0.0.1:{http_port}/dicom-web"
    unreachable = medidiff("run", "normalize-preview", "--from", service, "-o", tmp_path / "out", env=tmpdir_env)
    assert_user_error(unreachable, 2, "did not answer", "--from")
    assert not list((tmp_path / "tmp").iterdir())

    first = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out", "--to", service,
                     "--send-tries", "2", "--no-progress")
    assert first.returncode == 1 and "1 done" in first.stdout, first.stdout + first.stderr
    assert "1 instance(s) could not be delivered" in first.stderr
    assert '"event": "send_failed"' in first.stderr

    with orthanc(orthanc_path, tmp_path / "orthanc", free_port(), free_port(), http_port=http_port) as url:
        second = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out", "--to", service,
                          "--no-progress")
        assert second.returncode == 0 and "1 already done" in second.stdout, second.stdout + second.stderr
        assert [d["study_uid"] for d in derived_series(url)] == [pydicom.dcmread(study[0]).StudyInstanceUID]
        third = medidiff("run", "normalize-preview", tmp_path / "in", "-o", tmp_path / "out", "--to", service,
                         "--no-progress")
        assert third.returncode == 0 and len(derived_series(url)) == 1


def test_batch_killed_between_finishing_a_series_and_queuing_it_sends_it_once_on_resume(orthanc_path, tmp_path):
    pipeline, env, log = recording_pipeline(tmp_path, hold_at=1)
    (study,) = ct_series_copies(tmp_path / "in", 1)
    out = tmp_path / "out"
    with orthanc(orthanc_path, tmp_path / "orthanc", free_port(), free_port()) as url:
        service = url.replace("http://", "dicomweb://") + "/dicom-web"
        args = [*CLI, "batch", str(pipeline), str(tmp_path / "in"), "-o", str(out), "--workers", "0", "--to", service]
        first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: log.exists() and starts(log), "the study's start (held in the pipeline)")
        (outbox,) = out.glob(".medidiff/outbox/*/outbox.sqlite")
        with closing(sqlite3.connect(outbox, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")  # the batch cannot queue anything for sending now
            (tmp_path / "release").touch()
            wait_for(lambda: journal_states(out) == ["done"], "the finished series in the journal")
            first.kill()  # SIGKILL: the series is done, not queued for sending
            first.communicate()
            assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (0,)
            db.execute("ROLLBACK")
        assert not derived_series(url)

        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0 and "nothing waiting" in second.stdout, second.stdout + second.stderr
        assert "1 done now" in second.stdout  # the interrupted study, redone: its series already done
        assert [(d["study_uid"], d["instances"]) for d in derived_series(url)] == \
            [(pydicom.dcmread(study).StudyInstanceUID, 1)]
    assert len(starts(log)) == 1  # run once, sent once


def test_bad_dicomweb_arguments_are_one_line_errors(tmp_path):
    ct_series_copies(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert_user_error(medidiff("run", "normalize-preview", "-o", out), 2, "give either INPUT or --from")
    assert_user_error(medidiff("run", "normalize-preview", tmp_path / "in", "--from", "dicomweb://h/x", "-o", out),
                      2, "give either INPUT or --from")
    assert_user_error(medidiff("run", "normalize-preview", "--from", "ftp://h/x", "-o", out), 2, "not a DICOMweb URL")
    assert_user_error(medidiff("run", "normalize-preview", "--from", "dicomweb://h:1/x", "--query", "Patient ID", "-o",
                               out), 2, "is not KEY=VALUE")
    assert_user_error(medidiff("run", "normalize-preview", tmp_path / "in", "--query", "PatientID=1", "-o", out), 2,
                      "--query filters")
    assert not out.exists()
