"""Pipeline file validation: good files parse, bad ones name the key and line at fault."""

import pytest

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
        ("name: x\nstages:\n  - resize_in_plane: {max_size: 3}\n", "line 3: stage 'resize_in_plane': max_size must be between"),
    ],
)
def test_invalid_pipelines_name_the_fault(text, fragment):
    with pytest.raises(PipelineError) as info:
        Pipeline.from_text(text, source="bad.yaml").build()
    assert fragment in str(info.value)
    assert str(info.value).startswith("bad.yaml") or "line" in str(info.value)


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


def test_selection_reasons():
    series = _Series()
    assert Selection(modality=("CT",)).reason_to_skip(series) is None
    assert "modality CT" in Selection(modality=("DX", "CR")).reason_to_skip(series)
    assert "below the minimum 256" in Selection(min_size=256).reason_to_skip(series)
    assert "3-D series" in Selection(dimensions=2).reason_to_skip(series)
    assert "lacks DERIVED" in Selection(image_type=("DERIVED",)).reason_to_skip(series)


def test_digest_changes_with_the_text():
    a = Pipeline.from_text("name: x\nstages: [normalize_intensity]\n")
    b = Pipeline.from_text("name: x\nstages: [resize_in_plane]\n")
    assert a.digest != b.digest
