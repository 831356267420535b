"""A small diffusion transformer (DiT, Peebles & Xie 2023) for image-to-image restoration.

``forward(x, t, context=None)`` like :class:`~medidiff.nets.reversible_unet.ReversibleUNet`: the image
(B, in_channels, H, W) is cut into ``patch`` x ``patch`` tokens (``conv_in``, a strided convolution),
a depthwise 3x3 convolution over the token grid adds position (a CPVT-style conditional position
encoding: no absolute table, so tiles of any size read the same), ``depth`` :class:`DiTBlock` s
(self-attention + MLP, each conditioned on the timestep by adaLN-zero: shift, scale and a gate per
branch, the gates zero at initialisation so every block starts as the identity), a final adaLN and
``conv_out`` (a 1x1 convolution to ``patch**2 * out_channels``) pixel-shuffled back to the image.

The blocks are :attr:`DiT.blocks`, ``block(tokens, c) -> tokens``: what the block caches of
:mod:`medidiff.acceleration.block_caching` act on. Attention is global over the tokens of the input,
so a restoration method samples large images in tiles of :attr:`DiT.tile` pixels (the training patch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero conditioning on ``c`` (B, hidden)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        b, n, d = x.shape
        q, k, v = self.qkv(_modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1[:, None] * self.proj(attention)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """``config``: ``hidden`` width, ``depth`` blocks, ``heads``, ``patch`` size, ``mlp_ratio``, ``tile``
    (the largest side sampled in one piece), ``in_channels``, ``out_channels``."""

    def __init__(self, hidden: int = 96, depth: int = 6, heads: int = 4, patch: int = 4, mlp_ratio: float = 4.0,
                 tile: int = 64, in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        if hidden % heads or tile % patch:
            raise ValueError(f"DiT hidden {hidden} must divide by heads {heads} and tile {tile} by patch {patch}")
        self.config = {"hidden": hidden, "depth": depth, "heads": heads, "patch": patch, "mlp_ratio": mlp_ratio,
                       "tile": tile, "in_channels": in_channels, "out_channels": out_channels}
        self.conv_in = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.position = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        nn.init.zeros_(self.modulation_out[1].weight)
        nn.init.zeros_(self.modulation_out[1].bias)
        self.conv_out = nn.Conv2d(hidden, patch * patch * out_channels, 1)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.config["patch"]

    @property
    def tile(self) -> int:
        """The largest image side sampled in one piece (attention is quadratic in the tokens)."""
        return self.config["tile"]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: dict | None = None) -> torch.Tensor:
        t = t.expand(len(x)) if t.ndim == 0 or len(t) == 1 else t
        h = self.conv_in(x)
        h = h + self.position(h)
        b, d, rows, cols = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        c = self.time_mlp(get_timestep_embedding(t, d).to(x.dtype))
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.modulation_out(c).chunk(2, dim=1)
        tokens = _modulate(self.norm_out(tokens), shift, scale)
        return F.pixel_shuffle(self.conv_out(tokens.transpose(1, 2).reshape(b, d, rows, cols)), self.config["patch"])
