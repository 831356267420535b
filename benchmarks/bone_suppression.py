"""Seconds and peak memory per radiograph: shipped BS-LDM stage vs the reference configuration.

``python benchmarks/bone_suppression.py [--quick]``. The shipped row runs the full stage
(normalise, model-resolution BS-LDM with the model's sampler, bone-layer upsampling) on 1024^2 and 2048^2
images. The reference row (VQ-GAN 128/256/512/512 channels, UNet 128 base channels, 8 res blocks,
multipliers 1,1,2,2,4,4, attention at latent 64/32/16/8, 1000 DDPM steps at 1024^2 -> 128^2
latent) uses random weights: one or two UNet steps are timed and scaled to 1000; the VQ-GAN
encode + decode is timed on a tile and scaled by pixel count.
"""

from __future__ import annotations

import argparse
import threading
import time
import types
from collections.abc import Callable

import psutil
import torch
from diffusers import UNet2DModel
from monai.data import MetaTensor

from medidiff.nets.vqgan import VQGAN
from medidiff.stages.bone_suppression import BoneSuppression, load_model


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak RSS increase in MB) of one call, RSS polled every 2 ms."""
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=poll)
    t.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    return seconds, (peak - base) / 2**20


def radiograph(size: int) -> dict:
    """A synthetic DX item of ``size`` x ``size`` pixels (content does not affect the timing)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = 2000 + 1500 * torch.exp(-(x**2 + y**2)) + 200 * torch.sin(40 * y) + 20 * torch.randn(size, size)
    src = types.SimpleNamespace(modality="DX", body_part="CHEST", view_position="PA")
    return {"image": MetaTensor(img[None]), "source": src}


def reference_unet() -> UNet2DModel:
    attn = ["DownBlock2D"] + ["AttnDownBlock2D"] * 4 + ["DownBlock2D"]
    return UNet2DModel(in_channels=8, out_channels=4, block_out_channels=(128, 128, 256, 256, 512, 512),
                       down_block_types=tuple(attn), up_block_types=tuple(b.replace("Down", "Up") for b in reversed(attn)),
                       layers_per_block=8, attention_head_dim=64).eval()


@torch.no_grad()
def reference_seconds(unet_steps: int, tile: int) -> tuple[float, float]:
    """Estimated (seconds, peak MB) of the reference configuration on one 1024^2 radiograph."""
    unet = reference_unet()
    x = torch.randn(1, 8, 128, 128)
    t = torch.tensor([500])
    unet(x, t)  # warm-up
    s_unet, m_unet = measure(lambda: [unet(x, t) for _ in range(unet_steps)])
    vq = VQGAN([128, 256, 512, 512], 4, 16384).eval()
    img = torch.rand(1, 1, tile, tile)
    s_vq, m_vq = measure(lambda: vq.decode(vq.encode(img)))
    scale = (1024 / tile) ** 2
    return 1000 * s_unet / unet_steps + s_vq * scale, max(m_unet, m_vq * scale)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 reference UNet step, 128^2 VQ-GAN tile")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model()
    steps, method = a.steps or model.default_steps, model.default_method.upper()
    stage = BoneSuppression(steps=steps)
    stage(radiograph(512))  # warm-up: loads the weights once
    rows = []
    for size in (1024, 2048):
        item = radiograph(size)
        s, m = measure(lambda item=item: stage(item))
        rows.append((f"shipped BS-LDM, {method} {steps}, {size}x{size}", s, m))
    s_ref, m_ref = reference_seconds(1 if a.quick else 2, 128 if a.quick else 256)
    print(f"{'configuration':58s} {'seconds':>9s} {'peak MB':>9s} {'ref/this':>9s}")
    for name, s, m in rows:
        print(f"{name:58s} {s:9.2f} {m:9.0f} {s_ref / s:9.0f}x")
    print(f"{'reference (1024^2, 1000 DDPM steps, estimated)':58s} {s_ref:9.1f} {m_ref:9.0f} {1:9.0f}x")
    print(f"threads={a.threads}; the reference resizes 2048^2 input to 1024^2, so its time holds for both sizes")


if __name__ == "__main__":
    main()
