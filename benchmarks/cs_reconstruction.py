"""CS reconstruction: training memory with and without invertibility, and seconds per image.

``python benchmarks/cs_reconstruction.py [--batch 4] [--size 256] [--threads 2]`` prints two tables:

1. Peak memory of one IDM training step (forward + backward, L1 loss, block CS 10 %) with ordinary
   backprop and with the two-level invertible backprop, same network, batch and size. Each variant
   runs in a fresh subprocess; the figure is the growth of the process's peak resident memory
   during the step (weights and data already loaded), so allocator noise is included.
2. CPU seconds per image for zero-filled, FISTA-TV, DDNM and IDM at 256x256 and 512x512 (block CS
   10 %, the shipped models), with IDM's speed-up over DDNM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

STEP = """
import json, resource, sys, torch
from medidiff.methods.cs_reconstruction import make_operator
from medidiff.methods.idm import build_idm
torch.set_num_threads({threads}); torch.manual_seed(0)
net = build_idm({unet!r}, 3)
net.set_invertible({invertible})
x = torch.rand({batch}, 1, {size}, {size})
op = make_operator("block_cs", ({size}, {size}), ratio=0.1)
y = op(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(net(y, op) - x).abs().mean().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_mb": before / 1024, "peak_mb": after / 1024}}))
"""


def training_memory(unet: dict, batch: int, size: int, threads: int) -> dict[str, dict]:
    """Peak-memory growth of one training step, ordinary vs invertible backprop (fresh processes)."""
    out = {}
    for invertible in (False, True):
        code = STEP.format(threads=threads, unet=unet, invertible=invertible, batch=batch, size=size)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        out["invertible" if invertible else "ordinary"] = {**r, "step_mb": r["peak_mb"] - r["before_mb"]}
    return out


def seconds_per_image(sizes: tuple[int, ...], repeats: int) -> list[tuple[int, str, float]]:
    """Mean seconds per image of each method with the shipped models (block CS 10 %)."""
    from medidiff.datasets.cs_images import held_out_images
    from medidiff.methods.cs_reconstruction import METHODS, CSReconstruction, make_operator
    from medidiff.resources import model_dir

    models = CSReconstruction(model_dir("cs_reconstruction"))
    rows = []
    for size in sizes:
        x = held_out_images(size)[0][1]
        op = make_operator("block_cs", (size, size), ratio=0.1)
        y = op(x)
        for method in METHODS:
            n = 1 if method == "ddnm" else repeats
            with torch.no_grad():
                models.reconstruct(y, op, method, ddnm_steps=2)  # warm-up
                start = time.perf_counter()
                for _ in range(n):
                    models.reconstruct(y, op, method)
            rows.append((size, method, (time.perf_counter() - start) / n))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="training image side for the memory table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from medidiff.methods.base import read_component
    from medidiff.resources import model_dir

    unet = read_component(model_dir("cs_reconstruction"), "idm_block_cs")[0]["model"]["unet"]
    mem = training_memory(unet, a.batch, a.size, a.threads)
    saved = 1 - mem["invertible"]["step_mb"] / mem["ordinary"]["step_mb"]
    print(f"\nIDM training step, batch {a.batch} x {a.size}x{a.size}, {a.threads} threads (peak RSS growth)\n")
    print("| backprop | step memory (MB) | ratio |\n|---|---|---|")
    for name, r in mem.items():
        print(f"| {name} | {r['step_mb']:.0f} | {r['step_mb'] / mem['ordinary']['step_mb']:.2f} |")
    print(f"\ninvertible saves {100 * saved:.1f} % of the step's memory\n")
    rows = seconds_per_image((256, 512), a.repeats)
    print(f"Seconds per image, block CS 10 %, {a.threads} threads\n")
    print("| size | method | s/image | vs IDM |\n|---|---|---|---|")
    idm = {size: s for size, m, s in rows if m == "idm"}
    for size, method, s in rows:
        print(f"| {size} | {method} | {s:.3f} | {s / idm[size]:.2f}x |")


if __name__ == "__main__":
    main()
