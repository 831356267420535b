"""Pipeline stage: bone suppression of a CR/DX chest radiograph with BS-LDM.

The model runs at its own resolution (aspect kept by padding). Only the predicted bone layer
(cxr - soft at model resolution) is upsampled to the source size and subtracted from the
full-resolution original, so the radiograph's fine detail is kept.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from medidiff.display import percentile_window
from medidiff.errors import StageError
from medidiff.io.layout import swap_rows_cols
from medidiff.stages.basic import check_finite
from medidiff.stages.registry import ParameterError, register_stage

MODALITIES = ("CR", "DX")
MIN_SIZE, MAX_SIZE = 128, 8192


@functools.lru_cache(maxsize=4)
def load_model(model: str = "default"):
    """The BS-LDM model, loaded once per process: ``default`` = the shipped weights, a folder, or a
    registered model ``models:/<name>/<version>`` (see ``medidiff models register``)."""
    from medidiff.methods.bone_suppression import BSLDM
    from medidiff.model_registry import resolve_model_dir

    folder = resolve_model_dir(model, default_name="bone_suppression")
    if not (folder / "ldm.json").exists():
        raise StageError(f"bone_suppression: no model weights in {folder} (expected ldm.json + ldm.safetensors)")
    return BSLDM.from_pretrained(folder)


def _check(image: torch.Tensor, source: object) -> torch.Tensor:
    """Refuse what the model was not made for; return the image as (1, rows, cols) float32."""
    modality = (getattr(source, "modality", "") or "").upper()
    if modality and modality not in MODALITIES:
        raise StageError(f"bone_suppression: modality is {modality}; expected a chest radiograph (CR or DX)")
    if image.ndim == 4 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 3 or image.shape[0] != 1:
        raise StageError(f"bone_suppression: image has shape {tuple(image.shape)}; expected a single 2-D "
                         "projection (1, cols, rows), not a 3-D volume or multi-channel image")
    rows, cols = image.shape[2], image.shape[1]
    if min(rows, cols) < MIN_SIZE or max(rows, cols) > MAX_SIZE:
        raise StageError(f"bone_suppression: image is {rows}x{cols} px; expected {MIN_SIZE}..{MAX_SIZE} px per side")
    return swap_rows_cols(image.as_tensor() if isinstance(image, MetaTensor) else image).float()


@register_stage("bone_suppression", summary="BS-LDM: remove ribs/clavicles from a chest radiograph (CR/DX PA/AP).")
class BoneSuppression:
    """Bone suppression; ``steps``: sampling steps of the model's sampler (DDPM respaced from 1000
    training steps; 50 measured as good as 1000); ``keep_bone_layer``: also return item['bone'];
    ``accelerate``: model transforms, e.g. ``{deepcache: {interval: 3}}`` (docs/acceleration.md)."""

    task = "bone_suppression"  # evaluation metrics and baseline: medidiff.evaluation.tasks

    def __init__(self, steps: int = 50, model: str = "default", keep_bone_layer: bool = True, seed: int = 0,
                 accelerate: dict | None = None):
        if not 1 <= steps <= 1000:
            raise StageError(f"bone_suppression: steps is {steps}; expected 1..1000")
        self.steps, self.model, self.keep_bone_layer, self.seed = steps, model, keep_bone_layer, seed
        self.transforms = []
        if accelerate is not None:
            from medidiff.acceleration import TransformError, transforms_from_spec
            from medidiff.acceleration.spec import prepare_shipped_int8
            from medidiff.model_registry import resolve_model_dir

            try:
                self.transforms = transforms_from_spec(accelerate)
                if not model.startswith("models:/"):  # a registered model is fetched when first used
                    folder = resolve_model_dir(model, default_name="bone_suppression")
                    prepare_shipped_int8(self.transforms, [folder / "ldm.safetensors"])
            except TransformError as e:
                raise ParameterError("accelerate", accelerate, f"transforms as in docs/acceleration.md ({e})") from None

    def bone_layer(self, norm: torch.Tensor) -> torch.Tensor:
        """Predicted bone layer (1, rows, cols) for a normalised image, at the image's own size."""
        net = load_model(self.model)
        res = int(net.config.get("resolution", 256))
        rows, cols = norm.shape[-2:]
        scale = res / max(rows, cols)
        h, w = max(1, round(rows * scale)), max(1, round(cols * scale))
        small = F.interpolate(norm[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        small = small.clamp(0, 1)
        pad = (0, res - w, 0, res - h)
        lr = F.pad(small, pad, mode="replicate")
        from medidiff.acceleration import applied

        with applied(net.model_fn, *self.transforms):
            soft = net.suppress(lr, self.steps, seed=self.seed)
        bone_lr = (lr - soft)[..., :h, :w]
        return F.interpolate(bone_lr, size=(rows, cols), mode="bicubic", align_corners=False)[0]

    def __call__(self, item: dict) -> dict:
        image = check_finite(item, "bone_suppression")
        x = _check(image, item.get("source"))
        lo, hi = percentile_window(x)
        with torch.no_grad():
            bone = self.bone_layer((x - lo) / (hi - lo)) * (hi - lo)
        out = dict(item)
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        out["image"] = MetaTensor(swap_rows_cols(x - bone).to(image.dtype if image.is_floating_point() else torch.float32),
                                  meta=meta)
        if self.keep_bone_layer:
            out["bone"] = MetaTensor(swap_rows_cols(bone), meta=dict(meta))
        return out

