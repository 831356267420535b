"""The durable work queue of `medidiff batch`: one row per study and pipeline, in SQLite.

``OUT/.medidiff/queue.sqlite`` holds each study's state (``pending``, ``running``, ``done``,
``quarantined``), its attempts and the time of its next try; ``history`` keeps one row per attempt
(outcome, reason, seconds) for the health summary. Every change is committed at once, so a killed
process loses nothing: a study still ``running`` when the queue is opened again was interrupted and
goes back to ``pending`` (:meth:`WorkQueue.recover`; that attempt counts). A failed attempt is retried after an exponential backoff;
a study that fails ``max_attempts`` times is quarantined with its last reason and left alone until its
instances change or the operator asks for it again. Study keys are salted hashes: no patient data.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from medidiff.errors import OutputError

QUEUE_FILE = "queue.sqlite"  # in OUT/.medidiff/
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    study TEXT NOT NULL,
    pipeline_digest TEXT NOT NULL,
    content_digest TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (study, pipeline_digest)
);
CREATE TABLE IF NOT EXISTS history (
    study TEXT NOT NULL,
    pipeline_digest TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL NOT NULL DEFAULT 0,
    time REAL NOT NULL
);
"""
STATES = ("pending", "running", "done", "quarantined")


class WorkQueue:
    """Studies of one output folder under one pipeline; open it under the output folder's lock."""

    def __init__(self, state_dir: Path, pipeline_digest: str, *, max_attempts: int = 3, first_delay: float = 5.0,
                 max_delay: float = 300.0):
        self.path = Path(state_dir) / QUEUE_FILE
        self.digest, self.max_attempts = pipeline_digest, max_attempts
        self.first_delay, self.max_delay = first_delay, max_delay
        with self._writing("open"):
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    @contextmanager
    def _writing(self, what: str):
        """SQLite errors (a full disk, a read-only folder) as one clear OutputError."""
        try:
            yield
        except sqlite3.Error as exc:
            raise OutputError(f"cannot {what} the work queue {self.path} ({exc}); free space or make "
                              f"{self.path.parent} writable, then run the same command again to resume") from None

    def recover(self) -> list[str]:
        """Put the studies a killed process left ``running`` back to pending (or to quarantine once out of
        attempts); call once, before any attempt starts. Returns their keys."""
        with self._writing("update"):
            interrupted = [s for (s,) in self._db.execute(
                "SELECT study FROM items WHERE state='running' AND pipeline_digest=?", (self.digest,))]
            for study in interrupted:
                self._history(study, "interrupted", "the process stopped during the attempt", 0.0)
                self._after_failure(study, "interrupted: the process stopped during the attempt (killed or crashed)")
        return interrupted

    def enqueue(self, studies: dict[str, str], *, intact=lambda study: True, retry_quarantined: bool = False) -> None:
        """Bring the queue in line with ``studies`` (key -> content digest): new or changed studies, and done
        studies whose outputs are not ``intact(study)`` any more, become pending (attempts from zero)."""
        now = time.time()
        with self._writing("update"):
            for study, content in studies.items():
                row = self._db.execute("SELECT content_digest, state FROM items WHERE study=? AND pipeline_digest=?",
                                       (study, self.digest)).fetchone()
                if row is None or row[0] != content or (retry_quarantined and row[1] == "quarantined") or \
                        row[1] == "done" and not intact(study):
                    self._db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, 'pending', 0, 0, '', ?)",
                                     (study, self.digest, content, now))

    def studies(self, state: str) -> list[str]:
        """The studies in ``state`` under this pipeline."""
        return [s for (s,) in self._db.execute("SELECT study FROM items WHERE state=? AND pipeline_digest=?",
                                               (state, self.digest))]

    def due(self, limit: int, among: set[str]) -> list[str]:
        """Up to ``limit`` pending studies of ``among`` whose next try is due, oldest first."""
        rows = self._db.execute("SELECT study FROM items WHERE state='pending' AND pipeline_digest=? AND next_try<=? "
                                "ORDER BY next_try, updated", (self.digest, time.time())).fetchall()
        return [s for (s,) in rows if s in among][:limit]

    def next_due_in(self, among: set[str]) -> float | None:
        """Seconds until the next pending study of ``among`` is due (0 when one is), None when none is pending."""
        rows = self._db.execute("SELECT study, next_try FROM items WHERE state='pending' AND pipeline_digest=?",
                                (self.digest,)).fetchall()
        times = [t for s, t in rows if s in among]
        return max(0.0, min(times) - time.time()) if times else None

    def start(self, study: str) -> int:
        """Mark ``study`` running (one more attempt, committed before any work); returns the attempt number."""
        with self._writing("update"):
            self._db.execute("UPDATE items SET state='running', attempts=attempts+1, updated=? "
                             "WHERE study=? AND pipeline_digest=?", (time.time(), study, self.digest))
        return self.item(study)["attempts"]

    def release(self, study: str) -> None:
        """Put a running study back to pending, its attempt not counted (the attempt never ran)."""
        with self._writing("update"):
            self._db.execute("UPDATE items SET state='pending', attempts=MAX(attempts-1, 0), updated=? "
                             "WHERE study=? AND pipeline_digest=? AND state='running'", (time.time(), study, self.digest))

    def finish(self, study: str, *, ok: bool, reason: str = "", seconds: float = 0.0) -> str:
        """Record an attempt's outcome; returns the study's new state (done, pending for a retry, quarantined)."""
        with self._writing("update"):
            self._history(study, "done" if ok else "failed", reason, seconds)
            if ok:
                self._db.execute("UPDATE items SET state='done', reason='', updated=? WHERE study=? "
                                 "AND pipeline_digest=?", (time.time(), study, self.digest))
            else:
                self._after_failure(study, reason)
        return self.item(study)["state"]

    def _after_failure(self, study: str, reason: str) -> None:
        """Pending again after a backoff, or quarantined once ``max_attempts`` attempts have failed."""
        attempts = self.item(study)["attempts"]
        if attempts >= self.max_attempts:
            self._db.execute("UPDATE items SET state='quarantined', reason=?, updated=? WHERE study=? "
                             "AND pipeline_digest=?", (reason, time.time(), study, self.digest))
        else:
            delay = min(self.first_delay * 2 ** max(attempts - 1, 0), self.max_delay)
            self._db.execute("UPDATE items SET state='pending', reason=?, next_try=?, updated=? WHERE study=? "
                             "AND pipeline_digest=?", (reason, time.time() + delay, time.time(), study, self.digest))

    def _history(self, study: str, outcome: str, reason: str, seconds: float) -> None:
        self._db.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (study, self.digest, self.item(study)["attempts"], outcome, reason, seconds, time.time()))

    def item(self, study: str) -> dict:
        row = self._db.execute("SELECT state, attempts, reason, next_try FROM items WHERE study=? AND pipeline_digest=?",
                               (study, self.digest)).fetchone()
        return {"state": row[0], "attempts": row[1], "reason": row[2], "next_try": row[3]}

    def state(self, study: str) -> str:
        return self.item(study)["state"]

    def retry_in(self, study: str) -> float:
        """Seconds until a pending study's next try."""
        return max(0.0, round(self.item(study)["next_try"] - time.time(), 1))

    def close(self) -> None:
        self._db.close()


def queue_summary(state_dir: Path) -> dict | None:
    """Counts by state, attempts, mean seconds per done study and the quarantine (with reasons) of the
    queue in ``state_dir``, all pipelines together; None when there is no queue there."""
    path = Path(state_dir) / QUEUE_FILE
    if not path.is_file():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        counts = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM history GROUP BY outcome").fetchall())
        mean = db.execute("SELECT AVG(seconds) FROM history WHERE outcome='done'").fetchone()[0]
        quarantine = db.execute("SELECT study, attempts, reason FROM items WHERE state='quarantined' "
                                "ORDER BY updated").fetchall()
    return {
        "studies": {state: counts.get(state, 0) for state in STATES},
        "queue_length": counts.get("pending", 0) + counts.get("running", 0),
        "processed": outcomes.get("done", 0),
        "failed_attempts": outcomes.get("failed", 0),
        "interrupted_attempts": outcomes.get("interrupted", 0),
        "seconds_per_study": round(mean, 3) if mean is not None else None,
        "quarantined": [{"study": s, "attempts": a, "reason": r} for s, a, r in quarantine],
    }
