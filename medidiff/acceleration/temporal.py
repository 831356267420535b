"""TFMQ-DM's temporal feature cache: the time-embedding path of a diffusers UNet depends on the timestep
alone, so its features are computed once for each timestep the sampler uses and reused afterwards
(across images too: a sampler visits a finite set of timesteps).

The path is the UNet's ``time_embedding`` MLP and every resnet's ``time_emb_proj``; a hook on the model
function tells the layers which timestep (and batch size) the current call is for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from torch import nn

from medidiff.acceleration.layers import LayerOverride, override_weight
from medidiff.acceleration.transform import TransformError
from medidiff.methods.base import ModelFunction

MAX_TIMESTEPS = 4096  # kept timesteps; beyond that (a sampler with continuous timesteps) the cache starts over


def _diffusers_unets(model_fn: nn.Module) -> list[nn.Module]:
    return [m for m in model_fn.modules() if hasattr(m, "time_embedding") and hasattr(m, "up_blocks")]


def _labelled(unet: nn.Module) -> bool:
    return getattr(unet, "class_embedding", None) is not None or getattr(unet, "add_embedding", None) is not None


def has_time_embedding(model_fn: nn.Module) -> bool:
    """Whether ``model_fn`` holds a diffusers UNet whose time embedding depends on the timestep alone."""
    unets = _diffusers_unets(model_fn)
    return bool(unets) and not any(_labelled(u) for u in unets)


def time_path_layers(model_fn: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers of the diffusers UNet's time path, by qualified name; refuses a UNet whose
    time embedding also mixes in class labels or other conditions (it would not depend on t alone)."""
    unets = _diffusers_unets(model_fn)
    if not unets:
        raise TransformError(f"temporal cache needs a diffusers UNet with a time_embedding; "
                             f"{type(model_fn).__name__} has none")
    for unet in unets:
        if _labelled(unet):
            raise TransformError("temporal cache: this UNet's time embedding also depends on class labels or added "
                                 "conditions; switch the temporal cache off (temporal_cache=False)")
    ids = {id(m) for unet in unets for m in unet.time_embedding.modules()}
    return {name: m for name, m in model_fn.named_modules() if isinstance(m, nn.Linear)
            and (id(m) in ids or name.endswith(".time_emb_proj"))}


@dataclass
class TemporalFeatures:
    """The current call's timestep key and the features kept per (layer, key)."""

    key: tuple | None = None
    features: dict[tuple[str, tuple], torch.Tensor] = field(default_factory=dict)


class _Timestep(ModelHook):
    """On the model function ``(x, t, ...)``: sets the key (t's values, batch size) for the call."""

    def __init__(self, state: TemporalFeatures):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        if len(args) >= 2 and torch.is_tensor(args[0]):
            self.state.key = (tuple(torch.as_tensor(args[1]).flatten().tolist()), args[0].shape[0])
        return args, kwargs

    def post_forward(self, module, output):
        self.state.key = None
        return output


class CachedTimeLayer(LayerOverride):
    """On a time-path layer: ``compute(module, x)`` once per timestep key, then the kept output."""

    def __init__(self, state: TemporalFeatures, name: str, compute: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.state, self.layer, self.compute = state, name, compute

    def new_forward(self, module, x):
        if self.state.key is None:  # called outside the model function: no timestep known
            return self.compute(module, x)
        key = (self.layer, self.state.key)
        if key not in self.state.features:
            if len(self.state.features) >= MAX_TIMESTEPS:
                self.state.features.clear()
            self.state.features[key] = self.compute(module, x)
        return self.state.features[key]


def cache_time_path(model_fn: ModelFunction, name: str, computes: dict[str, Callable[[nn.Module, torch.Tensor],
                    torch.Tensor]], state: TemporalFeatures) -> None:
    """Attach the cache under ``name``: ``computes`` holds each time-path layer's computation (from
    :func:`time_path_layers`), e.g. with quantized weights; ``state`` keeps the features (it may come
    from an earlier application with the same computations: they stay valid)."""
    model_fn.register_hook(_Timestep(state), name)
    for layer_name, module in model_fn.named_modules():
        if layer_name in computes:
            override_weight(module, CachedTimeLayer(state, layer_name, computes[layer_name]), name)
