"""Pipeline stage: compressed-sensing reconstruction of MR/CT slices (IDM, DDNM, FISTA-TV, zero-filled).

For research and evaluation on existing series: each slice is measured with the chosen operator
(block CS at ``ratio``, or single-coil Cartesian k-space undersampled ``acceleration`` times) and
reconstructed from those measurements alone. Slices are windowed to [0, 1] by the series'
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
                summary="Undersample each MR/CT slice (block CS or Cartesian k-space) and reconstruct it "
                        "(IDM, DDNM, FISTA-TV or zero-filled).")
class CSReconstructionStage:
    """``method``: idm (default), ddnm, fista_tv, zero_filled; ``measurement``: cartesian_mri (with
    ``acceleration`` 2..16 and ``mask`` random/equispaced) or block_cs (with ``ratio`` in (0, 1]);
    ``seed`` fixes the mask or matrix; ``ddnm_steps`` for DDNM."""

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

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and zero-filled image of one [0, 1] slice (rows, cols)."""
        from medidiff.methods.cs_reconstruction import make_operator
        from medidiff.physics.measurements import pad_to_multiple

        padded, crop = pad_to_multiple(x[None, None], MULTIPLE)
        op = make_operator(self.measurement, tuple(padded.shape[-2:]), **self.options)
        y = op(padded)
        models = load_models(self.model)
        out = models.reconstruct(y, op, self.method, ddnm_steps=self.ddnm_steps, seed=self.options["seed"])
        return crop(out)[0, 0], crop(op.pinv(y))[0, 0]

    def __call__(self, item: dict) -> dict:
        image = check_finite(item, "cs_reconstruction")
        source = item.get("source")
        modality = (getattr(source, "modality", "") or "").upper()
        if modality and modality not in MODALITIES:
            raise StageError(f"cs_reconstruction: modality is {modality}; expected MR or CT slices")
        volume = image if image.ndim == 4 else image[..., None]
        cols, rows = volume.shape[1:3]
        if min(rows, cols) < MIN_SIZE or max(rows, cols) > MAX_SIZE:
            raise StageError(f"cs_reconstruction: slices are {rows}x{cols} px; expected {MIN_SIZE}..{MAX_SIZE} px per side")
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
