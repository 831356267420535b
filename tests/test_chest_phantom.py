"""Synthetic chest phantom: determinism, physics sanity, seed splits and DX export."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from medidiff.datasets.chest_phantom import TEST_SEEDS, TRAIN_SEEDS, VAL_SEEDS, make_batch, make_pair
from medidiff.datasets.dx_writer import write_dx_study

SIZE = 256


@pytest.fixture(scope="module")
def pair():
    return make_pair(7, SIZE)


def _rows_cols(frac_rows, frac_cols):
    r0, r1 = (int(f * SIZE) for f in frac_rows)
    c0, c1 = (int(f * SIZE) for f in frac_cols)
    return slice(r0, r1), slice(c0, c1)


def test_shapes_range_and_meta(pair):
    for key in ("cxr", "soft", "bone"):
        assert pair[key].shape == (SIZE, SIZE) and pair[key].dtype == np.float32
    for key in ("cxr", "soft"):
        assert 0.0 <= pair[key].min() and pair[key].max() <= 1.0
    np.testing.assert_array_equal(pair["bone"], pair["cxr"] - pair["soft"])
    meta = pair["meta"]
    assert meta["seed"] == 7 and meta["pixel_spacing_mm"] == pytest.approx(400.0 / SIZE)
    assert meta["sex"] in ("F", "M") and isinstance(meta["monochrome1"], bool)


def test_deterministic_from_seed(pair):
    again = make_pair(7, SIZE)
    for key in ("cxr", "soft", "bone"):
        np.testing.assert_array_equal(pair[key], again[key])
    assert again["meta"] == pair["meta"]
    other = make_pair(8, SIZE)
    assert np.abs(other["cxr"] - pair["cxr"]).mean() > 0.01


def test_batch_stacks_pairs():
    batch = make_batch([3, 4], 64)
    assert set(batch) == {"cxr", "soft", "bone"}
    assert batch["cxr"].shape == (2, 64, 64)
    np.testing.assert_array_equal(batch["soft"][1], make_pair(4, 64)["soft"])


def test_bone_layer_physics(pair):
    bone = pair["bone"]
    noise = 5 * pair["meta"]["noise_sigma_at_0.3"] + 1e-3
    strong = bone > 0.02
    assert strong.mean() > 0.02  # ribs, spine, clavicles are there
    assert (pair["cxr"][strong] > pair["soft"][strong]).all()
    assert np.quantile(bone, 0.01) > -noise  # non-negative up to noise
    corners = np.concatenate([bone[:8, :8].ravel(), bone[:8, -8:].ravel()])
    assert np.abs(corners).max() < noise  # zero outside the body


def test_lungs_darker_than_mediastinum(pair):
    soft = pair["soft"]
    right_lung = soft[_rows_cols((0.35, 0.55), (0.22, 0.32))].mean()
    left_lung = soft[_rows_cols((0.35, 0.55), (0.68, 0.78))].mean()
    mediastinum = soft[_rows_cols((0.3, 0.5), (0.48, 0.52))].mean()
    assert max(right_lung, left_lung) + 0.2 < mediastinum


def test_seed_ranges_disjoint():
    splits = [set(TRAIN_SEEDS), set(VAL_SEEDS), set(TEST_SEEDS)]
    assert len(TRAIN_SEEDS) == 100_000 and len(VAL_SEEDS) == len(TEST_SEEDS) == 1_000
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


@pytest.mark.parametrize("monochrome1", [False, True])
def test_dx_export(tmp_path, pair, monochrome1):
    paths = write_dx_study(
        pair, tmp_path, seed=7, monochrome1=monochrome1, reference=True, compress=monochrome1
    )
    assert [p.parent.name for p in paths] == [tmp_path.name, "reference"]
    cxr, soft = (pydicom.dcmread(p) for p in paths)
    assert cxr.Modality == "DX" and cxr.BodyPartExamined == "CHEST" and cxr.ViewPosition == "PA"
    assert cxr.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    assert cxr.StudyInstanceUID == soft.StudyInstanceUID and cxr.SeriesInstanceUID != soft.SeriesInstanceUID
    assert cxr.PatientName == "SYNTHETIC^PHANTOM"
    stored = cxr.pixel_array.astype(np.float64) / 4095
    shown = 1 - stored if monochrome1 else stored
    np.testing.assert_allclose(shown, pair["cxr"], atol=1 / 4095)
    again = write_dx_study(pair, tmp_path / "again", seed=7, monochrome1=monochrome1)
    assert pydicom.dcmread(again[0]).SOPInstanceUID == cxr.SOPInstanceUID
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    for path in paths:
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
