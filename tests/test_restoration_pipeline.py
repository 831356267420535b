"""The denoise and super_resolution stages and their pipelines on real DICOM files (pydicom's CT and MR, the
sample DX), with tiny untrained models: HU and geometry kept by denoising, the finer grid of super-resolution
in the written DICOM (dciodvfy clean), refusals, and the evaluation task's metrics."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medidiff.errors import InputError, PipelineError, StageError
from medidiff.evaluation.datasets import EvaluationData, SyntheticSource, load_data
from medidiff.evaluation.evaluate import evaluate
from medidiff.executor import run_pipeline
from medidiff.io.discovery import discover
from medidiff.io.headers import header_geometry
from medidiff.io.loading import load_item
from medidiff.io.writers import write_derived_dicom
from medidiff.methods.restoration import Restoration
from medidiff.physics.degradations import kspace_consistency, kspace_truncation, upsample
from medidiff.pipeline import Pipeline
from medidiff.resources import pipeline_file
from medidiff.stages.basic import ResizeInPlane
from medidiff.stages.registry import ParameterError, get_stage

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DX = next((ROOT / "datasets" / "samples" / "chest-dx-sample").glob("cxr-*.dcm"))
HU = {"kind": "hu", "low": -1024.0, "high": 2048.0}
PERCENTILE = {"kind": "percentile", "low": 0.5, "high": 99.5}
TASKS = {"ct_denoise": (1, ["CT"], HU), "mr_sr4": (4, ["MR"], PERCENTILE), "xray_sr4": (4, ["CR", "DX"], PERCENTILE)}


def tiny_models(folder: Path, task: str) -> str:
    """A folder with a tiny untrained ResShift (4 steps) and an identity ``regression`` (zero output layer:
    the bicubic upsampling of the input, or the input itself) for ``task``."""
    scale, modalities, intensity = TASKS[task]
    base = {"task": task, "scale": scale, "modalities": modalities, "intensity": intensity,
            "model": {"unet": {"channels": [8, 8], "blocks": 1, "time_channels": 16}}}
    Restoration.create(base | {"method": "resshift", "steps": 4,
                               "process": {"name": "resshift", "num_train_timesteps": 4}}).save_pretrained(folder)
    identity = Restoration.create(base | {"method": "regression"})
    torch.nn.init.zeros_(identity.model_fn.net.conv_out.weight)
    torch.nn.init.zeros_(identity.model_fn.net.conv_out.bias)
    identity.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {task: tiny_models(root / task, task) for task in TASKS}


def series_of(path: Path, folder: Path, slices: int, *, step_mm: float = 5.0) -> Path:
    """``slices`` copies of a single-slice file as one series, ``step_mm`` apart along the plane normal."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for k in range(slices):
        ds = pydicom.dcmread(path)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ds.ImagePositionPatient = list(np.asarray(ds.ImagePositionPatient, float) + k * step_mm * np.cross(iop[:3], iop[3:]))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, k + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{k:02d}.dcm")
    return folder


def small_dx(folder: Path, shrink: int = 32) -> Path:
    """The sample DX (a valid DX For Presentation), shrunk ``shrink`` times by block means, uncompressed."""
    ds = pydicom.dcmread(SAMPLE_DX)
    pixels = ds.pixel_array.astype(float)
    rows, cols = (n // shrink for n in pixels.shape)
    small = pixels[:rows * shrink, :cols * shrink].reshape(rows, shrink, cols, shrink).mean(axis=(1, 3))
    ds.PixelData = np.rint(small).astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = rows, cols
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        if keyword in ds:
            setattr(ds, keyword, [float(v) * shrink for v in ds[keyword].value])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True)
    ds.save_as(folder / "dx.dcm", enforce_file_format=True)
    return folder


def with_model(name: str, stage_line: str, new_line: str, folder: Path) -> Pipeline:
    """The built-in pipeline ``name`` with its stage line replaced (a model folder, another method)."""
    text = pipeline_file(name).read_text(encoding="utf-8")
    assert stage_line in text
    path = folder / f"{name}.yaml"
    path.write_text(text.replace(stage_line, new_line), encoding="utf-8")
    return Pipeline.from_yaml(path)


def run_into(pipeline: Pipeline, source: Path, out: Path, skipped: str = "") -> list[tuple[Path, Path]]:
    """Run ``pipeline`` over ``source`` (one series, and one skipped for the reason ``skipped`` if given);
    (source file, derived file) pairs in slice order."""
    report = run_pipeline(pipeline, source, out, progress=False)
    states = sorted((r.state, r.message if r.state == "skipped" else "") for r in report.results)
    assert states == [("done", ""), *([("skipped", skipped)] if skipped else [])], states
    sources = sorted(source.glob("*.dcm"), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    derived = sorted(out.rglob("*.dcm"), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    assert len(derived) == len(sources) and (derived[0].parents[1] / "panel.png").is_file()
    return list(zip(sources, derived, strict=True))


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def hounsfield(ds) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def floats(value) -> np.ndarray:
    return np.asarray([float(v) for v in value])


def plane_centre(ds, frame: int = 0) -> np.ndarray:
    """World (LPS) position of the centre of a DICOM image plane (a frame's, for multi-frame images)."""
    iop, ipp, spacing = header_geometry(ds, frame)
    iop, (dr, dc) = floats(iop), floats(spacing)
    return floats(ipp) + iop[:3] * dc * (int(ds.Columns) - 1) / 2 + iop[3:] * dr * (int(ds.Rows) - 1) / 2


def test_ct_denoising_writes_a_derived_ct_series_on_the_same_grid_in_hounsfield_units(models, tmp_path):
    source = series_of(get_testdata_file("CT_small.dcm"), tmp_path / "in", 3)
    scout = series_of(get_testdata_file("CT_small.dcm"), source / "scout", 1)
    ds = pydicom.dcmread(scout / "00.dcm")
    ds.StudyInstanceUID, ds.ImageType = pydicom.dcmread(source / "00.dcm").StudyInstanceUID, ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout / "00.dcm")
    pipeline = with_model("ct-denoising", "denoise: {method: regression}",
                          f"denoise: {{method: regression, model: '{models['ct_denoise']}'}}", tmp_path)
    skipped = "image type ORIGINAL/PRIMARY/LOCALIZER is LOCALIZER, which this pipeline skips"
    for src_path, out_path in run_into(pipeline, source, tmp_path / "out", skipped):
        src, out = pydicom.dcmread(src_path), pydicom.dcmread(out_path)
        assert (out.Modality, out.SOPClassUID, list(out.ImageType[:2])) == ("CT", src.SOPClassUID, ["DERIVED", "SECONDARY"])
        assert out.StudyInstanceUID == src.StudyInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
        assert (out.Rows, out.Columns) == (src.Rows, src.Columns)
        for keyword in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"):
            np.testing.assert_allclose(floats(out[keyword].value), floats(src[keyword].value), atol=1e-4)
        np.testing.assert_allclose(hounsfield(out), hounsfield(src), atol=0.51)  # the identity model keeps HU
        assert dciodvfy_errors(out_path) == []


def test_diffusion_denoising_is_seeded_per_slice_and_keeps_the_item(models, tmp_path):
    item = load_item(discover(series_of(get_testdata_file("CT_small.dcm"), tmp_path / "in", 2)).series[0])
    original = item["original"].clone()
    stage = get_stage("denoise").factory(method="resshift", model=models["ct_denoise"], seed=7)
    first, again = stage(item)["image"], stage(item)["image"]
    assert first.shape == item["image"].shape and torch.isfinite(first).all()
    assert torch.equal(first, again) and torch.equal(item["original"], original)
    assert torch.allclose(first.affine, item["image"].affine)
    other = get_stage("denoise").factory(method="resshift", model=models["ct_denoise"], seed=8)(item)["image"]
    assert not torch.equal(first, other) and torch.equal(first[..., 1], other[..., 0])  # slice k: seed + k
    item["image"][:, :10, :10] = -3024.0  # padding outside the scanner's field of view: kept
    item["image"][:, 10:20, :10] = -1100.0  # noisy air: denoised
    out = stage(item)["image"]
    assert (out[:, :10, :10] == -3024.0).all() and (out[:, 10:20, :10] != -1100.0).all()


def test_mr_super_resolution_writes_the_finer_grid_over_the_same_field_of_view(models, tmp_path):
    source = series_of(get_testdata_file("MR_small.dcm"), tmp_path / "in", 2, step_mm=3.0)
    pipeline = with_model("mr-super-resolution", "super_resolution: {method: regression, scale: 4, data_consistency: true}",
                          f"super_resolution: {{method: regression, scale: 4, data_consistency: true, "
                          f"model: '{models['mr_sr4']}'}}", tmp_path)
    for src_path, out_path in run_into(pipeline, source, tmp_path / "out"):
        src, out = pydicom.dcmread(src_path), pydicom.dcmread(out_path)
        assert (out.Rows, out.Columns) == (4 * src.Rows, 4 * src.Columns)
        old, new = floats(src.PixelSpacing), floats(out.PixelSpacing)
        np.testing.assert_allclose(new, old / 4, rtol=1e-6)
        iop = floats(src.ImageOrientationPatient)
        # the first pixel centre of the finer grid: half a pixel-size change back along rows and columns
        expected = floats(src.ImagePositionPatient) - (old[1] - new[1]) / 2 * iop[:3] - (old[0] - new[0]) / 2 * iop[3:]
        np.testing.assert_allclose(floats(out.ImagePositionPatient), expected, atol=1e-4)
        np.testing.assert_allclose(floats(out.ImageOrientationPatient), iop, atol=1e-6)
        np.testing.assert_allclose(plane_centre(out), plane_centre(src), atol=1e-4)  # the same field of view
        # the identity regression is bicubic interpolation in the source's units, on that grid, with the
        # source's k-space band put back
        measured = torch.as_tensor(src.pixel_array, dtype=torch.float32)[None, None]
        expected = kspace_consistency(upsample(measured, 4), measured, 4)[0, 0].numpy()
        assert np.abs(out.pixel_array - expected).max() <= 1.0
        assert dciodvfy_errors(out_path) == []


def test_data_consistency_gives_back_the_measured_mr_slice_and_refuses_radiographs(models, tmp_path):
    mr = load_item(discover(get_testdata_file("MR_small.dcm")).series[0])
    measured = mr["image"][0].T.float()[None, None]  # (1, 1, rows, cols), the scanner's units
    for consistent in (False, True):
        stage = get_stage("super_resolution").factory(method="regression", model=models["mr_sr4"],
                                                      data_consistency=consistent)
        out = stage(mr)["image"][0].T.float()[None, None]
        assert out.shape[-2:] == (4 * measured.shape[-2], 4 * measured.shape[-1])
        error = (kspace_truncation(out, 4) - measured).abs().max() / measured.abs().max()
        # the identity regression is bicubic, whose k-space band is not the measured one; consistency puts it back
        assert error < 1e-4 if consistent else error > 1e-2
    dx = load_item(discover(small_dx(tmp_path / "dx")).series[0])
    with pytest.raises(StageError, match="data_consistency applies to MR slices .* not to a DX image"):
        get_stage("super_resolution").factory(model=models["xray_sr4"], data_consistency=True)(dx)


def test_an_enhanced_multiframe_image_on_a_finer_grid_keeps_every_frame_in_place(tmp_path):
    series = discover(get_testdata_file("eCT_Supplemental.dcm")).series[0]  # geometry in functional groups only
    item = ResizeInPlane(max_size=1024)(load_item(series))  # 512 -> 1024: the grid change super-resolution makes
    (path,) = write_derived_dicom(item["image"], series, tmp_path / "out", series_description="s",
                                  derivation_description="d")
    src, out = pydicom.dcmread(series.files[0]), pydicom.dcmread(path)
    for frame in range(int(src.NumberOfFrames)):
        (_, _, old), (_, _, new) = header_geometry(src, frame), header_geometry(out, frame)
        np.testing.assert_allclose(floats(new), floats(old) / 2, rtol=1e-5)
        np.testing.assert_allclose(plane_centre(out, frame), plane_centre(src, frame), atol=1e-3)


def test_radiograph_super_resolution_divides_the_imager_pixel_spacing(models, tmp_path):
    source = small_dx(tmp_path / "in")
    pipeline = with_model("radiograph-super-resolution", "super_resolution: {method: regression, scale: 4}",
                          f"super_resolution: {{method: resshift, scale: 4, tile: 128, model: '{models['xray_sr4']}'}}",
                          tmp_path)  # 256 px out: overlapping tiles
    ((src_path, out_path),) = run_into(pipeline, source, tmp_path / "out")
    src, out = pydicom.dcmread(src_path), pydicom.dcmread(out_path)
    assert (out.Modality, out.Rows, out.Columns) == ("DX", 4 * src.Rows, 4 * src.Columns)
    np.testing.assert_allclose(floats(out.ImagerPixelSpacing), floats(src.ImagerPixelSpacing) / 4, rtol=1e-6)
    assert dciodvfy_errors(out_path) == []


def test_wrong_input_and_parameters_are_refused_with_the_fix(models, tmp_path):
    ct = load_item(discover(get_testdata_file("CT_small.dcm")).series[0])
    mr = load_item(discover(get_testdata_file("MR_small.dcm")).series[0])
    with pytest.raises(StageError, match="modality is CT; expected MR, CR, DX .*denoise stage"):
        get_stage("super_resolution").factory(model=models["mr_sr4"])(ct)
    with pytest.raises(StageError, match="modality is MR; expected CT"):
        get_stage("denoise").factory(model=models["ct_denoise"])(mr)
    scout = dict(ct, source=replace(ct["source"], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    with pytest.raises(StageError, match="a CT localizer"):
        get_stage("denoise").factory(model=models["ct_denoise"])(scout)
    with pytest.raises(StageError, match="is for mr_sr4 .* not MR at 2x; give a model folder"):
        get_stage("super_resolution").factory(scale=2, model=models["mr_sr4"])(mr)
    with pytest.raises(StageError, match="steps: 2 does not fit the resshift model .* remove steps"):
        get_stage("denoise").factory(steps=2, model=models["ct_denoise"])(ct)
    stack = load_item(discover(small_dx(tmp_path / "dx")).series[0])
    stack["image"] = stack["image"][..., None].repeat(1, 1, 1, 2)
    with pytest.raises(StageError, match="holds 2 images; expected one 2-D radiograph"):
        get_stage("super_resolution").factory(model=models["xray_sr4"])(stack)
    huge = dict(mr, image=mr["image"].repeat(1, 40, 1))  # 2560 columns: 10240 at 4x
    with pytest.raises(StageError, match=r"expected 16..2048 px per side at 4x \(shrink larger"):
        get_stage("super_resolution").factory(model=models["mr_sr4"])(huge)
    tall = dict(mr, image=mr["image"][..., None].expand(1, 64, 64, 5000))  # 5000 slices: 328 M voxels at 4x
    with pytest.raises(StageError, match="would become 328 M voxels at 4x; at most 268 M"):
        get_stage("super_resolution").factory(model=models["mr_sr4"])(tall)
    bad = dict(ct, image=ct["image"].clone())
    bad["image"][0, 5, 5] = float("nan")
    with pytest.raises(StageError, match="NaN"):
        get_stage("denoise").factory(model=models["ct_denoise"])(bad)
    (tmp_path / "upsr").mkdir()
    (tmp_path / "upsr" / "upsr.json").write_text("{}")  # without its estimator, regression.json
    for stage, params, key in [("denoise", {"method": "magic"}, "method"), ("denoise", {"steps": 0}, "steps"),
                               ("denoise", {"method": "regression", "steps": 4}, "steps"),
                               ("super_resolution", {"scale": 3}, "scale"), ("denoise", {"tile": 8}, "tile"),
                               ("super_resolution", {"data_consistency": "yes"}, "data_consistency"),
                               ("denoise", {"model": str(tmp_path)}, "model"),  # a folder without resshift.json
                               ("denoise", {"method": "one_step", "model": models["ct_denoise"]}, "model"),
                               ("denoise", {"method": "upsr", "model": str(tmp_path / "upsr")}, "model")]:
        with pytest.raises(ParameterError) as refused:
            get_stage(stage).factory(**params)
        assert refused.value.key == key
    assert get_stage("denoise").factory(method="resshift15").method == "resshift15"  # a shipped variant
    with pytest.raises(PipelineError, match="line 3: stage 'denoise': method is 'magic'"):
        Pipeline.from_text("name: x\nstages:\n  - denoise: {method: magic}\n")


def _cases(pairs: list[tuple[torch.Tensor, torch.Tensor]], modality: str) -> EvaluationData:
    """Evaluation cases (degraded input, clean reference), (rows, cols) each, as the data specs give them."""

    def cases():
        for seed, (degraded, clean) in enumerate(pairs):
            source = SyntheticSource(seed, rows=degraded.shape[0], columns=degraded.shape[1], modality=modality,
                                     body_part="", view_position="")
            image = MetaTensor(degraded.T.contiguous()[None])
            yield {"image": image, "original": image.clone(), "reference": MetaTensor(clean.T.contiguous()[None]),
                   "source": source}

    return EvaluationData(f"test-{modality}", "medidiff://test", "0", len(pairs), cases)


def test_evaluate_scores_psnr_and_ssim_against_the_input_and_bicubic_baselines(models, tmp_path):
    ct = torch.as_tensor(pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array, dtype=torch.float32) - 1024
    noise = torch.randn(3, *ct.shape, generator=torch.Generator().manual_seed(0)) * 40.0
    denoise = with_model("ct-denoising", "denoise: {method: regression}",
                         f"denoise: {{method: regression, model: '{models['ct_denoise']}'}}", tmp_path)
    result = evaluate(denoise, _cases([(ct + n, ct) for n in noise], "CT"), baseline="default", track=False)
    assert result.baseline == "identity" and set(result.metrics) == {"psnr", "ssim", "mse"}
    for row in result.cases:  # the identity model scores exactly as the noisy input
        assert 20 < row["psnr"] < 60 and row["psnr"] == pytest.approx(row["baseline_psnr"], abs=1e-3)
    for consistent in ("false", "true"):
        sr = with_model("mr-super-resolution", "super_resolution: {method: regression, scale: 4, data_consistency: true}",
                        f"super_resolution: {{method: regression, scale: 4, data_consistency: {consistent}, "
                        f"model: '{models['mr_sr4']}'}}", tmp_path)
        result = evaluate(sr, "mr-sr4:test:1", baseline="default", track=False)  # the held-out shoulder MR, 128 -> 512
        (row,) = result.cases
        assert result.baseline == "bicubic"
        if consistent == "false":  # the identity model is bicubic
            assert row["ssim"] == pytest.approx(row["baseline_ssim"], abs=1e-4)
        else:  # the measured k-space band put back improves on bicubic
            assert row["psnr"] > row["baseline_psnr"] + 0.1
    with pytest.raises(InputError, match="N must be 1..2"):
        load_data("mr-sr4:test:3")
    with pytest.raises(InputError, match="keep their sizes"):
        load_data("mr-sr4:test:1:256")


def test_evaluation_identifies_the_shipped_models_a_pipeline_uses(models, tmp_path, monkeypatch):
    import medidiff.model_registry as registry
    from medidiff.evaluation.evaluate import model_provenance

    shipped = tmp_path / "models"
    shutil.copytree(models["ct_denoise"], shipped / "restoration" / "ct_denoise")
    monkeypatch.setattr(registry, "model_dir", lambda name: shipped / name)
    params = model_provenance(Pipeline.from_yaml("ct-denoising")).params
    assert params["stage.0.denoise.model.spec"] == "default" and "stage.0.denoise.model.folder_sha256" in params
    assert {k for k in params if k.endswith(".sha256")} == {"stage.0.denoise.model.resshift.json.sha256",
        "stage.0.denoise.model.resshift.safetensors.sha256", "stage.0.denoise.model.regression.json.sha256",
        "stage.0.denoise.model.regression.safetensors.sha256"}
