"""Where the feature caches attach: the encoder and the deep part of each U-Net the project ships.

A layout names, for one U-Net found inside a model function, the modules whose outputs the caching
transforms keep and reuse: :meth:`UNetLayout.deep` (DeepCache: everything but the shallow branch) and
:meth:`UNetLayout.encoder` (Faster Diffusion: the input convolution, the down path and the middle).
Two are known: diffusers UNets (``down_blocks``/``mid_block``/``up_blocks``; BS-LDM) and
:class:`~medidiff.nets.reversible_unet.ReversibleUNet` (restoration and IDM).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from medidiff.acceleration.transform import TransformError, has_hook
from medidiff.nets.reversible_unet import ReversibleUNet


def _layers(block: nn.Module, samplers: str) -> list[list[nn.Module]]:
    """A diffusers block's layers in call order: [resnet, attention?] pairs, then each resampler alone."""
    attentions = list(getattr(block, "attentions", None) or [])
    pairs = [[r] + ([attentions[i]] if i < len(attentions) else []) for i, r in enumerate(block.resnets)]
    return pairs + [[s] for s in (getattr(block, samplers, None) or [])]


def _is_diffusers_unet(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("down_blocks", "mid_block", "up_blocks", "conv_in"))


@dataclass
class UNetLayout:
    """The U-Net ``net`` inside a model function and its cacheable parts."""

    net: nn.Module

    @property
    def branches(self) -> int:
        """How many skip branches DeepCache can choose from (0 = shallowest)."""
        if isinstance(self.net, ReversibleUNet):
            return len(self.net.down) - 1
        return sum(len(_layers(block, "downsamplers")) for block in self.net.down_blocks)

    def deep(self, branch: int) -> list[nn.Module]:
        """The modules DeepCache caches for skip branch ``branch``: what the shallow branch does not read."""
        if not 0 <= branch < self.branches:
            raise TransformError(f"DeepCache branch is {branch}; this U-Net has branches 0..{self.branches - 1}")
        net = self.net
        if isinstance(net, ReversibleUNet):  # level b runs fresh on both paths; everything below it is cached
            return [*net.down[branch + 1:], *net.downsample[branch:], net.middle, *net.up[branch + 1:],
                    *net.upsample[branch:]]
        down = [layer for block in net.down_blocks for layer in _layers(block, "downsamplers")]
        up = [layer for block in net.up_blocks for layer in _layers(block, "upsamplers")]
        # up resnets consume the skip features in reverse: the last branch + 1 of them (and what follows) run
        up_resnets = {id(r) for block in net.up_blocks for r in block.resnets}
        first_fresh = [i for i, layer in enumerate(up) if id(layer[0]) in up_resnets][-(branch + 1)]
        cached = [m for layer in down[branch:] + up[:first_fresh] for m in layer]
        return cached + ([net.mid_block] if net.mid_block is not None else [])

    def reused(self, branch: int) -> nn.Module:
        """The cached module whose output the shallow branch reads on the up path (the reused deep feature)."""
        if isinstance(self.net, ReversibleUNet):
            self.deep(branch)  # checks the branch
            return self.net.upsample[branch]
        up_modules = {id(m) for block in self.net.up_blocks for m in block.modules()}
        return [m for m in self.deep(branch) if id(m) in up_modules][-1]

    def encoder(self) -> list[nn.Module]:
        """The encoder (input convolution, down path, middle): what Faster Diffusion propagates."""
        net = self.net
        if isinstance(net, ReversibleUNet):
            return [net.conv_in, *net.down, *net.downsample, net.middle]
        return [net.conv_in, *net.down_blocks] + ([net.mid_block] if net.mid_block is not None else [])


FEATURE_CACHES = ("deepcache", "faster_diffusion")  # transform names; one feature cache at a time


def find_layout(model_fn: nn.Module, transform: str = "deepcache") -> UNetLayout:
    """The layout of the (first) known U-Net inside ``model_fn``; refuses a second feature cache."""
    other = next((n for n in FEATURE_CACHES if n != transform and any(has_hook(m, n) for m in model_fn.modules())), None)
    if other is not None:
        raise TransformError(f"{transform} cannot be combined with {other}: both reuse the U-Net's features; "
                             f"remove {other} first")
    for module in model_fn.modules():
        if isinstance(module, ReversibleUNet) or _is_diffusers_unet(module):
            return UNetLayout(module)
    raise TransformError(f"{'DeepCache' if transform == 'deepcache' else transform} needs a diffusers UNet (down_blocks/mid_block/up_blocks) or a ReversibleUNet; "
                         f"{type(model_fn).__name__} has none")
