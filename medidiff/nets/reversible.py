"""Reversible coupling sequences: activations recomputed in the backward pass instead of stored.

The coupling is IDM's (Chen et al., "Invertible Diffusion Models for Compressed Sensing"): a feature
``h`` enters as two streams ``(h, s * h)``; each coupling maps ``(x1, x2) -> ((1 - v) body(x1) + v x2, x1)``,
invertible as ``x1 = y2``, ``x2 = (y1 - (1 - v) body(y2)) / v``; the sequence leaves as ``x1 + m * x2``.
``s``, ``v`` and ``m`` are learned (initialised 1, 0.5 and 0 as in the authors' code).

With ``reversible=True`` the forward pass runs without autograd and keeps only the two output
streams; the backward pass walks the couplings in reverse, rebuilding each input from its output and
backpropagating through one body at a time. With ``reversible=False`` the same arithmetic runs
under ordinary autograd (every activation stored); both give the same gradients.

A body is called ``body(x, context)``. ``context`` carries what the body needs besides ``x`` (the
timestep, the measurement operator, ...); its tensors must not require gradients (compute learned
quantities inside the body), because a reversible backward pass recomputes bodies one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Coupling(nn.Module):
    """``(x1, x2) -> ((1 - v) body(x1) + v x2, x1)`` with a learned ``v``."""

    def __init__(self, body: nn.Module, v: float = 0.5):
        super().__init__()
        self.body = body
        self.v = nn.Parameter(torch.tensor(float(v)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, context: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # x2 + (1 - v)(body - x2): one pass over the feature map instead of two products and a sum
        return torch.lerp(x2, self.body(x1, context), 1 - self.v), x1

    def backward_pass(self, y1, y2, dy1, dy2, context: dict):
        """Rebuild ``(x1, x2)`` from ``(y1, y2)`` and turn output gradients into input gradients,
        accumulating the parameter gradients of this coupling on the way."""
        x1 = y2.detach().requires_grad_(True)
        with torch.enable_grad():
            f = (1 - self.v) * self.body(x1, context)
        f.backward(dy1)
        with torch.no_grad():
            v = self.v.detach()
            x2 = (y1 - f.detach()) / v
            if self.v.requires_grad:
                self.v.grad += (x2 * dy1).sum()
            return x1.detach(), x2, x1.grad + dy2, v * dy1


class _ReversiblePass(torch.autograd.Function):
    """Run couplings without storing activations; recompute them backwards."""

    @staticmethod
    def forward(ctx, x1, x2, couplings, context, *params):
        with torch.no_grad():
            for coupling in couplings:
                x1, x2 = coupling(x1, x2, context)
        ctx.save_for_backward(x1, x2)
        ctx.couplings, ctx.context = couplings, context
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        for coupling in reversed(ctx.couplings):  # parameter gradients accumulate inside
            y1, y2, dy1, dy2 = coupling.backward_pass(y1, y2, dy1, dy2, ctx.context)
        return dy1, dy2, None, None, *([None] * len(ctx.needs_input_grad[4:]))


class CouplingSequence(nn.Module):
    """Couplings applied to the two streams of one feature map (see the module docstring)."""

    def __init__(self, bodies: Sequence[nn.Module]):
        super().__init__()
        self.couplings = nn.ModuleList(Coupling(b) for b in bodies)
        self.input_scale = nn.Parameter(torch.ones(()))
        self.merge_scale = nn.Parameter(torch.zeros(()))
        self.reversible = False

    def forward(self, h: torch.Tensor, context: dict) -> torch.Tensor:
        x1, x2 = h, self.input_scale * h
        if self.reversible and torch.is_grad_enabled():
            params = [p for p in self.couplings.parameters() if p.requires_grad]
            x1, x2 = _ReversiblePass.apply(x1, x2, list(self.couplings), context, *params)
        else:
            for coupling in self.couplings:
                x1, x2 = coupling(x1, x2, context)
        return torch.addcmul(x1, self.merge_scale, x2)


def set_reversible(module: nn.Module, reversible: bool) -> None:
    """Switch every :class:`CouplingSequence` inside ``module`` to reversible (or ordinary) backprop."""
    for m in module.modules():
        if isinstance(m, CouplingSequence):
            m.reversible = reversible
