"""Randomised thorax phantom projected to paired chest radiograph / soft-tissue images.

Every structure is a primitive whose X-ray path length has a closed form (ellipsoids,
elliptic cylinders, tubes along polylines), so a PA chest radiograph is rendered
directly as per-material path-length maps under a parallel-beam approximation.
The line integral is ``P = sum_i mu_i(E) * L_i``; the display value is ``P`` windowed
linearly to [0, 1] (MONOCHROME2: dense = bright).  ``soft`` is the same phantom with
every bone voxel replaced by soft tissue, rendered with the same window, so
``cxr - soft`` is the bone contribution plus the quantum noise of ``cxr``
(``soft`` is noise-free).  Everything is deterministic from the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

TRAIN_SEEDS = range(0, 100_000)
VAL_SEEDS = range(1_000_000, 1_001_000)
TEST_SEEDS = range(2_000_000, 2_001_000)

# Mass attenuation (cm^2/g) at 50/60/80 keV (approximate NIST XCOM values, ICRU-44
# tissues) and densities (g/cm^3).  Interpolated log-log at the effective energy.
_ENERGIES_KEV = np.array([50.0, 60.0, 80.0])
_MU_RHO = {
    "soft": (np.array([0.2264, 0.2048, 0.1823]), 1.06),
    "fat": (np.array([0.2158, 0.1974, 0.1766]), 0.95),
    "lung": (np.array([0.2270, 0.2053, 0.1829]), 0.26),
    "cortical": (np.array([0.4242, 0.3148, 0.2229]), 1.92),
}
_CANCELLOUS_BONE_FRACTION = 0.3  # cancellous bone = 30 % cortical + 70 % soft tissue by volume


def attenuation_coefficients(energy_kev: float) -> dict[str, float]:
    """Linear attenuation coefficients (1/mm) of the phantom materials at ``energy_kev``."""
    log_e = np.log(_ENERGIES_KEV)
    mu = {
        name: float(np.exp(np.interp(np.log(energy_kev), log_e, np.log(table))) * rho / 10.0)
        for name, (table, rho) in _MU_RHO.items()
    }
    mu["cancellous"] = (
        _CANCELLOUS_BONE_FRACTION * mu["cortical"] + (1 - _CANCELLOUS_BONE_FRACTION) * mu["soft"]
    )
    mu["air"] = 0.0
    return mu


def _clip01(a):
    return np.clip(a, 0.0, 1.0)


def _ellipsoid_path(x, y, cx, cy, ax, ay, depth, angle=0.0):
    """Path length through an ellipsoid (semi-axes ax, ay in-plane, full depth ``depth``)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    u, v = (c * dx + s * dy) / ax, (-s * dx + c * dy) / ay
    return depth * np.sqrt(np.maximum(1.0 - u * u - v * v, 0.0))


class _Canvas:
    """Detector grid plus the patient-to-detector in-plane transform (rotation + shift)."""

    def __init__(self, size: int, physical_mm: float, angle: float, shift: tuple[float, float]):
        self.size, self.px = size, physical_mm / size
        self.cos, self.sin, self.shift = np.cos(angle), np.sin(angle), np.asarray(shift)
        centres = ((np.arange(size, dtype=np.float32) + 0.5) - size / 2) * self.px
        u, v = centres[None, :] - shift[0], centres[:, None] - shift[1]
        # patient coordinates of every pixel: inverse rotation of the detector position
        self.x = (self.cos * u + self.sin * v).astype(np.float32)
        self.y = (-self.sin * u + self.cos * v).astype(np.float32)
        self.cortical = np.zeros((size, size), np.float32)
        self.cancellous = np.zeros((size, size), np.float32)

    def to_pixels(self, pts: np.ndarray) -> np.ndarray:
        """Patient (x, y) mm -> fractional (col, row) pixel coordinates (pixel centres at .0)."""
        u = self.cos * pts[:, 0] - self.sin * pts[:, 1] + self.shift[0]
        v = self.sin * pts[:, 0] + self.cos * pts[:, 1] + self.shift[1]
        return np.stack([u, v], 1) / self.px + self.size / 2 - 0.5

    def tube(self, pts, radius, depth=1.0, shell=None, out=None):
        """Rasterise a tube along polyline ``pts`` (patient mm) of per-point ``radius`` (mm).

        ``depth`` scales the path length per point (flattened cross-section, foreshortening,
        mineral density).  With ``shell`` (mm), the cortical wall goes to ``self.cortical`` and
        the lumen to ``self.cancellous``; otherwise the full path is added to ``out``.  Points of
        one polyline are max-combined so that joints are not counted twice.
        """
        n = len(pts)
        radius = np.broadcast_to(np.asarray(radius, np.float64), (n,)) / self.px
        depth = np.broadcast_to(np.asarray(depth, np.float64), (n,)) * self.px
        p = self.to_pixels(np.asarray(pts, np.float64))
        rmax = radius.max() + 1
        c0, r0 = np.floor(p.min(0) - rmax).astype(int)
        c1, r1 = np.ceil(p.max(0) + rmax).astype(int) + 1
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, self.size), min(r1, self.size)
        if c0 >= c1 or r0 >= r1:
            return
        outer = np.zeros((r1 - r0, c1 - c0), np.float32)
        inner = np.zeros_like(outer) if shell is not None else None
        sh = None if shell is None else shell / self.px
        for i in range(n - 1):
            a, b = p[i], p[i + 1]
            rad = max(radius[i], radius[i + 1]) + 1
            sc0 = max(int(np.floor(min(a[0], b[0]) - rad)), c0)
            sr0 = max(int(np.floor(min(a[1], b[1]) - rad)), r0)
            sc1 = min(int(np.ceil(max(a[0], b[0]) + rad)) + 1, c1)
            sr1 = min(int(np.ceil(max(a[1], b[1]) + rad)) + 1, r1)
            if sc0 >= sc1 or sr0 >= sr1:
                continue
            cc = np.arange(sc0, sc1, dtype=np.float32)[None, :] - a[0]
            rr = np.arange(sr0, sr1, dtype=np.float32)[:, None] - a[1]
            d = b - a
            t = np.clip((cc * d[0] + rr * d[1]) / max(d @ d, 1e-9), 0.0, 1.0)
            dist2 = (cc - t * d[0]) ** 2 + (rr - t * d[1]) ** 2
            r = radius[i] + t * (radius[i + 1] - radius[i])
            k = depth[i] + t * (depth[i + 1] - depth[i])
            view = (slice(sr0 - r0, sr1 - r0), slice(sc0 - c0, sc1 - c0))
            np.maximum(outer[view], k * 2 * np.sqrt(np.maximum(r * r - dist2, 0.0)), out=outer[view])
            if sh is not None:
                ri = np.maximum(r - sh, 0.0)
                np.maximum(inner[view], k * 2 * np.sqrt(np.maximum(ri * ri - dist2, 0.0)), out=inner[view])
        region = (slice(r0, r1), slice(c0, c1))
        if shell is None:
            out[region] += outer
        else:
            self.cortical[region] += outer - inner
            self.cancellous[region] += inner


def _sample_params(rng: np.random.Generator) -> dict:
    """Draw the anatomy, pose and exposure of one phantom (independent of image size)."""
    female = bool(rng.random() < 0.5)
    scale = rng.uniform(0.88, 1.02) if female else rng.uniform(0.95, 1.1)
    return {
        "female": female,
        "scale": scale,
        "body_half_width": rng.uniform(150, 178) * scale,
        "body_half_depth": rng.uniform(95, 130) * scale,
        "fat_mm": rng.uniform(4, 25),
        "apex_y": rng.uniform(-172, -155),
        "lung_half_width": rng.uniform(0.8, 0.86),
        "lung_depth": rng.uniform(150, 190) * scale,
        "dome_right": rng.uniform(45, 75),
        "dome_drop": rng.uniform(28, 50),
        "dome_left_extra": rng.uniform(8, 25),
        "heart_centre": (rng.uniform(10, 28), rng.uniform(15, 40)),
        "heart_axes": (rng.uniform(62, 78), rng.uniform(50, 62), rng.uniform(90, 115)),
        "heart_angle": np.deg2rad(rng.uniform(20, 40)),
        "mediastinum": rng.uniform(20, 30),
        "rib_spacing": rng.uniform(17.5, 20.0),
        "rib_spacing_growth": rng.uniform(0.35, 0.75),
        "rib_drop": rng.uniform(70, 100),
        "clavicle_y": rng.uniform(-140, -120),
        "breast": female and rng.random() < 0.8,
        "breast_size": rng.uniform(45, 75),
        "gastric_bubble": bool(rng.random() < 0.6),
        "rotation_deg": rng.uniform(-3.5, 3.5),
        "shift_mm": tuple(rng.uniform(-12, 12, 2)),
        "obliquity": np.deg2rad(rng.uniform(-5, 5)),
        "energy_kev": rng.uniform(55, 72),
        "quanta_per_mm2": float(np.exp(rng.uniform(np.log(1.5e5), np.log(1e6)))),
        "electronic_noise": rng.uniform(1.0, 4.0),
        "mtf_sigma_mm": rng.uniform(0.12, 0.25),
        "window_mm": (rng.uniform(25, 55), rng.uniform(1.08, 1.25)),
        "monochrome1": bool(rng.random() < 0.15),
        "vessel_seed": int(rng.integers(2**31)),
    }


def _body(cv: _Canvas, p: dict, mu: dict) -> np.ndarray:
    """Soft-tissue line integral of the torso, neck, shoulders, arms and breasts (no lungs)."""
    x, y = cv.x, cv.y
    a_max, b_max, s = p["body_half_width"], p["body_half_depth"], p["scale"]
    shoulder = _clip01((y + 185 * s) / (75 * s))
    half_w = 58 * s + (a_max - 58 * s) * np.sqrt(1 - (1 - shoulder) ** 2)
    half_d = 60 * s + (b_max - 60 * s) * shoulder + 0.08 * np.maximum(y, 0)

    def slab(aw, ad):
        return 2 * ad * np.sqrt(np.maximum(1 - (x / aw) ** 2, 0.0))

    total = slab(half_w, half_d)
    lean = slab(np.maximum(half_w - p["fat_mm"], 1), np.maximum(half_d - p["fat_mm"], 1))
    integral = mu["soft"] * lean + mu["fat"] * (total - lean)
    arms = np.zeros_like(x)
    for side in (-1, 1):
        cv.tube(np.array([[side * 190 * s, -135 * s], [side * 222 * s, 120 * s]]), 45 * s, 1.0, out=arms)
        if p["breast"]:
            r = p["breast_size"]
            integral += (
                0.5
                * (mu["soft"] + mu["fat"])
                * _ellipsoid_path(x, y, side * 85 * s, 45 * s + 0.4 * r, r * 1.3, r, 0.5 * r)
            )
    return integral + mu["soft"] * arms


def _lung(xs, y, p: dict, side: int) -> np.ndarray:
    """Path length through one lung (before heart/vessels) at patient points (xs=|x| on its side)."""
    s = p["scale"]
    apex = p["apex_y"] * s + (6.0 if side > 0 else 0.0)
    widest = 60 * s
    lat = (
        p["body_half_width"]
        * p["lung_half_width"]
        * np.sqrt(_clip01(1 - ((np.minimum(y, widest) - widest) / (widest - apex + 45 * s)) ** 2))
    )
    med = (p["mediastinum"] - 10 * _clip01((y + 40 * s) / (60 * s))) * s
    centre, half = (lat + med) / 2, np.maximum((lat - med) / 2, 1.0)
    across = _clip01(1 - ((xs - centre) / half) ** 2) ** 0.3
    apex_x = med + 28 * s
    top = _clip01((y - apex - (xs - apex_x) ** 2 / (55 * s)) / 14) ** 0.5
    depth = p["lung_depth"] * (0.3 + 0.7 * _clip01((y - apex) / (140 * s)) ** 0.6)
    dome = (p["dome_right"] + (p["dome_left_extra"] if side > 0 else 0.0)) * s
    lat_max = p["body_half_width"] * p["lung_half_width"]
    dome_y = dome + p["dome_drop"] * s * ((xs - 0.4 * lat_max) / (0.6 * lat_max)) ** 2
    below = y - dome_y
    base = np.where(below < 0, _clip01(-below / 2.5 + 1.0), 0.3 * np.exp(-np.maximum(below, 0) / 22))
    return depth * across * top * base


def _thorax(cv: _Canvas, p: dict, mu: dict) -> tuple[np.ndarray, np.ndarray]:
    """Line-integral change from lungs, airways and vessels; also returns the lung path map."""
    x, y, s, ob = cv.x, cv.y, p["scale"], np.sin(p["obliquity"])
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        mask = side * x > 0
        lungs[mask] = _lung(side * x[mask], y[mask], p, side)
    hx, hy = p["heart_centre"]
    ax, ay, az = p["heart_axes"]
    heart = _ellipsoid_path(x, y, hx * s - 40 * ob, hy * s, ax * s, ay * s, az * s, p["heart_angle"])
    aorta = _ellipsoid_path(x, y, 30 * s - 20 * ob, -62 * s, 17 * s, 17 * s, 45 * s)
    lungs = np.maximum(lungs - heart - aorta, 0.0)
    air = np.zeros_like(x)
    carina = np.array([3.0, -70.0]) * s
    cv.tube(np.array([[0.0, -220.0], [0.0, -120.0], carina / s]) * s, 8.5 * s, 1.0, out=air)
    cv.tube(np.array([carina / s, [-28, -45]]) * s, 6.5 * s, 1.0, out=air)
    cv.tube(np.array([carina / s, [40, -52]]) * s, 6.0 * s, 1.0, out=air)
    if p["gastric_bubble"]:
        dome = (p["dome_right"] + p["dome_left_extra"]) * s
        air += _ellipsoid_path(x, y, 60 * s, dome + 30 * s, 30 * s, 18 * s, 35 * s) * (y > dome + 16 * s)
    vessels = np.zeros_like(x)
    _vessel_trees(cv, p, vessels)
    visible = _clip01(lungs / 25.0)
    integral = (mu["lung"] - mu["soft"]) * lungs + (mu["air"] - mu["soft"]) * air
    return integral + (mu["soft"] - mu["lung"]) * vessels * visible, lungs


def _vessel_trees(cv: _Canvas, p: dict, out: np.ndarray) -> None:
    """Branching, tapering pulmonary vessel trees grown from the hila inside the lungs."""
    rng = np.random.default_rng(p["vessel_seed"])
    s = p["scale"]

    def inside(pt, side):
        xs = side * pt[0]
        return xs > 0 and _lung(np.array([xs]), np.array([pt[1]]), p, side)[0] > 30

    for side in (-1, 1):
        for base_angle in (-110, -75, -40, -10, 20, 50, 80, 105):
            hilum = (
                np.array([side * (p["mediastinum"] + 12), (-10 if side > 0 else 0) + 0.25 * base_angle]) * s
            )
            angle = np.deg2rad(base_angle + rng.uniform(-12, 12))
            stack = [(hilum, angle, rng.uniform(30, 40) * s, rng.uniform(4.0, 5.5) * s, 0)]
            while stack:
                start, ang, length, radius, gen = stack.pop()
                pts = [start]
                for _ in range(3):
                    ang += rng.uniform(-0.15, 0.15)
                    pts.append(pts[-1] + length / 3 * np.array([side * np.cos(ang), np.sin(ang)]))
                if not inside(pts[-1], side) and gen > 0:
                    continue
                cv.tube(np.array(pts), np.linspace(radius, radius * 0.85, 4), 1.0, out=out)
                if gen < 6 and radius > 0.6:
                    for sign in (-1, 1):
                        spread = np.deg2rad(rng.uniform(15, 35))
                        child_r = radius * rng.uniform(0.68, 0.8)
                        stack.append(
                            (pts[-1], ang + sign * spread, length * rng.uniform(0.7, 0.85), child_r, gen + 1)
                        )


def _ribs(cv: _Canvas, p: dict) -> None:
    """Twelve rib pairs as hollow tubes on tilted elliptic hoops around the rib cage."""
    s, ob = p["scale"], p["obliquity"]
    cage_w = p["body_half_width"] * p["lung_half_width"] + 6 * s
    cage_d = p["body_half_depth"] * 0.8
    y_post = p["apex_y"] * s + 12 * s
    for k in range(12):
        spacing = (p["rib_spacing"] + p["rib_spacing_growth"] * k) * s
        width_frac = [0.42, 0.66, 0.8, 0.88, 0.94, 0.97, 1.0, 1.0, 0.98, 0.95, 0.9, 0.82][k]
        theta_end = np.deg2rad([140, 150, 155, 155, 155, 150, 145, 135, 125, 110, 85, 65][k])
        theta = np.linspace(0.05, theta_end, 28)
        a, b = cage_w * width_frac, cage_d * (0.45 + 0.55 * width_frac)
        drop = p["rib_drop"] * s * (0.55 + 0.45 * width_frac)
        for side in (-1, 1):
            xs = 16 * s + (a - 16 * s) * np.sin(theta)
            z = b * np.cos(theta)
            yy = (
                y_post - 8 * s * np.clip(np.sin(2 * theta), 0, None) + drop * ((1 - np.cos(theta)) / 2) ** 1.4
            )
            x = side * xs * np.cos(ob) + z * np.sin(ob)
            tangent = np.gradient(np.stack([x, yy, z], 1), axis=0)
            inplane = np.hypot(tangent[:, 0], tangent[:, 1]) / np.linalg.norm(tangent, axis=1)
            anterior = _clip01((theta - np.pi / 2) / (theta_end - np.pi / 2 + 1e-6))
            radius = (4.6 + 1.4 * anterior) * s * (1.1 if k == 0 else 1.0)
            depth = (0.8 - 0.25 * anterior) * (1 - 0.4 * anterior) / np.maximum(inplane, 0.3)
            cv.tube(np.stack([x, yy], 1), radius, depth, shell=1.3 * s)
        y_post += spacing


def _spine_and_girdle(cv: _Canvas, p: dict) -> None:
    """Vertebral column, clavicles, scapulae and proximal humeri."""
    s, ob = p["scale"], np.sin(p["obliquity"])
    x0, y = 70 * ob * s, p["apex_y"] * s - 15 * s
    x = cv.x - x0
    for i in range(15):
        h, rx = (16 + 1.1 * i) * s, (13 + 1.0 * i) * s
        rows = np.nonzero(np.any(np.abs(cv.y - (y + h / 2)) < h / 2, axis=1))[0]
        if rows.size:
            band = slice(rows[0], rows[-1] + 1)
            xb, vb = x[band], np.abs(cv.y[band] - (y + h / 2)) / (h / 2)
            outer = 0.85 * rx * np.sqrt(np.maximum(1 - (xb / rx) ** 2, 0)) * np.sqrt(np.maximum(1 - vb**6, 0))
            ri, vi = rx - 1.0 * s, vb * (h / 2) / (h / 2 - 1.0 * s)
            inner = 0.85 * ri * np.sqrt(np.maximum(1 - (xb / ri) ** 2, 0)) * np.sqrt(np.maximum(1 - vi**6, 0))
            cv.cortical[band] += outer - inner
            cv.cancellous[band] += inner
        yc = y + 0.3 * h
        for side in (-1, 1):
            ped = x0 + side * 0.72 * rx
            cv.tube(np.array([[ped, yc - 2 * s], [ped, yc + 3 * s]]), 4 * s, 1.2, shell=1.0 * s)
            tip = [x0 + side * (rx + 12 * s), yc - 2 * s]
            cv.tube(np.array([[ped, yc], tip]), 3.5 * s, 0.8, shell=1.0 * s)
        cv.tube(
            np.array([[x0 + 20 * ob * s, y + 0.5 * h], [x0 + 20 * ob * s, y + 1.2 * h]]),
            3.5 * s,
            1.0,
            shell=1.0 * s,
        )
        y += h + (4 + 0.25 * i) * s
    cy = p["clavicle_y"] * s
    u = np.linspace(0, 1, 24)
    for side in (-1, 1):
        cx = side * (18 + 130 * u) * s - 60 * ob * s * (1 - u)
        clav_y = cy - 22 * s * u + 7 * s * np.sin(2 * np.pi * u)
        cv.tube(np.stack([cx, clav_y], 1), (7.5 - 2.0 * u) * s, 1.4 - 0.4 * u, shell=1.8 * s)
        _scapula(cv, side, s)
        head = np.array([side * 178 * s, -132 * s])
        cv.tube(np.array([head, head + [0.0, 1.0]]), 24 * s, 1.0, shell=1.5 * s)
        cv.tube(
            np.array([head + [side * 3 * s, 20 * s], [side * 200 * s, 60 * s]]), 12 * s, 1.0, shell=3.5 * s
        )


def _scapula(cv: _Canvas, side: int, s: float) -> None:
    """Thin triangular blade with thickened lateral border and spine."""
    tri = np.array([[102, -150], [165, -128], [122, -25]], np.float64) * s * [side, 1]
    x, y = cv.x, cv.y
    dist = np.full_like(x, np.inf)
    for i in range(3):
        a, b = tri[i], tri[(i + 1) % 3]
        nrm = np.array([-(b - a)[1], (b - a)[0]]) / np.linalg.norm(b - a)
        if nrm @ (tri[(i + 2) % 3] - a) < 0:
            nrm = -nrm
        dist = np.minimum(dist, (x - a[0]) * nrm[0] + (y - a[1]) * nrm[1])
    cv.cortical += 4.0 * _clip01(dist / 3.0)
    cv.tube(np.array([tri[1], tri[2]]), 4.5 * s, 0.8, shell=1.2 * s)
    cv.tube(np.array([tri[0] + [0, 12 * s], tri[1] + [side * 8 * s, -12 * s]]), 4 * s, 0.8, shell=1.2 * s)


def _window_mm(p: dict) -> tuple[float, float]:
    """Display window in water-equivalent mm, adapted to the patient's thickness."""
    lo, gain = p["window_mm"]
    return float(lo), float(2 * p["body_half_depth"] * gain + 20)


def make_pair(seed: int, size: int = 256, *, physical_mm: float = 400.0) -> dict:
    """Render one phantom as ``cxr`` (with bone), ``soft`` (bone -> soft tissue), ``bone`` and ``meta``.

    Arrays are float32 (size, size), row-major, MONOCHROME2 display values in [0, 1].
    """
    p = _sample_params(np.random.default_rng([seed, 0]))
    mu = attenuation_coefficients(p["energy_kev"])
    cv = _Canvas(size, physical_mm, np.deg2rad(p["rotation_deg"]), p["shift_mm"])
    thorax, _ = _thorax(cv, p, mu)
    soft_p = _body(cv, p, mu) + thorax
    _ribs(cv, p)
    _spine_and_girdle(cv, p)
    bone_p = (mu["cortical"] - mu["soft"]) * cv.cortical + (mu["cancellous"] - mu["soft"]) * cv.cancellous
    sigma = max(p["mtf_sigma_mm"] / cv.px, 0.5)
    soft_p = ndimage.gaussian_filter(soft_p, sigma, truncate=3.0)
    cxr_p = soft_p + ndimage.gaussian_filter(bone_p, sigma, truncate=3.0)
    quanta = p["quanta_per_mm2"] * cv.px**2
    noise_rng = np.random.default_rng([seed, 1, size])
    counts = quanta * np.exp(-cxr_p)
    # quantum noise passes through the scintillator blur (correlated), electronic noise does not
    quantum = ndimage.gaussian_filter(
        noise_rng.standard_normal(counts.shape, np.float32), p["mtf_sigma_mm"] / cv.px
    )
    electronic = noise_rng.standard_normal(counts.shape, np.float32)
    noise_gain = float(quantum.std())
    counts += np.sqrt(counts) * quantum + p["electronic_noise"] * electronic
    cxr_p = -np.log(np.maximum(counts, 0.5) / quanta)
    lo, hi = (w * mu["soft"] for w in _window_mm(p))
    cxr = _clip01((cxr_p - lo) / (hi - lo)).astype(np.float32)
    soft = _clip01((soft_p - lo) / (hi - lo)).astype(np.float32)
    lung_counts = quanta * np.exp(-0.3 * (hi - lo) - lo)
    meta = {
        "seed": int(seed),
        "size": size,
        "pixel_spacing_mm": float(cv.px),
        "effective_energy_kev": float(p["energy_kev"]),
        "exposure_quanta_per_mm2": p["quanta_per_mm2"],
        "noise_sigma_at_0.3": float(noise_gain / np.sqrt(lung_counts) / (hi - lo)),
        "mtf_sigma_mm": float(p["mtf_sigma_mm"]),
        "window_water_mm": _window_mm(p),
        "sex": "F" if p["female"] else "M",
        "body_scale": float(p["scale"]),
        "body_width_mm": float(2 * p["body_half_width"]),
        "body_depth_mm": float(2 * p["body_half_depth"]),
        "rotation_deg": float(p["rotation_deg"]),
        "obliquity_deg": float(np.rad2deg(p["obliquity"])),
        "monochrome1": p["monochrome1"],
    }
    return {"cxr": cxr, "soft": soft, "bone": cxr - soft, "meta": meta}


def make_batch(seeds: Sequence[int], size: int) -> dict[str, np.ndarray]:
    """Stack ``make_pair`` images for ``seeds`` into (N, size, size) arrays (meta dropped)."""
    pairs = [make_pair(s, size) for s in seeds]
    return {key: np.stack([pr[key] for pr in pairs]) for key in ("cxr", "soft", "bone")}
