"""The bone-suppression pipeline end to end on the bundled sample study (shipped weights)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.studies import ct_series_copies

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "samples" / "chest-dx-sample"


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medidiff.cli", "run", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bone") / "out"
    result = run("bone-suppression", SAMPLE, "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_writes_a_valid_derived_soft_tissue_series(demo_output):
    (dcm,) = demo_output.rglob("*.dcm")
    source = pydicom.dcmread(next(SAMPLE.glob("cxr-*.dcm")))
    derived = pydicom.dcmread(dcm)
    assert derived.ImageType[0] == "DERIVED" and "BS-LDM" in derived.SeriesDescription
    assert derived.StudyInstanceUID == source.StudyInstanceUID and derived.PatientID == source.PatientID
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (derived.Rows, derived.Columns) == (source.Rows, source.Columns)
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(dcm)], capture_output=True, text=True).stderr
        assert "Error" not in report, report
    for name in ("panel.png", "bone.png", "preview.png"):
        assert (dcm.parents[1] / name).is_file()


def test_soft_tissue_is_closer_to_the_reference_than_the_radiograph(demo_output):
    (dcm,) = demo_output.rglob("*.dcm")
    out = pydicom.dcmread(dcm).pixel_array.astype(float)
    cxr = pydicom.dcmread(next(SAMPLE.glob("cxr-*.dcm"))).pixel_array.astype(float)
    ref = pydicom.dcmread(next((SAMPLE / "reference").glob("*.dcm"))).pixel_array.astype(float)
    out = (out - out.mean()) / out.std() * ref.std() + ref.mean()  # the writer may rescale stored values
    assert np.abs(out - ref).mean() < 0.7 * np.abs(cxr - ref).mean()


def test_reference_series_is_skipped_and_reported(demo_output):
    report = json.loads((demo_output / "report.json").read_text())
    skipped = [r for r in report["results"] if r["state"] == "skipped"]
    assert len(skipped) == 1 and "reference series of an evaluation folder" in skipped[0]["message"]


def test_ct_is_refused_with_a_reason(tmp_path):
    ct_series_copies(tmp_path / "in", 1)
    result = run("bone-suppression", tmp_path / "in", "-o", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "modality CT is not one this pipeline accepts (CR, DX)" in result.stdout
