"""Held-out evaluation and ablations of BS-LDM against identity and the regression UNet.

``python -m medidiff.methods.bone_suppression_eval [--n 100] [--ddpm-n 4]`` evaluates on the
phantom's TEST seeds (never used in training), writes ``eval_results.json`` / ``eval_results.md``
next to the weights and refreshes the model card.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medidiff.methods.bone_suppression import BSLDM, MODELS_DIR
from medidiff.methods.model_card import write_model_card
from medidiff.methods.regression_baseline import RegressionBaseline
from medidiff.metrics import all_metrics

# (cxr batch, ground-truth soft batch) -> soft estimate; only the VQ-GAN oracle looks at the truth
Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _evaluate(fn: Method, cxr: torch.Tensor, soft: torch.Tensor, batch: int = 25) -> dict:
    start = time.perf_counter()
    outs = [fn(cxr[i:i + batch], soft[i:i + batch]) for i in range(0, len(cxr), batch)]
    seconds = (time.perf_counter() - start) / len(cxr)
    m = all_metrics(torch.cat(outs).clamp(0, 1), soft, cxr)
    return {**{k: round(v.mean().item(), 5) for k, v in m.items()}, "s/img": round(seconds, 3), "n": len(cxr)}


def run(n: int, ddpm_n: int, folder: Path, generator: str) -> list[dict]:
    """Rows of the results table (name, n, metrics, seconds per image)."""
    gen = importlib.import_module(generator)
    seeds = list(gen.TEST_SEEDS)[:n]
    data = gen.make_batch(seeds, 256)
    cxr, soft = (torch.from_numpy(data[k]).float()[:, None] for k in ("cxr", "soft"))
    ldm = BSLDM.from_pretrained(folder)
    steps, method = ldm.default_steps, ldm.default_method
    regression = RegressionBaseline.from_pretrained(folder)
    vq = ldm.vqgan
    rows: list[tuple[str, Method, int]] = [
        ("identity (CXR as is)", lambda x, _: x, n),
        ("regression UNet", lambda x, _: regression.suppress(x), n),
        ("VQ-GAN oracle: cxr - (D(E(cxr)) - D(E(soft)))", lambda x, s: x - (vq.decode(vq.encode(x)) - vq.decode(vq.encode(s))), n),
        (f"BS-LDM shipped ({method.upper()} {steps})", lambda x, _: ldm.suppress(x), n),
        ("BS-LDM DDPM 1000 (the reference's sampler)", lambda x, _: ldm.suppress(x, 1000, method="ddpm"), ddpm_n),
        ("BS-LDM DDPM 20", lambda x, _: ldm.suppress(x, 20, method="ddpm"), n),
        ("BS-LDM DDPM 10", lambda x, _: ldm.suppress(x, 10, method="ddpm"), n),
        ("BS-LDM DDIM 50 (deterministic)", lambda x, _: ldm.suppress(x, 50, method="ddim"), n),
        ("BS-LDM DDIM 20 (deterministic)", lambda x, _: ldm.suppress(x, 20, method="ddim"), n),
        ("BS-LDM shipped, no adaptive thresholding", lambda x, _: ldm.suppress(x, thresholding=False), n),
        ("BS-LDM shipped, decoded soft (no residual)", lambda x, _: ldm.suppress(x, residual=False), n),
    ]
    if (folder / "ldm_no_offset.json").exists():
        ablation = BSLDM.from_pretrained(folder, "ldm_no_offset")
        rows.append(("BS-LDM shipped sampler, trained without offset noise",
                     lambda x, _: ablation.suppress(x), n))
    results = []
    for name, fn, k in rows:
        with torch.no_grad():
            results.append({"method": name, **_evaluate(fn, cxr[:k], soft[:k])})
        print(results[-1], flush=True)
    return results


def to_markdown(results: list[dict], generator: str, n: int) -> str:
    """The results as a Markdown section."""
    lines = [f"## Held-out results ({generator}, first {n} TEST seeds, 256x256)\n\n",
             "BSR, PSNR (dB), SSIM, MSE on [0,1] floats; s/img = CPU seconds per image (2 threads, batch 25).\n\n",
             "| method | n | BSR | PSNR | SSIM | MSE | s/img |\n|---|---|---|---|---|---|---|\n"]
    for r in results:
        lines.append(f"| {r['method']} | {r['n']} | {r['BSR']:.4f} | {r['PSNR']:.2f} | {r['SSIM']:.4f} | "
                     f"{r['MSE']:.6f} | {r['s/img']:.3f} |\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medidiff.methods.bone_suppression_eval", description=__doc__)
    p.add_argument("--n", type=int, default=100, help="held-out test pairs")
    p.add_argument("--ddpm-n", type=int, default=4, help="pairs for the 1000-step DDPM row")
    p.add_argument("--models", type=Path, default=MODELS_DIR)
    p.add_argument("--generator", default="medidiff.datasets.chest_phantom")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-name", default="eval_results", help="results file stem in the models folder")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = run(a.n, a.ddpm_n, a.models, a.generator)
    (a.models / f"{a.out_name}.json").write_text(json.dumps({"generator": a.generator, "rows": results}, indent=2))
    (a.models / f"{a.out_name}.md").write_text(to_markdown(results, a.generator, a.n))
    print(write_model_card(a.models))


if __name__ == "__main__":
    main()
