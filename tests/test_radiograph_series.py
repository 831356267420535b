"""Real chest radiographs through the bone-suppression pipeline: processed CRs, projection series image by
image, medidiff's own outputs skipped, MONOCHROME1 as good as MONOCHROME2 (pydicom-data's real CR)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.uid import RLELossless, generate_uid

from medidiff.executor import run_pipeline
from medidiff.output_folder import check_manifest
from medidiff.pipeline import Pipeline
from tests.cli_runner import medidiff
from tests.radiographs import chest_radiograph, fast_bone_suppression, real_chest_cr

LATERAL_SKIP = "view position LL is not one this pipeline accepts (PA, AP)"


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _derived(out: Path) -> dict[str, pydicom.Dataset]:
    """The derived images of an output folder by the SOP Instance UID of their source image."""
    found = [pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))]
    return {ds.SourceImageSequence[0].ReferencedSOPInstanceUID: ds for ds in found}


@pytest.fixture(scope="module")
def real_cr(tmp_path_factory) -> Path:
    """The real processed CR, as is, through the built-in pipeline from the command line."""
    root = tmp_path_factory.mktemp("real-cr")
    (root / "in").mkdir()
    shutil.copy(real_chest_cr(), root / "in" / "chest.dcm")
    result = medidiff("run", "bone-suppression", root / "in", "-o", root / "out", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_builtin_pipeline_processes_a_derived_primary_monochrome1_cr(real_cr):
    source = pydicom.dcmread(real_cr / "in" / "chest.dcm")
    assert list(source.ImageType) == ["DERIVED", "PRIMARY"] and source.PhotometricInterpretation == "MONOCHROME1"
    (out,) = _derived(real_cr / "out").values()
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert out.PhotometricInterpretation == "MONOCHROME1" and (out.Rows, out.Columns) == (source.Rows, source.Columns)
    assert [item.Manufacturer for item in out.ContributingEquipmentSequence] == ["medidiff"]
    assert "PixelSpacing" not in out  # the source's 0\0 ("not calibrated") is not copied as an invalid value
    # Written back the right way round: the soft-tissue image follows the radiograph, not its negative.
    assert np.corrcoef(out.pixel_array.ravel(), source.pixel_array.ravel())[0, 1] > 0.9
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(next((real_cr / "out").rglob("*.dcm")))],
                                capture_output=True, text=True).stderr
        assert "Error" not in report, report


def test_medidiff_output_is_skipped_with_its_reason(real_cr):
    result = medidiff("run", "bone-suppression", real_cr / "out", "-o", real_cr / "again", "--no-progress")
    assert result.returncode == 1 and "Traceback" not in result.stderr  # nothing to process
    (skipped,) = _report(real_cr / "again")["results"]
    assert skipped["state"] == "skipped" and "medidiff's own output" in skipped["message"]
    assert not list((real_cr / "again").rglob("*.dcm"))


@pytest.fixture(scope="module")
def dx_series(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One DX series of three images: PA, lateral (by its ViewCodeSequence only), PA repeat (RLE lossless)."""
    root = tmp_path_factory.mktemp("dx-series")
    study, series = generate_uid(), generate_uid()
    files = {
        "pa": chest_radiograph(root / "in" / "1.dcm", study=study, series=series, instance=1),
        "lateral": chest_radiograph(root / "in" / "2.dcm", study=study, series=series, instance=2,
                                    view_position="", view_code="LL"),
        "repeat": chest_radiograph(root / "in" / "3.dcm", study=study, series=series, instance=3, syntax=RLELossless),
    }
    uids = {name: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for name, path in files.items()}
    pipeline = fast_bone_suppression(root)
    result = medidiff("run", pipeline, root / "in", "-o", root / "out", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return root, uids


def test_projection_series_is_processed_image_by_image(dx_series):
    root, uids = dx_series
    results = _report(root / "out")["results"]
    assert sorted(r["state"] for r in results) == ["done", "done", "skipped"]
    assert len({r["series"] for r in results}) == 3 and len({r["image_of"] for r in results}) == 1
    (skipped,) = [r for r in results if r["state"] == "skipped"]
    assert skipped["message"] == LATERAL_SKIP and skipped["size"].endswith("x1")
    derived = _derived(root / "out")
    assert set(derived) == {uids["pa"], uids["repeat"]}  # one derived image per processed instance
    for r in results:
        if r["state"] == "done":
            assert check_manifest(root / "out" / r["study"] / r["series"]) is None
            assert sum(name.endswith(".dcm") for name in r["outputs"]) == 1
    # The repeat holds the same pixels in another transfer syntax: the same soft-tissue image.
    assert np.array_equal(derived[uids["pa"]].pixel_array, derived[uids["repeat"]].pixel_array)


def test_projection_series_resumes_image_by_image(dx_series):
    root, _ = dx_series
    report = run_pipeline(Pipeline.from_yaml(root / "bone-suppression-fast.yaml"), root / "in", root / "out",
                          progress=False)
    assert sorted(r.state for r in report.results) == ["already done", "already done", "skipped"]


def test_one_undecodable_image_does_not_lose_the_others(tmp_path):
    study, series = generate_uid(), generate_uid()
    good = chest_radiograph(tmp_path / "in" / "1.dcm", study=study, series=series, instance=1)
    bad = chest_radiograph(tmp_path / "in" / "2.dcm", study=study, series=series, instance=2, syntax=RLELossless)
    ds = pydicom.dcmread(bad)
    ds.PixelData = encapsulate([b"\x07\x00\x00\x00" + b"\x00" * 60 + b"\xff" * 64])  # an RLE header for 7 segments
    ds.save_as(bad)
    pipeline = Pipeline.from_yaml(fast_bone_suppression(tmp_path))
    for attempt in ("done", "already done"):
        report = run_pipeline(pipeline, tmp_path / "in", tmp_path / "out", progress=False)
        by_state = {r.state: r for r in report.results}
        assert set(by_state) == {attempt, "failed"}
        assert "pixel data cannot be decoded" in by_state["failed"].message
        assert check_manifest(tmp_path / "out" / by_state[attempt].study / by_state[attempt].series) is None
    (derived,) = _derived(tmp_path / "out").values()
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(good).SOPInstanceUID


def test_monochrome1_and_monochrome2_give_the_same_result_up_to_inversion(tmp_path):
    paths = {m1: chest_radiograph(tmp_path / "in" / f"{m1}.dcm", study=generate_uid(), series=generate_uid(),
                                  modality="CR", monochrome1=m1) for m1 in (True, False)}
    sources = {m1: pydicom.dcmread(path) for m1, path in paths.items()}
    top = 2 ** int(sources[True].BitsStored) - 1
    assert np.array_equal(sources[True].pixel_array, top - sources[False].pixel_array.astype(int))
    report = run_pipeline(Pipeline.from_yaml(fast_bone_suppression(tmp_path)), tmp_path / "in", tmp_path / "out",
                          progress=False)
    assert [r.state for r in report.results] == ["done", "done"]
    derived = _derived(tmp_path / "out")
    out = {m1: derived[str(sources[m1].SOPInstanceUID)] for m1 in (True, False)}
    assert [out[m1].PhotometricInterpretation for m1 in (True, False)] == ["MONOCHROME1", "MONOCHROME2"]
    values = {m1: apply_modality_lut(out[m1].pixel_array, out[m1]).astype(float) for m1 in (True, False)}
    assert np.abs((top - values[True]) - values[False]).max() <= 1.0
    changed = np.abs(values[False] - sources[False].pixel_array).mean()
    assert changed > 10  # the bones were suppressed, not an unchanged copy compared with itself
