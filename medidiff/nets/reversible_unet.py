"""The U-Net behind compressed-sensing reconstruction and restoration: every block sequence is reversible.

A timestep-conditioned U-Net ``forward(x, t) -> output`` (epsilon for 1-channel CS images): the image is
pixel-unshuffled by 2 (as IDM feeds images to Stable Diffusion's 4-channel U-Net), then each
resolution level runs a :class:`~medidiff.nets.reversible.CouplingSequence` of residual blocks
(timestep-conditioned) and injector slots. Down/up-sampling and skip merges are ordinary layers
(IDM checkpoints these; they hold little memory here).

Injector slots are empty (identity) in the pretrained denoiser. :meth:`ReversibleUNet.add_injectors`
fills them with IDM's lightweight measurement injectors, one set per sampling step: a feature map is
pixel-shuffled to image resolution and reduced to one channel ``z``, ``[z, A^T A z, A^T y]`` is
mapped back by a zero-initialised 1x1 convolution and added to the features, so a fine-tune starts
from exactly the pretrained network. No attention layers (a CPU budget choice; IDM keeps SD's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from medidiff.nets.reversible import CouplingSequence


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBody(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))) + time))))``; the time embedding comes from
    ``context["time_embedding"]()`` (computed inside the body: reversible passes recompute it)."""

    def __init__(self, channels: int, time_channels: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(time_channels, channels)
        self.norm2, self.conv2 = _norm(channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(context["time_embedding"]()))[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class Injector(nn.Module):
    """IDM's measurement injector for one sampling step: features -> image ``z`` -> ``[z, A^T A z,
    A^T y]`` -> features added back (zero at initialisation)."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        inner = channels // factor**2
        self.to_image = nn.Sequential(nn.PixelShuffle(factor), nn.Conv2d(inner, 1, 1))
        self.to_features = nn.Sequential(nn.Conv2d(3, inner, 1), nn.PixelUnshuffle(factor))
        nn.init.zeros_(self.to_features[0].weight)
        nn.init.zeros_(self.to_features[0].bias)

    def forward(self, x: torch.Tensor, operator, y: torch.Tensor, pinv_y: torch.Tensor) -> torch.Tensor:
        z = self.to_image(x)
        return x + self.to_features(torch.cat([z, operator.adjoint(operator.forward(z)), pinv_y], dim=1))


class InjectorSlot(nn.Module):
    """Identity until injectors are added; then the injector of ``context["step"]`` when the context
    carries a measurement (``operator``, ``y``, ``pinv_y``)."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.channels, self.factor = channels, factor
        self.injectors = nn.ModuleList()

    def add(self, steps: int) -> None:
        self.injectors.extend(Injector(self.channels, self.factor) for _ in range(steps))

    def forward(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        if not self.injectors or "operator" not in context:
            return x
        return self.injectors[context["step"]](x, context["operator"], context["y"], context["pinv_y"])


class ReversibleUNet(nn.Module):
    """U-Net ``forward(x, t, context=None)`` for (B, in_channels, H, W) images, H and W multiples of
    ``2 ** len(channels)``, returning (B, out_channels, H, W) (epsilon for the CS denoiser; x0, noise
    or residual for the restoration processes). ``config``: ``channels`` per level, ``blocks``
    residual blocks per level, ``time_channels``, ``in_channels``, ``out_channels``."""

    def __init__(self, channels=(32, 64, 64), blocks: int = 2, time_channels: int = 128, in_channels: int = 1,
                 out_channels: int = 1):
        super().__init__()
        self.config = {"channels": list(channels), "blocks": blocks, "time_channels": time_channels,
                       "in_channels": in_channels, "out_channels": out_channels}
        self.time_mlp = nn.Sequential(nn.Linear(time_channels, time_channels), nn.SiLU(),
                                      nn.Linear(time_channels, time_channels))
        self.conv_in = nn.Conv2d(4 * in_channels, channels[0], 3, padding=1)

        def level(c: int, factor: int) -> CouplingSequence:
            bodies = []
            for _ in range(blocks):
                bodies += [ResidualBody(c, time_channels), InjectorSlot(c, factor)]
            return CouplingSequence(bodies)

        factors = [2 * 2**i for i in range(len(channels))]
        self.down = nn.ModuleList(level(c, f) for c, f in zip(channels, factors, strict=True))
        self.downsample = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1)
                                        for a, b in zip(channels[:-1], channels[1:], strict=True))
        self.middle = level(channels[-1], factors[-1])
        self.upsample = nn.ModuleList(nn.Conv2d(b, a, 3, padding=1)
                                      for a, b in zip(channels[:-1], channels[1:], strict=True))
        self.merge = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in channels)
        self.up = nn.ModuleList(level(c, f) for c, f in zip(channels, factors, strict=True))
        self.norm_out, self.conv_out = _norm(channels[0]), nn.Conv2d(channels[0], 4 * out_channels, 3, padding=1)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** len(self.config["channels"])

    def add_injectors(self, steps: int) -> None:
        """Fill every injector slot with ``steps`` injectors (one per sampling step of IDM)."""
        for m in self.modules():
            if isinstance(m, InjectorSlot):
                m.add(steps)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: dict | None = None) -> torch.Tensor:
        tc = self.config["time_channels"]
        t = t.expand(len(x)) if t.ndim == 0 or len(t) == 1 else t
        context = dict(context or {})
        context["time_embedding"] = lambda: self.time_mlp(get_timestep_embedding(t, tc).to(x.dtype))
        h = self.conv_in(F.pixel_unshuffle(x, 2))
        skips = []
        for i, sequence in enumerate(self.down):
            h = sequence(h, context)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, context)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up[i](self.merge[i](torch.cat([h, skips[i]], dim=1)), context)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)
