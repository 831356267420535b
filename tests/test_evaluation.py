"""`medidiff evaluate` against a real MLflow server: what one run holds, and that no identifier reaches it.

Needs the ``mlflow_server`` fixture (tests/mlflow_server.py, enabled in tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy.ndimage import gaussian_filter

from medidiff.cli import main
from medidiff.errors import InputError
from medidiff.evaluation import evaluate
from medidiff.evaluation.datasets import EvaluationData, SyntheticSource, _item
from medidiff.pipeline import Pipeline
from tests.mlflow_server import _free_port, stop

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-12345"
SMOOTH = """
name: smooth
select: {modality: [CT, DX]}
stages:
  - monai.transforms.GaussianSmoothd: {keys: [image], sigma: 1.0}
"""


def dicom_studies_with_references(folder: Path, count: int = 3) -> list[str]:
    """``count`` CT studies (CT_small.dcm, new UIDs, a known patient) and reference/ series; returns UIDs."""
    uids = []
    for i in range(count):
        for role in ("input", "reference"):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            if role == "input":
                study_uid = generate_uid()
            ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            pixels = ds.pixel_array
            if role == "reference":  # a smoother "ground truth", different per study
                pixels = gaussian_filter(pixels.astype(np.float64), 0.6 + 0.3 * i).round().astype(pixels.dtype)
            ds.PixelData = pixels.tobytes()
            target = folder / ("reference" if role == "reference" else "") / f"study_{i}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target)
            uids += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    return uids


def phantom_data(count: int = 6, size: int = 48) -> EvaluationData:
    """Small synthetic cases (noisy image, clean reference) that need no phantom generator."""

    def cases():
        for seed in range(count):
            rng = np.random.default_rng(seed)
            reference = gaussian_filter(rng.random((size, size + 8)), 3).astype(np.float32)
            image = reference + rng.normal(0, 0.05, reference.shape).astype(np.float32)
            yield _item(image, reference, SyntheticSource(seed, rows=size, columns=size + 8))

    return EvaluationData("noisy-phantom", "medidiff://test/noisy-phantom", "0123456789abcdef", count, cases)


@pytest.fixture()
def smooth(tmp_path) -> Path:
    path = tmp_path / "smooth.yaml"
    path.write_text(SMOOTH, encoding="utf-8")
    return path


def test_item_layout_follows_monai():
    item = next(phantom_data(1).cases())
    assert item["image"].shape == (1, 56, 48)  # (1, cols, rows)
    assert item["source"].modality == "DX" and item["source"].key == "seed-0"


def test_evaluation_run_reads_back(mlflow_server, smooth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = evaluate(smooth, phantom_data(), baseline="identity", tracking_uri=mlflow_server, experiment="t-eval")
    assert set(result.metrics) == {"psnr", "ssim", "mse"}
    assert result.comparison["psnr"].difference.low > 0  # smoothing removes the noise: a real gain
    assert result.tracking_error is None, result.tracking_error
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["pipeline.file"] == "smooth.yaml"
    assert params["pipeline.digest"] == Pipeline.from_yaml(smooth).digest
    assert params["stage.0.monai.transforms.GaussianSmoothd.sigma"] == "1.0"
    assert params["medidiff_version"] and params["baseline"] == "identity"
    assert params["stage.0.monai.transforms.GaussianSmoothd.approx"] == "erf"  # a default, not in the file
    assert all(params[f"{lib}_version"] for lib in ("torch", "monai", "diffusers", "pydicom"))
    for name in ("psnr", "ssim", "mse"):
        low, mean, high = (metrics[f"{name}_{s}"] for s in ("ci95_low", "mean", "ci95_high"))
        assert low <= mean <= high
        assert mean == pytest.approx(result.metrics[name].estimate)
        assert f"baseline_{name}_mean" in metrics and f"diff_{name}_wilcoxon_p" in metrics
    assert metrics["cases"] == 6
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "panels")}
    assert {"per_case_metrics.json", "panels/worst_psnr.png", "panels/best_psnr.png"} <= artifacts
    table = json.loads(Path(client.download_artifacts(result.run_id, "per_case_metrics.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 6 and "baseline_psnr" in table["columns"]
    panel = Image.open(client.download_artifacts(result.run_id, "panels/worst_psnr.png", str(tmp_path)))
    assert panel.size[0] > 3 * panel.size[1]  # before | after | difference | reference
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("noisy-phantom", "0123456789abcdef")
    assert dataset.dataset.source_type == "medidiff" and json.loads(dataset.dataset.source) == {"spec": "test/noisy-phantom"}


def test_no_patient_identifier_reaches_mlflow(mlflow_server, smooth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    studies = tmp_path / "studies"
    secrets = [PATIENT_NAME, "Doe", "Jane", PATIENT_ID, *dicom_studies_with_references(studies)]
    code = main(["evaluate", str(smooth), "--data", str(studies), "--baseline", "identity",
                 "--tracking-uri", mlflow_server, "--experiment", "t-privacy"])
    assert code == 0
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("t-privacy").experiment_id])
    assert run.data.metrics["cases"] == 3
    logged = [run.info.run_name, *run.data.params, *run.data.params.values(), *run.data.tags,
              *run.data.tags.values(), *run.data.metrics]
    for dataset_input in run.inputs.dataset_inputs:
        logged += [dataset_input.dataset.name, dataset_input.dataset.digest, dataset_input.dataset.source]
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in downloaded.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        logged.append(path.read_bytes().decode("latin-1"))
        if path.suffix == ".png":
            logged += [str(v) for v in Image.open(path).info.values()]
    text = "\n".join(logged)
    for secret in secrets:
        assert secret not in text, f"{secret!r} reached MLflow"


def test_cli_on_synthetic_phantom_cases(smooth, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", str(smooth), "--data", "synthetic-cxr:test:2:64", "--no-tracking"])
    out = capsys.readouterr().out
    assert code == 0 and "synthetic-cxr-test-2-64px: 2 cases" in out and "ssim" in out
    assert not (tmp_path / "mlflow.db").exists()


def test_no_tracking_logs_nothing(smooth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = evaluate(smooth, phantom_data(2), track=False)
    assert result.run_id is None and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "evaluations").exists()
    assert "psnr" in result.table() and "[n/a]" in result.table()  # 2 cases: no bootstrap CI


def test_cases_whose_output_differs_in_shape_fail():
    resize = Pipeline.from_text("name: r\nstages:\n  - resize_in_plane: {max_size: 32}\n")
    with pytest.raises(InputError, match="2 failed"):
        evaluate(resize, phantom_data(2), track=False)


def test_bone_suppression_on_held_out_phantoms_beats_identity(tmp_path, monkeypatch):
    from medidiff.evaluation.datasets import load_data

    monkeypatch.chdir(tmp_path)
    pipeline = Pipeline.from_yaml("bone-suppression")
    result = evaluate(pipeline, load_data("synthetic-cxr:test:3:256"), baseline="identity", track=False)
    assert set(result.metrics) == {"bsr", "psnr", "ssim", "mse"} and len(result.cases) == 3
    assert result.metrics["bsr"].estimate > 0.8 > result.baseline_metrics["bsr"].estimate
    assert result.comparison["psnr"].difference.estimate > 0
    assert not result.comparison["psnr"].difference.defined  # 3 cases: too few for a CI


def super_resolution_data(count: int = 3, size: int = 48) -> EvaluationData:
    """Half-resolution inputs (2x2 means) of smooth references: the output must grow to the reference grid."""

    def cases():
        for seed in range(count):
            reference = gaussian_filter(np.random.default_rng(seed).random((size, size + 8)), 2).astype(np.float32)
            image = reference.reshape(size // 2, 2, (size + 8) // 2, 2).mean(axis=(1, 3))
            yield _item(image, reference, SyntheticSource(seed, rows=size // 2, columns=(size + 8) // 2))

    return EvaluationData("half-res-phantom", "medidiff://test/half-res", "fedcba9876543210", count, cases)


class Upsample:
    """A test stage declaring the super-resolution task: bilinear 2x (so it differs from bicubic)."""

    task = "super_resolution"

    def __call__(self, item: dict) -> dict:
        import torch

        image = torch.nn.functional.interpolate(item["image"][None], scale_factor=2, mode="bilinear")[0]
        return item | {"image": image}


def test_super_resolution_output_is_scored_on_the_reference_grid_against_bicubic():
    pipeline = Pipeline.from_text("name: up\nstages: [tests.test_evaluation.Upsample]\n")
    assert pipeline.task == "super_resolution"
    result = evaluate(pipeline, super_resolution_data(), baseline="default", track=False)
    assert result.baseline == "bicubic" and set(result.metrics) == {"psnr", "ssim", "mse"}
    assert len(result.cases) == 3 and not result.failed
    assert result.metrics["psnr"].estimate > 20 and result.baseline_metrics["psnr"].estimate > 20
    assert result.comparison["psnr"].difference.estimate != 0  # bilinear vs bicubic: two different images


def test_identity_baseline_refuses_a_different_grid():
    pipeline = Pipeline.from_text("name: up\nstages: [tests.test_evaluation.Upsample]\n")
    with pytest.raises(InputError, match="3 failed"):
        evaluate(pipeline, super_resolution_data(), baseline="identity", track=False)


def test_tasks_choose_metrics_and_unknown_tasks_get_generic_ones():
    from medidiff.evaluation.tasks import Task, register_task, task_for

    assert task_for("bone_suppression").metrics[0] == "bsr"
    assert task_for("no-such-task").metrics == ("psnr", "ssim", "mse")
    assert task_for(None, "MR").metrics[-1] == "nmse"
    with pytest.raises(ValueError, match="unknown metric"):
        register_task(Task("bad", ("psnr", "lpipsx")))


def test_data_specs_are_a_registry(monkeypatch):
    from medidiff.evaluation import datasets

    monkeypatch.setitem(datasets.DATA_SPECS, "noisy", lambda spec, size: phantom_data(int(spec.split(":")[1])))
    assert datasets.load_data("noisy:2").count == 2
    with pytest.raises(InputError) as info:
        datasets.load_data("no/such/folder")
    assert "synthetic-cxr:..." in str(info.value) and "noisy:..." in str(info.value)


def test_phantom_specs_take_the_validation_or_the_test_seeds():
    from medidiff.datasets import chest_phantom
    from medidiff.evaluation.datasets import load_data

    val, test = load_data("synthetic-cxr:val:1:64"), load_data("synthetic-cxr:test:1:64")
    assert next(val.cases())["source"].seed in chest_phantom.VAL_SEEDS
    assert next(test.cases())["source"].seed in chest_phantom.TEST_SEEDS
    assert val.digest != test.digest and val.name == "synthetic-cxr-val-1-64px"
    with pytest.raises(InputError, match="test|val"):
        load_data("synthetic-cxr:train:1:64")
    with pytest.raises(InputError, match="ct-denoise:test:N"):
        load_data("ct-denoise:val:1")  # the restoration held-out sets have no validation split


def test_compare_methods_scores_tensor_methods_with_the_task_metrics():
    from medidiff import metrics
    from medidiff.evaluation.datasets import load_data
    from medidiff.evaluation.evaluate import compare_methods, methods_markdown
    from medidiff.evaluation.tasks import TASKS

    data = load_data("synthetic-cxr:test:2:64")
    methods = {"identity": (lambda x, _: x, 2), "oracle": (lambda x, reference: reference, 1)}
    identity, oracle = compare_methods(methods, data, TASKS["bone_suppression"])
    assert (identity["n"], oracle["n"]) == (2, 1)
    assert oracle["BSR"] == 1.0 and oracle["MSE"] == 0.0 and oracle["PSNR"] == 120.0
    cxr, soft = (torch.stack([i[k].as_tensor().transpose(1, 2) for i in data.cases()]) for k in ("image", "reference"))
    assert identity["PSNR"] == pytest.approx(float(metrics.psnr(cxr, soft).mean()), abs=1e-5)
    table = methods_markdown([identity, oracle], "Held-out", "note")
    assert "| method | n | BSR | PSNR | SSIM | MSE | s/img |" in table and "| oracle | 1 | 1.0000 | 120.00 |" in table


def test_bicubic_baseline_resamples_2d_and_3d_onto_the_reference_grid():
    from medidiff.evaluation.tasks import bicubic

    ramp = torch.linspace(0, 1, 8)
    image2d = ramp.view(1, 8, 1).expand(1, 8, 6).clone()
    out = bicubic({"image": image2d, "reference": torch.zeros(1, 16, 12)})["image"]
    assert out.shape == (1, 16, 12) and float(out[0, -1, 0]) > float(out[0, 0, 0])
    volume = torch.rand(1, 8, 6, 4)
    assert bicubic({"image": volume, "reference": torch.zeros(1, 16, 12, 8)})["image"].shape == (1, 16, 12, 8)


def test_zero_filled_baseline_interpolates_each_slice_in_k_space():
    from medidiff.evaluation.tasks import zero_filled
    from medidiff.physics.degradations import kspace_truncation

    slices = 0.5 + torch.rand(3, 1, 8, 6)  # positive low-resolution slices
    volume = zero_filled({"image": slices[:, 0].permute(1, 2, 0)[None], "reference": torch.zeros(1, 16, 12, 3)})["image"]
    assert volume.shape == (1, 16, 12, 3)
    for k in range(3):  # each output slice gives its own input slice back, and a 2-D item the same slice
        plane = volume[0, :, :, k][None, None]
        torch.testing.assert_close(kspace_truncation(plane, 2), slices[k:k + 1], atol=1e-4, rtol=1e-4)
        alone = zero_filled({"image": slices[k], "reference": torch.zeros(1, 16, 12)})["image"]
        torch.testing.assert_close(alone[0], volume[0, :, :, k], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="not the reference .* use the 'bicubic' baseline"):
        zero_filled({"image": slices[0], "reference": torch.zeros(1, 16, 13)})


@pytest.fixture()
def noisy_spec(monkeypatch) -> str:
    """``noisy:N``: :func:`phantom_data` as a data spec the CLI accepts."""
    from medidiff.evaluation import datasets

    monkeypatch.setitem(datasets.DATA_SPECS, "noisy", lambda spec, size: phantom_data(int(spec.split(":")[1])))
    return "noisy:4"


def test_closed_port_is_one_line_and_exit_2_before_any_work(smooth, noisy_spec, tmp_path, monkeypatch, capsys):
    import importlib

    evaluate_module = importlib.import_module("medidiff.evaluation.evaluate")  # the package's name is the function
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate_module, "load_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    uri = f"http://127.0.0.1:{_free_port()}"
    assert main(["evaluate", str(smooth), "--data", noisy_spec, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not reachable" in err and uri in err and "--no-tracking" in err
    assert not (tmp_path / "evaluations").exists()


@pytest.mark.parametrize("cases", ["0", "-3", "x"])
def test_cases_must_be_a_positive_number(smooth, noisy_spec, cases, capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(smooth), "--data", noisy_spec, "--no-tracking", "--cases", cases])
    assert info.value.code == 2 and "positive whole number" in capsys.readouterr().err
    with pytest.raises(InputError, match="positive"):
        evaluate(smooth, phantom_data(2), cases=-3, track=False)


def read_local_copy(folder: Path) -> tuple[list[dict], dict]:
    import csv

    with open(folder / "per_case_metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    return rows, json.loads((folder / "summary.json").read_text())


def test_server_stopped_mid_run_keeps_the_results_locally(stoppable_mlflow_server, smooth, noisy_spec, tmp_path,
                                                          monkeypatch, capsys):
    from medidiff import tracking

    uri, process = stoppable_mlflow_server
    log_metrics = tracking.log_metrics

    def stop_then_log(*args, **kwargs):  # params are stored; the server dies before the metrics
        stop(process)
        log_metrics(*args, **kwargs)

    monkeypatch.setattr(tracking, "log_metrics", stop_then_log)
    code = main(["evaluate", str(smooth), "--data", noisy_spec, "--baseline", "identity", "--tracking-uri", uri,
                 "-o", str(tmp_path / "results")])
    captured = capsys.readouterr()
    assert code == 2 and "psnr" in captured.out  # the table is printed
    assert "did not store the run completely" in captured.err and str(tmp_path / "results") in captured.err
    rows, summary = read_local_copy(tmp_path / "results")
    assert len(rows) == 4 and "baseline_psnr" in rows[0]
    assert summary["metrics"]["cases"] == 4 and "psnr_ci95_low" in summary["metrics"]
    assert {p.name for p in (tmp_path / "results" / "panels").iterdir()} == {"worst_psnr.png", "best_psnr.png"}


def test_unwritable_artifact_store_leaves_a_run_marked_incomplete(mlflow_server, smooth, tmp_path):
    blocker = tmp_path / "a-file"  # a folder below a regular file cannot be made, not even by root
    blocker.write_text("")
    client = MlflowClient(mlflow_server)
    client.create_experiment("t-unwritable", artifact_location=(blocker / "artifacts").as_uri())
    result = evaluate(smooth, phantom_data(3), tracking_uri=mlflow_server, experiment="t-unwritable",
                      output=tmp_path / "results")
    assert result.tracking_error and result.local_copy == tmp_path / "results"
    run = client.get_run(result.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["medidiff.complete"] == "false" and run.data.tags["medidiff.incomplete_reason"]
    rows, summary = read_local_copy(result.local_copy)
    assert len(rows) == 3 and summary["params"]["pipeline.name"] == "smooth"


def test_complete_runs_are_tagged_complete_and_keep_a_local_copy(mlflow_server, smooth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = evaluate(smooth, phantom_data(2), tracking_uri=mlflow_server, experiment="t-complete")
    run = MlflowClient(mlflow_server).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medidiff.complete"] == "true"
    assert result.local_copy.parent == Path("evaluations") and (tmp_path / result.local_copy / "summary.json").is_file()
    assert result.tracking_error is None


def test_a_mistyped_registered_model_fails_once_up_front(mlflow_server, tmp_path, monkeypatch):
    from medidiff import model_registry

    monkeypatch.setattr(model_registry, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    downloads = []
    download = model_registry._download
    monkeypatch.setattr(model_registry, "_download", lambda *a: downloads.append(a) or download(*a))
    pipeline = Pipeline.from_text("name: bs\nstages:\n  - bone_suppression: {model: 'models:/no-such-model/1'}\n")
    with pytest.raises(InputError, match="no-such-model"):
        evaluate(pipeline, phantom_data(3), track=False)
    assert len(downloads) == 1


class ModelStage:
    """A test stage with a model parameter (resolved and identified by the evaluator) that changes nothing."""

    def __init__(self, model: str = "default"):
        self.model = model

    def __call__(self, item: dict) -> dict:
        return item


def test_provenance_names_models_by_weights_and_the_baseline_pipeline(mlflow_server, smooth, tmp_path, monkeypatch):
    import hashlib

    from medidiff import model_registry
    from medidiff.evaluation.evaluate import model_provenance

    monkeypatch.setattr(model_registry, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "ldm.safetensors").write_bytes(b"weights")
    registered = model_registry.register_model_folder("tiny-provenance", folder)
    pipeline = Pipeline.from_text(f"name: bs\nstages:\n  - bone_suppression: {{model: '{registered.uri}'}}\n")
    found = model_provenance(pipeline)
    key = "stage.0.bone_suppression.model"
    assert found.params[f"{key}.ldm.safetensors.sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert found.params[f"{key}.registered"].startswith(f"{registered.uri} (run {registered.run_id}")
    assert [v.version for v in found.registered] == [registered.version]
    linked = Pipeline.from_text(f"name: m\nstages:\n  - tests.test_evaluation.ModelStage: {{model: '{registered.uri}'}}\n")
    result = evaluate(linked, phantom_data(2), tracking_uri=mlflow_server, experiment="t-provenance",
                      output=tmp_path / "linked")
    assert result.tracking_error is None, result.tracking_error
    client = MlflowClient(mlflow_server)
    version = client.get_model_version("tiny-provenance", registered.version)
    assert version.tags[f"medidiff.evaluation.{result.run_id}"] == "m on noisy-phantom"
    params = client.get_run(result.run_id).data.params
    assert params["stage.0.tests.test_evaluation.ModelStage.model.registered"].startswith(registered.uri)

    result = evaluate(smooth, phantom_data(2), baseline=str(smooth), track=False, output=tmp_path / "out")
    params = read_local_copy(result.local_copy)[1]["params"]
    assert params["baseline.digest"] == Pipeline.from_yaml(smooth).digest
    assert params["baseline.stage.0.monai.transforms.GaussianSmoothd.sigma"] == "1.0"
