"""Pipeline stages: diffusion denoising of CT series and super-resolution of MR series and radiographs.

Both run a restoration model (:mod:`medidiff.methods.restoration`: ResShift, Resfusion, RDDM, UPSR, the
one-step student or the UNet regression) slice by slice. Each slice is mapped to model units with the
model's intensity window (fixed Hounsfield units for CT, so HU stay HU; the slice's own percentiles for MR
and radiographs, as the models were trained), restored (large slices in overlapping tiles, without seams),
and mapped back to the source's units exactly. CT padding outside the scanner's field of view (below
-1500 HU: -2048, -3024) reaches the model as air and is written back as it was; noisy air is denoised.
Slice ``k`` samples with seed ``seed + k``: reproducible, and no noise pattern repeated through the volume.

Denoising keeps the grid. Super-resolution puts the image on a finer grid of the same field of view:
``scale`` times the rows and columns, spacing divided by ``scale``, and the first pixel centre moved by
half the change of pixel size along rows and columns (``old - (old_spacing - new_spacing) / 2``), so the
outer edges of the image stay where they were; the slice axis is untouched. The derived DICOM writer
takes PixelSpacing and ImagePositionPatient (or a radiograph's ImagerPixelSpacing) from that grid.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from monai.data import MetaTensor

from medidiff.errors import StageError
from medidiff.stages.basic import check_finite
from medidiff.stages.registry import ParameterError, register_stage

PROJECTION = ("CR", "DX")  # one radiograph per item: never a stack of slices
SINGLE_PASS = ("regression", "one_step")  # methods that restore in one network pass: no steps to choose
MIN_SIZE, MAX_SIZE = 16, 8192  # pixels per side, of the input and of the output
MAX_GROWN_VOXELS = 2**28  # a super-resolved series' voxels (the writer holds them as float64 too)
# CT values below PADDING_HU are no tissue and no (noisy) air: padding outside the scanner's field of view
# (-2048, -3024 HU). The model sees air there (as in training, where everything below air was air).
PADDING_HU, AIR_HU = -1500.0, -1000.0


@functools.lru_cache(maxsize=4)
def load_model(task: str, method: str, model: str = "default"):
    """The restoration model, loaded once per process: ``default`` = the shipped
    ``models/restoration/<task>/<method>``, or a folder holding ``<method>.json`` + ``.safetensors``."""
    from medidiff.methods.restoration import load_restoration

    return load_restoration(task=task, method=method, model=model)


class _Restoration:
    """What both stages share: parameters, checks, and the slice-by-slice restoration."""

    name = ""
    scale = 1
    model_tasks: dict[str, str] = {}  # modality -> the model's task
    refusal_hint = ""  # what to do with another modality
    size_hint = ""  # what to do with a slice of absurd size

    def __init__(self, method: str, steps: int | None, model: str, seed: int, tile: int, accelerate: dict | None):
        from medidiff.methods.restoration import METHODS, MODEL_NAME

        if not (isinstance(method, str) and MODEL_NAME.fullmatch(method)):
            raise ParameterError("method", method, f"one of {', '.join(METHODS)}, or a trained variant's name "
                                                   "(e.g. resshift15)")
        if method not in METHODS and model in ("", "default") and method not in self.shipped_models():
            raise ParameterError("method", method, f"one of {', '.join(METHODS)} or a shipped variant "
                                                   f"({', '.join(sorted(self.shipped_models() - set(METHODS)))})")
        if steps is not None and not 1 <= steps <= 1000:
            raise ParameterError("steps", steps, "1..1000, or null for the model's trained number of steps")
        if method in SINGLE_PASS and steps not in (None, 1):
            raise ParameterError("steps", steps, f"null or 1: {method} restores in a single pass")
        if not 64 <= tile <= 4096:
            raise ParameterError("tile", tile, "64..4096 pixels (the side of the square tiles of large slices)")
        if model not in ("", "default") and not model.startswith("models:/"):
            folder = Path(model).expanduser()
            for stem in (method, "regression") if method == "upsr" else (method,):  # UPSR: + its uncertainty estimator
                if not (folder / f"{stem}.json").is_file():
                    raise ParameterError("model", model, f"default, models:/<name>/<version> or a folder holding "
                                                         f"{stem}.json + {stem}.safetensors ({folder} has no {stem}.json)")
        self.transforms = []
        if accelerate is not None:
            from medidiff.acceleration import TransformError, transforms_from_spec
            from medidiff.acceleration.spec import prepare_shipped_int8

            try:
                self.transforms = transforms_from_spec(accelerate)
                prepare_shipped_int8(self.transforms, self.weights_files(method, model))
            except TransformError as e:
                raise ParameterError("accelerate", accelerate, f"transforms as in docs/acceleration.md ({e})") from None
        self.method, self.steps, self.model, self.seed, self.tile = method, steps, model, seed, tile

    def weights_files(self, method: str, model: str) -> list[Path]:
        """The weights files of ``method`` that this stage may load from ``model`` (one per task that has
        the method; none for a registered model, which is fetched when first used)."""
        from medidiff.model_registry import resolve_model_dir

        if model.startswith("models:/"):
            return []
        folders = {resolve_model_dir(model, default_name=f"restoration/{task}") for task in set(self.model_tasks.values())}
        return [folder / f"{method}.safetensors" for folder in sorted(folders) if (folder / f"{method}.json").is_file()]

    def shipped_models(self) -> set[str]:
        """The names of the models shipped for this stage's tasks."""
        from medidiff.methods.restoration import model_names
        from medidiff.resources import model_dir

        return {name for task in set(self.model_tasks.values())
                for name in model_names(model_dir(f"restoration/{task}"))}

    def task_of(self, modality: str) -> str:
        """The model task for ``modality``; StageError naming the pipeline to use for any other."""
        if modality not in self.model_tasks:
            shown = modality or "not set"
            raise StageError(f"{self.name}: modality is {shown}; expected {', '.join(self.model_tasks)} "
                             f"({self.refusal_hint})")
        return self.model_tasks[modality]

    def check_model(self, net, modality: str) -> None:
        """StageError when the model is for another scale or modality, or cannot sample in ``steps``."""
        config = net.config
        if int(config.get("scale", 1)) != self.scale or modality not in config.get("modalities", [modality]):
            raise StageError(f"{self.name}: the model {self.method} of {self.model!r} is for {config.get('task')} "
                             f"({', '.join(config.get('modalities', []))}, {config.get('scale')}x), not {modality} at "
                             f"{self.scale}x; give a model folder for that task")
        try:
            net.process(self.steps)
        except ValueError as exc:  # e.g. ResShift samples with its training T only
            raise StageError(f"{self.name}: steps: {self.steps} does not fit the {self.method} model ({exc}); "
                             f"remove steps to sample as trained ({config.get('steps')} steps)") from None

    def __call__(self, item: dict) -> dict:
        image = check_finite(item, self.name)
        modality = (getattr(item.get("source"), "modality", "") or "").upper()
        task = self.task_of(modality)
        if "LOCALIZER" in {str(v).upper() for v in getattr(item.get("source"), "image_type", ())}:
            raise StageError(f"{self.name}: a {modality} localizer (scout projection), not a slice; the models are "
                             "trained on slices, so localizers are left as they are")
        volume = image if image.ndim == 4 else image[..., None]  # (1, cols, rows, slices)
        if image.ndim not in (3, 4) or image.shape[0] != 1:
            raise StageError(f"{self.name}: image has shape {tuple(image.shape)}; expected one channel, "
                             "(1, cols, rows) or (1, cols, rows, slices)")
        cols, rows, slices = volume.shape[1:]
        if modality in PROJECTION and slices > 1:
            raise StageError(f"{self.name}: a {modality} item holds {slices} images; expected one 2-D radiograph "
                             "(projection series are processed image by image)")
        if min(rows, cols) < MIN_SIZE or max(rows, cols) * self.scale > MAX_SIZE:
            raise StageError(f"{self.name}: slices are {rows}x{cols} px; expected {MIN_SIZE}.."
                             f"{MAX_SIZE // self.scale} px per side{self.size_hint}")
        if self.scale > 1 and cols * rows * slices * self.scale**2 > MAX_GROWN_VOXELS:
            raise StageError(f"{self.name}: {slices} slices of {rows}x{cols} px would become "
                             f"{cols * rows * slices * self.scale**2 / 1e6:.0f} M voxels at {self.scale}x; at most "
                             f"{MAX_GROWN_VOXELS / 1e6:.0f} M (1 GiB as float32): split the series or use a smaller scale")
        net = load_model(task, self.method, self.model)
        self.check_model(net, modality)
        restored = self.restore(net, volume.as_tensor() if isinstance(volume, MetaTensor) else volume)
        restored = restored if image.ndim == 4 else restored[..., 0]
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        return item | {"image": MetaTensor(restored, meta=self.output_meta(meta, restored.shape[1:]))}

    def accelerated(self, net):
        """A context in which ``net``'s model function runs with this stage's transforms."""
        if not self.transforms:
            return contextlib.nullcontext()
        from medidiff.acceleration import applied

        return applied(net.model_fn, *self.transforms)

    def restore(self, net, volume: torch.Tensor) -> torch.Tensor:
        """``volume`` (1, cols, rows, slices) in modality units restored slice by slice, on the output grid."""
        from tqdm.auto import tqdm

        from medidiff.methods.restoration import normalise

        cols, rows, slices = volume.shape[1:]
        intensity = net.config["intensity"]
        hounsfield = intensity["kind"] == "hu"
        out = torch.empty(1, cols * self.scale, rows * self.scale, slices)
        with torch.no_grad(), self.accelerated(net):
            for k in tqdm(range(slices), desc=self.name, unit="slice", leave=False, disable=None if slices > 1 else True):
                plane = volume[0, :, :, k].T.float()[None, None]  # (1, 1, rows, cols)
                padding = plane < PADDING_HU if hounsfield else torch.zeros_like(plane, dtype=torch.bool)
                units, back = normalise(torch.where(padding, AIR_HU, plane), intensity)
                result = back(self.finish(units, net.restore(units, steps=self.steps, seed=self.seed + k, tile=self.tile)))
                if self.scale == 1:
                    result = torch.where(padding, plane, result)
                out[0, :, :, k] = result[0, 0].T
        return out

    def finish(self, degraded: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """The last step on a restored slice, in model units (here none)."""
        return restored

    def output_meta(self, meta: dict, shape: tuple[int, ...]) -> dict:
        """The image metadata of the output grid (denoising: unchanged)."""
        return meta


@register_stage("denoise", summary="Diffusion denoising of CT series, slice by slice, in Hounsfield units "
                                   "(ResShift, Resfusion, RDDM, UPSR, one-step student, UNet regression).")
class Denoise(_Restoration):
    """Denoise each slice of a CT series; the grid, the series geometry and Hounsfield units are kept.

    ``method``: resshift (default), resfusion, rddm, upsr, one_step, regression, or a shipped variant
    (``resshift15``: ResShift trained with T = 15); ``steps``: sampling steps
    (null: as trained); ``model``: ``default`` (shipped) or a folder with ``<method>.json`` +
    ``.safetensors``; ``seed``: slice ``k`` samples with ``seed + k``; ``tile``: side of the overlapping tiles of
    larger (output) slices; 512 keeps a 512 x 512 slice whole (tiles of 256 made it ~1.8x slower: 9 overlapping
    tiles hold 2.25x its pixels); ``accelerate``: model transforms, e.g. ``{deepcache: {interval: 3}}``
    (docs/acceleration.md).
    """

    task = "denoise"  # evaluation metrics and baseline (the noisy input): medidiff.evaluation.tasks
    model_folder = "restoration/ct_denoise"  # the shipped models an evaluation identifies (models/<folder>)
    name = "denoise"
    model_tasks = {"CT": "ct_denoise"}
    refusal_hint = "the denoisers are trained on low-dose CT"

    def __init__(self, method: str = "resshift", steps: int | None = None, model: str = "default", seed: int = 0,
                 tile: int = 512, accelerate: dict | None = None):
        super().__init__(method, steps, model, seed, tile, accelerate)


@register_stage("super_resolution", summary="Diffusion super-resolution (2x/4x) of MR series and CR/DX radiographs, "
                                            "on a finer grid of the same field of view.")
class SuperResolution(_Restoration):
    """``scale`` times the rows and columns of each MR slice or radiograph; PixelSpacing (ImagerPixelSpacing)
    divided by ``scale``, position moved so the image covers the same field of view.

    ``method``, ``steps``, ``model``, ``seed``, ``tile``, ``accelerate``: as for ``denoise``; ``scale``: 2 or 4 (the shipped
    models: MR 2x and 4x, radiographs 4x); ``data_consistency``: MR only, put the k-space band that the input
    slice measured back into the result (``medidiff.physics.degradations.kspace_consistency``).
    """

    task = "super_resolution"  # evaluation metrics and baseline (bicubic): medidiff.evaluation.tasks
    model_folder = "restoration"  # MR or radiograph models, by the input's modality: all are identified
    name = "super_resolution"
    refusal_hint = "CT series are denoised (the denoise stage, pipeline ct-denoising), not super-resolved"

    def __init__(self, method: str = "resshift", scale: int = 4, steps: int | None = None, model: str = "default",
                 seed: int = 0, tile: int = 512, accelerate: dict | None = None, data_consistency: bool = False):
        if scale not in (2, 4):
            raise ParameterError("scale", scale, "2 or 4")
        if not isinstance(data_consistency, bool):
            raise ParameterError("data_consistency", data_consistency, "true or false")
        self.scale, self.data_consistency = scale, data_consistency
        self.model_tasks = {"MR": f"mr_sr{scale}", "CR": f"xray_sr{scale}", "DX": f"xray_sr{scale}"}
        super().__init__(method, steps, model, seed, tile, accelerate)

    def check_model(self, net, modality: str) -> None:
        """As for every restoration stage, and StageError when ``data_consistency`` meets a non-MR image."""
        super().check_model(net, modality)
        if self.data_consistency and modality != "MR":
            raise StageError(f"{self.name}: data_consistency applies to MR slices (measured in k-space), not to a "
                             f"{modality} image; remove it from this stage or select MR series only")

    def finish(self, degraded: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """With ``data_consistency``, the restored MR slice with the input's k-space band put back."""
        if not self.data_consistency:
            return restored
        from medidiff.physics.degradations import kspace_consistency

        return kspace_consistency(restored, degraded, self.scale)

    @property
    def size_hint(self) -> str:
        return f" at {self.scale}x (shrink larger images first, e.g. with resize_in_plane)"

    def output_meta(self, meta: dict, shape: tuple[int, ...]) -> dict:
        """``meta`` with the affine, spacing and shape of the finer grid: in-plane axes divided by
        ``scale``, the first pixel centre moved by half the change of pixel size (same outer edges)."""
        affine = torch.as_tensor(meta.get("affine", torch.eye(4)), dtype=torch.float64).clone()
        in_plane = affine[:3, :2].clone()
        affine[:3, :2] = in_plane / self.scale
        affine[:3, 3] += in_plane @ torch.full((2,), (1 / self.scale - 1) / 2, dtype=torch.float64)
        spacing = torch.linalg.vector_norm(affine[:3, :len(shape)], dim=0)
        return meta | {"affine": affine, "spacing": spacing.numpy(), "spatial_shape": torch.tensor(shape).numpy()}
