"""The DiT backbone of restoration and the transforms that act on it: Delta-DiT, profiled selective block
caching, Bottleneck Sampling (tiny untrained DiTs with random weights, small images)."""

from __future__ import annotations

import pytest
import torch

from medidiff.acceleration import (
    BottleneckSampling,
    DeepCache,
    DeltaDiT,
    SelectiveBlockCache,
    TransformError,
    applied,
    block_changes,
    profiled_block_cache,
    transforms_from_spec,
)
from medidiff.acceleration.bottleneck_sampling import shifted
from medidiff.methods.restoration import Restoration
from medidiff.nets.dit import DiT

DIT = {"task": "ct_denoise", "method": "resshift", "scale": 1, "modalities": ["CT"],
       "intensity": {"kind": "hu", "low": -1024.0, "high": 2048.0}, "steps": 10,
       "process": {"name": "resshift", "num_train_timesteps": 10, "kappa": 0.1, "power": 0.3},
       "model": {"dit": {"hidden": 32, "depth": 4, "heads": 2, "patch": 4, "window": 32}, "residual_scale": 0.05}}


@pytest.fixture(scope="module")
def dit():
    """A DiT restoration whose zero-initialised gates and head are drawn at random (else it is the identity)."""
    torch.manual_seed(0)
    method = Restoration.create(DIT)
    for p in method.model_fn.net.parameters():
        p.data.normal_(0, 0.05)
    return method


def image(seed: int, size=(40, 36)) -> torch.Tensor:
    return torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(seed))


def test_an_untrained_dit_restores_to_its_input():
    method = Restoration.create(DIT)  # adaLN-zero gates and the zero head: the identity on y
    x = image(0, (70, 50))
    assert torch.allclose(method.restore(x), x, atol=1e-6)


def test_dit_attends_within_shifted_windows_without_wrapping_around():
    torch.manual_seed(0)
    net = DiT(hidden=16, depth=4, heads=2, patch=4, window=32, in_channels=2)  # 8-token windows
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(1, 2, 64, 128)
    t = torch.tensor([5])
    full = net(x, t)
    moved = x.clone()
    moved[..., -4:] += 1  # the last token column: reaches 20 columns to the left in four blocks, not the first window
    change = (net(moved, t) - full).abs().amax(dim=(0, 1, 2))
    change = change.detach()
    assert float(change[:32].max()) == 0 and bool((change[-48:] > 0).all())
    with torch.no_grad():
        def alone(block, part):  # global attention over the tokens of ``part`` only
            return block._heads(part.reshape(1, 1, -1, 16), None).reshape(part.shape)

        h = torch.randn(1, 10, 9, 16)  # not whole windows: padded, the padding masked
        block = net.blocks[0]
        out = block.attend(h)
        for rows, cols in ((slice(0, 8), slice(0, 8)), (slice(8, 10), slice(0, 8)), (slice(8, 10), slice(8, 9))):
            assert torch.allclose(out[:, rows, cols], alone(block, h[:, rows, cols]), atol=1e-6)
        assert torch.allclose(net.blocks[1].attend(h[:, :8, :8]), alone(net.blocks[1], h[:, :8, :8]), atol=1e-6)


def test_block_caches_that_refresh_every_call_are_exactly_the_baseline(dit):
    x = image(1)
    base = dit.restore(x)
    for transform in (DeltaDiT(interval=1, cached=3), SelectiveBlockCache([0, 1, 2], interval=1),
                      SelectiveBlockCache([1], interval=3, start=10)):  # start after the last call: never cached
        with applied(dit.model_fn, transform):
            assert torch.equal(dit.restore(x), base)


def test_delta_dit_caches_rear_blocks_early_and_front_blocks_late_within_tolerance(dit):
    x = image(2)
    base = dit.restore(x)
    runs = {i: 0 for i in range(4)}
    handles = [b.qkv.register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
               for i, b in enumerate(dit.model_fn.net.blocks)]
    try:
        with applied(dit.model_fn, DeltaDiT(interval=2, cached=1, boundary=4)):
            out = dit.restore(x[..., :32, :32])  # one tile: 10 calls, timesteps 9..0
    finally:
        for h in handles:
            h.remove()
    # calls 1, 3 (t 8, 6 > 4) skip the last block; calls 5, 7, 9 (t 4, 2, 0) skip the first
    assert runs == {0: 7, 1: 10, 2: 10, 3: 8}
    with applied(dit.model_fn, DeltaDiT(interval=2, cached=2)):
        cached = dit.restore(x)
    # stated tolerance: within 1 % of the image range of the baseline on this random-weight model
    assert 0 < (cached - base).abs().max() < 0.01
    assert (out - base[..., :32, :32]).abs().max() < 0.01


def test_block_caches_are_invalidated_between_images(dit):
    a, b = image(3), image(4)
    with applied(dit.model_fn, DeltaDiT(interval=3, cached=2)):
        alone = dit.restore(b)
    with applied(dit.model_fn, DeltaDiT(interval=3, cached=2)):
        dit.restore(a)
        after = dit.restore(b)
        # sample() does not reset the hooks: a new sampling run (rising timestep) starts over by itself
        twice = dit.sample(b[..., :32, :32], torch.randn(1, 11, 32, 32, generator=torch.Generator().manual_seed(0)))
        again = dit.sample(b[..., :32, :32], torch.randn(1, 11, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(after, alone)
    assert torch.equal(twice, again)


def test_profiling_measures_every_block_and_picks_the_settled_ones(dit):
    changes = block_changes(dit.model_fn, lambda: dit.restore(image(5, (32, 32))))
    assert changes.shape == (9, 4) and bool((changes > 0).all())
    synthetic = torch.tensor([[5.0, 9, 1, 9], [3, 9, 0.2, 9], [0.5, 9, 0.1, 9], [0.4, 9, 0.1, 9], [0.4, 9, 0.1, 9]])
    cache = profiled_block_cache(synthetic, count=2, interval=3)
    assert (sorted(cache.blocks), cache.interval) == ([0, 2], 3)
    assert cache.start == 3  # the move 2 -> 3 is the first within 1.5x the median: cached from call 3 on
    with pytest.raises(TransformError, match="count is 4"):
        profiled_block_cache(synthetic, count=4)


def test_bottleneck_sampling_runs_the_middle_calls_at_low_resolution_with_shifted_timesteps(dit):
    calls = []
    handle = dit.model_fn.net.register_forward_pre_hook(
        lambda m, args: calls.append((tuple(args[0].shape[-2:]), int(args[1].reshape(-1)[0]))))
    x = image(6, (32, 28))  # padded to 32 x 28 (multiple 4); low resolution pads to a multiple of 8
    try:
        base = dit.restore(x)
        calls.clear()
        with applied(dit.model_fn, BottleneckSampling(factor=2, upper=0.8, lower=0.2)):
            out = dit.restore(x)
    finally:
        handle.remove()
    sizes = [c[0] for c in calls]
    # timesteps 9..0 from t0 = 9: low resolution for 1.8 < t <= 7.2, i.e. t = 7..2
    assert sizes == [(32, 28)] * 2 + [(16, 16)] * 6 + [(32, 28)] * 2
    assert [c[1] for c in calls[2:8]] == [int(shifted(torch.tensor(t), torch.tensor(9), 0.5)) for t in range(7, 1, -1)]
    assert out.shape == base.shape and (out - base).abs().max() < 0.05


def test_timestep_shift():
    first = torch.tensor(9)
    assert torch.equal(shifted(torch.arange(10), first, 1.0), torch.arange(10))
    assert shifted(torch.tensor(9.0), first, 0.5) == 9.0
    assert torch.isclose(shifted(torch.tensor(4.5), first, 0.5), torch.tensor(3.0))  # s = 1/2 -> 1/3


def test_refusals():
    unet = Restoration.create({**DIT, "model": {"unet": {"channels": [8, 16], "blocks": 1, "time_channels": 16}}})
    for transform in (DeltaDiT(), SelectiveBlockCache([0])):
        with pytest.raises(TransformError, match="ReversibleUNet has none"):
            transform.apply(unet.model_fn)
    with pytest.raises(TransformError, match="cached is 4; this transformer has 4 blocks"):
        DeltaDiT(cached=4).apply(Restoration.create(DIT).model_fn)
    dit = Restoration.create(DIT)
    with applied(dit.model_fn, DeltaDiT()), pytest.raises(TransformError, match="cannot be combined with delta_dit"):
        SelectiveBlockCache([0]).apply(dit.model_fn)
    with applied(dit.model_fn, DeltaDiT()), pytest.raises(TransformError, match="apply bottleneck_sampling before"):
        BottleneckSampling().apply(dit.model_fn)
    with applied(unet.model_fn, BottleneckSampling(), DeepCache()), pytest.raises(TransformError, match="with deepcache"):
        unet.restore(image(7, (32, 32)))
    with pytest.raises(TransformError, match="factor is 1"):
        BottleneckSampling(factor=1)
    with pytest.raises(TransformError, match="lower 0.9"):
        BottleneckSampling(upper=0.5, lower=0.9)


def test_spec_builds_the_dit_transforms_in_order():
    made = transforms_from_spec({"bottleneck_sampling": {"factor": 2, "shift": 1.0},
                                 "delta_dit": {"interval": 3, "cached": 2, "boundary": 7},
                                 })
    assert [type(t) for t in made] == [BottleneckSampling, DeltaDiT]
    assert (made[0].shift, made[1].interval, made[1].count, made[1].boundary) == (1.0, 3, 2, 7)
    assert isinstance(transforms_from_spec({"selective_block_cache": {"blocks": [1, 2], "start": 4}})[0],
                      SelectiveBlockCache)
    with pytest.raises(TransformError, match="delta_dit: .*unexpected keyword"):
        transforms_from_spec({"delta_dit": {"blocks": 3}})
