"""Test inputs built from pydicom's real test files (copies; the originals are never touched)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def ct_series_copies(folder: Path, count: int) -> list[Path]:
    """``count`` single-image CT studies: CT_small.dcm with fresh study/series/SOP UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"ct_{i:02d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths
