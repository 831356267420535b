"""The DiT methods on the shipped CT-denoising DiT: seconds per 512x512 image and quality.

``python benchmarks/acceleration_dit.py [--images 2] [--threads 1] [--rows NAME;NAME]``. The ResShift
T=15 DiT (``models/restoration/ct_denoise/resshift15_dit``) denoises the 512x512 held-out slices of
other patients (``restoration_images.held_out_pairs``) plain and under Delta-DiT, profiled selective
block caching and Bottleneck Sampling; rows are timed as in ``benchmarks/acceleration.py`` (its
``run_all``: rows take turns image by image, the fastest image, whole and inside the model function),
the speed-ups are against the DiT baseline of this run. The selective cache's blocks and start come
from :func:`~medidiff.acceleration.block_changes` on 128x128 training patches (not the test images).
The U-Net ResShift T=15 (``resshift15``) is timed after the DiT rows on the same images, for reference.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from acceleration import run_all  # benchmarks/acceleration.py, next to this script

from medidiff.acceleration import BottleneckSampling, DeltaDiT, block_changes, profiled_block_cache
from medidiff.datasets import restoration_images as images
from medidiff.methods.restoration import Restoration
from medidiff.metrics import psnr, ssim
from medidiff.resources import model_dir


def profile(method: Restoration, patches: torch.Tensor) -> torch.Tensor:
    """Mean :func:`block_changes` over the patches (one sampling run each)."""
    return torch.stack([block_changes(method.model_fn, lambda p=p: method.restore(p[None])) for p in patches]).mean(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", help="only rows whose name contains one of these, separated by ';' (and the baseline)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    folder = model_dir("restoration") / "ct_denoise"
    dit, unet = Restoration.from_pretrained(folder, "resshift15_dit"), Restoration.from_pretrained(folder, "resshift15")
    held = [(clean, noisy) for _, clean, noisy in images.held_out_pairs("ct_denoise") if clean.shape[-1] == 512]
    truth, inputs = (torch.cat(t) for t in zip(*held[:a.images], strict=True))
    _, patches = images.training_pairs("ct_denoise", 3, 128, np.random.default_rng(0))
    changes = profile(dit, patches)
    selective = profiled_block_cache(changes, count=3, interval=2)
    rows = {"baseline": [],
            "Delta-DiT N=2, 3 of 6 blocks": [DeltaDiT(interval=2, cached=3)],
            "Delta-DiT N=3, 3 of 6 blocks": [DeltaDiT(interval=3, cached=3)],
            f"profiled selective cache N=2, blocks {sorted(selective.blocks)} from call {selective.start}": [selective],
            "Bottleneck Sampling 1/2, shifted timesteps": [BottleneckSampling(factor=2)],
            "Bottleneck Sampling 1/2, timesteps not shifted": [BottleneckSampling(factor=2, shift=1.0)],
            "Bottleneck Sampling 1/2 + Delta-DiT N=2, 3 blocks": [BottleneckSampling(factor=2),
                                                                   DeltaDiT(interval=2, cached=3)]}
    if a.rows:
        rows = {n: t for n, t in rows.items() if n == "baseline" or any(w in n for w in a.rows.split(";"))}
    results = run_all(dit, inputs, rows)
    results["U-Net ResShift T=15 (reference, timed after)"] = run_all(unet, inputs, {"unet": []})["unet"]
    base, base_s, base_model_s = results["baseline"]
    print(f"ct_denoise DiT: {len(inputs)} held-out images {tuple(inputs.shape[-2:])}, threads={a.threads}")
    print("block delta change per call (mean over the profiled calls), blocks 0..5: "
          + ", ".join(f"{v:.3f}" for v in changes.mean(0).tolist()))
    print("per call (mean over blocks): " + ", ".join(f"{v:.3f}" for v in changes.mean(1).tolist()) + "\n")
    print("| configuration | s / image | speed-up | model s / image | model speed-up | PSNR vs baseline (dB) "
          "| SSIM vs baseline | PSNR vs truth (dB) | SSIM vs truth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (out, seconds, model_s) in results.items():
        vs_base = "exact" if torch.equal(out, base) else f"{psnr(out, base).mean():.2f}"
        print(f"| {name} | {seconds:.2f} | {base_s / seconds:.2f}x | {model_s:.2f} | {base_model_s / model_s:.2f}x | "
              f"{vs_base} | {ssim(out, base).mean():.4f} | {psnr(out, truth).mean():.2f} | {ssim(out, truth).mean():.4f} |")


if __name__ == "__main__":
    main()
