"""Write a processed item as the outputs a pipeline asks for (DICOM, NIfTI, PNG)."""

from __future__ import annotations

from pathlib import Path

from medidiff.pipeline import Pipeline


def write_outputs(item: dict, pipeline: Pipeline, folder: Path) -> None:
    """Write ``item`` into ``folder`` per ``pipeline.outputs``."""
    from medidiff.io import writers

    outputs = pipeline.outputs or {"png": {}}
    image = item["image"]
    if "dicom" in outputs:
        options = outputs["dicom"]
        writers.write_derived_dicom(
            image, item["source"], folder / "dicom",
            series_description=options.get("series_description", f"medidiff {pipeline.name}")[:64],
            derivation_description=options.get("derivation_description", _derivation(pipeline))[:1024],
        )
    if "nifti" in outputs:
        writers.write_nifti(image, folder / "image.nii.gz")
    if "png" in outputs:
        writers.write_png(image, folder / "preview.png")
        extra = {key: item[key] for key in outputs["png"].get("extra_keys", []) if key in item}
        for key, layer in extra.items():
            writers.write_png(layer, folder / f"{key}.png")
        if outputs["png"].get("panel", True) and "original" in item:
            writers.write_panel(item["original"], image, folder / "panel.png", extra=extra)


def _derivation(pipeline: Pipeline) -> str:
    stages = ", ".join(call.name for call in pipeline.stages)
    return f"medidiff pipeline {pipeline.name}: {stages}"
