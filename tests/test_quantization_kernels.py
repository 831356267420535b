"""Real int8 kernels (oneDNN) on a tiny diffusers UNet and a tiny reversible U-Net: agreement with the
simulation and the float model, the self-contained file, the temporal feature cache, removal, composition
and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from medidiff.acceleration import (
    DeepCache,
    Int8Quantization,
    MagnitudePruning,
    PostTrainingQuantization,
    TransformError,
    applied,
    record_model_inputs,
    transforms_from_spec,
)
from medidiff.acceleration.adaround import layer_output
from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.fake_quant import (
    fake_quantize,
    quantize_codes,
    scale_zero,
    weight_codes,
    weight_from_codes,
    weight_ranges,
)
from medidiff.acceleration.float_formats import (
    FORMATS,
    FloatWeightQuantization,
    channel_scales,
    fp_grid,
    layer_inputs,
)
from medidiff.acceleration.group_quant import GroupQuantization, group_quantize
from medidiff.acceleration.int8 import ACT_BITS, quantize_input
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.mixed_precision import layer_sensitivity, mixed_bits
from medidiff.acceleration.temporal import time_path_layers
from medidiff.methods.bone_suppression import ConcatConditionUNet, build_noise_unet
from medidiff.methods.restoration import RestorationFunction
from medidiff.nets.reversible import CouplingSequence
from medidiff.nets.reversible_unet import ReversibleUNet
from tests.test_acceleration import STEPS, rel_err, run

CONFIG = {"latent_channels": 2, "channels": [16, 32, 32], "layers_per_block": 1, "norm_groups": 8,
          "attention_head_dim": 8}


def tiny_model(seed: int) -> ConcatConditionUNet:
    torch.manual_seed(seed)
    return ConcatConditionUNet(build_noise_unet(CONFIG)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model_fn():
    return tiny_model(0)


@pytest.fixture(scope="module")
def baseline(model_fn):
    return run(model_fn)


@pytest.fixture(scope="module")
def int8(model_fn):
    """Quantized once for the module (calibration on two other sampling runs)."""
    calibration = record_model_inputs(model_fn, lambda: [run(model_fn, seed) for seed in (1, 2)], every=2)
    quant = Int8Quantization(calibration)
    quant.apply(model_fn)
    quant.remove(model_fn)
    return quant


def test_int8_kernel_computes_its_simulation(model_fn, int8):
    conv = model_fn.net.up_blocks[1].resnets[0].conv1
    assert int8.kinds["net.up_blocks.1.resnets.0.conv1"] == "int8"
    assert int8.kinds["net.conv_in"] == "weight" and int8.kinds["net.up_blocks.1.resnets.0.conv_shortcut"] == "weight"
    t, seen = int8.tensors, []
    handle = conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        run(model_fn, seed=3)
    finally:
        handle.remove()
    x = seen[STEPS // 2]  # the layer's input halfway through sampling
    scale, zero = t["net.up_blocks.1.resnets.0.conv1.input_scale"], t["net.up_blocks.1.resnets.0.conv1.input_zero"]
    lo, hi = -zero * scale, (2**ACT_BITS - 1 - zero) * scale
    weight = t["net.up_blocks.1.resnets.0.conv1.weight"]
    assert weight.dtype == torch.int8 and weight.min() >= -64 and weight.max() <= 63  # 7 bits: no 16-bit overflow
    assert quantize_codes(x, lo, hi, ACT_BITS).max() > 200  # the input uses the top of its 8-bit range
    simulated = F.conv2d(fake_quantize(x, lo, hi, ACT_BITS),
                         weight.float() * t["net.up_blocks.1.resnets.0.conv1.weight_scale"][:, None, None, None],
                         conv.bias, padding=1)
    with applied(model_fn, int8):
        real = conv(x)
    assert rel_err(real, simulated) < 1e-5  # integer arithmetic: only the float rescaling differs
    assert 1e-4 < rel_err(real, conv(x)) < 0.05  # and it is not the float layer


def test_int8_input_quantization_gives_the_simulations_codes_in_channels_last_order():
    lo, hi = torch.tensor(-1.5), torch.tensor(2.0)
    scale, zero = scale_zero(lo, hi, ACT_BITS)
    x = torch.randn(2, 8, 9, 7) * 2  # beyond the range at both ends: clipped codes too
    for layout in (x, x.contiguous(memory_format=torch.channels_last), x[:, ::2]):
        before = layout.clone()
        codes = quantize_input(layout, float(scale), int(zero))
        assert codes.dtype == torch.uint8 and codes.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(codes.float(), quantize_codes(layout, lo, hi, ACT_BITS))
        assert codes.min() == 0 and codes.max() == 2**ACT_BITS - 1
        assert torch.equal(layout, before)  # the input is left alone


def test_int8_stays_close_to_float_and_removes_without_a_trace(model_fn, baseline, int8):
    before = {k: v.clone() for k, v in model_fn.state_dict().items()}
    with applied(model_fn, int8):
        out = run(model_fn)
    assert 0 < rel_err(out, baseline) < 0.1 * rel_err(run(model_fn, seed=5), baseline)
    assert torch.equal(run(model_fn), baseline)
    assert all(torch.equal(v, before[k]) for k, v in model_fn.state_dict().items())


def test_int8_file_is_int8_self_contained_and_reloads_identically(model_fn, int8, tmp_path):
    with applied(model_fn, int8):
        expected = run(model_fn)
    path = int8.save(tmp_path / "unet-int8.safetensors")
    float_bytes = sum(4 * p.numel() for p in model_fn.parameters())
    assert path.stat().st_size < 0.35 * float_bytes
    with safe_open(path, "pt") as f:
        assert f.get_slice("net.mid_block.resnets.0.conv1.weight").get_dtype() == "I8"
    (loaded,) = transforms_from_spec({"int8": {"file": str(path)}})
    with applied(model_fn, loaded):
        assert torch.equal(run(model_fn), expected)
    other = tiny_model(1)  # same architecture, other weights: the file carries every parameter
    assert not torch.equal(run(other), run(model_fn))
    with applied(other, Int8Quantization.load(path)):
        assert torch.equal(run(other), expected)
    wider = ConcatConditionUNet(build_noise_unet({**CONFIG, "channels": [16, 32, 64]}))
    with pytest.raises(TransformError, match="unet-int8.safetensors was made for another architecture"):
        Int8Quantization.load(path).apply(wider)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in wider.modules())
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    with pytest.raises(TransformError, match="bad.safetensors: not a medidiff int8 file"):
        Int8Quantization.load(tmp_path / "bad.safetensors")


def reversible_model(seed: int, merge: float) -> RestorationFunction:
    """A tiny restoration U-Net (reversible couplings with scalar weights of their own)."""
    torch.manual_seed(seed)
    fn = RestorationFunction(ReversibleUNet(channels=(16, 16), blocks=1, time_channels=16, in_channels=2))
    for sequence in fn.modules():
        if isinstance(sequence, CouplingSequence):
            sequence.merge_scale.data.fill_(merge)
    return fn.eval().requires_grad_(False)


def test_int8_runs_the_reversible_unet_and_its_file_carries_the_coupling_weights(tmp_path):
    fn, other = reversible_model(0, merge=0.3), reversible_model(1, merge=-0.6)
    calls = [(torch.randn(1, 1, 32, 32), torch.tensor([t]), torch.randn(1, 1, 32, 32)) for t in (900, 500, 100, 300)]
    expected = fn(*calls[-1])
    quant = Int8Quantization(CalibrationSet(calls[:3]))
    with applied(fn, quant):
        out = fn(*calls[-1])
    assert 0 < rel_err(out, expected) < 0.05 and torch.equal(fn(*calls[-1]), expected)
    assert quant.kinds["net.down.0"] == "float" and "int8" in quant.kinds.values()  # no temporal cache here
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with applied(other, Int8Quantization.load(quant.save(tmp_path / "rev.safetensors"))):
        assert torch.equal(other(*calls[-1]), out)  # not one of other's own parameters is used, scalars included
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # and they are back in place
    cache = DeepCache(interval=2)  # composes in either order: the same calls, full then cached
    with applied(fn, quant, cache):
        a = [fn(*call) for call in calls[:2]]
    with applied(fn, cache, quant):
        b = [fn(*call) for call in calls[:2]]
    with applied(fn, quant):
        uncached = fn(*calls[1])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a[1], uncached)
    with pytest.raises(TransformError, match="temporal cache needs a diffusers UNet"):
        Int8Quantization(CalibrationSet(calls[:3]), temporal_cache=True).apply(fn)


def test_temporal_cache_keeps_one_feature_per_timestep_and_layer(model_fn, int8, tmp_path):
    layers = time_path_layers(model_fn)
    assert "net.time_embedding.linear_1" in layers and "net.mid_block.resnets.0.time_emb_proj" in layers
    plain = Int8Quantization.load(int8.save(tmp_path / "q.safetensors"), temporal_cache=False)
    with applied(model_fn, plain):
        expected = run(model_fn)
    int8.temporal.features.clear()
    with applied(model_fn, int8):
        assert torch.equal(run(model_fn), expected)
        assert len(int8.temporal.features) == STEPS * len(layers)
    computed = []
    with applied(model_fn, int8):  # the next image (and application) reuses every kept feature
        for layer in layers.values():
            layer._diffusers_hook.get_hook("int8").compute = lambda m, x: computed.append(m)
        assert torch.equal(run(model_fn), expected)
    assert not computed and len(int8.temporal.features) == STEPS * len(layers)


def test_int8_composes_with_deepcache_in_either_order(model_fn, int8):
    cache = DeepCache(interval=2)
    with applied(model_fn, int8, cache):
        a = run(model_fn)
    with applied(model_fn, cache, int8):
        b = run(model_fn)
    with applied(model_fn, cache):
        cached_float = run(model_fn)
    assert torch.equal(a, b) and not torch.equal(a, cached_float)


def test_int8_refusals_are_clear(model_fn, int8):
    with applied(model_fn, MagnitudePruning(0.2)):
        with pytest.raises(TransformError, match="cannot be combined with pruning"):
            int8.apply(model_fn)
    with pytest.raises(TransformError, match="no calibration inputs"):
        Int8Quantization().apply(model_fn)
    labelled = build_noise_unet(CONFIG)
    labelled.class_embedding = torch.nn.Linear(3, 64)
    with pytest.raises(TransformError, match="time embedding also depends on class labels"):
        Int8Quantization(temporal_cache=True).apply(ConcatConditionUNet(labelled))
    with pytest.raises(TransformError, match="cannot store a model with buffers"):
        Int8Quantization().apply(ConcatConditionUNet(torch.nn.Sequential(torch.nn.BatchNorm2d(2, affine=False))))
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model_fn.modules())


def test_fp_grids_are_the_formats_values():
    assert fp_grid(*FORMATS["fp4"]).tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    fp8 = fp_grid(*FORMATS["fp8"])
    assert fp8.max() == 448 and len(fp8) == 253 and torch.equal(fp8, fp8.float().to(torch.float8_e4m3fn).float())


def test_fp4_learned_rounding_reconstructs_layers_better_than_nearest(model_fn, baseline):
    calibration = record_model_inputs(model_fn, lambda: run(model_fn, seed=1), every=3)
    nearest, learned = FloatWeightQuantization("fp4"), FloatWeightQuantization("fp4", calibration, iters=40, samples=2)
    name = "net.up_blocks.1.resnets.0.conv1"
    inputs, errors = layer_inputs(model_fn, calibration, 2)[name], {}
    for quant in (nearest, learned):
        with applied(model_fn, quant):
            assert 0 < rel_err(run(model_fn), baseline) < 0.25 * rel_err(run(model_fn, seed=5), baseline)
        layer, weight = model_fn.net.up_blocks[1].resnets[0].conv1, quant.weights[name][0]
        grid = fp_grid(*FORMATS["fp4"])
        on_grid = (weight / channel_scales(layer.weight, grid))[..., None] - grid
        assert on_grid.abs().amin(-1).max() < 1e-5
        errors[quant] = sum(float((layer_output(layer, x, weight) - layer(x)).pow(2).sum()) for x in inputs)
    assert errors[learned] < errors[nearest]
    assert torch.equal(run(model_fn), baseline)
    with pytest.raises(TransformError, match="format is 'fp6'"):
        FloatWeightQuantization("fp6")


def test_mixed_precision_gives_sensitive_layers_more_bits(model_fn, baseline, tmp_path):
    calibration = record_model_inputs(model_fn, lambda: run(model_fn, seed=1), every=3)
    sensitivity = layer_sensitivity(model_fn, calibration, bits=4, samples=2)
    assert set(sensitivity) == set(weight_layers(model_fn)) and all(v > 0 for v in sensitivity.values())
    bits = mixed_bits(model_fn, sensitivity, budget=6)
    sizes = {name: layer.weight.numel() for name, layer in weight_layers(model_fn).items()}
    assert 5 < sum(bits[n] * sizes[n] for n in sizes) / sum(sizes.values()) <= 6
    density = {n: sensitivity[n] / sizes[n] for n in sizes}
    assert max(density, key=density.get) in {n for n, b in bits.items() if b == 8}
    errors, file_sizes = {}, {}
    for key, quant in (("w4", PostTrainingQuantization(calibration, 4, None, head_stem_bits=None)),
                       ("mixed", PostTrainingQuantization(calibration, 4, None, head_stem_bits=None, layer_bits=bits))):
        with applied(model_fn, quant):
            errors[key] = rel_err(run(model_fn), baseline)
        file_sizes[key] = quant.save(tmp_path / f"{key}.safetensors").stat().st_size
    assert errors["mixed"] < errors["w4"] and file_sizes["mixed"] > file_sizes["w4"]
    with pytest.raises(TransformError, match=r"layer_bits\['net.conv_in'\] is 1"):
        PostTrainingQuantization(calibration, layer_bits={"net.conv_in": 1})


def test_group_quantization_with_outliers_tracks_the_weights_closer(model_fn, baseline):
    w = model_fn.net.up_blocks[1].resnets[0].conv1.weight
    ranges = weight_ranges(w, 4)
    errors = {"channel": float((weight_from_codes(weight_codes(w, ranges, 4), ranges, 4) - w).norm()),
              "groups": float((group_quantize(w, 4, 16) - w).norm()),
              "groups+outliers": float((group_quantize(w, 4, 16, 0.01) - w).norm())}
    assert errors["groups+outliers"] < errors["groups"] < errors["channel"]
    kept = group_quantize(w, 4, 16, 0.01) == w
    assert kept[w.abs() >= w.abs().flatten().kthvalue(round(0.99 * w.numel()) + 1).values].all()
    grouped = GroupQuantization(4, 16, 0.01)
    with applied(model_fn, grouped):
        assert 0 < rel_err(run(model_fn), baseline) < 0.25 * rel_err(run(model_fn, seed=5), baseline)
    assert torch.equal(run(model_fn), baseline)
    with pytest.raises(TransformError, match="group-quantization was made for other weights"):
        grouped.apply(tiny_model(1))
    with pytest.raises(TransformError, match="group_size 0"):
        GroupQuantization(4, 0)
