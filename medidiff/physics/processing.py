"""Display processing of CR/DX systems, applied to log-domain detector images.

A "For Presentation" chest radiograph is the log signal after dynamic-range compression
(the low frequencies are flattened so lungs and mediastinum fit one window), a window, a tone
curve (LUT) and unsharp masking. Every step but the tone curve and the final clip is linear, so
applying one ``Processing`` to a radiograph and to its bone-free twin keeps their difference a
well-defined bone layer. Collimation and lead markers are physical: they act on the beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


@dataclass(frozen=True)
class Processing:
    """One system's display chain; sizes in pixels, levels in the log domain."""

    window: tuple[float, float]  # log-signal mapped to 0 and 1
    compression: float  # fraction of the low-pass signal (about the field mean) removed
    compression_sigma_px: float
    field_mean: float  # log-signal mean over the field: the low-pass reference level
    contrast: float  # tone curve slope at its midpoint (1: nearly linear)
    midpoint: float  # tone curve centre in window units
    gamma: float
    unsharp_amount: float
    unsharp_sigma_px: float

    def __call__(self, log_signal: np.ndarray, field: np.ndarray) -> np.ndarray:
        """Display image (float32, MONOCHROME2, [0, 1]) of a log-domain image; outside the
        collimated ``field`` (bool) the shutter shows white and the low-pass ignores it."""
        p = log_signal.astype(np.float32)
        if self.compression > 0:
            inside = np.where(field, p, np.float32(self.field_mean))
            low = ndimage.gaussian_filter(inside, self.compression_sigma_px, mode="nearest")
            p = p - self.compression * (low - self.field_mean)
        lo, hi = self.window
        x = tone_curve((p - lo) / (hi - lo), self.contrast, self.midpoint, self.gamma)
        if self.unsharp_amount > 0:
            x = x + self.unsharp_amount * (x - ndimage.gaussian_filter(x, self.unsharp_sigma_px, mode="nearest"))
        return np.where(field, np.clip(x, 0.0, 1.0), 1.0).astype(np.float32)


def tone_curve(x: np.ndarray, contrast: float, midpoint: float, gamma: float) -> np.ndarray:
    """S-shaped LUT on [0, 1] (logistic of slope ``contrast`` about ``midpoint``, rescaled so
    0 -> 0 and 1 -> 1) after a power ``gamma``; values outside [0, 1] are clipped first."""
    x = np.clip(x, 0.0, 1.0) ** gamma
    if contrast <= 1e-3:
        return x

    def logistic(v):
        return 1.0 / (1.0 + np.exp(-4.0 * contrast * (v - midpoint)))

    lo, hi = logistic(0.0), logistic(1.0)
    return (logistic(x) - lo) / (hi - lo)


def collimation(rows: int, cols: int, box: tuple[int, int, int, int], edge_px: float) -> np.ndarray:
    """Open-field fraction (float32): 1 inside ``box`` (top, bottom, left, right; exclusive ends),
    0 outside, with edges blurred over ``edge_px`` (the collimator's penumbra)."""
    field = np.zeros((rows, cols), np.float32)
    top, bottom, left, right = box
    field[top:bottom, left:right] = 1.0
    return ndimage.gaussian_filter(field, edge_px, mode="constant") if edge_px > 0 else field


def lead_marker(rows: int, cols: int, text: str, corner: tuple[int, int], height_px: int) -> np.ndarray:
    """Mask (float32, 0..1) of a lead letter marker whose top-left corner is at ``corner`` (row, col)."""
    glyph = Image.new("L", (6 * len(text) + 2, 11))
    ImageDraw.Draw(glyph).text((1, 0), text, fill=255)
    scale = max(1, round(height_px / 11))
    glyph = np.asarray(glyph.resize((glyph.width * scale, glyph.height * scale), Image.NEAREST), np.float32) / 255
    glyph = ndimage.binary_dilation(glyph > 0.5, iterations=max(1, scale // 3)).astype(np.float32)
    out = np.zeros((rows, cols), np.float32)
    r, c = corner
    h, w = min(glyph.shape[0], rows - r), min(glyph.shape[1], cols - c)
    if h > 0 and w > 0:
        out[r:r + h, c:c + w] = glyph[:h, :w]
    return out
