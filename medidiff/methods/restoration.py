"""Diffusion restoration (denoising and super-resolution): one backbone, the differences in the processes.

Every method is the reversible U-Net of :mod:`medidiff.nets.reversible_unet` (or, with ``model.dit``,
the small DiT of :mod:`medidiff.nets.dit`) on ``[x_t, y]`` (the
current sample and the degraded image ``y``; for super-resolution ``y`` is the low-resolution image
upsampled bicubically, :func:`medidiff.physics.degradations.upsample`), run by a residual process:
ResShift and UPSR (:mod:`medidiff.diffusion.resshift`), Resfusion (:mod:`medidiff.diffusion.resfusion`)
or RDDM (:mod:`medidiff.diffusion.rddm`). Two one-pass networks share the interface: ``regression``
(the U-Net regressing ``x0 - y`` from ``y``, the same-budget baseline and UPSR's uncertainty
estimator) and ``one_step`` (a student with its teacher's architecture, distilled from the multi-step
teacher, mapping the teacher's starting point to ``x0`` in one pass,
:mod:`medidiff.methods.restoration_training`).

Saved as ``<method>.json`` + ``<method>.safetensors`` in a task folder (``models/restoration/<task>/``).
:meth:`Restoration.restore` tiles large images with MONAI's sliding-window inferer (Gaussian-weighted
overlaps); every step's noise is drawn once for the whole image (:class:`~medidiff.diffusion.process.NoiseBank`),
so overlapping tiles agree and the blend has no seam.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from medidiff.diffusion.process import NoiseBank, Process
from medidiff.diffusion.rddm import RDDM
from medidiff.diffusion.resfusion import Resfusion
from medidiff.diffusion.resshift import UPSR, ResShift
from medidiff.diffusion.sampling import sample
from medidiff.errors import StageError
from medidiff.methods.base import Method, ModelFunction, read_component
from medidiff.nets.dit import DiT
from medidiff.nets.reversible_unet import ReversibleUNet

PROCESSES: dict[str, type[Process]] = {"resshift": ResShift, "upsr": UPSR, "resfusion": Resfusion, "rddm": RDDM}
METHODS = (*PROCESSES, "regression", "one_step")


def make_process(spec: dict) -> Process:
    """The process described by a config's ``process`` mapping (``name`` + its arguments)."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in PROCESSES:
        raise ValueError(f"process {name!r} is not one of {sorted(PROCESSES)}")
    return PROCESSES[name](**spec)


def normalise(image: torch.Tensor, intensity: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Model units of ``image`` (stored units, e.g. HU) and the exact inverse: ``hu`` maps the fixed
    range ``low..high`` to 0..1 (unclipped); ``percentile`` maps the image's own percentiles."""
    x = image.float()
    if intensity["kind"] == "hu":
        lo, hi = float(intensity["low"]), float(intensity["high"])
    elif intensity["kind"] == "percentile":
        q = torch.quantile(x.flatten()[:: max(1, x.numel() // 2_000_000)],
                           torch.tensor([intensity["low"], intensity["high"]]) / 100)
        lo, hi = q[0].item(), max(q[1].item(), q[0].item() + 1e-6)
    else:
        raise ValueError(f"intensity kind {intensity['kind']!r} is not hu or percentile")
    return (x - lo) / (hi - lo), lambda units: units * (hi - lo) + lo


class RestorationFunction(ModelFunction):
    """The U-Net as the method's model function. With a ``condition`` (the degraded ``y``):
    ``net([x, y], t)``, or ``y + residual_scale * net([x, y], t)`` for x0-predicting methods with a
    residual scale. Without (the regression): ``x + residual_scale * net(x, t)`` (scale 1 by default)."""

    def __init__(self, net: ReversibleUNet, residual_scale: float | None = None):
        super().__init__(net)
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is None:
            return x + (self.residual_scale or 1.0) * self.net(x, t)
        out = self.net(torch.cat([x, condition], dim=1), t)
        return out if self.residual_scale is None else condition + self.residual_scale * out


def residual_scale(config: dict) -> float | None:
    """``model.residual_scale`` for methods whose network output is the restored image (the regression,
    x0-predicting processes, the one-step student): the network then outputs ``(x0 - y) / scale``,
    starting from zero (the identity), so a residual far smaller than the image range (CT noise is ~2 %
    of the HU window) is learnt at unit scale. None: the output is x0 itself (earlier models)."""
    x0_output = config["method"] in ("regression", "one_step") or (
        config["method"] in PROCESSES and PROCESSES[config["method"]].prediction == "sample")
    scale = config["model"].get("residual_scale")
    return float(scale) if scale is not None and x0_output else None


def build_net(config: dict) -> ReversibleUNet | DiT:
    """The U-Net (``model.unet``) or DiT (``model.dit``) of a restoration config: ``[x_t, y]`` in for processes and the one-step student
    (which keeps its teacher's architecture), ``y`` alone for the regression; the last layer starts at
    zero when the network outputs a scaled residual."""
    method, model = config["method"], config["model"]
    backbone = DiT if "dit" in model else ReversibleUNet  # model.dit: the small DiT of medidiff.nets.dit
    options = model["dit"] if "dit" in model else model["unet"]
    if method == "regression":
        net = backbone(**options)
    else:
        out = PROCESSES[method].output_channels if method in PROCESSES else 1
        net = backbone(**options, in_channels=2, out_channels=out)
    if residual_scale(config) is not None:
        nn.init.zeros_(net.conv_out.weight)
        nn.init.zeros_(net.conv_out.bias)
    return net


class Restoration(Method):
    """A trained restoration method; ``config``: ``task``, ``method``, ``scale``, ``modalities``,
    ``intensity``, ``model.unet``, ``process`` (for diffusion methods), ``steps``."""

    def __init__(self, net: ReversibleUNet, config: dict, estimator: Restoration | None = None):
        self.config = config
        self.model_fn = RestorationFunction(net.eval().requires_grad_(False), residual_scale(config))
        self.estimator = estimator
        if config["method"] == "upsr" and estimator is None:
            raise ValueError("UPSR needs its uncertainty estimator (the task's regression model)")

    @classmethod
    def create(cls, config: dict, estimator: Restoration | None = None) -> Restoration:
        """An untrained method for ``config`` (tests, and the trainer's starting point)."""
        return cls(build_net(config), config, estimator)

    @classmethod
    def from_pretrained(cls, folder: Path, name: str) -> Restoration:
        config, weights = read_component(folder, name)
        net = build_net(config)
        net.load_state_dict({k: v.float() for k, v in weights.items()})
        estimator = cls.from_pretrained(folder, "regression") if config["method"] == "upsr" else None
        method = cls(net, config, estimator)
        method.model_fn.weights_file = Path(folder) / f"{name}.safetensors"
        return method

    def networks(self):
        return {self.config["method"]: (self.model_fn.net, self.config)}

    @property
    def scale(self) -> int:
        return int(self.config.get("scale", 1))

    def process(self, steps: int | None = None) -> Process | None:
        if self.config["method"] == "regression":
            return None
        process = make_process(self.config["process"])
        if self.config["method"] != "one_step":
            process.set_timesteps(steps or self.config.get("steps", process.num_train_timesteps))
        return process

    def sample(self, y: torch.Tensor, noises: torch.Tensor, steps: int | None = None, ode: bool = False) -> torch.Tensor:
        """The restored image for degraded ``y`` (N, 1, H, W) at full size; ``noises`` (N, K, H, W):
        the initial noise and every step's, standard normal; ``ode``: ResShift's deterministic sampler."""
        multiple = self.model_fn.net.multiple
        h, w = y.shape[-2:]
        pad = (0, -w % multiple, 0, -h % multiple)
        mode = "reflect" if min(h, w) > max(pad) else "replicate"
        y = F.pad(y, pad, mode=mode)
        noises = F.pad(noises, pad, mode=mode) if noises.shape[1] else noises.new_zeros(*y.shape[:1], 0, *y.shape[2:])
        process = self.process(steps)
        if ode:
            if not isinstance(process, ResShift) or self.config["method"] == "one_step":
                raise ValueError(f"the ODE sampler is ResShift's; this is a {self.config['method']} model")
            process.deterministic = True
        if process is None:
            out = self.model_fn(y, torch.zeros(len(y), dtype=torch.long))
        elif self.config["method"] == "one_step":  # the teacher's start, straight to x0
            t = torch.full((len(y),), process.num_train_timesteps - 1, dtype=torch.long)
            out = self.model_fn(process.initial_sample(noises[:, :1], y), t, y)
        else:
            if isinstance(process, UPSR):
                process.weigh_noise(y, self.estimator.sample(y, noises[:, :0]))
            bank = NoiseBank(list(noises[:, 1:].split(1, dim=1)))
            out = sample(self.model_fn, process, noises[:, :1], y, y=y, generator=bank)
        return out[..., :h, :w]

    def noise_maps(self, steps: int | None = None) -> int:
        """How many noise maps :meth:`sample` takes (the initial one and one per step)."""
        return {"regression": 0, "one_step": 1}.get(self.config["method"], 1 + (steps or self.config.get("steps", 1)))

    @torch.no_grad()
    def restore(self, lr: torch.Tensor, *, steps: int | None = None, seed: int = 0, tile: int | None = 512,
                overlap: float = 0.25, boundary: str = "random", progress: bool = False) -> torch.Tensor:
        """The restored image (N, 1, h*scale, w*scale) of ``lr`` (N, 1, h, w) in model units; images
        larger than ``tile`` go through overlapping tiles (``progress``: a bar over the tiles). ``boundary="optimal"``: ResShift's ODE
        sampler from the model's optimal boundary condition (:mod:`medidiff.methods.optimal_boundary`)."""
        from medidiff.physics.degradations import upsample

        self.model_fn.reset_hooks()
        y = upsample(lr.float(), self.scale) if self.scale > 1 else lr.float()
        generator = torch.Generator().manual_seed(seed)
        noises = torch.randn((len(y), self.noise_maps(steps), *y.shape[-2:]), generator=generator)
        ode = boundary == "optimal"
        if ode:
            from medidiff.methods.optimal_boundary import boundary_noise

            if "boundary" not in self.config:
                raise StageError(f"this {self.config['method']} model has no optimal boundary condition; run "
                                 f"python -m medidiff.methods.optimal_boundary {self.config['task']}")
            noises[:, :1] = boundary_noise(self.config["boundary"], y.shape)
        elif boundary != "random":
            raise StageError(f"boundary is {boundary!r}; expected random or optimal")
        joined = torch.cat([y, noises], dim=1)

        def predictor(part: torch.Tensor) -> torch.Tensor:
            return self.sample(part[:, :1], part[:, 1:], steps, ode)

        if tile is None or max(y.shape[-2:]) <= tile:
            return predictor(joined)
        return sliding_window_inference(joined, roi_size=(tile, tile), sw_batch_size=1, predictor=predictor,
                                        overlap=overlap, mode="gaussian", padding_mode="replicate",
                                        progress=progress)

    def __call__(self, x: torch.Tensor, **options) -> torch.Tensor:
        return self.restore(x, **options)


MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # a method name, or a trained variant's (resshift15, samdiffsr)


def model_names(folder: Path) -> list[str]:
    """The trained restoration models in ``folder``: the stems with both ``.json`` and ``.safetensors``."""
    return sorted(p.stem for p in Path(folder).glob("*.json") if p.with_suffix(".safetensors").is_file())


def load_restoration(task: str, method: str = "resshift", model: str = "default") -> Restoration:
    """The trained ``method`` of ``task`` from ``model``: ``default`` (the package's
    ``models/restoration/<task>/``), a folder, or ``models:/<name>/<version>``. ``method`` is a method
    name (:data:`METHODS`) or the name of a trained variant in that folder (``resshift15``: ResShift with
    T = 15; ``samdiffsr``: ResShift trained with structure-modulated noise)."""
    from medidiff.model_registry import resolve_model_dir

    if not MODEL_NAME.fullmatch(method):
        raise StageError(f"method is {method!r}; expected one of {', '.join(METHODS)} or a trained variant's name")
    folder = resolve_model_dir(model, default_name=f"restoration/{task}")
    if not (folder / f"{method}.json").exists():
        raise StageError(f"no {method} model for {task} in {folder} (it holds {', '.join(model_names(folder)) or 'none'}; "
                         f"each is <name>.json + <name>.safetensors); train it with `medidiff train "
                         f"configs/restoration/{task}_{method}.yaml` or pick another method")
    return Restoration.from_pretrained(folder, method)
