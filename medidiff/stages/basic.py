"""Model-free stages: intensity normalisation (MONAI) and geometry-keeping in-plane resizing (SimpleITK)."""

from __future__ import annotations

import torch

from medidiff.errors import StageError
from medidiff.stages.registry import ParameterError, register_stage


def check_finite(item: dict, stage: str) -> torch.Tensor:
    """The item's image, or StageError if it holds NaN/Inf values."""
    image = item["image"]
    if not torch.isfinite(image).all():
        raise StageError(f"{stage}: the image holds NaN or infinite values; check the source pixel data")
    return image


@register_stage(
    "normalize_intensity",
    summary="Map the [lower, upper] percentile window to [0, 1] (MONAI ScaleIntensityRangePercentiles).",
)
class NormalizeIntensity:
    """Robust percentile window to [0, 1], clipped.

    Args:
        lower_percentile: percentile mapped to 0.
        upper_percentile: percentile mapped to 1.
    """

    def __init__(self, lower_percentile: float = 1.0, upper_percentile: float = 99.0):
        if not 0 <= lower_percentile < 100:
            raise ParameterError("lower_percentile", lower_percentile, "0 <= lower_percentile < 100")
        if not lower_percentile < upper_percentile <= 100:
            raise ParameterError("upper_percentile", upper_percentile,
                                 f"lower_percentile ({lower_percentile}) < upper_percentile <= 100")
        from monai.transforms import ScaleIntensityRangePercentiles

        self._scale = ScaleIntensityRangePercentiles(
            lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
        )

    def __call__(self, item: dict) -> dict:
        image = check_finite(item, "normalize_intensity")
        return item | {"image": self._scale(image)}


@register_stage(
    "resize_in_plane",
    summary="Resample each slice so its longer side is max_size pixels, keeping the physical extent "
            "(SimpleITK: origin, spacing and direction stay right).",
)
class ResizeInPlane:
    """Downsize (or upsize) in-plane, keeping the aspect ratio, the slice count and the field of view.

    The image keeps its place in the world: spacing scales with the resize, the origin moves by half the
    change of pixel size, direction is kept (``medidiff.io.volumes.resample``); shrinking is anti-aliased.

    Args:
        max_size: target length of the longer in-plane side, in pixels (16..8192).
    """

    def __init__(self, max_size: int = 512):
        if not 16 <= max_size <= 8192:
            raise ParameterError("max_size", max_size, "16..8192 pixels")
        self.max_size = max_size

    def __call__(self, item: dict) -> dict:
        from medidiff.io.volumes import resample

        image = check_finite(item, "resize_in_plane")
        cols, rows = image.shape[1:3]
        scale = self.max_size / max(cols, rows)
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)), *image.shape[3:])
        return item | {"image": resample(image, size=size)}
