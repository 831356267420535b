"""A real Orthanc (Debian package) as the PACS and `medidiff listen` in a subprocess, on loopback.

Shared by tests/test_dicom_listener.py, tests/test_dicomweb.py, tests/test_scaleout.py and benchmarks/: start
both, push studies by C-STORE (pynetdicom SCU) or upload them over REST, read what arrived in Orthanc back
by DICOMweb (QIDO-RS, WADO-RS; Orthanc serves it under /dicom-web/ with the orthanc-dicomweb plugin).
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
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.cli_runner import CLI

LISTENER_AE, PUSHER_AE, ORTHANC_AE = "MEDIDIFF", "MODALITY", "ORTHANC"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DERIVED_DESCRIPTION = "medidiff normalized 256px"  # pipelines/normalize-preview.yaml


def orthanc_binary() -> str | None:
    """The Orthanc executable (its DICOMweb plugin installed), installed with apt-get when missing; None when
    that is impossible."""
    if not shutil.which("Orthanc") or not DICOMWEB_PLUGIN.is_file():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-qq", "orthanc", "orthanc-dicomweb"], capture_output=True,
                           timeout=600)
    return shutil.which("Orthanc") if DICOMWEB_PLUGIN.is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what: str, seconds: float = 120.0, log: Path | None = None):
    """Poll ``condition`` until it returns something truthy; else AssertionError naming ``what`` (and the log)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {seconds:.0f} s" +
                         (f"; listener log:\n{log.read_text()}" if log else ""))


@contextlib.contextmanager
def orthanc(binary: str, folder: Path, dicom_port: int, listener_port: int, *, http_port: int | None = None):
    """A throw-away Orthanc that accepts C-STORE from the listener's AE only, with DICOMweb under /dicom-web/;
    yields its REST URL. Its database in ``folder`` outlives it (a restart keeps the studies)."""
    http_port = http_port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medidiff-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": ORTHANC_AE, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True, "DicomModalities": {"medidiff": [LISTENER_AE, "127.0.0.1", listener_port]},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: get(url, "/system") is not None or process.poll() is not None, "Orthanc start", 60)
        assert process.poll() is None, (folder / "orthanc.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(30)


def get(url: str, path: str):
    """Orthanc's REST answer as JSON, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url + path, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def upload(url: str, paths: list[Path]) -> None:
    """Store DICOM files in Orthanc through its REST API (as a modality's earlier sends would have)."""
    for path in paths:
        request = urllib.request.Request(url + "/instances", data=path.read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["Status"] in ("Success", "AlreadyStored")


def derived_series(url: str, description: str = DERIVED_DESCRIPTION) -> list[dict]:
    """The series medidiff wrote into Orthanc (by their SeriesDescription), read back by DICOMweb (QIDO-RS
    search, WADO-RS metadata): [{study_uid, instances, image_type}]."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url + "/dicom-web")
    found = []
    for series in client.search_for_series():  # filtered here: Orthanc finds no description with a space in it
        if series.get("0008103E", {}).get("Value") != [description]:
            continue
        study_uid, series_uid = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
        instances = client.retrieve_series_metadata(study_uid, series_uid)
        found.append({"study_uid": study_uid, "instances": len(instances),
                      "image_type": "\\".join(instances[0].get("00080008", {}).get("Value", []))})
    return sorted(found, key=lambda series: series["study_uid"])


def listen_command(folder: Path, port: int, destination: str | None = None, idle_seconds: float = 1.0,
                   pipeline: str = "normalize-preview", *options: str) -> list[str]:
    """`medidiff listen PIPELINE` into ``folder/out`` on loopback, accepting the pusher's AE, with ``options``."""
    args = [*CLI, "listen", pipeline, "--ae-title", LISTENER_AE, "--port", str(port), "--bind",
            "127.0.0.1", "-o", str(folder / "out"), "--allow", PUSHER_AE, "--idle-seconds", str(idle_seconds), *options]
    return args + ["--destination", destination] if destination else args


@contextlib.contextmanager
def listener(folder: Path, port: int, destination: str | None = None, idle_seconds: float = 1.0,
             pipeline: str = "normalize-preview", *options: str, env: dict | None = None):
    """:func:`listen_command` in a subprocess; yields its JSON-lines log (``folder/listener.log``); stops it with
    SIGTERM and checks that it stopped cleanly."""
    log = folder / "listener.log"
    with open(log, "ab") as stderr:
        process = subprocess.Popen(listen_command(folder, port, destination, idle_seconds, pipeline, *options),
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    stops_before = len(events(log, "stopped"))
    try:
        wait_for(lambda: echo(port, PUSHER_AE) or process.poll() is not None, "listener start", 600, log)
        assert process.poll() is None, log.read_text()
        yield log
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()
    assert len(events(log, "stopped")) == stops_before + 1, log.read_text()


def events(log: Path, name: str) -> list[dict]:
    """The listener's logged events called ``name``, in order."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e["event"] == name]


def echo(port: int, calling_ae: str) -> bool:
    """True when the listener accepts an association from ``calling_ae`` and answers C-ECHO."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.get("Status") == 0x0000


def push(paths: list[Path], port: int) -> list[int]:
    """C-STORE the image files ``paths`` to the listener over one association (a presentation context per SOP
    class and transfer syntax among them); the status of each."""
    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title=PUSHER_AE)
    for sop_class, syntax in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return statuses
