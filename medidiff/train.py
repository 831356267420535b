"""Config-driven, resumable trainer for the bone-suppression models (VQ-GAN, LDM, regression UNet).

Usage: ``python -m medidiff.train configs/bone_suppression/vqgan.yaml`` (the ``medidiff train``
CLI calls :func:`train`). Checkpoints go to ``~/.cache/medidiff/runs/<name>/``; the final weights
(safetensors), a JSON config and the model card go to the config's ``export.dir``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from medidiff.diffusion.offset_noise import offset_noise
from medidiff.diffusion.sampling import cosine_alphas_cumprod
from medidiff.methods.bone_suppression import build_noise_unet, load_vqgan
from medidiff.methods.model_card import write_model_card
from medidiff.methods.regression_baseline import build_regression_unet
from medidiff.nets.vqgan import VQGAN, build_discriminator, multiscale_ssim_loss, reconstruction_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = Path.home() / ".cache" / "medidiff" / "runs"
LogFn = Callable[[int, dict], None]


def training_pairs(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(cxr, soft) float16 arrays (N,size,size) from the phantom's training seeds, cached as .npy."""
    gen = importlib.import_module(data.get("generator", "medidiff.datasets.chest_phantom"))
    n, size = int(data["n_train"]), int(data["size"])
    cache = Path(data.get("cache_dir", "/tmp/medidiff-cache")).expanduser()
    stem = f"{gen.__name__.rsplit('.', 1)[-1]}_{size}px_{n}"
    paths = {k: cache / f"{stem}_{k}.npy" for k in ("cxr", "soft")}
    if not all(p.exists() for p in paths.values()):
        cache.mkdir(parents=True, exist_ok=True)
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
            np.save(p.with_suffix(".tmp.npy"), out[k])
            p.with_suffix(".tmp.npy").replace(p)
    return tuple(np.load(paths[k], mmap_mode="r") for k in ("cxr", "soft"))


def _batch(arrays: tuple[np.ndarray, ...], idx: np.ndarray, crop: int | None, rng: np.random.Generator) -> list[torch.Tensor]:
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


class EMA:
    """Exponential moving average of a model's parameters (the exported weights)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = copy.deepcopy(model).eval(), decay
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            e.copy_(e * d + p * (1 - d)) if e.dtype.is_floating_point else e.copy_(p)


class _Job:
    """One training run: models, optimisers, a ``step`` function and what to export."""

    def __init__(self, cfg: dict):
        self.cfg, self.tcfg = cfg, cfg["train"]
        self.rng = np.random.default_rng(cfg.get("seed", 0))
        torch.manual_seed(cfg.get("seed", 0))
        self.cxr, self.soft = training_pairs(cfg["data"])
        self.modules: dict[str, torch.nn.Module] = {}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self.extra: dict = {}

    def sample_idx(self) -> np.ndarray:
        return self.rng.choice(len(self.cxr), self.tcfg["batch_size"], replace=False)

    def state(self) -> dict:
        return {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optims": {k: o.state_dict() for k, o in self.optims.items()},
                "ema": self.ema.model.state_dict(), "extra": self.extra, "rng": self.rng.bit_generator.state}

    def load(self, state: dict) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optims.items():
            o.load_state_dict(state["optims"][k])
        self.ema.model.load_state_dict(state["ema"])
        self.extra = state["extra"]
        self.rng.bit_generator.state = state["rng"]


class VQGANJob(_Job):
    """VQ-GAN on random crops of CXR and soft-tissue images (both share one compressor)."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        m = cfg["model"]
        self.net = VQGAN(m["channels"], m["latent_channels"], m["num_codes"])
        self.disc = build_discriminator(self.tcfg.get("disc_channels", 16))
        self.modules = {"net": self.net, "disc": self.disc}
        self.optims = {"net": torch.optim.Adam(self.net.parameters(), self.tcfg["lr"], betas=(0.5, 0.9)),
                       "disc": torch.optim.Adam(self.disc.parameters(), self.tcfg["lr"], betas=(0.5, 0.9))}
        self.ema = EMA(self.net, self.tcfg.get("ema", 0.999))
        self.used = torch.zeros(m["num_codes"], dtype=torch.bool)

    def step(self, step: int) -> dict:
        t = self.tcfg
        cxr, soft = _batch((self.cxr, self.soft), self.sample_idx(), t.get("crop"), self.rng)
        x = torch.cat([cxr, soft])
        rec, vq_loss, idx, z = self.net(x)
        terms = reconstruction_loss(rec, x, t["loss_weights"])
        loss = sum(terms.values()) + vq_loss
        adv = step >= t.get("adv_start", 0)
        if adv:
            g_adv = -self.disc(rec)[-1].mean()
            loss = loss + t.get("adv_weight", 0.05) * g_adv
        self.optims["net"].zero_grad()
        loss.backward()
        self.optims["net"].step()
        metrics = {"loss": loss.item(), "vq": vq_loss.item(), **{k: v.item() for k, v in terms.items()}}
        if adv:
            d_loss = F.relu(1 - self.disc(x)[-1]).mean() + F.relu(1 + self.disc(rec.detach())[-1]).mean()
            self.optims["disc"].zero_grad()
            d_loss.backward()
            self.optims["disc"].step()
            metrics["disc"] = d_loss.item()
        self.used[idx.flatten().unique()] = True
        if step % t.get("restart_every", 200) == 0 or step == 5:
            metrics["dead_codes"] = self.net.quantizer.restart_dead_codes(z.detach(), self.used)
            self.used[:] = False
        return metrics

    def export(self) -> tuple[dict, dict]:
        return self.ema.model.state_dict(), {"model": self.cfg["model"]}


class LDMJob(_Job):
    """Conditional latent diffusion: eps-prediction UNet on concat[noisy soft latent, CXR latent]."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.vqgan = load_vqgan(REPO_ROOT / cfg["vqgan"])
        self.net = build_noise_unet(cfg["model"])
        self.modules = {"net": self.net}
        self.optims = {"net": torch.optim.AdamW(self.net.parameters(), self.tcfg["lr"], weight_decay=0.0)}
        self.ema = EMA(self.net, self.tcfg.get("ema", 0.999))
        self.alphas = cosine_alphas_cumprod(cfg["diffusion"]["num_train_timesteps"]).float()
        self.zc, self.zs = self._latents()
        self.scale = float(1.0 / self.zc.std())

    @torch.no_grad()
    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        cache = Path(self.cfg["data"].get("cache_dir", "/tmp/medidiff-cache")).expanduser()
        sha = (REPO_ROOT / f"{self.cfg['vqgan']}.safetensors").stat().st_mtime_ns
        path = cache / f"latents_{len(self.cxr)}_{sha}.pt"
        if path.exists():
            return torch.load(path)
        out, threads = [], torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)  # one-off pass before the side-by-side training
        for arr in (self.cxr, self.soft):
            zs = [self.vqgan.encode(torch.from_numpy(np.asarray(arr[i:i + 32], np.float32))[:, None])
                  for i in tqdm(range(0, len(arr), 32), desc="encoding latents")]
            out.append(torch.cat(zs))
        torch.set_num_threads(threads)
        torch.save(tuple(out), path)
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

    def export(self) -> tuple[dict, dict]:
        return self.ema.model.state_dict(), {
            "model": self.cfg["model"], "diffusion": self.cfg["diffusion"], "latent_scale": self.scale,
            "vqgan": Path(self.cfg["vqgan"]).name, "sampling": self.cfg["sampling"],
            "resolution": int(self.cfg["data"]["size"])}


class RegressionJob(_Job):
    """Plain UNet regression CXR -> soft tissue (L1 + multi-scale SSIM loss)."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.net = build_regression_unet(cfg["model"])
        self.modules = {"net": self.net}
        self.optims = {"net": torch.optim.Adam(self.net.parameters(), self.tcfg["lr"])}
        self.ema = EMA(self.net, self.tcfg.get("ema", 0.999))

    def step(self, step: int) -> dict:
        cxr, soft = _batch((self.cxr, self.soft), self.sample_idx(), self.tcfg.get("crop"), self.rng)
        out = self.net(cxr)
        l1, ssim = (out - soft).abs().mean(), multiscale_ssim_loss(out, soft)
        loss = l1 + self.tcfg.get("ssim_weight", 0.2) * ssim
        self.optims["net"].zero_grad()
        loss.backward()
        self.optims["net"].step()
        return {"loss": loss.item(), "l1": l1.item(), "ssim": ssim.item()}

    def export(self) -> tuple[dict, dict]:
        return self.ema.model.state_dict(), {"model": self.cfg["model"]}


JOBS = {"vqgan": VQGANJob, "ldm": LDMJob, "regression": RegressionJob}


def train(config_path: str | Path, *, out_dir: str | Path | None = None, resume: bool = True,
          max_minutes: float | None = None, log: LogFn | None = None) -> Path:
    """Train the model described by ``config_path``; returns the exported weights path.

    Stops at ``train.max_steps`` or after ``max_minutes`` of training (argument, else the config's
    ``train.max_minutes``), counted over resumed runs too. Checkpoints every
    ``train.ckpt_minutes`` to ``out_dir`` (default ``~/.cache/medidiff/runs/<name>/``).
    """
    config_path = Path(config_path)
    cfg = yaml.safe_load(config_path.read_text())
    t = cfg["train"]
    torch.set_num_threads(int(cfg.get("threads", 2)))
    run_dir = Path(out_dir) if out_dir else RUNS_DIR / cfg["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    job = JOBS[cfg["kind"]](cfg)
    ckpt = run_dir / "checkpoint.pt"
    step, elapsed = 0, 0.0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        job.load(state)
        step, elapsed = state["step"], state["elapsed"]
    budget = 60 * (max_minutes if max_minutes is not None else t.get("max_minutes", math.inf))
    max_steps = t.get("max_steps", 10**9)

    def save() -> None:
        torch.save({**job.state(), "step": step, "elapsed": elapsed, "config": cfg}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    bar = tqdm(total=max_steps, initial=step, desc=cfg["name"], mininterval=5)
    last_ckpt, start, start_elapsed = time.monotonic(), time.monotonic(), elapsed
    history = job.extra.setdefault("history", [])
    while step < max_steps and elapsed < budget:
        metrics = job.step(step)
        job.ema.update(job.net, step)
        step += 1
        elapsed = start_elapsed + time.monotonic() - start
        bar.update()
        if step % t.get("log_every", 25) == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            history.append({"step": step, "minutes": round(elapsed / 60, 2), **metrics})
            if log:
                log(step, metrics)
        if time.monotonic() - last_ckpt > 60 * t.get("ckpt_minutes", 2):
            save()
            last_ckpt = time.monotonic()
    bar.close()
    save()
    return _export(cfg, job, step, elapsed, config_path)


def _export(cfg: dict, job: _Job, step: int, elapsed: float, config_path: Path) -> Path:
    export_dir = REPO_ROOT / cfg["export"]["dir"]
    export_dir.mkdir(parents=True, exist_ok=True)
    name = cfg["export"]["name"]
    weights, meta = job.export()
    path = export_dir / f"{name}.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}, path)  # fp16 on disk
    history = job.extra.get("history", [])
    meta["training"] = {
        "config": str(config_path), "steps": step, "minutes": round(elapsed / 60, 1),
        "threads": torch.get_num_threads(), "data": cfg["data"], "train": cfg["train"],
        "final_metrics": history[-1] if history else {},
    }
    (export_dir / f"{name}.json").write_text(json.dumps(meta, indent=2))
    write_model_card(export_dir)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m medidiff.train CONFIG [--max-minutes M] [--fresh] [--out-dir D]``."""
    p = argparse.ArgumentParser(prog="python -m medidiff.train", description=main.__doc__)
    p.add_argument("config")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--out-dir")
    a = p.parse_args(argv)
    print(train(a.config, out_dir=a.out_dir, resume=not a.fresh, max_minutes=a.max_minutes))


if __name__ == "__main__":
    main()
