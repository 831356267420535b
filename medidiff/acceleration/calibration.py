"""Timestep-aware calibration data (Q-Diffusion): model-function inputs recorded while sampling.

The full-precision model samples as usual and every ``every``-th call of each sampling run
(counted from :meth:`ModelFunction.reset_hooks`, which methods call per input) is kept, so the
calibration set spans the whole trajectory, from pure noise to the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook

from medidiff.methods.base import ModelFunction

RECORDER = "calibration-recorder"


@dataclass
class CalibrationSet:
    """Recorded model-function inputs ``(x, t, condition)``."""

    inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    @property
    def timesteps(self) -> list[int]:
        """The distinct timesteps covered, ascending."""
        return sorted({int(v) for _, t, _ in self.inputs for v in t.flatten()})


class _Recorder(ModelHook):
    _is_stateful = True

    def __init__(self, every: int, into: CalibrationSet):
        super().__init__()
        self.every, self.into, self.step = every, into, 0

    def pre_forward(self, module, *args, **kwargs):
        if self.step % self.every == 0:
            x, t, condition = (*args[:3], None)[:3]  # one-pass models (the regression) take no condition
            self.into.inputs.append(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in (x, t, condition)))
        self.step += 1
        return args, kwargs

    def reset_state(self, module):
        self.step = 0
        return module


def record_model_inputs(model_fn: ModelFunction, run: Callable[[], object], every: int = 5) -> CalibrationSet:
    """Call ``run()`` (e.g. ``lambda: [method(x) for x in images]``) and return every ``every``-th
    set of inputs that ``model_fn`` received in each sampling run."""
    if every < 1:
        raise ValueError(f"every is {every}; expected >= 1")
    data = CalibrationSet()
    model_fn.register_hook(_Recorder(every, data), RECORDER)
    try:
        run()
    finally:
        model_fn.remove_hook(RECORDER)
    return data
