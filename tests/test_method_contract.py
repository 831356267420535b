"""The method contract: the model-function hook point, save/load, the shipped weights."""

import pytest
import torch
from diffusers.hooks import ModelHook
from safetensors.torch import load_file

from medidiff.methods.bone_suppression import BSLDM, MODELS_DIR, build_noise_unet
from medidiff.methods.regression_baseline import RegressionBaseline, build_regression_unet
from medidiff.nets.vqgan import VQGAN

VQ_CONFIG = {"model": {"channels": [4, 8, 8, 8], "latent_channels": 4, "num_codes": 16, "quantize_on_decode": False}}
LDM_CONFIG = {
    "model": {"latent_channels": 4, "channels": [8, 8, 16], "norm_groups": 8, "attention_head_dim": 8},
    "diffusion": {"num_train_timesteps": 1000}, "latent_scale": 0.5, "vqgan": "vqgan",
    "sampling": {"steps": 4, "method": "ddpm", "threshold": {"r0": 1.45, "dr": 0.0025}},
}


class Recorder(ModelHook):
    """Counts the calls it sees, checks their arguments, and scales the output."""

    _is_stateful = True

    def __init__(self, factor=1.0):
        super().__init__()
        self.calls, self.resets, self.factor = [], 0, factor

    def pre_forward(self, module, x, t, condition):
        self.calls.append((tuple(x.shape), int(t[0]), None if condition is None else tuple(condition.shape)))
        return (x, t, condition), {}

    def post_forward(self, module, output):
        return output * self.factor

    def reset_state(self, module):
        self.resets += 1
        return module


@pytest.fixture()
def tiny_ldm():
    torch.manual_seed(0)
    return BSLDM(VQGAN.from_config(VQ_CONFIG["model"]), build_noise_unet(LDM_CONFIG["model"]), LDM_CONFIG,
                 vqgan_config=VQ_CONFIG)


def test_a_hook_at_the_model_function_sees_every_denoiser_call_and_can_change_the_output(tiny_ldm):
    x = torch.rand(2, 1, 64, 64)
    plain = tiny_ldm(x, 5)
    hook = Recorder()
    tiny_ldm.model_fn.register_hook(hook, "recorder")
    assert torch.equal(tiny_ldm(x, 5), plain)  # an identity hook changes nothing
    process = tiny_ldm.process(5)
    assert [t for _, t, _ in hook.calls] == process.timesteps
    assert {(s, c) for s, _, c in hook.calls} == {((2, 4, 8, 8), (2, 4, 8, 8))}
    hook.factor = 0.0  # the wrapper decides what the sampler gets
    assert not torch.allclose(tiny_ldm(x, 5), plain, atol=1e-3)
    tiny_ldm.model_fn.remove_hook("recorder")
    assert torch.equal(tiny_ldm(x, 5), plain)


def test_stateful_hooks_are_reset_for_every_input(tiny_ldm):
    hook = Recorder()
    tiny_ldm.model_fn.register_hook(hook, "recorder")
    for _ in range(3):
        tiny_ldm(torch.rand(1, 1, 64, 64), 2)
    assert hook.resets == 3 and len(hook.calls) == 6


def test_one_pass_methods_have_the_same_hook_point():
    model = RegressionBaseline(build_regression_unet({"channels": [4, 8], "strides": [2]}), {"model": {}})
    hook = Recorder(factor=2.0)
    model.model_fn.register_hook(hook, "recorder")
    x = torch.rand(1, 1, 32, 32)
    out = model(x)
    assert len(hook.calls) == 1 and model.process() is None
    assert torch.allclose(out, 2 * model.model_fn.net(x))


def test_save_and_load_round_trip(tiny_ldm, tmp_path):
    tiny_ldm.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"ldm.json", "ldm.safetensors", "vqgan.json", "vqgan.safetensors"}
    loaded = BSLDM.from_pretrained(tmp_path)
    tiny_ldm.save_pretrained(tmp_path / "again")  # float16 on disk: a reloaded model saves the same values
    loaded.save_pretrained(tmp_path / "reloaded")
    for name in ("ldm", "vqgan"):
        first, second = (load_file(tmp_path / d / f"{name}.safetensors") for d in ("again", "reloaded"))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert loaded.config == tiny_ldm.config and loaded.default_steps == 4


@pytest.mark.parametrize("cls,name", [(BSLDM, "ldm"), (RegressionBaseline, "regression")])
def test_shipped_weights_load_and_resave_unchanged(cls, name, tmp_path):
    cls.from_pretrained(MODELS_DIR, name).save_pretrained(tmp_path)
    for stem, _ in cls.from_pretrained(MODELS_DIR, name).networks().items():
        shipped, saved = load_file(MODELS_DIR / f"{stem}.safetensors"), load_file(tmp_path / f"{stem}.safetensors")
        assert shipped.keys() == saved.keys()
        assert all(torch.equal(shipped[k], saved[k]) and shipped[k].dtype == saved[k].dtype for k in shipped)
