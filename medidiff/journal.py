"""Run journal: the state of each series in an output folder, in SQLite, so runs resume.

States: ``running`` (started, not finished: redone on the next run), ``done``, ``failed``,
``skipped``. A series is identified by its hashed key and the pipeline digest, so a changed
pipeline redoes the work.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_key TEXT NOT NULL,
    pipeline_digest TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    seconds REAL NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (series_key, pipeline_digest)
)
"""


class Journal:
    """SQLite journal in ``<output>/.medidiff/journal.sqlite``."""

    def __init__(self, output_dir: Path):
        path = Path(output_dir) / ".medidiff" / "journal.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)

    def state(self, series_key: str, digest: str) -> dict | None:
        """The recorded row for a series under this pipeline, or None."""
        row = self._db.execute(
            "SELECT state, message, outputs, seconds FROM series WHERE series_key=? AND pipeline_digest=?",
            (series_key, digest),
        ).fetchone()
        if row is None:
            return None
        return {"state": row[0], "message": row[1], "outputs": json.loads(row[2]), "seconds": row[3]}

    def record(
        self, series_key: str, digest: str, state: str, *, message: str = "",
        outputs: list[str] | None = None, seconds: float = 0.0,
    ) -> None:
        """Record a series' state (committed at once: a killed run loses nothing recorded)."""
        self._db.execute(
            "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?, ?)",
            (series_key, digest, state, message, json.dumps(outputs or []), seconds, time.time()),
        )

    def close(self) -> None:
        self._db.close()
