"""Before/after pictures: one figure function serves notebooks and PNG panels alike."""

from __future__ import annotations

import numpy as np
import torch


def display_slice(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """The middle slice of a (C, cols, rows[, z]) image as a (rows, cols) float array."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array[0]
    if array.ndim == 3:
        array = array[..., array.shape[-1] // 2]
    return array.T


def percentile_window(array: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> tuple[float, float]:
    """Percentile display window of an array."""
    lo, hi = np.percentile(array, [lower, upper])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def before_after_figure(before, after, *, extra: dict | None = None, titles=("before", "after")):
    """A matplotlib Figure (no pyplot state; saves anywhere, shows in notebooks): before | after | difference (| extra panels such as the bone layer).

    Before and after share one window; when their sizes differ the difference is left out.
    """
    from matplotlib.figure import Figure

    first, second = display_slice(before), display_slice(after)
    panels = [(titles[0], first, "gray", percentile_window(first)), (titles[1], second, "gray", percentile_window(second))]
    if first.shape == second.shape:
        diff = second - first
        limit = float(np.percentile(np.abs(diff), 99.5)) or 1.0
        panels.append(("difference (after - before)", diff, "RdBu_r", (-limit, limit)))
    for title, image in (extra or {}).items():
        array = display_slice(image)
        panels.append((title, array, "gray", percentile_window(array)))
    fig = Figure(figsize=(4.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, array, cmap, (lo, hi)) in zip(axes[0], panels, strict=True):
        shown = ax.imshow(array, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.axis("off")
        if cmap != "gray":
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def show_before_after(item: dict, *, extra_keys: tuple[str, ...] = ("bone",)):
    """Show an item's original and processed image (and e.g. the removed bone layer) in a notebook."""
    extra = {key: item[key] for key in extra_keys if key in item}
    return before_after_figure(item["original"], item["image"], extra=extra)
