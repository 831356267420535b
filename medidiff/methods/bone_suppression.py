"""BS-LDM model object: VQ-GAN + conditional latent diffusion, loaded from safetensors + JSON.

Conditioning: the noise estimator sees concat[noisy soft-tissue latent, CXR latent]. The CXR
latent is given unscaled (clean) both in training and at inference (the reference multiplies it by
sqrt(alpha_bar) in training only; we keep one convention throughout).

Output: with ``residual=True`` (default) the decoded soft tissue is not returned as such; the
predicted bone layer ``decode(z_cxr) - decode(z_soft)`` is subtracted from the input CXR, so the
VQ-GAN's reconstruction error (common to both decodes) cancels and the input's detail is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from medidiff.diffusion.sampling import cosine_alphas_cumprod, sample
from medidiff.diffusion.thresholding import TemporalThreshold
from medidiff.nets.vqgan import VQGAN

MODELS_DIR = Path(__file__).resolve().parents[2] / "models" / "bone_suppression"


def build_noise_unet(cfg: dict) -> UNet2DModel:
    """Noise estimator (diffusers UNet2DModel): 2*latent channels in, latent channels out;
    self-attention only at the lowest resolution (``cfg``: latent_channels, channels, layers_per_block)."""
    ch = tuple(cfg["channels"])
    lc = cfg["latent_channels"]
    attn = cfg.get("attention_lowest", True)
    down = ["DownBlock2D"] * (len(ch) - 1) + ["AttnDownBlock2D" if attn else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attn else "UpBlock2D"] + ["UpBlock2D"] * (len(ch) - 1)
    return UNet2DModel(in_channels=2 * lc, out_channels=lc, block_out_channels=ch,
                       down_block_types=tuple(down), up_block_types=tuple(up),
                       layers_per_block=cfg.get("layers_per_block", 1), norm_num_groups=cfg.get("norm_groups", 16),
                       attention_head_dim=cfg.get("attention_head_dim", 32))


def _read(folder: Path, name: str) -> tuple[dict, dict]:
    return json.loads((folder / f"{name}.json").read_text()), load_file(folder / f"{name}.safetensors")


def load_vqgan(path: Path) -> VQGAN:
    """VQ-GAN from ``<path>.json`` + ``<path>.safetensors``, in eval mode."""
    cfg, weights = _read(path.parent, path.name)
    m = cfg["model"]
    net = VQGAN(m["channels"], m["latent_channels"], m["num_codes"], m.get("quantize_on_decode", True))
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False)


class BSLDM:
    """Bone suppression by conditional latent diffusion (offset noise + temporal adaptive thresholding)."""

    def __init__(self, vqgan: VQGAN, unet: UNet2DModel, cfg: dict):
        self.vqgan, self.unet, self.cfg = vqgan, unet.eval().requires_grad_(False), cfg
        self.scale = float(cfg["latent_scale"])
        self.alphas = cosine_alphas_cumprod(cfg["diffusion"]["num_train_timesteps"])
        th = cfg["sampling"]["threshold"]
        self.threshold = TemporalThreshold(th["r0"], th["dr"], th.get("ref_steps", 1000))
        self.default_steps = int(cfg["sampling"]["steps"])
        self.default_method = cfg["sampling"].get("method", "ddim")

    @classmethod
    def from_pretrained(cls, folder: Path = MODELS_DIR, name: str = "ldm") -> BSLDM:
        folder = Path(folder)
        cfg, weights = _read(folder, name)
        unet = build_noise_unet(cfg["model"])
        unet.load_state_dict(weights)
        return cls(load_vqgan(folder / cfg["vqgan"]), unet, cfg)

    @torch.no_grad()
    def suppress(self, cxr: torch.Tensor, steps: int | None = None, *, method: str | None = None,
                 thresholding: bool = True, residual: bool = True, seed: int = 0, progress=None) -> torch.Tensor:
        """Soft-tissue image (N,1,H,W) for ``cxr`` (N,1,H,W) in [0,1]; H, W multiples of 32.
        ``steps``/``method`` default to the model's ``sampling`` settings."""
        cond = self.vqgan.encode(cxr) * self.scale
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(cond.shape, generator=gen)

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(torch.cat([x, cond], 1), t).sample

        z = sample(eps, noise, self.alphas, steps or self.default_steps, method or self.default_method,
                   self.threshold if thresholding else None, gen, progress)
        soft = self.vqgan.decode(z / self.scale)
        if not residual:
            return soft
        return cxr - (self.vqgan.decode(cond / self.scale) - soft)
