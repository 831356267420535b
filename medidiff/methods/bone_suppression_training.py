"""Training tasks of bone suppression: ``kind: vqgan``, ``kind: ldm`` (BS-LDM) and ``kind: regression``.

All three train on chest-phantom pairs (CXR, soft tissue) made from the generator's TRAIN_SEEDS
and cached as .npy (:func:`training_pairs`).
"""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from tqdm import tqdm

from medidiff.diffusion.gaussian import cosine_alphas_cumprod
from medidiff.diffusion.offset_noise import offset_noise
from medidiff.io.atomic import atomic_write
from medidiff.methods.bone_suppression import build_noise_unet, load_vqgan
from medidiff.methods.regression_baseline import build_regression_unet
from medidiff.nets.vqgan import VQGAN, build_discriminator, multiscale_ssim_loss, reconstruction_loss
from medidiff.train import TrainingTask, register_task

REPO_ROOT = Path(__file__).resolve().parents[2]


def training_pairs(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(cxr, soft) float16 arrays (N,size,size) from the phantom's training seeds, cached as .npy."""
    gen = importlib.import_module(data.get("generator", "medidiff.datasets.chest_phantom"))
    n, size = int(data["n_train"]), int(data["size"])
    cache = Path(data.get("cache_dir", "/tmp/medidiff-cache")).expanduser()
    stem = f"{gen.__name__.rsplit('.', 1)[-1]}_{size}px_{n}"
    paths = {k: cache / f"{stem}_{k}.npy" for k in ("cxr", "soft")}
    if not all(p.exists() for p in paths.values()):
        seeds = list(gen.TRAIN_SEEDS)[:n]
        out = {k: np.empty((n, size, size), np.float16) for k in paths}
        chunk = 50
        starts = range(0, n, chunk)
        workers = max(1, min(int(data.get("workers", 2)), len(starts)))
        with ProcessPoolExecutor(workers) as pool:
            batches = pool.map(gen.make_batch, [seeds[i:i + chunk] for i in starts], [size] * len(starts))
            for i, batch in zip(tqdm(starts, desc=f"generating {n} training pairs"), batches, strict=True):
                for k in out:
                    out[k][i:i + chunk] = batch[k]
        for k, p in paths.items():
            with atomic_write(p) as tmp, open(tmp, "wb") as f:
                np.save(f, out[k])
    return tuple(np.load(paths[k], mmap_mode="r") for k in ("cxr", "soft"))


def random_crops(arrays: tuple[np.ndarray, ...], idx: np.ndarray, crop: int | None,
                 rng: np.random.Generator) -> list[torch.Tensor]:
    """Same random crop (and horizontal flip) of every array at ``idx``, as (B,1,c,c) float32."""
    size = arrays[0].shape[-1]
    c = crop or size
    y, x = rng.integers(0, size - c + 1, 2)
    flip = rng.random() < 0.5
    out = []
    for a in arrays:
        t = torch.from_numpy(np.asarray(a[np.sort(idx), y:y + c, x:x + c], np.float32))[:, None]
        out.append(t.flip(-1) if flip else t)
    return out


def model_path(spec: str) -> Path:
    """A model file stem from a config: as given if it exists there (absolute or from the working
    folder), else relative to the source checkout (configs name ``models/bone_suppression/vqgan``)."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() or path.with_suffix(".json").exists() else REPO_ROOT / path


class PhantomTask(TrainingTask):
    """Tasks on phantom pairs: ``self.cxr``/``self.soft`` and a batch index sampler."""

    def __init__(self, cfg: dict, rng: np.random.Generator):
        super().__init__(cfg, rng)
        self.cxr, self.soft = training_pairs(cfg["data"])

    def sample_idx(self) -> np.ndarray:
        return self.rng.choice(len(self.cxr), self.tcfg["batch_size"], replace=False)


@register_task("vqgan")
class VQGANTask(PhantomTask):
    """VQ-GAN on random crops of CXR and soft-tissue images (both share one compressor)."""

    def __init__(self, cfg: dict, rng: np.random.Generator):
        super().__init__(cfg, rng)
        m = cfg["model"]
        self.net = VQGAN.from_config(m)
        self.disc = build_discriminator(self.tcfg.get("disc_channels", 16))
        self.adversarial = PatchAdversarialLoss(criterion="hinge")
        self.modules = {"net": self.net, "disc": self.disc}
        self.optims = {"net": torch.optim.Adam(self.net.parameters(), self.tcfg["lr"], betas=(0.5, 0.9)),
                       "disc": torch.optim.Adam(self.disc.parameters(), self.tcfg["lr"], betas=(0.5, 0.9))}
        self.used = torch.zeros(m["num_codes"], dtype=torch.bool)

    def step(self, step: int) -> dict:
        t = self.tcfg
        cxr, soft = random_crops((self.cxr, self.soft), self.sample_idx(), t.get("crop"), self.rng)
        x = torch.cat([cxr, soft])
        rec, vq_loss, idx, z = self.net(x)
        terms = reconstruction_loss(rec, x, t["loss_weights"])
        loss = sum(terms.values()) + vq_loss
        adv = step >= t.get("adv_start", 0)
        if adv:
            g_adv = self.adversarial(self.disc(rec)[-1], target_is_real=True, for_discriminator=False)
            loss = loss + t.get("adv_weight", 0.05) * g_adv
        self.optims["net"].zero_grad()
        loss.backward()
        self.optims["net"].step()
        metrics = {"loss": loss.item(), "vq": vq_loss.item(), **{k: v.item() for k, v in terms.items()}}
        if adv:
            d_loss = (self.adversarial(self.disc(x)[-1], target_is_real=True, for_discriminator=True)
                      + self.adversarial(self.disc(rec.detach())[-1], target_is_real=False, for_discriminator=True))
            self.optims["disc"].zero_grad()
            d_loss.backward()
            self.optims["disc"].step()
            metrics["disc"] = d_loss.item()
        self.used[idx.flatten().unique()] = True
        if step % t.get("restart_every", 200) == 0 or step == 5:
            metrics["dead_codes"] = self.net.quantizer.restart_dead_codes(z.detach(), self.used)
            self.used[:] = False
        return metrics

    def extra_state(self) -> dict:
        return {"used": self.used.clone()}

    def load_extra_state(self, state: dict) -> None:
        self.used = state["used"]


@register_task("ldm")
class LDMTask(PhantomTask):
    """Conditional latent diffusion: eps-prediction UNet on concat[noisy soft latent, CXR latent]."""

    def __init__(self, cfg: dict, rng: np.random.Generator):
        super().__init__(cfg, rng)
        self.vqgan_path = model_path(cfg["vqgan"])
        self.vqgan = load_vqgan(self.vqgan_path)[0]
        self.net = build_noise_unet(cfg["model"])
        self.modules = {"net": self.net}
        self.optims = {"net": torch.optim.AdamW(self.net.parameters(), self.tcfg["lr"], weight_decay=0.0)}
        self.alphas = cosine_alphas_cumprod(cfg["diffusion"]["num_train_timesteps"]).float()
        self.zc, self.zs = self._latents()
        self.scale = float(1.0 / self.zc.std())

    @torch.no_grad()
    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        cache = Path(self.cfg["data"].get("cache_dir", "/tmp/medidiff-cache")).expanduser()
        stamp = self.vqgan_path.with_suffix(".safetensors").stat().st_mtime_ns
        path = cache / f"latents_{len(self.cxr)}_{stamp}.pt"
        if path.exists():
            return torch.load(path)
        out, threads = [], torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)  # one-off pass before the side-by-side training
        for arr in (self.cxr, self.soft):
            zs = [self.vqgan.encode(torch.from_numpy(np.asarray(arr[i:i + 32], np.float32))[:, None])
                  for i in tqdm(range(0, len(arr), 32), desc="encoding latents")]
            out.append(torch.cat(zs))
        torch.set_num_threads(threads)
        with atomic_write(path) as tmp:
            torch.save(tuple(out), tmp)
        return tuple(out)

    def step(self, step: int) -> dict:
        d = self.cfg["diffusion"]
        idx = torch.from_numpy(self.sample_idx())
        z0, cond = self.zs[idx] * self.scale, self.zc[idx] * self.scale
        if self.rng.random() < 0.5:  # augmentation: flipping both latents keeps the pair consistent
            z0, cond = z0.flip(-1), cond.flip(-1)
        t = torch.randint(0, d["num_train_timesteps"], (len(idx),))
        noise = offset_noise(z0, d.get("offset_noise", 0.1))
        a = self.alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(self.net(torch.cat([zt, cond], 1), t).sample, noise)
        self.optims["net"].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.optims["net"].step()
        return {"loss": loss.item()}

    def export_config(self) -> dict:
        return {"model": self.cfg["model"], "diffusion": self.cfg["diffusion"], "latent_scale": self.scale,
                "vqgan": self.vqgan_path.name, "sampling": self.cfg["sampling"],
                "resolution": int(self.cfg["data"]["size"])}

    def export_files(self) -> list[Path]:
        return [self.vqgan_path.with_suffix(".json"), self.vqgan_path.with_suffix(".safetensors")]


@register_task("regression")
class RegressionTask(PhantomTask):
    """Plain UNet regression CXR -> soft tissue (L1 + multi-scale SSIM loss)."""

    def __init__(self, cfg: dict, rng: np.random.Generator):
        super().__init__(cfg, rng)
        self.net = build_regression_unet(cfg["model"])
        self.modules = {"net": self.net}
        self.optims = {"net": torch.optim.Adam(self.net.parameters(), self.tcfg["lr"])}

    def step(self, step: int) -> dict:
        cxr, soft = random_crops((self.cxr, self.soft), self.sample_idx(), self.tcfg.get("crop"), self.rng)
        out = self.net(cxr)
        l1, ssim = (out - soft).abs().mean(), multiscale_ssim_loss(out, soft)
        loss = l1 + self.tcfg.get("ssim_weight", 0.2) * ssim
        self.optims["net"].zero_grad()
        loss.backward()
        self.optims["net"].step()
        return {"loss": loss.item(), "l1": l1.item(), "ssim": ssim.item()}
