"""The shipped CS reconstruction models on held-out images; the research stage; the evaluation data spec."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from medidiff.datasets.cs_images import held_out_images
from medidiff.errors import InputError, StageError
from medidiff.evaluation.cs_held_out import evaluate as evaluate_held_out
from medidiff.evaluation.cs_held_out import main as cs_held_out_main
from medidiff.evaluation.cs_held_out import markdown, merge_rows
from medidiff.evaluation.datasets import load_data
from medidiff.methods.cs_reconstruction import CSReconstruction, make_operator
from medidiff.metrics import psnr
from medidiff.resources import model_dir
from medidiff.stages.registry import ParameterError, get_stage


@pytest.fixture(scope="module")
def models():
    return CSReconstruction(model_dir("cs_reconstruction"))


@pytest.mark.parametrize("setting", [{"kind": "block_cs", "ratio": 0.1},
                                     {"kind": "cartesian_mri", "acceleration": 4, "mask": "equispaced"}])
def test_shipped_idm_beats_zero_filled_on_a_held_out_mr_and_is_consistent(models, setting):
    _, x = held_out_images(128)[0]  # the real shoulder MR, never trained on
    seed = 0 if setting["kind"] == "block_cs" else 3  # block CS: the fixed matrix the model was trained with
    op = make_operator(setting["kind"], (128, 128), seed=seed, **{k: v for k, v in setting.items() if k != "kind"})
    y = op(x)
    idm = models.reconstruct(y, op, "idm")
    assert psnr(idm.clamp(0, 1), x) > psnr(models.reconstruct(y, op, "zero_filled").clamp(0, 1), x) + 3.0
    if setting["kind"] == "block_cs":  # the exact projection: the output reproduces the measurements
        assert torch.allclose(op(idm), y, atol=1e-4)


def test_unknown_method_and_kind_are_user_errors(models):
    op = make_operator("block_cs", (32, 32))
    with pytest.raises(InputError, match="idm, ddnm"):
        models.reconstruct(op(torch.rand(1, 1, 32, 32)), op, "magic")
    with pytest.raises(InputError, match="block_cs, cartesian_mri"):
        make_operator("radial", (32, 32))


def test_held_out_table_has_every_setting_and_method():
    rows = evaluate_held_out(model_dir("cs_reconstruction"), 64, ddnm_steps=2, jobs=2,
                             settings={"block CS 30 %": {"kind": "block_cs", "ratio": 0.3},
                                       "MRI 8x random": {"kind": "cartesian_mri", "acceleration": 8, "mask": "random"}})
    assert {(r["setting"], r["method"]) for r in rows} == {
        (s, m) for s in ("block CS 30 %", "MRI 8x random") for m in ("idm", "ddnm", "fista_tv", "zero_filled")}
    assert all(len(r["per_image_psnr"]) == 6 and r["seconds"] >= 0 for r in rows)
    table = markdown(rows, 64, 2, ["a", "b"])
    assert table.count("**") == 4 and "DDNM (2 steps)" in table  # one best PSNR per setting


def test_re_measured_rows_replace_only_their_own_cells_in_table_order():
    def row(setting, method, value):
        return {"setting": setting, "method": method, "psnr": value}

    old = [row("block CS 1 %", m, 1.0) for m in ("idm", "ddnm")] + [row("MRI 4x random", "idm", 1.0)]
    merged = merge_rows(old, [row("MRI 4x random", "idm", 2.0), row("block CS 1 %", "idm", 2.0)])
    assert [(r["setting"], r["method"], r["psnr"]) for r in merged] == [
        ("block CS 1 %", "idm", 2.0), ("block CS 1 %", "ddnm", 1.0), ("MRI 4x random", "idm", 2.0)]


def test_unknown_measurement_kind_is_refused_before_any_table_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cs_held_out_main(["--models", str(tmp_path), "--kinds", "block_cs,radial"])
    assert "unknown radial" in capsys.readouterr().err and not list(tmp_path.iterdir())


def build_stage(name: str, params: dict):
    return get_stage(name).factory(**params)


def _slice_item(image: torch.Tensor, modality: str = "MR") -> dict:
    from types import SimpleNamespace

    t = MetaTensor(image[0, 0].T.contiguous()[None] * 1000.0)  # MONAI layout, modality units
    return {"image": t, "original": t.clone(), "source": SimpleNamespace(modality=modality)}


def test_research_stage_reconstructs_in_modality_units_and_keeps_the_zero_filled_layer():
    _, x = held_out_images(96)[1]
    stage = build_stage("cs_reconstruction", {"method": "idm", "measurement": "cartesian_mri", "acceleration": 4})
    item = _slice_item(x)
    out = stage(item)
    assert out["image"].shape == item["image"].shape and torch.equal(out["original"], item["original"])
    truth = item["image"] / 1000.0
    assert psnr(out["image"][None] / 1000.0, truth[None]) > psnr(out["zero_filled"][None] / 1000.0, truth[None])


def test_research_stage_refuses_radiographs_nans_and_bad_parameters():
    stage = build_stage("cs_reconstruction", {"method": "zero_filled"})
    with pytest.raises(StageError, match="modality is DX"):
        stage(_slice_item(torch.rand(1, 1, 64, 64), "DX"))
    bad = _slice_item(torch.rand(1, 1, 64, 64))
    bad["image"][0, 3, 3] = float("nan")
    with pytest.raises(StageError, match="NaN"):
        stage(bad)
    with pytest.raises(ParameterError):
        build_stage("cs_reconstruction", {"ratio": 1.5})


def test_cs_held_out_data_spec_yields_cases_that_are_their_own_reference():
    data = load_data("cs-held-out:test:3:64")
    cases = list(data.cases())
    assert data.count == 3 and [c["source"].modality for c in cases] == ["MR", "MR", "CT"]
    assert all(torch.equal(c["image"], c["reference"]) and c["image"].shape == (1, 64, 64) for c in cases)
    with pytest.raises(InputError, match="N must be 1..6"):
        load_data("cs-held-out:test:7")
