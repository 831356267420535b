"""A full disk for fault tests: a small tmpfs mounted on a test folder (needs root; skips otherwise)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tiny_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """``mount`` (created) on a tmpfs of ``size`` (e.g. ``2m``), unmounted afterwards."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs to simulate a full disk needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
