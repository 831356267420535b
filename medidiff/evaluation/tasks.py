"""Tasks and baselines: what an evaluation measures and compares with, chosen by the task a stage declares.

A stage (or method) names its task with a class attribute, ``task = "bone_suppression"``;
:attr:`medidiff.pipeline.Pipeline.task` reads it. A task lists its metrics (names in
``medidiff.metrics.METRICS``; the first ranks the best/worst case) and its default baseline. New
methods add theirs with :func:`register_task`; a pipeline without a registered task gets
:data:`GENERIC` (plus NMSE on MR).

Baselines are ``item -> item`` functions applied to the unprocessed input: ``identity`` (the input as
is; its shape must match the reference's), ``bicubic`` (the input resampled to the reference's
grid, the usual super-resolution baseline) and ``zero-filled`` (zero-filled k-space interpolation onto
the reference's grid, the classical MR super-resolution baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medidiff.errors import InputError


@dataclass(frozen=True)
class Task:
    """A task's metrics (the first ranks cases) and its default baseline (a name in :data:`BASELINES`)."""

    name: str
    metrics: tuple[str, ...]
    baseline: str = "identity"


TASKS: dict[str, Task] = {}
GENERIC = Task("generic", ("psnr", "ssim", "mse"))


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (a method module calls this once for its own task)."""
    from medidiff.metrics import METRICS

    unknown = [m for m in task.metrics if m not in METRICS]
    if unknown or task.baseline not in BASELINES:
        raise ValueError(f"task {task.name!r}: unknown metric(s) {unknown} or baseline {task.baseline!r}")
    TASKS[task.name] = task
    return task


def task_for(name: str | None, modality: str = "") -> Task:
    """The registered task ``name``; otherwise :data:`GENERIC`, with NMSE added for MR."""
    if name in TASKS:
        return TASKS[name]
    return GENERIC if modality.upper() != "MR" else Task("generic-mr", (*GENERIC.metrics, "nmse"))


def resample_to(image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``image`` (C, *spatial) resampled to ``shape`` (C, *spatial): bicubic in 2-D, trilinear in 3-D."""
    mode = "bicubic" if image.ndim == 3 else "trilinear"
    resized = torch.nn.functional.interpolate(torch.as_tensor(image).float()[None], size=tuple(shape[1:]),
                                              mode=mode, align_corners=False)
    return resized[0]


def identity(item: dict) -> dict:
    """The input image itself; InputError if its shape differs from the reference's."""
    image, reference = item["image"], item.get("reference")
    if reference is not None and image.shape != reference.shape:
        raise InputError(f"baseline identity: the input {tuple(image.shape)} and the reference "
                         f"{tuple(reference.shape)} differ in shape; use the 'bicubic' baseline")
    return item


def bicubic(item: dict) -> dict:
    """The input resampled to the reference's grid (interpolation: the plain super-resolution baseline)."""
    return item | {"image": resample_to(item["image"], tuple(item["reference"].shape))}


def zero_filled(item: dict) -> dict:
    """The input put on the reference's in-plane grid by zero-filled k-space interpolation (2-D slices, an
    integer scale); InputError for any other pair of shapes."""
    from medidiff.physics.degradations import zero_filled as interpolate

    image, reference = torch.as_tensor(item["image"]).float(), item["reference"]
    grown = [r // i if i and r % i == 0 else 0 for i, r in zip(image.shape[1:3], reference.shape[1:3], strict=True)]
    if image.shape[0] != 1 or image.shape[3:] != reference.shape[3:] or len(set(grown)) != 1 or grown[0] < 1:
        raise InputError(f"baseline zero-filled: the input {tuple(image.shape)} is not the reference "
                         f"{tuple(reference.shape)} shrunk in-plane by an integer factor; use the 'bicubic' baseline")
    planes = image.movedim(0, -1).reshape(*image.shape[1:3], -1).permute(2, 0, 1)[:, None]  # (slices, 1, cols, rows)
    out = interpolate(planes, grown[0])[:, 0].permute(1, 2, 0).reshape(*reference.shape[1:3], *image.shape[3:])
    return item | {"image": out[None]}


BASELINES: dict[str, Callable[[dict], dict]] = {"identity": identity, "bicubic": bicubic, "zero-filled": zero_filled}

register_task(Task("bone_suppression", ("bsr", "psnr", "ssim", "mse")))
register_task(Task("super_resolution", ("psnr", "ssim", "mse"), baseline="bicubic"))
register_task(Task("denoise", ("psnr", "ssim", "mse")))  # against the clean image; baseline: the noisy input
# scored against the fully sampled image; compare with a zero-filled pipeline as --baseline
register_task(Task("cs_reconstruction", ("psnr", "ssim", "nmse")))
