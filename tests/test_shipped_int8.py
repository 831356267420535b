"""The int8 models shipped beside the models' weights (``accelerate: {int8: {}}``): current with the
weights they were made from, close to the float model, and refused with the command that remakes them
when missing or stale."""

from __future__ import annotations

import shutil
import types

import pytest
import torch
from monai.data import MetaTensor
from safetensors.torch import load_file, save_file

from medidiff.acceleration import ShippedInt8, TransformError, applied, transforms_from_spec
from medidiff.acceleration.int8 import Int8Quantization
from medidiff.datasets.chest_phantom import TEST_SEEDS, make_pair
from medidiff.methods.bone_suppression import BSLDM
from medidiff.metrics import psnr
from medidiff.resources import model_dir
from medidiff.stages.bone_suppression import BoneSuppression
from medidiff.stages.registry import ParameterError
from medidiff.stages.restoration import Denoise, SuperResolution

SHIPPED = ["bone_suppression/ldm", *(f"restoration/{task}/regression" for task in ("ct_denoise", "mr_sr2", "mr_sr4",
                                                                                   "xray_sr4")),
           "restoration/ct_denoise/resshift"]


@pytest.fixture(scope="module")
def method() -> BSLDM:
    torch.set_num_threads(1)
    return BSLDM.from_pretrained()


def copy_model(tmp_path, files):
    for name in files:
        shutil.copy(model_dir("bone_suppression") / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("model", SHIPPED)
def test_each_shipped_int8_model_was_made_from_the_weights_beside_it(model):
    weights = model_dir(model.rpartition("/")[0]) / f"{model.rpartition('/')[2]}.safetensors"
    assert Int8Quantization.for_weights(weights).made_from is not None  # refused if stale or missing


def test_pipeline_int8_runs_the_shipped_model_close_to_float_and_removes(method):
    cxr = torch.from_numpy(make_pair(TEST_SEEDS[0])["cxr"])[None, None]
    plain = method(cxr, steps=5)
    (transform,) = transforms_from_spec({"int8": {}})
    assert isinstance(transform, ShippedInt8)
    with applied(method.model_fn, transform):
        fast = method(cxr, steps=5)
        again = method(cxr, steps=5)  # the file is read once; the second image runs the same
    assert not torch.equal(fast, plain) and torch.equal(fast, again)
    assert psnr(fast, plain).item() > 40
    assert torch.equal(method(cxr, steps=5), plain)


def test_missing_or_stale_int8_model_is_refused_with_the_command_that_makes_it(tmp_path):
    folder = copy_model(tmp_path, ["ldm.json", "ldm.safetensors", "vqgan.json", "vqgan.safetensors"])
    with pytest.raises(TransformError, match="no int8 model ships beside .*make_int8"):
        ShippedInt8().apply(BSLDM.from_pretrained(folder).model_fn)
    copy_model(tmp_path, ["ldm.int8.safetensors"])
    ShippedInt8().apply(BSLDM.from_pretrained(folder).model_fn)  # the copy is current
    weights = load_file(folder / "ldm.safetensors")
    first = next(iter(weights))
    save_file(weights | {first: weights[first] + 1e-3}, folder / "ldm.safetensors")  # "retrained"
    with pytest.raises(TransformError, match="made from other weights .*make it again .*make_int8"):
        ShippedInt8().apply(BSLDM.from_pretrained(folder).model_fn)


def test_shipped_int8_needs_a_model_loaded_from_its_weights(method):
    built = BSLDM(method.vqgan, method.model_fn.net, method.config, vqgan_config=method.vqgan_config)
    with pytest.raises(TransformError, match="name an int8 file"):
        ShippedInt8().apply(built.model_fn)


def test_bone_suppression_stage_runs_deepcache_with_the_shipped_int8_as_documented():
    cxr = torch.from_numpy(make_pair(TEST_SEEDS[1])["cxr"])[None] * 4000
    item = {"image": MetaTensor(cxr), "source": types.SimpleNamespace(modality="DX")}
    plain = BoneSuppression(steps=20, keep_bone_layer=False)(item)["image"]
    fast = BoneSuppression(steps=20, keep_bone_layer=False,
                           accelerate={"deepcache": {"interval": 3}, "int8": {}})(item)["image"]
    assert not torch.equal(fast, plain)
    assert psnr(fast / 4000, plain / 4000).item() > 40  # 20 steps, as the pipeline (45 dB measured)


def test_stages_refuse_int8_without_a_shipped_file_when_built(tmp_path):
    Denoise(method="regression", accelerate={"int8": {}})  # shipped
    SuperResolution(method="regression", scale=2, accelerate={"int8": {}})
    with pytest.raises(ParameterError, match="accelerate .*no int8 model ships beside .*upsr.*make_int8"):
        Denoise(method="upsr", accelerate={"int8": {}})
    folder = copy_model(tmp_path, ["ldm.json", "ldm.safetensors", "vqgan.json", "vqgan.safetensors"])
    with pytest.raises(ParameterError, match="accelerate .*no int8 model ships beside"):
        BoneSuppression(model=str(folder), accelerate={"int8": {}})
