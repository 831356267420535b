"""Discovery and loading over pydicom's whole test corpus, plus specific refusals."""

from __future__ import annotations

import shutil
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medidiff.errors import InputError
from medidiff.io.discovery import discover, open_source
from medidiff.io.loading import load_item, load_series, load_study
from medidiff.io.writers import write_derived_dicom
from tests.radiographs import chest_radiograph, real_chest_cr


def _reason_of(inventory, name: str) -> str:
    matches = [r.reason for r in inventory.refused if Path(r.path).name == name]
    assert matches, f"{name} was not refused"
    return matches[0]


@pytest.fixture(scope="module")
def corpus_inventory(corpus_dir):
    ct = corpus_dir / "CT_small.dcm"
    (corpus_dir / "garbage.dcm").write_bytes(bytes(range(256)) * 8)
    (corpus_dir / "CT_truncated.dcm").write_bytes(ct.read_bytes()[:-5000])
    import pydicom

    ds = pydicom.dcmread(ct)
    del ds.PixelData
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(corpus_dir / "CT_no_pixels.dcm")
    return discover(corpus_dir)


def test_every_file_is_a_series_member_or_refused(corpus_dir, corpus_inventory):
    files = {str(p.relative_to(corpus_dir)) for p in corpus_dir.rglob("*") if p.is_file()}
    used = {str(f.relative_to(corpus_dir)) for s in corpus_inventory.series for f in s.files}
    refused = {r.path for r in corpus_inventory.refused}
    assert files == used | refused
    assert not used & refused
    assert all(len(r.reason) > 15 for r in corpus_inventory.refused)


def test_specific_refusals(corpus_inventory):
    assert "not a DICOM" in _reason_of(corpus_inventory, "garbage.dcm")
    assert "truncated" in _reason_of(corpus_inventory, "CT_truncated.dcm")
    assert "truncated" in _reason_of(corpus_inventory, "MR_truncated.dcm")
    assert "no pixel data" in _reason_of(corpus_inventory, "CT_no_pixels.dcm")
    assert "structured report" in _reason_of(corpus_inventory, "test-SR.dcm")
    assert "colour" in _reason_of(corpus_inventory, "SC_rgb_rle.dcm")
    assert "DICOMDIR" in _reason_of(corpus_inventory, "DICOMDIR")
    assert "duplicate" in _reason_of(corpus_inventory, "MR_small_RLE.dcm")


def test_series_grouping_and_public_dict(corpus_inventory):
    by_name = {s.files[0].name: s for s in corpus_inventory.series}
    ct = by_name["CT_small.dcm"]
    assert (ct.modality, ct.rows, ct.columns, ct.frames, ct.is_3d) == ("CT", 128, 128, 1, False)
    stacks = [s for s in corpus_inventory.series if len(s.files) > 1]
    assert stacks and all(s.is_3d and s.frames == len(s.files) for s in stacks)
    public = str([s.to_public_dict() for s in corpus_inventory.series])
    for s in corpus_inventory.series:
        assert s.series_uid not in public and s.study_uid not in public
    assert "CompressedSamples" not in public  # CT_small's PatientName
    assert len(corpus_inventory.summary_rows()) == len(corpus_inventory.series) + 1
    assert sum(len(v) for v in corpus_inventory.studies().values()) == len(corpus_inventory.series)


def test_load_every_discovered_series(corpus_inventory):
    start, loaded, failed = time.perf_counter(), 0, Counter()
    for series in corpus_inventory.series:
        try:
            image = load_series(series)
        except InputError as exc:
            failed[str(exc).split(": ", 1)[-1][:70]] += 1
            continue
        assert image.shape[:3] == (1, series.columns, series.rows)
        assert image.ndim == (4 if series.is_3d else 3)
        loaded += 1
    refused = Counter(r.reason.split(":")[0].split(" (")[0][:60] for r in corpus_inventory.refused)
    print(f"\ncorpus: {len(corpus_inventory.series)} series, {loaded} loaded, {sum(failed.values())} "
          f"failed to load, {len(corpus_inventory.refused)} files refused; load time "
          f"{time.perf_counter() - start:.1f}s")
    for reason, count in sorted(failed.items()):
        print(f"  load failed x{count}: {reason}")
    for reason, count in refused.most_common():
        print(f"  refused x{count}: {reason}")
    assert loaded >= 15


def test_dicomdir_input(pydicom_files_dir, tmp_path):
    shutil.copytree(pydicom_files_dir / "dicomdirtests", tmp_path / "d")
    inventory = discover(tmp_path / "d" / "DICOMDIR")
    assert len(inventory.series) >= 5
    assert all(s.modality in {"CT", "MR", "CR"} for s in inventory.series)
    assert not any("DICOMDIR" in r.reason for r in inventory.refused)


def test_zip_input(pydicom_files_dir, tmp_path):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("CT_small.dcm", "MR_small.dcm", "README.txt"):
            zf.write(pydicom_files_dir / name, f"inner/{name}")
    with open_source(archive) as root:
        inventory = discover(root)
        assert {s.modality for s in inventory.series} == {"CT", "MR"}
        assert load_series(inventory.series[0]).ndim == 3
    assert not root.exists()
    study = load_study(archive)
    assert len(study) == 2 and study[0].ndim == 3
    assert load_series(discover(archive).series[0]).ndim == 3  # the extraction lives as long as its series
    assert "series" in repr(study) and "CompressedSamples" not in repr(study)


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_bad_input_paths(tmp_path, make):
    path = tmp_path / "empty"
    if make == "empty":
        path.mkdir()
    with pytest.raises(InputError, match=str(path)):
        discover(path)


def test_projection_series_is_one_series_ref_per_image(tmp_path):
    """A CR/DX series holds one radiograph per instance: never a stack, whatever the sizes and views."""
    study, series = generate_uid(), generate_uid()
    views = [("PA", None, 8), ("LATERAL", None, 8), ("", "LL", 16), ("PA", "LL", 8), ("", "PA", 16)]
    for i, (position, code, shrink) in enumerate(views, start=1):
        chest_radiograph(tmp_path / f"{i}.dcm", study=study, series=series, instance=i, view_position=position,
                         view_code=code, shrink=shrink)
    inventory = discover(tmp_path)
    assert not inventory.refused  # two image sizes in one series: no "size differs" refusal
    refs = sorted(inventory.series, key=lambda s: s.files[0].name)
    assert [s.view_position for s in refs] == ["PA", "LATERAL", "LL", "LL", "PA"]  # a lateral code wins
    assert len({s.key for s in refs}) == 5 and {s.series_key for s in refs} == {refs[0].series_key}
    assert all(len(s.files) == 1 and s.frames == 1 and not s.is_3d and s.instance_uid for s in refs)
    assert [load_series(s).shape[1:] for s in refs[1:3]] == [(230, 244), (115, 122)]


def test_uncalibrated_radiograph_is_read_with_one_mm_pixels(tmp_path):
    """A real CR with PixelSpacing 0\\0 ("not calibrated") is used; the same value in a CT is refused."""
    shutil.copy(real_chest_cr(), tmp_path / "cr.dcm")
    (cr,) = discover(tmp_path).series
    assert cr.image_type == ("DERIVED", "PRIMARY") and cr.photometric == "MONOCHROME1" and not cr.skip_reason
    assert np.allclose(load_series(cr).meta["spacing"][:2], 1.0)
    (tmp_path / "cr.dcm").unlink()
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.PixelSpacing = ["0", "0"]
    ct.save_as(tmp_path / "ct.dcm")
    assert "pixel spacing 0\\0 is not two positive numbers" in _reason_of(discover(tmp_path), "ct.dcm")


def test_medidiff_outputs_and_evaluation_references_are_found_with_a_skip_reason(tmp_path):
    sample = Path(__file__).resolve().parents[1] / "datasets" / "samples" / "chest-dx-sample"
    shutil.copytree(sample, tmp_path / "eval")
    by_folder = {s.files[0].parent.name: s for s in discover(tmp_path / "eval").series}
    assert not by_folder["eval"].skip_reason
    assert "reference series of an evaluation folder" in by_folder["reference"].skip_reason
    (alone,) = discover(tmp_path / "eval" / "reference").series  # a folder of its own: an input like any other
    assert not alone.skip_reason
    item = load_item(by_folder["eval"])
    write_derived_dicom(item["image"], item["source"], tmp_path / "eval" / "out", series_description="s",
                        derivation_description="d")
    (output,) = [s for s in discover(tmp_path / "eval").series if s.files[0].parent.name == "out"]
    assert "medidiff's own output" in output.skip_reason
    derived = pydicom.dcmread(output.files[0])  # an output of a version before the equipment item
    del derived.ContributingEquipmentSequence
    for description, recognised in (("medidiff pipeline normalize-preview: resize", True), ("dual energy", False)):
        derived.DerivationDescription = description
        derived.save_as(output.files[0])
        (output,) = [s for s in discover(tmp_path / "eval").series if s.files[0].parent.name == "out"]
        assert bool(output.skip_reason) is recognised
