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


def downsized(array: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """Block-mean downsizing so the longer side is at most ``max_side`` (panels need no more)."""
    factor = -(-max(array.shape) // max_side)
    if factor <= 1:
        return array
    rows, cols = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
    return array[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))


def percentile_window(array: np.ndarray | torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> tuple[float, float]:
    """Robust intensity window (lo, hi), hi > lo: the ``lower``/``upper`` percentiles, estimated from a
    strided subsample of about a million values for large images (display, stage normalisation)."""
    flat = (array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)).ravel()
    lo, hi = np.percentile(flat[:: max(1, flat.size // 1_000_000)], [lower, upper])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def before_after_figure(before, after, *, extra: dict | None = None, titles=("before", "after")):
    """A matplotlib Figure: before | after | difference (| extra panels such as the bone layer).

    No pyplot state, so it saves anywhere and shows in notebooks. Each image gets its own
    percentile window; the difference is left out when before and after differ in size.
    """
    first, second = display_slice(before), display_slice(after)
    same_grid = first.shape == second.shape
    first, second = downsized(first), downsized(second)
    panels = [(titles[0], first, "gray", percentile_window(first)), (titles[1], second, "gray", percentile_window(second))]
    if same_grid:
        diff = second - first
        limit = float(np.percentile(np.abs(diff), 99.5)) or 1.0
        panels.append(("difference (after - before)", diff, "RdBu_r", (-limit, limit)))
    for title, image in (extra or {}).items():
        array = downsized(display_slice(image))
        panels.append((title, array, "gray", percentile_window(array)))
    return panel_figure(panels, colour_bars="difference")


def panel_figure(panels: list[tuple], *, units: str = "image units", colour_bars: str = "all"):
    """A Figure of ``(title, array, cmap, (lo, hi))`` panels side by side; colour bars labelled ``units``
    on every panel (``colour_bars="all"``) or only on the non-grey ones (``"difference"``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, array, cmap, (lo, hi)) in zip(axes[0], panels, strict=True):
        shown = ax.imshow(array, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.axis("off")
        if colour_bars == "all" or cmap != "gray":
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).set_label(units)
    fig.tight_layout()
    return fig


def show_before_after(item: dict, *, extra_keys: tuple[str, ...] = ("bone",)):
    """Show an item's original and processed image (and e.g. the removed bone layer) in a notebook."""
    extra = {key: item[key] for key in extra_keys if key in item}
    return before_after_figure(item["original"], item["image"], extra=extra)


def evaluation_figure(image, output, reference, *, units: str = "image units"):
    """A matplotlib Figure: input | output | reference | error (output - reference).

    Input, output and reference share the reference's percentile window, so grey levels compare; every
    panel has a colour bar labelled in ``units`` (the images' own values, not a normalised scale).
    """
    ref = downsized(display_slice(reference))
    window = percentile_window(ref)
    out = downsized(display_slice(output))
    panels = [("input", downsized(display_slice(image)), "gray", window), ("output", out, "gray", window),
              ("reference", ref, "gray", window)]
    if out.shape == ref.shape:
        error = out - ref
        limit = float(np.percentile(np.abs(error), 99.5)) or 1.0
        panels.append(("error (output - reference)", error, "RdBu_r", (-limit, limit)))
    return panel_figure(panels, units=units)
