"""Faster Diffusion, and DeepCache / Faster Diffusion on the reversible U-Net of restoration and IDM."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medidiff.acceleration import ChannelPruning, DeepCache, FasterDiffusion, TransformError, applied
from medidiff.acceleration.profiling import feature_changes
from medidiff.acceleration.unets import find_layout
from medidiff.datasets.cs_images import ellipse_phantom
from medidiff.methods.idm import IDM, build_idm
from medidiff.methods.restoration import Restoration
from medidiff.physics.measurements import BlockCS
from medidiff.stages.registry import ParameterError
from medidiff.stages.restoration import Denoise
from tests.test_acceleration import STEPS, count_calls, model_fn, rel_err, run  # noqa: F401

CT = {"task": "ct_denoise", "method": "resshift", "scale": 1, "modalities": ["CT"],
      "intensity": {"kind": "hu", "low": -1024.0, "high": 2048.0}, "steps": 12,
      "process": {"name": "resshift", "num_train_timesteps": 12},
      "model": {"unet": {"channels": [8, 16, 16], "blocks": 1, "time_channels": 16}}}


@pytest.fixture(scope="module")
def baseline(model_fn):  # noqa: F811
    return run(model_fn)


@pytest.fixture(scope="module")
def restoration():
    torch.manual_seed(0)
    return Restoration.create(CT)


def slice_of(seed: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    noise = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    return (0.3 + 0.4 * ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.1).float() + 0.05 * noise).reshape(1, 1, 32, 32)


def test_faster_diffusion_with_every_step_a_key_step_is_exactly_the_baseline(model_fn, baseline):  # noqa: F811
    with applied(model_fn, FasterDiffusion(interval=1)):
        assert torch.equal(run(model_fn), baseline)


def test_faster_diffusion_runs_the_encoder_on_key_steps_and_decodes_in_parallel(model_fn, baseline):  # noqa: F811
    unet, counts, batches = model_fn.net, {}, []
    handles = [count_calls(unet.mid_block.resnets[0].conv1, counts, "mid"),  # inside cached modules: runs or not
               count_calls(unet.down_blocks[0].resnets[0].conv1, counts, "down0"),
               unet.up_blocks[-1].register_forward_hook(lambda m, args, out: batches.append(len(out)))]
    try:
        with applied(model_fn, FasterDiffusion(interval=3, parallel=2)):
            out = run(model_fn)
        with applied(model_fn, FasterDiffusion(interval=3, parallel=1)):
            sequential = run(model_fn)
    finally:
        for h in handles:
            h.remove()
    keys = len(range(0, STEPS, 3))
    assert counts == {"mid": 2 * keys, "down0": 2 * keys}  # both runs: key steps only
    # parallel run: key steps alone, then the two steps of each stretch as one batch of 2; sequential: one by one
    assert batches[:7] == [1, 2, 1, 2, 1, 2, 1] and batches[7:] == [1] * STEPS
    torch.testing.assert_close(out, sequential, rtol=1e-4, atol=1e-5)
    assert 0 < rel_err(out, baseline) < 0.25 * rel_err(run(model_fn, seed=5), baseline)


def test_parallel_decoding_predicts_irregular_timesteps_from_the_previous_run(model_fn):  # noqa: F811
    x, cond = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    timesteps, batches = (900, 870, 800, 790, 700, 650), []
    handle = model_fn.net.up_blocks[-1].register_forward_hook(lambda m, args, out: batches.append(len(out)))
    try:
        with applied(model_fn, FasterDiffusion(interval=3, parallel=2)):
            runs = []
            for _ in range(2):
                model_fn.reset_hooks()
                runs.append([model_fn(x, torch.tensor([t]), cond) for t in timesteps])
                batches.append("|")
    finally:
        handle.remove()
    # first run: the spacing guesses 840 and 610, both missed (decoded alone); the second knows the schedule
    assert batches == [1, 2, 1, 1, 2, 1, "|", 1, 2, 1, 2, "|"]
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_faster_diffusion_key_steps_noise_injection_and_reset_between_inputs(model_fn, baseline):  # noqa: F811
    counts = {}
    handle = count_calls(model_fn.net.mid_block.resnets[0].conv1, counts, "mid")
    try:
        with applied(model_fn, FasterDiffusion(key_steps=[0, 1, 2, 5])):
            first = run(model_fn)
            run(model_fn, seed=7)
            assert torch.equal(run(model_fn), first)
    finally:
        handle.remove()
    assert counts["mid"] == 3 * 4
    with applied(model_fn, FasterDiffusion(interval=1, noise_injection=0.003)):
        injected = run(model_fn)
    assert 0 < rel_err(injected, baseline) < 0.05
    assert torch.equal(run(model_fn), baseline)  # removed without a trace
    for kwargs, message in (({"interval": 0}, "interval is 0"), ({"key_steps": [2, 4]}, "include 0"),
                            ({"noise_injection": 2}, "noise_injection is 2"), ({"parallel": 1.5}, "parallel is 1.5")):
        with pytest.raises(TransformError, match=message):
            FasterDiffusion(**kwargs)


def test_feature_caches_refuse_each_other_and_compose_with_channel_pruning(model_fn):  # noqa: F811
    for first, second in ((DeepCache(2), FasterDiffusion(2)), (FasterDiffusion(2), DeepCache(2))):
        with applied(model_fn, first):
            with pytest.raises(TransformError, match=f"{second.name} cannot be combined with {first.name}"):
                second.apply(model_fn)
    outs = []
    for order in ((FasterDiffusion(interval=3), ChannelPruning(0.25)), (ChannelPruning(0.25), FasterDiffusion(interval=3))):
        with applied(model_fn, *order):
            outs.append(run(model_fn))
    assert torch.equal(*outs)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model_fn.net.modules())


def test_a_rising_timestep_starts_a_new_sampling_run_without_reset(model_fn):  # noqa: F811
    x, cond = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    other = torch.randn(1, 2, 16, 16)
    expected = model_fn(other, torch.tensor([900]), cond)
    for cache in (DeepCache(interval=3), FasterDiffusion(interval=3)):
        with applied(model_fn, cache):
            model_fn(x, torch.tensor([900]), cond)
            model_fn(x, torch.tensor([800]), cond)
            assert torch.equal(model_fn(other, torch.tensor([900]), cond), expected)  # the next tile: no reuse


@pytest.mark.parametrize("cache", [DeepCache(interval=1), FasterDiffusion(interval=1)])
def test_caches_every_step_are_exact_on_the_restoration_unet(restoration, cache):
    lr = slice_of(0)
    plain = restoration.restore(lr)
    with applied(restoration.model_fn, cache):
        assert torch.equal(restoration.restore(lr), plain)


def test_deepcache_and_faster_diffusion_on_the_restoration_unet(restoration):
    net, counts = restoration.model_fn.net, {}
    lr, plain = slice_of(0), restoration.restore(slice_of(0))
    inner = {name: next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))  # run, or cached around
             for name, module in (("middle", net.middle), ("down1", net.down[1]), ("down0", net.down[0]), ("up0", net.up[0]))}
    handles = [count_calls(conv, counts, name) for name, conv in inner.items()]
    try:
        with applied(restoration.model_fn, DeepCache(interval=3)):
            cached = restoration.restore(lr)
            assert torch.equal(restoration.restore(lr), cached)  # reset per image
        assert counts == {"middle": 8, "down1": 8, "up0": 24, "down0": 24}
        assert 0 < rel_err(cached, plain) < 0.75 * rel_err(restoration.restore(lr, seed=3), plain)
        counts.clear()
        with applied(restoration.model_fn, FasterDiffusion(interval=3)):
            fast = restoration.restore(lr)
    finally:
        for h in handles:
            h.remove()
    # the encoder on the 4 key steps; the decoder on those and on 4 batches of the 2 steps between them.
    # Non-key steps ignore x_t: on an untrained x0-predicting net that is far off, so only the work is checked
    assert counts == {"middle": 4, "down1": 4, "down0": 4, "up0": 8} and not torch.equal(fast, plain)
    layout = find_layout(restoration.model_fn)
    assert layout.branches == 2 and layout.reused(1) is net.upsample[1]
    changes = feature_changes(restoration.model_fn, lambda: restoration.restore(lr))  # the profiled schedule's input
    assert len(changes) == CT["steps"] - 1 and all(c > 0 for c in changes)
    with pytest.raises(TransformError, match="branches 0..1"):
        DeepCache(interval=2, branch=2).apply(restoration.model_fn)


def test_denoise_stage_takes_an_accelerate_mapping(restoration, tmp_path):
    restoration.save_pretrained(tmp_path)
    hu = slice_of(1)[0] * 3072 - 1024
    item = {"image": MetaTensor(hu.clone()), "source": types.SimpleNamespace(modality="CT", image_type=())}
    plain = Denoise(model=str(tmp_path))(item)["image"]
    exact = Denoise(model=str(tmp_path), accelerate={"faster_diffusion": {"interval": 1}})(item)["image"]
    assert torch.equal(exact, plain)
    fast = Denoise(model=str(tmp_path), accelerate={"deepcache": {"interval": 3}})(item)["image"]
    assert not torch.equal(fast, plain)
    assert torch.equal(Denoise(model=str(tmp_path))(item)["image"], plain)  # hooks removed
    with pytest.raises(ParameterError, match="accelerate is .*unknown transform 'cache'"):
        Denoise(accelerate={"cache": {}})


def test_caches_on_the_idm_chain_of_cs_reconstruction():
    """IDM's chain calls the U-Net with per-step injectors: caches apply, Faster Diffusion decodes one by one."""
    torch.manual_seed(0)
    idm = IDM(build_idm({"channels": [16, 16], "blocks": 1, "time_channels": 16}, steps=4),
              {"model": {}})
    for m in idm.net.modules():  # non-zero injectors, so that the cached features carry a step's measurement
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.1)
    op = BlockCS(0.25, (32, 32))
    y = op(ellipse_phantom(32, np.random.default_rng(0))[None, None].float())
    plain, batches = idm(y, op), []
    handle = idm.net.model_fn.net.up[0].register_forward_hook(lambda m, args, out: batches.append(len(out)))
    try:
        for cache in (DeepCache(interval=1), FasterDiffusion(interval=1)):
            with applied(idm.model_fn, cache):
                assert torch.equal(idm(y, op), plain)
        batches.clear()
        for cache in (DeepCache(interval=2), FasterDiffusion(interval=4)):
            with applied(idm.model_fn, cache):
                out = idm(y, op)
            assert not torch.equal(out, plain) and out.isfinite().all()
    finally:
        handle.remove()
    assert batches == [1] * 8  # four steps with DeepCache, four without a batch with Faster Diffusion
