"""`medidiff status OUT`: health and metrics of an output folder, from its own SQLite files (read-only).

Processed and failed series (the run journal), the work queue of `medidiff batch` and `medidiff listen`
(studies by state, queue length, seconds per study, the quarantine with reasons), the studies the
listener received and has not queued yet, and every outbox (instances pending, refused, lost). Hashed
keys only.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from medidiff.batch_queue import queue_summary
from medidiff.errors import InputError
from medidiff.output_folder import STATE_DIR


def _rows(path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


def health(output: str | Path) -> dict:
    """The summary of ``output`` as a JSON-ready dict."""
    state_dir = Path(output) / STATE_DIR
    if not state_dir.is_dir():
        raise InputError(f"{output} is not a medidiff output folder (no {STATE_DIR}/ in it); give the -o folder "
                         "of a run, batch or listener")
    summary: dict = {"output": str(output)}
    journal = state_dir / "journal.sqlite"
    if journal.is_file():
        counts = dict(_rows(journal, "SELECT state, COUNT(*) FROM series_runs GROUP BY state"))
        mean = _rows(journal, "SELECT AVG(seconds) FROM series_runs WHERE state='done'")[0][0]
        summary["series"] = {"processed": counts.get("done", 0), "failed": counts.get("failed", 0),
                             "skipped": counts.get("skipped", 0), "running": counts.get("running", 0),
                             "seconds_per_series": round(mean, 3) if mean is not None else None}
    if (queue := queue_summary(state_dir)) is not None:
        summary["queue"] = queue
    spool = state_dir / "listener" / "incoming" / "studies.sqlite"
    if spool.is_file():
        waiting, queued = _rows(spool, "SELECT SUM(processed IS NULL OR processed < received), "
                                   "SUM(processed IS NOT NULL) FROM studies")[0]
        summary["listener"] = {"studies_waiting": waiting or 0, "studies_queued": queued or 0}
    outboxes = {}
    for db in sorted(state_dir.rglob("outbox.sqlite")):
        outboxes[str(db.parent.relative_to(state_dir))] = dict(_rows(db, "SELECT state, COUNT(*) FROM items GROUP BY state"))
    if outboxes:
        summary["outboxes"] = outboxes
    return summary
