"""Acceleration transforms on the shipped BS-LDM: seconds per 256x256 image and quality.

``python benchmarks/acceleration.py [--images 8] [--threads 1] [--model models/bone_suppression]``.
Held-out phantom pairs (``chest_phantom.TEST_SEEDS``) go through the method (VQ-GAN encode, the
model's sampler, decode) with each transform applied to ``method.model_fn``. Every row is timed in
this run (rows take turns image by image; the fastest image, whole and inside the model function)
and compared with the untransformed output (same seed) and with the true soft-tissue image.
Quantization is calibrated on validation pairs (``VAL_SEEDS``, model inputs recorded every 5th
sampling step), and the profiled DeepCache schedule is measured on the same pairs. ``PostTrainingQuantization``,
FP8/FP4 and MixDQ rows are fake quantization (float kernels): they show quality and storage (the weights
column: Conv/Linear weights as float16, as shipped, or the quantization file of codes and ranges), not
speed; the int8 rows run real int8 kernels (their weights column is the whole self-contained file). A
second table times single model calls in thread CPU time, rows taking turns call by call (fastest of
30): steadier than wall times of whole images on a CPU shared with other jobs. ``--rows`` picks rows by name.
CacheQuant, EfficientDM and QuEST (fake quantization too) are calibrated on whole sampling runs of
``--run-images`` validation pairs (every step recorded); their making (dynamic programming and
correction fits, distillation) happens at the warm-up and is not timed. "peak memory" is the resident
memory's peak growth during one image of the row (sampled RSS, :func:`peak_memory_mb`), the weights
column the file each transform writes (float16 Conv/Linear weights for rows without one).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from medidiff.acceleration import (
    CacheQuant,
    DeepCache,
    EfficientDM,
    FloatWeightQuantization,
    GroupQuantization,
    Int8Quantization,
    MagnitudePruning,
    PostTrainingQuantization,
    QuEST,
    applied,
    record_model_inputs,
)
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.mixed_precision import layer_sensitivity, mixed_bits
from medidiff.acceleration.profiling import feature_changes, profiled_refresh_steps
from medidiff.datasets import chest_phantom
from medidiff.methods.bone_suppression import BSLDM, MODELS_DIR
from medidiff.metrics import psnr, ssim


def pairs(seeds: list[int], size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(cxr, soft) phantom batches (N, 1, size, size)."""
    batch = chest_phantom.make_batch(seeds, size)
    return torch.from_numpy(batch["cxr"])[:, None], torch.from_numpy(batch["soft"])[:, None]


def run_all(method: BSLDM, cxr: torch.Tensor, rows: dict[str, list]) -> dict[str, tuple[torch.Tensor, float, float]]:
    """Per row: outputs (N, 1, H, W) and the fastest image's seconds, whole and inside the model
    function. Rows take turns image by image (after one warm-up call each, which also quantizes), so
    that load from other jobs on a shared CPU hits all rows alike; all images cost the same, and the
    minimum damps that load further."""
    started, in_model = [], [0.0]
    hooks = [method.model_fn.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
             method.model_fn.register_forward_hook(
                 lambda *_: in_model.__setitem__(0, in_model[0] + time.perf_counter() - started.pop()))]
    outs, seconds, model_seconds = ({name: [] for name in rows} for _ in range(3))
    try:
        for transforms in rows.values():
            with applied(method.model_fn, *transforms):
                method(cxr[:1])
        for image in cxr.split(1):
            for name, transforms in rows.items():
                with applied(method.model_fn, *transforms):
                    in_model[0] = 0.0
                    start = time.perf_counter()
                    outs[name].append(method(image))
                    seconds[name].append(time.perf_counter() - start)
                    model_seconds[name].append(in_model[0])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (torch.cat(outs[name]), min(seconds[name]), min(model_seconds[name])) for name in rows}


def quantization_rows(method: BSLDM, calibration, adaround_iters: int, wanted: set[str] | None) -> dict[str, list]:
    """Real int8 (oneDNN kernels; its weights column is the whole self-contained file), with and without
    the temporal feature cache and with DeepCache; simulated FP8/FP4 weights (round to nearest or
    AdaRound), DGQ-style grouped 4-bit weights with outliers, and MixDQ-style 4/8-bit weights at 6 bits
    per weight on average (its per-layer sensitivity is measured only when the row is ``wanted``)."""
    int8 = Int8Quantization(calibration)
    mixdq = "MixDQ W4/W8 at 6 bits, A8 (fake)"
    bits = {}
    if wanted is None or mixdq in wanted:
        bits = mixed_bits(method.model_fn, layer_sensitivity(method.model_fn, calibration, bits=4), budget=6)
    return {"int8 W7A8 (oneDNN kernels)": [int8],
            "int8 W7A8, no temporal cache": [Int8Quantization(calibration, temporal_cache=False)],
            "DeepCache N=3 + int8": [DeepCache(interval=3), int8],
            "FP8 weights (fake, nearest)": [FloatWeightQuantization("fp8")],
            "FP4 weights (fake, nearest)": [FloatWeightQuantization("fp4")],
            "FP4 weights (fake, AdaRound)": [FloatWeightQuantization("fp4", calibration, iters=adaround_iters)],
            mixdq: [PostTrainingQuantization(calibration, 4, 8, head_stem_bits=None, layer_bits=bits)],
            "W4 groups of 16, 0.5 % outliers (fake)": [GroupQuantization(4, 16, 0.005)]}


def unet_call_ms(method: BSLDM, calibration, rows: dict[str, list], rounds: int = 30) -> dict[str, float]:
    """CPU milliseconds (this thread's) per model call at one recorded input, per row: rows take turns
    call by call and the fastest of ``rounds`` counts. Thread CPU time leaves out the waits while
    other jobs hold the shared cores, which make wall times of the same work scatter by tens of %."""
    x, t, condition = calibration.inputs[len(calibration.inputs) // 2]
    best = dict.fromkeys(rows, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):
            for name, transforms in rows.items():
                with applied(method.model_fn, *transforms):
                    method.model_fn(x, t, condition)  # the temporal cache is filled, as after the first image
                    start = time.thread_time()
                    method.model_fn(x, t, condition)
                    best[name] = min(best[name], time.thread_time() - start)
    return {name: 1000 * s for name, s in best.items()}


def weights_kb(transform) -> float | None:
    """Storage of a transform's weights: the file it writes (None for transforms without one)."""
    if not hasattr(transform, "save"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return transform.save(Path(tmp) / "q.safetensors").stat().st_size / 1024


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(run) -> int:
    """Bytes by which the resident memory peaks above its level at the start while ``run()`` runs
    (sampled every 2 ms; freed heap returned to the system first with glibc's ``malloc_trim``)."""
    trim = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    if trim is not None:
        trim(0)
    start, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], rss_bytes()) - start)


def peak_memory_mb(method: BSLDM, image: torch.Tensor, rows: dict[str, list]) -> dict[str, float]:
    """Per row: :func:`peak_rss_growth` of one image (MB), the transforms applied before it starts: the
    working memory of sampling (activations, caches, weights made per call). The weights kept resident
    (the float model and a transform's stored copies, made at the warm-up) are not in it."""
    peaks = {}
    for name, transforms in rows.items():
        with applied(method.model_fn, *transforms):
            peaks[name] = peak_rss_growth(lambda: method(image)) / 2**20
    return peaks


def finetuned_rows(method: BSLDM, runs, iters: int) -> dict[str, list]:
    """CacheQuant (dynamic-programming schedule of 17 refreshes = DeepCache N=3's count, with and without
    its error correction), EfficientDM and QuEST (``iters`` distillation steps), calibrated on ``runs``:
    whole sampling runs recorded at every step."""
    cq8, cq4 = CacheQuant(runs, 17, 8, 8), CacheQuant(runs, 17, 4, 8)
    cq4_plain = CacheQuant(runs, 17, 4, 8, correct=False)
    return {"CacheQuant W8A8, 17 refreshes (fake)": [cq8],
            "CacheQuant W4A8, 17 refreshes, no correction (fake)": [cq4_plain],
            "CacheQuant W4A8, 17 refreshes (fake)": [cq4],
            "DeepCache N=3 + W4A8": [DeepCache(interval=3), PostTrainingQuantization(runs_every(runs, 5), 4, 8)],
            f"EfficientDM W4A8, {iters} steps (fake)": [EfficientDM(runs, 4, 8, rank=4, iters=iters)],
            f"QuEST W4A8, {iters} steps (fake)": [QuEST(runs, 4, 8, sensitive=4, iters=iters)]}


def runs_every(runs, every: int):
    """Every ``every``-th input of ``runs`` (a calibration set of whole runs)."""
    return type(runs)(runs.inputs[::every])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=8, help="held-out test pairs")
    p.add_argument("--calibration-images", type=int, default=4, help="validation pairs for quantization")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=str(MODELS_DIR), help="BS-LDM folder (ldm.json + vqgan.json)")
    p.add_argument("--adaround-iters", type=int, default=100, help="AdaRound steps per layer")
    p.add_argument("--rows", help="only these rows, by name, separated by ';' (the baseline always runs)")
    p.add_argument("--run-images", type=int, default=2,
                   help="validation pairs whose whole sampling runs calibrate CacheQuant, EfficientDM and QuEST")
    p.add_argument("--finetune-iters", type=int, default=200, help="EfficientDM / QuEST distillation steps")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    method = BSLDM.from_pretrained(a.model)
    cxr, soft = pairs(list(chest_phantom.TEST_SEEDS)[:a.images])
    cal_cxr, _ = pairs(list(chest_phantom.VAL_SEEDS)[:a.calibration_images])
    start = time.perf_counter()
    calibration = record_model_inputs(method.model_fn, lambda: [method(x) for x in cal_cxr.split(1)], every=5)
    calibration_seconds = time.perf_counter() - start
    w8, w4 = PostTrainingQuantization(calibration, 8, 8), PostTrainingQuantization(calibration, 4, 8)
    runs = record_model_inputs(method.model_fn, lambda: [method(x) for x in cal_cxr[:a.run_images].split(1)], every=1)
    steps = method.default_steps
    wanted = {"baseline", *a.rows.split(";")} if a.rows else None
    profiled = [0]
    if wanted is None or "DeepCache N=3, profiled" in wanted:
        # profiled schedule: the reused feature's step-to-step change, averaged over the validation pairs
        changes = torch.tensor([feature_changes(method.model_fn, lambda x=x: method(x))
                                for x in cal_cxr.split(1)]).mean(0)
        profiled = profiled_refresh_steps(changes.tolist(), -(-steps // 3))
    rows = {"baseline": [], **{f"DeepCache N={n}": [DeepCache(interval=n)] for n in (2, 3, 5)},
            "DeepCache N=3, non-uniform (center 15)": [DeepCache(interval=3, center=15, steps=steps)],
            "DeepCache N=3, profiled": [DeepCache(refresh_steps=profiled)],
            "W8A8 (fake quant)": [w8], "W4A8 (fake quant)": [w4],
            "W4A8, conv_in/conv_out 4-bit too": [PostTrainingQuantization(calibration, 4, 8, head_stem_bits=None)],
            **{f"pruning {p} %": [MagnitudePruning(p / 100)] for p in (10, 30, 50)},
            "DeepCache N=3 + W8A8": [DeepCache(interval=3), w8], **quantization_rows(method, calibration, a.adaround_iters, wanted),
            **finetuned_rows(method, runs, a.finetune_iters)}
    rows = {name: t for name, t in rows.items() if wanted is None or name in wanted}
    results = run_all(method, cxr, rows)
    # storage of the Conv/Linear weights: float16 as shipped, or the quantization file (codes + ranges)
    float_kb = sum(2 * m.weight.numel() for m in weight_layers(method.model_fn).values()) / 1024
    kb = {id(t): weights_kb(t) for transforms in rows.values() for t in transforms}
    memory = peak_memory_mb(method, cxr[:1], rows)
    base, base_s, base_model_s = results["baseline"]
    all_kb = sum(p.numel() for p in method.model_fn.parameters()) / 1024
    print(f"UNet parameters: {4 * all_kb:.0f} kB as float32, {2 * all_kb:.0f} kB as float16")
    print(f"BS-LDM {a.model}: {method.default_method.upper()} {steps} steps, 256x256, "
          f"{a.images} test phantoms, threads={a.threads}; calibration {len(calibration.inputs)} inputs over "
          f"{len(calibration.timesteps)} timesteps ({calibration_seconds:.0f} s); profiled refresh steps {profiled}\n")
    print("| configuration | s / image | speed-up | UNet s / image | UNet speed-up | weights (kB) | peak memory (MB) "
          "| PSNR vs baseline (dB) | SSIM vs baseline | PSNR vs truth (dB) | SSIM vs truth |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (out, seconds, model_s) in results.items():
        vs_base = "exact" if torch.equal(out, base) else f"{psnr(out, base).mean():.2f}"
        size = next((kb[id(t)] for t in rows[name] if kb[id(t)] is not None), float_kb)
        print(f"| {name} | {seconds:.2f} | {base_s / seconds:.2f}x | {model_s:.2f} | {base_model_s / model_s:.2f}x | "
              f"{size:.0f} | {memory[name]:.0f} | {vs_base} | "
              f"{ssim(out, base).mean():.4f} | {psnr(out, soft).mean():.2f} | {ssim(out, soft).mean():.4f} |")
    per_call = {name: t for name, t in rows.items() if not any(isinstance(x, DeepCache | CacheQuant) for x in t)}
    ms = unet_call_ms(method, calibration, per_call)
    print("\n| configuration | CPU ms / UNet call (fastest of 30, interleaved) | UNet call speed-up |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {ms['baseline'] / value:.2f}x |")


if __name__ == "__main__":
    main()
