"""The restoration method: one backbone for every process, save/load, sizes, tiling, boundary conditions."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from medidiff.errors import StageError
from medidiff.methods.base import write_component
from medidiff.methods.optimal_boundary import boundary_noise, search
from medidiff.methods.restoration import METHODS, Restoration, load_restoration, model_names, normalise

PROCESS = {"resshift": {"name": "resshift", "num_train_timesteps": 4}, "upsr": {"name": "upsr", "num_train_timesteps": 4},
           "resfusion": {"name": "resfusion"}, "rddm": {"name": "rddm"}, "one_step": {"name": "resshift", "num_train_timesteps": 4}}


def tiny(method: str, task: str = "ct_denoise", scale: int = 1, estimator=None) -> Restoration:
    config = {"task": task, "method": method, "scale": scale, "modalities": ["CT"],
              "intensity": {"kind": "hu", "low": -1024.0, "high": 2048.0},
              "model": {"unet": {"channels": [8, 16, 16], "blocks": 1, "time_channels": 32}}}
    if method in PROCESS:
        config.update(process=PROCESS[method], steps=4)
    torch.manual_seed(0)
    return Restoration.create(config, estimator)


def image(size=40):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return (0.5 + 0.3 * torch.sin(8 * xx) * torch.cos(6 * yy))[None, None]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_restores_saves_and_loads_the_same(method, tmp_path):
    estimator = tiny("regression") if method == "upsr" else None
    m = tiny(method, estimator=estimator)
    if estimator:
        estimator.save_pretrained(tmp_path)
    m.save_pretrained(tmp_path)
    x = image(37)  # not a multiple of the U-Net's 8: padded inside, cropped back
    out = m.restore(x, seed=3)
    assert out.shape == x.shape and torch.isfinite(out).all()
    again = load_restoration("ct_denoise", method, str(tmp_path)).restore(x, seed=3)
    assert torch.allclose(out, again, atol=2e-2)  # weights are shipped as float16
    if method not in ("regression", "rddm"):  # stochastic samplers: the seed matters
        assert not torch.allclose(out, m.restore(x, seed=4))


def test_super_resolution_returns_the_scaled_size():
    m = tiny("resshift", task="mr_sr4", scale=4)
    assert m.restore(image(20)).shape == (1, 1, 80, 80)


def test_missing_weights_and_methods_are_user_errors(tmp_path):
    with pytest.raises(StageError, match="medidiff train configs/restoration/ct_denoise_rddm.yaml"):
        load_restoration("ct_denoise", "rddm", str(tmp_path))
    with pytest.raises(StageError, match="expected one of"):
        load_restoration("ct_denoise", "../esrgan", str(tmp_path))
    with pytest.raises(StageError, match=r"no esrgan model .*it holds none"):
        load_restoration("ct_denoise", "esrgan", str(tmp_path))


def test_a_trained_variant_loads_by_its_name(tmp_path):
    m = tiny("resshift")
    write_component(tmp_path, "resshift15", m.model_fn.net, m.config)  # as an export named resshift15
    (tmp_path / "eval_held_out.json").write_text("{}")  # a report beside the models, not a model
    assert model_names(tmp_path) == ["resshift15"]
    x = image(24)
    assert torch.allclose(load_restoration("ct_denoise", "resshift15", str(tmp_path)).restore(x, seed=1),
                          m.restore(x, seed=1), atol=2e-2)
    with pytest.raises(StageError, match=r"it holds resshift15"):
        load_restoration("ct_denoise", "resshift", str(tmp_path))


def test_hu_units_round_trip_exactly():
    hu = torch.tensor([[-1024.0, 0.0, 40.0, 1500.0, 3000.0]])
    units, back = normalise(hu, {"kind": "hu", "low": -1024.0, "high": 2048.0})
    assert units[0, 0] == 0 and units[0, -1] > 1  # unclipped: dense bone keeps its HU
    assert torch.allclose(back(units), hu)


def test_optimal_boundary_is_deterministic_and_tiles_periodically():
    m = tiny("resshift")
    noise = boundary_noise({"seed": 5, "size": 16}, (2, 1, 40, 40))
    assert torch.equal(noise[..., :16, :16], noise[..., 16:32, 16:32]) and torch.equal(noise[0], noise[1])
    clean, degraded = image(32).repeat(2, 1, 1, 1), image(32).repeat(2, 1, 1, 1) + 0.05 * torch.randn(2, 1, 32, 32)
    boundary, scores = search(m, (clean, degraded), candidates=3, size=16)
    assert len(scores) == 3 and boundary["seed"] == max(scores, key=lambda s: s[1])[0]
    m.config["boundary"] = boundary
    first = m.restore(degraded, boundary="optimal", seed=0)
    assert torch.equal(first, m.restore(degraded, boundary="optimal", seed=99))  # no randomness left
    with pytest.raises(StageError, match="boundary"):
        tiny("resshift").restore(degraded, boundary="optimal")


TINY_UNET = {"channels": [8, 16, 16], "blocks": 1, "time_channels": 32}


def training_config(tmp_path, method: str, **extra) -> dict:
    cfg = {"name": f"t_{method}", "kind": "restoration", "task": "mr_sr4", "method": method, "seed": 0, "threads": 1,
           "model": {"unet": TINY_UNET}, "data": {"patch": 32}, "train": {"batch": 4, "lr": 2e-3}, "export": {"name": method}}
    if method in PROCESS:
        cfg["process"] = PROCESS[method]
    return {**cfg, **extra}


@pytest.mark.parametrize("method", ["regression", "resshift", "resfusion", "rddm"])
def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(method, tmp_path):
    """One training loop for every process: 25 steps lower the loss of a fixed held-aside batch."""
    from medidiff.datasets.restoration_images import training_pairs
    from medidiff.methods.restoration_training import RestorationTask
    from medidiff.physics.degradations import upsample

    torch.manual_seed(0)
    task = RestorationTask(training_config(tmp_path, method), np.random.default_rng(0), torch.device("cpu"))
    clean, lr = training_pairs("mr_sr4", 8, 32, np.random.default_rng(99))
    y, t = upsample(lr, 4), torch.arange(8) % max(1, getattr(task.process, "num_train_timesteps", 1))
    noise = torch.randn_like(clean)

    def loss() -> float:
        with torch.no_grad():
            if task.process is None:
                return F.mse_loss(task.fn(y, torch.zeros(8, dtype=torch.long)), clean).item()
            x_t = task.process.add_noise(clean, noise, t, y)
            return F.mse_loss(task.fn(x_t, t, y), task.process.training_target(clean, noise, t, y)).item()
    before = loss()
    for step in range(25):
        task.step(step)
    assert loss() < 0.9 * before


@pytest.mark.parametrize("method", ["regression", "resshift"])
def test_a_residual_scaled_network_starts_as_the_identity_and_learns_a_small_residual(method, tmp_path):
    """With model.residual_scale the restored image is y + scale * net: y at the start; 40 steps on a
    denoising problem whose noise is 2 % of the range (CT's case) bring it closer to the clean image."""
    from medidiff.datasets.restoration_images import training_pairs
    from medidiff.methods.restoration_training import RestorationTask

    torch.manual_seed(0)
    cfg = {**training_config(tmp_path, method), "task": "ct_denoise", "model": {"unet": TINY_UNET, "residual_scale": 0.05}}
    if method == "resshift":  # kappa 2 in residual units, as the CT configs
        cfg["process"] = {**PROCESS["resshift"], "kappa": 0.1}
    task = RestorationTask(cfg, np.random.default_rng(0), torch.device("cpu"))
    pool = training_pairs("mr_sr4", 64, 32, np.random.default_rng(5))[0]
    noisy = pool + 0.02 * torch.randn(pool.shape, generator=torch.Generator().manual_seed(1))
    batches = iter(range(10**6))
    task.pairs = lambda: (pool[(i := next(batches) % 7 * 8): i + 8], noisy[i: i + 8])  # 7 training batches
    clean, y = pool[-8:], noisy[-8:]  # held aside

    def restored() -> torch.Tensor:
        return Restoration(copy.deepcopy(task.net), task.config).restore(y)
    if method == "regression":
        assert torch.allclose(restored(), y)
    for step in range(40):
        task.step(step)
    assert F.mse_loss(restored(), clean) < 0.9 * F.mse_loss(y, clean)


def test_a_process_started_from_a_trained_regression_predicts_its_x0_whatever_x_t(tmp_path):
    """init: a regression's weights -> a ResShift network reading [x_t, y] outputs the regression's x0
    (at the regression's timestep) for any x_t; without a residual scale the start is refused."""
    from medidiff.methods.restoration_training import RestorationTask

    model = {"unet": TINY_UNET, "residual_scale": 0.1}
    regression = RestorationTask(training_config(tmp_path, "regression", model=model), np.random.default_rng(0), torch.device("cpu"))
    torch.nn.init.normal_(regression.net.conv_out.weight, std=0.1)  # a trained, non-zero residual
    task = RestorationTask(training_config(tmp_path, "resshift", model=model), np.random.default_rng(0), torch.device("cpu"))
    task.start_from(regression.net.state_dict())
    y, t0 = image(32), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        expected = regression.fn(y, t0)
        assert not torch.allclose(expected, y)
        for x_t in (torch.randn_like(y), y):
            assert torch.allclose(task.fn(x_t, t0, y), expected, atol=1e-6)
    plain = RestorationTask(training_config(tmp_path, "resshift"), np.random.default_rng(0), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="residual_scale"):
        plain.start_from(regression.net.state_dict())


def test_one_step_student_trains_exports_and_restores(tmp_path):
    """The student starts as a copy of its teacher, trains with its three losses and restores in one pass."""
    from medidiff.train import train

    teacher = tiny("resshift", task="mr_sr4", scale=4)
    teacher.config["model"]["unet"] = TINY_UNET
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = {"name": "t_student", "kind": "restoration_student", "task": "mr_sr4", "seed": 0, "threads": 1,
           "teacher": str(tmp_path / "teacher" / "resshift"), "data": {"patch": 32},
           "train": {"batch": 2, "lr": 1e-4, "max_steps": 3, "log_every": 1}, "export": {"name": "one_step"}}
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(cfg))
    weights = train(tmp_path / "student.yaml", out_dir=tmp_path / "run")
    student = load_restoration("mr_sr4", "one_step", str(weights.parent))
    assert student.config["method"] == "one_step" and student.noise_maps() == 1
    assert student.config["training"]["final_metrics"]["critic"] > 0
    assert student.restore(image(16)).shape == (1, 1, 64, 64)


def test_structure_modulated_noise_shifts_the_mean_per_segment_only():
    """SAM-DiffSR: one added value per segment (from its position), none with strength 0."""
    from medidiff.diffusion.structure_noise import structure_modulated_noise

    clean = torch.zeros(1, 1, 64, 64)
    clean[..., :, 32:] = 1.0  # two regions at least
    noise = torch.randn(1, 1, 64, 64)
    shift = structure_modulated_noise(noise, clean, strength=0.3) - noise
    assert 2 <= len(torch.unique(shift.round(decimals=5))) <= 40
    assert shift.abs().max() > 0.01 and shift.abs().max() <= 0.3 + 1e-6
    left, right = shift[..., :, :32], shift[..., :, 32:]
    assert not set(left.unique().tolist()) & set(right.unique().tolist())  # segments follow the edge
    assert torch.equal(structure_modulated_noise(noise, clean, strength=0.0), noise)


@pytest.mark.parametrize("method", ["regression", "resshift"])
def test_tiled_restoration_has_no_seam(method):
    """A shipped model on a held-out MR in 128-px tiles (25 % overlap, Gaussian blend) against one pass:
    no jump along the tile borders (the one-pass/tiled difference map is smooth), unlike butted tiles."""
    from medidiff.datasets.restoration_images import held_out_pairs

    lr = held_out_pairs("mr_sr4")[1][2][..., :64, :64]
    m = load_restoration("mr_sr4", method)
    whole = m.restore(lr, tile=None)

    def steps_of_difference(tiled):
        d = (tiled - whole)[..., 8:-8, 8:-8]  # the image's own edge is padded differently
        return max((d[..., :, 1:] - d[..., :, :-1]).abs().max().item(), (d[..., 1:, :] - d[..., :-1, :]).abs().max().item()), d

    blended, d = steps_of_difference(m.restore(lr, tile=128, overlap=0.25))
    butted, _ = steps_of_difference(m.restore(lr, tile=128, overlap=0.0))
    assert d.abs().mean().item() < 0.01 and blended < butted
