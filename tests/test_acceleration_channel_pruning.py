"""Structured channel pruning on tiny networks: what it removes, exactness of the smaller layers, refit, removal."""

from __future__ import annotations

import copy

import pytest
import torch

from medidiff.acceleration import (
    ChannelPruning,
    DeepCache,
    MagnitudePruning,
    TransformError,
    applied,
    record_model_inputs,
    transforms_from_spec,
)
from medidiff.acceleration.channel_pruning import group_scores, prunable_blocks, refit
from medidiff.methods.bone_suppression import ConcatConditionUNet
from medidiff.methods.restoration import RestorationFunction
from medidiff.nets.reversible_unet import ReversibleUNet
from tests.test_acceleration import model_fn, rel_err  # noqa: F401


def call_inputs(seed: int, t: int = 500):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, 16, 16, generator=gen), torch.tensor([t]), torch.randn(1, 2, 16, 16, generator=gen)


def test_pruned_layers_are_the_original_with_the_dropped_groups_zeroed(model_fn):  # noqa: F811
    """GroupNorm groups are independent: the smaller layers compute exactly what the full block computes
    when conv2 ignores the dropped channels, so the pruning is exact apart from what those channels added."""
    zeroed = copy.deepcopy(model_fn)
    for (_, _, _, norm2, conv2), (_, _, _, _, conv2_copy) in zip(prunable_blocks(model_fn), prunable_blocks(zeroed),
                                                                 strict=True):
        size = norm2.num_channels // norm2.num_groups
        dropped = group_scores(norm2, conv2).topk(round(0.25 * norm2.num_groups), largest=False).indices
        conv2_copy.weight[:, (dropped[:, None] * size + torch.arange(size)).flatten()] = 0
    x = call_inputs(0)
    widths = {}
    conv1 = model_fn.net.up_blocks[0].resnets[0].conv1
    handle = conv1.register_forward_hook(lambda m, a, out: widths.__setitem__("conv1", out.shape[1]))
    try:
        with applied(model_fn, ChannelPruning(0.25)):
            pruned = model_fn(*x)
            assert ChannelPruning.kept_fraction(model_fn) == 0.75
    finally:
        handle.remove()
    assert widths["conv1"] == 24 < conv1.out_channels == 32  # a really smaller convolution
    torch.testing.assert_close(pruned, zeroed(*x), rtol=1e-5, atol=1e-6)
    assert rel_err(pruned, model_fn(*x)) > 1e-3
    assert torch.equal(model_fn(*x), model_fn(*x)) and ChannelPruning.kept_fraction(model_fn) == 1.0


def test_sparsity_zero_is_exact_and_removal_restores_the_model(model_fn):  # noqa: F811
    x = call_inputs(1)
    expected = model_fn(*x)
    with applied(model_fn, ChannelPruning(0.0)):
        assert torch.equal(model_fn(*x), expected)
    with applied(model_fn, ChannelPruning(0.5)):
        assert not torch.equal(model_fn(*x), expected)
    assert torch.equal(model_fn(*x), expected)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model_fn.net.modules())


def test_refit_recovers_what_the_kept_channels_can_express():
    """Removed channels that are linear mixtures of the kept ones: the least-squares refit of the
    consumer reproduces its full output; plain slicing does not."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 5, 3, padding=1)
    mix = torch.randn(4, 4)

    def features(seed):
        kept = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(seed))
        return torch.cat([kept, torch.einsum("ij,bjhw->bihw", mix, kept)], 1)

    patches = torch.nn.functional.unfold(features(0), 3, padding=1).transpose(1, 2).flatten(0, 1)
    keep = torch.arange(4)
    weight, bias = refit(conv, patches, keep, ridge=1e-9)
    x = features(1)
    with torch.no_grad():
        expected = conv(x)
        assert rel_err(torch.nn.functional.conv2d(x[:, keep], weight, bias, padding=1), expected) < 1e-4
        assert rel_err(torch.nn.functional.conv2d(x[:, keep], conv.weight[:, keep], conv.bias, padding=1), expected) > 0.1


def test_calibrated_pruning_refits_once_and_reduces_the_block_error(model_fn):  # noqa: F811
    calibration = record_model_inputs(model_fn, lambda: [model_fn(*call_inputs(s, t)) for s, t in
                                                          ((2, 900), (3, 500), (4, 100))], every=1)
    block, seen = model_fn.net.up_blocks[2].resnets[0], {}
    handle = block.register_forward_pre_hook(lambda m, args: seen.__setitem__("args", args))
    model_fn(*calibration.inputs[1])
    handle.remove()
    expected = block(*seen["args"])
    errs = {}
    for name, transform in (("plain", ChannelPruning(0.25)), ("refit", ChannelPruning(0.25, calibration))):
        with applied(model_fn, transform):
            errs[name] = rel_err(block(*seen["args"]), expected)
    assert 0 < errs["refit"] < 0.9 * errs["plain"]
    x = call_inputs(5, 300)
    pruning = ChannelPruning(0.25, calibration)
    with applied(model_fn, pruning):
        first = model_fn(*x)
    with applied(model_fn, pruning):  # the fit is kept: a second application is the same network
        assert torch.equal(model_fn(*x), first)
    with pytest.raises(TransformError, match="calibration holds no model inputs"):
        ChannelPruning(0.5, type(calibration)())


def test_composes_with_deepcache_and_refuses_other_weight_transforms(model_fn):  # noqa: F811
    xs = [call_inputs(6, t) for t in (900, 700, 500)]
    outs = []
    for order in ((ChannelPruning(0.25), DeepCache(interval=2)), (DeepCache(interval=2), ChannelPruning(0.25))):
        with applied(model_fn, *order):
            outs.append([model_fn(*x) for x in xs])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    with applied(model_fn, ChannelPruning(0.25)):
        with pytest.raises(TransformError, match="cannot be combined with channel_pruning"):
            MagnitudePruning(0.3).apply(model_fn)
    with applied(model_fn, MagnitudePruning(0.3)):
        with pytest.raises(TransformError, match="channel_pruning cannot be combined with pruning"):
            ChannelPruning(0.25).apply(model_fn)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model_fn.net.modules())


def test_prunes_the_reversible_unet_and_is_named_in_pipelines():
    torch.manual_seed(0)
    fn = RestorationFunction(ReversibleUNet(channels=(16, 16), blocks=1, time_channels=16, in_channels=2)).eval()
    fn.requires_grad_(False)
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([3]), torch.randn(1, 1, 16, 16)
    expected = fn(x, t, y)
    assert len(prunable_blocks(fn)) == 5  # one ResidualBody per sequence: down x 2, middle, up x 2
    (pruning,) = transforms_from_spec({"channel_pruning": {"sparsity": 0.5}})
    with applied(fn, pruning):
        assert 0 < rel_err(fn(x, t, y), expected) < 1
    assert torch.equal(fn(x, t, y), expected)
    with pytest.raises(TransformError, match="no residual blocks"):
        ChannelPruning(0.5).apply(ConcatConditionUNet(torch.nn.Conv2d(4, 2, 3)))
    with pytest.raises(TransformError, match="sparsity is 1"):
        ChannelPruning(1)
