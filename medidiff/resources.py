"""Where the built-in pipeline files and shipped model folders are, installed or in a checkout.

They live once, in the top-level ``pipelines/`` and ``models/`` folders of the repository; the wheel
ships them as the packages ``medidiff.builtin_pipelines`` and ``medidiff.builtin_models`` (see
setup.py), and an editable install maps those names back to the folders. Use these functions, never
a path relative to ``__file__``::

    from medidiff.resources import model_dir, pipeline_file
    folder = model_dir("bone_suppression")       # .../bone_suppression (weights, configs, card)
    path = pipeline_file("bone-suppression")     # .../bone-suppression.yaml
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PIPELINES_PACKAGE = "medidiff.builtin_pipelines"
MODELS_PACKAGE = "medidiff.builtin_models"
_CHECKOUT_FOLDERS = {PIPELINES_PACKAGE: "pipelines", MODELS_PACKAGE: "models"}


def _folder(package: str) -> Path:
    """The folder of a resource package; in a checkout that is not installed, the repository folder."""
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / _CHECKOUT_FOLDERS[package]


def pipelines_dir() -> Path:
    """The folder of the built-in pipeline files (``<name>.yaml``)."""
    return _folder(PIPELINES_PACKAGE)


def pipeline_file(name: str) -> Path:
    """The built-in pipeline file ``<name>.yaml`` (it may not exist: check ``is_file()``)."""
    return pipelines_dir() / f"{name}.yaml"


def models_dir() -> Path:
    """The folder that holds the shipped model folders."""
    return _folder(MODELS_PACKAGE)


def model_dir(name: str) -> Path:
    """The shipped model folder ``name`` (weights, configs, model card; it may not exist)."""
    return models_dir() / name
