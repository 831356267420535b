"""Compressed-sensing reconstruction: measurement settings and the shipped reconstructors.

A setting names one measurement operator: ``block_cs`` with a ``ratio`` (IDM's 32x32 block CS) or
``cartesian_mri`` with an ``acceleration`` and a ``mask`` kind (single coil). :class:`CSReconstruction`
loads the shipped models (``models/cs_reconstruction``: the pretrained denoiser and one IDM per
measurement kind) and reconstructs with any of :data:`METHODS`:

- ``idm``: the fine-tuned 3-step invertible chain (:mod:`medidiff.methods.idm`);
- ``ddnm``: zero-shot DDNM with the same pretrained denoiser (:mod:`medidiff.methods.ddnm`);
- ``fista_tv``: classical FISTA with total variation (:mod:`medidiff.methods.classical_cs`);
- ``zero_filled``: the pseudo-inverse ``A^+ y`` (zero-filled k-space for MRI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medidiff.diffusion.gaussian import cosine_alphas_cumprod
from medidiff.errors import InputError
from medidiff.methods.base import read_component
from medidiff.methods.classical_cs import fista_tv, zero_filled
from medidiff.methods.ddnm import ddnm
from medidiff.methods.idm import IDM
from medidiff.nets.reversible_unet import ReversibleUNet
from medidiff.physics.measurements import BlockCS, CartesianMRI, Operator, cartesian_mask

METHODS = ("idm", "ddnm", "fista_tv", "zero_filled")
KINDS = ("block_cs", "cartesian_mri")


def make_operator(kind: str, image_shape: tuple[int, int], *, ratio: float = 0.1, acceleration: int = 4,
                  mask: str = "random", seed: int = 0) -> Operator:
    """The operator of one setting: ``block_cs`` (``ratio``; ``seed`` fixes the matrix) or
    ``cartesian_mri`` (``acceleration``, ``mask`` random/equispaced; ``seed`` fixes a random mask)."""
    if kind == "block_cs":
        return BlockCS(ratio, image_shape, seed=seed)
    if kind == "cartesian_mri":
        return CartesianMRI(cartesian_mask(image_shape, acceleration, mask, seed=seed))
    raise InputError(f"measurement kind {kind!r} is not known; use one of {', '.join(KINDS)}")


def draw_operator(spec: dict, image_shape: tuple[int, int], rng: np.random.Generator) -> Operator:
    """An operator drawn from a training config's ``measurement:`` (``ratios`` of block CS with the
    config's fixed ``seed``; or ``accelerations`` and ``masks`` of MRI, masks drawn from ``rng``)."""
    if spec["kind"] == "block_cs":
        return make_operator("block_cs", image_shape, ratio=float(rng.choice(spec["ratios"])), seed=spec.get("seed", 0))
    return make_operator(spec["kind"], image_shape, acceleration=int(rng.choice(spec["accelerations"])),
                         mask=str(rng.choice(spec.get("masks", ["random"]))), seed=int(rng.integers(2**31)))


def load_denoiser(folder: Path, name: str = "denoiser") -> ReversibleUNet:
    """The pretrained epsilon-prediction U-Net saved as ``folder/<name>``."""
    config, weights = read_component(folder, name)
    net = ReversibleUNet(**config["model"]["unet"])
    net.load_state_dict({k: v.float() for k, v in weights.items()})
    return net.eval().requires_grad_(False)


class CSReconstruction:
    """The shipped CS models of ``folder``; ``reconstruct(y, operator, method)``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.denoiser = load_denoiser(self.folder)
        self.alphas_cumprod = cosine_alphas_cumprod(1000).float()
        self.idm = {kind: IDM.from_pretrained(self.folder, f"idm_{kind.removeprefix('cartesian_')}")
                    for kind in KINDS}

    def reconstruct(self, y: torch.Tensor, operator: Operator, method: str = "idm", *, ddnm_steps: int = 100,
                    seed: int = 0, tv_weight: float = 0.003) -> torch.Tensor:
        """Images (B, 1, H, W) in [0, 1] units from measurements ``y`` of ``operator`` (``tv_weight``:
        FISTA-TV's lambda)."""
        if method == "idm":
            kind = "block_cs" if isinstance(operator, BlockCS) else "cartesian_mri"
            return self.idm[kind](y, operator)
        if method == "ddnm":
            with torch.no_grad():
                return ddnm(operator, y, lambda x, t: self.denoiser(x, t), self.alphas_cumprod, steps=ddnm_steps,
                            generator=torch.Generator().manual_seed(seed))
        if method == "fista_tv":
            return fista_tv(operator, y, lam=tv_weight)
        if method == "zero_filled":
            return zero_filled(operator, y)
        raise InputError(f"CS method {method!r} is not known; use one of {', '.join(METHODS)}")
