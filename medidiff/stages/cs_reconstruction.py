"""Pipeline stage: compressed-sensing reconstruction of MR/CT slices (IDM, DDNM, FISTA-TV, zero-filled).

Measured k-space (an item with ``kspace``, from a raw k-space source: ``medidiff.io.kspace_series``) is
reconstructed from the file's own samples. The models work on real images with the real-domain
operator ``y_c = M F (S_c x)``, while measured k-space comes from complex images, often of several coils;
so the sensitivities ``S`` are estimated per slice from the fully sampled centre of k-space (the
calibration columns about ``W // 2``, Hann-windowed): the low-resolution coil images divided by their
root-sum-of-squares. They carry the object's low-resolution phase too, so ``x`` is a real,
magnitude-like image (one coil: ``S`` is a unit-magnitude phase map). The mask is the file's, or the
columns that hold data when it gives none. ``x`` is windowed to [0, 1] by the series' percentiles of the
zero-filled image, ``y`` shifted and scaled to match (``(y - lo A 1) / (hi - lo)``), and the result mapped
back (negative magnitudes clipped to 0). Sides that the U-Net cannot take (IDM, DDNM: multiples of its
``multiple``, 8) are reached by zero-padding k-space symmetrically (a finer grid of the same field of
view), and the result is brought back to the file's matrix by cropping its k-space.

For research and evaluation on existing series (no ``kspace``): each slice is measured with the chosen
operator (block CS at ``ratio``, or single-coil Cartesian k-space undersampled ``acceleration`` times)
and reconstructed from those measurements alone. Slices are windowed to [0, 1] by the series'
percentiles (as the models were trained), padded to a multiple of 32 px by reflection, and
mapped back to modality units afterwards. The zero-filled (``A^+ y``) image is kept as the extra
layer ``zero_filled`` for the panels.
"""

from __future__ import annotations

import functools

import torch
from monai.data import MetaTensor

from medidiff.display import percentile_window
from medidiff.errors import StageError
from medidiff.io.layout import swap_rows_cols
from medidiff.stages.basic import check_finite
from medidiff.stages.registry import ParameterError, register_stage

MODALITIES = ("MR", "CT", "OT")
MIN_SIZE, MAX_SIZE = 32, 2048
MULTIPLE = 32
MIN_CALIBRATION = 3  # fully sampled centre columns (symmetric about W // 2) to estimate coil sensitivities
CLASSICAL = ("fista_tv", "zero_filled")  # methods without model weights


@functools.lru_cache(maxsize=2)
def load_models(model: str = "default"):
    """The CS models, loaded once per process: ``default`` = the shipped ones, a folder, or
    ``models:/<name>/<version>``."""
    from medidiff.methods.cs_reconstruction import CSReconstruction
    from medidiff.model_registry import resolve_model_dir

    folder = resolve_model_dir(model, default_name="cs_reconstruction")
    if not (folder / "denoiser.json").exists():
        raise StageError(f"cs_reconstruction: no model weights in {folder} (expected denoiser.json, "
                         "idm_block_cs.json, idm_mri.json and their .safetensors)")
    return CSReconstruction(folder)


@register_stage("cs_reconstruction",
                summary="Reconstruct measured k-space, or undersample each MR/CT slice (block CS or Cartesian "
                        "k-space) and reconstruct it (IDM, DDNM, FISTA-TV or zero-filled).")
class CSReconstructionStage:
    """``method``: idm (default), ddnm, fista_tv, zero_filled; ``measurement``: cartesian_mri (with
    ``acceleration`` 2..16 and ``mask`` random/equispaced) or block_cs (with ``ratio`` in (0, 1]);
    ``seed`` fixes the mask or matrix; ``ddnm_steps`` for DDNM. Measured k-space uses ``method`` (and
    ``ddnm_steps``, ``seed``) only: its mask is the file's."""

    task = "cs_reconstruction"

    def __init__(self, method: str = "idm", measurement: str = "cartesian_mri", ratio: float = 0.1,
                 acceleration: int = 4, mask: str = "random", seed: int = 0, ddnm_steps: int = 100,
                 model: str = "default"):
        from medidiff.methods.cs_reconstruction import KINDS, METHODS

        if method not in METHODS:
            raise ParameterError("method", method, f"one of {', '.join(METHODS)}")
        if measurement not in KINDS:
            raise ParameterError("measurement", measurement, f"one of {', '.join(KINDS)}")
        if not 0 < ratio <= 1:
            raise ParameterError("ratio", ratio, "a sampling ratio in (0, 1], e.g. 0.1 for 10 %")
        if not 2 <= acceleration <= 16:
            raise ParameterError("acceleration", acceleration, "2..16")
        if mask not in ("random", "equispaced"):
            raise ParameterError("mask", mask, "random or equispaced")
        if not 1 <= ddnm_steps <= 1000:
            raise ParameterError("ddnm_steps", ddnm_steps, "1..1000")
        self.method, self.measurement, self.model = method, measurement, model
        self.options = {"ratio": ratio, "acceleration": acceleration, "mask": mask, "seed": seed}
        self.ddnm_steps = ddnm_steps

    def solve(self, y: torch.Tensor, op) -> torch.Tensor:
        """The stage's method on measurements ``y`` of ``op`` (images in [0, 1] units); the classical
        methods need no model weights."""
        if self.method in CLASSICAL:
            from medidiff.methods import classical_cs

            return getattr(classical_cs, self.method)(op, y)
        models = load_models(self.model)
        return models.reconstruct(y, op, self.method, ddnm_steps=self.ddnm_steps, seed=self.options["seed"])

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and zero-filled image of one [0, 1] slice (rows, cols)."""
        from medidiff.methods.cs_reconstruction import make_operator
        from medidiff.physics.measurements import pad_to_multiple

        padded, crop = pad_to_multiple(x[None, None], MULTIPLE)
        op = make_operator(self.measurement, tuple(padded.shape[-2:]), **self.options)
        y = op(padded)
        return crop(self.solve(y, op))[0, 0], crop(op.pinv(y))[0, 0]

    def reconstruct_measured(self, kspace: torch.Tensor, mask: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """The image (slices, H, W) of measured k-space (slices, coils, H, W) sampled on ``mask`` (H, W), in
        the zero-filled image's units; ``lo``, ``hi``: its window to [0, 1]."""
        from medidiff.physics.measurements import CartesianMRI

        multiple = 1 if self.method in CLASSICAL else load_models(self.model).denoiser.multiple
        shape = tuple(-(-n // multiple) * multiple for n in kspace.shape[-2:])
        radius = calibration_radius(mask)  # of the file's grid: padding keeps the centre column the centre
        mask = pad_kspace(mask.float(), shape, scale=False).bool()
        y_all = pad_kspace(kspace, shape) * mask
        sensitivities = estimate_sensitivities(y_all, radius)
        out = []
        for s in range(len(kspace)):
            op = CartesianMRI(mask, sensitivities[s])
            y = (y_all[s:s + 1] - lo * op(torch.ones(1, 1, *shape))) / (hi - lo)
            out.append(crop_image(self.solve(y, op)[0, 0] * (hi - lo) + lo, tuple(kspace.shape[-2:])))
        return torch.stack(out).clamp(min=0)

    def measured(self, item: dict, image: torch.Tensor) -> dict:
        """The item with ``image`` reconstructed from its measured k-space (``item["kspace"]``)."""
        if self.measurement != "cartesian_mri":
            raise StageError(f"cs_reconstruction: the source is measured k-space, reconstructed with its own "
                             f"Cartesian mask; measurement: {self.measurement} does not apply (remove it)")
        kspace = item["kspace"]
        data = kspace.kspace
        slices, _, rows, cols = data.shape
        expected = (1, cols, rows) + ((slices,) if image.ndim == 4 else ())
        if tuple(image.shape) != expected:
            raise StageError(f"cs_reconstruction: the image {tuple(image.shape)} no longer matches its k-space "
                             f"{tuple(data.shape)}; put cs_reconstruction first in the pipeline")
        if not torch.isfinite(torch.view_as_real(data)).all():
            raise StageError("cs_reconstruction: the k-space holds NaN or infinite values; export the raw data again")
        _check_size(rows, cols)
        mask = sampling_mask(data, kspace.mask)
        plain = image.as_tensor() if isinstance(image, MetaTensor) else image
        lo, hi = percentile_window(plain.float())
        with torch.no_grad():
            recon = self.reconstruct_measured(data, mask, lo, hi)  # (slices, H, W)
        recon = recon.permute(2, 1, 0)[None]  # (1, W, H, slices)
        recon = recon if image.ndim == 4 else recon[..., 0]
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        return item | {"image": MetaTensor(recon.float().contiguous(), meta=meta)}

    def __call__(self, item: dict) -> dict:
        image = check_finite(item, "cs_reconstruction")
        source = item.get("source")
        modality = (getattr(source, "modality", "") or "").upper()
        if modality and modality not in MODALITIES:
            raise StageError(f"cs_reconstruction: modality is {modality}; expected MR or CT slices")
        if "kspace" in item:
            return self.measured(item, image)
        volume = image if image.ndim == 4 else image[..., None]
        cols, rows = volume.shape[1:3]
        _check_size(rows, cols)
        data = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
        lo, hi = percentile_window(data.float())
        recon, zero = torch.empty_like(data, dtype=torch.float32), torch.empty_like(data, dtype=torch.float32)
        with torch.no_grad():
            for k in range(data.shape[-1]):
                x = ((swap_rows_cols(data[..., k].float())[0] - lo) / (hi - lo)).clamp(0, 1)
                r, z = self.reconstruct(x)
                recon[..., k] = swap_rows_cols(r.clamp(0, 1)[None]) * (hi - lo) + lo
                zero[..., k] = swap_rows_cols(z[None]) * (hi - lo) + lo
        if image.ndim == 3:
            recon, zero = recon[..., 0], zero[..., 0]
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        return item | {"image": MetaTensor(recon, meta=meta), "zero_filled": MetaTensor(zero, meta=dict(meta))}


def _check_size(rows: int, cols: int) -> None:
    if min(rows, cols) < MIN_SIZE or max(rows, cols) > MAX_SIZE:
        raise StageError(f"cs_reconstruction: slices are {rows}x{cols} px; expected {MIN_SIZE}..{MAX_SIZE} px per side")


def sampling_mask(kspace: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The sampling mask (H, W) of measured k-space (slices, coils, H, W): the file's, checked against the
    data (a sampled column must hold data), or the columns that hold data when the file gives none."""
    held = (kspace != 0).any(dim=(0, 1))  # (H, W)
    if mask is None:
        columns = held.any(0)
        if not columns.any():
            raise StageError("cs_reconstruction: the k-space holds only zeros; export the raw data again")
        return columns.expand_as(held).clone()
    empty = int((mask.any(0) & ~held.any(0)).sum())
    if empty:
        raise StageError(f"cs_reconstruction: the file's mask does not match its k-space: {empty} sampled "
                         "column(s) hold no data; write the mask of this acquisition (or none, to infer it)")
    return mask.bool()


def calibration_radius(mask: torch.Tensor) -> int:
    """The largest ``r`` such that the columns ``W // 2 - r .. W // 2 + r`` of ``mask`` (H, W) are fully
    sampled: a calibration region symmetric about the centre, so a real image's low-resolution version
    stays real. StageError when it is narrower than :data:`MIN_CALIBRATION` columns."""
    full = mask.all(0).tolist()
    centre, radius = len(full) // 2, -1
    while centre - radius - 1 >= 0 and centre + radius + 1 < len(full) and full[centre - radius - 1] \
            and full[centre + radius + 1]:
        radius += 1
    if 2 * radius + 1 < MIN_CALIBRATION:
        raise StageError(f"cs_reconstruction: the centre of k-space has {max(0, 2 * radius + 1)} fully sampled "
                         f"column(s) about W // 2; coil sensitivities need at least {MIN_CALIBRATION} (sample a "
                         "fully sampled centre, as fastMRI masks do)")
    return radius


def estimate_sensitivities(kspace: torch.Tensor, radius: int) -> torch.Tensor:
    """Coil sensitivities (slices, coils, H, W) from the calibration columns ``W // 2 +- radius`` of centred
    k-space (slices, coils, H, W): the low-resolution coil images (a Hann-windowed centre box, symmetric,
    with rows in proportion to the columns) divided by their root-sum-of-squares; one coil: a
    unit-magnitude phase map."""
    from medidiff.physics.measurements import ifft2c, rss

    h, w = kspace.shape[-2:]
    row_radius = min((h - 1) // 2, max(radius, round(radius * h / w)))
    window = torch.zeros(h, w)
    window[h // 2 - row_radius:h // 2 + row_radius + 1, w // 2 - radius:w // 2 + radius + 1] = torch.outer(
        _hann(2 * row_radius + 1), _hann(2 * radius + 1))
    low = ifft2c(kspace * window)
    norm = rss(low)
    return low / torch.where(norm > 0, norm, torch.ones_like(norm))


def _hann(n: int) -> torch.Tensor:
    """A Hann window of ``n`` points, positive at both ends (the end zeros of a window of ``n + 2``)."""
    return torch.hann_window(n + 2, periodic=False, dtype=torch.float64)[1:-1].float()


def pad_kspace(kspace: torch.Tensor, shape: tuple[int, int], scale: bool = True) -> torch.Tensor:
    """Centred k-space (..., H, W) zero-padded symmetrically to ``shape`` (index ``H // 2`` stays the centre):
    the image on a finer grid of the same field of view, in the same units when ``scale`` (orthonormal FFT)."""
    (h, w), (nh, nw) = kspace.shape[-2:], shape
    if (h, w) == (nh, nw):
        return kspace
    top, left = nh // 2 - h // 2, nw // 2 - w // 2
    padded = torch.nn.functional.pad(kspace, (left, nw - w - left, top, nh - h - top))
    return padded * ((nh * nw) / (h * w)) ** 0.5 if scale else padded


def crop_image(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A real image (H', W') brought back to ``shape`` by cropping its centred k-space: the inverse of
    :func:`pad_kspace` (then the real part) on the band the file measured. An even side's unpaired edge
    frequency ``-n / 2`` gets back the half that the finer grid put at ``+n / 2``."""
    from medidiff.physics.measurements import fft2c, ifft2c

    (nh, nw), (h, w) = image.shape[-2:], shape
    if (nh, nw) == (h, w):
        return image
    band = fft2c(image.to(torch.complex64))
    for axis, n in ((-2, h), (-1, w)):
        first = band.shape[axis] // 2 - n // 2
        cropped = band.narrow(axis, first, n).clone()
        if n % 2 == 0 and band.shape[axis] > n:
            cropped.select(axis, 0).add_(band.select(axis, first + n))
        band = cropped
    return ifft2c(band * ((h * w) / (nh * nw)) ** 0.5).real
