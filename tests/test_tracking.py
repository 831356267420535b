"""Tracking helpers on a real MLflow server: the training logger, and model folders through the registry."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from medidiff import model_registry, tracking
from medidiff.cli import main
from medidiff.errors import InputError
from medidiff.resources import model_dir


def test_register_and_resolve(mlflow_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model_registry, "CACHE_DIR", tmp_path / "cache")
    folder = tmp_path / "tiny_model"
    (folder / "sub").mkdir(parents=True)
    (folder / "MODEL_CARD.md").write_text("# tiny\n")
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "sub" / "config.json").write_text('{"channels": 4}')
    assert main(["models", "register", "tiny", "--folder", str(folder), "--tracking-uri", mlflow_server]) == 0
    assert "models:/tiny/1" in capsys.readouterr().out
    resolved = model_registry.resolve_model_dir("models:/tiny/1", tracking_uri=mlflow_server)
    assert resolved.is_relative_to(tmp_path / "cache")
    assert model_registry.folder_digest(resolved) == model_registry.folder_digest(folder)
    assert sorted(p.relative_to(resolved) for p in resolved.rglob("*")) == sorted(
        p.relative_to(folder) for p in folder.rglob("*"))
    assert model_registry.resolve_model_dir("models:/tiny/1", tracking_uri=mlflow_server) == resolved  # cached


def test_resolve_local_specs(tmp_path):
    with pytest.raises(InputError, match="shipped model"):
        model_registry.resolve_model_dir("")
    assert model_registry.resolve_model_dir("", default_name="bone_suppression") == model_dir("bone_suppression")
    assert model_registry.resolve_model_dir("default", default_name="x") == model_dir("x")
    assert model_registry.resolve_model_dir(str(tmp_path)) == tmp_path
    with pytest.raises(InputError):
        model_registry.resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="models:/<name>/<version>"):
        model_registry.resolve_model_dir("models:/only-name")


def test_training_logger(mlflow_server, tmp_path):
    config = tmp_path / "ldm.yaml"
    config.write_text("model: {channels: 8}\nlr: 0.001\n")
    weights = tmp_path / "weights.safetensors"
    with tracking.training_logger("ldm", config, tracking_uri=mlflow_server, experiment="t-train") as log:
        for step in range(3):
            log(step, {"loss": 1.0 / (step + 1), "nan": float("nan")})
        weights.write_bytes(b"w")
        log.add_model_files(weights)
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("t-train").experiment_id])
    assert run.data.params["config.model.channels"] == "8" and run.data.params["config.lr"] == "0.001"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1 / 3]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/weights.safetensors"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {"config/ldm.yaml"}


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri() == "http://env:5000"
    assert tracking.resolve_tracking_uri("http://flag:5000") == "http://flag:5000"


def test_bone_suppression_runs_from_the_registry(mlflow_server, tmp_path, monkeypatch):
    import torch
    from monai.data import MetaTensor

    from medidiff.datasets.chest_phantom import make_pair
    from medidiff.pipeline import Pipeline

    monkeypatch.setattr(model_registry, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registered = model_registry.register_model_folder(
        "bone_suppression_test", model_dir("bone_suppression")
    )
    pipeline = Pipeline.from_text(
        f"name: bs\nstages:\n  - bone_suppression: {{steps: 5, model: '{registered.uri}'}}\n"
    )
    cxr = torch.from_numpy(make_pair(2_000_000, 256)["cxr"]).T[None]
    source = type("Source", (), {"modality": "DX"})()
    item = pipeline({"image": MetaTensor(cxr.clone()), "original": MetaTensor(cxr.clone()), "source": source})
    resolved = model_registry.resolve_model_dir(registered.uri)
    assert resolved.is_relative_to(tmp_path / "cache")
    assert model_registry.folder_digest(resolved) == model_registry.folder_digest(model_dir("bone_suppression"))
    assert item["image"].shape == cxr.shape and float((item["bone"]).abs().mean()) > 0.001


def test_reachability_check_wants_an_mlflow_server(mlflow_server, tmp_path):
    import functools
    import http.server
    import threading

    from tests.mlflow_server import _free_port

    assert tracking.check_reachable(mlflow_server) == mlflow_server
    assert tracking.check_reachable("sqlite:///no/such/folder/mlflow.db")  # local stores are not checked
    with pytest.raises(tracking.TrackingError, match="not reachable .*Connection refused"):
        tracking.check_reachable(f"http://127.0.0.1:{_free_port()}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as other:  # another program: HTTP 404
        threading.Thread(target=other.serve_forever, daemon=True).start()
        with pytest.raises(tracking.TrackingError, match="HTTP 404: no MLflow tracking server"):
            tracking.check_reachable(f"http://127.0.0.1:{other.server_address[1]}")
        other.shutdown()
