"""Held-out CS reconstruction table for the model card: every method at every ratio and acceleration.

``python -m medidiff.evaluation.cs_held_out [--size 256] [--ddnm-steps 100] [--models DIR]`` measures
the fixed held-out images (:func:`medidiff.datasets.cs_images.held_out_images`: real MR and CT of
other patients and natural images, never trained on) with block CS at 1/4/10/30/50 % and single-coil
Cartesian MRI at 4x/8x (random and equispaced masks), reconstructs them with zero-filled, FISTA-TV,
DDNM and IDM (:class:`medidiff.methods.cs_reconstruction.CSReconstruction`), and writes mean PSNR/SSIM
and CPU seconds per image (one thread) to ``eval_held_out.json`` / ``.md`` in the model folder (card refreshed).
``--methods`` / ``--kinds`` re-measure a subset: the other rows are kept from the folder's existing table
(when it was measured at the same size and DDNM steps).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from medidiff.datasets.cs_images import held_out_images, held_out_names
from medidiff.io.atomic import atomic_write
from medidiff.methods.cs_reconstruction import METHODS, CSReconstruction, make_operator
from medidiff.metrics import psnr, ssim
from medidiff.resources import model_dir

SETTINGS: dict[str, dict] = {
    **{f"block CS {round(r * 100)} %": {"kind": "block_cs", "ratio": r} for r in (0.01, 0.04, 0.10, 0.30, 0.50)},
    **{f"MRI {a}x {m}": {"kind": "cartesian_mri", "acceleration": a, "mask": m}
       for a in (4, 8) for m in ("random", "equispaced")},
}
# FISTA-TV's lambda, chosen on training images (0.003; 0.01 at block CS 1 %, see medidiff.methods.classical_cs)
TV_WEIGHT = {"block CS 1 %": 0.01}
LABELS = {"zero_filled": "zero-filled / A^+ y", "fista_tv": "FISTA-TV (100 it.)", "ddnm": "DDNM ({steps} steps)",
          "idm": "IDM (3 steps)"}


_WORKER: dict = {}


def _load(folder: Path, size: int) -> None:
    """Load the models and the held-out images once per (worker) process; one torch thread each."""
    torch.set_num_threads(1)
    _WORKER.update(models=CSReconstruction(folder), images=held_out_images(size), size=size)


def _score(setting: str, spec: dict, method: str, ddnm_steps: int) -> dict:
    """One (setting, method) row over the held-out images loaded by :func:`_load`."""
    size, scores, seconds = _WORKER["size"], [], 0.0
    for i, (_, x) in enumerate(_WORKER["images"]):
        seed = i if spec["kind"] == "cartesian_mri" else 0  # block CS: the one fixed matrix of the system
        op = make_operator(spec["kind"], (size, size), seed=seed, **{k: v for k, v in spec.items() if k != "kind"})
        y = op(x)
        start = time.perf_counter()
        with torch.no_grad():
            out = _WORKER["models"].reconstruct(y, op, method, ddnm_steps=ddnm_steps, seed=i,
                                                tv_weight=TV_WEIGHT.get(setting, 0.003)).clamp(0, 1)
        seconds += time.perf_counter() - start
        scores.append((psnr(out, x).item(), ssim(out, x).item()))
    psnrs, ssims = zip(*scores, strict=True)
    row = {"setting": setting, "method": method, "psnr": sum(psnrs) / len(psnrs), "ssim": sum(ssims) / len(ssims),
           "seconds": seconds / len(scores), "per_image_psnr": list(psnrs)}
    print(f"{setting:22s} {method:12s} {row['psnr']:6.2f} dB {row['ssim']:.4f} {row['seconds']:.2f} s", flush=True)
    return row


def evaluate(folder: Path, size: int, ddnm_steps: int, settings: dict[str, dict] = SETTINGS,
             methods: tuple[str, ...] = METHODS, jobs: int = 1) -> list[dict]:
    """One row per (setting, method): mean PSNR, SSIM and seconds per image over the held-out images,
    computed by ``jobs`` single-threaded processes (seconds are per process, one thread each)."""
    work = [(setting, spec, method, ddnm_steps) for setting, spec in settings.items() for method in methods]
    if jobs == 1:
        _load(folder, size)
        return [_score(*w) for w in work]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_load,
                             initargs=(folder, size)) as pool:
        return list(pool.map(_score, *zip(*work, strict=True)))


def _existing_rows(path: Path, size: int, ddnm_steps: int) -> list[dict]:
    """The rows of an earlier table measured the same way (same size and DDNM steps), else none."""
    if not path.is_file():
        return []
    table = json.loads(path.read_text())
    return table["rows"] if (table.get("size"), table.get("ddnm_steps")) == (size, ddnm_steps) else []


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every (setting, method) measured in ``new`` replaced, in the SETTINGS x METHODS order."""
    by = {(r["setting"], r["method"]): r for r in old} | {(r["setting"], r["method"]): r for r in new}
    order = {key: i for i, key in enumerate((s, m) for s in SETTINGS for m in METHODS)}
    return sorted(by.values(), key=lambda r: order.get((r["setting"], r["method"]), len(order)))


def markdown(rows: list[dict], size: int, ddnm_steps: int, names: list[str]) -> str:
    """The card's table: settings as rows, methods as columns (PSNR / SSIM), then seconds per image."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = [LABELS[m].format(steps=ddnm_steps) for m in methods]
    lines = [f"## Held-out reconstruction ({len(names)} images never trained on, {size}x{size})\n",
             f"Images: {'; '.join(names)}. PSNR (dB) / SSIM on [0, 1] images, mean over the images; "
             "best PSNR in bold. Block CS uses the one fixed matrix per ratio the models were trained with (as "
             "in the IDM paper); each image has its own random MRI mask (seed = image index).\n",
             "| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    by = {(r["setting"], r["method"]): r for r in rows}
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for setting in settings:
        best = max(methods, key=lambda m: by[setting, m]["psnr"])
        cells = [(f"**{by[setting, m]['psnr']:.2f}**" if m == best else f"{by[setting, m]['psnr']:.2f}")
                 + f" / {by[setting, m]['ssim']:.4f}" for m in methods]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "CPU seconds per image (mean over all settings): " + ", ".join(
        f"{label} {sum(by[s, m]['seconds'] for s in settings) / len(settings):.2f} s"
        for m, label in zip(methods, labels, strict=True)) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medidiff.evaluation.cs_held_out", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side (multiple of 32)")
    p.add_argument("--ddnm-steps", type=int, default=100)
    p.add_argument("--models", type=Path, help="model folder (default: the shipped models/cs_reconstruction)")
    p.add_argument("--jobs", type=int, default=2, help="single-threaded worker processes")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--kinds", default="block_cs,cartesian_mri",
                   help="measurement kinds to measure (comma-separated subset of block_cs, cartesian_mri)")
    a = p.parse_args(argv)
    from medidiff.methods.model_card import write_model_card

    folder = a.models or model_dir("cs_reconstruction")
    kinds = a.kinds.split(",")
    if unknown := set(kinds) - {spec["kind"] for spec in SETTINGS.values()}:
        p.error(f"--kinds: unknown {', '.join(sorted(unknown))}; use block_cs and/or cartesian_mri")
    settings = {name: spec for name, spec in SETTINGS.items() if spec["kind"] in kinds}
    rows = merge_rows(_existing_rows(folder / "eval_held_out.json", a.size, a.ddnm_steps),
                      evaluate(folder, a.size, a.ddnm_steps, settings, tuple(a.methods.split(",")), a.jobs))
    names = held_out_names()
    with atomic_write(folder / "eval_held_out.json") as tmp:
        tmp.write_text(json.dumps({"size": a.size, "ddnm_steps": a.ddnm_steps, "images": names, "rows": rows}, indent=2))
    with atomic_write(folder / "eval_held_out.md") as tmp:
        tmp.write_text(markdown(rows, a.size, a.ddnm_steps, names))
    print(write_model_card(folder))


if __name__ == "__main__":
    main()
