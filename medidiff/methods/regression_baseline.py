"""Plain UNet regression baseline for bone suppression: CXR in [0,1] -> soft tissue, one pass.

Models trained with ``predicts: bone_layer`` in their JSON output the bone layer, subtracted from
the input; older ones output the soft-tissue image itself.

On the method contract with no process: the model function is ``net(x)`` (``t`` and
``condition`` unused), called once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import UNet

from medidiff.methods.base import Method, ModelFunction, read_component


def build_regression_unet(cfg: dict) -> UNet:
    """MONAI UNet, 1 channel in and out; ``cfg``: channels, strides, num_res_units."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(cfg["channels"]),
                strides=tuple(cfg["strides"]), num_res_units=cfg.get("num_res_units", 1), norm="INSTANCE")


class ImageToImage(ModelFunction):
    """``net(x)``: a one-pass image-to-image network as a model function."""

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class RegressionBaseline(Method):
    """Loaded regression model, called like :class:`~medidiff.methods.bone_suppression.BSLDM`."""

    def __init__(self, net: UNet, config: dict, name: str = "regression"):
        self.model_fn = ImageToImage(net).eval().requires_grad_(False)
        self.config, self.name = config, name

    @classmethod
    def from_pretrained(cls, folder: Path, name: str = "regression") -> RegressionBaseline:
        config, weights = read_component(folder, name)
        net = build_regression_unet(config["model"])
        net.load_state_dict(weights)
        return cls(net, config, name)

    def networks(self):
        return {self.name: (self.model_fn.net, self.config)}

    @torch.no_grad()
    def __call__(self, cxr: torch.Tensor, **_: object) -> torch.Tensor:
        """Soft-tissue estimate (N,1,H,W) for ``cxr`` (N,1,H,W) in [0,1]; sampling options are ignored."""
        self.model_fn.reset_hooks()
        out = self.model_fn(cxr, torch.zeros(len(cxr), dtype=torch.long), None)
        return cxr - out if self.config.get("predicts") == "bone_layer" else out

    suppress = __call__
