"""I/O fixtures: pydicom's bundled test files (never downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per test process (xdist runs one per core)

import shutil
from pathlib import Path

import pydicom.data
import pytest

pytest_plugins = ["tests.mlflow_server"]


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def pydicom_files_dir() -> Path:
    """pydicom's test-file folder (read-only: copy before modifying)."""
    return Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, pydicom_files_dir) -> Path:
    """A copy of every pydicom test file, folders included."""
    target = tmp_path_factory.mktemp("corpus") / "files"
    shutil.copytree(pydicom_files_dir, target)
    return target

