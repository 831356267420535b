"""Bone suppression on the real chest radiographs that ship in packages (no truth): panels.

``python benchmarks/real_radiograph_panels.py OUT.png [--model LABEL=FOLDER ...] [--steps 50]``
loads each real PA/AP chest CR/DX of ``pydicom-data`` and pydicom's test files through medidiff's
own loader (MONOCHROME1 inverted, as the pipeline sees it), runs the ``bone_suppression`` stage with
each model folder (default: the shipped one) and saves one row per image and model: input, output
and the removed bone layer, plus a crop of the right upper lung where ribs and clavicle cross.
It prints the bone layer's correlation with the input's own high-pass detail inside the lungs' box,
a truth-free check that the removed layer follows this patient's bones rather than a template.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import torch
from matplotlib.figure import Figure
from scipy import ndimage

from medidiff.display import percentile_window


def real_chest_radiographs() -> dict[str, Path]:
    """Uncompressed frontal chest CR/DX files of pydicom-data / pydicom, one per image (their files
    are named IMAGE_SYNTAX, e.g. RG1_UNCR and RG1_UNCI hold the same radiograph)."""
    from pydicom.data import get_testdata_files

    found, seen = {}, set()
    for name in sorted(set(get_testdata_files("*UNC*")) | set(get_testdata_files("*CR*"))):
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 (other test files: not ours to judge)
            continue
        if ds.get("Modality") in ("CR", "DX") and ds.get("BodyPartExamined") == "CHEST" \
                and ds.get("ViewPosition") in ("PA", "AP") and Path(name).stem.split("_")[0] not in seen:
            seen.add(Path(name).stem.split("_")[0])
            found[Path(name).stem] = Path(name)
    return found


def load_item(path: Path) -> dict:
    from medidiff.io.loading import load_study

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_bytes(path.read_bytes())
        study = load_study(tmp)
        return study.item(0)


def highpass(image: np.ndarray, sigma: float) -> np.ndarray:
    return image - ndimage.gaussian_filter(image, sigma)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("output", type=Path, help="PNG to write")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=FOLDER",
                   help="model folder to show (repeatable; default: the shipped model)")
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args(argv)
    from medidiff.stages.bone_suppression import BoneSuppression

    torch.set_num_threads(2)
    models = dict(item.split("=", 1) for item in a.model) or {"shipped": "default"}
    images = real_chest_radiographs()
    rows = []
    for name, path in images.items():
        item = load_item(path)
        cxr = item["image"].as_tensor()[0].numpy().T  # (rows, cols) for display
        h, w = cxr.shape
        crop = (slice(int(0.18 * h), int(0.45 * h)), slice(int(0.12 * w), int(0.45 * w)))  # patient's right upper lung
        for label, folder in models.items():
            out = BoneSuppression(steps=a.steps, model=folder)(dict(item))
            after, bone = out["image"].as_tensor()[0].numpy().T, out["bone"].as_tensor()[0].numpy().T
            lungs = (slice(int(0.15 * h), int(0.75 * h)), slice(int(0.1 * w), int(0.9 * w)))
            detail = highpass(cxr, 0.01 * w)[lungs].ravel()
            removed = highpass(bone, 0.01 * w)[lungs].ravel()
            corr = float(np.corrcoef(detail, removed)[0, 1])
            print(f"{name} | {label}: correlation of the removed layer's detail with the input's detail "
                  f"(lungs' box) = {corr:.2f}; removed energy = {float(np.mean(bone**2) / np.mean(cxr**2)):.4f}")
            rows.append((f"{name} / {label}", cxr, after, bone, crop))
    fig = Figure(figsize=(16, 4.2 * len(rows)))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for ax_row, (title, cxr, after, bone, crop) in zip(axes, rows, strict=True):
        lo, hi = percentile_window(cxr)
        blo, bhi = percentile_window(bone, 1, 99)
        for ax, image, (vlo, vhi), sub in ((ax_row[0], cxr, (lo, hi), "input"), (ax_row[1], after, (lo, hi), "bone suppressed"),
                                           (ax_row[2], bone, (blo, bhi), "removed bone layer"),
                                           (ax_row[3], np.hstack([cxr[crop], after[crop]]), (lo, hi), "right upper lung: in | out")):
            ax.imshow(image, cmap="gray", vmin=vlo, vmax=vhi)
            ax.set_title(f"{title}: {sub}" if ax is ax_row[0] else sub, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(a.output, dpi=80)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
