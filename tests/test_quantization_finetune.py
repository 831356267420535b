"""EfficientDM and QuEST on a tiny diffusers UNet (straight-through quantizer, adapter merge, distillation,
which layers QuEST changes, files); FP-format and group quantization files reload to identical outputs."""

from __future__ import annotations

import pytest
import torch

from medidiff.acceleration import (
    FloatWeightQuantization,
    GroupQuantization,
    PostTrainingQuantization,
    TransformError,
    applied,
    record_model_inputs,
    transforms_from_spec,
)
from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.distillation import EfficientDM, QuEST, attach_trainable, quantize_ste
from medidiff.acceleration.fake_quant import fake_quantize
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.temporal import time_path_layers
from tests.test_acceleration import rel_err, run
from tests.test_quantization_kernels import tiny_model

ITERS = 12


@pytest.fixture(scope="module")
def model_fn():
    return tiny_model(0)


@pytest.fixture(scope="module")
def calibration(model_fn):
    """One whole sampling run of the float model (its own trajectory)."""
    return record_model_inputs(model_fn, lambda: run(model_fn, seed=1), every=1)


@pytest.fixture(scope="module")
def start(model_fn, calibration):
    """The post-training quantization the fine-tuning starts from (W4A8, no split shortcut)."""
    return PostTrainingQuantization(CalibrationSet(calibration.inputs[::2]), 4, 8,
                                    split_shortcut=False).quantize_layers(model_fn)


def outputs(model_fn, calls) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model_fn(*call) for call in calls]


def test_straight_through_quantizer_matches_fake_quantization_and_passes_gradients():
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    y = quantize_ste(x, lo, hi, 4)
    assert torch.equal(y, fake_quantize(x.detach(), lo.detach(), hi.detach(), 4))
    y.sum().backward()
    inside, outside = (y > y.min()) & (y < y.max()), (x < -1.2) | (x > 1.7)  # not clipped, clipped
    assert (x.grad[inside] == 1).all() and (x.grad[outside] == 0).all() and lo.grad != 0 and hi.grad != 0


def test_lora_merge_equals_the_unmerged_output(model_fn, calibration, start):
    calls, timesteps = calibration.inputs[::3], torch.tensor(calibration.timesteps, dtype=torch.float32)
    hooks = attach_trainable(model_fn, start, 8, timesteps, "merge-test", lambda name: {"rank": 2, "learn_ranges": True})
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for hook in hooks.values():
                hook.lora_b.copy_(0.05 * torch.randn(hook.lora_b.shape, generator=gen))
                if hook.act is not None:  # a different input range per timestep
                    hook.act.mul_(torch.linspace(0.8, 1.2, len(timesteps))[:, None])
        unmerged = outputs(model_fn, calls)
        found = weight_layers(model_fn)
        merged = EfficientDM()
        merged.layers = {name: hook.merged(found[name]) for name, hook in hooks.items()}
        merged.timesteps = timesteps
    finally:
        model_fn.remove_hook("merge-test")
    with applied(model_fn, PostTrainingQuantization.from_state(*_state(start), "start")):
        plain = outputs(model_fn, calls)
    with applied(model_fn, merged):
        for m, u, p in zip(outputs(model_fn, calls), unmerged, plain, strict=True):
            torch.testing.assert_close(m, u, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(m, p, atol=1e-3)  # the adapter did change the model


def _state(layers):
    container = PostTrainingQuantization(None, 4, 8)
    container.layers = layers
    return container.state()


def test_efficientdm_distillation_lowers_the_loss_and_reloads(model_fn, calibration, tmp_path):
    baseline = run(model_fn)
    dm = EfficientDM(calibration, weight_bits=4, act_bits=8, rank=2, iters=ITERS, lr=2e-3, ptq_every=2)
    with applied(model_fn, dm):
        out = run(model_fn)
    assert dm.losses["after"] < dm.losses["before"]
    assert 0 < rel_err(out, baseline) < 0.5
    act = dm.layers["net.up_blocks.1.resnets.0.conv1"].act_ranges
    assert act.shape == (len(calibration.timesteps), 2) and not torch.equal(act[0], act[-1])  # per timestep
    assert torch.equal(run(model_fn), baseline)
    path = dm.save(tmp_path / "dm.safetensors")
    (loaded,) = transforms_from_spec({"efficientdm": {"file": str(path)}})
    with applied(model_fn, loaded):
        assert torch.equal(run(model_fn), out)
    with pytest.raises(TransformError, match="a file of efficientdm, not of quest"):
        QuEST.load(path)


def test_quest_fine_tunes_only_the_temporal_and_most_sensitive_layers(model_fn, calibration, start):
    quest = QuEST(calibration, weight_bits=4, act_bits=8, sensitive=2, iters=ITERS, lr=1e-3, ptq_every=2)
    quest.apply(model_fn)
    quest.remove(model_fn)
    temporal = set(time_path_layers(model_fn))
    assert set(quest.chosen) > temporal and len(quest.chosen) == len(temporal) + 2
    assert quest.losses["after"] < quest.losses["before"]
    changed = {name for name, q in quest.layers.items() if not torch.equal(q.codes, start[name].codes)}
    assert changed and changed <= set(quest.chosen)
    for name, q in quest.layers.items():  # input ranges are not trained
        assert (q.act_ranges is None) == (start[name].act_ranges is None)
        assert q.act_ranges is None or torch.equal(q.act_ranges, start[name].act_ranges)


@pytest.mark.parametrize("make", [lambda cal: FloatWeightQuantization("fp4"),
                                  lambda cal: FloatWeightQuantization("fp8", cal, iters=5, samples=2),
                                  lambda cal: GroupQuantization(4, 16, 0.01)], ids=["fp4", "fp8-adaround", "groups"])
def test_fp_and_group_quantization_reload_to_identical_outputs(model_fn, calibration, make, tmp_path):
    quant = make(calibration)
    with applied(model_fn, quant):
        out = run(model_fn)
    path = quant.save(tmp_path / "q.safetensors")
    key = "fp_weights" if isinstance(quant, FloatWeightQuantization) else "group_quantization"
    (loaded,) = transforms_from_spec({key: {"file": str(path)}})
    with applied(model_fn, loaded):
        assert torch.equal(run(model_fn), out)
    with pytest.raises(TransformError, match="made for other weights"):
        loaded.apply(tiny_model(1))
