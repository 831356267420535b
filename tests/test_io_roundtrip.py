"""Load -> write derived DICOM -> read back, across transfer syntaxes; MONOCHROME1; dciodvfy; atomic writes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medidiff.io.atomic import atomic_dir, atomic_write
from medidiff.io.discovery import discover
from medidiff.io.loading import load_item, load_series
from medidiff.io.privacy import hash_identifier
from medidiff.io.writers import write_derived_dicom, write_nifti, write_panel, write_png


def sha256_tree(paths) -> dict[str, str]:
    """Content hash per file, to prove inputs are never modified."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


SOURCES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm",
    "dicomdirtests/77654033/CR1/6154", "dicomdirtests/77654033/CT2",
]


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def _series(path: Path):
    inventory = discover(path)
    assert len(inventory.series) == 1, inventory.refused
    return inventory.series[0]


@pytest.mark.parametrize("name", SOURCES)
def test_roundtrip(pydicom_files_dir, tmp_path, name):
    src_path = pydicom_files_dir / name
    series = _series(src_path)
    before = sha256_tree(series.files)
    image = load_series(series)
    written = write_derived_dicom(image, series, tmp_path / "out", series_description="medidiff test",
                                  derivation_description="round trip", series_number=77)
    assert sha256_tree(series.files) == before
    assert len(written) == len(series.files) and not list(tmp_path.glob(".*partial*"))
    new_series = set()
    for out, src_file in zip(written, series.files, strict=True):
        src, got = pydicom.dcmread(src_file), pydicom.dcmread(out)
        tolerance = float(getattr(got, "RescaleSlope", 1)) / 2 + 1e-3
        np.testing.assert_allclose(apply_modality_lut(got.pixel_array, got),
                                   apply_modality_lut(src.pixel_array, src), atol=tolerance)
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing"):
            if keyword in src:
                np.testing.assert_allclose(np.asarray(got[keyword].value, float),
                                           np.asarray(src[keyword].value, float), atol=1e-4)
        assert got.SOPInstanceUID != src.SOPInstanceUID and got.SeriesInstanceUID != src.SeriesInstanceUID
        assert (got.StudyInstanceUID, got.PatientID) == (src.StudyInstanceUID, src.PatientID)
        assert got.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert got.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        assert got.ImageType[0] == "DERIVED" and got.SeriesDescription == "medidiff test"
        assert got.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert got.PhotometricInterpretation == src.PhotometricInterpretation
        new_series.add(got.SeriesInstanceUID)
        assert _dciodvfy_errors(out) == []
    assert len(new_series) == 1


def test_rescale_applied_once(pydicom_files_dir):
    src = pydicom.dcmread(pydicom_files_dir / "CT_small.dcm")
    assert float(src.RescaleIntercept) != 0
    image = load_series(_series(pydicom_files_dir / "CT_small.dcm"))
    np.testing.assert_array_equal(image[0].numpy().T, apply_modality_lut(src.pixel_array, src))
    assert image.meta["medidiff_inverted"] is False


def test_monochrome1_inverted_on_load_and_restored(pydicom_files_dir, tmp_path):
    path = pydicom_files_dir / "dicomdirtests/77654033/CR1/6154"
    src = pydicom.dcmread(path)
    assert src.PhotometricInterpretation == "MONOCHROME1"
    image = load_series(_series(path))
    assert image.meta["medidiff_inverted"] is True
    modality = apply_modality_lut(src.pixel_array, src)
    loaded = image[0].numpy().T
    assert np.corrcoef(loaded.ravel(), modality.ravel())[0, 1] < -0.999  # brighter = more attenuating
    out = write_derived_dicom(image, _series(path), tmp_path / "cr", series_description="x",
                              derivation_description="y")[0]
    got = pydicom.dcmread(out)
    assert got.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(got.pixel_array, src.pixel_array)


def test_changed_values_and_size_are_written(pydicom_files_dir, tmp_path):
    series = _series(pydicom_files_dir / "CT_small.dcm")
    image = load_series(series)
    import torch
    from monai.transforms import Resize

    bigger = Resize((64, 64))(image * 3.7 + 5000.25)
    src = pydicom.dcmread(series.files[0])
    got = pydicom.dcmread(write_derived_dicom(bigger, series, tmp_path / "o", series_description="s",
                                              derivation_description="d")[0])
    assert (got.Rows, got.Columns) == (64, 64)
    np.testing.assert_allclose([float(v) for v in got.PixelSpacing],
                               [float(v) * 2 for v in src.PixelSpacing], rtol=1e-4)
    expected = bigger[0].numpy().T
    np.testing.assert_allclose(apply_modality_lut(got.pixel_array, got), expected,
                               atol=float(got.RescaleSlope) / 2 + 1e-3)
    assert torch.isfinite(bigger).all() and _dciodvfy_errors(tmp_path / "o" / "IM00001.dcm") == []


def test_multiframe_loads_all_frames(tmp_path, pydicom_files_dir):
    src = pydicom.dcmread(pydicom_files_dir / "CT_small.dcm")
    frames = np.stack([src.pixel_array + i for i in range(3)])
    src.NumberOfFrames, src.PixelData = 3, frames.astype(src.pixel_array.dtype).tobytes()
    src.save_as(tmp_path / "mf.dcm")
    image = load_series(_series(tmp_path / "mf.dcm"))
    assert tuple(image.shape) == (1, 128, 128, 3)
    np.testing.assert_array_equal(image[0, :, :, 2].numpy().T, apply_modality_lut(frames[2], src))


def test_item_and_previews(pydicom_files_dir, tmp_path):
    item = load_item(_series(pydicom_files_dir / "dicomdirtests/77654033/CT2"))
    assert item["image"] is not item["original"] and item["image"].ndim == 4
    write_png(item["image"], tmp_path / "p.png")
    write_panel(item["original"], item["image"] * 0.5, tmp_path / "panel.png")
    write_nifti(item["image"], tmp_path / "i.nii.gz")
    import nibabel as nib

    nii = nib.load(tmp_path / "i.nii.gz")
    assert nii.shape == tuple(item["image"].shape[1:])
    np.testing.assert_allclose(nii.affine, item["image"].affine.numpy(), atol=1e-5)
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "panel.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.nii.gz", "p.png", "panel.png"]


def test_atomic_helpers(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        assert tmp.name.startswith(".a.txt.partial-")
        tmp.write_text("done")
    assert target.read_text() == "done"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_hash_identifier():
    assert hash_identifier("x", salt="s") == hash_identifier("x", salt="s") != hash_identifier("x", salt="t")
    assert len(hash_identifier("patient")) == 12


def _plane_centre(ds) -> np.ndarray:
    """World (LPS) position of the centre of a DICOM image plane."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return (np.asarray(ds.ImagePositionPatient, float) + iop[:3] * dc * (int(ds.Columns) - 1) / 2
            + iop[3:] * dr * (int(ds.Rows) - 1) / 2)


@pytest.mark.parametrize("max_size", [256, 32])
def test_resized_series_is_written_in_the_same_place(pydicom_files_dir, tmp_path, max_size):
    from medidiff.stages.basic import ResizeInPlane

    series = _series(pydicom_files_dir / "dicomdirtests/77654033/CT2")
    item = ResizeInPlane(max_size=max_size)(load_item(series))
    written = write_derived_dicom(item["image"], series, tmp_path / "o", series_description="s",
                                  derivation_description="d")
    assert len(written) == len(series.files)
    for out, src_file in zip(written, series.files, strict=True):
        src, got = pydicom.dcmread(src_file), pydicom.dcmread(out)
        scale = int(src.Columns) / int(got.Columns)
        assert max(int(got.Rows), int(got.Columns)) == max_size
        np.testing.assert_allclose([float(v) for v in got.PixelSpacing],
                                   [float(v) * scale for v in src.PixelSpacing], rtol=1e-3)
        np.testing.assert_allclose(_plane_centre(got), _plane_centre(src), atol=1e-3)
        np.testing.assert_allclose(np.asarray(got.ImageOrientationPatient, float),
                                   np.asarray(src.ImageOrientationPatient, float), atol=1e-6)
