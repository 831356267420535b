"""Reader studies: the export is blinded, the key round-trips, kappa and preferences are right."""

from __future__ import annotations

import csv
import hashlib
import re
import shutil

import pytest
from mlflow import MlflowClient
from PIL import Image
from scipy.stats import binomtest

from medidiff.errors import InputError
from medidiff.evaluation import reader_study
from medidiff.evaluation.datasets import load_data
from medidiff.evaluation.reader_study import ReaderKey, analyse, export, pairwise_kappa
from medidiff.pipeline import Pipeline
from tests.test_evaluation import SMOOTH, dicom_studies_with_references, phantom_data


@pytest.fixture()
def study(tmp_path):
    key = export(Pipeline.from_text(SMOOTH), phantom_data(6), tmp_path / "study", seed=11)
    return tmp_path / "study", key


def fill(study_dir, reader: str, methods: list[str], key: ReaderKey):
    """A reader's score file choosing ``methods`` (A, B or equal) for the template's rows, in order."""
    package = study_dir / reader_study.PACKAGE
    with open(package / reader_study.TEMPLATE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row, method in zip(rows, methods, strict=True):
        trial = key.trials[row["trial"]]
        row["reader"] = reader
        row["preferred"] = "equal" if method == "equal" else ("1" if trial["image_1"] == method else "2")
    path = study_dir / f"scores_{reader}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=reader_study.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_export_is_blinded(study):
    study_dir, key = study
    package = study_dir / reader_study.PACKAGE
    assert not list(package.rglob("key*")), "the key must not be inside the reader package"
    images = sorted((package / "images").iterdir())
    assert len(images) == 6 * 3
    for image in images:
        assert re.fullmatch(r"[0-9a-f]{8}\.png", image.name)
        with Image.open(image) as png:
            assert png.mode == "L" and not png.info.get("Software") and not getattr(png, "text", {})
    template = (package / reader_study.TEMPLATE).read_text()
    for secret in ("smooth", "identity", "A", "B", "seed-"):
        assert secret not in template
    assert {t["image_1"] for t in key.trials.values()} == {"A", "B"}  # order is randomised


def test_images_without_truth_export_without_a_reference(tmp_path):
    """Real images have no reference series: --no-reference exports them; scoring them is refused."""
    dicom_studies_with_references(tmp_path / "real", count=2)
    shutil.rmtree(tmp_path / "real" / "reference")
    with pytest.raises(InputError, match="--no-reference"):
        load_data(str(tmp_path / "real"))
    key = export(Pipeline.from_text(SMOOTH), str(tmp_path / "real"), tmp_path / "study", include_reference=False,
                 seed=3)
    with open(tmp_path / "study" / reader_study.PACKAGE / reader_study.TEMPLATE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(key.trials) == 2 and all(row["reference"] == "" for row in rows)
    assert len(list((tmp_path / "study" / reader_study.PACKAGE / "images").glob("*.png"))) == 4


def test_key_round_trips(study):
    study_dir, key = study
    loaded = ReaderKey.load(study_dir / reader_study.KEY_FILE)
    assert loaded == key
    assert loaded.methods["B"] == "identity" and loaded.methods["A"].startswith("smooth")
    assert sorted(t["case"] for t in loaded.trials.values()) == [f"seed-{i}" for i in range(6)]


def test_kappa_identical_readers_and_hand_computed_example():
    identical = [{"reader": r, "trial": str(t), "method": m}
                 for r in ("x", "y") for t, m in enumerate(["A", "B", "A", "equal"])]
    assert pairwise_kappa(identical) == {"x vs y": 1.0}
    first, second = ["A", "A", "B", "B", "A", "equal"], ["A", "B", "B", "B", "A", "A"]
    rows = [{"reader": "r1", "trial": str(t), "method": m} for t, m in enumerate(first)]
    rows += [{"reader": "r2", "trial": str(t), "method": m} for t, m in enumerate(second)]
    # observed agreement 4/6, chance (3*3 + 2*3 + 1*0)/36 = 15/36 -> kappa = (24 - 15)/(36 - 15) = 9/21
    assert pairwise_kappa(rows)["r1 vs r2"] == pytest.approx(9 / 21)


def test_import_decodes_and_logs(study, mlflow_server):
    study_dir, key = study
    scores = [fill(study_dir, "ann", ["A"] * 5 + ["B"], key), fill(study_dir, "bob", ["A"] * 5 + ["B"], key)]
    result = analyse(study_dir / reader_study.KEY_FILE, scores, tracking_uri=mlflow_server, experiment="t-readers")
    assert result.judgments == 12 and result.readers == ["ann", "bob"]
    assert result.preferences["A"].estimate == pytest.approx(10 / 12)
    assert result.preferences["A"].low < 10 / 12 < result.preferences["A"].high
    assert result.kappa == {"ann vs bob": 1.0}
    assert result.per_reader["ann"] == {"A": 5, "B": 1, "equal": 0, "net": pytest.approx(4 / 6),
                                        "sign_p": pytest.approx(binomtest(5, 6).pvalue)}
    # cases are the unit: 5 cases scored +1 by both readers, one -1 by both -> 6 values, not 12
    assert result.combined.n == 6 and result.combined.difference.estimate == pytest.approx(4 / 6)
    assert "readers averaged" in result.combined.difference.method and not result.incomplete
    run = MlflowClient(mlflow_server).get_run(result.run_id)
    metrics, params = run.data.metrics, run.data.params
    assert metrics["prefer_A_rate"] == pytest.approx(10 / 12) and metrics["kappa_mean"] == 1.0
    assert "prefer_equal_ci95_high" in metrics and metrics["net_A_mean"] == pytest.approx(4 / 6)
    key_sha = hashlib.sha256((study_dir / reader_study.KEY_FILE).read_bytes()).hexdigest()
    assert params["key.sha256"] == run.data.tags["medidiff.reader_study_key"] == key_sha
    assert params["scores.1.sha256"] == hashlib.sha256(scores[1].read_bytes()).hexdigest()
    assert "independent" in params["ci.preference"]


def test_duplicate_judgments_are_refused_and_blank_trials_reported(study, tmp_path):
    study_dir, key = study
    path = fill(study_dir, "cat", ["A", "B", "equal", "A", "A", "B"], key)
    lines = path.read_text().splitlines()
    (tmp_path / "twice.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(InputError, match="already judged"):
        analyse(study_dir / reader_study.KEY_FILE, [tmp_path / "twice.csv"], track=False)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["preferred"] = rows[1]["preferred"] = ""  # two trials left blank
    with open(tmp_path / "partial.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=reader_study.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    result = analyse(study_dir / reader_study.KEY_FILE, [tmp_path / "partial.csv"], track=False)
    assert result.incomplete == {"cat": 2} and result.judgments == 4
    assert "incomplete" in result.table() and "n/a" in result.table()  # < 6 cases: no combined CI


def test_bad_scores_are_refused(study, tmp_path):
    study_dir, key = study
    bad = tmp_path / "bad.csv"
    bad.write_text("reader,trial,preferred\nx,nope,1\n")
    with pytest.raises(Exception, match="not in the key"):
        analyse(study_dir / reader_study.KEY_FILE, [bad], track=False)
    bad.write_text(f"reader,trial,preferred\nx,{next(iter(key.trials))},left\n")
    with pytest.raises(Exception, match="must be 1, 2 or equal"):
        analyse(study_dir / reader_study.KEY_FILE, [bad], track=False)
