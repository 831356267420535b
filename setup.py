"""Package layout (metadata is in pyproject.toml): the medidiff packages, plus the top-level
``pipelines/`` and ``models/`` folders shipped inside the wheel as ``medidiff.builtin_pipelines`` and
``medidiff.builtin_models`` (one copy of each file; found at run time by medidiff/resources.py)."""

from setuptools import find_packages, setup

RESOURCE_PACKAGES = {"medidiff.builtin_pipelines": "pipelines", "medidiff.builtin_models": "models"}
MODEL_FILES = ["*/*", "restoration/*/*"]  # models/<method>/* and models/restoration/<task>/*

setup(
    packages=find_packages(include=["medidiff", "medidiff.*"]) + list(RESOURCE_PACKAGES),
    package_dir=RESOURCE_PACKAGES,
    include_package_data=False,  # only the package_data below: no data picked up by other means
    package_data={"medidiff.builtin_pipelines": ["*.yaml"], "medidiff.builtin_models": MODEL_FILES},
)
