"""NIfTI/NRRD/MetaImage volumes as pipeline sources, and geometry-keeping resampling (SimpleITK)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from pydicom.data import get_testdata_file

from medidiff.executor import run_pipeline
from medidiff.io.discovery import discover
from medidiff.io.loading import load_series
from medidiff.io.volumes import LPS_TO_RAS, resample
from medidiff.pipeline import Pipeline
from medidiff.stages.basic import ResizeInPlane
from tests.cli_runner import medidiff


def _rotated_affine() -> np.ndarray:
    """A rotated (30 degrees about (1, 1, 1)), anisotropic, offset RAS affine: voxel index (i, j, k) -> mm."""
    axis, angle = np.ones(3) / np.sqrt(3), np.pi / 6
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation * [0.9, 0.8, 2.5], [12.5, -40.0, 7.0]
    return affine


AFFINE = _rotated_affine()
# Sheared, as a tilted-gantry CT series is: the slice step is not along the plane normal.
SHEARED = np.array([[0.0, -0.8, 0.3, 12.5], [0.9, 0.0, 0.0, -40.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])


def world(affine, index) -> np.ndarray:
    index = np.r_[index, np.zeros(3 - len(index))]  # a 2-D image lies in its k = 0 plane
    return (np.asarray(affine, float) @ np.r_[index, 1.0])[:3]


def extent_points(affine, shape) -> list[np.ndarray]:
    """World coordinates of the image's centre and its outer corners (voxel edges, not centres)."""
    shape = np.asarray(shape, float)
    corners = [np.where(np.array(bits), shape - 0.5, -0.5) for bits in np.ndindex(*(2,) * len(shape))]
    return [world(affine, (shape - 1) / 2)] + [world(affine, c) for c in corners]


def directions(affine) -> np.ndarray:
    a = np.asarray(affine, float)[:3, :3]
    return a / np.linalg.norm(a, axis=0)


def volume_array(shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(100, 30, shape) + np.arange(shape[0])[:, None, None]).astype(np.float32)


def write_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """NIfTI by nibabel; NRRD and MetaImage by SimpleITK (LPS), both from the same RAS affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(array, affine), str(path))
        return path
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def sha256s(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("factor", [2.0, 0.5])
@pytest.mark.parametrize("affine", [AFFINE, SHEARED], ids=["rotated", "sheared"])
def test_resample_keeps_the_world_extent_and_direction(factor, affine):
    shape = (20, 30, 5)
    image = MetaTensor(torch.rand(1, *shape), meta={"affine": torch.as_tensor(affine)})
    size = (round(shape[0] * factor), round(shape[1] * factor), shape[2])
    out = resample(image, size=size)
    assert tuple(out.shape) == (1, *size)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.affine)[:3, :3], axis=0),
                               spacing * [1 / factor, 1 / factor, 1], rtol=1e-6)
    np.testing.assert_allclose(out.meta["spacing"], spacing * [1 / factor, 1 / factor, 1], rtol=1e-6)
    np.testing.assert_allclose(directions(out.affine), directions(affine), atol=1e-9)
    for before, after in zip(extent_points(affine, shape), extent_points(out.affine, size), strict=True):
        np.testing.assert_allclose(after, before, atol=1e-6)


def test_resample_by_spacing_of_a_2d_image_and_values_follow_the_grid():
    # a ramp along x: linear interpolation of a linear function is exact inside the image
    ramp = torch.arange(64, dtype=torch.float32)[:, None].repeat(1, 48)[None]
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    out = resample(MetaTensor(ramp, meta={"affine": torch.as_tensor(affine)}), spacing=(0.25, 0.25))
    assert tuple(out.shape) == (1, 128, 96)
    np.testing.assert_allclose(np.asarray(out.affine)[:3, 3], [-0.125, -0.125, 0.0])
    # new voxel i sits at old index (i - 0.5) / 2
    inner = out[0, 1:-1, 10].numpy()
    np.testing.assert_allclose(inner, (np.arange(1, 127) - 0.5) / 2, atol=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        resample(MetaTensor(ramp), spacing=(1, 1), size=(2, 2))


def test_resize_stage_keeps_a_ct_slice_in_place(pydicom_files_dir):
    series = discover(pydicom_files_dir / "CT_small.dcm").series[0]
    image = load_series(series)
    item = ResizeInPlane(max_size=32)({"image": image, "original": image.clone(), "source": series})
    out = item["image"]
    assert tuple(out.shape) == (1, 32, 32)
    for before, after in zip(extent_points(image.affine, image.shape[1:]), extent_points(out.affine, (32, 32)),
                             strict=True):
        np.testing.assert_allclose(after, before, atol=1e-4)
    assert item["original"].shape == image.shape


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nrrd", "scan.mha"])
def test_normalize_preview_on_a_volume_writes_nifti_in_the_same_place(tmp_path, name):
    source = write_volume(tmp_path / "in" / name, volume_array((256, 192, 3)), AFFINE)
    before = sha256s(tmp_path / "in")
    report = run_pipeline(Pipeline.from_yaml("normalize-preview"), source, tmp_path / "out", progress=False)
    assert report.ok and report.refused == [], report.summary()
    (result,) = report.results
    assert result.state == "done" and result.modality == "OT" and result.size == "192x256x3"
    assert "no DICOM header" in result.message and "image.nii.gz instead" in result.message
    names = {Path(f).name for f in result.outputs}
    assert {"image.nii.gz", "preview.png", "panel.png"} <= names and not any(n.endswith(".dcm") for n in names)
    written = nib.load(str(tmp_path / "out" / next(f for f in result.outputs if f.endswith("image.nii.gz"))))
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
    data = written.get_fdata()
    assert data.shape == (256, 192, 3) and 0 <= data.min() < data.max() <= 1
    assert "no DICOM header" in (tmp_path / "out" / "report.txt").read_text()
    assert sha256s(tmp_path / "in") == before


def test_loaded_volume_matches_the_file_voxel_for_voxel(tmp_path):
    array = volume_array((40, 30, 6))
    series = discover(write_volume(tmp_path / "v.nrrd", array, AFFINE)).series[0]
    image = load_series(series)
    assert series.source_format == "NRRD" and not series.is_dicom and (series.rows, series.columns) == (30, 40)
    np.testing.assert_allclose(image[0].numpy(), array, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(image.affine), AFFINE, atol=1e-5)
    assert image.meta["space"] == "RAS" and image.meta["filename_or_obj"] == series.file_id(series.files[0])


def test_mixed_folder_sidecar_modality_and_inspect(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    write_volume(folder / "brain.nii.gz", volume_array((40, 40, 4)), AFFINE)
    (folder / "brain.json").write_text(json.dumps({"Modality": "MR", "BodyPartExamined": "BRAIN"}))
    write_volume(folder / "sub" / "plain.mha", volume_array((40, 40, 1)), AFFINE)
    inventory = discover(folder)
    assert inventory.refused == []  # the sidecar is read with its volume, not scanned as DICOM
    found = {s.source_format: s for s in inventory.series}
    assert set(found) == {"DICOM", "NIfTI", "MetaImage"}
    assert (found["NIfTI"].modality, found["NIfTI"].body_part) == ("MR", "BRAIN")
    assert found["MetaImage"].modality == "OT" and found["MetaImage"].frames == 1
    mr_only = Pipeline.from_text("name: mr\nselect: {modality: [MR]}\nstages: [normalize_intensity]\n"
                                 "outputs: {nifti: {}}\n")
    report = run_pipeline(mr_only, folder, tmp_path / "out", progress=False)
    states = sorted((r.modality, r.state) for r in report.results)
    assert states == [("CT", "skipped"), ("MR", "done"), ("OT", "skipped")], report.summary()
    shown = medidiff("inspect", folder)
    assert shown.returncode == 0 and "NIfTI" in shown.stdout and "MetaImage" in shown.stdout, shown.stderr
    assert "3 series; 0 file(s) could not be used" in shown.stdout


def test_bad_volumes_are_refused_by_hash_with_one_line_reasons(tmp_path):
    folder = tmp_path / "in"
    good = write_volume(folder / "good.nii.gz", volume_array((64, 64, 3)), AFFINE)
    data = gzip.compress(gzip.decompress(good.read_bytes()))
    (folder / "patient-name-truncated.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), AFFINE), str(folder / "timeseries.nii.gz"))
    (folder / "broken.nii.gz").write_bytes(gzip.compress(b"not an image at all"))
    before = sha256s(folder)
    report = run_pipeline(Pipeline.from_yaml("normalize-preview"), folder, tmp_path / "out", progress=False)
    assert [r.state for r in report.results] == ["done"]
    local = (tmp_path / "out" / ".medidiff" / "refused-local.log").read_text().splitlines()
    reasons = {line.split(" (file ")[0]: line for line in local}
    assert "truncated or corrupt NIfTI file" in reasons["patient-name-truncated.nii.gz"]
    assert "4-D volume" in reasons["timeseries.nii.gz"]
    assert "not a readable NIfTI file" in reasons["broken.nii.gz"]
    shared = (tmp_path / "out" / "report.txt").read_text() + (tmp_path / "out" / "report.json").read_text()
    assert "patient-name" not in shared and len(report.refused) == 3
    for refusal in report.refused:
        assert sum(f"(file {refusal['file']})" in line for line in local) == 1
        assert f"unreadable file {refusal['file']}: {refusal['reason']}" in shared
        assert "\n" not in refusal["reason"] and str(tmp_path) not in refusal["reason"]
    assert sha256s(folder) == before


def test_volume_keys_follow_path_and_content(tmp_path):
    source = write_volume(tmp_path / "a" / "v.nii.gz", volume_array((64, 48, 2)), AFFINE)
    pipeline = Pipeline.from_text("name: n\nstages: [normalize_intensity]\noutputs: {nifti: {}}\n")
    first = run_pipeline(pipeline, tmp_path / "a", tmp_path / "out", progress=False).results[0]
    again = run_pipeline(pipeline, tmp_path / "a", tmp_path / "out", progress=False).results[0]
    assert (first.state, again.state, again.series) == ("done", "already done", first.series)
    write_volume(tmp_path / "b" / "v.nii.gz", volume_array((64, 48, 2)) * 2, AFFINE)  # same name, other input
    other = run_pipeline(pipeline, tmp_path / "b", tmp_path / "out", progress=False).results[0]
    assert other.state == "done" and other.series != first.series
    write_volume(source, volume_array((64, 48, 2)) + 1, AFFINE)  # edited in place: a new series
    changed = run_pipeline(pipeline, tmp_path / "a", tmp_path / "out", progress=False).results[0]
    assert changed.state == "done" and changed.series not in (first.series, other.series)
    outputs = {f for r in (first, other, changed) for f in r.outputs}
    assert len(outputs) == 3 and all((tmp_path / "out" / f).is_file() for f in outputs)
