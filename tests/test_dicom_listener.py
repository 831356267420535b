"""`medidiff listen` against a real Orthanc (Debian package) as the PACS, over loopback: no network mocks.

Studies are pushed to the listener with pynetdicom's C-STORE SCU; the derived series is read back from
Orthanc's REST API (helpers in tests/orthanc.py). Orthanc is installed with apt-get when missing; the
Orthanc tests skip only when that is impossible.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTPlanStorage

from tests.batch_stages import described_studies, loads, recording_pipeline, starts
from tests.cli_runner import assert_user_error, medidiff
from tests.disks import tiny_tmpfs
from tests.orthanc import (
    LISTENER_AE,
    ORTHANC_AE,
    PUSHER_AE,
    derived_series,
    echo,
    events,
    free_port,
    listen_command,
    listener,
    orthanc,
    orthanc_binary,
    push,
    wait_for,
)
from tests.studies import ct_series_copies


@pytest.fixture(scope="module")
def orthanc_path() -> str:
    binary = orthanc_binary()
    if not binary:
        pytest.skip("Orthanc is not installed and `apt-get install orthanc` failed (needs root and the Debian archive)")
    return binary


def test_study_round_trip_to_orthanc_once_even_when_sent_twice(orthanc_path, tmp_path):
    listen_port, pacs_port = free_port(), free_port()
    study = ct_series_copies(tmp_path / "in", 1)
    study_uid = pydicom.dcmread(study[0]).StudyInstanceUID
    with orthanc(orthanc_path, tmp_path / "orthanc", pacs_port, listen_port) as url, \
            listener(tmp_path, listen_port, f"{ORTHANC_AE}@127.0.0.1:{pacs_port}") as log:
        start = time.perf_counter()
        assert push(study, listen_port) == [0x0000]
        derived = wait_for(lambda: derived_series(url), "derived series in Orthanc", log=log)
        latency = time.perf_counter() - start
        print(f"\nend-to-end latency, C-STORE in -> derived series in Orthanc (1 CT image, idle 1 s): {latency:.2f} s")
        assert derived == [{"study_uid": study_uid, "instances": 1, "image_type": derived[0]["image_type"]}]
        assert "DERIVED" in derived[0]["image_type"]

        assert push(study, listen_port) == [0x0000]  # the same study again
        second = wait_for(lambda: len(events(log, "study_complete")) >= 2 and events(log, "study_complete")[1],
                          "the second arrival's completion", log=log)
        assert second["state"] == "done"  # same instances, outputs intact: not run again
        (done,) = events(log, "study_done")
        assert (done["done"], done["queued"]) == (1, 1)
        assert derived_series(url) == derived
    assert len(list((tmp_path / "out").glob("*/*/manifest.json"))) == 1
    assert study_uid not in log.read_text()


def test_send_retried_until_orthanc_starts(orthanc_path, tmp_path):
    listen_port, pacs_port = free_port(), free_port()
    study = ct_series_copies(tmp_path / "in", 1)
    with listener(tmp_path, listen_port, f"{ORTHANC_AE}@127.0.0.1:{pacs_port}") as log:
        assert push(study, listen_port) == [0x0000]
        wait_for(lambda: events(log, "send_failed"), "a failed send to the stopped Orthanc", log=log)
        with orthanc(orthanc_path, tmp_path / "orthanc", pacs_port, listen_port) as url:
            derived = wait_for(lambda: derived_series(url), "delivery once Orthanc is up", log=log)
        assert [d["study_uid"] for d in derived] == [pydicom.dcmread(study[0]).StudyInstanceUID]
        assert events(log, "sent")[-1]["pending"] == 0


def test_outbox_survives_a_listener_restart(orthanc_path, tmp_path):
    listen_port, pacs_port = free_port(), free_port()
    study = ct_series_copies(tmp_path / "in", 1)
    destination = f"{ORTHANC_AE}@127.0.0.1:{pacs_port}"
    with listener(tmp_path, listen_port, destination) as log:
        assert push(study, listen_port) == [0x0000]
        wait_for(lambda: events(log, "send_failed"), "a failed send to the stopped Orthanc", log=log)
    assert events(log, "stopped")[-1]["pending"] == 1
    with orthanc(orthanc_path, tmp_path / "orthanc", pacs_port, listen_port) as url, \
            listener(tmp_path, listen_port, destination):
        derived = wait_for(lambda: derived_series(url), "delivery by the restarted listener", log=log)
    assert [(d["study_uid"], d["instances"]) for d in derived] == [(pydicom.dcmread(study[0]).StudyInstanceUID, 1)]
    assert len(events(log, "study_done")) == 1  # the restart did not redo the study


def test_unknown_ae_non_image_garbage_and_second_listener_refused_listener_keeps_serving(tmp_path):
    port = free_port()
    no_pixels = pydicom.dcmread(ct_series_copies(tmp_path / "in", 1)[0])
    del no_pixels.PixelData
    with listener(tmp_path, port) as log:
        assert not echo(port, "INTRUDER")
        wait_for(lambda: events(log, "association_rejected"), "a logged rejection", log=log)
        assert events(log, "association_rejected")[0]["calling_ae"] == "INTRUDER"

        ae = AE(ae_title=PUSHER_AE)
        ae.add_requested_context(RTPlanStorage)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CTImageStorage]
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(pydicom.dcmread(get_testdata_file("rtplan.dcm")))
        assert assoc.send_c_store(no_pixels).Status == 0xA900
        assoc.release()

        with socket.create_connection(("127.0.0.1", port)) as sock:  # not a DICOM association at all
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
        second = medidiff("listen", "normalize-preview", "--ae-title", LISTENER_AE, "--port", free_port(),
                          "-o", tmp_path / "out")
        assert_user_error(second, 2, "in use by another medidiff run")

        assert echo(port, PUSHER_AE)
    assert not list((tmp_path / "out" / ".medidiff" / "listener" / "incoming").glob("*/*.dcm"))


def test_listener_killed_with_a_study_on_a_dask_worker_and_two_queued_loses_none_and_repeats_none(
        orthanc_path, tmp_path):
    pipeline, env, log = recording_pipeline(tmp_path, hold_at=1)
    held, waits, fails = described_studies(tmp_path / "in", ["HELD", "WAITS", "FAILS"])
    listen_port, pacs_port = free_port(), free_port()
    destination = f"{ORTHANC_AE}@127.0.0.1:{pacs_port}"
    retries = ("--max-attempts", "2", "--retry-delay", "0.1")
    with orthanc(orthanc_path, tmp_path / "orthanc", pacs_port, listen_port) as url:
        first_log = tmp_path / "first.log"
        with open(first_log, "wb") as stderr:
            first = subprocess.Popen(listen_command(tmp_path, listen_port, destination, 1.0, str(pipeline), *retries,
                                                    "--workers", "1"), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for(lambda: echo(listen_port, PUSHER_AE), "the listener with its Dask worker", 600, first_log)
            assert push([held], listen_port) == [0x0000]
            worker_pid, held_key = wait_for(lambda: log.exists() and starts(log) and starts(log)[0],
                                            "the held study's start on the worker", log=first_log)
            assert push([waits, fails], listen_port) == [0x0000, 0x0000]
            wait_for(lambda: len(events(first_log, "study_complete")) == 3, "both studies queued", log=first_log)
        finally:
            first.kill()  # SIGKILL: one study mid-run on the worker, two received and queued, not started
            first.wait()
        assert [e["state"] for e in events(first_log, "study_complete")] == ["pending"] * 3
        wait_for(lambda: not psutil.pid_exists(int(worker_pid)), "the worker's end with its listener")
        assert not derived_series(url)

        (tmp_path / "release").touch()
        with listener(tmp_path, listen_port, destination, 1.0, str(pipeline), *retries, env=env) as second_log:
            wait_for(lambda: len(derived_series(url)) == 2 and events(second_log, "study_quarantined"),
                     "two studies in Orthanc and one quarantined", log=second_log)
        derived = derived_series(url)
    uids = {pydicom.dcmread(path).StudyInstanceUID for path in (held, waits)}
    assert sorted((d["study_uid"], d["instances"]) for d in derived) == sorted((uid, 1) for uid in uids)
    assert [e["event"] for e in events(second_log, "study_interrupted")] == ["study_interrupted"]
    keys = [key for _, key in starts(log)]
    assert keys.count(held_key) == 2 and len(keys) == 5 and len(set(keys)) == 3  # held redone once, FAILS twice
    assert sorted(keys.count(k) for k in set(keys)) == [1, 2, 2]
    assert str(first.pid) not in loads(log)  # the pipeline was built on the worker, not in the listener
    health = json.loads(medidiff("status", tmp_path / "out").stdout)
    assert health["queue"]["studies"] == {"pending": 0, "running": 0, "done": 2, "quarantined": 1}
    assert "this series is fails" in health["queue"]["quarantined"][0]["reason"]
    assert health["listener"] == {"studies_waiting": 0, "studies_queued": 3}
    assert health["outboxes"] == {"listener/outbox": {}}  # everything sent
    assert not any(uid in second_log.read_text() for uid in uids)


@pytest.fixture
def tiny_disk(tmp_path):
    """``tmp_path/out`` on a 2 MB tmpfs (needs root to mount)."""
    with tiny_tmpfs(tmp_path / "out", "2m") as mount:
        yield mount


def test_full_spool_disk_refuses_the_instance_and_keeps_serving(tiny_disk, tmp_path):
    port = free_port()
    study = ct_series_copies(tmp_path / "in", 1)
    with listener(tmp_path, port) as log:
        filler = tiny_disk / "filler"
        stats = os.statvfs(tiny_disk)
        filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 8192))  # less room than one CT image
        assert push(study, port) == [0xA700]  # out of resources
        assert events(log, "instance_not_stored")[0]["reason"] == "No space left on device"
        incoming = tiny_disk / ".medidiff" / "listener" / "incoming"
        assert not [p for p in incoming.rglob("*") if p.is_file() and p.name != "studies.sqlite"]

        filler.unlink()
        assert push(study, port) == [0x0000]
        processed = wait_for(lambda: events(log, "study_done"), "the study once there is room", log=log)
    assert processed[0]["done"] == 1


def _associate_rq(items: bytes, called: bytes = b"MEDIDIFF".ljust(16), calling: bytes = PUSHER_AE.encode().ljust(16),
                  length_delta: int = 0) -> bytes:
    """An A-ASSOCIATE-RQ PDU with the given variable items (its length field off by ``length_delta``)."""
    body = b"\x00\x01\x00\x00" + called + calling + bytes(32) + items
    return b"\x01\x00" + (len(body) + length_delta).to_bytes(4, "big") + body


MALFORMED_ASSOCIATIONS = {
    "unknown item type": _associate_rq(b"\xee\x00\x00\x04abcd"),
    "item longer than the PDU": _associate_rq(b"\x10\x00\x00\xff" + b"1.2.840.10008.3.1.1.1"),
    "PDU length beyond the data": _associate_rq(b"", length_delta=4096),
    "no presentation context": _associate_rq(b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"),
    "truncated header": b"\x01\x00\x00\x00",
    "unknown PDU type": b"\x09\x00\x00\x00\x00\x04abcd",
}


def test_malformed_associations_are_dropped_and_the_listener_keeps_serving(tmp_path):
    port = free_port()
    with listener(tmp_path, port) as log:
        for name, pdu in MALFORMED_ASSOCIATIONS.items():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(pdu)
                sock.shutdown(socket.SHUT_WR)
                answer = sock.recv(1024)  # an A-ASSOCIATE-RJ or A-ABORT, or the connection closed
            assert answer[:1] in (b"", b"\x03", b"\x07"), (name, answer)
            assert echo(port, PUSHER_AE), name
        study = ct_series_copies(tmp_path / "in", 1)
        assert push(study, port) == [0x0000]
        wait_for(lambda: events(log, "study_done"), "the study after the malformed associations", log=log)
    assert "Traceback" not in log.read_text()
