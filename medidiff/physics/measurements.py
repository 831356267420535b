"""Measurement operators for compressed-sensing reconstruction: block CS and Cartesian MRI.

Every operator maps real images ``x`` of shape ``(B, 1, H, W)`` to measurements ``y`` and back
(``adjoint``, a cheap ``pinv`` and the range-null-space step ``project``), batched and differentiable.
They are written here with ``torch.fft`` and ``torch.einsum`` rather than taken from deepinv, whose
wheel pins another torch (a CUDA build) that this project cannot install beside its own.

k-space follows fastMRI's *centred* convention: ``fft2c(x) = fftshift(fft2(ifftshift(x), "ortho"))``,
so the zero frequency sits at index ``(H // 2, W // 2)`` and masks are drawn in that layout.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from medidiff.errors import InputError


class Operator(abc.ABC):
    """A linear measurement ``y = A x`` of real images ``x`` (B, 1, H, W) built for ``image_shape``.

    ``adjoint`` is the exact adjoint for the real inner product ``<a, b> = Re(sum(conj(a) * b))``.
    """

    image_shape: tuple[int, int]
    measurement_shape: tuple[int, ...]  # one sample's measurement shape (no batch axis)

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Measurements ``A x`` of images (B, 1, H, W)."""

    @abc.abstractmethod
    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``: real images (B, 1, H, W)."""

    @abc.abstractmethod
    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A cheap pseudo-inverse ``A^+ y`` (see each operator for when it is exact)."""

    @abc.abstractmethod
    def to(self, device: torch.device | str) -> Operator:
        """This operator with its tensors on ``device`` (returns ``self``)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The range-null-space step ``x - A^+(A x - y)``: ``x``'s null-space part, ``y``'s range part."""
        return x - self.pinv(self.forward(x) - y)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != self.image_shape or x.is_complex():
            raise InputError(f"{type(self).__name__} takes real images (B, 1, {self.image_shape[0]}, "
                             f"{self.image_shape[1]}), got {tuple(x.shape)} {x.dtype}; build the operator "
                             "for this image size")

    def _check_measurement(self, y: torch.Tensor) -> None:
        if y.ndim != len(self.measurement_shape) + 1 or tuple(y.shape[1:]) != self.measurement_shape:
            raise InputError(f"{type(self).__name__} measurements must be (B, "
                             f"{', '.join(map(str, self.measurement_shape))}), got {tuple(y.shape)}; "
                             "pass measurements made by this operator")


# ------------------------------------------------------------------------------------- block CS


def pad_to_multiple(x: torch.Tensor, multiple: int = 32,
                    mode: str = "reflect") -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` (..., H, W) padded at the bottom and right to multiples of ``multiple``, and the function
    that crops a result back to (H, W). ``mode`` as ``torch.nn.functional.pad`` (``reflect`` keeps
    the padded blocks image-like; it falls back to ``replicate`` when the padding exceeds the image)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    flat = x.reshape(-1, 1, h, w)
    padded = F.pad(flat, (0, pw, 0, ph), mode=mode).reshape(*x.shape[:-2], h + ph, w + pw)
    return padded, lambda t: t[..., :h, :w]


@functools.lru_cache(maxsize=4)
def _orthogonal(size: int, seed: int) -> torch.Tensor:
    gaussian = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).T


def orthogonal_rows(rows: int, size: int, seed: int) -> torch.Tensor:
    """``rows`` orthonormal rows (float64, ``(rows, size)``) of a random orthogonal matrix: QR of a
    seeded Gaussian matrix, signs fixed by ``diag(R) > 0`` so the result does not depend on LAPACK
    (cached: every ratio of one seed shares the matrix)."""
    return _orthogonal(size, seed)[:rows].contiguous()


class BlockCS(Operator):
    """Block compressed sensing (IDM, after Shi et al.): every ``block x block`` tile is measured by the
    same ``q = ceil(ratio * block^2)`` rows ``Phi`` of a fixed random orthogonal matrix.

    ``y`` is (B, q, H / block, W / block); tiles are vectorised row by row. ``Phi Phi^T = I``, so
    ``pinv = adjoint`` is the exact pseudo-inverse (``A A^+ y = y`` for every ``y``).
    """

    def __init__(self, ratio: float, image_shape: tuple[int, int], block: int = 32, seed: int = 0):
        if not 0 < ratio <= 1:
            raise InputError(f"block CS ratio must be in (0, 1], got {ratio}; e.g. 0.1 for 10 %")
        h, w = image_shape
        if h % block or w % block:
            raise InputError(f"block CS needs image sides that are multiples of {block}, got {h}x{w}; "
                             f"pad the images first (medidiff.physics.measurements.pad_to_multiple)")
        self.ratio, self.block, self.seed = ratio, block, seed
        self.image_shape = (h, w)
        self.rows = math.ceil(ratio * block * block - 1e-9)
        self.matrix = orthogonal_rows(self.rows, block * block, seed)  # Phi: (q, block^2), float64, cast per call
        self.measurement_shape = (self.rows, h // block, w // block)

    def to(self, device):
        self.matrix = self.matrix.to(device)
        return self

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (block^2, B * H / block * W / block): one column per tile, so that a single
        matrix product measures the whole batch."""
        b, k = x.shape[0], self.block
        h, w = self.image_shape
        return x.reshape(b, h // k, k, w // k, k).permute(2, 4, 0, 1, 3).reshape(k * k, -1)

    def _untile(self, columns: torch.Tensor) -> torch.Tensor:
        k = self.block
        h, w = self.image_shape
        return columns.reshape(k, k, -1, h // k, w // k).permute(2, 3, 0, 4, 1).reshape(-1, 1, h, w)

    def forward(self, x):
        self._check_image(x)
        q, (bh, bw) = self.rows, self.measurement_shape[1:]
        y = self.matrix.to(x.dtype) @ self._tiles(x)
        return y.reshape(q, x.shape[0], bh, bw).transpose(0, 1)

    def adjoint(self, y):
        self._check_measurement(y)
        return self._untile(self.matrix.to(y.dtype).T @ y.transpose(0, 1).reshape(self.rows, -1))

    def pinv(self, y):
        return self.adjoint(y)


# -------------------------------------------------------------------------------- Cartesian MRI


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two axes (fastMRI's ``fft2c``)."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT over the last two axes (fastMRI's ``ifft2c``)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def rss(coil_images: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Root-sum-of-squares coil combination (keeps ``dim`` with size 1): multi-coil k-space without
    sensitivities becomes ``rss(ifft2c(kspace))``."""
    return torch.sqrt((coil_images.abs() ** 2).sum(dim=dim, keepdim=True))


def default_center_fraction(acceleration: int) -> float:
    """fastMRI's fully sampled centre: 0.08 of the columns at 4x, 0.04 at 8x (``0.32 / acceleration``)."""
    return 0.32 / acceleration


def cartesian_mask(image_shape: tuple[int, int], acceleration: int, kind: str = "random",
                   center_fraction: float | None = None, seed: int = 0) -> torch.Tensor:
    """Bool (H, W) mask of sampled phase-encode columns (the W axis) in centred k-space.

    ``round(W / acceleration)`` columns in all: the ``round(center_fraction * W)`` columns about
    ``W // 2`` and the rest drawn from the outer columns (``random``: uniformly without replacement;
    ``equispaced``: evenly spaced over the outer columns from a seeded offset). Unlike fastMRI's
    mask functions, whose column count is only right on average, the nominal rate is met exactly.
    """
    h, w = image_shape
    if kind not in ("random", "equispaced"):
        raise InputError(f"mask kind must be 'random' or 'equispaced', got {kind!r}")
    if acceleration < 1:
        raise InputError(f"acceleration must be at least 1, got {acceleration}")
    fraction = default_center_fraction(acceleration) if center_fraction is None else center_fraction
    total = max(1, round(w / acceleration))
    center = min(total, round(fraction * w))
    first = w // 2 - center // 2
    inner = np.arange(first, first + center)
    outer = np.setdiff1d(np.arange(w), inner)
    extra = total - center
    rng = np.random.default_rng(seed)
    if kind == "random":
        chosen = rng.choice(outer, size=extra, replace=False)
    else:
        spacing = len(outer) / max(extra, 1)
        chosen = outer[np.floor(rng.uniform(0, spacing) + spacing * np.arange(extra)).astype(int)]
    columns = np.zeros(w, bool)
    columns[inner] = True
    columns[chosen] = True
    return torch.from_numpy(np.broadcast_to(columns, (h, w)).copy())


def birdcage_sensitivities(image_shape: tuple[int, int], coils: int = 8, radius: float = 1.5) -> torch.Tensor:
    """Synthetic coil maps (complex64, (coils, H, W)) of coils on a circle of ``radius`` (in half
    image widths) about the centre, magnitude ``1 / distance`` and a phase turning with the coil
    angle (the birdcage model of sigpy's ``birdcage_maps``), normalised so ``sum |S|^2 = 1``."""
    h, w = image_shape
    angle = 2 * np.pi * np.arange(coils)[:, None, None] / coils
    y = (np.arange(h)[None, :, None] - h / 2) / (h / 2) - radius * np.sin(angle)
    x = (np.arange(w)[None, None, :] - w / 2) / (w / 2) - radius * np.cos(angle)
    maps = np.exp(1j * (np.arctan2(x, -y) - angle)) / np.hypot(x, y)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))
    return torch.from_numpy(maps.astype(np.complex64))


class CartesianMRI(Operator):
    """Cartesian MRI: ``y_c = M * fft2c(S_c * x)`` for each coil ``c`` (centred k-space, complex).

    Single coil when ``sensitivities`` is None (``y``: (B, 1, H, W)); else ``sensitivities`` is
    complex (C, H, W), normalised here so ``sum_c |S_c|^2 = 1`` (``y``: (B, C, H, W)).
    ``adjoint(y) = Re(sum_c conj(S_c) * ifft2c(M * y_c))``.

    ``pinv = adjoint``. For complex single-coil images this is exact (``A A^H = M``, the identity on
    sampled k-space). Real images break that: ``A A^T y = (M y + M F conj(F^H M y)) / 2``, which is ``y``
    only for measurements of a real image under a point-symmetric mask (random masks are not), and
    with several coils ``S S^H`` is a projection, not the identity. ``project`` is then a step toward
    consistency (a gradient step of size 1, since ``||A|| <= 1``), not an exact projection.
    """

    def __init__(self, mask: torch.Tensor, sensitivities: torch.Tensor | None = None):
        if mask.ndim != 2:
            raise InputError(f"MRI mask must be (H, W), got shape {tuple(mask.shape)}; "
                             "make one with cartesian_mask(image_shape, acceleration)")
        self.image_shape = tuple(mask.shape)
        self.mask = mask.bool()
        if sensitivities is not None:
            if sensitivities.ndim != 3 or tuple(sensitivities.shape[1:]) != self.image_shape:
                raise InputError(f"coil sensitivities must be (C, {self.image_shape[0]}, {self.image_shape[1]}) "
                                 f"like the mask, got {tuple(sensitivities.shape)}")
            s = sensitivities.to(torch.complex64)
            norm = torch.sqrt((s.abs() ** 2).sum(0, keepdim=True))
            sensitivities = s / torch.where(norm > 0, norm, torch.ones_like(norm))
        self.sensitivities = sensitivities
        self.coils = 1 if sensitivities is None else sensitivities.shape[0]
        self.measurement_shape = (self.coils, *self.image_shape)

    def to(self, device):
        self.mask = self.mask.to(device)
        if self.sensitivities is not None:
            self.sensitivities = self.sensitivities.to(device)
        return self

    def forward(self, x):
        self._check_image(x)
        coil_images = x if self.sensitivities is None else x * self.sensitivities
        return fft2c(coil_images) * self.mask

    def adjoint(self, y):
        self._check_measurement(y)
        if not y.is_complex():
            raise InputError(f"MRI measurements must be complex k-space, got {y.dtype}")
        coil_images = ifft2c(y * self.mask)
        if self.sensitivities is not None:
            coil_images = (coil_images * self.sensitivities.conj()).sum(1, keepdim=True)
        return coil_images.real

    def pinv(self, y):
        return self.adjoint(y)
