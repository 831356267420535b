"""A small VQ-GAN perceptual compressor (encoder, vector quantiser, decoder) and its losses.

BS-LDM compresses radiographs with a VQ-GAN trained with a multi-level hybrid loss (pixel L1,
LPIPS perceptual, adversarial, codebook). No pretrained perceptual network can be downloaded here,
so :func:`reconstruction_loss` replaces LPIPS by a multi-scale SSIM (MONAI ``SSIMLoss``), an
image-gradient and a Fourier-magnitude term; the adversarial term uses MONAI's ``PatchDiscriminator``
with MONAI's hinge ``PatchAdversarialLoss`` (in the training task).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """Image (N,1,H,W) -> pre-quantisation latent (N,latent_channels,H/f,W/f), f = 2**(levels-1)."""

    def __init__(self, channels: list[int], latent_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, padding=1)]
        for i, ch in enumerate(channels):
            layers.append(ResBlock(layers[-1].out_channels if i == 0 else channels[i - 1], ch))
            if i < len(channels) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers += [ResBlock(channels[-1], channels[-1]), _norm(channels[-1]), nn.SiLU(),
                   nn.Conv2d(channels[-1], latent_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latent (N,latent_channels,h,w) -> image (N,1,h*f,w*f)."""

    def __init__(self, channels: list[int], latent_channels: int):
        super().__init__()
        rev = list(reversed(channels))
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, rev[0], 3, padding=1), ResBlock(rev[0], rev[0])]
        for i, ch in enumerate(rev):
            layers.append(ResBlock(rev[i - 1] if i else ch, ch))
            if i < len(rev) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [_norm(rev[-1]), nn.SiLU(), nn.Conv2d(rev[-1], 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantiser with a straight-through gradient, codebook + commitment loss."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)
        self.beta = beta

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword for every latent vector, shape (N,h,w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        dist = torch.cdist(flat, self.codebook.weight)
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.indices(z)
        q = self.codebook(idx).permute(0, 3, 1, 2)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), loss, idx

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, used: torch.Tensor) -> int:
        """Move codewords never used (``used`` is a bool mask) onto random latent vectors of ``z``."""
        dead = (~used).nonzero().flatten()
        if len(dead):
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            pick = torch.randint(len(flat), (len(dead),), device=z.device)
            self.codebook.weight[dead] = flat[pick] + 0.01 * torch.randn_like(flat[pick])
        return len(dead)


class VQGAN(nn.Module):
    """Encoder + quantiser + decoder. The diffusion model works on the pre-quantisation latent;
    :meth:`decode` quantises first when ``quantize_on_decode`` (as in training)."""

    def __init__(self, channels: list[int], latent_channels: int = 4, num_codes: int = 1024,
                 quantize_on_decode: bool = True):
        super().__init__()
        self.encoder = Encoder(list(channels), latent_channels)
        self.decoder = Decoder(list(channels), latent_channels)
        self.quantizer = VectorQuantizer(num_codes, latent_channels)
        self.quantize_on_decode = quantize_on_decode
        self.factor = 2 ** (len(channels) - 1)

    @classmethod
    def from_config(cls, cfg: dict) -> VQGAN:
        """Build from a config's ``model`` section (channels, latent_channels, num_codes, quantize_on_decode)."""
        return cls(cfg["channels"], cfg["latent_channels"], cfg["num_codes"], cfg.get("quantize_on_decode", True))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [0,1] -> continuous latent."""
        return self.encoder(x * 2 - 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image in (about) [0,1]."""
        if self.quantize_on_decode:
            z = self.quantizer(z)[0]
        return (self.decoder(z) + 1) / 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction in [0,1], codebook loss, code indices and the continuous latent."""
        z = self.encode(x)
        q, vq_loss, idx = self.quantizer(z)
        return (self.decoder(q) + 1) / 2, vq_loss, idx, z


def build_discriminator(channels: int = 32, num_layers: int = 3) -> PatchDiscriminator:
    """MONAI patch discriminator for single-channel 2-D images (one logit per patch)."""
    return PatchDiscriminator(spatial_dims=2, channels=channels, in_channels=1, out_channels=1,
                              num_layers_d=num_layers, norm="INSTANCE")


def multiscale_ssim_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """1 - mean SSIM over ``scales`` dyadic scales (MONAI ``SSIMLoss``, 7x7 Gaussian window, sigma 1.5;
    differentiable, images in [0,1])."""
    ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=7, kernel_sigma=1.5)
    total = x.new_zeros(())
    for s in range(scales):
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        total = total + ssim_loss(x, y)
    return total / scales


def gradient_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 distance between the horizontal and vertical finite differences."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def frequency_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 distance between log Fourier magnitudes (penalises lost high frequencies)."""
    fx, fy = torch.fft.rfft2(x, norm="ortho"), torch.fft.rfft2(y, norm="ortho")
    return (torch.log1p(fx.abs()) - torch.log1p(fy.abs())).abs().mean()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """The multi-level hybrid reconstruction terms, weighted; keys l1, ssim, grad, freq."""
    terms = {
        "l1": (rec - x).abs().mean(),
        "ssim": multiscale_ssim_loss(rec, x),
        "grad": gradient_loss(rec, x),
        "freq": frequency_loss(rec, x),
    }
    return {k: weights.get(k, 0.0) * v for k, v in terms.items()}
