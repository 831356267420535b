"""DGQ-style group quantization with outlier handling, on weights, simulated.

Each Conv2d/Linear weight is quantized in groups: per output channel, every ``group_size`` input
channels (with their kernel positions) get their own range (Q-Diffusion's range search), so one
large group does not coarsen the others; the ``outliers`` fraction of weights largest in magnitude
(per layer) is kept exactly, outside the groups' ranges. Activations stay float.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medidiff.acceleration.fake_quant import dequantize, quantize_codes, search_range
from medidiff.acceleration.layers import weight_layers
from medidiff.acceleration.pruning import magnitude_mask
from medidiff.acceleration.quantization import _pack, _unpack, attach_weights, checksum
from medidiff.acceleration.transform import (
    Transform,
    TransformError,
    read_transform_file,
    write_transform_file,
)
from medidiff.methods.base import ModelFunction

METADATA_KEY = "medidiff_group_quantization"


def group_codes(w: torch.Tensor, bits: int, group_size: int, outliers: float = 0.0) -> dict[str, torch.Tensor]:
    """``w`` (out, in, ...) quantized per (output channel, ``group_size`` input channels): ``codes`` (groups,
    values; uint8), ``ranges`` (groups, 2) and its ``outliers`` fraction of largest-magnitude weights kept
    exact (``outlier_index`` into the flattened weight, ``outlier_value``)."""
    keep = magnitude_mask(w, 1 - outliers) if outliers > 0 else torch.zeros_like(w, dtype=torch.bool)
    inner = w.masked_fill(keep, 0)  # outliers take no part in the groups' ranges
    out, cin = w.shape[:2]
    pad = -cin % group_size
    padded = torch.cat([inner, inner.new_zeros(out, pad, *w.shape[2:])], 1) if pad else inner
    rows = padded.reshape(out, (cin + pad) // group_size, -1).reshape(-1, group_size * padded[0, 0].numel())
    lo, hi = search_range(rows, bits)
    index = keep.flatten().nonzero()[:, 0]
    return {"codes": quantize_codes(rows, lo, hi, bits).to(torch.uint8), "ranges": torch.cat([lo, hi], 1),
            "outlier_index": index.to(torch.int32), "outlier_value": w.flatten()[index]}


def group_weight(parts: dict[str, torch.Tensor], shape: tuple[int, ...], bits: int, group_size: int) -> torch.Tensor:
    """The fake-quantized weight of :func:`group_codes`' ``parts`` (``shape``: the weight's)."""
    out, cin = shape[:2]
    ranges = parts["ranges"]
    groups = dequantize(parts["codes"].float(), ranges[:, :1], ranges[:, 1:], bits)
    flat = groups.reshape(out, cin + -cin % group_size, *shape[2:])[:, :cin].flatten()
    flat[parts["outlier_index"].long()] = parts["outlier_value"]
    return flat.reshape(shape)


def group_quantize(w: torch.Tensor, bits: int, group_size: int, outliers: float = 0.0) -> torch.Tensor:
    """``w`` fake-quantized per (output channel, ``group_size`` input channels), its ``outliers``
    fraction of largest-magnitude weights kept exact."""
    return group_weight(group_codes(w, bits, group_size, outliers), tuple(w.shape), bits, group_size)


class GroupQuantization(Transform):
    """``bits``-bit weights in groups of ``group_size`` input channels, ``outliers`` kept exact;
    :meth:`save` / :meth:`load`: the codes, group ranges and outliers as safetensors."""

    name = "group-quantization"

    def __init__(self, bits: int = 4, group_size: int = 16, outliers: float = 0.005):
        if not 2 <= bits <= 8 or group_size < 1 or not 0 <= outliers < 0.5:
            raise TransformError(f"group quantization bits {bits}, group_size {group_size}, outliers {outliers}; "
                                 "expected bits 2..8, group_size >= 1 and 0 <= outliers < 0.5")
        self.bits, self.group_size, self.outliers = bits, group_size, outliers
        self.parts: dict[str, tuple[dict[str, torch.Tensor], tuple[int, ...], float]] = {}  # layer -> (parts, shape, checksum)
        self.weights: dict[str, tuple[torch.Tensor, float]] = {}  # layer -> (quantized weight, float checksum)

    @torch.no_grad()
    def attach(self, model_fn: ModelFunction) -> None:
        if not self.parts:  # quantized once, reused by later applications
            self.parts = {name: (group_codes(layer.weight.detach(), self.bits, self.group_size, self.outliers),
                                 tuple(layer.weight.shape), checksum(layer.weight))
                          for name, layer in weight_layers(model_fn).items()}
        if not self.weights:
            self.weights = {name: (group_weight(parts, shape, self.bits, self.group_size), c)
                            for name, (parts, shape, c) in self.parts.items()}
        attach_weights(model_fn, self.weights, self.name)

    def save(self, path: str | Path) -> Path:
        """Write the group quantization (after an application) as safetensors (codes two per byte at 4 bits)."""
        if not self.parts:
            raise TransformError("group-quantization: nothing to save yet; apply it to the model first")
        tensors, layers = {}, {}
        for name, (parts, shape, c) in self.parts.items():
            tensors |= {f"{name}.{k}": _pack(v, self.bits) if k == "codes" else v for k, v in parts.items()}
            layers[name] = {"shape": list(shape), "codes": list(parts["codes"].shape), "checksum": c}
        meta = {"bits": self.bits, "group_size": self.group_size, "outliers": self.outliers, "layers": layers}
        return write_transform_file(path, tensors, METADATA_KEY, meta)

    @classmethod
    def load(cls, path: str | Path) -> GroupQuantization:
        """A group quantization written by :meth:`save`, ready to apply."""
        meta, tensors = read_transform_file(path, METADATA_KEY, "medidiff group quantization file",
                                            "GroupQuantization.save")
        transform = cls(meta["bits"], meta["group_size"], meta["outliers"])
        for name, info in meta["layers"].items():
            parts = {k: tensors[f"{name}.{k}"] for k in ("ranges", "outlier_index", "outlier_value")}
            parts["codes"] = _unpack(tensors[f"{name}.codes"], meta["bits"], info["codes"])
            transform.parts[name] = parts, tuple(info["shape"]), info["checksum"]
        return transform
