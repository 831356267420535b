"""The durable outbox: derived DICOM files waiting to be sent to a destination, by C-STORE or STOW-RS.

Each file is hard-linked (or copied) into ``ROOT/<id>.dcm`` and queued in ``ROOT/outbox.sqlite``, so
nothing is lost when the destination is down or the sender restarts. A series is queued whole, in one
transaction that also records it (its key and the digest of its manifest) as queued: queuing is
idempotent, so callers queue every done series (done now or already done) and a process killed between
finishing a series and queuing it sends it on its next run, once. A failed send is retried with
exponential backoff (capped); a file the destination keeps refusing is given up after a few refusals
and logged (state ``refused``; ``lost`` for a file gone from the outbox). Sent files leave the outbox.
A destination is ``AE@host:port`` (:class:`Destination`, C-STORE) or a DICOMweb URL
(:class:`medidiff.dicomweb.StowDestination`); both answer :meth:`send` with one outcome per file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from medidiff.dicomnet.events import emit
from medidiff.errors import InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, study TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, refusals INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL);
CREATE TABLE IF NOT EXISTS queued (series TEXT NOT NULL, version TEXT NOT NULL, PRIMARY KEY (series, version));
"""
CONNECT_TIMEOUT_SECONDS = 10  # an unreachable destination must not stall the listener's loop for long
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the C-STORE warnings
SENT, FAILED, REFUSED, LOST = "sent", "failed", "refused", "lost"  # outcomes of one file


@dataclass(frozen=True)
class Destination:
    """A remote AE: ``AE@host:port``, called from ``calling_ae``."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "MEDIDIFF"

    @classmethod
    def parse(cls, text: str, calling_ae: str = "MEDIDIFF") -> Destination:
        match = re.fullmatch(r"([^@\\]{1,16})@([^:@]+):(\d{1,5})", text)
        if not match or not 0 < int(match[3]) < 65536:
            raise InputError(f"destination {text!r} is not AE@host:port (e.g. PACS@10.0.0.5:104); fix --destination")
        return cls(match[1], match[2], int(match[3]), calling_ae)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, files: dict[int, Path]) -> dict[int, tuple[str, str]] | str:
        """C-STORE ``files`` over one association: an outcome and a detail per file, or why none could go."""
        import pydicom
        from pynetdicom import AE

        outcomes, headers = {}, {}
        for item, path in files.items():
            try:
                headers[item] = pydicom.dcmread(path, stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                outcomes[item] = (LOST, type(exc).__name__)
        if not headers:
            return outcomes
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = ae.acse_timeout = CONNECT_TIMEOUT_SECONDS
        for context in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in headers.values()}):
            ae.add_requested_context(*context)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            return "association with the destination failed"
        try:
            for item in headers:
                outcomes[item] = self._store(assoc, files[item])
        finally:
            assoc.release()
        return outcomes

    @staticmethod
    def _store(assoc, path: Path) -> tuple[str, str]:
        try:
            status = assoc.send_c_store(path)
        except (RuntimeError, ValueError, OSError) as exc:  # association lost, no accepted context, file unreadable
            return FAILED, str(exc)
        code = status.get("Status") if status else None
        if code is None:
            return FAILED, "no response from the destination"
        return (SENT, "") if code in SUCCESS_STATUSES else (REFUSED, f"status 0x{code:04X}")


def parse_destination(text: str, calling_ae: str = "MEDIDIFF"):
    """A DICOMweb URL (``dicomweb://``, ``dicomwebs://``, ``http(s)://``) or ``AE@host:port``."""
    if "://" in text:
        from medidiff.dicomweb import StowDestination

        return StowDestination.parse(text, "--to/--destination")
    return Destination.parse(text, calling_ae)


def outbox_folder(state_dir: Path, destination) -> Path:
    """``OUT/.medidiff/outbox/<hash of the destination>/``: one outbox per destination."""
    return Path(state_dir) / "outbox" / hashlib.sha256(str(destination).encode()).hexdigest()[:12]


def deliver_outputs(results, output: Path, destination, tries: int) -> tuple[int, Path]:
    """Queue the DICOM files of the done series among ``results`` not queued before in the output folder's outbox for
    ``destination`` and deliver them, with whatever is still pending there, in up to ``tries`` rounds (under
    the output folder's lock: one sender at a time); returns (instances still pending, the outbox folder)."""
    from medidiff.output_folder import OutputFolder

    out = OutputFolder(output)
    folder = outbox_folder(out.state_dir, destination)
    with out.lock():
        outbox = Outbox(folder, destination, first_delay=1.0)
        try:
            outbox.add_outputs(results, out.path)
            return outbox.deliver_with_retries(tries), folder
        finally:
            outbox.close()


class Outbox:
    """Files queued for ``destination``, with backoff between failed tries."""

    def __init__(self, root: Path, destination, *, first_delay: float = 2.0, max_delay: float = 60.0,
                 max_refusals: int = 5):
        self.root, self.destination = Path(root), destination
        self.first_delay, self.max_delay, self.max_refusals = first_delay, max_delay, max_refusals
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "outbox.sqlite", isolation_level=None)
        self._db.executescript(SCHEMA)

    def add_outputs(self, results, output: Path) -> int:
        """Queue the DICOM files of the done series among ``results`` (a report's, done now or already done)
        that were not queued before as they are now; returns how many files were queued."""
        return sum(self.add_series(result.study, result.series, result.outputs, Path(output)) for result in results
                   if result.state in ("done", "already done"))

    def add_series(self, study: str, series: str, outputs: list[str], output: Path) -> int:
        """Queue the DICOM files among ``outputs`` (relative to ``output``) of a done series and record it as
        queued, in one transaction; returns how many files were queued (0 when it was queued before as it is)."""
        from pydicom.misc import is_dicom

        from medidiff.output_folder import MANIFEST

        key = f"{study}/{series}"
        try:
            version = hashlib.sha256((output / key / MANIFEST).read_bytes()).hexdigest()[:32]
        except OSError:  # no finished folder (removed since): nothing to send
            return 0
        files = [output / name for name in outputs if is_dicom(output / name)]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute("SELECT 1 FROM queued WHERE series = ? AND version = ?", (key, version)).fetchone():
                files = []
            for path in files:
                self._link(path, self._db.execute("INSERT INTO items (study, state, next_try) VALUES (?, 'pending', 0)",
                                                  (study,)).lastrowid)
            self._db.execute("INSERT OR IGNORE INTO queued VALUES (?, ?)", (key, version))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return len(files)

    def _link(self, path: Path, item: int) -> None:
        """The outbox's own link to (or copy of) ``path`` for ``item`` (replacing one a killed process left)."""
        target = self._file(item)
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)

    def pending(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM items WHERE state = 'pending'").fetchone()[0]

    def next_due_in(self) -> float | None:
        """Seconds until the next pending item is due; None when nothing is pending."""
        next_try = self._db.execute("SELECT MIN(next_try) FROM items WHERE state = 'pending'").fetchone()[0]
        return None if next_try is None else max(0.0, next_try - time.time())

    def deliver(self) -> int:
        """Send every item that is due (up to 200); returns how many were delivered."""
        due = self._db.execute("SELECT id, study, attempts, refusals FROM items WHERE state = 'pending' "
                               "AND next_try <= ? ORDER BY id LIMIT 200", (time.time(),)).fetchall()
        if not due:
            return 0
        outcomes = self.destination.send({item: self._file(item) for item, *_ in due})
        if isinstance(outcomes, str):
            delays = [self._retry(item, attempts) for item, _, attempts, _ in due]
            emit("send_failed", reason=outcomes, destination=str(self.destination), instances=len(delays),
                 retry_in_seconds=min(delays, default=0))
            return 0
        sent = sum(self._record(item, study, attempts, refusals, *outcomes[item]) for item, study, attempts, refusals
                   in due if item in outcomes)
        if sent:
            emit("sent", destination=str(self.destination), instances=sent, pending=self.pending())
        return sent

    def deliver_with_retries(self, tries: int) -> int:
        """Deliver until nothing is pending or ``tries`` rounds have failed (waiting out each backoff); returns
        how many items are still pending (they stay queued for the next delivery)."""
        for round_ in range(tries):
            self.deliver()
            wait = self.next_due_in()
            if wait is None or round_ == tries - 1:
                break
            time.sleep(wait)
        return self.pending()

    def _record(self, item: int, study: str, attempts: int, refusals: int, outcome: str, detail: str) -> int:
        """Apply one file's outcome; 1 when it was sent."""
        if outcome == SENT:
            self._db.execute("DELETE FROM items WHERE id = ?", (item,))
            self._file(item).unlink(missing_ok=True)
            return 1
        if outcome == LOST:
            self._set(item, "lost")
            emit("outbox_item_lost", study=study, item=item, reason=detail)
        elif outcome == FAILED:
            emit("send_failed", study=study, item=item, reason=detail, destination=str(self.destination),
                 retry_in_seconds=self._retry(item, attempts))
        elif refusals + 1 >= self.max_refusals:
            self._set(item, "refused")
            emit("send_refused", study=study, item=item, status=detail, destination=str(self.destination))
        else:
            self._db.execute("UPDATE items SET refusals = refusals + 1 WHERE id = ?", (item,))
            emit("send_failed", study=study, item=item, reason=detail, destination=str(self.destination),
                 retry_in_seconds=self._retry(item, attempts))
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
