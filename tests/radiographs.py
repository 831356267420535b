"""Chest radiograph test inputs built from a real processed CR (pydicom-data's RG1_UNCR.dcm, a test extra).

RG1 is a Philips PA chest CR: ImageType DERIVED\\PRIMARY, MONOCHROME1, 15 bits stored, 1955x1841, PixelSpacing
0\\0 ("not calibrated"). The builders write copies of it (shrunk for speed, as CR or DX, either photometric
interpretation, any view, any transfer syntax); the original is never touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

from medidiff.resources import pipeline_file

REAL_CR = "RG1_UNCR.dcm"
# ViewCodeSequence codes (SNOMED CT, DICOM CID 4010)
VIEW_CODES = {"PA": ("272479007", "postero-anterior"), "LL": ("399173006", "left lateral")}


def real_chest_cr() -> Path:
    """The real CR file (pydicom-data, installed with the test extra: pip install -e '.[test]')."""
    path = get_testdata_file(REAL_CR)
    assert path is not None, f"{REAL_CR} not found: pydicom-data is missing (pip install -e '.[test]')"
    return Path(path)


def fast_bone_suppression(folder: Path, steps: int = 4) -> Path:
    """The built-in bone-suppression pipeline file with fewer sampling steps (same selection and outputs)."""
    text = pipeline_file("bone-suppression").read_text(encoding="utf-8")
    assert "bone_suppression: {steps: 20}" in text
    path = folder / "bone-suppression-fast.yaml"
    path.write_text(text.replace("bone_suppression: {steps: 20}", f"bone_suppression: {{steps: {steps}}}"),
                    encoding="utf-8")
    return path


def chest_radiograph(path: Path, *, study: str, series: str, instance: int = 1, shrink: int = 8,
                     modality: str = "DX", monochrome1: bool = False, view_position: str = "PA",
                     view_code: str | None = None, syntax: str | None = None) -> Path:
    """Write the real CR, shrunk ``shrink`` times (block mean), as one instance of ``study``/``series``.

    ``monochrome1=False`` stores the inverted pixel data as MONOCHROME2 (the same image for a viewer);
    ``view_code`` ("PA" or "LL") adds a ViewCodeSequence; ``syntax`` a transfer syntax UID to compress to.
    """
    ds = pydicom.dcmread(real_chest_cr())
    stored = ds.pixel_array.astype(np.float64)
    rows, cols = (s // shrink * shrink for s in stored.shape)
    stored = np.rint(stored[:rows, :cols].reshape(rows // shrink, shrink, cols // shrink, shrink).mean(axis=(1, 3)))
    if not monochrome1:
        stored = (2 ** int(ds.BitsStored) - 1) - stored
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = stored.shape
    if "DataSetTrailingPadding" in ds:
        del ds.DataSetTrailingPadding
    if modality == "DX":
        ds.Modality, ds.SOPClassUID = "DX", DigitalXRayImageStorageForPresentation
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [0.2 * shrink, 0.2 * shrink]
        del ds.PixelSpacing
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, instance
    ds.SOPInstanceUID = generate_uid()
    ds.ViewPosition = view_position
    if view_code:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = VIEW_CODES[view_code][0], "SCT", \
            VIEW_CODES[view_code][1]
        ds.ViewCodeSequence = Sequence([code])
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    if syntax:
        ds.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
