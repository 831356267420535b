"""An output folder of ``medidiff run``: one run at a time, whole series folders, verified on re-run.

- :meth:`OutputFolder.lock` takes an exclusive ``flock`` on ``OUT/.medidiff/lock`` (released by the
  kernel even after ``kill -9``); a second run on the same folder gets an error naming the holder.
- Each series is written into a hidden ``.<key>.partial-*`` folder with a ``manifest.json`` (every
  file's size and sha256) written last, then renamed into place; :meth:`verify` checks a finished
  folder against its manifest, so a re-run redoes anything incomplete or tampered with.
- Leftovers of killed runs (partial and replaced folders) are removed when the lock is taken.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medidiff.errors import OutputError
from medidiff.io.atomic import atomic_dir

STATE_DIR = ".medidiff"
MANIFEST = "manifest.json"
LEFTOVER_PATTERNS = (".*.partial-*", ".*.old-*")
STUDY_FOLDER = re.compile(r"[0-9a-f]{12}")


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def input_root(input_path: Path) -> Path:
    """The folder an input occupies: the folder itself, a DICOMDIR's folder, or the single file."""
    if input_path.is_dir():
        return input_path.resolve()
    if input_path.name.upper() == "DICOMDIR":
        return input_path.resolve().parent
    return input_path.resolve()


class OutputFolder:
    """``OUT/``: series folders ``OUT/<study hash>/<series key>/``, bookkeeping in ``OUT/.medidiff/``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_dir = self.path / STATE_DIR

    def prepare(self, input_path: Path) -> None:
        """Refuse an output inside (or equal to) the input; create the folder; check it is writable."""
        root = input_root(input_path)
        if _is_within(self.path.resolve(), root) or (root.is_file() and self.path.resolve() == root):
            raise OutputError(f"output folder {self.path} is inside the input {input_path}, which must never be "
                              "modified; choose an output folder outside it with -o")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.path}: {exc.strerror}; "
                              "choose another with -o") from None
        for folder in (self.path, self.state_dir):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputError(f"output folder {folder} is not writable; make it writable or choose "
                                  "another with -o")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder exclusively for this process; clean leftovers of killed runs first."""
        path = self.state_dir / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot open the lock file {path}: {exc.strerror}; make {self.state_dir} "
                              "writable or choose another output folder with -o") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(f"output folder {self.path} is in use by another medidiff run "
                                  f"({self._holder(path)}); wait for it to finish or choose another "
                                  "output folder with -o") from None
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            self.remove_leftovers()
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _holder(path: Path) -> str:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def remove_leftovers(self) -> None:
        """Delete partial and replaced series folders and reports that killed runs left behind (call under
        the lock). Only medidiff's own names are touched: study folders are 12-hex-digit hashes."""
        leftovers = list(self.path.glob(".report.*.partial-*"))
        for study in self.path.iterdir():
            if study.is_dir() and STUDY_FOLDER.fullmatch(study.name):
                leftovers += [p for pattern in LEFTOVER_PATTERNS for p in study.glob(pattern)]
        for leftover in leftovers:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    @contextmanager
    def series_writer(self, key: str) -> Iterator[Path]:
        """Yield a temporary folder for series ``key`` (``study/series``); on success it gets its manifest
        and replaces ``OUT/key`` whole."""
        with atomic_dir(self.path / key) as tmp:
            yield tmp
            write_manifest(tmp)

    def verify(self, key: str) -> str | None:
        """None if ``OUT/key`` matches its manifest, else what is wrong."""
        return check_manifest(self.path / key)

    def files(self, key: str) -> list[str]:
        """The output files of series ``key``, relative to the output folder."""
        folder = self.path / key
        return sorted(str(p.relative_to(self.path)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path) -> None:
    """Record every file of ``folder`` (size, sha256) in ``folder/manifest.json``."""
    entries = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _listing(folder).items()}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1), encoding="utf-8")


def check_manifest(folder: Path) -> str | None:
    """None when ``folder`` holds exactly the files of its manifest, unchanged; else the first problem."""
    try:
        entries = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its folder or manifest is missing"
    present = _listing(folder)
    if set(present) != set(entries):
        return "files are missing or unexpected"
    for rel, path in present.items():
        if path.stat().st_size != entries[rel]["size"] or _sha256(path) != entries[rel]["sha256"]:
            return "a file differs from the manifest"
    return None
