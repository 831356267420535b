"""IDM: invertible diffusion models for compressed-sensing reconstruction (Chen et al., TPAMI 2025).

A pretrained epsilon-prediction denoiser becomes a reconstruction network: its few-step (``T = 3``)
deterministic sampling chain, started from ``sqrt(abar_T) A^+ y`` without noise, does at every step
noise estimation, denoising, the range-null-space projection ``x0 - A^+(A x0 - y)`` and a DDIM update,
with learned per-step alphas (``abar`` = their cumulative product, initialised 0.5 each), and the
whole chain is fine-tuned end to end on (measurement, image) pairs with an L1 loss.

Two-level invertibility: the chain runs as IDM's reversible coupling over two image streams (each
step is the body of a :class:`~medidiff.nets.reversible.Coupling`), and inside each step the U-Net's
block sequences are reversible too, so training keeps neither the chain's nor the U-Net's
activations (``invertible: false`` trains the same network with ordinary backprop). Lightweight
measurement injectors sit in the U-Net's blocks (:mod:`medidiff.nets.reversible_unet`).

Deviations, for this project's CPU budget: the denoiser is a 1 M-parameter U-Net pretrained here
(``kind: denoiser``) instead of Stable Diffusion; the U-Net keeps a timestep input (the nearest
training timestep of each step's learned ``abar``), where IDM deletes SD's time embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medidiff.diffusion.gaussian import cosine_alphas_cumprod
from medidiff.methods.base import Method, ModelFunction, read_component
from medidiff.nets.reversible import CouplingSequence, set_reversible
from medidiff.nets.reversible_unet import ReversibleUNet
from medidiff.physics.measurements import Operator


class Denoiser(ModelFunction):
    """``net(x, t, context)``: the U-Net as the method's one model function (``condition`` = context)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: dict | None = None) -> torch.Tensor:
        return self.net(x, t, condition)


class ChainStep(nn.Module):
    """One IDM sampling step as a coupling body: noise estimate, x0, range-null-space, DDIM update.
    Everything it uses (model function, schedule, measurement) comes from the context."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index  # 0 = first step (t = T)

    def forward(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        abar = context["alpha_bars"]()  # (T + 1,), abar[0] = 1
        steps = len(abar) - 1
        a_t, a_prev = abar[steps - self.index], abar[steps - self.index - 1]
        t = context["timestep"](a_t.detach()).expand(len(x))
        unet_context = {"step": self.index, "operator": context["operator"], "y": context["y"],
                        "pinv_y": context["pinv_y"]}
        eps = context["model_fn"](x, t, unet_context)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x0 = context["operator"].project(x0, context["y"])
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


class IDMNet(nn.Module):
    """The fine-tunable chain: ``forward(y, operator) -> x`` (B, 1, H, W)."""

    def __init__(self, unet: ReversibleUNet, steps: int = 3, num_train_timesteps: int = 1000):
        super().__init__()
        self.model_fn = Denoiser(unet)
        self.alpha = nn.Parameter(torch.full((steps,), 0.5))
        self.chain = CouplingSequence([ChainStep(k) for k in range(steps)])
        self.register_buffer("train_alphas_cumprod", cosine_alphas_cumprod(num_train_timesteps).float(),
                             persistent=False)

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def alpha_bars(self) -> torch.Tensor:
        return torch.cat([self.alpha.new_ones(1), torch.cumprod(self.alpha.clamp(1e-3, 1.0), 0)])

    def timestep(self, abar: torch.Tensor) -> torch.Tensor:
        """The denoiser's training timestep whose ``abar`` is nearest."""
        return (self.train_alphas_cumprod - abar).abs().argmin().reshape(1)

    def forward(self, y: torch.Tensor, operator: Operator) -> torch.Tensor:
        pinv_y = operator.pinv(y)
        context = {"alpha_bars": self.alpha_bars, "timestep": self.timestep, "model_fn": self.model_fn,
                   "operator": operator, "y": y, "pinv_y": pinv_y}
        x = self.alpha_bars()[-1].sqrt() * pinv_y
        return self.chain(x, context)

    def set_invertible(self, invertible: bool) -> None:
        """Reversible (activation-free) backprop through the chain and the U-Net, or ordinary."""
        set_reversible(self, invertible)


def build_idm(unet_config: dict, steps: int, injectors: bool = True) -> IDMNet:
    """An IDM chain around a fresh U-Net of ``unet_config``, with injectors for ``steps`` steps
    (``injectors=False``: the ablation without them)."""
    unet = ReversibleUNet(**unet_config)
    if injectors:
        unet.add_injectors(steps)
    return IDMNet(unet, steps)


class IDM(Method):
    """A trained IDM: ``idm(y, operator) -> image`` (B, 1, H, W) in the operator's image units."""

    def __init__(self, net: IDMNet, config: dict, name: str = "idm"):
        self.net = net.eval().requires_grad_(False)
        self.model_fn = net.model_fn
        self.config, self.name = config, name

    @classmethod
    def from_pretrained(cls, folder: Path, name: str = "idm") -> IDM:
        config, weights = read_component(folder, name)
        m = config["model"]
        net = build_idm(m["unet"], m["steps"], m.get("injectors", True))
        net.load_state_dict({k: v.float() for k, v in weights.items()})
        return cls(net, config, name)

    def networks(self):
        return {self.name: (self.net, self.config)}

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, operator: Operator, **_: object) -> torch.Tensor:
        """The chain's output, projected once more onto the measurements (``operator.project``):
        the coupling's last blend leaves it slightly inconsistent with ``y``; for block CS, where
        the projection is exact, this can only bring it closer to the truth (not in the authors' code)."""
        self.model_fn.reset_hooks()
        return operator.project(self.net(y, operator), y)
