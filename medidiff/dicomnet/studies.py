"""The listener's incoming spool: received instances grouped by study, complete after an idle time.

Instances are written to ``ROOT/<study hash>/<instance hash>.dcm`` through a temporary file renamed
into place, so the pipeline never sees a half-written file. ``ROOT/studies.sqlite`` records when each
study last received an instance and when it was last queued for processing (column ``processed``), so
a restarted listener queues the studies it had not queued yet. Instances stay here (the work queue
runs the study from its folder).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from medidiff.io.privacy import hash_identifier

SCHEMA = "CREATE TABLE IF NOT EXISTS studies (study TEXT PRIMARY KEY, received REAL NOT NULL, processed REAL)"


class StudySpool:
    """Received instances under ``root``, grouped by hashed StudyInstanceUID (one listener per ``root``)."""

    def __init__(self, root: Path, salt: str):
        self.root, self._salt = Path(root), salt
        self._tmp = self.root / ".receiving"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():  # instances whose C-STORE a killed listener never confirmed
            leftover.unlink()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "studies.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute(SCHEMA)

    def store(self, study_uid: str, instance_uid: str, data: bytes) -> str:
        """Write one instance (a DICOM file's bytes) atomically; returns the study's hashed key."""
        study = hash_identifier(study_uid, self._salt)
        folder = self.root / study
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"{hash_identifier(instance_uid, self._salt)}.dcm")
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.touch(study)
        return study

    def touch(self, study: str) -> None:
        """Note an arrival now: the study becomes complete again after the idle time."""
        with self._lock:
            self._db.execute("INSERT INTO studies VALUES (?, ?, NULL) "
                             "ON CONFLICT(study) DO UPDATE SET received = excluded.received", (study, time.time()))

    def complete(self, idle_seconds: float) -> list[str]:
        """Studies with instances not yet queued and no arrival for ``idle_seconds``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study FROM studies WHERE (processed IS NULL OR processed < received) AND received <= ? "
                "ORDER BY received", (time.time() - idle_seconds,)).fetchall()
        return [study for (study,) in rows]

    def mark_queued(self, study: str, started: float) -> None:
        """Record that the study was queued as it was at ``started``: instances received after it make it due
        again."""
        with self._lock:
            self._db.execute("UPDATE studies SET processed = ? WHERE study = ?", (started, study))

    def folder(self, study: str) -> Path:
        return self.root / study

    def close(self) -> None:
        with self._lock:
            self._db.close()
