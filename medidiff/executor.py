"""Run a pipeline over every matching series of a source; journal, report and progress bar.

Each series is loaded, passed through the stages and written to
``<output>/<study hash>/<series key>/`` through a temporary folder that is renamed when whole, so
an interrupted run never leaves half-written results; the journal lets the next run skip what is
done. One bad series never stops the batch: its reason goes into the report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medidiff.errors import MedidiffError, OutputError
from medidiff.journal import Journal
from medidiff.pipeline import Pipeline

log = logging.getLogger(__name__)
STATE_DIR = ".medidiff"


@dataclass
class SeriesResult:
    """What happened to one series (no patient identifiers: hashed keys only)."""

    series: str
    study: str
    modality: str
    size: str
    state: str
    message: str = ""
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0


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
            if r.state in ("failed", "skipped"):
                lines.append(f"  {r.state:7s} series {r.series} ({r.modality} {r.size}): {r.message}")
        for refusal in self.refused[:20]:
            lines.append(f"  unreadable {refusal['path']}: {refusal['reason']}")
        if len(self.refused) > 20:
            lines.append(f"  ... and {len(self.refused) - 20} more unreadable files (see report.json)")
        if not self.results:
            lines.append("  no DICOM image series found in the input")
        elif self.count("done") + self.count("already done") == 0 and not self.count("failed"):
            lines.append("  no series matched the pipeline's selection rules (see 'skipped' above)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def check_output_dir(output_dir: Path) -> None:
    """Create the output folder or raise OutputError saying why it cannot be used."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {output_dir}: {exc.strerror}") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {output_dir} is not writable; choose another with -o")


def run_pipeline(
    pipeline: Pipeline, input_path: str | Path, output_dir: str | Path, *, progress: bool = True
) -> RunReport:
    """Run ``pipeline`` over ``input_path`` into ``output_dir``; returns the report (also written)."""
    from tqdm.auto import tqdm

    from medidiff.io.discovery import discover, open_source

    output_dir = Path(output_dir)
    start = time.perf_counter()
    with open_source(Path(input_path)) as source_root:
        inventory = discover(source_root)
        check_output_dir(output_dir)
        report = RunReport(pipeline.name, pipeline.digest, str(input_path), str(output_dir))
        report.refused = [{"path": r.path, "reason": r.reason} for r in inventory.refused]
        journal = Journal(output_dir)
        try:
            bar = tqdm(inventory.series, desc=pipeline.name, unit="series", disable=not progress or None)
            for series in bar:
                report.results.append(_process(pipeline, series, output_dir, journal))
        finally:
            journal.close()
    report.seconds = time.perf_counter() - start
    _write_report(report, output_dir)
    return report


def _process(pipeline: Pipeline, series, output_dir: Path, journal: Journal) -> SeriesResult:
    result = SeriesResult(
        series=series.key, study=_study_key(series), modality=series.modality or "?",
        size=f"{series.rows}x{series.columns}x{series.frames}", state="skipped",
    )
    reason = pipeline.selection.reason_to_skip(series)
    if reason:
        result.message = reason
        journal.record(series.key, pipeline.digest, "skipped", message=reason)
        return result
    previous = journal.state(series.key, pipeline.digest)
    if previous and previous["state"] == "done":
        result.state, result.outputs = "already done", previous["outputs"]
        return result
    journal.record(series.key, pipeline.digest, "running")
    start = time.perf_counter()
    try:
        result.outputs = _run_one(pipeline, series, output_dir)
        result.state = "done"
    except MedidiffError as exc:
        result.state, result.message = "failed", str(exc)
    except Exception as exc:  # a bug, not a user mistake: keep the batch going, keep the traceback
        result.state = "failed"
        result.message = f"internal error ({type(exc).__name__}); details in {STATE_DIR}/errors.log"
        with open(output_dir / STATE_DIR / "errors.log", "a", encoding="utf-8") as fh:
            fh.write(f"series {series.key}:\n{traceback.format_exc()}\n")
    result.seconds = round(time.perf_counter() - start, 3)
    journal.record(
        series.key, pipeline.digest, result.state, message=result.message,
        outputs=result.outputs, seconds=result.seconds,
    )
    return result


def _study_key(series) -> str:
    from medidiff.io.privacy import hash_identifier

    return hash_identifier(series.study_uid)


def _run_one(pipeline: Pipeline, series, output_dir: Path) -> list[str]:
    from medidiff.io.loading import load_item
    from medidiff.outputs import write_outputs

    item = pipeline(load_item(series))
    final = output_dir / _study_key(series) / series.key
    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write_outputs(item, pipeline, partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return sorted(str(p.relative_to(output_dir)) for p in final.rglob("*") if p.is_file())


def _write_report(report: RunReport, output_dir: Path) -> None:
    from medidiff.io.atomic import atomic_write

    with atomic_write(output_dir / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    with atomic_write(output_dir / "report.txt") as tmp:
        Path(tmp).write_text(report.summary() + "\n", encoding="utf-8")
