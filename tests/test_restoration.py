"""The restoration method: one backbone for every process, save/load, sizes, tiling, boundary conditions."""

import pytest
import torch

from medidiff.errors import StageError
from medidiff.methods.optimal_boundary import boundary_noise, search
from medidiff.methods.restoration import METHODS, Restoration, load_restoration, normalise

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
        load_restoration("ct_denoise", "esrgan", str(tmp_path))


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
