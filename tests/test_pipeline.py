"""Pipeline file validation: good files parse, bad ones name the key and line at fault."""

import re
from typing import Literal

import pytest

from medidiff.cli import main
from medidiff.errors import PipelineError
from medidiff.pipeline import Pipeline, Selection
from medidiff.resources import pipelines_dir


def test_builtin_pipelines_parse():
    names = [p.stem for p in pipelines_dir().glob("*.yaml")]
    assert "normalize-preview" in names
    for name in names:
        pipeline = Pipeline.from_yaml(name)
        assert pipeline.stages and pipeline.name
        assert len(pipeline.build()) == len(pipeline.stages)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: x\nstages:\n  - no_such_stage: {}\n", "line 3: unknown stage 'no_such_stage'"),
        ("name: x\nstages:\n  - normalize_intensity: {lower: 1}\n", "line 3: stage 'normalize_intensity' has no parameter 'lower'"),
        ("name: x\nselect:\n  modalty: CT\nstages: [normalize_intensity]\n", "line 3: unknown key 'modalty' in 'select'"),
        ("name: x\nselect:\n  min_size: -3\nstages: [normalize_intensity]\n", "line 3: select.min_size must be a non-negative integer"),
        ("name: x\nstages: []\n", "'stages' must be a non-empty list"),
        ("stages: [normalize_intensity]\n", "missing required key 'name'"),
        ("name: x\nstages: [normalize_intensity]\noutputs:\n  jpeg: {}\n", "line 4: unknown key 'jpeg' in 'outputs'"),
        ("name: x\nstages:\n  - nonexistent.module.Thing: {}\n", "line 3: cannot import stage 'nonexistent.module.Thing'"),
        ("name: [unclosed\n", "not valid YAML"),
        ("name: x\nstages:\n  - resize_in_plane: {max_size: 3}\n",
         "line 3: stage 'resize_in_plane': max_size is 3; expected 16..8192 pixels"),
        ("name: x\nstages:\n  - resize_in_plane: {max_size: big}\n", "max_size is 'big'; expected an integer"),
        ("name: x\nstages:\n  - resize_in_plane: {max_size: 256.5}\n", "max_size is 256.5; expected an integer"),
        ("name: x\nstages:\n  - resize_in_plane: {max_size: true}\n", "max_size is True; expected an integer"),
        ("name: x\nstages:\n  - normalize_intensity: {lower_percentile: [1]}\n",
         "lower_percentile is [1]; expected a number"),
    ],
)
def test_invalid_pipelines_name_the_fault(text, fragment):
    with pytest.raises(PipelineError) as info:
        Pipeline.from_text(text, source="bad.yaml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("bad.yaml: ")


def test_bad_parameter_value_is_refused_at_load_with_file_line_and_key(tmp_path, capsys):
    bad = tmp_path / "my-pipeline.yaml"
    bad.write_text("name: x\nstages:\n  - resize_in_plane: {max_size: 64}\n  - normalize_intensity:\n"
                   "      lower_percentile: 1\n      upper_percentile: 101\n")
    with pytest.raises(PipelineError) as info:
        Pipeline.from_yaml(bad)
    assert str(info.value).startswith(f"{bad}: line 6: stage 'normalize_intensity': upper_percentile is 101;")
    assert main(["run", str(bad), str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "line 6" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bone_suppression_steps_zero_is_a_load_error():
    with pytest.raises(PipelineError) as info:
        Pipeline.from_text("name: x\nstages:\n  - bone_suppression: {steps: 0}\n", source="bs.yaml")
    message = str(info.value)
    assert message.startswith("bs.yaml: line 3: stage 'bone_suppression': ") and "steps is 0" in message


def test_integer_for_a_float_parameter_is_accepted():
    pipeline = Pipeline.from_text("name: x\nstages:\n  - normalize_intensity: {lower_percentile: 2}\n")
    assert pipeline.stages[0].params == {"lower_percentile": 2}


class ChoiceStage:
    """A stage with a Literal and an optional parameter (loaded by import path below)."""

    def __init__(self, method: Literal["ddpm", "ddim"] = "ddim", size: int | None = None):
        self.method, self.size = method, size

    def __call__(self, item: dict) -> dict:
        return item


@pytest.mark.parametrize(
    ("params", "fragment"),
    [("{method: ddpx}", "line 3: stage 'tests.test_pipeline.ChoiceStage': method is 'ddpx'; expected one of 'ddpm', 'ddim'"),
     ("{size: x}", "size is 'x'; expected an integer or null"),
     ("{method: ddpm, size: null}", None)],
)
def test_literal_and_optional_annotations_are_checked(params, fragment):
    text = f"name: x\nstages:\n  - tests.test_pipeline.ChoiceStage: {params}\n"
    if fragment is None:
        assert Pipeline.from_text(text).stages[0].params["method"] == "ddpm"
        return
    with pytest.raises(PipelineError, match=re.escape(fragment)):
        Pipeline.from_text(text)


def test_monai_transform_by_import_path():
    pipeline = Pipeline.from_text(
        "name: x\nstages:\n  - monai.transforms.ScaleIntensityd: {keys: [image], minv: 0.0, maxv: 2.0}\n"
    )
    import torch

    item = pipeline({"image": torch.arange(12.0).reshape(1, 3, 4)})
    assert float(item["image"].max()) == pytest.approx(2.0)
    assert float(item["image"].min()) == pytest.approx(0.0)


def test_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(PipelineError, match="normalize-preview"):
        Pipeline.from_yaml("no-such-pipeline")


class _Series:
    modality, body_part, view_position = "CT", "CHEST", ""
    image_type = ("ORIGINAL", "PRIMARY")
    rows = columns = 128
    is_3d = True
    source_format = "DICOM"


def test_selection_reasons():
    series = _Series()
    assert Selection(modality=("CT",)).reason_to_skip(series) is None
    assert "source format DICOM" in Selection(source_format=("K-SPACE",)).reason_to_skip(series)
    assert "modality CT" in Selection(modality=("DX", "CR")).reason_to_skip(series)
    assert "below the minimum 256" in Selection(min_size=256).reason_to_skip(series)
    assert "3-D series" in Selection(dimensions=2).reason_to_skip(series)
    assert "lacks DERIVED" in Selection(image_type=("DERIVED",)).reason_to_skip(series)


def test_digest_changes_with_the_text():
    a = Pipeline.from_text("name: x\nstages: [normalize_intensity]\n")
    b = Pipeline.from_text("name: x\nstages: [resize_in_plane]\n")
    assert a.digest != b.digest
