"""SAM-DiffSR's structure-modulated noise (Wang et al., 2024), with a classical segmentation for SAM.

In training only, the forward process's noise gets a per-region mean: the image is segmented, every
segment receives one value encoding its structural position (here the mean, over the segment, of a
fixed 2-D sinusoidal position map), and that "encoded mask" is added to the Gaussian noise. The
network learns under region-wise noise means; sampling is unchanged and needs no segmentation.
Deviation: SAM is not available here, so the segments come from SLIC superpixels of the clean image
(scikit-image), which split anatomy at intensity edges as SAM's masks would, at a far lower cost.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.segmentation import slic


def position_map(height: int, width: int, frequencies: int = 2) -> np.ndarray:
    """A fixed 2-D sinusoidal position code in [-1, 1] (mean of sines and cosines of y and x)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    waves = [f(np.pi * k * c) for k in range(1, frequencies + 1) for c in (yy, xx) for f in (np.sin, np.cos)]
    return np.mean(waves, axis=0)


def encoded_mask(image: np.ndarray, segments: int = 24) -> np.ndarray:
    """The structure-position encoding of one (H, W) image: constant on each SLIC segment."""
    labels = slic(image.astype(np.float64), n_segments=segments, compactness=0.05, channel_axis=None, start_label=0)
    code = position_map(*image.shape)
    sums = np.bincount(labels.ravel(), weights=code.ravel())
    counts = np.bincount(labels.ravel())
    return (sums / np.maximum(counts, 1))[labels]


def structure_modulated_noise(noise: torch.Tensor, clean: torch.Tensor, strength: float = 0.1,
                              segments: int = 24) -> torch.Tensor:
    """``noise`` + ``strength`` x the encoded mask of each clean image (N, 1, H, W)."""
    masks = np.stack([encoded_mask(c[0].detach().cpu().numpy(), segments) for c in clean])[:, None]
    return noise + strength * torch.from_numpy(masks).to(noise.dtype).to(noise.device)
