"""`medidiff batch`: run a pipeline study by study from the durable work queue, on one or more workers.

The input is discovered once; each study is a work item of :mod:`medidiff.batch_queue`. A study is
processed by :func:`process_study`, series by series through the executor's own per-series step
(journal, whole output folders with manifests), in this process (``workers=0``) or on a Dask worker
(:mod:`medidiff.scaleout`); the pipeline is built once per process (:func:`cached_pipeline`). Outcomes
are recorded in the queue: done, retried after a backoff, or quarantined with its reason. The output
folder's lock is held throughout, so one batch runs per folder; a killed batch resumes where it
stopped, and a study interrupted mid-way is redone (its output folder appears whole, once).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import sqlite3
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from medidiff.batch_queue import WorkQueue
from medidiff.dicomnet.events import emit
from medidiff.dicomnet.outbox import Outbox, outbox_folder
from medidiff.errors import PipelineError
from medidiff.executor import RunReport, SeriesResult, opened_run, process_series
from medidiff.journal import Journal
from medidiff.output_folder import OutputFolder
from medidiff.pipeline import Pipeline

REASON_LIMIT = 500


@dataclass
class StudyTask:
    """One attempt at one study: what a worker needs (no open files, picklable)."""

    study: str
    series: list
    pipeline_text: str
    pipeline_source: str
    output: str


@dataclass
class StudyOutcome:
    """The per-series results of one attempt (hashed keys only) and the worker's process id."""

    study: str
    output: str = ""
    results: list[SeriesResult] = field(default_factory=list)
    worker_pid: int = 0

    @property
    def failures(self) -> list[str]:
        return [f"series {r.series}: {r.message}" for r in self.results if r.state == "failed"]


_PIPELINES: dict[tuple[str, str], Pipeline] = {}  # this process's built pipelines, by (text, source)


def cached_pipeline(text: str, source: str) -> Pipeline:
    """The pipeline built from ``text`` (its stages, models included), once per process."""
    if (text, source) not in _PIPELINES:
        _PIPELINES[(text, source)] = Pipeline.from_text(text, source)
    return _PIPELINES[(text, source)]


def process_study(task: StudyTask) -> StudyOutcome:
    """Run the pipeline on every series of one study into the output folder (any process, same disk)."""
    import os

    from medidiff.io.privacy import output_salt

    out = OutputFolder(task.output)
    pipeline = cached_pipeline(task.pipeline_text, task.pipeline_source)
    outcome = StudyOutcome(task.study, task.output, worker_pid=os.getpid())
    with output_salt(out.state_dir):
        try:
            journal = Journal(out.state_dir)
            try:
                for series in task.series:
                    outcome.results.append(process_series(pipeline, series, out, journal))
            finally:
                journal.close()
        except sqlite3.Error as exc:  # the journal cannot be written (disk full): nothing is recorded as done
            outcome.results.append(SeriesResult("-", task.study, "?", "?", "failed",
                                                f"cannot write the run journal ({exc}); free space in the output folder"))
    return outcome


class InProcess:
    """Runs each study at once in this process (``--workers 0``): no Dask, one study at a time."""

    capacity = 1

    def __init__(self, pipeline: Pipeline):
        _PIPELINES[(pipeline.text, pipeline.source)] = pipeline  # already built here: not built twice

    def submit(self, task: StudyTask) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        try:
            future.set_result(process_study(task))
        except Exception as exc:  # recorded as the attempt's failure by the caller
            future.set_exception(exc)
        return future

    @staticmethod
    def wait(futures, timeout: float) -> set:
        return concurrent.futures.wait(futures, timeout, concurrent.futures.FIRST_COMPLETED).done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@dataclass
class BatchSummary:
    """What a batch did: per-state study counts and the report of the series it ran."""

    report: RunReport
    studies: int = 0
    done_now: int = 0
    already_done: int = 0
    retried: int = 0
    quarantined: list[dict] = field(default_factory=list)
    outbox: Outbox | None = None  # with a destination
    waiting: int = 0  # instances left in the outbox

    @property
    def ok(self) -> bool:
        return not self.quarantined and self.report.count("failed") == 0

    def text(self) -> str:
        lines = [f"studies: {self.studies}: {self.done_now} done now, {self.already_done} already done, "
                 f"{self.retried} retried attempt(s), {len(self.quarantined)} quarantined",
                 self.report.summary()]
        lines += [f"  quarantined study {q['study']} after {q['attempts']} attempt(s): {q['reason']}"
                  for q in self.quarantined]
        return "\n".join(lines)


def study_digest(series: list) -> str:
    """Digest of a study's content (its series' digests); 'unreadable' when a file vanished."""
    try:
        parts = sorted(f"{s.key}:{s.content_digest()}" for s in series)
    except OSError:
        return "unreadable"
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def run_batch(pipeline: Pipeline, input_path: str | Path, output_dir: str | Path, executor, *,
              max_attempts: int = 3, retry_delay: float = 5.0, retry_quarantined: bool = False,
              destination=None, send_tries: int = 3) -> BatchSummary:
    """Queue every study of ``input_path`` and run them on ``executor`` (:class:`InProcess` or
    :class:`medidiff.scaleout.DaskExecutor`) until each is done or quarantined. With a ``destination``, the
    DICOM files of each attempt's done series go to the output folder's outbox as the attempt is recorded,
    with any done series of the input not queued before, and are delivered at the end (``send_tries``
    rounds; the rest waits in the outbox)."""
    from medidiff.io.privacy import hash_identifier

    with opened_run(pipeline, input_path, output_dir) as (out, inventory, report):
        studies = {hash_identifier(uid): [replace(s, keepalive=None) for s in series]
                   for uid, series in inventory.studies().items()}
        queue = WorkQueue(out.state_dir, pipeline.digest, max_attempts=max_attempts, first_delay=retry_delay)
        summary = BatchSummary(report, studies=len(studies))
        if destination:
            summary.outbox = Outbox(outbox_folder(out.state_dir, destination), destination, first_delay=1.0)
        try:
            for study in queue.recover():
                emit("study_interrupted", study=study, state=queue.state(study))
            queue.enqueue({k: study_digest(v) for k, v in studies.items()}, retry_quarantined=retry_quarantined,
                          intact=lambda study: outputs_intact(study, studies[study], pipeline, out))
            dispatcher = Dispatcher(queue, pipeline, out, executor, summary.outbox)
            dispatcher.studies.update(studies)
            _drain(dispatcher, summary)
            summary.already_done = sum(queue.state(s) == "done" for s in studies) - summary.done_now
            summary.quarantined = [{"study": s, "attempts": queue.item(s)["attempts"], "reason": queue.item(s)["reason"]}
                                   for s in studies if queue.state(s) == "quarantined"]
            if summary.outbox:
                _queue_done_series(summary.outbox, studies, pipeline, out)
                summary.waiting = summary.outbox.deliver_with_retries(send_tries)
        finally:
            queue.close()
            if summary.outbox:
                summary.outbox.close()
        out.remove_leftovers()  # folders of attempts whose worker was killed
    emit("batch_finished", studies=summary.studies, done=summary.done_now, already_done=summary.already_done,
         quarantined=len(summary.quarantined), seconds=round(report.seconds, 3))
    return summary


def outputs_intact(study: str, series: list, pipeline: Pipeline, out: OutputFolder) -> bool:
    """True when every series of a done study is still done or skipped in the journal, its folder whole."""
    journal = Journal(out.state_dir)
    try:
        for s in series:
            row = journal.state(f"{study}/{s.key}", pipeline.digest)
            if row is None or row["state"] not in ("done", "skipped") or \
                    row["state"] == "done" and out.verify(f"{study}/{s.key}"):
                return False
    finally:
        journal.close()
    return True


def _queue_done_series(outbox: Outbox, studies: dict, pipeline: Pipeline, out: OutputFolder) -> None:
    """Queue every series of ``studies`` the journal holds as done (the outbox skips those it queued before):
    series done by an earlier batch without this destination, or whose queuing a killed batch cut short."""
    journal = Journal(out.state_dir)
    try:
        for study, series in studies.items():
            for s in series:
                row = journal.state(f"{study}/{s.key}", pipeline.digest)
                if row and row["state"] == "done":
                    outbox.add_series(study, s.key, row["outputs"], out.path)
    finally:
        journal.close()


def _drain(dispatcher: Dispatcher, summary: BatchSummary) -> None:
    """Run the dispatcher until no study is pending or running; the final attempts go into the summary."""
    while True:
        finished = dispatcher.step(1.0)
        for _, state, outcome in finished:
            if outcome and state != "pending":  # the report shows the final attempt of each study
                summary.report.results.extend(outcome.results)
            summary.done_now += state == "done"
            summary.retried += state == "pending"
        if not finished and not dispatcher.running:
            wait = dispatcher.queue.next_due_in(set(dispatcher.studies))
            if wait is None:
                return
            time.sleep(min(wait, 1.0))


class Dispatcher:
    """Runs the pending studies of a work queue on an executor, for `medidiff batch` and `medidiff listen`:
    :meth:`step` submits the studies that are due (up to the executor's capacity) and records each finished
    attempt: done, pending again after a backoff, or quarantined. With an ``outbox``, the DICOM files of an
    attempt's done series are queued in it before the attempt is recorded (queuing is idempotent: a process
    killed in between queues them when the study is redone)."""

    def __init__(self, queue: WorkQueue, pipeline: Pipeline, out: OutputFolder, executor, outbox: Outbox | None = None):
        self.queue, self.pipeline, self.out, self.executor, self.outbox = queue, pipeline, out, executor, outbox
        self.studies: dict[str, list] = {}  # the series of every study it may run, by study key
        self._in_flight: dict = {}  # future -> study

    @property
    def running(self) -> set[str]:
        return set(self._in_flight.values())

    def step(self, timeout: float) -> list[tuple[str, str, StudyOutcome | None]]:
        """Submit due studies, wait up to ``timeout`` for attempts to finish and record them; returns
        (study, its new state, the attempt's outcome or None when it broke) for each finished attempt."""
        free = self.executor.capacity - len(self._in_flight)
        for study in self.queue.due(free, set(self.studies) - self.running) if free > 0 else []:
            attempt = self.queue.start(study)
            task = StudyTask(study, self.studies[study], self.pipeline.text, self.pipeline.source, str(self.out.path))
            self._in_flight[self.executor.submit(task)] = study
            emit("study_started", study=study, attempt=attempt)
        finished = []
        for future in self.executor.wait(list(self._in_flight), timeout) if self._in_flight else []:
            study = self._in_flight.pop(future)
            if isinstance(future.exception(), PipelineError):  # the worker's set-up, not the study, is at fault
                for other in [study, *self._in_flight.values()]:
                    self.queue.release(other)
                raise PipelineError(f"a worker cannot build the pipeline ({future.exception()}); install the same "
                                    "medidiff, models and stage plugins on every worker, then run the command again")
            finished.append(self._record(study, future))
        return finished

    def _record(self, study: str, future) -> tuple[str, str, StudyOutcome | None]:
        """Record one finished attempt in the queue (its done series in the outbox first); log it."""
        try:
            outcome = future.result()
        except Exception as exc:  # the attempt itself broke (a worker died repeatedly, a bug): retry or quarantine
            outcome, error = None, f"the attempt failed ({type(exc).__name__}: {str(exc)[:200]})"
        else:
            error = "; ".join(outcome.failures)[:REASON_LIMIT]
        seconds = round(sum(r.seconds for r in outcome.results), 3) if outcome else 0.0
        queued = self.outbox.add_outputs(outcome.results, Path(outcome.output)) if outcome and self.outbox else 0
        state = self.queue.finish(study, ok=not error, reason=error, seconds=seconds)
        if state == "done":
            emit("study_done", study=study, seconds=seconds, worker=outcome.worker_pid, queued=queued,
                 **{s.replace(" ", "_"): sum(r.state == s for r in outcome.results) for s in ("done", "already done", "skipped")})
        elif state == "pending":
            emit("study_failed", study=study, reason=error, retry_in_seconds=self.queue.retry_in(study))
        else:
            emit("study_quarantined", study=study, reason=error)
        return study, state, outcome
