"""Write a processed item as the outputs a pipeline asks for (DICOM, NIfTI, PNG)."""

from __future__ import annotations

from pathlib import Path

from medidiff.pipeline import Pipeline

NIFTI_INSTEAD = ("DICOM output asked for, but the source is a {} volume with no DICOM header to derive "
                 "a series from: written as image.nii.gz instead")


def write_outputs(item: dict, pipeline: Pipeline, folder: Path) -> list[str]:
    """Write ``item`` into ``folder`` per ``pipeline.outputs``; returns notes for the report (may be empty).

    A research volume (NIfTI/NRRD/MetaImage source) is never written as derived DICOM: when the pipeline
    asks for DICOM it gets ``image.nii.gz`` instead, with a note saying so. A raw k-space source gets a new
    anonymous DICOM MR series (``medidiff.io.kspace_series.mr_headers``) in the geometry it was loaded with.
    """
    from medidiff.io import writers
    from medidiff.io.kspace_series import KSPACE_FORMAT, NO_FIELD_OF_VIEW, field_of_view, mr_headers

    outputs = pipeline.outputs or {"png": {}}
    image, source, notes = item["image"], item["source"], []
    nifti = "nifti" in outputs
    kspace = source.source_format == KSPACE_FORMAT
    if "dicom" in outputs and not (source.is_dicom or kspace):
        notes.append(NIFTI_INSTEAD.format(source.source_format))
        nifti = True
    elif "dicom" in outputs:
        options, headers = outputs["dicom"], None
        if kspace:
            original = item["original"]
            headers = mr_headers(source, writers.affine_of(original), tuple(original.shape[1:]))
            notes += [] if field_of_view(item["kspace"]) else [NO_FIELD_OF_VIEW]
        writers.write_derived_dicom(
            image, source, folder / "dicom",
            series_description=options.get("series_description", f"medidiff {pipeline.name}")[:64],
            derivation_description=options.get("derivation_description", _derivation(pipeline))[:1024],
            series_number=1 if kspace else None, headers=headers,
        )
    if nifti:
        writers.write_nifti(image, folder / "image.nii.gz")
    if "png" in outputs:
        writers.write_png(image, folder / "preview.png")
        extra = {key: item[key] for key in outputs["png"].get("extra_keys", []) if key in item}
        for key, layer in extra.items():
            writers.write_png(layer, folder / f"{key}.png")
        if outputs["png"].get("panel", True) and "original" in item:
            writers.write_panel(item["original"], image, folder / "panel.png", extra=extra)
    return notes


def _derivation(pipeline: Pipeline) -> str:
    stages = ", ".join(call.name for call in pipeline.stages)
    return f"medidiff pipeline {pipeline.name}: {stages}"
