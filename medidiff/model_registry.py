"""Shipped model folders (``medidiff.resources.model_dir(name)``) in the MLflow model registry, and back.

``register_model_folder("bone_suppression")`` logs the folder as the artifacts of a small pyfunc
model and registers it; stages take a model spec that :func:`resolve_model_dir` turns into a local
folder: ``"default"``/``""`` -> the stage's shipped folder, a path -> itself, ``models:/<name>/<version>``
-> the registered files, downloaded once into ``~/.cache/medidiff/models/<registry>/<name>/<version>``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from medidiff.errors import InputError
from medidiff.io.atomic import atomic_dir
from medidiff.resources import model_dir

CACHE_DIR = Path("~/.cache/medidiff/models")
ARTIFACT_KEY = "model_dir"


def _model_folder_wrapper():
    """A pyfunc wrapper whose payload is a medidiff model folder; ``predict`` returns the folder's path.

    medidiff stages load the folder themselves (``resolve_model_dir("models:/name/version")``); the
    wrapper only makes the folder a versioned, registrable MLflow model. Built on demand so importing
    this module (as stages do) does not import MLflow.
    """
    from mlflow.pyfunc import PythonModel

    class ModelFolder(PythonModel):
        def load_context(self, context) -> None:
            self.model_dir = context.artifacts[ARTIFACT_KEY]

        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return [self.model_dir]

    return ModelFolder()


@dataclass(frozen=True)
class RegisteredModel:
    """What :func:`register_model_folder` registered."""

    name: str
    version: str
    run_id: str
    uri: str


def file_sha256(path: str | Path) -> str:
    """sha256 of one file, read in 1 MiB blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file in ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def register_model_folder(
    name: str, folder: str | Path | None = None, *, tracking_uri: str | None = None,
    experiment: str = "medidiff-models",
) -> RegisteredModel:
    """Log ``folder`` (default: the shipped folder ``name``) as a pyfunc model and register it as ``name``."""
    import mlflow

    from medidiff import tracking

    folder = Path(folder) if folder else model_dir(name)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise InputError(f"model folder {folder} does not exist or is empty")
    tracking.check_reachable(tracking_uri)
    tracking.setup(tracking_uri, experiment)
    card = folder / "MODEL_CARD.md"
    with mlflow.start_run(run_name=f"register {name}") as run:
        tracking.log_params({"model.name": name, "model.folder_sha256": folder_digest(folder)}
                            | ({"model.card_sha256": hashlib.sha256(card.read_bytes()).hexdigest()}
                               if card.is_file() else {})
                            | tracking.provenance())
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_model_folder_wrapper(), artifacts={ARTIFACT_KEY: str(folder)},
            pip_requirements=[f"medidiff=={tracking.provenance()['medidiff_version']}"],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    return RegisteredModel(name, version, run.info.run_id, f"models:/{name}/{version}")


def resolve_model_dir(spec: str, *, default_name: str | None = None, tracking_uri: str | None = None) -> Path:
    """A local model folder for ``spec``: ``"default"``/``""`` (the shipped folder ``default_name``, which
    the calling stage names), a path, or ``models:/<name>/<version>`` (downloaded once, then cached)."""
    if spec in ("", "default"):
        if default_name is None:
            raise InputError(f"model spec {spec!r} names a stage's shipped model; give a folder or "
                             "models:/<name>/<version>")
        return model_dir(default_name)
    if not spec.startswith("models:/"):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise InputError(f"model folder {path} does not exist")
        return path
    parts = spec.removeprefix("models:/").split("/")
    if len(parts) != 2 or not all(parts):
        raise InputError(f"model spec {spec!r}: expected models:/<name>/<version>")
    from medidiff import tracking

    registry = hashlib.sha256(tracking.resolve_tracking_uri(tracking_uri).encode()).hexdigest()[:12]
    target = CACHE_DIR.expanduser() / registry / parts[0] / parts[1]
    if not (parts[1].isdigit() and target.is_dir()):  # aliases and "latest" can move: always fetch those
        _download(spec, target, tracking_uri)
    folders = [p for p in (target / "artifacts").iterdir() if p.is_dir()]
    if len(folders) != 1:
        raise InputError(f"model {spec} is not a medidiff model folder (registered with 'medidiff models register')")
    return folders[0]


def _download(spec: str, target: Path, tracking_uri: str | None) -> None:
    import mlflow

    from medidiff import tracking

    tracking.setup(tracking_uri)
    with atomic_dir(target) as partial:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(partial))
        except Exception as exc:  # the registry says why (unknown name/version, unreachable server)
            raise InputError(f"cannot download model {spec}: {exc}") from None
