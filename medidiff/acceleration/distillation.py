"""Quantization-aware fine-tuning by data-free distillation: EfficientDM and QuEST (simulated).

Both start from Q-Diffusion's post-training quantization
(:class:`~medidiff.acceleration.quantization.PostTrainingQuantization`: per-channel weight ranges,
per-tensor activation ranges from the model's own sampling inputs) and fine-tune the fake-quantized
model so that its output matches the full-precision model's on the full-precision model's own
sampling trajectory (the recorded calibration inputs; no training data). Rounding passes gradients
straight through; activation ranges are learned as in LSQ.

- :class:`EfficientDM` (He et al., 2024): a low-rank adapter ``B A`` on every Conv2d/Linear,
  quantized together with the weight (``Q(W + B A)``: QALoRA) and merged into it at the end, so the
  result is an ordinary low-bit weight; temporal activation quantization (TALSQ): every layer's input
  range is learned per sampling timestep.
- :class:`QuEST` (Wang et al., 2024): only the layers holding temporal information (the time-embedding
  path: ``time_embedding`` and every resnet's ``time_emb_proj``) and the most bit-sensitive layers
  (:func:`~medidiff.acceleration.mixed_precision.layer_sensitivity`) are fine-tuned, whole weights;
  every other layer keeps its post-training quantization.

The result is stored like post-training quantization (codes, ranges; per-timestep input ranges) and
applied with float kernels: simulation only.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import HookRegistry
from torch import nn

from medidiff.acceleration.adaround import layer_output
from medidiff.acceleration.calibration import CalibrationSet
from medidiff.acceleration.fake_quant import fake_quantize, weight_codes, weight_from_codes
from medidiff.acceleration.layers import LayerOverride, override_weight, weight_layers
from medidiff.acceleration.mixed_precision import layer_sensitivity
from medidiff.acceleration.quantization import (
    PostTrainingQuantization,
    QuantizedLayer,
    attach_weights,
    checksum,
)
from medidiff.acceleration.temporal import TemporalFeatures, _Timestep, time_path_layers
from medidiff.acceleration.transform import (
    Transform,
    TransformError,
    read_transform_file,
    write_transform_file,
)
from medidiff.methods.base import ModelFunction

METADATA_KEY = "medidiff_distilled_quantization"
LOSS_CALLS = 16  # about as many calibration calls, spread over the set, for the reported loss
Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class _RoundSTE(torch.autograd.Function):
    """Rounding whose gradient passes straight through."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def quantize_ste(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`~medidiff.acceleration.fake_quant.fake_quantize` (the same values) with straight-through
    rounding: gradients reach ``x`` inside the range and ``lo``/``hi`` (LSQ-style)."""
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero = _RoundSTE.apply(-lo / scale)
    return (torch.clamp(_RoundSTE.apply(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


class Timesteps:
    """The sampling timesteps that have their own activation ranges; a call's slot is the nearest one."""

    def __init__(self, values: torch.Tensor, state: TemporalFeatures):
        self.values, self.state = values.float(), state

    def slot(self) -> int:
        if self.state.key is None or len(self.values) == 1:
            return 0
        return int((self.values - self.state.key[0][0]).abs().argmin())


class TrainableQuantLayer(LayerOverride):
    """A Conv2d/Linear run as ``Q(W + delta)`` on ``Q(x)`` with the input range of the current timestep
    slot; ``delta`` is ``B A`` (``rank``), a whole weight (``full``) or nothing; ``act_ranges``
    (slots, 2) are learned where ``learn_ranges``."""

    def __init__(self, layer: nn.Module, q: QuantizedLayer, act_bits: int | None, timesteps: Timesteps,
                 rank: int = 0, full: bool = False, learn_ranges: bool = False):
        super().__init__()
        w = layer.weight
        self.bits, self.act_bits, self.timesteps = q.bits, act_bits, timesteps
        shape = (-1,) + (1,) * (w.ndim - 1)
        self.w_lo, self.w_hi = q.weight_ranges[0, 0].reshape(shape), q.weight_ranges[0, 1].reshape(shape)
        self.lora_a = self.lora_b = self.full = self.act = None
        if rank:
            gen = torch.Generator().manual_seed(w.numel())
            fan_in = w[0].numel()
            self.lora_a = nn.Parameter(torch.randn(rank, fan_in, generator=gen) / fan_in**0.5)
            self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank))
        if full:
            self.full = nn.Parameter(torch.zeros_like(w))
        if q.act_ranges is not None and act_bits is not None:
            ranges = q.act_ranges[0].expand(len(timesteps.values), 2).clone()
            self.act = nn.Parameter(ranges) if learn_ranges else ranges

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lora_a, self.lora_b, self.full, self.act) if isinstance(p, nn.Parameter)]

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """The change to the float weight (zero without an adapter)."""
        delta = torch.zeros_like(w)
        if self.lora_a is not None:
            delta = delta + (self.lora_b @ self.lora_a).reshape(w.shape)
        return delta if self.full is None else delta + self.full

    def new_forward(self, module, x):
        if self.act is not None:
            lo, hi = self.act[self.timesteps.slot()]
            x = quantize_ste(x, lo, hi, self.act_bits)
        w = module.weight
        return layer_output(module, x, quantize_ste(w + self.delta(w), self.w_lo, self.w_hi, self.bits))

    @torch.no_grad()
    def merged(self, layer: nn.Module) -> QuantizedLayer:
        """The adapter merged into the weight and quantized: codes, ranges and (slots, 2) input ranges."""
        w = layer.weight.detach()
        ranges = torch.stack([self.w_lo.flatten(), self.w_hi.flatten()])[None]
        act = None if self.act is None else self.act.detach().clone()
        return QuantizedLayer(weight_codes(w + self.delta(w), ranges, self.bits), self.bits, ranges, act, 0, checksum(w))


def attach_trainable(model_fn: ModelFunction, layers: dict[str, QuantizedLayer], act_bits: int | None,
                     timesteps: torch.Tensor, name: str, options: Callable[[str], dict]) -> dict[str, TrainableQuantLayer]:
    """:class:`TrainableQuantLayer` on every layer of ``layers`` under ``name``, with ``options(layer name)``
    as its keyword arguments, and the timestep hook on the model function."""
    state = TemporalFeatures()
    model_fn.register_hook(_Timestep(state), name)
    found, hooks = weight_layers(model_fn), {}
    for layer_name, q in layers.items():
        hooks[layer_name] = TrainableQuantLayer(found[layer_name], q, act_bits, Timesteps(timesteps, state),
                                                **options(layer_name))
        override_weight(found[layer_name], hooks[layer_name], name)
    return hooks


def distillation_loss(model_fn: ModelFunction, calls: list[Call], targets: list[torch.Tensor]) -> float:
    """Mean squared difference between ``model_fn``'s outputs on ``calls`` and ``targets``."""
    with torch.no_grad():
        return sum(float(F.mse_loss(_call(model_fn, c), t)) for c, t in zip(calls, targets, strict=True)) / len(calls)


def _call(model_fn: ModelFunction, call: Call) -> torch.Tensor:
    model_fn.reset_hooks()
    return model_fn(*call)


def distill(model_fn: ModelFunction, calls: list[Call], targets: list[torch.Tensor], params: list[nn.Parameter],
            iters: int, lr: float, seed: int = 0) -> None:
    """``iters`` Adam steps on ``params``, each on one call drawn from ``calls``: the mean squared
    difference between ``model_fn``'s output and the teacher's ``targets``."""
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(iters):
            i = int(torch.randint(len(calls), (1,), generator=gen))
            loss = F.mse_loss(_call(model_fn, calls[i]), targets[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


class DistilledQuantization(Transform):
    """Post-training quantization fine-tuned by distillation on ``calibration`` (whole or sub-sampled
    sampling runs of the full-precision model); subclasses choose what is trained (:meth:`trainable`).
    The first application trains (``iters`` steps); :attr:`losses` holds the distillation loss on
    about ``LOSS_CALLS`` calibration calls before and after. Later applications, :meth:`save` and :meth:`load` reuse the result."""

    name: str
    per_timestep = False  # one input range per calibration timestep (TALSQ) or one for all

    def __init__(self, calibration: CalibrationSet | None, weight_bits: int, act_bits: int | None, iters: int,
                 lr: float, ptq_every: int, seed: int):
        if iters < 0 or ptq_every < 1:
            raise TransformError(f"{self.name} iters {iters}, ptq_every {ptq_every}; expected iters >= 0, ptq_every >= 1")
        self.calibration, self.weight_bits, self.act_bits = calibration, weight_bits, act_bits
        self.iters, self.lr, self.ptq_every, self.seed = iters, lr, ptq_every, seed
        self.layers: dict[str, QuantizedLayer] = {}
        self.timesteps = torch.zeros(1)
        self.losses: dict[str, float] = {}

    @abstractmethod
    def trainable(self, model_fn: ModelFunction, calls: list[Call]) -> Callable[[str], dict]:
        """Keyword options of :class:`TrainableQuantLayer` per layer name: what is trained."""

    def attach(self, model_fn: ModelFunction) -> None:
        if not self.layers:
            self._train(model_fn)
        attach_weights(model_fn, {n: (weight_from_codes(q.codes, q.weight_ranges, q.bits), q.checksum)
                                  for n, q in self.layers.items()}, self.name)
        timesteps = Timesteps(self.timesteps, TemporalFeatures())
        model_fn.register_hook(_Timestep(timesteps.state), self.name)
        found = weight_layers(model_fn)
        for name, q in self.layers.items():
            if q.act_ranges is not None:
                hook = HookRegistry.check_if_exists_or_initialize(found[name]).get_hook(self.name)
                hook.input_fn = partial(_quantize_input, q.act_ranges, self.act_bits, timesteps)

    def _train(self, model_fn: ModelFunction) -> None:
        if self.calibration is None or not self.calibration.inputs:
            raise TransformError(f"{self.name} has no calibration inputs; record the model's sampling runs with "
                                 "record_model_inputs")
        calls = self.calibration.inputs
        ptq = PostTrainingQuantization(CalibrationSet(calls[::self.ptq_every]), self.weight_bits, self.act_bits,
                                       split_shortcut=False)
        start = ptq.quantize_layers(model_fn)
        with torch.no_grad():
            model_fn.reset_hooks()
            targets = [type(model_fn).forward(model_fn, *call) for call in calls]
        self.timesteps = (torch.tensor(self.calibration.timesteps, dtype=torch.float32) if self.per_timestep
                          else torch.zeros(1))
        hooks = attach_trainable(model_fn, start, self.act_bits, self.timesteps, self.name,
                                 self.trainable(model_fn, calls))
        probe = slice(None, None, max(1, len(calls) // LOSS_CALLS))  # the loss is reported on these calls
        try:
            self.losses["before"] = distillation_loss(model_fn, calls[probe], targets[probe])
            distill(model_fn, calls, targets, [p for h in hooks.values() for p in h.parameters()], self.iters,
                    self.lr, self.seed)
            self.losses["after"] = distillation_loss(model_fn, calls[probe], targets[probe])
            found = weight_layers(model_fn)
            self.layers = {name: hook.merged(found[name]) for name, hook in hooks.items()}
        finally:
            model_fn.remove_hook(self.name)
            model_fn.reset_hooks()

    def save(self, path: str | Path) -> Path:
        """Write the merged, quantized result (after an application) as safetensors."""
        if not self.layers:
            raise TransformError(f"{self.name}: nothing to save yet; apply it to the model first")
        container = PostTrainingQuantization(None, self.weight_bits, self.act_bits)
        container.layers = self.layers
        meta, tensors = container.state()
        return write_transform_file(path, tensors | {"timesteps": self.timesteps},
                                    METADATA_KEY, meta | {"transform": self.name})

    @classmethod
    def load(cls, path: str | Path) -> DistilledQuantization:
        """A result written by :meth:`save` of this class, ready to apply without calibration or training."""
        meta, tensors = read_transform_file(path, METADATA_KEY, f"medidiff {cls.name} file", f"{cls.__name__}.save")
        if meta.get("transform") != cls.name:
            raise TransformError(f"{path}: a file of {meta.get('transform')}, not of {cls.name}; load it with that transform")
        transform = cls(None, weight_bits=meta["weight_bits"], act_bits=meta["act_bits"])
        transform.layers = PostTrainingQuantization.from_state(meta, tensors, str(path)).layers
        transform.timesteps = tensors["timesteps"]
        return transform


def _quantize_input(ranges: torch.Tensor, bits: int, timesteps: Timesteps, x: torch.Tensor) -> torch.Tensor:
    lo, hi = ranges[timesteps.slot()]
    return fake_quantize(x, lo, hi, bits)


class EfficientDM(DistilledQuantization):
    """EfficientDM: rank-``rank`` quantization-aware adapters on every weight layer and per-timestep
    input ranges (TALSQ), distilled from the full-precision model for ``iters`` steps, merged at the end."""

    name = "efficientdm"
    per_timestep = True

    def __init__(self, calibration: CalibrationSet | None = None, weight_bits: int = 4, act_bits: int | None = 8,
                 rank: int = 4, iters: int = 200, lr: float = 1e-3, ptq_every: int = 5, seed: int = 0):
        super().__init__(calibration, weight_bits, act_bits, iters, lr, ptq_every, seed)
        self.rank = rank

    def trainable(self, model_fn: ModelFunction, calls: list[Call]) -> Callable[[str], dict]:
        return lambda name: {"rank": self.rank, "learn_ranges": True}


class QuEST(DistilledQuantization):
    """QuEST: the time-embedding path and the ``sensitive`` most bit-sensitive layers (their output error
    with the layer alone at ``weight_bits``; ``conv_in``/``conv_out`` compete too, though the post-training
    quantization keeps them at 8 bits: fine-tuning them measured best, docs/acceleration.md) fine-tuned whole
    (``iters`` steps), the other layers as quantized after training; input ranges fixed."""

    name = "quest"

    def __init__(self, calibration: CalibrationSet | None = None, weight_bits: int = 4, act_bits: int | None = 8,
                 sensitive: int = 4, iters: int = 200, lr: float = 1e-4, ptq_every: int = 5, seed: int = 0):
        super().__init__(calibration, weight_bits, act_bits, iters, lr, ptq_every, seed)
        self.sensitive = sensitive
        self.chosen: list[str] = []  # the fine-tuned layers

    def trainable(self, model_fn: ModelFunction, calls: list[Call]) -> Callable[[str], dict]:
        sensitivity = layer_sensitivity(model_fn, CalibrationSet(calls[::self.ptq_every]), bits=self.weight_bits)
        temporal = set(time_path_layers(model_fn))
        ranked = sorted((n for n in sensitivity if n not in temporal), key=sensitivity.get, reverse=True)
        self.chosen = sorted(temporal) + ranked[:self.sensitive]
        return lambda name: {"full": name in self.chosen}
