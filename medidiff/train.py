"""One trainer for every method: ``kind:`` in the config picks a registered training task.

Usage: ``medidiff train CONFIG [--run-dir DIR]`` or ``python -m medidiff.train CONFIG [--export DIR]``.
A method adds training by registering a :class:`TrainingTask` with :func:`register_task` in a
module ``medidiff/methods/<something>_training.py`` (found automatically); the trainer itself is
not edited. The trainer owns the loop: seeding, EMA of the exported network (diffusers
``EMAModel``), checkpoints (resume continues exactly where a run stopped), a step and wall-clock
budget, a logging hook (MLflow through ``medidiff.tracking``), and the export of the EMA weights,
their JSON config and a model card to the run folder (default ``~/.cache/medidiff/runs/<name>/``,
never the source tree). Shipping them into a model folder is an explicit step (``export_to``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import pkgutil
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from medidiff.errors import InputError
from medidiff.io.atomic import atomic_write
from medidiff.methods.base import read_component, write_component
from medidiff.methods.model_card import write_model_card

RUNS_DIR = Path.home() / ".cache" / "medidiff" / "runs"
LogFn = Callable[[int, dict], None]
# config keys that may change between a run and its resumption
BUDGET_KEYS = ("max_steps", "max_minutes", "ckpt_minutes", "log_every")


class TrainingTask(ABC):
    """What a method gives the trainer. ``__init__(cfg, rng)`` builds :attr:`net` (the network whose
    EMA weights are exported), :attr:`modules` (everything trained, checkpointed) and
    :attr:`optims`, all on ``device``; :meth:`step` does one optimisation step with ``self.rng``
    for data choices and torch's global generator (the device's) for noise."""

    net: torch.nn.Module
    modules: dict[str, torch.nn.Module]
    optims: dict[str, torch.optim.Optimizer]

    def __init__(self, cfg: dict, rng: np.random.Generator, device: torch.device):
        self.cfg, self.tcfg, self.rng, self.device = cfg, cfg["train"], rng, device

    @abstractmethod
    def step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns metrics to log."""
        ...

    def optimise(self, loss: torch.Tensor, name: str = "opt") -> float:
        """One step of the optimiser ``name`` on ``loss``; returns the loss value."""
        opt = self.optims[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def start_from(self, state: dict[str, torch.Tensor]) -> None:
        """Start :attr:`net` from exported weights (a config's ``init:``); raises on a mismatch."""
        self.net.load_state_dict(state)

    def export_config(self) -> dict:
        """The JSON config saved next to the exported weights (the trainer adds ``training``)."""
        return {"model": self.cfg["model"]}

    def export_files(self) -> list[Path]:
        """Files the exported network needs beside it (e.g. the VQ-GAN of a latent model)."""
        return []

    def extra_state(self) -> dict:
        """Task state other than modules and optimisers, for exact resumption."""
        return {}

    def load_extra_state(self, state: dict) -> None:  # noqa: B027 (optional: no extra state by default)
        """Restore :meth:`extra_state`."""


TASKS: dict[str, type[TrainingTask]] = {}


def register_task(kind: str) -> Callable[[type[TrainingTask]], type[TrainingTask]]:
    """Class decorator: train configs with ``kind: <kind>`` use this task."""
    def add(cls: type[TrainingTask]) -> type[TrainingTask]:
        TASKS[kind] = cls
        return cls
    return add


def task_class(kind: str, config_path: Path) -> type[TrainingTask]:
    """The task registered for ``kind``, importing ``medidiff.methods.*_training`` modules on first use."""
    if kind not in TASKS:
        import medidiff.methods

        for module in pkgutil.iter_modules(medidiff.methods.__path__):
            if module.name.endswith("_training"):
                importlib.import_module(f"medidiff.methods.{module.name}")
    if kind not in TASKS:
        raise InputError(f"{config_path}: kind: {kind!r} is not a training task; use one of {sorted(TASKS)}")
    return TASKS[kind]


def load_config(path: Path) -> dict:
    """The training config, with the keys every task needs."""
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read the training config ({e})") from None
    missing = [k for k in ("name", "kind", "train", "export") if k not in (cfg or {})]
    if missing:
        raise InputError(f"{path}: missing {', '.join(missing)}; see configs/bone_suppression/*.yaml for examples")
    return cfg


def _same_run(saved: dict, cfg: dict) -> bool:
    """Whether ``cfg`` trains the same run as the checkpoint's ``saved`` config: the budget, the thread
    count and the title may differ."""
    def strip(c: dict) -> dict:
        c = copy.deepcopy(c)
        c.pop("threads", None)
        c.pop("title", None)
        for k in BUDGET_KEYS:
            c["train"].pop(k, None)
        return c
    return strip(saved) == strip(cfg)


def train(config_path: str | Path, *, out_dir: str | Path | None = None, resume: bool = True,
          max_minutes: float | None = None, log: LogFn | None = None, export_to: str | Path | None = None,
          device: str = "cpu") -> Path:
    """Train the model described by ``config_path`` on ``device``; returns the exported weights in
    the run folder.

    Stops at ``train.max_steps`` or after ``max_minutes`` of training (argument, else the config's
    ``train.max_minutes``), counted over resumed runs too. Checkpoints every ``train.ckpt_minutes``
    and at the end to ``out_dir/checkpoint.pt``; with ``resume``, a run continues from its checkpoint
    (same config apart from the budget). ``export_to``: also copy the exported files into that
    model folder and refresh its model card.
    """
    config_path = Path(config_path)
    cfg = load_config(config_path)
    t = cfg["train"]
    torch.set_num_threads(int(cfg.get("threads", 2)))
    run_dir = Path(out_dir) if out_dir else RUNS_DIR / cfg["name"]
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is visible here; train with --device cpu")
        torch.set_float32_matmul_precision("high")  # TF32 matrix products
    task = task_class(cfg["kind"], config_path)(cfg, np.random.default_rng(seed), device)
    ckpt = run_dir / "checkpoint.pt"
    resuming = resume and ckpt.exists()
    if "init" in cfg and not resuming:
        _start_from(task, Path(cfg["init"]).expanduser(), config_path)
    ema = EMAModel(task.net.parameters(), decay=t.get("ema", 0.999))
    step, elapsed, history = 0, 0.0, []
    if resuming:
        state = torch.load(ckpt, weights_only=False)
        if not _same_run(state["config"], cfg):
            raise InputError(f"{config_path}: differs from the run in {run_dir} beyond its budget "
                             f"({', '.join(BUDGET_KEYS)}); use --fresh or another --run-dir")
        for k, m in task.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in task.optims.items():
            o.load_state_dict(state["optims"][k])
        ema.load_state_dict(state["ema"])
        task.load_extra_state(state["extra"])
        task.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
    budget = 60 * (max_minutes if max_minutes is not None else t.get("max_minutes", math.inf))
    max_steps = t.get("max_steps", 10**9)

    def save() -> None:
        state = {"modules": {k: m.state_dict() for k, m in task.modules.items()},
                 "optims": {k: o.state_dict() for k, o in task.optims.items()}, "ema": ema.state_dict(),
                 "extra": task.extra_state(), "rng": task.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "step": step, "elapsed": elapsed, "history": history, "config": cfg}
        with atomic_write(ckpt) as tmp:
            torch.save(state, tmp)

    bar = tqdm(total=t.get("max_steps"), initial=step, desc=cfg["name"], mininterval=5)
    last_ckpt, start, start_elapsed = time.monotonic(), time.monotonic(), elapsed
    while step < max_steps and elapsed < budget:
        metrics = task.step(step)
        ema.step(task.net.parameters())
        step += 1
        elapsed = start_elapsed + time.monotonic() - start
        bar.update()
        if step % t.get("log_every", 25) == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            history.append({"step": step, "minutes": round(elapsed / 60, 2), **metrics})
            if log:
                log(step, metrics)
        if time.monotonic() - last_ckpt > 60 * t.get("ckpt_minutes", 2):
            save()
            last_ckpt = time.monotonic()
    bar.close()
    save()
    weights = _export(cfg, task, ema, run_dir, {
        "title": cfg.get("title", cfg["name"]), "config": str(config_path), "steps": step,
        "minutes": round(elapsed / 60, 1), "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "data": cfg.get("data", {}),
        "train": t, "final_metrics": history[-1] if history else {}})
    if export_to:
        export(weights, export_to)
    return weights


def _start_from(task: TrainingTask, weights: Path, config_path: Path) -> None:
    """Start the task's network from the exported weights ``<weights>.safetensors`` (a config's ``init:``)."""
    try:
        _, state = read_component(weights.parent, weights.name)
        task.start_from(state)
    except (OSError, KeyError, RuntimeError) as e:
        raise InputError(f"{config_path}: init: {weights} cannot start this model ({str(e).splitlines()[0]}); "
                         "train the config that exports it first (see the train_all.sh beside the config)") from None


def _export(cfg: dict, task: TrainingTask, ema: EMAModel, folder: Path, record: dict) -> Path:
    """EMA weights + JSON config (with the training ``record``) + needed files + model card into ``folder``."""
    net = copy.deepcopy(task.net).cpu()
    ema.copy_to(net.parameters())
    weights = write_component(folder, cfg["export"]["name"], net, {**task.export_config(), "training": record})
    for path in task.export_files():
        if path.resolve() != (folder / path.name).resolve():
            shutil.copy2(path, folder / path.name)
    write_model_card(folder, title=record["title"])
    return weights


def export(weights: str | Path, model_dir: str | Path) -> Path:
    """Copy exported ``<name>.safetensors`` + ``<name>.json`` into ``model_dir`` (e.g. models/bone_suppression)
    and refresh its model card; returns the copied weights."""
    weights, model_dir = Path(weights), Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for path in (weights, weights.with_suffix(".json")):
        with atomic_write(model_dir / path.name) as tmp:
            shutil.copyfile(path, tmp)
    write_model_card(model_dir)
    return model_dir / weights.name


def main(argv: list[str] | None = None) -> None:
    """``python -m medidiff.train CONFIG [--max-minutes M] [--fresh] [--run-dir D] [--export MODEL_DIR]``."""
    p = argparse.ArgumentParser(prog="python -m medidiff.train", description=main.__doc__)
    p.add_argument("config")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--run-dir", help="run folder (default ~/.cache/medidiff/runs/NAME)")
    p.add_argument("--export", help="also copy the trained weights into this model folder, e.g. models/bone_suppression")
    p.add_argument("--device", default="cpu", help="torch device to train on: cpu (default), cuda, cuda:1")
    a = p.parse_args(argv)
    print(train(a.config, out_dir=a.run_dir, resume=not a.fresh, max_minutes=a.max_minutes, export_to=a.export,
                device=a.device))


if __name__ == "__main__":  # run as medidiff.train, not __main__: tasks register in medidiff.train.TASKS
    from medidiff.train import main as package_main

    package_main()
