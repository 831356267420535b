"""MLflow tracking: where runs go, and small helpers shared by evaluation, reader studies and training.

By default runs go to an embedded SQLite store in the working directory (``sqlite:///mlflow.db``; no
server needed; browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``). ``MLFLOW_TRACKING_URI``
or an explicit ``tracking_uri`` (the CLI's ``--tracking-uri``) point elsewhere, e.g. a shared server.
Nothing logged here may contain patient identifiers: callers pass hashed keys only.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medidiff.errors import MedidiffError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
REACH_TIMEOUT_S = 5
SEARCH_PATH = "api/2.0/mlflow/experiments/search?max_results=1"  # a cheap read every MLflow server answers
LIBRARIES = ("torch", "monai", "diffusers", "pydicom", "mlflow", "numpy", "scipy")
# MLflow's HTTP defaults (7 retries, 120 s timeout) take minutes to give up on a dead server
QUICK_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(MedidiffError):
    """The tracking server cannot be reached or refused to store a run."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else the embedded store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def setup(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the resolved tracking URI (and experiment, created if new); returns the URI."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment:
        mlflow.set_experiment(experiment)
    return uri


def check_reachable(tracking_uri: str | None = None, *, timeout: float = REACH_TIMEOUT_S) -> str:
    """The resolved URI; TrackingError at once unless an http(s) tracking URI answers as an MLflow server.

    An MLflow server answers its REST API with 200 (401/403 behind authentication); anything else, a
    refused connection, a timeout or another program's answer, is an error. Local stores (sqlite, file)
    are not checked.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if urlsplit(uri).scheme not in ("http", "https"):
        return uri
    fix = "start it, correct --tracking-uri / MLFLOW_TRACKING_URI, or use --no-tracking"
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/{SEARCH_PATH}", timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        raise TrackingError(f"MLflow tracking server {uri} is not reachable ({getattr(exc, 'reason', exc)}); "
                            f"{fix}") from None
    if status not in (200, 401, 403):
        raise TrackingError(f"{uri} answered HTTP {status}: no MLflow tracking server there; {fix}")
    return uri


@contextmanager
def quick_failure() -> Iterator[None]:
    """MLflow HTTP calls give up in seconds, not minutes (settings the user exported are kept)."""
    added = {k: v for k, v in QUICK_FAILURE.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def library_versions() -> dict[str, str]:
    """``<library>_version`` of the libraries that shape results (``not installed`` when absent)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[f"{name}_version"] = version(name)
        except PackageNotFoundError:
            versions[f"{name}_version"] = "not installed"
    return versions


def provenance() -> dict[str, str]:
    """medidiff and library versions and, when run from a git checkout, the commit (``+dirty`` if modified)."""
    from medidiff import __version__

    info = {"medidiff_version": __version__} | library_versions()
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "pyproject.toml").is_file():  # installed from a wheel: site-packages is no checkout
        return info
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return info
    info["git_commit"] = commit + ("+dirty" if dirty else "")
    return info


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> ``{"a.b": "value"}`` with string values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log (nested) parameters to the active run."""
    import mlflow

    mlflow.log_params(flatten(params, prefix))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics to the active run (NaN/None are skipped: MLflow cannot plot them)."""
    import math

    import mlflow

    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if finite:
        mlflow.log_metrics(finite, step=step)


def log_table(rows: list[Mapping[str, Any]], artifact_file: str) -> None:
    """Log a list of row dicts as an MLflow table (JSON artifact shown in the UI's table view)."""
    import mlflow

    columns = list(dict.fromkeys(k for row in rows for k in row))
    mlflow.log_table({c: [row.get(c) for row in rows] for c in columns}, artifact_file=artifact_file)


def log_figure(figure, artifact_file: str) -> None:
    """Log a matplotlib Figure as a PNG artifact."""
    import mlflow

    mlflow.log_figure(figure, artifact_file)


def log_files(paths: list[str | Path], artifact_path: str | None = None) -> None:
    """Log files (or whole folders) as artifacts."""
    import mlflow

    for path in map(Path, paths):
        if path.is_dir():
            mlflow.log_artifacts(str(path), f"{artifact_path}/{path.name}" if artifact_path else path.name)
        else:
            mlflow.log_artifact(str(path), artifact_path)


class TrainingLog:
    """The callback a trainer calls: ``log(step, {"loss": ...})``; ``add_model_files`` for results."""

    def __init__(self) -> None:
        self.model_files: list[Path] = []

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        log_metrics(metrics, step=step)

    def add_model_files(self, *paths: str | Path) -> None:
        """Files or folders to log under ``model/`` when the run ends (e.g. the weights and model card)."""
        self.model_files.extend(Path(p) for p in paths)


@contextmanager
def training_logger(
    run_name: str, config: str | Path | Mapping[str, Any], *, tracking_uri: str | None = None,
    experiment: str = "medidiff-training",
) -> Iterator[TrainingLog]:
    """An MLflow run for one training: logs the config (file + flattened params) and provenance,
    yields the ``log(step, metrics)`` callback, and logs the model files added to it at the end
    (also when training stops early, so a resumable partial run keeps its checkpoint)."""
    import mlflow
    import yaml

    setup(tracking_uri, experiment)
    with mlflow.start_run(run_name=run_name):
        if isinstance(config, Mapping):
            values = config
        else:
            values = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
            mlflow.log_artifact(str(config), "config")
        log_params(values, "config.")
        log_params(provenance())
        callback = TrainingLog()
        try:
            yield callback
        finally:
            log_files([p for p in callback.model_files if p.exists()], "model")
