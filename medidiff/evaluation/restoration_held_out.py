"""Held-out restoration table for a task's model card: every trained method against the baselines.

``python -m medidiff.evaluation.restoration_held_out TASK [--models DIR] [--steps-curve]`` restores the
task's fixed held-out pairs (:func:`medidiff.datasets.restoration_images.held_out_pairs`: images of
other patients, never trained on) with every method saved in the task folder
(``models/restoration/<task>/``), each with the int8 model shipped beside it where there is one
(``+int8``), and the baselines (the degraded input or bicubic upsampling; TV and BM3D/NL-means for
denoising), and writes mean PSNR / SSIM (model units, data range 1) and CPU seconds
per image (one thread) to ``eval_held_out.json`` / ``.md`` there (card refreshed). ``--steps-curve``
adds the PSNR of the step-flexible processes (Resfusion, RDDM) at 1, 2, 3, 5 and 10 steps.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medidiff.acceleration import ShippedInt8, applied
from medidiff.acceleration.int8 import shipped_file
from medidiff.datasets.restoration_images import held_out_names, held_out_pairs, is_mr, scale
from medidiff.io.atomic import atomic_write
from medidiff.methods.restoration import Restoration, model_names
from medidiff.metrics import psnr, ssim
from medidiff.physics.degradations import kspace_consistency, upsample, zero_filled

ORDER = ("input", "bicubic", "zero-filled", "tv", "bm3d", "regression", "resshift", "resshift15", "samdiffsr", "upsr",
         "resfusion", "rddm", "one_step")
CURVE_STEPS = (1, 2, 3, 5, 10)


def baselines(task: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The simple baselines of ``task``: degraded image -> estimate (model units)."""
    if is_mr(task):  # k-space truncation: zero-filling is the classical MR baseline
        s = scale(task)
        return {"bicubic": lambda lr: upsample(lr, s), "zero-filled": lambda lr: zero_filled(lr, s),
                "bicubic+dc": lambda lr: kspace_consistency(upsample(lr, s), lr, s)}
    if scale(task) > 1:
        return {"bicubic": lambda lr: upsample(lr, scale(task))}
    from medidiff.methods.classical_restoration import bm3d_denoise, tv_denoise

    return {"input": lambda y: y, "tv": tv_denoise, "bm3d": bm3d_denoise}


def trained(folder: Path) -> dict[str, Restoration]:
    """Every method saved in ``folder``, by file stem."""
    return {stem: Restoration.from_pretrained(folder, stem) for stem in model_names(folder)}


def score(name: str, fn: Callable[[torch.Tensor], torch.Tensor], pairs: list) -> dict:
    """Mean PSNR / SSIM / seconds of ``fn`` over the held-out ``pairs``."""
    psnrs, ssims, seconds = [], [], 0.0
    for _, clean, degraded in pairs:
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(degraded)
        seconds += time.perf_counter() - start
        psnrs.append(psnr(out, clean).item())
        ssims.append(ssim(out, clean).item())
    row = {"method": name, "psnr": sum(psnrs) / len(psnrs), "ssim": sum(ssims) / len(ssims),
           "seconds": seconds / len(pairs), "per_image_psnr": psnrs}
    print(f"{name:16s} {row['psnr']:6.2f} dB {row['ssim']:.4f} {row['seconds']:.2f} s", flush=True)
    return row


def evaluate(task: str, folder: Path, steps_curve: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    pairs = held_out_pairs(task)
    rows = [score(name, fn, pairs) for name, fn in baselines(task).items()]
    for stem, method in trained(folder).items():
        rows.append(score(stem, lambda lr, m=method: m.restore(lr), pairs))
        if "boundary" in method.config:  # ResShift's ODE sampler from its optimal boundary condition
            rows.append(score(f"{stem}+ode", lambda lr, m=method: m.restore(lr, boundary="optimal"), pairs))
        if is_mr(task):  # the measured k-space band put back into the output
            rows.append(score(f"{stem}+dc", lambda lr, m=method: kspace_consistency(m.restore(lr), lr, scale(task)),
                              pairs))
        if shipped_file(method.model_fn.weights_file).is_file():  # the int8 model shipped beside it
            with applied(method.model_fn, ShippedInt8()):
                rows.append(score(f"{stem}+int8", lambda lr, m=method: m.restore(lr), pairs))
        if steps_curve and method.config["method"] in ("resfusion", "rddm"):
            for steps in CURVE_STEPS:
                rows.append(score(f"{stem}@{steps}", lambda lr, m=method, s=steps: m.restore(lr, steps=s), pairs))
    return rows


def markdown(task: str, rows: list[dict], names: list[str]) -> str:
    rank = {m: i for i, m in enumerate(ORDER)}
    rows = sorted(rows, key=lambda r: (rank.get(r["method"].split("@")[0], 99), r["method"]))
    best = max(r["psnr"] for r in rows)
    lines = [f"## Held-out results: {task} ({len(names)} images never trained on)\n",
             f"Images: {'; '.join(names)}. PSNR (dB, model units, data range 1) / SSIM, mean over the images; "
             "CPU seconds per image on one thread. `name@k`: sampled with k steps; `name+ode`: "
             "the deterministic (ODE) sampler from the model's optimal boundary condition; `name+int8`: its shipped "
             "int8 model (`accelerate: {int8: {}}`); `name+dc`: its output with the measured k-space band put back "
             "(MR, `kspace_consistency`); `zero-filled`: zero-filled k-space interpolation.\n",
             "| method | PSNR | SSIM | s / image |", "|---|---|---|---|"]
    for r in rows:
        p = f"**{r['psnr']:.2f}**" if r["psnr"] == best else f"{r['psnr']:.2f}"
        lines.append(f"| {r['method']} | {p} | {r['ssim']:.4f} | {r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medidiff.evaluation.restoration_held_out", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="ct_denoise, mr_sr2, mr_sr4 or xray_sr4")
    p.add_argument("--models", type=Path, help="task model folder (default: the shipped models/restoration/TASK)")
    p.add_argument("--steps-curve", action="store_true", help="also Resfusion/RDDM at 1, 2, 3, 5, 10 steps")
    a = p.parse_args(argv)
    from medidiff.methods.model_card import write_model_card
    from medidiff.resources import model_dir

    folder = a.models or model_dir(f"restoration/{a.task}")
    rows = evaluate(a.task, folder, a.steps_curve)
    names = held_out_names(a.task)
    with atomic_write(folder / "eval_held_out.json") as tmp:
        tmp.write_text(json.dumps({"task": a.task, "images": names, "rows": rows}, indent=2))
    with atomic_write(folder / "eval_held_out.md") as tmp:
        tmp.write_text(markdown(a.task, rows, names))
    print(write_model_card(folder))


if __name__ == "__main__":
    main()
