"""Pytest fixtures: a real ``mlflow server`` (sqlite backend, proxied artifacts) on a free port.

Enable with ``pytest_plugins = ["tests.mlflow_server"]`` in tests/conftest.py; tests take ``mlflow_server``
(the tracking URI, e.g. ``http://127.0.0.1:54321``), session-wide; ``stoppable_mlflow_server`` is one
server per test, for tests that stop it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(uri: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running_server(root: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow server`` with its store and artifacts in ``root``: yields (URI, process); stops it afterwards
    (a test may stop it earlier with :func:`stop`)."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | {"MLFLOW_TRACKING_URI": ""},
        )
    try:
        _wait_healthy(uri, process, log)
        yield uri, process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Stop a server started by :func:`running_server` (and its workers)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _require_mlflow_command() -> None:
    if shutil.which("mlflow", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the mlflow command is not installed next to this Python")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """Start ``mlflow server`` in a temporary folder; yield its URI; stop it afterwards."""
    _require_mlflow_command()
    with running_server(tmp_path_factory.mktemp("mlflow-server")) as (uri, _):
        yield uri


@pytest.fixture()
def stoppable_mlflow_server(tmp_path_factory) -> tuple[str, subprocess.Popen]:
    """A server of the test's own, (URI, process), for tests that stop it (:func:`stop`)."""
    _require_mlflow_command()
    with running_server(tmp_path_factory.mktemp("mlflow-stoppable")) as server:
        yield server
