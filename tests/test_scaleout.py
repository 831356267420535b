"""`medidiff batch --workers 2`: a real Dask LocalCluster of two worker processes. The pipeline is built
once per worker process, not per study, and not in the batch process; a worker killed mid-study has that
study redone once, and it appears once in the output and in the PACS (a real Orthanc)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from contextlib import closing

import pydicom
import pytest

from medidiff.health import health
from medidiff.output_folder import check_manifest
from tests.batch_stages import loads, recording_pipeline, starts
from tests.cli_runner import CLI, assert_user_error
from tests.orthanc import ORTHANC_AE, derived_series, free_port, orthanc, orthanc_binary, wait_for
from tests.studies import ct_series_copies

STUDIES = 6


def test_killed_worker_study_redone_once_pipeline_built_once_per_worker_result_once_in_pacs(tmp_path):
    binary = orthanc_binary()
    if not binary:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed and apt-get could not install it")
    pipeline, env, log = recording_pipeline(tmp_path, hold_at=3)
    uids = sorted(pydicom.dcmread(path).StudyInstanceUID for path in ct_series_copies(tmp_path / "in", STUDIES))
    out, pacs_port = tmp_path / "out", free_port()
    with orthanc(binary, tmp_path / "orthanc", pacs_port, free_port()) as url:
        batch = subprocess.Popen([*CLI, "batch", str(pipeline), str(tmp_path / "in"), "-o", str(out), "--workers", "2",
                                  "--to", f"{ORTHANC_AE}@127.0.0.1:{pacs_port}"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        held_pid, held_key = wait_for(lambda: log.exists() and len(starts(log)) >= 3 and starts(log)[2],
                                      "the third study's start", 900)
        os.kill(int(held_pid), signal.SIGKILL)  # the worker process holding that study, mid-study
        (tmp_path / "release").touch()
        stdout, stderr = batch.communicate(timeout=900)
        assert batch.returncode == 0 and "nothing waiting" in stdout, stdout + stderr
        assert [(d["study_uid"], d["instances"]) for d in derived_series(url)] == [(uid, 1) for uid in uids]

    keys = [key for _, key in starts(log)]
    assert keys.count(held_key) == 2 and len(keys) == STUDIES + 1 and len(set(keys)) == STUDIES
    with closing(sqlite3.connect(out / ".medidiff" / "queue.sqlite")) as db:
        outcomes = db.execute("SELECT outcome, COUNT(*), COUNT(DISTINCT study) FROM history GROUP BY outcome").fetchall()
    assert outcomes == [("done", STUDIES, STUDIES)]
    folders = [p for p in out.glob("*/*") if p.is_dir() and p.parent.name != ".medidiff"]
    assert len(folders) == STUDIES and all(check_manifest(f) is None for f in folders)

    built = loads(log)  # each worker process builds the pipeline once; the batch process never does
    workers = {pid for pid, _ in starts(log)}
    assert len(built) == len(set(built)) and workers == set(built) and held_pid in workers
    assert 2 <= len(workers) <= 3 and str(batch.pid) not in built
    events = [json.loads(line) for line in stderr.splitlines()]  # JSON lines only: Dask's own logs held back
    done = [str(e["worker"]) for e in events if e["event"] == "study_done"]
    assert len(done) == STUDIES and set(done) <= workers


def test_batches_on_an_existing_scheduler_reuse_each_workers_pipeline(tmp_path, monkeypatch):
    from distributed import LocalCluster

    pipeline, env, log = recording_pipeline(tmp_path)
    ct_series_copies(tmp_path / "in", 2)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        no_plugin = subprocess.run([*CLI, "batch", str(pipeline), str(tmp_path / "in"), "-o", str(tmp_path / "out0"),
                                    "--scheduler", cluster.scheduler_address], env=env, capture_output=True, text=True,
                                   timeout=900)  # the worker started without the stage's module on its path
        assert_user_error(no_plugin, 2, "a worker cannot build the pipeline", "cannot import stage 'recorder.Record'")
        assert health(tmp_path / "out0")["queue"]["studies"]["pending"] == 2  # nothing counted against the studies
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # a worker that imports the recording stage
    monkeypatch.syspath_prepend(env["PYTHONPATH"])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        for run in (1, 2):
            batch = subprocess.run([*CLI, "batch", str(pipeline), str(tmp_path / "in"), "-o", str(tmp_path / f"out{run}"),
                                    "--scheduler", cluster.scheduler_address], env=env, capture_output=True, text=True,
                                   timeout=900)
            assert batch.returncode == 0 and "2 done now" in batch.stdout, batch.stdout + batch.stderr
    workers = {pid for pid, _ in starts(log)}
    assert len(starts(log)) == 4 and len(workers) == 1  # both batches ran on the cluster's one worker
    assert loads(log).count(workers.pop()) == 1  # which built the pipeline once, for both batches
