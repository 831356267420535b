"""Structured channel pruning that really shrinks compute: whole inner channel groups of residual blocks.

Inside every residual block ``conv1 -> (+ time projection) -> GroupNorm norm2 -> SiLU -> conv2`` (diffusers'
``ResnetBlock2D`` and the reversible U-Net's ``ResidualBody``) the inner channels are private to the
block: nothing outside reads them, so removing some of them leaves the residual sum, the skips and every
other GroupNorm untouched. They are removed in whole ``norm2`` groups (GroupNorm normalises each group on
its own, so the kept channels are normalised exactly as before): the output channels of ``conv1`` and of
the time projection, the group's affine parameters and the matching input channels of ``conv2``. The
layers then run with these smaller weights (real smaller convolutions, fewer FLOPs), swapped in by hooks,
so removing the transform restores the exact original model.

Groups are ranked by what they contribute to the block's output: the L1 norm of ``conv2``'s weights
that read the group, each input channel weighted by the magnitude of its GroupNorm affine map
(``|gamma| + |beta|``; the normalised activation has unit scale, so ``conv1``'s own filter norms say
nothing). With ``calibration`` (model inputs recorded across the sampling timesteps,
:func:`~medidiff.acceleration.calibration.record_model_inputs`) the ranking uses the measured
activations instead (``|conv2 weights|_2 * rms(activation)`` per channel) and ``conv2`` is refitted to
the kept channels by least squares on those activations (He et al., "Channel Pruning for Accelerating
Very Deep Neural Networks", 2017: the reconstruction step; selection here is by the score, not LASSO),
with a bias term that absorbs the mean of the removed channels. No fine-tuning (see
docs/acceleration.md for the measured curve).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.layers import WeightOverride, override_weight
from medidiff.acceleration.transform import Transform, TransformError
from medidiff.methods.base import ModelFunction


class _Sliced(WeightOverride):
    """Runs a Conv2d / Linear / GroupNorm with a sliced copy of its parameters (a smaller layer)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int | None = None):
        super().__init__(weight)
        self.bias, self.groups = bias, groups

    def new_forward(self, module, x):
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, self.groups, self.weight, self.bias, module.eps)
        if isinstance(module, nn.Conv2d):
            return module._conv_forward(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def prunable_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Conv2d, nn.Linear | None, nn.GroupNorm, nn.Conv2d]]:
    """(block, conv1, time projection, norm2, conv2) of every residual block whose inner channels are private."""
    blocks = []
    for block in model.modules():
        conv1, norm2, conv2 = (getattr(block, a, None) for a in ("conv1", "norm2", "conv2"))
        if not (isinstance(conv1, nn.Conv2d) and isinstance(norm2, nn.GroupNorm) and isinstance(conv2, nn.Conv2d)):
            continue
        if conv1.groups != 1 or conv2.groups != 1 or not norm2.affine:
            continue
        time = getattr(block, "time_emb_proj", None) or getattr(block, "time", None)
        blocks.append((block, conv1, time if isinstance(time, nn.Linear) else None, norm2, conv2))
    return blocks


def group_scores(norm2: nn.GroupNorm, conv2: nn.Conv2d, patches: torch.Tensor | None = None) -> torch.Tensor:
    """Per ``norm2`` group, the sum over its channels of ``|conv2 weights reading it|_1 * (|gamma| + |beta|)``,
    or with recorded ``patches`` of conv2's input, ``|conv2 weights reading it|_2 * rms(activation)``."""
    w = conv2.weight.detach()
    if patches is None:
        per_channel = w.abs().sum((0, 2, 3)) * (norm2.weight.detach().abs() + norm2.bias.detach().abs())
    else:
        rms = patches.reshape(len(patches), w.shape[1], -1).square().mean((0, 2)).sqrt()
        per_channel = w.square().sum((0, 2, 3)).sqrt() * rms
    return per_channel.reshape(norm2.num_groups, -1).sum(1)


def conv_input_patches(model_fn: ModelFunction, convs: list[nn.Conv2d], calibration: CalibrationSet,
                       positions: int = 256) -> dict[nn.Conv2d, torch.Tensor]:
    """For each conv, ``positions`` random input patches per calibration call, unfolded as the conv
    reads them: (samples, in_channels * kh * kw)."""
    gen, patches = torch.Generator().manual_seed(0), {c: [] for c in convs}

    def keep(conv, args):
        cols = F.unfold(args[0], conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, C*k*k, L)
        cols = cols.transpose(1, 2).flatten(0, 1)
        patches[conv].append(cols[torch.randperm(len(cols), generator=gen)[:positions]])

    handles = [c.register_forward_pre_hook(keep) for c in convs]
    try:
        for x, t, condition in calibration.inputs:
            model_fn.reset_hooks()
            model_fn(x, t, condition)
    finally:
        for h in handles:
            h.remove()
        model_fn.reset_hooks()
    return {c: torch.cat(p) for c, p in patches.items()}


def refit(conv: nn.Conv2d, patches: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (out, len(keep), kh, kw) and bias for ``conv`` reading only the input channels ``keep``
    that best reproduce its full output on ``patches`` (ridge-regularised least squares)."""
    w = conv.weight.detach()
    target = patches @ w.flatten(1).T  # (S, out), the bias added back below
    cols = patches.reshape(len(patches), w.shape[1], -1)[:, keep].flatten(1)
    design = torch.cat([cols, torch.ones(len(cols), 1)], 1).double()
    gram = design.T @ design
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    solution = torch.linalg.solve(gram, design.T @ target.double()).T.float()  # (out, kept*k*k + 1)
    bias = solution[:, -1] + (conv.bias.detach() if conv.bias is not None else 0)
    return solution[:, :-1].reshape(len(w), len(keep), *w.shape[2:]).contiguous(), bias


class ChannelPruning(Transform):
    """Remove the ``sparsity`` fraction (rounded to whole GroupNorm groups, at least one group kept) of
    the inner channels of every residual block, lowest-scoring groups first; with ``calibration``,
    data-driven ranking and a least-squares refit of ``conv2`` (computed once, on the first application)."""

    name = "channel_pruning"

    def __init__(self, sparsity: float = 0.25, calibration: CalibrationSet | None = None):
        if not isinstance(sparsity, int | float) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
            raise TransformError(f"channel_pruning sparsity is {sparsity!r}; expected 0 <= sparsity < 1")
        if calibration is not None and not calibration.inputs:
            raise TransformError("channel_pruning calibration holds no model inputs; record some with "
                                 "record_model_inputs")
        self.sparsity, self.calibration = float(sparsity), calibration
        self.refits: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # block index -> keep, w2, b2

    @torch.no_grad()
    def attach(self, model_fn: ModelFunction) -> None:
        blocks = prunable_blocks(model_fn)
        if not blocks:
            raise TransformError(f"channel_pruning found no residual blocks (conv1 -> GroupNorm norm2 -> conv2) in "
                                 f"{type(model_fn).__name__}")
        patches = None
        if self.calibration is not None and not self.refits:  # measured once, reused by later applications
            patches = conv_input_patches(model_fn, [b[4] for b in blocks], self.calibration)
        for i, (_, conv1, time, norm2, conv2) in enumerate(blocks):
            groups = norm2.num_groups
            drop, size = min(round(self.sparsity * groups), groups - 1), norm2.num_channels // groups
            if drop == 0:
                continue
            scores = group_scores(norm2, conv2, None if patches is None else patches[conv2])
            keep = (scores.topk(groups - drop).indices.sort().values[:, None] * size + torch.arange(size)).flatten()
            if patches is not None:
                self.refits[i] = (keep, *refit(conv2, patches[conv2], keep))
            if self.calibration is not None:
                keep, w2, b2 = self.refits[i]
            else:
                w2, b2 = conv2.weight[:, keep], conv2.bias
            override_weight(conv1, _Sliced(conv1.weight[keep], None if conv1.bias is None else conv1.bias[keep]),
                            self.name)
            if time is not None:
                # scale_shift blocks project to [scale, shift]: keep the same channels of both halves
                rows = keep if time.out_features == norm2.num_channels else torch.cat([keep, keep + norm2.num_channels])
                override_weight(time, _Sliced(time.weight[rows], None if time.bias is None else time.bias[rows]),
                                self.name)
            override_weight(norm2, _Sliced(norm2.weight[keep], norm2.bias[keep], groups - drop), self.name)
            override_weight(conv2, _Sliced(w2, b2), self.name)

    @staticmethod
    def kept_fraction(model_fn: ModelFunction) -> float:
        """Fraction of the inner channels of the prunable blocks that currently run (1.0 unpruned)."""
        total = kept = 0
        for _, _, _, norm2, _ in prunable_blocks(model_fn):
            registry = getattr(norm2, "_diffusers_hook", None)
            hook = registry.get_hook(ChannelPruning.name) if registry is not None else None
            total += norm2.num_channels
            kept += norm2.num_channels if hook is None else len(hook.weight)
        return kept / max(total, 1)
