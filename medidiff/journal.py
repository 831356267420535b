"""Run journal: the state of each series in an output folder, in SQLite, so runs resume.

States: ``running`` (started, not finished: redone on the next run), ``done``, ``failed``,
``skipped``. A series is identified by its output key (``<study hash>/<series hash>``: two studies
never share one) and the pipeline digest, so a changed pipeline redoes the work; the digest of its
instances is kept with the state, so a series that gained or lost images is redone too.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from medidiff.errors import OutputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS series_runs (
    series_key TEXT NOT NULL,
    pipeline_digest TEXT NOT NULL,
    content_digest TEXT NOT NULL,
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

    def __init__(self, state_dir: Path):
        path = Path(state_dir) / "journal.sqlite"
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)
        except sqlite3.Error as exc:
            raise OutputError(f"cannot write the run journal {path} ({exc}); make {path.parent} writable "
                              "or choose another output folder with -o") from None

    def state(self, series_key: str, digest: str) -> dict | None:
        """The recorded row for a series under this pipeline, or None."""
        row = self._db.execute(
            "SELECT state, message, outputs, seconds, content_digest FROM series_runs "
            "WHERE series_key=? AND pipeline_digest=?",
            (series_key, digest),
        ).fetchone()
        if row is None:
            return None
        return {"state": row[0], "message": row[1], "outputs": json.loads(row[2]), "seconds": row[3],
                "content_digest": row[4]}

    def record(
        self, series_key: str, digest: str, content_digest: str, state: str, *, message: str = "",
        outputs: list[str] | None = None, seconds: float = 0.0,
    ) -> None:
        """Record a series' state (committed at once: a killed run loses nothing recorded)."""
        self._db.execute(
            "INSERT OR REPLACE INTO series_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (series_key, digest, content_digest, state, message, json.dumps(outputs or []), seconds, time.time()),
        )

    def close(self) -> None:
        self._db.close()
