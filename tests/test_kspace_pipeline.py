"""Raw k-space in, DICOM MR series out: discovery and loading of k-space files, the cs_reconstruction stage
on measured multi-coil k-space, and `medidiff run` on the bundled sample (dciodvfy, geometry, inputs kept)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from medidiff.errors import StageError
from medidiff.io.discovery import discover
from medidiff.io.kspace import KSpace, read_kspace, write_fastmri_h5
from medidiff.io.loading import load_item
from medidiff.methods.classical_cs import zero_filled
from medidiff.physics.measurements import birdcage_sensitivities, cartesian_mask, fft2c, ifft2c, rss
from medidiff.pipeline import Selection
from medidiff.stages import cs_reconstruction as stage_module
from medidiff.stages.cs_reconstruction import CSReconstructionStage, crop_image, pad_kspace

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "samples" / "kspace"
PIPELINE = ROOT / "pipelines" / "cs-reconstruction-kspace.yaml"


@lru_cache(maxsize=1)
def sample_script():
    spec = importlib.util.spec_from_file_location("make_kspace_sample", ROOT / "datasets" / "make_kspace_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def truth(h: int, w: int) -> torch.Tensor:
    """A held-out real MR image (never trained on), cropped to (h, w) in [0, 1]."""
    from medidiff.datasets.cs_images import held_out_images

    image = next(img for name, img in held_out_images(max(h, w)) if name.startswith("shoulder MR"))[0, 0]
    return image[:h, :w]


def measured(image: torch.Tensor, coils: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """4x undersampled multi-coil k-space (1, coils, H, W) of ``image`` with a smooth object phase, and its mask."""
    h, w = image.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    coil_images = birdcage_sensitivities((h, w), coils) * (image * torch.exp(1j * (0.8 * x + 0.5 * y**2)))
    mask = cartesian_mask((h, w), 4, seed=seed)
    return (fft2c(coil_images) * mask)[None].to(torch.complex64), mask


def item_of(kspace: torch.Tensor, mask: torch.Tensor | None) -> dict:
    zero_filled = rss(ifft2c(kspace))[0, 0]  # (H, W)
    image = MetaTensor(zero_filled.T[None].contiguous())  # (1, cols, rows)
    return {"image": image, "original": image.clone(), "kspace": KSpace(kspace, mask, Path("x.h5"))}


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def test_h5_and_npy_are_series_and_a_corrupt_file_is_refused_with_a_reason(tmp_path):
    kspace, mask = measured(truth(64, 48))
    write_fastmri_h5(tmp_path / "in" / "a.h5", kspace, mask[0], field_of_view_mm=(192.0, 144.0, 5.0))
    np.save(tmp_path / "in" / "b.npy", np.concatenate([kspace[:, 0].numpy()] * 3))  # 3 single-coil slices
    (tmp_path / "in" / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    np.save(tmp_path / "in" / "magnitude.npy", np.ones((1, 8, 8), np.float32))
    inventory = discover(tmp_path / "in")
    series = {s.files[0].name: s for s in inventory.series}
    assert set(series) == {"a.h5", "b.npy"}
    assert all(s.source_format == "k-space" and s.modality == "MR" and not s.is_dicom for s in series.values())
    assert (series["a.h5"].rows, series["a.h5"].columns, series["a.h5"].frames) == (64, 48, 1)
    assert (series["b.npy"].frames, series["b.npy"].series_description) == (3, "k-space, 1 coil, no sampling mask")
    refused = {r.path: r.reason for r in inventory.refused}
    assert set(refused) == {"broken.h5", "magnitude.npy"}
    assert "HDF5" in refused["broken.h5"] and "must be complex" in refused["magnitude.npy"]
    assert not any(str(tmp_path) in reason for reason in refused.values())  # reports never carry paths
    (alone,) = discover(tmp_path / "in" / "a.h5").series  # a file given alone
    assert alone.key == series["a.h5"].key


def test_loading_gives_the_zero_filled_image_in_the_pipeline_layout_with_the_field_of_view(tmp_path):
    kspace, mask = measured(truth(64, 48))
    kspace = torch.cat([kspace, 2 * kspace])  # two slices
    write_fastmri_h5(tmp_path / "a.h5", kspace, mask[0], field_of_view_mm=(192.0, 144.0, 5.0))
    item = load_item(discover(tmp_path / "a.h5").series[0])
    assert torch.equal(item["kspace"].kspace, kspace)
    image = item["image"]
    assert image.shape == (1, 48, 64, 2)  # (1, cols, rows, slices)
    expected = rss(ifft2c(kspace))[:, 0].permute(2, 1, 0)
    assert torch.allclose(image[0], expected, atol=1e-6)
    assert np.allclose(image.meta["spacing"], [3.0, 3.0, 5.0])  # 144 / 48, 192 / 64, slice
    affine = np.asarray(image.meta["affine"])
    centre = affine @ np.array([47 / 2, 63 / 2, 1 / 2, 1.0])
    assert np.allclose(centre[:3], 0, atol=1e-6)  # centred on the origin


def test_measured_multicoil_kspace_reconstructs_closer_to_the_truth_than_zero_filled():
    image = truth(128, 112)
    kspace, mask = measured(image)
    item = item_of(kspace, mask)
    zero = item["image"][0].T
    out = CSReconstructionStage(method="fista_tv")(item)
    recon = out["image"][0].T
    assert out["image"].shape == item["image"].shape and (recon >= 0).all()
    assert rmse(recon, image) < 0.6 * rmse(zero, image), (rmse(recon, image), rmse(zero, image))
    # without a mask in the file, the mask is the columns that hold data: the same operator
    given, inferred = (CSReconstructionStage(method="zero_filled")(item_of(kspace, m))["image"] for m in (mask, None))
    assert torch.equal(given, inferred)
    assert torch.equal(item["original"], out["original"])


def test_sides_the_unet_cannot_take_are_zero_padded_in_kspace_and_cropped_back(monkeypatch):
    image = truth(120, 100)
    k = fft2c(image.to(torch.complex64))
    padded = pad_kspace(k, (128, 128))
    assert padded.shape == (128, 128) and torch.allclose(padded[4:124, 14:114] * (120 * 100 / 128**2) ** 0.5, k)
    assert not padded[:4].any() and not padded[:, 114:].any()
    assert torch.allclose(crop_image(ifft2c(padded).real, (120, 100)), image, atol=1e-5)  # exact inverse
    shapes = []

    def solve(y, op, method, **_):  # a model that needs multiples of 32: the zero-filled solver on its grid
        shapes.append(op.image_shape)
        return zero_filled(op, y)

    monkeypatch.setattr(stage_module, "load_models", lambda model: SimpleNamespace(
        denoiser=SimpleNamespace(multiple=32), reconstruct=solve))
    kspace, mask = measured(image)
    item = item_of(kspace, mask)
    on_finer_grid = CSReconstructionStage(method="ddnm")(item)["image"][0].T
    on_file_grid = CSReconstructionStage(method="zero_filled")(item)["image"][0].T
    assert shapes == [(128, 128)] and on_finer_grid.shape == (120, 100)
    assert rmse(on_finer_grid, on_file_grid) < 0.02 * rmse(on_file_grid, image)  # the same image, interpolated back


def test_bad_measured_kspace_gets_a_clear_stage_error():
    kspace, mask = measured(truth(64, 64))
    stage = CSReconstructionStage(method="zero_filled")
    wrong = mask.clone()
    wrong[:, int((~mask[0]).nonzero()[0])] = True  # a column the data never sampled
    with pytest.raises(StageError, match="mask does not match its k-space: 1 sampled column"):
        stage(item_of(kspace, wrong))
    no_centre = mask.clone()
    no_centre[:, 32] = False
    with pytest.raises(StageError, match="centre of k-space has 0 fully sampled"):
        stage(item_of(kspace * no_centre, no_centre))
    with pytest.raises(StageError, match="measurement: block_cs does not apply"):
        CSReconstructionStage(method="zero_filled", measurement="block_cs")(item_of(kspace, mask))
    resized = item_of(kspace, mask)
    resized["image"] = resized["image"][:, :32]
    with pytest.raises(StageError, match="no longer matches its k-space"):
        stage(resized)
    nan = item_of(kspace, mask)
    nan["kspace"].kspace[0, 0, 0, 32] = float("nan")
    with pytest.raises(StageError, match="NaN"):
        stage(nan)


def test_pipeline_selects_kspace_sources_only():
    dicom = SimpleNamespace(modality="MR", body_part="", view_position="", image_type=(), rows=64, columns=64,
                            is_3d=False, source_format="DICOM")
    selection = Selection(source_format=("K-SPACE",), min_size=32)
    assert selection.reason_to_skip(dicom) == "source format DICOM is not one this pipeline accepts (K-SPACE)"
    assert selection.reason_to_skip(SimpleNamespace(**{**vars(dicom), "source_format": "k-space"})) is None


def test_bundled_sample_is_reproducible_small_and_4x_undersampled(tmp_path):
    (shipped,) = SAMPLE.glob("*.h5")
    assert shipped.stat().st_size < 1_000_000
    data = read_kspace(shipped)
    remade = read_kspace(sample_script().main(tmp_path / "remade.h5"))
    assert torch.equal(data.kspace, remade.kspace) and torch.equal(data.mask, remade.mask)
    assert data.kspace.shape == (1, 4, 128, 128) and data.field_of_view_mm == (200.0, 200.0, 6.0)
    assert data.mask[0].sum() == 128 // 4


def run(pipeline: Path, source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medidiff.cli", "run", str(pipeline), str(source), "-o", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


METHODS = ["fista_tv", pytest.param("idm", marks=pytest.mark.skipif(
    not (ROOT / "models" / "cs_reconstruction" / "idm_mri.json").exists(), reason="IDM weights not shipped yet"))]


@pytest.mark.parametrize("method", METHODS)
def test_medidiff_run_writes_a_valid_dicom_mr_series_from_the_sample(tmp_path, method):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(SAMPLE / "shoulder-mr-4coil-4x.h5", source)
    kspace, _ = measured(truth(64, 48))
    np.save(source / "no-fov.npy", kspace.numpy())
    (source / "truncated.h5").write_bytes((SAMPLE / "shoulder-mr-4coil-4x.h5").read_bytes()[:4000])
    before = digests(source)
    pipeline = tmp_path / "kspace.yaml"
    pipeline.write_text(PIPELINE.read_text().replace("method: idm", f"method: {method}"))
    result = run(pipeline, source, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr  # a refused file never stops the batch
    assert digests(source) == before  # inputs never modified
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["state"] for r in report["results"]] == ["done", "done"], report
    assert len(report["refused"]) == 1 and "truncated or damaged" in report["refused"][0]["reason"]
    assert any("1 mm pixels" in r["message"] for r in report["results"])
    files = {p.parents[1].name: p for p in (tmp_path / "out").rglob("*.dcm")}
    sample_key = discover(SAMPLE).series[0].key
    ds = pydicom.dcmread(files[sample_key])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"] and ds.PatientName == ""
    assert (ds.Rows, ds.Columns) == (128, 128) and [float(v) for v in ds.PixelSpacing] == [1.5625, 1.5625]
    assert float(ds.SliceThickness) == 6.0 and "SourceImageSequence" not in ds
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(files[sample_key])], capture_output=True, text=True)
        assert "Error" not in check.stdout + check.stderr, check.stdout + check.stderr
    truth_image = sample_script().sample_kspace()[2].numpy()
    pixels = ds.pixel_array.astype(float)
    assert np.corrcoef(pixels.ravel(), truth_image.ravel())[0, 1] > 0.9  # rows down, columns across
    other = pydicom.dcmread(next(p for k, p in files.items() if k != sample_key))
    assert (other.Rows, other.Columns) == (64, 48) and [float(v) for v in other.PixelSpacing] == [1.0, 1.0]
