"""Held-out results tables for model cards: a method's variants and baselines on tensors, one table.

``python -m medidiff.evaluation.held_out bone_suppression [--n 100] [--ddpm-n 20] [--ablation LABEL=STEM]``
scores the variants that :data:`VARIANTS` lists for the task, plus other trained models of the same
method (``--ablation``: a label and the path stem of their exported weights), on ``--data``
(default: the phantom's held-out TEST seeds at 256 px, never used in training) with
:func:`~medidiff.evaluation.evaluate.compare_methods`, writes ``<out-name>.json`` / ``<out-name>.md``
into the model folder and refreshes its model card. ``--only WORDS`` re-measures the rows whose label
contains one of the ';'-separated words and keeps the table's other rows (same ``--data`` only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from medidiff.evaluation.datasets import load_data
from medidiff.evaluation.evaluate import Method, compare_methods, methods_markdown
from medidiff.evaluation.tasks import TASKS
from medidiff.io.atomic import atomic_write
from medidiff.resources import model_dir


def bone_suppression_variants(folder: Path, n: int, ddpm_n: int, ablations: dict[str, Path]) -> dict[str, tuple[Method, int]]:
    """BS-LDM (shipped sampler, sampler ablations, other trained models), the regression UNet,
    identity and a VQ-GAN oracle."""
    from medidiff.methods.bone_suppression import BSLDM
    from medidiff.methods.regression_baseline import RegressionBaseline

    ldm = BSLDM.from_pretrained(folder)
    regression = RegressionBaseline.from_pretrained(folder)
    vq = ldm.vqgan
    variants: dict[str, tuple[Method, int]] = {
        "identity (CXR as is)": (lambda x, _: x, n),
        "regression UNet": (lambda x, _: regression.suppress(x), n),
        "VQ-GAN oracle: cxr - (D(E(cxr)) - D(E(soft)))":
            (lambda x, s: x - (vq.decode(vq.encode(x)) - vq.decode(vq.encode(s))), n),
        f"BS-LDM shipped ({ldm.default_method.upper()} {ldm.default_steps})": (lambda x, _: ldm.suppress(x), n),
        "BS-LDM DDPM 1000 (the reference's sampler)": (lambda x, _: ldm.suppress(x, 1000, method="ddpm"), ddpm_n),
        "BS-LDM DDPM 20": (lambda x, _: ldm.suppress(x, 20, method="ddpm"), n),
        "BS-LDM DDPM 10": (lambda x, _: ldm.suppress(x, 10, method="ddpm"), n),
        "BS-LDM DDIM 50 (deterministic)": (lambda x, _: ldm.suppress(x, 50, method="ddim"), n),
        "BS-LDM DDIM 20 (deterministic)": (lambda x, _: ldm.suppress(x, 20, method="ddim"), n),
        "BS-LDM shipped, no adaptive thresholding": (lambda x, _: ldm.suppress(x, thresholding=False), n),
        "BS-LDM shipped, decoded soft (no residual)": (lambda x, _: ldm.suppress(x, residual=False), n),
    }
    for label, stem in ablations.items():
        other = BSLDM.from_pretrained(stem.parent, stem.name)
        variants[f"BS-LDM {label}"] = (lambda x, _, model=other: model.suppress(x), n)
    return variants


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` in its order with the rows of the methods in ``new`` replaced; new methods at the end."""
    fresh = {r["method"]: r for r in new}
    kept = [fresh.pop(r["method"], r) for r in old]
    return kept + list(fresh.values())


def _rows_to_keep(path: Path, spec: str) -> list[dict]:
    """The rows of the table at ``path``, which must have been measured on ``spec``."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    if table.get("data") != spec:
        raise ValueError(f"--only keeps the other rows of {path}, but that table "
                         f"{'was measured on ' + repr(table['data']) if table else 'does not exist'}; "
                         f"run without --only to measure every row on {spec}")
    return table["rows"]


# task -> (model folder, n, n for the slowest variant, {label: weights stem}) -> variants
VARIANTS: dict[str, Callable[[Path, int, int, dict[str, Path]], dict[str, tuple[Method, int]]]] = {
    "bone_suppression": bone_suppression_variants,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medidiff.evaluation.held_out", description=__doc__)
    p.add_argument("task", choices=sorted(VARIANTS))
    p.add_argument("--n", type=int, default=100, help="held-out cases")
    p.add_argument("--ddpm-n", type=int, default=4, help="cases for the slowest variant")
    p.add_argument("--data", help="data spec (default synthetic-cxr:test:N:256)")
    p.add_argument("--models", type=Path, help="model folder (default: the shipped one for the task)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-name", default="eval_results", help="results file stem in the model folder")
    p.add_argument("--ablation", action="append", default=[], metavar="LABEL=STEM",
                   help="another trained model of the method, e.g. 'trained on the phantom only="
                        "~/.cache/medidiff/runs/bs_ldm_phantom/ldm_phantom' (repeatable)")
    p.add_argument("--only", metavar="WORDS", help="re-measure only the rows whose label contains one of these "
                   "';'-separated words, e.g. 'identity;regression'; the table's other rows are kept")
    a = p.parse_args(argv)
    if any("=" not in item for item in a.ablation):
        p.error("--ablation takes LABEL=STEM, the label of a row and the path of weights without .safetensors")
    ablations = {label: Path(stem).expanduser() for label, stem in (item.split("=", 1) for item in a.ablation)}
    from medidiff.methods.model_card import write_model_card

    torch.set_num_threads(a.threads)
    folder = a.models or model_dir(a.task)
    spec = a.data or f"synthetic-cxr:test:{a.n}:256"
    try:
        kept = _rows_to_keep(folder / f"{a.out_name}.json", spec) if a.only else []
    except ValueError as e:
        p.error(str(e))
    variants = VARIANTS[a.task](folder, a.n, a.ddpm_n, ablations)
    if a.only:
        variants = {label: v for label, v in variants.items() if any(w in label for w in a.only.split(";"))}
        if not variants:
            p.error(f"--only {a.only!r} matches no row; the rows are: {', '.join(r['method'] for r in kept)}")
    rows = merge_rows(kept, compare_methods(variants, load_data(spec), TASKS[a.task]))
    note = (f"{', '.join(TASKS[a.task].metrics).upper()} on [0,1] floats; s/img = CPU seconds per image "
            f"({a.threads} threads, batch 25).")
    with atomic_write(folder / f"{a.out_name}.json") as tmp:
        tmp.write_text(json.dumps({"data": spec, "rows": rows}, indent=2))
    with atomic_write(folder / f"{a.out_name}.md") as tmp:
        tmp.write_text(methods_markdown(rows, f"Held-out results ({spec})", note))
    print(write_model_card(folder))


if __name__ == "__main__":
    main()
