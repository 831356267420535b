"""BS-LDM end to end on tiny models: trainer, metrics, model loading and the pipeline stage."""

import json
import math
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
import yaml
from monai.data import MetaTensor
from safetensors.torch import load_file

from medidiff.errors import InputError, StageError
from medidiff.methods.bone_suppression import BSLDM
from medidiff.methods.bone_suppression_training import training_pairs
from medidiff.methods.regression_baseline import RegressionBaseline
from medidiff.metrics import bsr, mse, nmse, psnr, ssim
from medidiff.stages.bone_suppression import BoneSuppression
from medidiff.train import train

FAKE_GENERATOR = textwrap.dedent('''
    import numpy as np
    TRAIN_SEEDS = range(0, 100)
    TEST_SEEDS = range(1000, 1100)

    def make_pair(seed, size=64):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:size, 0:size] / size
        soft = 0.3 + 0.3 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.1) + 0.02 * rng.standard_normal((size, size))
        bone = 0.2 * (np.sin(2 * np.pi * (6 * y + rng.random())) > 0.6)
        soft = soft.astype(np.float32)
        return {"cxr": (soft + bone).astype(np.float32), "soft": soft, "bone": bone.astype(np.float32), "meta": {}}

    def make_batch(seeds, size=64):
        pairs = [make_pair(s, size) for s in seeds]
        return {k: np.stack([p[k] for p in pairs]) for k in ("cxr", "soft", "bone")}
''')


def _config(tmp, kind, model, name=None, title=None, **train_cfg):
    cfg = {
        "name": f"tiny_{kind}", "title": title or f"tiny {kind} test model", "kind": kind, "seed": 0, "threads": 2,
        "data": {"generator": "fake_phantom", "n_train": 16, "size": 64, "cache_dir": str(tmp / "cache")},
        "model": model,
        "train": {"batch_size": 4, "lr": 3e-3, "max_steps": 4, "log_every": 1, "ema": 0.9, **train_cfg},
        "export": {"name": kind},
    }
    if kind == "ldm":
        cfg.update(vqgan=str(tmp / "models" / "vqgan"), diffusion={"num_train_timesteps": 1000, "offset_noise": 0.1},
                   sampling={"steps": 3, "threshold": {"r0": 1.45, "dr": 0.0025}})
    path = tmp / f"{name or kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TINY_LDM = {"latent_channels": 4, "channels": [8, 8, 16], "norm_groups": 8, "attention_head_dim": 8}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bs")
    (tmp / "fake_phantom.py").write_text(FAKE_GENERATOR)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(tmp))
    losses = []
    train(_config(tmp, "regression", {"channels": [4, 8], "strides": [2]}, max_steps=40, crop=32),
          out_dir=tmp / "run_reg", log=lambda step, m: losses.append(m["loss"]), export_to=tmp / "models")
    train(_config(tmp, "vqgan", {"channels": [4, 8, 8, 8], "latent_channels": 4, "num_codes": 16},
                  adv_start=2, disc_channels=4, crop=32, loss_weights={"l1": 1.0, "ssim": 0.5, "grad": 1.0, "freq": 0.1}),
          out_dir=tmp / "run_vq", export_to=tmp / "models")
    train(_config(tmp, "ldm", TINY_LDM), out_dir=tmp / "run_ldm", export_to=tmp / "models")
    yield tmp / "models", losses
    mp.undo()


def test_training_lowers_loss_and_exports(tiny_models):
    folder, losses = tiny_models
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    for name in ("regression", "vqgan", "ldm"):
        assert (folder / f"{name}.safetensors").exists() and (folder / f"{name}.json").exists()
        assert json.loads((folder / f"{name}.json").read_text())["training"]["title"] == f"tiny {name} test model"
    assert "sha256" in (folder / "MODEL_CARD.md").read_text()
    # each run folder holds a loadable model and a card titled from its config
    run = folder.parent / "run_ldm"
    assert {"ldm.safetensors", "vqgan.safetensors", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    assert (run / "MODEL_CARD.md").read_text().startswith("# tiny ldm test model\n")
    assert BSLDM.from_pretrained(run)(torch.rand(1, 1, 64, 64), 2).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("kind,model", [("regression", {"channels": [4, 8], "strides": [2]}), ("ldm", TINY_LDM)])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_models, tmp_path, kind, model):
    tmp = tiny_models[0].parent
    whole = train(_config(tmp, kind, model, name=f"{kind}_whole", max_steps=6, crop=32), out_dir=tmp_path / "whole")
    train(_config(tmp, kind, model, name=f"{kind}_part", max_steps=3, crop=32), out_dir=tmp_path / "parts")
    resumed = train(_config(tmp, kind, model, name=f"{kind}_part", title="retitled", max_steps=6, crop=32),
                    out_dir=tmp_path / "parts")  # a budget or title change resumes the run
    first = train(_config(tmp, kind, model, name=f"{kind}_part", max_steps=3, crop=32), out_dir=tmp_path / "other",
                  resume=False)
    a, b, c = load_file(whole), load_file(resumed), load_file(first)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    assert any(not torch.allclose(a[k].float(), c[k].float(), atol=1e-3) for k in a)  # 3 more steps do change them


def test_resuming_with_another_config_is_refused(tiny_models, tmp_path):
    tmp = tiny_models[0].parent
    train(_config(tmp, "regression", {"channels": [4, 8], "strides": [2]}, name="first", max_steps=1, crop=32),
          out_dir=tmp_path)
    changed = _config(tmp, "regression", {"channels": [4, 16], "strides": [2]}, name="changed", max_steps=2, crop=32)
    with pytest.raises(InputError, match="differs from the run"):
        train(changed, out_dir=tmp_path)


def test_default_run_folder_is_outside_the_source_tree(tiny_models, tmp_path, monkeypatch):
    import medidiff.train

    monkeypatch.setattr(medidiff.train, "RUNS_DIR", tmp_path / "runs")
    cfg = _config(tiny_models[0].parent, "regression", {"channels": [4, 8], "strides": [2]}, name="default_dir",
                  max_steps=1, crop=32)
    weights = train(cfg)
    assert weights == tmp_path / "runs" / "tiny_regression" / "regression.safetensors" and weights.exists()


def test_a_config_can_start_from_exported_weights(tiny_models, tmp_path):
    tmp = tiny_models[0].parent
    path = _config(tmp, "regression", {"channels": [4, 8], "strides": [2]}, name="init", max_steps=0, crop=32)
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**cfg, "init": str(tiny_models[0] / "regression")}))
    exported = load_file(train(path, out_dir=tmp_path / "run"))
    shipped = load_file(tiny_models[0] / "regression.safetensors")
    assert exported.keys() == shipped.keys() and all(torch.equal(exported[k], shipped[k]) for k in shipped)
    path.write_text(yaml.safe_dump({**cfg, "init": str(tmp_path / "absent")}))
    with pytest.raises(InputError, match="init: .*absent cannot start this model"):
        train(path, out_dir=tmp_path / "run2")


GAIN_GENERATOR = textwrap.dedent('''
    import numpy as np
    TRAIN_SEEDS = range(0, 100)

    def make_batch(seeds, size, gain=1.0):
        soft = np.stack([np.full((size, size), s / 100, np.float32) for s in seeds])
        return {"cxr": soft * gain, "soft": soft, "bone": soft * (gain - 1)}
''')


def test_training_pairs_mix_sources_with_their_options(tmp_path, monkeypatch):
    (tmp_path / "gain_generator.py").write_text(GAIN_GENERATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = {"size": 8, "cache_dir": str(tmp_path / "cache"), "workers": 2,
            "sources": [{"generator": "gain_generator", "n_train": 3},
                        {"generator": "gain_generator", "n_train": 2, "gain": 2.0}]}
    cxr, soft = training_pairs(data)
    assert cxr.shape == soft.shape == (5, 8, 8) and cxr.dtype == np.float16
    np.testing.assert_array_equal(cxr[:3], soft[:3])  # first source: gain 1
    np.testing.assert_allclose(cxr[3:], 2 * soft[3:])  # second source: its option reached make_batch
    np.testing.assert_allclose(soft[:, 0, 0], [0, 0.01, 0.02, 0, 0.01], atol=1e-3)  # each from its TRAIN_SEEDS
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "gain_generator_8px_3_cxr.npy", "gain_generator_8px_3_soft.npy",
        "gain_generator_gain-2.0_8px_2_cxr.npy", "gain_generator_gain-2.0_8px_2_soft.npy"]


def test_regression_baseline_subtracts_its_bone_layer(tiny_models):
    model = RegressionBaseline.from_pretrained(tiny_models[0])
    assert model.config["predicts"] == "bone_layer"
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        bone = model.model_fn.net(x)
    assert torch.allclose(model(x), x - bone)


def test_unknown_kind_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "kind": "nope", "train": {}, "export": {"name": "x"}}))
    with pytest.raises(InputError, match="bad.yaml: kind: 'nope' is not a training task"):
        train(path, out_dir=tmp_path / "run")


def test_cli_training_is_tracked_in_mlflow(tiny_models, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    folder, _ = tiny_models
    env = os.environ | {"PYTHONPATH": str(folder.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "medidiff.cli", "train", str(folder.parent / "regression.yaml"), "--fresh",
         "--run-dir", str(tmp_path / "run"), "--tracking-uri", mlflow_server],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    client = MlflowClient(mlflow_server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "medidiff-training"]
    run = client.search_runs([experiment.experiment_id], "attributes.run_name = 'regression'")[0]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) == 40 and run.data.params["config.kind"] == "regression"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/regression.safetensors", "model/regression.json", "model/MODEL_CARD.md"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/regression.yaml"]


def test_bsldm_suppress_shapes(tiny_models):
    model = BSLDM.from_pretrained(tiny_models[0])
    x = torch.rand(2, 1, 64, 64)
    for kw in ({}, {"thresholding": False}, {"method": "ddpm", "steps": 4}):
        out = model.suppress(x, **kw)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_bsr_formula():
    gt = torch.zeros(1, 1, 2, 2)
    cxr = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # bone energy 2
    assert bsr(gt, gt, cxr).item() == pytest.approx(1.0)
    assert bsr(cxr, gt, cxr, offset=False).item() == pytest.approx(0.0)
    # out' = cxr - 0.5: residual max(out' - gt, 0) = 0.5 on the two bone pixels -> 1 - 0.5 / 2
    assert bsr(cxr, gt, cxr).item() == pytest.approx(0.75)
    half = cxr * 0.5  # half the bone left, offset off: 1 - 0.5 / 2
    assert bsr(half, gt, cxr, offset=False).item() == pytest.approx(0.75)


def test_pixel_metrics_on_a_hand_example():
    gt = torch.full((1, 1, 2, 2), 0.5)
    out = gt + torch.tensor([[[[0.1, -0.1], [0.0, 0.0]]]])
    assert mse(out, gt).item() == pytest.approx(0.005)
    assert psnr(out, gt).item() == pytest.approx(10 * math.log10(1 / 0.005))
    assert nmse(out, gt).item() == pytest.approx(0.02 / 1.0)
    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(image, image).item() == pytest.approx(1.0)
    assert ssim(image, 1 - image).item() < 0  # anti-correlated structure


def _item(shape=(1, 300, 512), modality="DX", value=None):
    g = torch.Generator().manual_seed(0)
    img = MetaTensor(1000 + 3000 * torch.rand(shape, generator=g), affine=torch.diag(torch.tensor([0.2, 0.2, 1.0, 1.0])),
                     meta={"spacing": (0.2, 0.2), "note": "x"})
    if value is not None:
        img[0, 10, 10] = value
    src = types.SimpleNamespace(modality=modality, body_part="CHEST", view_position="PA")
    return {"image": img, "source": src, "original": img.clone()}


def test_stage_keeps_shape_and_meta(tiny_models):
    stage = BoneSuppression(steps=2, model=str(tiny_models[0]))
    item = _item()
    out = stage(item)
    assert out["image"].shape == item["image"].shape and out["bone"].shape == item["image"].shape
    assert torch.isfinite(out["image"]).all()
    assert torch.equal(out["image"].affine, item["image"].affine) and out["image"].meta["note"] == "x"
    assert torch.equal(out["original"], item["original"])
    assert torch.allclose(out["image"] + out["bone"], item["image"], atol=1e-2)


@pytest.mark.parametrize("item,words", [
    (_item(modality="CT"), "CT"),
    (_item(shape=(1, 300, 512, 20)), "3-D"),
    (_item(value=float("nan")), "NaN"),
    (_item(shape=(1, 64, 512)), "px"),
])
def test_stage_refuses(tiny_models, item, words):
    with pytest.raises(StageError, match=words):
        BoneSuppression(steps=2, model=str(tiny_models[0]))(item)
