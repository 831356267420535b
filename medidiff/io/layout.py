"""Axis layout: MONAI's (C, x=col, y=row[, z]) versus the usual (C, row, col[, z])."""

from __future__ import annotations

import torch


def swap_rows_cols(image: torch.Tensor) -> torch.Tensor:
    """Swap spatial axes 1 and 2; its own inverse. MetaTensor metadata is kept."""
    return image.transpose(1, 2)
