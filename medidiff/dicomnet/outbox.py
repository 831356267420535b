"""The durable outbox: derived DICOM files waiting to be sent by C-STORE to the destination AE.

Each file is hard-linked (or copied) into ``ROOT/<id>.dcm`` and queued in ``ROOT/outbox.sqlite``, so
nothing is lost when the destination is down or the listener restarts. A failed send is retried with
exponential backoff (capped); a file the destination keeps refusing is given up after a few refusals
and logged (state ``refused``; ``lost`` for a file gone from the outbox).
Sent files leave the outbox.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from medidiff.dicomnet.events import emit
from medidiff.errors import InputError

SCHEMA = ("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, study TEXT NOT NULL, state TEXT NOT NULL, "
          "attempts INTEGER NOT NULL DEFAULT 0, refusals INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL)")
CONNECT_TIMEOUT_SECONDS = 10  # an unreachable destination must not stall the listener's loop for long
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the C-STORE warnings


@dataclass(frozen=True)
class Destination:
    """A remote AE: ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"([^@\\]{1,16})@([^:@]+):(\d{1,5})", text)
        if not match or not 0 < int(match[3]) < 65536:
            raise InputError(f"destination {text!r} is not AE@host:port (e.g. PACS@10.0.0.5:104); fix --destination")
        return cls(match[1], match[2], int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Outbox:
    """Files queued for ``destination``, sent from ``calling_ae`` with backoff between failed tries."""

    def __init__(self, root: Path, destination: Destination, calling_ae: str, *, first_delay: float = 2.0,
                 max_delay: float = 60.0, max_refusals: int = 5):
        self.root, self.destination, self.calling_ae = Path(root), destination, calling_ae
        self.first_delay, self.max_delay, self.max_refusals = first_delay, max_delay, max_refusals
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "outbox.sqlite", isolation_level=None)
        self._db.execute(SCHEMA)

    def add(self, path: Path, study: str) -> None:
        """Queue ``path`` (kept as the outbox's own link or copy) for sending."""
        item = self._db.execute("INSERT INTO items (study, state, next_try) VALUES (?, 'pending', 0)",
                                (study,)).lastrowid
        target = self._file(item)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)

    def pending(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM items WHERE state = 'pending'").fetchone()[0]

    def deliver(self) -> int:
        """Send every item that is due over one association; returns how many were delivered."""
        from pynetdicom import AE

        due = self._db.execute("SELECT id, study, attempts, refusals FROM items WHERE state = 'pending' "
                               "AND next_try <= ? ORDER BY id LIMIT 200", (time.time(),)).fetchall()
        if not due:
            return 0
        headers = self._headers(due)
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = ae.acse_timeout = CONNECT_TIMEOUT_SECONDS
        for context in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in headers.values()}):
            ae.add_requested_context(*context)
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            delays = [self._retry(item, attempts) for item, _, attempts, _ in due if item in headers]
            emit("send_failed", reason="association with the destination failed", destination=str(self.destination),
                 instances=len(delays), retry_in_seconds=min(delays, default=0))
            return 0
        sent = 0
        try:
            for item, study, attempts, refusals in due:
                if item in headers:
                    sent += self._send_one(assoc, item, study, attempts, refusals)
        finally:
            assoc.release()
        if sent:
            emit("sent", destination=str(self.destination), instances=sent, pending=self.pending())
        return sent

    def _headers(self, due: list) -> dict:
        """Each due item's header (pixel data left on disk until sent); unreadable items are marked lost."""
        import pydicom

        headers = {}
        for item, study, _, _ in due:
            try:
                headers[item] = pydicom.dcmread(self._file(item), stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                self._set(item, "lost")
                emit("outbox_item_lost", study=study, item=item, reason=type(exc).__name__)
        return headers

    def _send_one(self, assoc, item: int, study: str, attempts: int, refusals: int) -> int:
        try:
            status = assoc.send_c_store(self._file(item))
        except (RuntimeError, ValueError, OSError) as exc:  # association lost, no accepted context, file unreadable
            status, reason = None, str(exc)
        else:
            reason = "no response from the destination"
        code = status.get("Status") if status else None
        if code in SUCCESS_STATUSES:
            self._db.execute("DELETE FROM items WHERE id = ?", (item,))
            self._file(item).unlink(missing_ok=True)
            return 1
        if code is None:
            emit("send_failed", study=study, item=item, reason=reason, destination=str(self.destination),
                 retry_in_seconds=self._retry(item, attempts))
        elif refusals + 1 >= self.max_refusals:
            self._set(item, "refused")
            emit("send_refused", study=study, item=item, status=f"0x{code:04X}", destination=str(self.destination))
        else:
            self._db.execute("UPDATE items SET refusals = refusals + 1 WHERE id = ?", (item,))
            emit("send_failed", study=study, item=item, reason=f"status 0x{code:04X}",
                 destination=str(self.destination), retry_in_seconds=self._retry(item, attempts))
        return 0

    def _retry(self, item: int, attempts: int) -> float:
        """Schedule the next try of ``item`` after an exponential backoff; returns the delay in seconds."""
        delay = min(self.first_delay * 2 ** attempts, self.max_delay)
        self._db.execute("UPDATE items SET attempts = attempts + 1, next_try = ? WHERE id = ?",
                         (time.time() + delay, item))
        return delay

    def _set(self, item: int, state: str) -> None:
        self._db.execute("UPDATE items SET state = ? WHERE id = ?", (state, item))

    def _file(self, item: int) -> Path:
        return self.root / f"{item}.dcm"

    def close(self) -> None:
        self._db.close()
