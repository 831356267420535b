"""`medidiff listen` against a real Orthanc (Debian package) as the PACS, over loopback: no network mocks.

Studies are pushed to the listener with pynetdicom's C-STORE SCU; the derived series is read back from
Orthanc's REST API. Orthanc is installed with apt-get when missing; the Orthanc tests skip only when
that is impossible.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTPlanStorage, Verification

from tests.cli_runner import CLI
from tests.studies import ct_series_copies

LISTENER_AE, PUSHER_AE, ORTHANC_AE = "MEDIDIFF", "MODALITY", "ORTHANC"
DERIVED_DESCRIPTION = "medidiff normalized 256px"  # pipelines/normalize-preview.yaml


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition, what: str, seconds: float = 120.0, log: Path | None = None):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` (and the listener log)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {seconds:.0f} s" + (f"; listener log:\n{log.read_text()}" if log else ""))


@pytest.fixture(scope="module")
def orthanc_binary() -> str:
    """The Orthanc executable, installed from Debian when missing (skip only if that is impossible)."""
    if not shutil.which("Orthanc"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-qq", "orthanc"], capture_output=True, timeout=600)
    binary = shutil.which("Orthanc")
    if not binary:
        pytest.skip("Orthanc is not installed and `apt-get install orthanc` failed (needs root and the Debian archive)")
    return binary


@contextlib.contextmanager
def orthanc(binary: str, folder: Path, dicom_port: int, listener_port: int):
    """A throw-away Orthanc on loopback that accepts C-STORE from the listener's AE only; yields its REST URL."""
    http_port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medidiff-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": ORTHANC_AE, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [], "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True, "DicomModalities": {"medidiff": [LISTENER_AE, "127.0.0.1", listener_port]},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_for(lambda: _get(url, "/system") is not None or process.poll() is not None, "Orthanc start", 60)
        assert process.poll() is None, (folder / "orthanc.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _get(url: str, path: str):
    try:
        with urllib.request.urlopen(url + path, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def _derived_series(url: str) -> list[dict]:
    """Orthanc's series written by medidiff: [{study_uid, instances, image_type}]."""
    found = []
    for study in _get(url, "/studies?expand") or []:
        for series_id in study["Series"]:
            series = _get(url, f"/series/{series_id}")
            if series["MainDicomTags"].get("SeriesDescription") == DERIVED_DESCRIPTION:
                tags = _get(url, f"/instances/{series['Instances'][0]}/simplified-tags")
                found.append({"study_uid": study["MainDicomTags"]["StudyInstanceUID"],
                              "instances": len(series["Instances"]), "image_type": tags.get("ImageType", "")})
    return found


@contextlib.contextmanager
def listener(folder: Path, port: int, destination: str | None = None):
    """`medidiff listen normalize-preview` in a subprocess; yields its JSON-lines log; stops it with SIGTERM."""
    args = [*CLI, "listen", "normalize-preview", "--ae-title", LISTENER_AE, "--port", str(port), "--bind",
            "127.0.0.1", "-o", str(folder / "out"), "--allow", PUSHER_AE, "--idle-seconds", "1"]
    if destination:
        args += ["--destination", destination]
    log = folder / "listener.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_for(lambda: _echo(port, PUSHER_AE) or process.poll() is not None, "listener start", log=log)
        assert process.poll() is None, log.read_text()
        yield log
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()
    assert _events(log, "stopped"), log.read_text()


def _events(log: Path, name: str) -> list[dict]:
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == name]


def _echo(port: int, calling_ae: str) -> bool:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.get("Status") == 0x0000


def _push(paths: list[Path], port: int) -> list[int]:
    """C-STORE ``paths`` to the listener; the status of each."""
    ae = AE(ae_title=PUSHER_AE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in paths]
    assoc.release()
    return statuses


def test_study_round_trip_to_orthanc_once_even_when_sent_twice(orthanc_binary, tmp_path):
    listen_port, pacs_port = _free_port(), _free_port()
    study = ct_series_copies(tmp_path / "in", 1)
    study_uid = pydicom.dcmread(study[0]).StudyInstanceUID
    with orthanc(orthanc_binary, tmp_path / "orthanc", pacs_port, listen_port) as url, \
            listener(tmp_path, listen_port, f"{ORTHANC_AE}@127.0.0.1:{pacs_port}") as log:
        start = time.perf_counter()
        assert _push(study, listen_port) == [0x0000]
        derived = _wait_for(lambda: _derived_series(url), "derived series in Orthanc", log=log)
        latency = time.perf_counter() - start
        print(f"\nend-to-end latency, C-STORE in -> derived series in Orthanc (1 CT image, idle 1 s): {latency:.2f} s")
        assert derived == [{"study_uid": study_uid, "instances": 1, "image_type": derived[0]["image_type"]}]
        assert "DERIVED" in derived[0]["image_type"]

        assert _push(study, listen_port) == [0x0000]  # the same study again
        second = _wait_for(lambda: len(_events(log, "study_processed")) >= 2 and _events(log, "study_processed")[1],
                           "second processing", log=log)
        assert (second["done"], second["already_done"], second["queued"]) == (0, 1, 0)
        assert _derived_series(url) == derived
    assert len(list((tmp_path / "out").glob("*/*/manifest.json"))) == 1
    assert study_uid not in log.read_text()


def test_send_retried_until_orthanc_starts(orthanc_binary, tmp_path):
    listen_port, pacs_port = _free_port(), _free_port()
    study = ct_series_copies(tmp_path / "in", 1)
    with listener(tmp_path, listen_port, f"{ORTHANC_AE}@127.0.0.1:{pacs_port}") as log:
        assert _push(study, listen_port) == [0x0000]
        _wait_for(lambda: _events(log, "send_failed"), "a failed send to the stopped Orthanc", log=log)
        with orthanc(orthanc_binary, tmp_path / "orthanc", pacs_port, listen_port) as url:
            derived = _wait_for(lambda: _derived_series(url), "delivery once Orthanc is up", log=log)
        assert [d["study_uid"] for d in derived] == [pydicom.dcmread(study[0]).StudyInstanceUID]
        assert _events(log, "sent")[-1]["pending"] == 0


def test_unknown_calling_ae_and_non_image_rejected_listener_keeps_serving(tmp_path):
    port = _free_port()
    no_pixels = pydicom.dcmread(ct_series_copies(tmp_path / "in", 1)[0])
    del no_pixels.PixelData
    with listener(tmp_path, port) as log:
        assert not _echo(port, "INTRUDER")
        _wait_for(lambda: _events(log, "association_rejected"), "a logged rejection", log=log)
        assert _events(log, "association_rejected")[0]["calling_ae"] == "INTRUDER"

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

        assert _echo(port, PUSHER_AE)
    assert not list((tmp_path / "out" / ".medidiff" / "listener" / "incoming").glob("*/*.dcm"))
