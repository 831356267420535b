"""Make the bundled raw k-space sample, datasets/samples/kspace/shoulder-mr-4coil-4x.h5
(card: datasets/kspace_sample.md).

The held-out shoulder MR of the CS image sets (pydicom-data ``MR2_UNCR.dcm``, 1024 x 1024, 0.195 mm
pixels, 6 mm slice; never trained on), its centre square resized to 128 x 128 (1.5625 mm pixels), is
given a smooth synthetic phase, seen by 4 synthetic birdcage coils, Fourier transformed (centred,
orthonormal), given complex Gaussian noise (sigma 0.002 of the image's [0, 1] range) and undersampled
4x (random columns, fully sampled centre of 10 columns, seed 0). Written fastMRI-style: ``kspace``
(1, 4, 128, 128) complex64 holding only the sampled columns, ``mask`` (128,) and an ISMRMRD header with
the 200 x 200 x 6 mm field of view.

    .venv/bin/python datasets/make_kspace_sample.py [OUTPUT.h5]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from medidiff.datasets.cs_images import held_out_images
from medidiff.io.kspace import write_fastmri_h5
from medidiff.physics.measurements import birdcage_sensitivities, cartesian_mask, fft2c

SIZE, COILS, ACCELERATION, NOISE = 128, 4, 4, 0.002
FIELD_OF_VIEW_MM = (200.0, 200.0, 6.0)  # MR2: 1024 x 0.195313 mm in-plane, 6 mm slices
OUTPUT = Path(__file__).resolve().parent / "samples" / "kspace" / "shoulder-mr-4coil-4x.h5"


def sample_kspace() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k-space (1, coils, H, W) complex64 as written, column mask (W,), the fully sampled magnitude image (H, W))."""
    image = next(img for name, img in held_out_images(SIZE) if name.startswith("shoulder MR"))[0, 0]
    y, x = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    phase = torch.exp(1j * (0.8 * x + 0.5 * y**2 - 0.3))
    coils = birdcage_sensitivities((SIZE, SIZE), COILS) * (image * phase)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, COILS, SIZE, SIZE, generator=generator) * NOISE
    kspace = fft2c(coils) + torch.complex(noise[0], noise[1])
    mask = cartesian_mask((SIZE, SIZE), ACCELERATION, "random", seed=0)
    return (kspace * mask)[None].to(torch.complex64), mask[0], image


def main(output: Path = OUTPUT) -> Path:
    kspace, mask, _ = sample_kspace()
    output.parent.mkdir(parents=True, exist_ok=True)
    return write_fastmri_h5(output, kspace, mask, field_of_view_mm=FIELD_OF_VIEW_MM)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT))
