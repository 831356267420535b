"""`medidiff listen`: a C-STORE/C-ECHO SCP that runs a pipeline on each complete study and sends the results.

Received image instances go to the spool (:mod:`~medidiff.dicomnet.studies`), where they stay. A study
with no new instance for ``idle_seconds`` is queued in the output folder's durable work queue
(:mod:`medidiff.batch_queue`) and run by the same :class:`medidiff.batch.Dispatcher` as `medidiff batch`:
in this process or on Dask workers, retried after a backoff, quarantined with its reason after
``max_attempts`` failures. The DICOM files of its done series are queued in the outbox
(:mod:`~medidiff.dicomnet.outbox`) and sent to the destination (C-STORE, or STOW-RS for a DICOMweb
URL). A listener killed at any point picks up on restart: studies received but not queued, queued but
not run, or interrupted mid-run (redone once); series done but not yet queued for sending are queued
then. Associations from calling AE titles outside ``allowed`` are rejected, and SOP classes other than
images are not accepted. The listener holds the output folder's lock while it runs.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from medidiff.batch import Dispatcher, InProcess, outputs_intact, study_digest
from medidiff.batch_queue import WorkQueue
from medidiff.dicomnet.events import emit
from medidiff.dicomnet.outbox import Outbox
from medidiff.dicomnet.studies import StudySpool
from medidiff.errors import InputError, MedidiffError
from medidiff.output_folder import OutputFolder
from medidiff.pipeline import Pipeline

LISTENER_DIR = "listener"  # in OUT/.medidiff/: incoming/ (the spool) and outbox/
POLL_SECONDS = 0.2
STATUS_NOT_IMAGE = 0xA900  # "data set does not match SOP class": no pixel data or no study/instance UID
STATUS_OUT_OF_RESOURCES = 0xA700


def check_ae_title(title: str, option: str) -> str:
    """A valid AE title (1-16 characters, no backslash or control characters), else an InputError."""
    if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]{1,16}", title) or not title.strip():
        raise InputError(f"AE title {title!r} is not 1-16 printable characters without a backslash; fix {option}")
    return title


def image_storage_classes() -> list[str]:
    """The storage SOP classes that hold images (CT, MR, CR, DX, secondary capture, ...)."""
    from pydicom.uid import UID
    from pynetdicom import StoragePresentationContexts

    return [cx.abstract_syntax for cx in StoragePresentationContexts if "Image" in UID(cx.abstract_syntax).name]


class Listener:
    """The SCP and its processing loop; :meth:`serve` runs until ``stop`` is set. ``executor``: an entered
    :class:`medidiff.scaleout.DaskExecutor`, or None to run studies in this process."""

    def __init__(self, pipeline: Pipeline, output: str | Path, *, ae_title: str, port: int, bind: str = "0.0.0.0",
                 allowed: list[str] | None = None, destination=None, idle_seconds: float = 30.0, executor=None,
                 max_attempts: int = 3, retry_delay: float = 5.0):
        self.pipeline, self.out = pipeline, OutputFolder(output)
        self.ae_title = check_ae_title(ae_title, "--ae-title")
        self.allowed = [check_ae_title(a, "--allow") for a in allowed or []]
        self.address, self.destination, self.idle_seconds = (bind, port), destination, idle_seconds
        self.executor = executor or InProcess(pipeline)
        self.max_attempts, self.retry_delay = max_attempts, retry_delay
        self.work_dir = self.out.state_dir / LISTENER_DIR

    def serve(self, stop: threading.Event) -> None:
        """Listen, queue and run complete studies and deliver results until ``stop`` is set."""
        from medidiff.io.privacy import output_salt

        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create {self.work_dir}: {exc.strerror}; choose another folder with --output") \
                from None
        with self.out.lock(), output_salt(self.out.state_dir) as salt:
            spool = StudySpool(self.work_dir / "incoming", salt)
            queue = WorkQueue(self.out.state_dir, self.pipeline.digest, max_attempts=self.max_attempts,
                              first_delay=self.retry_delay)
            outbox = Outbox(self.work_dir / "outbox", self.destination) if self.destination else None
            dispatcher = Dispatcher(queue, self.pipeline, self.out, self.executor, outbox)
            server = None
            try:
                self._resume(queue, spool, dispatcher)
                server = self._start_server(spool)
                while not stop.is_set():
                    for study in spool.complete(self.idle_seconds):
                        if study not in dispatcher.running:  # new instances of a running study: queued after it
                            self._enqueue(study, spool, queue, dispatcher)
                    dispatcher.step(POLL_SECONDS)
                    if outbox:
                        outbox.deliver()
                    if not dispatcher.running:
                        stop.wait(POLL_SECONDS)
            finally:
                if server:
                    server.shutdown()
                spool.close()
                queue.close()
                if outbox:
                    emit("stopped", pending=outbox.pending())
                    outbox.close()
                else:
                    emit("stopped")

    def _resume(self, queue: WorkQueue, spool: StudySpool, dispatcher: Dispatcher) -> None:
        """Studies a stopped or killed listener queued (or was running) get their series again."""
        for study in queue.recover():
            emit("study_interrupted", study=study, state=queue.state(study))
        for study in queue.studies("pending"):
            if spool.folder(study).is_dir():  # not a study of a `medidiff batch` on the same folder
                dispatcher.studies[study] = self._series(study, spool)[0]

    def _series(self, study: str, spool: StudySpool) -> tuple[list, int]:
        """The series in a study's spool folder (picklable, for Dask) and how many of its files could not be read."""
        from dataclasses import replace

        from medidiff.io.discovery import discover

        inventory = discover(spool.folder(study))
        return [replace(s, keepalive=None) for s in inventory.series], len(inventory.refused)

    def _enqueue(self, study: str, spool: StudySpool, queue: WorkQueue, dispatcher: Dispatcher) -> None:
        """Queue a complete study (pending unless done or quarantined with the same instances)."""
        started = time.time()
        try:
            series, unreadable = self._series(study, spool)
            queue.enqueue({study: study_digest(series)},
                          intact=lambda key: outputs_intact(key, series, self.pipeline, self.out))
        except (MedidiffError, OSError) as exc:  # e.g. the output disk is full: try again later
            reason = str(exc) if isinstance(exc, MedidiffError) else f"file system error ({exc.strerror})"
            emit("study_postponed", study=study, reason=reason, retry_in_seconds=self.idle_seconds)
            spool.touch(study)
            return
        dispatcher.studies[study] = series
        spool.mark_queued(study, started)
        emit("study_complete", study=study, series=len(series), unreadable=unreadable, state=queue.state(study))

    def _start_server(self, spool: StudySpool):
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for sop_class in image_storage_classes():
            ae.add_supported_context(sop_class, AllTransferSyntaxes)
        ae.require_calling_aet = self.allowed
        handlers = [
            (evt.EVT_C_STORE, self._on_store, [spool]),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_REJECTED, lambda event: emit("association_rejected", calling_ae=event.assoc.requestor.ae_title)),
        ]
        try:
            server = ae.start_server(self.address, block=False, evt_handlers=handlers)
        except OSError as exc:
            raise InputError(f"cannot listen on {self.address[0]}:{self.address[1]} ({exc.strerror}); "
                             "choose another --port (or stop the program using it)") from None
        emit("listening", ae_title=self.ae_title, port=self.address[1], allowed=self.allowed or "any",
             destination=str(self.destination) if self.destination else None, idle_seconds=self.idle_seconds)
        return server

    @staticmethod
    def _on_store(event, spool: StudySpool) -> int:
        ds = event.dataset
        if "PixelData" not in ds or "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            emit("instance_refused", calling_ae=event.assoc.requestor.ae_title,
                 reason="no pixel data or no study/instance UID")
            return STATUS_NOT_IMAGE
        try:
            study = spool.store(ds.StudyInstanceUID, ds.SOPInstanceUID, event.encoded_dataset())
        except OSError as exc:
            emit("instance_not_stored", reason=exc.strerror or type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        emit("received", study=study, calling_ae=event.assoc.requestor.ae_title)
        return 0x0000
