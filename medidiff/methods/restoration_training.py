"""Training tasks for restoration: one loop for every process, and the one-step student.

``kind: restoration`` trains the U-Net of :mod:`medidiff.methods.restoration` for ``method:`` resshift,
upsr, resfusion, rddm (the process makes ``x_t`` and the target; MSE loss) or regression (``y + net(y)``
against the clean image, MSE) on random patch pairs of the task's training images
(:func:`medidiff.datasets.restoration_images.training_pairs`). UPSR needs the task's trained
regression model (``estimator:``) for its uncertainty map. ``structure_noise: {strength, segments}``
trains with SAM-DiffSR's structure-modulated noise (:mod:`medidiff.diffusion.structure_noise`).

``kind: restoration_student`` distils a trained multi-step model (``teacher:``) into ``one_step``, a
copy of it that maps the teacher's starting point ``x_T`` to ``x0`` in one pass, with the losses of
the AdcSR / TAD-SR idea: (1) regression onto the teacher's multi-step sample from the same ``x_T``;
(2) time-aware distillation: the student's output, re-noised by the forward process to a random
timestep, is pulled towards the teacher's ``x0`` prediction there (weighted by ``tad_weight``);
(3) an adversarial hinge loss from a small patch discriminator that sees clean and student images
beside ``y`` (``adversarial_weight``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medidiff.datasets import restoration_images as data
from medidiff.diffusion.process import NoiseBank
from medidiff.diffusion.resshift import UPSR
from medidiff.diffusion.sampling import sample
from medidiff.diffusion.structure_noise import structure_modulated_noise
from medidiff.errors import InputError
from medidiff.methods.restoration import (
    PROCESSES,
    Restoration,
    RestorationFunction,
    build_net,
    make_process,
    residual_scale,
)
from medidiff.physics.degradations import upsample
from medidiff.train import TrainingTask, register_task

MODALITIES = {"ct_denoise": ["CT"], "mr_sr2": ["MR"], "mr_sr4": ["MR"], "xray_sr4": ["CR", "DX"]}


def method_config(cfg: dict, method: str) -> dict:
    """The saved method config of a training config (what :class:`Restoration` needs)."""
    task = cfg["task"]
    if task not in MODALITIES:
        raise InputError(f"task is {task!r}; expected one of {', '.join(MODALITIES)}")
    config = {"task": task, "method": method, "scale": data.scale(task), "modalities": MODALITIES[task],
              "intensity": data.intensity(task), "model": cfg["model"]}
    if "process" in cfg:
        config["process"] = cfg["process"]
        config["steps"] = cfg.get("steps", make_process(cfg["process"]).num_train_timesteps)
    return config


def _load(path: str, what: str, config_key: str) -> Restoration:
    path = Path(path).expanduser()
    try:
        return Restoration.from_pretrained(path.parent, path.name)
    except (OSError, KeyError, RuntimeError) as e:
        raise InputError(f"{config_key}: {path} is not a trained {what} ({str(e).splitlines()[0]}); "
                         "train it first (see configs/restoration/train_all.sh)") from None


class _PairTask(TrainingTask):
    """Shared part: the task's training pairs as (clean, y) with ``y`` at full size."""

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        task = self.cfg["task"]
        clean, degraded = data.training_pairs(task, self.tcfg["batch"], self.cfg["data"]["patch"], self.rng)
        y = upsample(degraded, data.scale(task)) if data.scale(task) > 1 else degraded
        return clean.to(self.device), y.to(self.device)

    def export_config(self):
        return self.config


@register_task("restoration")
class RestorationTask(_PairTask):
    """One training loop for every restoration process and the regression baseline."""

    def __init__(self, cfg, rng, device):
        super().__init__(cfg, rng, device)
        method = cfg["method"]
        if method not in (*PROCESSES, "regression"):
            raise InputError(f"method is {method!r}; expected one of {', '.join([*PROCESSES, 'regression'])} "
                             "(one_step is trained with kind: restoration_student)")
        self.config = method_config(cfg, method)
        self.net = build_net(self.config).to(device)
        self.fn = RestorationFunction(self.net, residual_scale(self.config))
        self.process = make_process(cfg["process"]) if method in PROCESSES else None
        self.estimator = _load(cfg["estimator"], "regression model", "estimator") if method == "upsr" else None
        self.modules = {"net": self.net}
        self.optims = {"opt": torch.optim.AdamW(self.net.parameters(), lr=self.tcfg["lr"])}

    def start_from(self, state):
        """Also from a trained regression (``init:`` its weights) for a process whose network reads
        ``[x_t, y]``: the regression's input filters go to the ``y`` channel, ``x_t``'s start at zero,
        so training starts from the regression's ``x0`` estimate at every timestep's input."""
        conv_in = self.net.conv_in.weight
        given = state.get("conv_in.weight")
        if given is not None and given.shape[1] == conv_in.shape[1] // 2 and given.shape[0] == conv_in.shape[0]:
            if self.fn.residual_scale is None:
                raise RuntimeError("a regression starts a process only with model.residual_scale set "
                                   "(both networks then output (x0 - y) / scale)")
            widened = torch.zeros_like(conv_in)
            widened[:, given.shape[1]:] = given  # pixel-unshuffled [x_t, y]: y's four sub-pixel channels last
            state = {**state, "conv_in.weight": widened}
        self.net.load_state_dict(state)

    def step(self, step):
        clean, y = self.pairs()
        if self.process is None:
            t0 = torch.zeros(len(y), dtype=torch.long, device=self.device)
            return {"mse": self.optimise(F.mse_loss(self.fn(y, t0), clean))}
        if isinstance(self.process, UPSR):
            with torch.no_grad():
                self.process.weigh_noise(y, self.estimator.sample(y, y[:, :0]))
        t = torch.randint(0, self.process.num_train_timesteps, (len(y),), device=self.device)
        noise = torch.randn_like(clean)
        if "structure_noise" in self.cfg:  # SAM-DiffSR: region-wise noise means, training only
            noise = structure_modulated_noise(noise, clean, **self.cfg["structure_noise"])
        x_t = self.process.add_noise(clean, noise, t, y)
        target = self.process.training_target(clean, noise, t, y)
        return {"mse": self.optimise(F.mse_loss(self.fn(x_t, t, y), target))}


class PatchDiscriminator(nn.Module):
    """A small PatchGAN-style critic of ``[image, y]`` pairs (spectral-normalised convolutions)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.layers = nn.Sequential(
            sn(nn.Conv2d(2, channels, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(channels, 2 * channels, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * channels, 2 * channels, 3, 1, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * channels, 1, 3, 1, 1)))

    def forward(self, image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([image, y], dim=1))


@register_task("restoration_student")
class StudentTask(_PairTask):
    """One-step distillation of a trained multi-step ``teacher``."""

    def __init__(self, cfg, rng, device):
        super().__init__(cfg, rng, device)
        self.teacher = _load(cfg["teacher"], "multi-step restoration model", "teacher")
        if self.teacher.config["method"] != "resshift":
            raise InputError(f"teacher: {cfg['teacher']} is a {self.teacher.config['method']} model; the one-step "
                             "student distils a ResShift teacher (its x_T is the noised degraded image)")
        self.teacher.model_fn.to(device)
        self.config = {**self.teacher.config, "method": "one_step", "teacher": Path(cfg["teacher"]).name}
        self.config.pop("steps", None)
        self.net = copy.deepcopy(self.teacher.model_fn.net).requires_grad_(True).train()
        self.fn = RestorationFunction(self.net, residual_scale(self.config))
        self.critic = PatchDiscriminator().to(device)
        self.process = make_process(self.config["process"])
        self.process.set_timesteps(self.teacher.config["steps"])
        self.modules = {"net": self.net, "critic": self.critic}
        self.optims = {"opt": torch.optim.AdamW(self.net.parameters(), lr=self.tcfg["lr"]),
                       "critic": torch.optim.AdamW(self.critic.parameters(), lr=self.tcfg["lr"], betas=(0.5, 0.999))}

    def step(self, step):
        clean, y = self.pairs()
        steps, last = self.teacher.config["steps"], self.process.num_train_timesteps - 1
        noises = torch.randn(len(y), 1 + steps, *y.shape[-2:], device=self.device)
        x_start = self.process.initial_sample(noises[:, :1], y)
        with torch.no_grad():
            target = sample(self.teacher.model_fn, self.process, noises[:, :1], y, y=y,
                            generator=NoiseBank(list(noises[:, 1:].split(1, dim=1))))
        out = self.fn(x_start, torch.full((len(y),), last, device=self.device), y)
        distill = F.mse_loss(out, target)
        t = torch.randint(1, last + 1, (len(y),), device=self.device)
        renoised = self.process.add_noise(out, torch.randn_like(out), t, y)
        with torch.no_grad():
            teacher_x0 = self.teacher.model_fn(renoised, t, y)
        tad = F.mse_loss(out, teacher_x0)
        adversarial = -self.critic(out, y).mean()
        loss = distill + self.tcfg.get("tad_weight", 0.5) * tad + self.tcfg.get("adversarial_weight", 0.01) * adversarial
        self.optimise(loss)
        critic_loss = (F.relu(1 - self.critic(clean, y)).mean() + F.relu(1 + self.critic(out.detach(), y)).mean())
        return {"distill": distill.item(), "tad": tad.item(), "critic": self.optimise(critic_loss, "critic")}
