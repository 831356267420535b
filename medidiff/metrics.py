"""Image-quality metrics on float images shaped (N, C, H, W), by name for task-agnostic evaluation.

Every function returns one value per image (a (N,) tensor). PSNR and MSE are MONAI's, SSIM is
torchmetrics'; NMSE and the bone suppression ratio are short formulas of their own. :data:`METRICS`
maps a metric name to ``fn(output, reference, original)`` so tasks can name what they report.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.metrics import MSEMetric, PSNRMetric
from torchmetrics.functional.image import structural_similarity_index_measure

MSE_FLOOR = 1e-12  # identical images score 10*log10(range^2 / MSE_FLOOR) dB, not inf (finite means and CIs)


def mse(out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image."""
    return MSEMetric(reduction="none")(out.float(), gt.float()).flatten()


def nmse(out: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Normalised MSE per image, sum((out - gt)^2) / sum(gt^2) (the usual MR reconstruction metric)."""
    return (out - gt).pow(2).flatten(1).sum(1) / gt.pow(2).flatten(1).sum(1).clamp_min(MSE_FLOOR)


def psnr(out: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB on floats (no uint8 wrap-around)."""
    value = PSNRMetric(max_val=data_range, reduction="none")(out.float(), gt.float()).flatten()
    return value.clamp_max(10 * math.log10(data_range**2 / MSE_FLOOR))


def ssim(out: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Gaussian window 11, sigma 1.5) per image."""
    return structural_similarity_index_measure(out.float(), gt.float(), data_range=data_range, reduction="none")


def bsr(out: torch.Tensor, gt: torch.Tensor, cxr: torch.Tensor, offset: bool = True) -> torch.Tensor:
    """Bone suppression ratio 1 - sum(max(out' - gt, 0)^2) / sum((cxr - gt)^2), 1 = perfect.

    ``out' = out + mean(gt - out)`` removes a global brightness offset (``offset=False``: out' =
    out; then an unchanged CXR scores exactly 0). The reference works on negatives (bone dark)
    and writes max(gt - out', 0); in MONOCHROME2 bone adds brightness, so residual bone is
    out' - gt > 0.
    """
    if offset:
        out = out + (gt - out).flatten(1).mean(1).view(-1, 1, 1, 1)
    residual = (out - gt).clamp_min(0).pow(2).flatten(1).sum(1)
    return 1 - residual / (cxr - gt).pow(2).flatten(1).sum(1).clamp_min(MSE_FLOOR)


Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
METRICS: dict[str, Metric] = {
    "bsr": lambda out, ref, original: bsr(out, ref, original),
    "psnr": lambda out, ref, original: psnr(out, ref),
    "ssim": lambda out, ref, original: ssim(out, ref),
    "mse": lambda out, ref, original: mse(out, ref),
    "nmse": lambda out, ref, original: nmse(out, ref),
}
LOWER_IS_BETTER = {"mse", "nmse"}


def all_metrics(out: torch.Tensor, gt: torch.Tensor, cxr: torch.Tensor) -> dict[str, torch.Tensor]:
    """BSR, PSNR, SSIM, MSE per image, by name."""
    return {"BSR": bsr(out, gt, cxr), "PSNR": psnr(out, gt), "SSIM": ssim(out, gt), "MSE": mse(out, gt)}
