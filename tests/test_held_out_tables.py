"""The bone-suppression held-out tables: re-measuring some rows keeps the others."""

from __future__ import annotations

import json
import shutil

import pytest

from medidiff.evaluation.held_out import main, merge_rows
from medidiff.resources import model_dir


def test_merge_rows_replaces_measured_rows_in_place_and_appends_new_ones():
    old = [{"method": "a", "BSR": 1}, {"method": "b", "BSR": 2}]
    new = [{"method": "b", "BSR": 3}, {"method": "c", "BSR": 4}]
    assert merge_rows(old, new) == [{"method": "a", "BSR": 1}, {"method": "b", "BSR": 3}, {"method": "c", "BSR": 4}]


def test_only_remeasures_the_named_rows_and_keeps_the_rest(tmp_path, capsys):
    folder = tmp_path / "bone_suppression"
    shutil.copytree(model_dir("bone_suppression"), folder)
    spec = "synthetic-cxr:test:2:256"
    kept = {"method": "BS-LDM shipped (DDPM 50)", "n": 2, "BSR": 0.5, "PSNR": 30.0, "SSIM": 0.9, "MSE": 0.001,
            "s/img": 1.0}
    stale = dict(kept, method="identity (CXR as is)", BSR=-9.0)
    (folder / "eval_results.json").write_text(json.dumps({"data": spec, "rows": [stale, kept]}))
    main(["bone_suppression", "--models", str(folder), "--data", spec, "--n", "2", "--only", "identity",
          "--threads", "1"])
    rows = json.loads((folder / "eval_results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["identity (CXR as is)", "BS-LDM shipped (DDPM 50)"]
    assert rows[1] == kept and rows[0]["n"] == 2 and 0 < rows[0]["BSR"] < 1  # measured anew, not the stale -9
    assert "| identity (CXR as is) | 2 |" in (folder / "eval_results.md").read_text()

    with pytest.raises(SystemExit) as e:  # another data spec: the kept rows would not be comparable
        main(["bone_suppression", "--models", str(folder), "--data", "synthetic-cxr:test:3:256", "--only", "identity"])
    assert e.value.code == 2 and "run without --only" in capsys.readouterr().err
