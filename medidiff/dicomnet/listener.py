"""`medidiff listen`: a C-STORE/C-ECHO SCP that runs a pipeline on each complete study and sends the results.

Received image instances go to the spool (:mod:`~medidiff.dicomnet.studies`); a study with no new
instance for ``idle_seconds`` is run with :func:`medidiff.executor.run_pipeline` from its spool folder
into the output folder (whose journal skips series already done, so a study sent twice is not redone);
every DICOM file of a newly done series is queued in the outbox (:mod:`~medidiff.dicomnet.outbox`)
and sent to the destination (C-STORE, or STOW-RS for a DICOMweb URL). Associations from calling AE titles outside ``allowed`` are rejected,
and SOP classes other than images are not accepted.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from medidiff.dicomnet.events import emit
from medidiff.dicomnet.outbox import Outbox
from medidiff.dicomnet.studies import StudySpool
from medidiff.errors import InputError, MedidiffError
from medidiff.output_folder import STATE_DIR, OutputFolder
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
    """The SCP and its processing loop; :meth:`serve` runs until ``stop`` is set."""

    def __init__(self, pipeline: Pipeline, output: str | Path, *, ae_title: str, port: int, bind: str = "0.0.0.0",
                 allowed: list[str] | None = None, destination=None,
                 idle_seconds: float = 30.0):
        self.pipeline, self.output = pipeline, Path(output)
        self.ae_title = check_ae_title(ae_title, "--ae-title")
        self.allowed = [check_ae_title(a, "--allow") for a in allowed or []]
        self.address, self.destination, self.idle_seconds = (bind, port), destination, idle_seconds
        self.work_dir = self.output / STATE_DIR / LISTENER_DIR

    def serve(self, stop: threading.Event) -> None:
        """Listen, process complete studies and deliver results until ``stop`` is set."""
        from medidiff.io.privacy import output_salt

        work = OutputFolder(self.work_dir)  # its lock keeps a second listener off this output folder
        try:
            work.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create {self.work_dir}: {exc.strerror}; choose another folder with --output") \
                from None
        with work.lock(), output_salt(self.output / STATE_DIR) as salt:
            spool = StudySpool(self.work_dir / "incoming", salt)
            outbox = self.destination and Outbox(self.work_dir / "outbox", self.destination)
            server = self._start_server(spool)
            try:
                while not stop.is_set():
                    for study in spool.complete(self.idle_seconds):
                        self._process(study, spool, outbox)
                    if outbox:
                        outbox.deliver()
                    stop.wait(POLL_SECONDS)
            finally:
                server.shutdown()
                spool.close()
                if outbox:
                    emit("stopped", pending=outbox.pending())
                    outbox.close()
                else:
                    emit("stopped")

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

    def _process(self, study: str, spool: StudySpool, outbox: Outbox | None) -> None:
        """Run the pipeline on one complete study; queue the DICOM files of newly done series."""
        from medidiff.executor import run_pipeline

        started = time.time()
        try:
            report = run_pipeline(self.pipeline, spool.folder(study), self.output, progress=False)
        except (MedidiffError, OSError) as exc:  # e.g. OUT in use by a `medidiff run`, disk full: try again later
            reason = str(exc) if isinstance(exc, MedidiffError) else f"file system error ({exc.strerror})"
            emit("study_postponed", study=study, reason=reason, retry_in_seconds=self.idle_seconds)
            spool.touch(study)
            return
        spool.mark_processed(study, started)
        queued = outbox.add_outputs(report.results, self.output) if outbox else 0
        emit("study_processed", study=study, **{state.replace(" ", "_"): report.count(state) for state in
             ("done", "already done", "failed", "skipped")}, unreadable=len(report.refused), queued=queued,
             seconds=round(report.seconds, 3),
             failures=[{"series": r.series, "reason": r.message} for r in report.results if r.state == "failed"])
