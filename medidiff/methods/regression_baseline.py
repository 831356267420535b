"""Plain UNet regression baseline for bone suppression: CXR in [0,1] -> soft tissue, one pass."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from monai.networks.nets import UNet
from safetensors.torch import load_file


def build_regression_unet(cfg: dict) -> UNet:
    """MONAI UNet, 1 channel in and out; ``cfg``: channels, strides, num_res_units."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(cfg["channels"]),
                strides=tuple(cfg["strides"]), num_res_units=cfg.get("num_res_units", 1), norm="INSTANCE")


class RegressionBaseline:
    """Loaded regression model with the same ``suppress`` interface as :class:`BSLDM`."""

    def __init__(self, net: UNet):
        self.net = net.eval()

    @classmethod
    def from_pretrained(cls, folder: Path, name: str = "regression") -> RegressionBaseline:
        cfg = json.loads((Path(folder) / f"{name}.json").read_text())
        net = build_regression_unet(cfg["model"])
        net.load_state_dict(load_file(Path(folder) / f"{name}.safetensors"))
        return cls(net)

    @torch.no_grad()
    def suppress(self, cxr: torch.Tensor, **_: object) -> torch.Tensor:
        """Soft-tissue estimate (N,1,H,W) for ``cxr`` (N,1,H,W) in [0,1]."""
        return self.net(cxr)
