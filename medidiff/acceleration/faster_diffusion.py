"""Faster Diffusion (Li et al., 2023): propagate the U-Net encoder's features, decode several steps at once.

On key steps (every ``interval``-th model call since :meth:`ModelFunction.reset_hooks`, or the given
``key_steps``) the U-Net runs whole and the encoder (input convolution, down path, middle;
:meth:`~medidiff.acceleration.unets.UNetLayout.encoder`) keeps its outputs. On the other steps only
the decoder runs, on the kept skip and middle features and the step's own time embedding. The
decoder then no longer depends on the sampler's state, so the non-key steps up to the next key step
are decoded together as one batch (parallel decoding, at most ``parallel`` steps): their timesteps are
those of the previous sampling run when this one has followed it so far (every image after the first),
else predicted from the spacing of the last two calls; a call whose timestep was not predicted is
decoded alone (the same arithmetic, only the batched work was wasted). Prior noise injection adds
``noise_injection`` times the first call's input (the initial noise) to the model input in the
second half of sampling (timesteps below half the first one), as the paper adds ``0.003 * z_T`` to
the latent.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import HookRegistry

from medidiff.acceleration.deepcache import _CachedLayer, _Schedule, _StepCounter
from medidiff.acceleration.transform import Transform, TransformError
from medidiff.acceleration.unets import find_layout
from medidiff.methods.base import ModelFunction


class _KeyStepCounter(_StepCounter):
    """Counts the calls; adds ``alpha`` x the first call's input in the second half of sampling."""

    def __init__(self, schedule: _Schedule, alpha: float):
        super().__init__(schedule)
        self.alpha, self.first = alpha, None

    def pre_forward(self, module, *args, **kwargs):
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        if not self.alpha:
            return args, kwargs
        if self.schedule.step == 0:
            self.first = args[0].detach().clone()
        elif self.schedule.timesteps[-1].max() < self.schedule.timesteps[0].max() / 2:
            args = (args[0] + self.alpha * self.first, *args[1:])
        return args, kwargs

    def reset_state(self, module):
        self.first = None
        return super().reset_state(module)


class _Decoder(ModelHook):
    """On the U-Net: key steps run it whole; the first non-key step of a stretch decodes the stretch's
    (predicted) timesteps as one batch and keeps the outputs for the calls that follow."""

    _is_stateful = True

    def __init__(self, schedule: _Schedule, parallel: int):
        super().__init__()
        self.schedule, self.parallel, self.decoded = schedule, parallel, {}
        self.seen: list[tuple] = []  # timesteps of this sampling run so far
        self.previous: list[tuple] = []  # of the last complete one

    def new_forward(self, module, *args, **kwargs):
        forward, schedule = self.fn_ref.original_forward, self.schedule
        x, t = args[0], args[1].reshape(-1).expand(len(args[0]))  # one timestep per image
        key = tuple(t.tolist())
        if schedule.step == 0 and self.seen:  # a new sampling run: the last one's timesteps predict this one's
            self.previous, self.seen = self.seen, []
        self.seen.append(key)
        if schedule.refresh:
            self.decoded.clear()
            return forward(*args, **kwargs)
        if key in self.decoded:
            return self.decoded.pop(key)
        steps = 1
        while steps < self.parallel and not schedule.refresh_at(schedule.step + steps):
            steps += 1
        # the decoder reads nothing else of the call: only (x, t) calls are batched (IDM's injectors are per step)
        if steps == 1 or len(args) > 2 or kwargs or len(schedule.timesteps) < 2:
            return forward(*args, **kwargs)
        if self.previous[:len(self.seen)] == self.seen:
            ahead = [t.new_tensor(k).expand(len(x)) for k in self.previous[len(self.seen) - 1:][:steps]]
        else:
            spacing = (schedule.timesteps[-2] - schedule.timesteps[-1]).reshape(-1).expand(len(x))
            if not bool((spacing > 0).all()):
                return forward(*args, **kwargs)
            ahead = [a for a in (t - j * spacing for j in range(steps)) if bool((a >= 0).all())]
        if len(ahead) < 2:
            return forward(*args, **kwargs)
        out = forward(x.repeat(len(ahead), *[1] * (x.ndim - 1)), torch.cat(ahead))
        sample = out.sample if hasattr(out, "sample") else out
        parts = [type(out)(sample=p) if hasattr(out, "sample") else p for p in sample.split(len(x))]
        for a, part in zip(ahead[1:], parts[1:], strict=True):
            self.decoded[tuple(a.tolist())] = part
        return parts[0]

    def reset_state(self, module):
        self.decoded.clear()
        if self.seen:
            self.previous, self.seen = self.seen, []
        return module


class FasterDiffusion(Transform):
    """Encoder propagation: the whole U-Net on key steps (every ``interval``-th call, or ``key_steps``),
    only its decoder in between, ``parallel`` non-key steps decoded as one batch; ``noise_injection``:
    the prior noise weight (0: off; the paper uses 0.003)."""

    name = "faster_diffusion"

    def __init__(self, interval: int = 2, key_steps: list[int] | None = None, parallel: int = 4,
                 noise_injection: float = 0.0):
        for key, value in (("interval", interval), ("parallel", parallel)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TransformError(f"faster_diffusion {key} is {value!r}; expected a whole number >= 1")
        if key_steps is not None and (not key_steps or 0 not in key_steps):
            raise TransformError(f"faster_diffusion key_steps is {key_steps!r}; expected step indices that include 0")
        if not isinstance(noise_injection, int | float) or not 0 <= noise_injection < 1:
            raise TransformError(f"faster_diffusion noise_injection is {noise_injection!r}; expected 0 <= value < 1")
        self.interval, self.parallel, self.noise_injection = interval, parallel, float(noise_injection)
        self.key_steps = None if key_steps is None else frozenset(int(k) for k in key_steps)

    def attach(self, model_fn: ModelFunction) -> None:
        layout = find_layout(model_fn, self.name)
        schedule = _Schedule(self.interval, self.key_steps)
        for module in layout.encoder():
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_CachedLayer(schedule), self.name)
        HookRegistry.check_if_exists_or_initialize(layout.net).register_hook(_Decoder(schedule, self.parallel),
                                                                             self.name)
        model_fn.register_hook(_KeyStepCounter(schedule, self.noise_injection), self.name)
