"""Feature caching, structured pruning and real int8 on the shipped models: seconds per image and quality.

``python benchmarks/acceleration_caching.py bs_ldm [--images 4]`` (BS-LDM, 256x256 phantoms, DDPM 50
steps) or ``... TASK [--images 3] [--size 256]`` for a restoration task (``ct_denoise``: the ResShift
T=15 model; ``mr_sr2``, ``mr_sr4``, ``xray_sr4``: ResShift T=4) on the centre ``size`` x ``size`` of its
held-out images (``restoration_images.held_out_pairs``: slices and images of other patients);
``--per-call``, for any model: the CPU milliseconds of single model calls instead. Rows are timed as in
``benchmarks/acceleration.py`` (its ``run_all``: rows take turns image by image, the fastest image,
whole and inside the model function). Structured pruning's refit and int8 are calibrated on other images
(BS-LDM: validation phantoms; restoration: training patches), model inputs recorded every 5th step;
"inner channels" is the fraction of the residual blocks' inner channels that still run."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from acceleration import pairs, run_all, weights_kb  # benchmarks/acceleration.py, next to this script

from medidiff.acceleration import (
    ChannelPruning,
    DeepCache,
    FasterDiffusion,
    Int8Quantization,
    applied,
    record_model_inputs,
)
from medidiff.datasets import chest_phantom
from medidiff.datasets import restoration_images as images
from medidiff.methods.bone_suppression import BSLDM
from medidiff.methods.restoration import Restoration
from medidiff.metrics import psnr, ssim
from medidiff.resources import model_dir

PAPER_KEY_STEPS = [0, 1, 2, 3, 5, 10, 15, 25, 35]  # Faster Diffusion's key steps for 50-step SD sampling
RESTORATION_WEIGHTS = {"ct_denoise": "resshift15"}  # the weights measured per task (else ResShift T = 4)
RESTORATION_TASKS = ("ct_denoise", "mr_sr2", "mr_sr4", "xray_sr4")


def load(model: str, count: int, size: int = 256):
    """(method, test inputs, truths, calibration inputs) for ``model`` (restoration: centre crops of ``size``)."""
    if model == "bs_ldm":
        cxr, soft = pairs(list(chest_phantom.TEST_SEEDS)[:count])
        return BSLDM.from_pretrained(), cxr, soft, pairs(list(chest_phantom.VAL_SEEDS)[:2])[0]
    method = Restoration.from_pretrained(model_dir("restoration") / model, RESTORATION_WEIGHTS.get(model, "resshift"))
    held = [centre(clean, low, size) for _, clean, low in images.held_out_pairs(model) if min(clean.shape[-2:]) >= size]
    _, calibration = images.training_pairs(model, 2, 256, np.random.default_rng(0))
    return method, torch.cat([low for _, low in held[:count]]), torch.cat([clean for clean, _ in held[:count]]), calibration


def centre(clean: torch.Tensor, low: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre ``size`` x ``size`` of ``clean`` and the same region of its degraded ``low`` (SR: a
    scale times smaller, cut on its own grid)."""
    scale, low_size = clean.shape[-1] // low.shape[-1], size * low.shape[-1] // clean.shape[-1]
    top, left = ((d - low_size) // 2 for d in low.shape[-2:])
    return (clean[..., top * scale:(top + low_size) * scale, left * scale:(left + low_size) * scale],
            low[..., top:top + low_size, left:left + low_size])


def rows_for(model: str, calibration) -> dict[str, list]:
    cp = {s: ChannelPruning(s, calibration) for s in (0.125, 0.25, 0.5)}
    int8 = Int8Quantization(calibration)
    rows = {"baseline": [], **{f"DeepCache N={n}": [DeepCache(interval=n)] for n in (2, 3, 5)},
            "Faster Diffusion N=2": [FasterDiffusion(interval=2)], "Faster Diffusion N=3": [FasterDiffusion(interval=3)],
            "Faster Diffusion N=3, sequential decoding": [FasterDiffusion(interval=3, parallel=1)],
            "channel pruning 25 %, no refit": [ChannelPruning(0.25)],
            **{f"channel pruning {s:.1%} + refit": [t] for s, t in cp.items()},
            "DeepCache N=3 + channel pruning 25 % + refit": [DeepCache(interval=3), cp[0.25]],
            "DeepCache N=5 + channel pruning 25 % + refit": [DeepCache(interval=5), cp[0.25]],
            "Faster Diffusion N=3 + channel pruning 25 % + refit": [FasterDiffusion(interval=3), cp[0.25]],
            "int8 W7A8 (oneDNN kernels)": [int8], "DeepCache N=3 + int8": [DeepCache(interval=3), int8],
            "DeepCache N=5 + int8": [DeepCache(interval=5), int8]}
    if model == "bs_ldm":
        rows |= {"Faster Diffusion, paper's key steps (9 of 50)": [FasterDiffusion(key_steps=PAPER_KEY_STEPS)],
                 "Faster Diffusion N=3, prior noise 0.003": [FasterDiffusion(interval=3, noise_injection=0.003)]}
    else:
        rows |= {"DeepCache N=3, branch 1": [DeepCache(interval=3, branch=1)]}
    return rows


def per_call(model_fn, shape: tuple[int, ...], timesteps: list[int], rows: dict[str, list], repeats: int = 15) -> None:
    """CPU milliseconds (this thread's) of consecutive model calls at ``timesteps`` under each row, the
    fastest of ``repeats`` interleaved repetitions: the cost of a key, a cached and a batched step."""
    x, condition = torch.randn(shape), torch.randn(shape)
    best = {name: [float("inf")] * len(timesteps) for name in rows}
    with torch.no_grad():
        for _ in range(repeats):
            for name, transforms in rows.items():
                with applied(model_fn, *transforms):
                    for _ in range(2):  # the second run knows the timesteps (parallel decoding)
                        model_fn.reset_hooks()
                        for i, t in enumerate(timesteps):
                            start = time.thread_time()
                            model_fn(x, torch.tensor([t]), condition)
                            best[name][i] = min(best[name][i], 1000 * (time.thread_time() - start))
    full = sum(best["baseline"])
    print(f"| configuration | {' | '.join(f'call {i}' for i in range(len(timesteps)))} | sum | vs full |")
    print("|---|" + "---|" * (len(timesteps) + 2))
    for name, ms in best.items():
        print(f"| {name} | {' | '.join(f'{m:.1f}' for m in ms)} | {sum(ms):.1f} | {full / sum(ms):.2f}x |")


def per_call_rows(model: str, calibration) -> dict[str, list]:
    """The rows of ``--per-call``: caching, pruning and int8 alone and combined."""
    int8 = Int8Quantization(calibration)
    rows = {"baseline": [], "DeepCache N=3": [DeepCache(interval=3)], "DeepCache N=5": [DeepCache(interval=5)],
            "int8 W7A8": [int8], "DeepCache N=3 + int8": [DeepCache(interval=3), int8],
            "DeepCache N=5 + int8": [DeepCache(interval=5), int8],
            **{f"channel pruning {s:.0%}": [ChannelPruning(s)] for s in (0.25, 0.5)}}
    if model == "bs_ldm":
        rows |= {"Faster Diffusion N=3, parallel": [FasterDiffusion(interval=3)],
                 "Faster Diffusion N=3, sequential": [FasterDiffusion(interval=3, parallel=1)]}
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", choices=["bs_ldm", *RESTORATION_TASKS])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=256, help="restoration: the centre crop's size (256 or 512)")
    p.add_argument("--rows", help="only rows whose name contains one of these, separated by ';' (and the baseline)")
    p.add_argument("--per-call", action="store_true", help="the CPU time of single model calls instead")
    p.add_argument("--repeats", type=int, default=15, help="--per-call: interleaved repetitions (the fastest counts)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    method, inputs, truth, cal_inputs = load(a.model, a.images, a.size)
    start = time.perf_counter()
    calibration = record_model_inputs(method.model_fn, lambda: [method(x) for x in cal_inputs.split(1)], every=5)
    calibration_seconds = time.perf_counter() - start
    if a.per_call:  # the first six timesteps of the model's sampler; BS-LDM: latents of a 512x512 image
        run = record_model_inputs(method.model_fn, lambda: method(cal_inputs[:1]), every=1)
        timesteps = [int(t) for _, t, _ in run.inputs][:6]
        shape = (1, 4, 64, 64) if a.model == "bs_ldm" else (1, 1, a.size, a.size)
        return per_call(method.model_fn, shape, timesteps, per_call_rows(a.model, calibration), a.repeats)
    rows = rows_for(a.model, calibration)
    if a.rows:
        rows = {n: t for n, t in rows.items() if n == "baseline" or any(w in n for w in a.rows.split(";"))}
    results = run_all(method, inputs, rows)
    base, base_s, base_model_s = results["baseline"]
    kept = {}
    for name, transforms in rows.items():
        with applied(method.model_fn, *transforms):
            kept[name] = ChannelPruning.kept_fraction(method.model_fn)
    print(f"{a.model}: {len(inputs)} held-out images {tuple(inputs.shape[-2:])}, threads={a.threads}; calibration "
          f"{len(calibration.inputs)} model inputs ({calibration_seconds:.0f} s)")
    int8 = next((t for transforms in rows.values() for t in transforms if isinstance(t, Int8Quantization)), None)
    if int8 is not None:
        float_kb = sum(p.numel() for p in method.model_fn.parameters()) * 4 / 1024
        print(f"int8 file {weights_kb(int8):.0f} kB, float32 parameters {float_kb:.0f} kB")
    print()
    print("| configuration | s / image | speed-up | model s / image | model speed-up | inner channels "
          "| PSNR vs baseline (dB) | PSNR vs truth (dB) | SSIM vs truth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (out, seconds, model_s) in results.items():
        vs_base = "exact" if torch.equal(out, base) else f"{psnr(out, base).mean():.2f}"
        print(f"| {name} | {seconds:.2f} | {base_s / seconds:.2f}x | {model_s:.2f} | {base_model_s / model_s:.2f}x | "
              f"{kept[name]:.0%} | {vs_base} | {psnr(out, truth).mean():.2f} | {ssim(out, truth).mean():.4f} |")


if __name__ == "__main__":
    main()
