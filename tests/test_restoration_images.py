"""Restoration image pairs: units, training patches (aligned, reproducible), the CT cache, and the
fixed held-out sets (disjoint from training, shapes, ranges, determinism)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medidiff.datasets import chest_phantom, drr
from medidiff.datasets import restoration_images as R
from medidiff.errors import InputError


def test_task_settings_and_units():
    assert [R.scale(t) for t in R.TASKS] == [1, 2, 4, 4]
    assert R.intensity("ct_denoise") == {"kind": "hu", "low": -1024.0, "high": 2048.0}
    assert R.intensity("mr_sr4") == {"kind": "percentile", "low": 0.5, "high": 99.5}
    hu = torch.tensor([-1024.0, -1000.0, 40.0, 3000.0])
    units = R.hu_to_units(hu)
    assert units[0] == 0 and units[-1] > 1  # not clipped
    torch.testing.assert_close(R.units_to_hu(units), hu)
    with pytest.raises(InputError, match="unknown restoration task 'ct'"):
        R.scale("ct")
    with pytest.raises(InputError, match="not divisible by the scale 4"):
        R.training_pairs("mr_sr4", 2, 30, np.random.default_rng(0))


def test_held_out_is_disjoint_from_training():
    ct = {f for _, f in R.HELD_OUT_CT}
    mr = {f for _, f, _ in R.HELD_OUT_MR}
    cr = {f for _, f in R.HELD_OUT_CR}
    assert len(ct) == len(R.HELD_OUT_CT) and not (ct & mr) and not (ct & cr) and not (mr & cr)
    assert all(drr.split_of(s) == "test" for s in R.HELD_OUT_DRR_SEEDS)
    assert all(drr.split_of(s) == "train" for s in range(R.XRAY_TRAINING_DRRS))
    assert all(s in chest_phantom.TRAIN_SEEDS for s in range(R.XRAY_TRAINING_PHANTOMS))
    assert [len(R.held_out_names(t)) for t in R.TASKS] == [5, 2, 2, 4]


def _small(image: np.ndarray) -> torch.Tensor:
    """A CT image windowed to [-1000, 1000] HU, 128 x 128, zero mean and unit norm."""
    t = torch.from_numpy(np.clip((np.asarray(image, np.float32) + 1000) / 2000, 0, 1))[None, None]
    t = F.interpolate(t, size=(128, 128), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    t = t - t.mean()
    return t / t.norm()


def test_held_out_ct_is_no_training_slice():
    """Every held-out CT differs from every training slice in all 8 orientations (other patients)."""
    hu, _ = R._training_ct()
    training = torch.stack([_small(a) for a in hu])
    for name, filename in R.HELD_OUT_CT:
        held = _small(R._dicom(filename)[0])
        best = max(float((training * R._dihedral(held, k)).sum(dim=(1, 2)).max()) for k in range(8))
        assert best < 0.9, name


def test_held_out_mr_pairs_are_fixed_and_in_units():
    first = R.held_out_pairs("mr_sr4")
    assert [name for name, _, _ in first] == R.held_out_names("mr_sr4")
    shapes = [(tuple(c.shape), tuple(d.shape)) for _, c, d in first]
    assert shapes == [((1, 1, 512, 512), (1, 1, 128, 128)), ((1, 1, 484, 484), (1, 1, 121, 121))]
    for _, clean, degraded in first:
        lo, hi = np.percentile(clean.numpy(), (0.5, 99.5))
        assert lo == pytest.approx(0, abs=1e-5) and hi == pytest.approx(1, abs=1e-5)
        # the low-resolution image is the same anatomy at the same place
        assert torch.corrcoef(torch.stack([F.avg_pool2d(clean, 4).flatten(), degraded.flatten()]))[0, 1] > 0.95
    again = R.held_out_pairs("mr_sr4")
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(first, again, strict=True))
    assert R.held_out_pairs("mr_sr2")[1][2].shape == (1, 1, 242, 242)


def test_held_out_ct_pairs_keep_hu_and_are_noisy():
    pairs = R.held_out_pairs("ct_denoise")
    assert [name for name, _, _ in pairs] == R.held_out_names("ct_denoise")
    for name, clean, noisy in pairs:
        assert clean.shape == noisy.shape and clean.shape[-1] in (128, 512), name
        hu = R.units_to_hu(clean)
        assert float(hu.min()) >= -1000.01  # air floor
        assert torch.allclose(hu, hu.round(), atol=0.01)  # integer CT numbers preserved exactly
        noise_hu = float((R.units_to_hu(noisy) - hu).std())
        assert 10 < noise_hu < 300, name


def test_mr_training_pairs_are_aligned_and_reproducible():
    clean, degraded = R.training_pairs("mr_sr2", 6, 64, np.random.default_rng(3))
    assert clean.shape == (6, 1, 64, 64) and degraded.shape == (6, 1, 32, 32)
    again = R.training_pairs("mr_sr2", 6, 64, np.random.default_rng(3))
    assert torch.equal(clean, again[0]) and torch.equal(degraded, again[1])
    pooled = F.avg_pool2d(clean, 2)
    aligned = (pooled - degraded).abs().mean()
    flipped = (pooled.flip(-1) - degraded).abs().mean()  # a mismatched flip is far worse
    assert aligned < 0.03 and aligned < flipped / 2


def test_ct_training_cache_and_pairs(tmp_path, monkeypatch):
    hu, pixel_mm = R._training_ct()
    small = np.ascontiguousarray(hu[64:66, ::4, ::4])  # two slices at 128 px keep the test quick
    monkeypatch.setattr(R, "_training_ct", lambda: (small, 4 * pixel_mm))
    monkeypatch.setattr(R, "cache_dir", lambda: tmp_path)
    R.ct_training_cache.cache_clear()
    try:
        clean_hu, noisy_hu = R.ct_training_cache()
        assert noisy_hu.shape == (len(R.CT_DOSE_FACTORS), 2, 128, 128)
        assert sorted(p.name for p in (tmp_path / "ct_denoise").iterdir()) == ["clean.npy", "meta.json", "noisy.npy"]
        assert np.array_equal(clean_hu, np.maximum(small, -1000).astype(np.int16))
        # noise falls as dose rises (factors 0.5, 1, 1, 2)
        stds = [float(np.std(noisy_hu[r, :, 50:80, 50:80].astype(float) - clean_hu[:, 50:80, 50:80]))
                for r in range(len(R.CT_DOSE_FACTORS))]
        assert stds[0] > stds[1] > stds[3]
        clean, noisy = R.training_pairs("ct_denoise", 4, 96, np.random.default_rng(0))
        assert clean.shape == noisy.shape == (4, 1, 96, 96)
        again = R.training_pairs("ct_denoise", 4, 96, np.random.default_rng(0))
        assert torch.equal(clean, again[0]) and torch.equal(noisy, again[1])
        # same place: the noisy patch follows the clean one far more closely than another patch
        assert (noisy - clean).abs().mean() < (noisy - clean.roll(1, 0)).abs().mean()
    finally:
        R.ct_training_cache.cache_clear()


def test_downsized_keeps_the_longest_side():
    assert R._downsized(np.zeros((1955, 1841), np.float32), 1024).shape == (1024, 964)
    small = np.zeros((300, 200), np.float32)
    assert R._downsized(small, 1024) is small
