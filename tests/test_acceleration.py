"""Acceleration transforms on a tiny random diffusers UNet: exactness, call counts, ordering, removal."""

from __future__ import annotations

import types

import pytest
import torch
from monai.data import MetaTensor

from medidiff.acceleration import (
    DeepCache,
    MagnitudePruning,
    PostTrainingQuantization,
    TransformError,
    applied,
    record_model_inputs,
    transforms_from_spec,
)
from medidiff.acceleration.deepcache import quadratic_refresh_steps
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.profiling import feature_changes, profiled_refresh_steps
from medidiff.acceleration.quantization import shortcut_splits
from medidiff.diffusion.gaussian import cosine_alphas_cumprod, gaussian_process
from medidiff.diffusion.sampling import sample
from medidiff.diffusion.thresholding import TemporalThreshold
from medidiff.methods.bone_suppression import ConcatConditionUNet, build_noise_unet
from medidiff.stages.bone_suppression import BoneSuppression
from medidiff.stages.registry import ParameterError

STEPS = 10


@pytest.fixture(scope="module")
def model_fn():
    torch.manual_seed(0)
    unet = build_noise_unet({"latent_channels": 2, "channels": [16, 32, 32], "layers_per_block": 1,
                             "norm_groups": 8, "attention_head_dim": 8})
    return ConcatConditionUNet(unet).eval().requires_grad_(False)


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, 16, 16, generator=gen), torch.randn(1, 2, 16, 16, generator=gen)


def run(model_fn, seed: int = 0) -> torch.Tensor:
    """One DDIM sampling run, as a method calls it (hooks reset first)."""
    noise, cond = inputs(seed)
    process = gaussian_process("ddim", cosine_alphas_cumprod(1000), [TemporalThreshold(1.45, 0.0025, 1000)])
    process.set_timesteps(STEPS)
    model_fn.reset_hooks()
    return sample(model_fn, process, noise, cond)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def baseline(model_fn):
    return run(model_fn)


@pytest.fixture(scope="module")
def calibration(model_fn):
    return record_model_inputs(model_fn, lambda: [run(model_fn, seed) for seed in (1, 2)], every=2)


def count_calls(module: torch.nn.Module, counts: dict, key: str):
    return module.register_forward_hook(lambda *_: counts.__setitem__(key, counts.get(key, 0) + 1))


def test_deepcache_interval_one_is_exactly_the_baseline(model_fn, baseline):
    with applied(model_fn, DeepCache(interval=1)):
        assert torch.equal(run(model_fn), baseline)


@pytest.mark.parametrize("interval", [2, 3])
def test_deepcache_calls_the_deep_blocks_only_on_refresh_steps(model_fn, baseline, interval):
    unet, counts = model_fn.net, {}
    handles = [count_calls(unet.mid_block.resnets[0].conv1, counts, "mid"),
               count_calls(unet.down_blocks[1].resnets[0].conv1, counts, "down1"),
               count_calls(unet.up_blocks[-1].resnets[-1].conv1, counts, "last_up"),
               count_calls(unet.conv_in, counts, "conv_in")]
    try:
        with applied(model_fn, DeepCache(interval=interval)):
            out = run(model_fn)
    finally:
        for h in handles:
            h.remove()
    refreshes = len(range(0, STEPS, interval))
    assert counts == {"mid": refreshes, "down1": refreshes, "last_up": STEPS, "conv_in": STEPS}
    other_noise = run(model_fn, seed=5)
    assert 0 < rel_err(out, baseline) < 0.25 * rel_err(other_noise, baseline)


def test_deepcache_deeper_branch_recomputes_more(model_fn):
    counts = {}
    handle = count_calls(model_fn.net.down_blocks[0].resnets[0].conv1, counts, "down0")
    try:
        with applied(model_fn, DeepCache(interval=5, branch=1)):
            run(model_fn)
    finally:
        handle.remove()
    assert counts["down0"] == STEPS
    with pytest.raises(TransformError, match="branch is 99"):
        DeepCache(interval=2, branch=99).apply(model_fn)


def test_deepcache_nonuniform_refreshes_on_its_schedule(model_fn, baseline):
    assert quadratic_refresh_steps(50, 17, 15)[:1] == [0] and len(quadratic_refresh_steps(50, 17, 15)) == 17
    steps = quadratic_refresh_steps(50, 10, 15)
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert min(gaps) < 50 / 10 < max(gaps)  # crowded around the center, sparse far from it
    cache, counts = DeepCache(interval=3, center=4, steps=STEPS), {}
    handle = count_calls(model_fn.net.mid_block.resnets[0].conv1, counts, "mid")
    try:
        with applied(model_fn, cache):
            out = run(model_fn)
    finally:
        handle.remove()
    assert counts["mid"] == len(cache.refresh_steps) == 4 and 0 in cache.refresh_steps
    assert 0 < rel_err(out, baseline) < 0.25 * rel_err(run(model_fn, seed=5), baseline)
    with pytest.raises(TransformError, match="needs the sampler's steps"):
        DeepCache(interval=3, center=4)


def test_profiled_schedule_refreshes_where_the_deep_feature_moves(model_fn, baseline):
    assert profiled_refresh_steps([1.0] * 9, 5) == [0, 2, 4, 6, 8]
    assert profiled_refresh_steps([8.0, 4.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5], 4) == [0, 1, 2, 3]
    assert profiled_refresh_steps([0.0] * 9, 3) == [0, 1, 2]
    changes = feature_changes(model_fn, lambda: run(model_fn, seed=1))
    assert len(changes) == STEPS - 1 and all(c > 0 for c in changes)
    steps = profiled_refresh_steps(changes, 4)
    counts = {}
    handle = count_calls(model_fn.net.mid_block.resnets[0].conv1, counts, "mid")
    try:
        with applied(model_fn, DeepCache(refresh_steps=steps)):
            out = run(model_fn)
    finally:
        handle.remove()
    assert counts["mid"] == 4
    assert 0 < rel_err(out, baseline) < 0.25 * rel_err(run(model_fn, seed=5), baseline)
    with pytest.raises(TransformError, match="include 0"):
        DeepCache(refresh_steps=[1, 3])


def test_deepcache_refreshes_on_a_new_input_shape_without_reset(model_fn):
    small = torch.randn(1, 2, 8, 8), torch.tensor([500]), torch.randn(1, 2, 8, 8)
    expected = model_fn(*small)
    x, cond = inputs(0)
    with applied(model_fn, DeepCache(interval=3)):
        model_fn(x, torch.tensor([900]), cond)
        model_fn(x, torch.tensor([800]), cond)
        assert torch.equal(model_fn(*small), expected)


def test_deepcache_cache_is_reset_between_inputs(model_fn):
    with applied(model_fn, DeepCache(interval=3)):
        first = run(model_fn, seed=0)
        run(model_fn, seed=7)
        assert torch.equal(run(model_fn, seed=0), first)


def test_calibration_covers_the_sampling_timesteps(calibration):
    assert len(calibration.inputs) == 2 * STEPS // 2
    assert len(calibration.timesteps) == STEPS // 2
    assert max(calibration.timesteps) - min(calibration.timesteps) > 600


def test_quantization_error_orders_with_bits(model_fn, baseline, calibration):
    x, t, cond = calibration.inputs[3]
    one_call = model_fn(x, t, cond)
    errs = {}
    for w, a in ((16, 16), (8, 8), (4, 8)):
        with applied(model_fn, PostTrainingQuantization(calibration, weight_bits=w, act_bits=a)):
            errs[w] = rel_err(run(model_fn), baseline)
            if w == 16:
                assert rel_err(model_fn(x, t, cond), one_call) < 2e-4
    assert errs[16] < 0.01  # 10 steps of a random UNet amplify the per-call error
    assert errs[16] < errs[8] < errs[4]


def test_quantization_saves_and_reloads_to_identical_outputs(model_fn, calibration, tmp_path):
    weight_bytes = sum(4 * m.weight.numel() for m in weight_layers(model_fn).values())
    sizes = {}
    for bits in (8, 4):
        quant = PostTrainingQuantization(calibration, weight_bits=bits, act_bits=8)
        with applied(model_fn, quant):
            expected = run(model_fn)
        assert quant.layers["net.conv_out"].bits == quant.layers["net.conv_in"].bits == 8  # head and stem
        assert quant.layers["net.mid_block.resnets.0.conv1"].bits == bits
        path = quant.save(tmp_path / f"w{bits}.safetensors")
        sizes[bits] = path.stat().st_size
        (loaded,) = transforms_from_spec({"quantization": {"file": str(path)}})
        with applied(model_fn, loaded):
            assert torch.equal(run(model_fn), expected)
        with applied(model_fn, quant):  # a second application reuses the first one's quantization
            assert torch.equal(run(model_fn), expected)
    assert sizes[4] < 0.7 * sizes[8] and sizes[8] < weight_bytes / 3
    torch.manual_seed(1)
    other = ConcatConditionUNet(build_noise_unet({"latent_channels": 2, "channels": [16, 32, 32], "layers_per_block": 1,
                                                  "norm_groups": 8, "attention_head_dim": 8}))
    with pytest.raises(TransformError, match="w8.safetensors was made for other weights"):
        PostTrainingQuantization.load(tmp_path / "w8.safetensors").apply(other)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in other.modules())
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    with pytest.raises(TransformError, match="bad.safetensors: not a medidiff quantization file"):
        PostTrainingQuantization.load(tmp_path / "bad.safetensors")


def test_split_shortcut_matches_the_up_block_concatenation(model_fn):
    unet, seen = model_fn.net, {}
    handles = [block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[1]))
               for i, block in enumerate(unet.up_blocks)]
    try:
        run(model_fn)
    finally:
        for h in handles:
            h.remove()
    splits = shortcut_splits(model_fn)
    for i, block in enumerate(unet.up_blocks):
        assert splits[block.resnets[0].conv_shortcut] == seen[i]
        assert splits[block.resnets[1].conv_shortcut] == block.resnets[0].out_channels


def test_pruning_zeroes_the_smallest_weights(model_fn, baseline):
    conv = model_fn.net.up_blocks[0].resnets[0].conv1
    with applied(model_fn, MagnitudePruning(0.5)):
        effective = conv._diffusers_hook.get_hook("pruning").weight
        assert abs(float((effective == 0).float().mean()) - 0.5) < 0.01
        kept = effective[effective != 0].abs().min()
        assert kept >= conv.weight[effective == 0].abs().max()
        assert not torch.equal(run(model_fn), baseline)


def test_transforms_are_removed_without_a_trace(model_fn, baseline, calibration):
    for transform in (DeepCache(interval=3), PostTrainingQuantization(calibration, 4, 8), MagnitudePruning(0.3)):
        with applied(model_fn, transform):
            assert not torch.equal(run(model_fn), baseline)
        assert torch.equal(run(model_fn), baseline)


def test_deepcache_and_quantization_compose_in_either_order(model_fn, calibration):
    quant, cache = PostTrainingQuantization(calibration, 8, 8), DeepCache(interval=2)
    with applied(model_fn, quant, cache):
        a = run(model_fn)
    with applied(model_fn, cache, quant):
        b = run(model_fn)
    assert torch.equal(a, b)


def test_refusals_are_clear(model_fn, calibration):
    with applied(model_fn, DeepCache(interval=2)):
        with pytest.raises(TransformError, match="already applied"):
            DeepCache(interval=3).apply(model_fn)
    with applied(model_fn, MagnitudePruning(0.2)):
        with pytest.raises(TransformError, match="cannot be combined with pruning"):
            PostTrainingQuantization(calibration, 8, 8).apply(model_fn)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model_fn.net.modules())
    with pytest.raises(TransformError, match="needs a diffusers UNet"):
        DeepCache(2).apply(ConcatConditionUNet(torch.nn.Conv2d(4, 2, 3)))


def test_spec_builds_transforms_and_names_mistakes():
    built = transforms_from_spec({"deepcache": {"interval": 3}, "pruning": {"sparsity": 0.3}})
    assert [type(t) for t in built] == [DeepCache, MagnitudePruning] and built[0].interval == 3
    assert transforms_from_spec(None) == []
    for spec, message in (({"fastercache": {}}, "unknown transform 'fastercache'"),
                          ({"quantization": {"weight_bits": 8}}, "takes {file: <path>}"),
                          ({"deepcache": {"intervall": 3}}, "deepcache: got an unexpected keyword"),
                          ({"deepcache": {"interval": 0}}, "interval is 0"),
                          ({"deepcache": {"interval": "3"}}, "interval is '3'; expected a whole number"),
                          ({"pruning": {"sparsity": "half"}}, "sparsity is 'half'"),
                          ([3], "expected a mapping")):
        with pytest.raises(TransformError, match=message):
            transforms_from_spec(spec)


def test_bone_suppression_stage_takes_an_accelerate_mapping():
    item = {"image": MetaTensor(torch.linspace(0, 4000, 192 * 160).reshape(1, 192, 160)),
            "source": types.SimpleNamespace(modality="DX")}
    plain = BoneSuppression(steps=4, keep_bone_layer=False)(item)["image"]
    stage = BoneSuppression(steps=4, keep_bone_layer=False, accelerate={"deepcache": {"interval": 1}})
    assert torch.equal(stage(item)["image"], plain)
    with_cache = BoneSuppression(steps=4, keep_bone_layer=False, accelerate={"deepcache": {"interval": 2}})(item)
    assert not torch.equal(with_cache["image"], plain)
    assert torch.equal(BoneSuppression(steps=4, keep_bone_layer=False)(item)["image"], plain)  # hooks removed
    with pytest.raises(ParameterError, match="accelerate is .*unknown transform 'cache'"):
        BoneSuppression(accelerate={"cache": {}})
