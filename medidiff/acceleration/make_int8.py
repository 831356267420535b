"""Make the int8 model that ships beside a model's weights (``accelerate: {int8: {}}`` runs it).

``python -m medidiff.acceleration.make_int8 models/bone_suppression/ldm models/restoration/ct_denoise/regression``
calibrates :class:`~medidiff.acceleration.int8.Int8Quantization` on the model's own sampling runs over
validation or training data, never test images (BS-LDM: two validation phantoms and two validation DRRs,
every 5th model call; restoration: four training patches of the model's task, every call), and writes
``<name>.int8.safetensors`` beside ``<name>.safetensors``, with that file's sha256 (a stale int8 model is
refused after retraining). The validation DRRs need the chest CT of ``make drr-data``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medidiff.acceleration.calibration import CalibrationSet, record_model_inputs
from medidiff.acceleration.int8 import Int8Quantization, shipped_file
from medidiff.errors import InputError

CALIBRATION_PATCH = 256  # restoration: the side of the training patches calibrated on


def calibration_run(weights: Path) -> tuple[object, CalibrationSet]:
    """The method saved as ``weights`` (``<folder>/<name>``, no suffix) and its calibration inputs."""
    from medidiff.datasets import chest_phantom, drr
    from medidiff.datasets import restoration_images as images
    from medidiff.methods.bone_suppression import BSLDM
    from medidiff.methods.restoration import Restoration

    config_file = weights.with_suffix(".json")
    if not config_file.is_file():
        raise InputError(f"{weights}: no {config_file.name}; expected a model path such as models/bone_suppression/ldm")
    config = json.loads(config_file.read_text())
    if "vqgan" in config:
        method = BSLDM.from_pretrained(weights.parent, weights.name)
        cxr = np.concatenate([chest_phantom.make_batch(chest_phantom.VAL_SEEDS[:2], 256)["cxr"],
                              drr.make_batch(drr.VAL_SEEDS[:2], 256)["cxr"]])
        images_in, every = torch.from_numpy(cxr)[:, None], 5
    elif "task" in config:
        method = Restoration.from_pretrained(weights.parent, weights.name)
        _, images_in = images.training_pairs(config["task"], 4, CALIBRATION_PATCH, np.random.default_rng(0))
        every = 1
    else:
        raise InputError(f"{weights}: neither a BS-LDM nor a restoration model; int8 files ship for those")
    with torch.no_grad():
        return method, record_model_inputs(method.model_fn, lambda: [method(x) for x in images_in.split(1)], every)


def make_int8(weights: Path) -> Path:
    """Calibrate, quantize and write ``<weights>.int8.safetensors``; returns its path."""
    method, calibration = calibration_run(weights)
    int8 = Int8Quantization(calibration)
    int8.apply(method.model_fn)  # the first application quantizes and calibrates
    int8.remove(method.model_fn)
    float_file = weights.with_suffix(".safetensors")
    return int8.save(shipped_file(float_file), made_from=float_file)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python -m medidiff.acceleration.make_int8 models/bone_suppression/ldm")
    p.add_argument("weights", nargs="+", type=Path, help="a model as <folder>/<name> (its .json and .safetensors)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for weights in a.weights:
        try:
            path = make_int8(weights)
        except InputError as e:
            raise SystemExit(f"make_int8: {e}") from None
        print(f"{path} ({path.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
