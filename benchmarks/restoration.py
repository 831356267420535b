"""Restoration speed: CPU seconds per 512x512 image for every shipped method, from one run.

``python benchmarks/restoration.py [--task ct_denoise] [--threads 2] [--repeats 2] [--slices 133]``
prints seconds per image (tiled restore, as the stages run it) for each method in
``models/restoration/<task>/`` and the baselines, with ratios against the 4-step ResShift teacher
measured in the same run, and the projected time for a ``--slices``-slice 512x512 CT series.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="ct_denoise")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--slices", type=int, default=133, help="series length for the projected series time")
    a = p.parse_args(argv)
    from medidiff.datasets.restoration_images import held_out_pairs, scale
    from medidiff.evaluation.restoration_held_out import baselines, trained
    from medidiff.resources import model_dir

    torch.set_num_threads(a.threads)
    s = scale(a.task)
    degraded = next(d for _, c, d in held_out_pairs(a.task) if c.shape[-1] == 512)  # a 512x512 output
    methods = {**baselines(a.task), **{k: (lambda lr, m=m: m.restore(lr)) for k, m in trained(model_dir(f"restoration/{a.task}")).items()}}
    times = {}
    for name, fn in methods.items():
        with torch.no_grad():
            fn(degraded)  # warm-up
            start = time.perf_counter()
            for _ in range(a.repeats):
                fn(degraded)
        times[name] = (time.perf_counter() - start) / a.repeats
    ref = times.get("resshift")
    print(f"{a.task}: input {tuple(degraded.shape[-2:])} -> output {tuple(x * s for x in degraded.shape[-2:])}, "
          f"{a.threads} threads, mean of {a.repeats}")
    print(f"| method | s / image | x faster than ResShift (4 steps) | {a.slices}-slice series (s) |\n|---|---|---|---|")
    for name, t in times.items():
        ratio = f"{ref / t:.2f}" if ref else "-"
        print(f"| {name} | {t:.3f} | {ratio} | {t * a.slices:.0f} |")


if __name__ == "__main__":
    main()
