"""Run a pipeline over every matching series of a source; journal, report and progress bar.

Each series is loaded, passed through the stages and written to
``<output>/<study hash>/<series key>/`` through a temporary folder that is renamed when whole (see
:mod:`medidiff.output_folder`: one run per output folder, manifests verified on re-run), so an
interrupted run never leaves half-written results; the journal lets the next run skip what is done
and redo what changed. One bad series never stops the batch: its reason goes into the report. A
projection series (CR/DX) is run image by image: each radiograph is a unit of its own (folder, journal
row, report row), so one bad image never loses the others.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.errors import InvalidDicomError

from medidiff.errors import InputError, MedidiffError
from medidiff.journal import Journal
from medidiff.output_folder import STATE_DIR, OutputFolder
from medidiff.pipeline import Pipeline

if TYPE_CHECKING:
    from medidiff.io.discovery import Inventory

log = logging.getLogger(__name__)
LOCAL_REFUSALS = "refused-local.log"  # in OUT/.medidiff/: paths of unreadable files, not for sharing


@dataclass
class SeriesResult:
    """What happened to one series, or one radiograph of a projection series (no patient identifiers:
    hashed keys only; ``image_of``: the key of the series the radiograph belongs to)."""

    series: str
    study: str
    modality: str
    size: str
    state: str
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    image_of: str = ""


@dataclass
class RunReport:
    """The outcome of a run: per-series results and the files that could not be read."""

    pipeline: str
    pipeline_digest: str
    input: str
    output: str
    results: list[SeriesResult] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.results)

    @property
    def ok(self) -> bool:
        """True when nothing failed and at least one series was (or had been) processed."""
        processed = self.count("done") + self.count("already done")
        return self.count("failed") == 0 and processed > 0

    def summary(self) -> str:
        """A short human summary (the same text goes to report.txt)."""
        lines = [
            f"pipeline {self.pipeline} on {self.input} -> {self.output}",
            f"series: {self.count('done')} done, {self.count('already done')} already done, "
            f"{self.count('failed')} failed, {self.count('skipped')} skipped; "
            f"{len(self.refused)} unreadable file(s); {self.seconds:.1f} s",
        ]
        for r in self.results:
            if r.state in ("failed", "skipped") or r.state == "done" and r.message:
                unit = f"image {r.series} of series {r.image_of}" if r.image_of else f"series {r.series}"
                lines.append(f"  {r.state:7s} {unit} ({r.modality} {r.size}): {r.message}")
        for refusal in self.refused[:20]:
            lines.append(f"  unreadable file {refusal['file']}: {refusal['reason']}")
        if len(self.refused) > 20:
            lines.append(f"  ... and {len(self.refused) - 20} more unreadable files (see report.json)")
        if self.refused:
            lines.append(f"  (their paths, for the operator only: {STATE_DIR}/{LOCAL_REFUSALS})")
        if not self.results:
            lines.append("  no image series (DICOM, NIfTI, NRRD or MetaImage) found in the input")
        elif self.count("done") + self.count("already done") == 0 and not self.count("failed"):
            lines.append("  no series matched the pipeline's selection rules (see 'skipped' above)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


@contextmanager
def opened_run(pipeline: Pipeline, input_path: str | Path, output_dir: str | Path
               ) -> Iterator[tuple[OutputFolder, Inventory, RunReport]]:
    """The start and end every run shares: the input checked, the output folder prepared and locked, its salt
    in force, the input discovered (unreadable files in the report and the local log); yields (output
    folder, inventory, report) and writes the timed report when the block ends without an error.

    Raises OutputError (before any work) when the output folder is inside the input, not writable, or
    in use by another run.
    """
    from medidiff.io.discovery import discover, open_source
    from medidiff.io.privacy import hash_identifier, output_salt

    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError(f"input {input_path} does not exist")
    out = OutputFolder(output_dir)
    out.prepare(input_path)
    start = time.perf_counter()
    with out.lock(), output_salt(out.state_dir), open_source(input_path) as source_root:
        inventory = discover(source_root)
        shown_input = f"input {hash_identifier('input:' + str(input_path.resolve()))}"  # its path may name a patient
        report = RunReport(pipeline.name, pipeline.digest, shown_input, str(output_dir))
        report.refused = [r.to_public_dict() for r in inventory.refused]
        _write_local_refusals(inventory.refused, out.state_dir)
        yield out, inventory, report
        report.seconds = time.perf_counter() - start
        _write_report(report, out.path)


def run_pipeline(
    pipeline: Pipeline, input_path: str | Path, output_dir: str | Path, *, progress: bool = True
) -> RunReport:
    """Run ``pipeline`` over ``input_path`` into ``output_dir``; returns the report (also written).
    Errors as :func:`opened_run`."""
    from tqdm.auto import tqdm

    with opened_run(pipeline, input_path, output_dir) as (out, inventory, report):
        journal = Journal(out.state_dir)
        try:
            bar = tqdm(inventory.series, desc=pipeline.name, unit="series", disable=not progress or None)
            for series in bar:
                report.results.append(process_series(pipeline, series, out, journal))
        finally:
            journal.close()
    return report


def process_series(pipeline: Pipeline, series, out: OutputFolder, journal: Journal) -> SeriesResult:
    """Run one series (or radiograph) unless the journal and its manifest say it is done; record its state."""
    from medidiff.io.privacy import hash_identifier

    study = hash_identifier(series.study_uid)
    key = f"{study}/{series.key}"
    result = SeriesResult(
        series=series.key, study=study, modality=series.modality or "?",
        size=f"{series.rows}x{series.columns}x{series.frames}", state="skipped",
        image_of=series.series_key if series.instance_uid else "",
    )
    try:
        content = series.content_digest()
    except (OSError, InvalidDicomError) as exc:  # changed since discovery: never guess, redo next run
        result.state = "failed"
        result.message = f"its files changed or vanished while the batch ran ({type(exc).__name__}); re-run"
        return result
    reason = series.skip_reason or pipeline.selection.reason_to_skip(series)
    if reason:
        result.message = reason
        journal.record(key, pipeline.digest, content, "skipped", message=reason)
        return result
    previous = journal.state(key, pipeline.digest)
    if previous and previous["state"] == "done":
        if previous["content_digest"] != content:
            result.message = "redone: the series' instances changed since the last run"
        elif problem := out.verify(key):
            result.message = f"redone: the previous output was incomplete ({problem})"
        else:
            result.state, result.outputs = "already done", previous["outputs"]
            return result
    journal.record(key, pipeline.digest, content, "running")
    start = time.perf_counter()
    try:
        result.outputs, notes = _run_one(pipeline, series, out, key)
        result.state, result.message = "done", "; ".join(filter(None, [result.message, *notes]))
    except MedidiffError as exc:
        result.state, result.message = "failed", str(exc)
    except OSError as exc:  # disk full, permissions: the operator can act on it
        result.state = "failed"
        result.message = (f"file system error ({exc.strerror or type(exc).__name__}); check that the input is "
                          f"readable and {study}/ in the output folder is writable")
    except Exception as exc:  # a bug, not a user mistake: keep the batch going, keep the traceback
        result.state = "failed"
        result.message = f"internal error ({type(exc).__name__}); details in {STATE_DIR}/errors.log"
        with open(out.state_dir / "errors.log", "a", encoding="utf-8") as fh:
            fh.write(f"series {key}:\n{traceback.format_exc()}\n")
    result.seconds = round(time.perf_counter() - start, 3)
    journal.record(
        key, pipeline.digest, content, result.state, message=result.message,
        outputs=result.outputs, seconds=result.seconds,
    )
    return result


def _run_one(pipeline: Pipeline, series, out: OutputFolder, key: str) -> tuple[list[str], list[str]]:
    """(the series' output files, notes for the report)."""
    from medidiff.io.loading import load_item
    from medidiff.outputs import write_outputs

    item = pipeline(load_item(series))
    with out.series_writer(key) as folder:
        notes = write_outputs(item, pipeline, folder)
    return out.files(key), notes


def _write_local_refusals(refused: list, state_dir: Path) -> None:
    """The unreadable files' relative paths (which may name patients): for the operator, never shared."""
    from medidiff.io.atomic import atomic_write

    with atomic_write(state_dir / LOCAL_REFUSALS) as tmp:
        Path(tmp).write_text("".join(r.local_line() + "\n" for r in refused), encoding="utf-8")


def _write_report(report: RunReport, output_dir: Path) -> None:
    from medidiff.io.atomic import atomic_write

    with atomic_write(output_dir / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    with atomic_write(output_dir / "report.txt") as tmp:
        Path(tmp).write_text(report.summary() + "\n", encoding="utf-8")
