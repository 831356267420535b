"""Training tasks of bone suppression: ``kind: vqgan``, ``kind: ldm`` (BS-LDM) and ``kind: regression``.

All three train on pairs (CXR, soft tissue) from one or more generators (``data.sources``: the
real-CT DRR generator, the chest phantom, ...), each made from its TRAIN_SEEDS and cached as .npy
(:func:`training_pairs`); the pairs are then held on the training device.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
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
SOURCE_KEYS = ("generator", "n_train")  # other keys of a source are passed to its make_batch


def data_sources(data: dict) -> list[dict]:
    """``data.sources``, or the single generator of older configs (``data.generator``/``n_train``)."""
    if "sources" in data:
        return list(data["sources"])
    return [{"generator": data.get("generator", "medidiff.datasets.chest_phantom"), "n_train": data["n_train"]}]


def source_stem(source: dict, size: int) -> str:
    """Cache name of one source's pairs: generator, options, size and count."""
    options = {k: v for k, v in source.items() if k not in SOURCE_KEYS}
    tag = "".join(f"_{k}-{v}" for k, v in sorted(options.items()))
    return f"{source['generator'].rsplit('.', 1)[-1]}{tag}_{size}px_{int(source['n_train'])}"


def generate_pairs(source: dict, size: int, cache: Path, workers: int, device: str) -> tuple[np.ndarray, ...]:
    """(cxr, soft) float16 (N,size,size) of one source's first ``n_train`` TRAIN_SEEDS, cached as .npy.

    Each of ``workers`` processes runs one thread. A generator whose ``make_batch`` takes ``device``
    renders there (workers are then spawned, not forked); the cache name holds the source's
    options, never the device.
    """
    gen = importlib.import_module(source["generator"])
    n = int(source["n_train"])
    options = {k: v for k, v in source.items() if k not in SOURCE_KEYS}
    stem = source_stem(source, size)
    paths = {k: cache / f"{stem}_{k}.npy" for k in ("cxr", "soft")}
    if not all(p.exists() for p in paths.values()):
        if "device" in inspect.signature(gen.make_batch).parameters:
            options["device"] = device
        seeds = list(gen.TRAIN_SEEDS)[:n]
        out = {k: np.empty((n, size, size), np.float16) for k in paths}
        chunk = 25
        starts = range(0, n, chunk)
        context = multiprocessing.get_context("fork" if device == "cpu" else "spawn")
        with ProcessPoolExecutor(max(1, min(workers, len(starts))), mp_context=context,
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            batches = [pool.submit(gen.make_batch, seeds[i:i + chunk], size, **options) for i in starts]
            for i, batch in zip(tqdm(starts, desc=f"generating {n} {stem} pairs"), batches, strict=True):
                for k in out:
                    out[k][i:i + chunk] = batch.result()[k]
        for k, p in paths.items():
            with atomic_write(p) as tmp, open(tmp, "wb") as f:
                np.save(f, out[k])
    return tuple(np.load(paths[k], mmap_mode="r") for k in ("cxr", "soft"))


def training_pairs(data: dict, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(cxr, soft) float16 arrays (N,size,size): every source of ``data`` in turn (see :func:`data_sources`)."""
    cache = Path(data.get("cache_dir", "/tmp/medidiff-cache")).expanduser()
    workers = int(data.get("workers", 2))
    parts = [generate_pairs(s, int(data["size"]), cache, workers, device) for s in data_sources(data)]
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(2))


def random_crops(arrays: tuple[torch.Tensor, ...], idx: torch.Tensor, crop: int | None,
                 rng: np.random.Generator) -> list[torch.Tensor]:
    """Same random crop (and horizontal flip) of every (N,size,size) tensor at ``idx``, as (B,1,c,c) float32."""
    size = arrays[0].shape[-1]
    c = crop or size
    y, x = (int(v) for v in rng.integers(0, size - c + 1, 2))
    flip = rng.random() < 0.5
    out = []
    for a in arrays:
        t = a[idx, y:y + c, x:x + c].float()[:, None]
        out.append(t.flip(-1) if flip else t)
    return out


def model_path(spec: str) -> Path:
    """A model file stem from a config: as given if it exists there (absolute or from the working
    folder), else relative to the source checkout (configs name ``models/bone_suppression/vqgan``)."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() or path.with_suffix(".json").exists() else REPO_ROOT / path


class PairTask(TrainingTask):
    """Tasks on (CXR, soft tissue) pairs: ``self.cxr``/``self.soft`` (float16 on the device) and a batch sampler."""

    def __init__(self, cfg: dict, rng: np.random.Generator, device: torch.device):
        super().__init__(cfg, rng, device)
        self.cxr, self.soft = (torch.from_numpy(np.array(a)).to(device)
                               for a in training_pairs(cfg["data"], str(device)))

    def sample_idx(self) -> torch.Tensor:
        idx = np.sort(self.rng.choice(len(self.cxr), self.tcfg["batch_size"], replace=False))
        return torch.from_numpy(idx).to(self.device)


@register_task("vqgan")
class VQGANTask(PairTask):
    """VQ-GAN on random crops of CXR and soft-tissue images (both share one compressor)."""

    def __init__(self, cfg: dict, rng: np.random.Generator, device: torch.device):
        super().__init__(cfg, rng, device)
        m = cfg["model"]
        self.net = VQGAN.from_config(m).to(device)
        self.disc = build_discriminator(self.tcfg.get("disc_channels", 16)).to(device)
        self.adversarial = PatchAdversarialLoss(criterion="hinge")
        self.modules = {"net": self.net, "disc": self.disc}
        self.optims = {"net": torch.optim.Adam(self.net.parameters(), self.tcfg["lr"], betas=(0.5, 0.9)),
                       "disc": torch.optim.Adam(self.disc.parameters(), self.tcfg["lr"], betas=(0.5, 0.9))}
        self.used = torch.zeros(m["num_codes"], dtype=torch.bool, device=device)

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
        self.used = state["used"].to(self.device)


@register_task("ldm")
class LDMTask(PairTask):
    """Conditional latent diffusion: eps-prediction UNet on concat[noisy soft latent, CXR latent]."""

    def __init__(self, cfg: dict, rng: np.random.Generator, device: torch.device):
        super().__init__(cfg, rng, device)
        self.vqgan_path = model_path(cfg["vqgan"])
        self.vqgan = load_vqgan(self.vqgan_path)[0].to(device)
        self.net = build_noise_unet(cfg["model"]).to(device)
        self.modules = {"net": self.net}
        self.optims = {"net": torch.optim.AdamW(self.net.parameters(), self.tcfg["lr"], weight_decay=0.0)}
        self.alphas = cosine_alphas_cumprod(cfg["diffusion"]["num_train_timesteps"]).float().to(device)
        self.zc, self.zs = self._latents()
        self.scale = float(1.0 / self.zc.std())

    @torch.no_grad()
    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        cache = Path(self.cfg["data"].get("cache_dir", "/tmp/medidiff-cache")).expanduser()
        stamp = self.vqgan_path.with_suffix(".safetensors").stat().st_mtime_ns
        size = int(self.cfg["data"]["size"])
        sources = "+".join(source_stem(s, size) for s in data_sources(self.cfg["data"]))
        path = cache / f"latents_{sources}_{stamp}.pt"
        if path.exists():
            return tuple(z.to(self.device) for z in torch.load(path))
        out, threads = [], torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)  # one-off pass before the side-by-side training
        for arr in (self.cxr, self.soft):
            zs = [self.vqgan.encode(arr[i:i + 32].float()[:, None]) for i in tqdm(range(0, len(arr), 32),
                                                                                 desc="encoding latents")]
            out.append(torch.cat(zs))
        torch.set_num_threads(threads)
        with atomic_write(path) as tmp:
            torch.save(tuple(z.cpu() for z in out), tmp)
        return tuple(out)

    def step(self, step: int) -> dict:
        d = self.cfg["diffusion"]
        idx = self.sample_idx()
        z0, cond = self.zs[idx] * self.scale, self.zc[idx] * self.scale
        if self.rng.random() < 0.5:  # augmentation: flipping both latents keeps the pair consistent
            z0, cond = z0.flip(-1), cond.flip(-1)
        t = torch.randint(0, d["num_train_timesteps"], (len(idx),), device=self.device)
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
class RegressionTask(PairTask):
    """Plain UNet regression of the bone layer: soft tissue = CXR - net(CXR) (L1 + multi-scale SSIM loss)."""

    def __init__(self, cfg: dict, rng: np.random.Generator, device: torch.device):
        super().__init__(cfg, rng, device)
        self.net = build_regression_unet(cfg["model"]).to(device)
        self.modules = {"net": self.net}
        self.optims = {"net": torch.optim.Adam(self.net.parameters(), self.tcfg["lr"])}

    def step(self, step: int) -> dict:
        cxr, soft = random_crops((self.cxr, self.soft), self.sample_idx(), self.tcfg.get("crop"), self.rng)
        out = cxr - self.net(cxr)
        l1, ssim = (out - soft).abs().mean(), multiscale_ssim_loss(out, soft)
        loss = l1 + self.tcfg.get("ssim_weight", 0.2) * ssim
        self.optims["net"].zero_grad()
        loss.backward()
        self.optims["net"].step()
        return {"loss": loss.item(), "l1": l1.item(), "ssim": ssim.item()}

    def export_config(self) -> dict:
        return {"model": self.cfg["model"], "predicts": "bone_layer"}


def main(argv: list[str] | None = None) -> None:
    """``python -m medidiff.methods.bone_suppression_training CONFIG... [--device D]``: generate (and
    cache) the training pairs of every config, before several trainings start side by side."""
    import argparse

    from medidiff.train import load_config

    p = argparse.ArgumentParser(prog="python -m medidiff.methods.bone_suppression_training", description=main.__doc__)
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--device", default="cpu", help="where DRR rays are marched: cpu (default) or cuda")
    a = p.parse_args(argv)
    for path in a.configs:
        cxr, _ = training_pairs(load_config(path)["data"], a.device)
        print(f"{path}: {len(cxr)} pairs")


if __name__ == "__main__":
    main()
