"""The wheel is self-contained: built, installed (not editable) into a fresh venv and run from elsewhere.

The fresh venv sees the test venv's dependencies through a plain path in a ``.pth`` file (so the
editable install's import hook there is not run) and gets medidiff only from the wheel. About 65 CPU
seconds (mostly the bone-suppression run), hence ``slow``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "samples" / "chest-dx-sample"
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "medidiff", "pipelines", "models")


def _run(*args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", tmp / "dist", src, cwd=tmp)
    (built,) = (tmp / "dist").glob("medidiff-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv holding medidiff from the wheel; dependencies come from this venv's site-packages."""
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    _run(sys._base_executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                     cwd=venv.parent).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel, cwd=venv.parent)
    return venv


def test_wheel_holds_every_module_and_resource(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "medidiff").rglob("*.py")}
    expected |= {f"medidiff/builtin_pipelines/{p.name}" for p in (ROOT / "pipelines").glob("*.yaml")}
    expected |= {f"medidiff/builtin_models/{p.relative_to(ROOT / 'models').as_posix()}"
                 for pattern in ("*/*", "restoration/*/*") for p in (ROOT / "models").glob(pattern) if p.is_file()}
    assert expected - names == set()


@pytest.mark.slow
def test_installed_wheel_runs_bone_suppression_from_another_folder(fresh_venv, tmp_path):
    where = _run(fresh_venv / "bin" / "python", "-c",
                 "import medidiff, medidiff.resources as r; print(medidiff.__file__); "
                 "print(r.pipelines_dir()); print(r.model_dir('bone_suppression'))", cwd=tmp_path).stdout.split()
    assert len(where) == 3
    for path in map(Path, where):
        assert path.is_relative_to(fresh_venv) and not path.is_relative_to(ROOT), where
    _run(fresh_venv / "bin" / "medidiff", "run", "bone-suppression", SAMPLE, "-o", "out", "--no-progress",
         cwd=tmp_path)
    (dcm,) = (tmp_path / "out").rglob("*.dcm")
    assert "BS-LDM" in pydicom.dcmread(dcm).SeriesDescription
    assert (dcm.parents[1] / "panel.png").is_file()
