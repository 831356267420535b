"""Training tasks for compressed-sensing reconstruction: the diffusion denoiser and IDM.

``kind: denoiser`` pretrains the epsilon-prediction :class:`~medidiff.nets.reversible_unet.ReversibleUNet`
(cosine schedule, 1000 timesteps) on random patches of the CS training images
(:func:`medidiff.datasets.cs_images.training_images`); it is IDM's starting point and DDNM's prior.
``kind: idm`` fine-tunes the IDM chain (:mod:`medidiff.methods.idm`) from that denoiser end to end on
(measurement, image) pairs made on the fly by the configured measurement operators, L1 loss, Adam
(IDM's recipe). One IDM model serves every ratio of block CS (or every acceleration and mask of
Cartesian MRI): the operator is an input of the chain (projection and injectors), so a ratio is a
different ``A`` rather than a different network, and one CPU training budget covers them all.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from medidiff.datasets.cs_images import random_patches, training_images
from medidiff.diffusion.gaussian import cosine_alphas_cumprod
from medidiff.errors import InputError
from medidiff.methods.base import read_component
from medidiff.methods.cs_reconstruction import draw_operator
from medidiff.methods.idm import build_idm
from medidiff.nets.reversible_unet import ReversibleUNet
from medidiff.train import TrainingTask, register_task


class _PatchTask(TrainingTask):
    """Shared part: the training images, held in memory, and random patches of them."""

    def __init__(self, cfg, rng, device):
        super().__init__(cfg, rng, device)
        self.images = training_images(phantoms=cfg["data"].get("phantoms", 64), seed=cfg.get("seed", 0))

    def patches(self) -> torch.Tensor:
        return random_patches(self.images, self.tcfg["batch"], self.cfg["data"]["patch"], self.rng).to(self.device)


@register_task("denoiser")
class DenoiserTask(_PatchTask):
    """Epsilon-prediction pretraining of the reversible U-Net."""

    def __init__(self, cfg, rng, device):
        super().__init__(cfg, rng, device)
        self.net = ReversibleUNet(**cfg["model"]["unet"]).to(device)
        self.alphas_cumprod = cosine_alphas_cumprod(cfg["model"].get("num_train_timesteps", 1000)).float().to(device)
        self.modules = {"net": self.net}
        self.optims = {"opt": torch.optim.AdamW(self.net.parameters(), lr=self.tcfg["lr"])}

    def step(self, step):
        x0 = self.patches()
        t = torch.randint(0, len(self.alphas_cumprod), (len(x0),), device=self.device)
        noise = torch.randn_like(x0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(self.net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
        return {"loss": self.optimise(loss)}

    def export_config(self):
        return {"model": self.cfg["model"], "images": "[0, 1]", "schedule": "cosine"}


@register_task("idm")
class IDMTask(_PatchTask):
    """End-to-end fine-tuning of the IDM chain from the pretrained denoiser (``model.denoiser``)."""

    def __init__(self, cfg, rng, device):
        super().__init__(cfg, rng, device)
        m = cfg["model"]
        denoiser = Path(m["denoiser"]).expanduser()
        dconfig, weights = read_component(denoiser.parent, denoiser.name)
        self.unet_config = dconfig["model"]["unet"]
        self.net = build_idm(self.unet_config, m.get("steps", 3), m.get("injectors", True))
        missing, unexpected = self.net.model_fn.net.load_state_dict({k: v.float() for k, v in weights.items()},
                                                                    strict=False)
        if unexpected or any("injectors" not in k for k in missing):
            raise InputError(f"model.denoiser: {denoiser} is not a denoiser of this architecture "
                             f"({(missing + unexpected)[:3]}); point it at the weights `kind: denoiser` exports")
        self.net.set_invertible(m.get("invertible", True))
        self.net.to(device)
        self.modules = {"net": self.net}
        self.optims = {"opt": torch.optim.Adam(self.net.parameters(), lr=self.tcfg["lr"])}

    def step(self, step):
        x = self.patches()
        operator = draw_operator(self.cfg["measurement"], tuple(x.shape[-2:]), self.rng).to(self.device)
        loss = (self.net(operator(x), operator) - x).abs().mean()
        return {"l1": self.optimise(loss)}

    def export_config(self):
        m = self.cfg["model"]
        return {"model": {"unet": self.unet_config, "steps": m.get("steps", 3), "injectors": m.get("injectors", True)},
                "measurement": self.cfg["measurement"], "images": "[0, 1]"}
