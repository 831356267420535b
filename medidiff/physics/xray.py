"""X-ray physics between the line integrals and the detector signal.

Materials are a two-basis decomposition of CT numbers: water (``A``: 0 for air, 1 for water,
lung in between) and cortical bone (``B``: volume fraction of bone replacing water), so
``mu(E) = mu_water(E) * A + (mu_bone(E) - mu_water(E)) * B``. Line integrals of ``A`` and ``B``
are energy independent; a polyenergetic tube spectrum (Kramers' law, aluminium filtration,
energy-integrating detector) then gives the transmitted fraction, with beam hardening built
in. Scatter is a broad blur of the attenuated photons; the detector adds a Gaussian MTF and
quantum (Poisson, Gaussian approximation) plus electronic noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Mass attenuation with coherent scattering (cm^2/g), approximate NIST XCOM values, and densities.
ENERGIES_KEV = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
MATERIALS = {
    "water": (np.array([0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505]), 1.0),
    "bone": (np.array([4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480]), 1.92),  # ICRU-44 cortical
    "aluminium": (np.array([3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378]), 2.699),
}
CT_ENERGY_KEV = 70.0  # effective energy at which CT numbers are taken to be measured


def attenuation(material: str, energy_kev) -> np.ndarray:
    """Linear attenuation coefficient (1/mm) of ``material`` at ``energy_kev`` (log-log interpolation)."""
    table, rho = MATERIALS[material]
    e = np.log(np.asarray(energy_kev, np.float64))
    return np.exp(np.interp(e, np.log(ENERGIES_KEV), np.log(table))) * rho / 10.0


HU_CORTICAL_BONE = 1000.0 * (attenuation("bone", CT_ENERGY_KEV) / attenuation("water", CT_ENERGY_KEV) - 1.0)


def hu_to_basis(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Water fraction ``A`` and bone fraction ``B`` (float32) of CT numbers ``hu``."""
    hu = np.asarray(hu, np.float32)
    water = np.clip(1.0 + hu / 1000.0, 0.0, 1.0)
    bone = np.maximum(hu, 0.0) / np.float32(HU_CORTICAL_BONE)
    return water.astype(np.float32), bone.astype(np.float32)


def spectrum(kvp: float, aluminium_mm: float, step_kev: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Energies (keV) and detected-energy weights (sum 1) of a filtered tungsten tube at ``kvp``.

    Photon fluence per keV follows Kramers' law ``(kvp - E) / E``, hardened by ``aluminium_mm``;
    an energy-integrating detector weights each photon by its energy.
    """
    e = np.arange(20.0 + step_kev / 2, kvp, step_kev)
    fluence = (kvp - e) / e * np.exp(-attenuation("aluminium", e) * aluminium_mm)
    w = fluence * e
    return e, w / w.sum()


def transmission(water_mm: np.ndarray, bone_mm: np.ndarray, energies: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Detected fraction of the unattenuated signal for water/bone line integrals (mm)."""
    mu_w, mu_b = attenuation("water", energies), attenuation("bone", energies)
    out = np.zeros(np.shape(water_mm), np.float64)
    for w, a, b in zip(weights, mu_w, mu_b, strict=True):
        out += w * np.exp(-(a * water_mm + (b - a) * bone_mm))
    return out.astype(np.float32)


def effective_energy(energies: np.ndarray, weights: np.ndarray) -> float:
    """Mean detected energy (keV) of a spectrum."""
    return float((energies * weights).sum())


def scatter(primary: np.ndarray, field: np.ndarray, fraction: float, sigma_px: float) -> np.ndarray:
    """Scatter reaching the detector: ``fraction`` of the photons removed from the collimated
    beam, spread by a Gaussian of ``sigma_px`` (a grid lowers ``fraction``)."""
    removed = field * (1.0 - primary)
    return fraction * ndimage.gaussian_filter(removed.astype(np.float32), sigma_px, mode="constant")


def detect(signal: np.ndarray, quanta_per_pixel: float, mtf_sigma_px: float,
           noise: tuple[np.ndarray, np.ndarray] | None,
           electronic: float = 0.0) -> np.ndarray:
    """Log-domain detector image ``-log(counts / quanta)`` from the relative ``signal``.

    The signal is blurred by the detector MTF; ``noise`` is a pair (quantum, electronic) of
    standard-normal fields, shared by the images of one pair, scaled by ``sqrt(counts)`` and
    ``electronic`` counts; ``None`` gives the noise-free image.
    """
    counts = quanta_per_pixel * ndimage.gaussian_filter(signal, mtf_sigma_px)
    if noise is not None:
        quantum = ndimage.gaussian_filter(noise[0], mtf_sigma_px)
        counts = counts + np.sqrt(np.maximum(counts, 0.0)) * quantum + electronic * noise[1]
    return -np.log(np.maximum(counts, 0.5) / quanta_per_pixel).astype(np.float32)
