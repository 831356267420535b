"""Optimal boundary conditions for diffusion-ODE sampling (Ma et al., 2023), plug-and-play on ResShift.

With the deterministic (ODE) sampler the restored image is a function of the degraded image and the
start noise alone: the boundary condition. Rather than drawing it at random each time (results that
fluctuate from run to run), the paper explores the space of boundary conditions once on reference
pairs and keeps an approximately optimal one for every later image, without retraining. Here each
candidate is a ``size`` x ``size`` standard-normal map from its own seed, tiled periodically over any
image size; the candidate with the best mean PSNR on reference *training* pairs (never the held-out
set) is written into the model's JSON as ``boundary`` and used by
``Restoration.restore(..., boundary="optimal")``.

``python -m medidiff.methods.optimal_boundary TASK [--method resshift] [--candidates 32] [--models DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from medidiff.io.atomic import atomic_write
from medidiff.metrics import psnr


def boundary_noise(boundary: dict, shape: tuple[int, ...]) -> torch.Tensor:
    """The boundary map of ``boundary`` ({seed, size}) tiled periodically to (N, 1, H, W) ``shape``."""
    size = int(boundary["size"])
    tile = torch.randn((1, 1, size, size), generator=torch.Generator().manual_seed(int(boundary["seed"])))
    reps = (math.ceil(shape[-2] / size), math.ceil(shape[-1] / size))
    return tile.repeat(shape[0], 1, *reps)[..., : shape[-2], : shape[-1]]


def search(method, pairs: tuple[torch.Tensor, torch.Tensor], candidates: int = 32, size: int = 64) -> tuple[dict, list]:
    """The best of ``candidates`` boundary maps for ``method`` on reference ``pairs`` (clean, degraded):
    returns ({seed, size, psnr}, [(seed, psnr), ...])."""
    clean, degraded = pairs
    method.config = {**method.config}
    scores = []
    for seed in range(candidates):
        method.config["boundary"] = {"seed": seed, "size": size}
        out = method.restore(degraded, boundary="optimal", tile=None)
        scores.append((seed, float(np.mean([psnr(o[None], c[None]).item() for o, c in zip(out, clean, strict=True)]))))
    seed, best = max(scores, key=lambda s: s[1])
    return {"seed": seed, "size": size, "reference_psnr": round(best, 3)}, scores


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medidiff.methods.optimal_boundary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task")
    p.add_argument("--method", default="resshift", help="file stem of a ResShift model in the task folder")
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--pairs", type=int, default=16, help="reference training patches of 128x128")
    p.add_argument("--models", type=Path, help="task model folder (default: the shipped models/restoration/TASK)")
    a = p.parse_args(argv)
    from medidiff.datasets.restoration_images import training_pairs
    from medidiff.methods.restoration import Restoration
    from medidiff.resources import model_dir

    torch.set_num_threads(1)
    folder = a.models or model_dir(f"restoration/{a.task}")
    method = Restoration.from_pretrained(folder, a.method)
    pairs = training_pairs(a.task, a.pairs, 128, np.random.default_rng(12345))
    boundary, scores = search(method, pairs, a.candidates)
    print(f"candidates: PSNR {min(s for _, s in scores):.2f}..{max(s for _, s in scores):.2f} dB; best seed "
          f"{boundary['seed']}")
    path = folder / f"{a.method}.json"
    config = json.loads(path.read_text())
    config["boundary"] = boundary
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main()
