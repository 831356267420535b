"""A recording pipeline stage for batch and scale-out tests, and the pipeline file that uses it.

``recorder.Record`` appends ``load <pid>`` to a log when it is built and ``start <pid> <series key>`` each
time it runs, so tests count pipeline builds per process and attempts per series. It holds the run whose
start is number ``hold_at`` until the file ``release`` exists; a series described ``FAILS`` always fails
and one described ``FLAKY`` fails on its first start only.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pydicom

from tests.studies import ct_series_copies

RECORDER = '''
import os
import time

from medidiff.errors import StageError


class Record:
    def __init__(self, log: str, hold_at: int = 0, release: str = ""):
        self.log, self.hold_at, self.release = log, hold_at, release
        self._write(f"load {os.getpid()}")

    def _write(self, line):
        with open(self.log, "a") as fh:
            fh.write(line + "\\n")

    def __call__(self, item):
        key, description = item["source"].key, item["source"].series_description
        self._write(f"start {os.getpid()} {key}")
        with open(self.log) as fh:
            starts = [line.split()[2] for line in fh if line.startswith("start ")]
        if len(starts) == self.hold_at:
            while not os.path.exists(self.release):
                time.sleep(0.05)
        if description == "FAILS" or description == "FLAKY" and starts.count(key) == 1:
            raise StageError(f"this series is {description.lower()}")
        return item
'''


def recording_pipeline(folder: Path, hold_at: int = 0, outputs: str = "") -> tuple[Path, dict, Path]:
    """(pipeline file, environment, log) for a normalize-and-record pipeline written into ``folder``, with
    a derived DICOM series described as normalize-preview's and extra ``outputs`` lines (YAML)."""
    plugins = folder / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "recorder.py").write_text(RECORDER)
    log = folder / "record.log"
    pipeline = folder / "record.yaml"
    pipeline.write_text(
        f"name: record\nstages:\n  - normalize_intensity: {{}}\n"
        f"  - recorder.Record: {{log: '{log}', hold_at: {hold_at}, release: '{folder / 'release'}'}}\n"
        "outputs:\n  dicom: {series_description: medidiff normalized 256px}\n" + outputs
    )
    return pipeline, os.environ | {"PYTHONPATH": str(plugins)}, log


def starts(log: Path) -> list[tuple[str, str]]:
    """(pid, series key) of every recorded start, in order."""
    return [tuple(line.split()[1:]) for line in log.read_text().splitlines() if line.startswith("start ")]


def loads(log: Path) -> list[str]:
    """The pid of every recorded pipeline build."""
    return [line.split()[1] for line in log.read_text().splitlines() if line.startswith("load ")]


def described_studies(folder: Path, descriptions: list[str]) -> list[Path]:
    """One single-image CT study per description (its SeriesDescription: FAILS, FLAKY or any other)."""
    paths = ct_series_copies(folder, len(descriptions))
    for path, description in zip(paths, descriptions, strict=True):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = description
        ds.save_as(path)
    return paths


def journal_states(out: Path) -> list[str]:
    """The state of every series in the run journal of output folder ``out`` ([] before there is one)."""
    path = out / ".medidiff" / "journal.sqlite"
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True)) as db:  # never creates it
            return [row[0] for row in db.execute("SELECT state FROM series_runs")]
    except sqlite3.OperationalError:
        return []
