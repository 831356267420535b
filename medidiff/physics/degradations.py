"""Degradations for denoising and super-resolution: low-dose CT, MR k-space truncation, low-resolution
radiographs, and the bicubic upsampling that maps a low-resolution image onto the high-resolution grid.

Images are ``(N, 1, H, W)`` float tensors. Low-resolution pixel ``m`` covers high-resolution pixels
``[scale m, scale m + scale)`` (centre at ``scale m + (scale - 1) / 2``): the convention of area
downsampling and of ``upsample`` (bicubic, ``align_corners=False``), which every degradation here keeps.

Low-dose CT (``low_dose_ct``): HU -> linear attenuation -> parallel-beam line integrals
(``ParallelBeam``, own torch code: rotate by ``grid_sample`` and sum) -> Poisson photon counts with
optional Gaussian electronic noise -> log -> filtered backprojection -> HU. Written here rather than
taken from deepinv (its wheel pins another torch) or scikit-image (``radon``/``iradon`` take ~7 s per
512 x 512 slice on one thread).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from medidiff.errors import InputError
from medidiff.physics.measurements import fft2c, ifft2c

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV (effective energy of a 120 kVp beam)
DEFAULT_VIEWS = 360  # views over 180 degrees: ~1.5 s per 512 x 512 slice on one thread
DEFAULT_PHOTONS = 1.0e5  # incident photons per ray: ~48 HU noise in soft tissue, 0.7 mm chest CT slice


def _check_image(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise InputError(f"{what} expects images of shape (N, 1, H, W), got {tuple(x.shape)}")


def _check_scale(x: torch.Tensor, scale: int) -> None:
    _check_image(x, "a downsampling degradation")
    if scale < 1 or x.shape[-2] % scale or x.shape[-1] % scale:
        raise InputError(f"image size {tuple(x.shape[-2:])} is not divisible by the scale {scale}; crop it first")


def upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsampling (N, 1, h, w) -> (N, 1, h scale, w scale), ``align_corners=False``, not clipped:
    the super-resolution models' input mapping and the bicubic baseline."""
    _check_image(x, "upsample")
    if scale == 1:
        return x.clone()
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)


# ----------------------------------------------------------------------------------------- MR


def _band(hi_shape: tuple[int, int], lo_shape: tuple[int, int], scale: int) -> tuple[torch.Tensor, slice, slice]:
    """The half-pixel phase ramp of the high-resolution k-space and the rows / columns of its central band
    that a ``lo_shape`` image measures (module convention: each low-resolution pixel at the centre of the
    high-resolution pixels it covers)."""
    (h_hi, w_hi), (h, w) = hi_shape, lo_shape
    # in high-resolution pixels: the low-res origin pixel (index n // 2 of a centred FFT) covers
    # high-res pixels [scale (n // 2), scale (n // 2 + 1)); the high-res origin is N // 2
    shift_y, shift_x = (scale * (n // 2) + (scale - 1) / 2 - n_hi // 2 for n, n_hi in ((h, h_hi), (w, w_hi)))
    ky = torch.arange(h_hi, dtype=torch.float64) - h_hi // 2
    kx = torch.arange(w_hi, dtype=torch.float64) - w_hi // 2
    ramp = torch.exp(2j * math.pi * (shift_y * ky[:, None] / h_hi + shift_x * kx[None, :] / w_hi)).to(torch.complex64)
    top, left = h_hi // 2 - h // 2, w_hi // 2 - w // 2
    return ramp, slice(top, top + h), slice(left, left + w)


def kspace_truncation(x: torch.Tensor, scale: int) -> torch.Tensor:
    """MR acquired at a ``scale`` x coarser matrix over the same field of view: the central
    1 / ``scale`` of centred k-space, inverse-transformed at the smaller matrix, magnitude.

    Intensity-preserving (a constant image keeps its value); a half-pixel phase ramp puts each
    low-resolution pixel at the centre of the high-resolution pixels it covers (module convention),
    so a band-limited image is sampled exactly. Sharp edges ring (Gibbs), as in real MR.
    """
    _check_scale(x, scale)
    if scale == 1:
        return x.clone()
    ramp, rows, cols = _band(x.shape[-2:], (x.shape[-2] // scale, x.shape[-1] // scale), scale)
    k = fft2c(x.to(torch.complex64)) * ramp
    return (ifft2c(k[..., rows, cols]).abs() / scale).to(x.dtype)


def _mirror(k: torch.Tensor) -> torch.Tensor:
    """Each centred k-space sample moved to the frequency of opposite sign (conjugated if complex): a
    real image's spectrum equals its own mirror."""
    for dim in (-2, -1):
        k = torch.flip(k, [dim])
        if k.shape[dim] % 2 == 0:  # the centre is at n / 2: -n/2 has no partner inside, n/2 wraps to it
            k = torch.roll(k, 1, dim)
    return k.conj() if k.is_complex() else k


def kspace_consistency(x: torch.Tensor, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """``x`` (N, 1, H, W) with the central k-space band that ``lr`` (N, 1, H / scale, W / scale) measured
    replaced by ``lr``'s own: the data-consistency step of k-space super-resolution. It undoes
    :func:`kspace_truncation` on that band (exactly where the low-resolution image is real and non-negative,
    as a magnitude image of a real object is) and keeps the result real (an even-sized band's unpaired
    edge sets its mirror frequencies too). ``x = 0`` gives zero-filled interpolation."""
    _check_image(x, "kspace_consistency")
    _check_image(lr, "kspace_consistency")
    if x.shape[-2:] != (lr.shape[-2] * scale, lr.shape[-1] * scale):
        raise InputError(f"kspace_consistency: {tuple(x.shape[-2:])} is not {scale} x {tuple(lr.shape[-2:])}")
    ramp, rows, cols = _band(x.shape[-2:], lr.shape[-2:], scale)
    measured = torch.zeros(x.shape, dtype=torch.complex64)
    inside = torch.zeros(x.shape[-2:], dtype=torch.bool)
    measured[..., rows, cols] = fft2c(lr.to(torch.complex64) * scale) / ramp[rows, cols]
    inside[rows, cols] = True
    measured, inside = torch.where(inside, measured, _mirror(measured)), inside | _mirror(inside)
    return ifft2c(torch.where(inside, measured, fft2c(x.to(torch.complex64)))).real.to(x.dtype)


def zero_filled(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Zero-filled k-space interpolation of ``lr`` onto the ``scale`` x finer grid (the classical MR
    super-resolution baseline)."""
    return kspace_consistency(lr.new_zeros(*lr.shape[:-2], lr.shape[-2] * scale, lr.shape[-1] * scale), lr, scale)


# ---------------------------------------------------------------------------------- radiographs


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (``sigma`` in pixels, kernel to 3 sigma), reflected edges."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    return F.conv2d(y, kernel.view(1, 1, -1, 1))


def radiograph_lowres(x: torch.Tensor, scale: int, blur_sigma: float = 1.0, noise_std: float = 0.01,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """A radiograph from a ``scale`` x coarser detector: Gaussian blur (``blur_sigma`` in
    high-resolution pixels: focal spot and scintillator spread), area downsampling (detector
    elements integrate), then Gaussian noise of ``noise_std`` (image units) from ``generator``."""
    _check_scale(x, scale)
    lr = F.avg_pool2d(gaussian_blur(x, blur_sigma), scale)
    if noise_std > 0:
        lr = lr + noise_std * torch.randn(lr.shape, generator=generator, dtype=lr.dtype)
    return lr


# ----------------------------------------------------------------------------------------- CT


@functools.lru_cache(maxsize=8)
def _ramp(detectors: int, window: str) -> torch.Tensor:
    """The discrete ramp filter's frequency response for a zero-padded detector row (Kak & Slaney's
    spatial Ram-Lak kernel, so the DC term is right), optionally with the Shepp-Logan sinc window."""
    n = 1 << math.ceil(math.log2(2 * detectors))
    k = torch.arange(n, dtype=torch.float64)
    k = torch.where(k > n // 2, k - n, k)
    h = torch.zeros(n, dtype=torch.float64)
    h[0] = 0.25
    odd = k.remainder(2) == 1
    h[odd] = -1.0 / (math.pi * k[odd]) ** 2
    response = torch.fft.rfft(h).real
    if window == "shepp-logan":
        f = torch.fft.rfftfreq(n, dtype=torch.float64)
        response = response * torch.sinc(f)
    return response.to(torch.float32)


class ParallelBeam:
    """Parallel-beam CT of ``size`` x ``size`` images over 180 degrees with ``views`` views.

    The detector has one bin per image pixel and spans the image diagonal (``detectors`` >=
    ``size`` sqrt 2), so every view sees the whole square. ``forward`` is Joseph's ray-driven
    projector (each ray sampled once per image row or column, whichever it crosses more steeply,
    linear interpolation): line integrals in pixel units. ``fbp`` filters
    each view with the ramp (``filter``: ``"ram-lak"`` or ``"shepp-logan"``) and backprojects pixel by
    pixel (linear interpolation on the detector). ``backproject`` is that unfiltered backprojection,
    a close (not exact) adjoint of ``forward``. Work is done ``chunk`` views at a time.
    """

    def __init__(self, size: int, views: int = DEFAULT_VIEWS, filter: str = "ram-lak", chunk: int = 16):
        if filter not in ("ram-lak", "shepp-logan"):
            raise InputError(f"unknown FBP filter {filter!r}; use 'ram-lak' or 'shepp-logan'")
        self.size, self.views, self.filter, self.chunk = size, views, filter, chunk
        self.detectors = size + 2 * math.ceil(size * (math.sqrt(2) - 1) / 2)
        self.angles = torch.arange(views, dtype=torch.float32) * (math.pi / views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Line integrals (N, 1, views, detectors) of images (N, 1, size, size), in pixel units."""
        _check_image(x, "ParallelBeam.forward")
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise InputError(f"ParallelBeam built for {self.size} x {self.size} images got {tuple(x.shape[-2:])}")
        n, size, d = x.shape[0], self.size, self.detectors
        out = torch.empty(n, 1, self.views, d, dtype=x.dtype)
        # Joseph: the ray x cos + y sin = t crosses image row y at x = t / cos - y tan, sampled there
        # (linear in x); grid points are normalised for grid_sample(align_corners=False). The grid
        # buffer is reused across chunks (fresh large tensors cost page faults).
        y = (torch.arange(size, dtype=x.dtype) - (size - 1) / 2) * (2 / size)
        t = (torch.arange(d, dtype=x.dtype) - (d - 1) / 2) * (2 / size)
        grid = torch.empty(1, self.chunk, size, d, 2, dtype=x.dtype)
        grid[..., 1] = y[:, None]
        steep = torch.cos(self.angles).abs() >= torch.sin(self.angles).abs()
        # views near the y axis step through the rows; the others through the columns, as rows of
        # the transposed image at the mirrored angle pi/2 - theta (x and y swap roles)
        for image, views, angles in ((x, steep.nonzero()[:, 0], self.angles[steep]),
                                     (x.transpose(-2, -1), (~steep).nonzero()[:, 0], math.pi / 2 - self.angles[~steep])):
            channels = image.transpose(0, 1).contiguous().to(x.dtype)  # one grid serves the whole batch
            for start in range(0, len(views), self.chunk):
                chunk = angles[start:start + self.chunk].to(x.dtype)
                k = len(chunk)
                g = grid[:, :k]
                torch.sub(t[None, None, :] / torch.cos(chunk)[:, None, None],
                          y[None, :, None] * torch.tan(chunk)[:, None, None], out=g[0, ..., 0])
                samples = F.grid_sample(channels, g.reshape(1, k * size, d, 2), mode="bilinear",
                                        padding_mode="zeros", align_corners=False)
                sums = samples[0].view(n, k, size, d).sum(dim=2) / torch.cos(chunk).abs()[:, None]
                out[:, 0, views[start:start + self.chunk]] = sums
        return out

    def backproject(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Unfiltered pixel-driven backprojection (N, 1, views, detectors) -> (N, 1, size, size)."""
        n, size, d = sinogram.shape[0], self.size, self.detectors
        if sinogram.ndim != 4 or tuple(sinogram.shape[1:]) != (1, self.views, d):
            raise InputError(f"sinogram of shape {tuple(sinogram.shape)} does not fit this ParallelBeam "
                             f"(N, 1, {self.views}, {d})")
        coord = (torch.arange(size, dtype=sinogram.dtype) - (size - 1) / 2) * (2 / d)
        out = torch.zeros(n, size * size, dtype=sinogram.dtype)
        grid = torch.zeros(self.chunk, 1, size * size, 2, dtype=sinogram.dtype)  # detector row 0 of each view
        for start in range(0, self.views, self.chunk):
            angles = self.angles[start:start + self.chunk].to(sinogram.dtype)
            k = len(angles)
            # every pixel centre's detector coordinate t = x cos + y sin, normalised to [-1, 1]
            torch.add(coord[None, None, :] * torch.cos(angles)[:, None, None],
                      coord[None, :, None] * torch.sin(angles)[:, None, None], out=grid[:k, 0, :, 0].view(k, size, size))
            # one view per batch entry, the images as channels: (k, N, 1, d) sampled on (k, 1, size^2)
            rows = sinogram[:, :, start:start + k].permute(2, 0, 1, 3)
            samples = F.grid_sample(rows, grid[:k], mode="bilinear", padding_mode="zeros", align_corners=False)
            out += samples.sum(dim=0).view(n, size * size)
        return out.view(n, 1, size, size)

    def filter_views(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Each view convolved with the ramp filter (zero-padded FFT)."""
        response = _ramp(self.detectors, self.filter)
        n = 2 * (response.shape[0] - 1)
        spectrum = torch.fft.rfft(sinogram, n=n, dim=-1) * response.to(sinogram.dtype)
        return torch.fft.irfft(spectrum, n=n, dim=-1)[..., :self.detectors]

    def fbp(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Filtered backprojection: the image (N, 1, size, size) whose ``forward`` is ``sinogram``."""
        return self.backproject(self.filter_views(sinogram)) * (math.pi / self.views)


@functools.lru_cache(maxsize=4)
def _projector(size: int, views: int, filter: str) -> ParallelBeam:
    return ParallelBeam(size, views, filter)


def hu_to_mu(hu: torch.Tensor) -> torch.Tensor:
    """Linear attenuation (1/mm) of CT numbers, air (and anything below -1000 HU) at 0."""
    return (MU_WATER_PER_MM * (1 + hu / 1000)).clamp(min=0)


def mu_to_hu(mu: torch.Tensor) -> torch.Tensor:
    """CT numbers of linear attenuation (1/mm)."""
    return 1000 * (mu / MU_WATER_PER_MM - 1)


def ct_line_integrals(hu: torch.Tensor, pixel_mm: float, views: int = DEFAULT_VIEWS) -> torch.Tensor:
    """Noise-free line integrals (N, 1, views, detectors) of square slices (N, 1, S, S) in HU."""
    _check_image(hu, "ct_line_integrals")
    if hu.shape[-1] != hu.shape[-2]:
        raise InputError(f"CT simulation needs square slices, got {tuple(hu.shape[-2:])}; pad or crop first")
    return _projector(hu.shape[-1], views, "ram-lak").forward(hu_to_mu(hu.float())) * pixel_mm


def noisy_line_integrals(integrals: torch.Tensor, photons: float, generator: torch.Generator | None = None,
                         electronic_noise: float = 0.0) -> torch.Tensor:
    """Line integrals re-measured with ``photons`` incident photons per ray: Poisson counts (from
    ``generator``) plus Gaussian ``electronic_noise`` (std, in counts), floored at one count, log."""
    counts = torch.poisson(photons * torch.exp(-integrals), generator=generator)
    if electronic_noise > 0:
        counts = counts + electronic_noise * torch.randn(counts.shape, generator=generator)
    return -torch.log(counts.clamp(min=1.0) / photons)


def fbp_hu(integrals: torch.Tensor, size: int, pixel_mm: float, filter: str = "ram-lak") -> torch.Tensor:
    """Filtered backprojection of line integrals (N, 1, views, detectors) to ``size`` x ``size``
    slices in HU."""
    return mu_to_hu(_projector(size, integrals.shape[-2], filter).fbp(integrals) / pixel_mm)


def low_dose_ct(hu: torch.Tensor, pixel_mm: float, photons: float | None = DEFAULT_PHOTONS,
                generator: torch.Generator | None = None, *, electronic_noise: float = 0.0,
                views: int = DEFAULT_VIEWS, filter: str = "ram-lak") -> torch.Tensor:
    """Slices (N, 1, S, S) in HU re-acquired by parallel-beam CT and reconstructed by FBP, in HU.

    ``photons`` incident photons per ray (detector bin = one ``pixel_mm`` pixel), see
    ``noisy_line_integrals``; ``photons=None`` gives the noise-free FBP (its blur and streaks alone).
    Below -1000 HU is air (zero attenuation), so the reconstruction of such pixels is about -1000.
    """
    integrals = ct_line_integrals(hu, pixel_mm, views)
    if photons is not None:
        integrals = noisy_line_integrals(integrals, photons, generator, electronic_noise)
    return fbp_hu(integrals, hu.shape[-1], pixel_mm, filter).to(hu.dtype)
