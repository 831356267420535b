"""BS-LDM bone suppression on the method contract: VQ-GAN + conditional latent diffusion.

Parts (each ``<stem>.safetensors`` + ``<stem>.json``): the noise estimator (``ldm``, a diffusers
``UNet2DModel``) and the VQ-GAN it works on (``vqgan``, named in the LDM's JSON). Model function
(the hook point): ``eps = unet(concat[x_t, condition], t)`` with the CXR latent as condition; the
CXR latent is given unscaled (clean) both in training and at inference (the reference multiplies
it by sqrt(alpha_bar) in training only; we keep one convention throughout). Process: DDPM or DDIM
on MONAI's cosine schedule, with temporal adaptive thresholding as its x0 step hook.

Output: with ``residual=True`` (default) the decoded soft tissue is not returned as such; the
predicted bone layer ``decode(z_cxr) - decode(z_soft)`` is subtracted from the input CXR, so the
VQ-GAN's reconstruction error (common to both decodes) cancels and the input's detail is kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel

from medidiff.diffusion.gaussian import GaussianProcess, cosine_alphas_cumprod, gaussian_process
from medidiff.diffusion.sampling import sample
from medidiff.diffusion.thresholding import TemporalThreshold
from medidiff.methods.base import Method, ModelFunction, read_component
from medidiff.nets.vqgan import VQGAN
from medidiff.resources import model_dir

MODELS_DIR = model_dir("bone_suppression")


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


def load_vqgan(path: Path) -> tuple[VQGAN, dict]:
    """VQ-GAN (eval mode) and its JSON config from ``<path>.json`` + ``<path>.safetensors``."""
    path = Path(path)
    cfg, weights = read_component(path.parent, path.name)
    net = VQGAN.from_config(cfg["model"])
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False), cfg


class ConcatConditionUNet(ModelFunction):
    """``net(concat[x, condition], t).sample``: the conditional noise estimator of BS-LDM."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, condition], 1), t).sample


class BSLDM(Method):
    """Bone suppression by conditional latent diffusion (offset noise + temporal adaptive thresholding)."""

    def __init__(self, vqgan: VQGAN, unet: UNet2DModel, config: dict, *, vqgan_config: dict, name: str = "ldm"):
        self.vqgan, self.vqgan_config = vqgan.eval().requires_grad_(False), vqgan_config
        self.model_fn = ConcatConditionUNet(unet).eval().requires_grad_(False)
        self.config, self.name = config, name
        self.scale = float(config["latent_scale"])
        self.alphas = cosine_alphas_cumprod(config["diffusion"]["num_train_timesteps"])
        th = config["sampling"]["threshold"]
        self.threshold = TemporalThreshold(th["r0"], th["dr"], th.get("ref_steps", 1000))
        self.default_steps = int(config["sampling"]["steps"])
        self.default_method = config["sampling"].get("method", "ddim")

    @classmethod
    def from_pretrained(cls, folder: Path = MODELS_DIR, name: str = "ldm") -> BSLDM:
        config, weights = read_component(folder, name)
        unet = build_noise_unet(config["model"])
        unet.load_state_dict(weights)
        vqgan, vqgan_config = load_vqgan(Path(folder) / config["vqgan"])
        method = cls(vqgan, unet, config, vqgan_config=vqgan_config, name=name)
        method.model_fn.weights_file = Path(folder) / f"{name}.safetensors"
        return method

    def networks(self):
        return {self.name: (self.model_fn.net, self.config), self.config["vqgan"]: (self.vqgan, self.vqgan_config)}

    def process(self, steps: int | None = None, method: str | None = None, thresholding: bool = True) -> GaussianProcess:
        """The sampler (``ddpm``/``ddim``, default the model's) with its timesteps set."""
        process = gaussian_process(method or self.default_method, self.alphas, [self.threshold] if thresholding else [])
        process.set_timesteps(steps or self.default_steps)
        return process

    @torch.no_grad()
    def __call__(self, cxr: torch.Tensor, steps: int | None = None, *, method: str | None = None,
                 thresholding: bool = True, residual: bool = True, seed: int = 0, progress=None) -> torch.Tensor:
        """Soft-tissue image (N,1,H,W) for ``cxr`` (N,1,H,W) in [0,1]; H, W multiples of 32.
        ``steps``/``method`` default to the model's ``sampling`` settings."""
        cond = self.vqgan.encode(cxr) * self.scale
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(cond.shape, generator=gen)
        self.model_fn.reset_hooks()
        z = sample(self.model_fn, self.process(steps, method, thresholding), noise, cond, generator=gen,
                   progress=progress)
        soft = self.vqgan.decode(z / self.scale)
        if not residual:
            return soft
        return cxr - (self.vqgan.decode(cond / self.scale) - soft)

    suppress = __call__
