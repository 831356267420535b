"""Cone-beam (perspective) line integrals through a voxel volume, by trilinear ray marching.

World frame (mm): patient RAS axes, +x patient right, +y anterior, +z superior, origin at the
isocentre (the volume's centre before the pose is applied). The source sits behind the patient
at ``y = -sod`` and the flat detector in front at ``y = sid - sod``: a PA view. Detector columns
run towards the patient's left and rows downwards, so the image shows the patient's right on
the viewer's left, as a PA chest radiograph is read.

Volumes are tensors ``(C, D, H, W)`` with D along z, H along y and W along x (the order of
``grid_sample``); every channel is integrated along each ray. Rays are sampled on planes
perpendicular to the beam axis, so a ray's step length is ``step * |ray| / sid``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConeBeam:
    """Point source and flat detector; ``pixel_mm`` is the detector pitch."""

    sid_mm: float  # source to image (detector) distance
    sod_mm: float  # source to isocentre distance
    rows: int
    cols: int
    pixel_mm: float

    @property
    def magnification(self) -> float:
        return self.sid_mm / self.sod_mm


@dataclass(frozen=True)
class Pose:
    """Patient placement: ``world = rotation @ (scale * patient) + shift``."""

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # along the patient's x, y, z
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


def rotation_matrix(rotation_vector_deg: np.ndarray) -> np.ndarray:
    """Rotation by ``|v|`` degrees about the axis ``v`` (Rodrigues)."""
    v = np.deg2rad(np.asarray(rotation_vector_deg, np.float64))
    angle = float(np.linalg.norm(v))
    if angle == 0.0:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle (degrees) of a rotation matrix: its geodesic distance from the identity."""
    return float(np.rad2deg(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))


def _detector_grid(beam: ConeBeam, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """World (x, z) of every detector pixel centre, each (rows, cols), float64 on ``device``."""
    u = (torch.arange(beam.cols, dtype=torch.float64, device=device) + 0.5 - beam.cols / 2) * beam.pixel_mm
    v = (torch.arange(beam.rows, dtype=torch.float64, device=device) + 0.5 - beam.rows / 2) * beam.pixel_mm
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return -uu, -vv


def _normalised_points(beam: ConeBeam, pose: Pose, half_extent_mm: np.ndarray, ys: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` coordinates (k, rows, cols, 3) of the rays' points on the planes y = ``ys``,
    on the device of ``ys``.

    A ray point is ``(x_det * f, y, z_det * f)`` with ``f = (y + sod) / sid``, so its volume
    coordinates are ``f * base + y * m_y - m @ shift`` for the linear map ``m`` world -> volume.
    """
    x_det, z_det = _detector_grid(beam, ys.device)
    m = np.diag(1.0 / (np.asarray(pose.scale) * half_extent_mm)) @ np.asarray(pose.rotation).T
    mt = torch.from_numpy(m.T).to(ys.device)
    base = (x_det[..., None] * mt[0] + z_det[..., None] * mt[2]).float()
    f = ((ys.double() + beam.sod_mm) / beam.sid_mm).float()
    shift = torch.from_numpy(m @ np.asarray(pose.shift_mm, np.float64)).to(ys.device)
    offset = (ys.double()[:, None] * mt[1] - shift).float()
    return f[:, None, None, None] * base + offset[:, None, None, :]


def _half_extent(volume_shape: tuple[int, ...], spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Half the volume's size along x, y, z (mm) from its (D, H, W) shape and (z, y, x) spacing."""
    d, h, w = volume_shape[-3:]
    return np.array([w * spacing_mm[2], h * spacing_mm[1], d * spacing_mm[0]]) / 2


def _planes(depth_mm: float, step_mm: float, device: torch.device | str = "cpu") -> torch.Tensor:
    n = max(1, math.ceil(depth_mm / step_mm))
    return (torch.arange(n, dtype=torch.float64, device=device) + 0.5) * (depth_mm / n) - depth_mm / 2


def project(volume: torch.Tensor, spacing_mm: tuple[float, float, float], beam: ConeBeam, pose: Pose = Pose(),
            *, depth_mm: float | None = None, step_mm: float = 1.0, displacement: torch.Tensor | None = None,
            chunk: int = 16) -> torch.Tensor:
    """Line integrals (C, rows, cols) of ``volume`` (C, D, H, W; per-mm values, zero outside), on
    the volume's device.

    ``spacing_mm`` is the voxel size along (z, y, x). Rays are marched over ``depth_mm`` of the
    beam axis centred on the isocentre (default: the volume's diagonal times its largest scale).
    ``displacement`` (3, d, h, w) is an elastic deformation in ``grid_sample`` units (x, y, z order),
    sampled trilinearly and added to the patient coordinates of every ray point.
    """
    half = _half_extent(volume.shape, spacing_mm)
    if depth_mm is None:
        depth_mm = 2 * float(np.linalg.norm(half)) * max(pose.scale)
    dev = volume.device
    ys = _planes(depth_mm, step_mm, dev)
    step = depth_mm / len(ys)
    x_det, z_det = _detector_grid(beam, dev)
    ray_factor = (torch.sqrt(x_det**2 + z_det**2 + beam.sid_mm**2) / beam.sid_mm).float()
    vol = volume[None].float()
    displacement = None if displacement is None else displacement.to(dev)
    total = torch.zeros(volume.shape[0], beam.rows, beam.cols, device=dev)
    for start in range(0, len(ys), chunk):
        grid = _normalised_points(beam, pose, half, ys[start:start + chunk])[None]
        if displacement is not None:  # smooth: sampled on every 4th ray, interpolated in between
            d = F.grid_sample(displacement[None].float(), grid[:, :, ::4, ::4], padding_mode="border",
                              align_corners=True)[0].transpose(0, 1)
            d = F.interpolate(d, size=(beam.rows, beam.cols), mode="bilinear", align_corners=False)
            grid = grid + d.permute(0, 2, 3, 1)[None]
        total += F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0].sum(1)
    return total * ray_factor * step


def inside_volume(volume_shape: tuple[int, ...], spacing_mm: tuple[float, float, float], beam: ConeBeam,
                  pose: Pose, y_half_mm: float, planes: int = 9) -> torch.Tensor:
    """(rows, cols) bool: the ray stays inside the volume's z range for |y| <= ``y_half_mm``.

    Pixels where this is false show where the volume ends (its first or last slice), which a
    radiograph of a whole patient would not have: they are collimated away.
    """
    ys = torch.linspace(-y_half_mm, y_half_mm, planes, dtype=torch.float64)
    n = _normalised_points(beam, pose, _half_extent(volume_shape, spacing_mm), ys)
    return (n[..., 2].abs() <= 1).all(0)
