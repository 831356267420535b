"""A small diffusion transformer (DiT, Peebles & Xie 2023) for image-to-image restoration.

``forward(x, t, context=None)`` like :class:`~medidiff.nets.reversible_unet.ReversibleUNet`: the image
(B, in_channels, H, W) is cut into ``patch`` x ``patch`` tokens (``conv_in``, a strided convolution),
a depthwise 3x3 convolution over the token grid adds position (a CPVT-style conditional position
encoding: no absolute table, so images of any size read the same), ``depth`` :class:`DiTBlock` s
(self-attention + MLP, each conditioned on the timestep by adaLN-zero: shift, scale and a gate per
branch, the gates zero at initialisation so every block starts as the identity), a final adaLN and
``conv_out`` (a 1x1 convolution to ``patch**2 * out_channels``) pixel-shuffled back to the image.

Attention is global over an image of at most ``window`` pixels a side (the training patch); a larger
image is cut into windows of that size, every other block's windows shifted by half a window with
the wrapped-around parts masked (Swin Transformer), so the cost grows linearly with the image and each
attention sees what it saw in training. The blocks are :attr:`DiT.blocks`, ``block(tokens, c) ->
tokens`` on (B, rows, cols, hidden) token grids: what the block caches of
:mod:`medidiff.acceleration.block_caching` act on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero conditioning on ``c`` (B, hidden), attention within
    ``window`` x ``window`` tokens (shifted by half a window when ``shifted``) on grids larger than that."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, window: int = 16, shifted: bool = False):
        super().__init__()
        self.heads, self.window, self.shifted = heads, window, shifted
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of the token grid ``h`` (B, rows, cols, hidden), windowed on large grids
        (padded to whole windows; padding and the roll's wrap-around masked)."""
        b, rows, cols, d = h.shape
        w = self.window
        if rows <= w and cols <= w:
            return self._heads(h.reshape(b, 1, rows * cols, d), None).reshape(b, rows, cols, d)
        s, pad_rows, pad_cols = (w // 2 if self.shifted else 0), -rows % w, -cols % w
        h = torch.roll(F.pad(h, (0, 0, 0, pad_cols, 0, pad_rows)), (-s, -s), dims=(1, 2))
        r, c = rows + pad_rows, cols + pad_cols
        windows = h.reshape(b, r // w, w, c // w, w, d).transpose(2, 3).reshape(b, -1, w * w, d)
        masked = s or pad_rows or pad_cols
        out = self._heads(windows, _window_mask(rows, cols, w, s, h.device) if masked else None)
        out = out.reshape(b, r // w, c // w, w, w, d).transpose(2, 3).reshape(b, r, c, d)
        return torch.roll(out, (s, s), dims=(1, 2))[:, :rows, :cols]

    def _heads(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, tokens, d = windows.shape
        q, k, v = self.qkv(windows).view(b * n, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if mask is None else mask.repeat(b, 1, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, tokens, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, None] for m in self.modulation(c).chunk(6, dim=1))
        x = x + gate1 * self.proj(self.attend(self.norm1(x) * (1 + scale1) + shift1))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


def _window_mask(rows: int, cols: int, w: int, s: int, device) -> torch.Tensor:
    """(windows, 1, w*w, w*w): which tokens of each window of the grid padded to whole windows and rolled
    by ``-s`` may attend to each other: not to padding, not across the roll's wrap-around (Swin's mask)."""
    r, c = rows - rows % -w, cols - cols % -w  # padded to whole windows

    def bands(n: int, real: int) -> torch.Tensor:
        band = torch.zeros(n, dtype=torch.long, device=device)
        if s:
            band[n - w:n - s], band[n - s:] = 1, 2
        return band + 3 * torch.roll(torch.arange(n, device=device) >= real, -s).long()

    region = (6 * bands(r, rows)[:, None] + bands(c, cols)[None]).reshape(r // w, w, c // w, w).transpose(1, 2)
    region = region.reshape(-1, w * w)
    return (region[:, :, None] == region[:, None, :])[:, None]


class DiT(nn.Module):
    """``config``: ``hidden`` width, ``depth`` blocks, ``heads``, ``patch`` size, ``mlp_ratio``, ``window``
    (attention window in pixels: the training patch), ``in_channels``, ``out_channels``."""

    def __init__(self, hidden: int = 96, depth: int = 6, heads: int = 4, patch: int = 4, mlp_ratio: float = 4.0,
                 window: int = 64, in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        if hidden % heads or window % (2 * patch):
            raise ValueError(f"DiT hidden {hidden} must divide by heads {heads} and window {window} by 2 x patch {patch}")
        self.config = {"hidden": hidden, "depth": depth, "heads": heads, "patch": patch, "mlp_ratio": mlp_ratio,
                       "window": window, "in_channels": in_channels, "out_channels": out_channels}
        self.conv_in = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.position = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, window // patch, shifted=i % 2 == 1)
                                    for i in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        nn.init.zeros_(self.modulation_out[1].weight)
        nn.init.zeros_(self.modulation_out[1].bias)
        self.conv_out = nn.Conv2d(hidden, patch * patch * out_channels, 1)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.config["patch"]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: dict | None = None) -> torch.Tensor:
        t = t.expand(len(x)) if t.ndim == 0 or len(t) == 1 else t
        h = self.conv_in(x)
        tokens = (h + self.position(h)).permute(0, 2, 3, 1)
        c = self.time_mlp(get_timestep_embedding(t, tokens.shape[-1]).to(x.dtype))
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = (m[:, None, None] for m in self.modulation_out(c).chunk(2, dim=1))
        tokens = self.norm_out(tokens) * (1 + scale) + shift
        return F.pixel_shuffle(self.conv_out(tokens.permute(0, 3, 1, 2)), self.config["patch"])
