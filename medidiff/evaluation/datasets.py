"""Evaluation data: cases with a reference image, from the synthetic chest phantom or from DICOM studies.

Data specs (CLI ``--data``)::

    synthetic-cxr:test:20        20 phantom pairs from the held-out TEST_SEEDS, 512 px
    synthetic-cxr:test:20:256    ... at 256 px
    synthetic-cxr:val:20:256     ... from the validation seeds (training's distribution: choosing settings)
    drr-cxr:test:20:256          20 DRR pairs (medidiff.datasets.drr, real chest CT) from its TEST_SEEDS
    cs-held-out:test:6:256       the CS held-out images (medidiff.datasets.cs_images), each its own reference
    ct-denoise:test:5            held-out restoration pairs (medidiff.datasets.restoration_images): degraded
                                 input, clean reference; also mr-sr2, mr-sr4, xray-sr4
    path/to/folder               DICOM studies; reference/ holds one reference series per study,
                                 matched by StudyInstanceUID (the reference folder is not evaluated);
                                 a reader study without the reference (--no-reference) needs no reference/

``<kind>:...`` specs come from :data:`DATA_SPECS`; a module adds its own kind (k-space, degraded/clean
pairs, another phantom) with :func:`register_data_spec`. Anything else is a folder.

Every case is a pipeline item ``{"image", "original", "reference", "source"}`` with MONAI's axis
convention (``(1, cols, rows[, slices])``). Lineage (name, digest, source) goes to MLflow through
:meth:`EvaluationData.mlflow_dataset`; the digest and source never contain identifiers.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medidiff.errors import InputError

REFERENCE_FOLDER = "reference"


@dataclass(frozen=True)
class SyntheticSource:
    """Stands in for a DICOM ``SeriesRef`` for a phantom case (same attributes the pipeline reads)."""

    seed: int
    rows: int
    columns: int
    modality: str = "DX"
    body_part: str = "CHEST"
    view_position: str = "PA"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")  # as the DX writer marks a simulated radiograph
    frames: int = 1
    series_description: str = "synthetic chest phantom"
    source_format: str = "synthetic"  # selection rules may name source formats (DICOM, k-space, NIfTI, ...)

    @property
    def study_uid(self) -> str:
        return f"2.25.{self.seed}1"

    @property
    def series_uid(self) -> str:
        return f"2.25.{self.seed}2"

    @property
    def key(self) -> str:
        """The phantom seed: not an identifier, and enough to regenerate the case."""
        return f"seed-{self.seed}"

    @property
    def is_3d(self) -> bool:
        return False


@dataclass
class EvaluationData:
    """A named, lazily loaded set of evaluation cases with a lineage digest."""

    name: str
    source: str
    digest: str
    count: int
    _cases: Callable[[], Iterator[dict]]

    def cases(self, limit: int | None = None) -> Iterator[dict]:
        """Yield up to ``limit`` cases (all by default), loading one at a time."""
        for index, item in enumerate(self._cases()):
            if limit is not None and index >= limit:
                return
            yield item

    def mlflow_dataset(self):
        """An ``mlflow.data`` dataset for ``mlflow.log_input``: name, digest and a ``medidiff`` source
        whose ``spec`` is the data spec (``synthetic-cxr:test:20:512``; a folder's hash for DICOM)."""
        from mlflow.data.meta_dataset import MetaDataset

        return MetaDataset(source=_source_class()(self.source.removeprefix("medidiff://")), name=self.name,
                           digest=self.digest)


@functools.cache
def _source_class():
    """The ``medidiff`` MLflow dataset source (built on demand: importing this module needs no MLflow)."""
    from mlflow.data.dataset_source import DatasetSource

    class MedidiffDataSource(DatasetSource):
        """Where evaluation data comes from, as a medidiff data spec (shown as source type ``medidiff``)."""

        def __init__(self, spec: str):
            self.spec = spec

        @staticmethod
        def _get_source_type() -> str:
            return "medidiff"

        def load(self, **kwargs):
            return load_data(self.spec)

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError("medidiff data sources are built from a spec, not resolved from a URI")

        def to_dict(self) -> dict:
            return {"spec": self.spec}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict["spec"])

    return MedidiffDataSource


DataLoader = Callable[..., "EvaluationData"]
DATA_SPECS: dict[str, DataLoader] = {}


def register_data_spec(kind: str, loader: DataLoader) -> None:
    """Make ``<kind>:...`` specs load with ``loader(spec, size=...)`` (returns :class:`EvaluationData`)."""
    DATA_SPECS[kind] = loader


def load_data(spec: str, *, size: int = 512, reference: bool = True) -> EvaluationData:
    """Evaluation data from a spec (see the module docstring); InputError says what is wrong.
    ``reference=False``: a DICOM folder's cases come without reference (real images with no truth)."""
    kind, colon, _ = spec.partition(":")
    if colon and kind in DATA_SPECS:
        return DATA_SPECS[kind](spec, size=size)
    path = Path(spec)
    if not path.exists():
        kinds = ", ".join(f"{k}:..." for k in DATA_SPECS)
        raise InputError(f"--data {spec!r}: neither a folder of DICOM studies nor a data spec ({kinds})")
    return dicom_data(path, reference=reference)


def phantom_data(spec: str, *, generator: str, size: int = 512) -> EvaluationData:
    """``<kind>:test:N[:SIZE]``: N pairs from the held-out ``TEST_SEEDS`` of a phantom ``generator`` module
    (``make_pair(seed, size)`` -> ``{"cxr", "soft"}`` in [0, 1]); ``<kind>:val:...`` from its ``VAL_SEEDS``."""
    import importlib

    kind, split = spec.split(":")[:2]
    module = importlib.import_module(generator)
    split_seeds = module.VAL_SEEDS if split == "val" else module.TEST_SEEDS
    count, size = _count_and_size(spec, len(split_seeds), size, splits=("test", "val"))
    seeds = list(split_seeds)[:count]
    digest = hashlib.sha256(Path(module.__file__).read_bytes() + f"{seeds[0]}:{count}:{size}".encode()).hexdigest()[:16]

    def cases() -> Iterator[dict]:
        for seed in seeds:
            pair = module.make_pair(seed, size=size)
            source = SyntheticSource(seed, rows=pair["cxr"].shape[0], columns=pair["cxr"].shape[1])
            yield _item(pair["cxr"], pair["soft"], source)

    name = f"{kind}-{split}-{count}-{size}px"
    return EvaluationData(name, f"medidiff://{kind}:{split}:{count}:{size}", digest, count, cases)


def _count_and_size(spec: str, available: int, size: int, splits: tuple[str, ...] = ("test",)) -> tuple[int, int]:
    """N and SIZE of a ``<kind>:<split>:N[:SIZE]`` spec, checked."""
    kind, parts = spec.split(":", 1)[0], spec.split(":")
    try:
        if len(parts) not in (3, 4) or parts[1] not in splits:
            raise ValueError
        count = int(parts[2])
        size = int(parts[3]) if len(parts) == 4 else size
    except ValueError:
        raise InputError(f"--data {spec!r}: expected {kind}:{'|'.join(splits)}:N or "
                         f"{kind}:{'|'.join(splits)}:N:SIZE") from None
    if not 1 <= count <= available or not 32 <= size <= 4096:
        raise InputError(f"--data {spec!r}: N must be 1..{available} and SIZE 32..4096")
    return count, size


def cs_held_out_data(spec: str, *, size: int = 256) -> EvaluationData:
    """``cs-held-out:test:N[:SIZE]``: the first N images of the fixed CS held-out set
    (:func:`medidiff.datasets.cs_images.held_out_images`), each its own reference: a CS pipeline
    measures the image and reconstructs it, and is scored against the fully sampled image."""
    from medidiff.datasets import cs_images

    count, size = _count_and_size(spec, len(cs_images.held_out_names()), size)
    digest = hashlib.sha256(Path(cs_images.__file__).read_bytes() + f"{count}:{size}".encode()).hexdigest()[:16]

    def cases() -> Iterator[dict]:
        for seed, (name, image) in enumerate(cs_images.held_out_images(size)[:count]):
            source = SyntheticSource(seed, rows=size, columns=size, modality=next((m for m in ("MR", "CT") if f" {m} " in name), "OT"),
                                     body_part="", view_position="", image_type=("ORIGINAL", "PRIMARY"),
                                     series_description=name)
            yield _item(image[0, 0], image[0, 0], source)

    return EvaluationData(f"cs-held-out-{count}-{size}px", f"medidiff://cs-held-out:test:{count}:{size}",
                          digest, count, cases)


def restoration_data(spec: str, *, task: str, size: int = 512) -> EvaluationData:
    """``<task>:test:N`` (``ct-denoise``, ``mr-sr2``, ``mr-sr4``, ``xray-sr4``): the first N pairs of the task's
    fixed held-out set (:func:`medidiff.datasets.restoration_images.held_out_pairs`), the degraded image as
    input and the clean one as reference, at their own sizes; CT in Hounsfield units, MR and radiographs in
    the units of the clean image's percentiles."""
    from medidiff.datasets import restoration_images as images
    from medidiff.physics import degradations

    if len(spec.split(":")) != 3:
        raise InputError(f"--data {spec!r}: expected {spec.split(':')[0]}:test:N (the held-out images keep their sizes)")
    count, _ = _count_and_size(spec, len(images.held_out_names(task)), size)
    code = Path(images.__file__).read_bytes() + Path(degradations.__file__).read_bytes()
    digest = hashlib.sha256(code + f"{task}:{count}".encode()).hexdigest()[:16]
    modality = {"ct_denoise": "CT", "xray_sr4": "DX"}.get(task, "MR")

    def cases() -> Iterator[dict]:
        for seed, (name, clean, degraded) in enumerate(images.held_out_pairs(task)[:count]):
            if images.intensity(task)["kind"] == "hu":
                clean, degraded = images.units_to_hu(clean), images.units_to_hu(degraded)
            source = SyntheticSource(seed, rows=degraded.shape[-2], columns=degraded.shape[-1], modality=modality,
                                     body_part="CHEST" if "chest" in name else "", view_position="",
                                     series_description=name)
            yield _item(degraded[0, 0], clean[0, 0], source)

    kind = spec.split(":")[0]
    return EvaluationData(f"{kind}-held-out-{count}", f"medidiff://{kind}:test:{count}", digest, count, cases)


def _item(image, reference, source: SyntheticSource) -> dict:
    import torch
    from monai.data import MetaTensor

    def tensor(array) -> MetaTensor:  # (rows, cols) -> MONAI's (1, cols, rows)
        return MetaTensor(torch.as_tensor(array, dtype=torch.float32).T.contiguous()[None],
                          meta={"modality": source.modality})

    image_t = tensor(image)
    return {"image": image_t, "original": image_t.clone(), "reference": tensor(reference), "source": source}


def dicom_data(root: Path, reference: bool = True) -> EvaluationData:
    """DICOM studies under ``root`` with reference series under ``root/reference``, paired by
    StudyInstanceUID; ``reference=False``: every series outside ``reference/`` alone, without one."""
    from medidiff.io.discovery import discover
    from medidiff.io.privacy import hash_identifier

    reference_root = root / REFERENCE_FOLDER
    if reference and not reference_root.is_dir():
        raise InputError(f"{root}: no {REFERENCE_FOLDER}/ folder with reference series (matched by StudyInstanceUID); "
                         "a reader study of images without truth takes --no-reference")
    references: dict[str, object] = {}
    for series in discover(reference_root).series if reference else ():
        if series.study_uid in references:
            raise InputError(f"{reference_root}: study {hash_identifier(series.study_uid)} has several reference series")
        references[series.study_uid] = series
    pairs = []
    for series in discover(root).series:
        if reference_root in series.files[0].parents:
            continue
        if not reference:
            pairs.append((series, None))
            continue
        if series.study_uid not in references:
            raise InputError(f"{root}: series {series.key} has no reference series in {REFERENCE_FOLDER}/ "
                             f"(study {hash_identifier(series.study_uid)})")
        pairs.append((series, references[series.study_uid]))
    if not pairs:
        raise InputError(f"{root}: no DICOM image series to evaluate outside {REFERENCE_FOLDER}/")
    pairs.sort(key=lambda pair: pair[0].key)
    uids = "\n".join(f"{s.series_uid}>{r.series_uid if r else ''}" for s, r in pairs)
    digest = hashlib.sha256(uids.encode()).hexdigest()[:16]

    def cases() -> Iterator[dict]:
        from medidiff.io.loading import load_item, load_series

        for series, truth in pairs:
            yield load_item(series) | ({"reference": load_series(truth)} if truth else {})

    # The folder path may name a patient or site: only its salted hash is recorded.
    name = f"dicom-{len(pairs)}-series"
    return EvaluationData(name, f"medidiff://dicom-folder/{hash_identifier(str(root.resolve()))}", digest,
                          len(pairs), cases)


register_data_spec("synthetic-cxr", functools.partial(phantom_data, generator="medidiff.datasets.chest_phantom"))
register_data_spec("drr-cxr", functools.partial(phantom_data, generator="medidiff.datasets.drr"))
register_data_spec("cs-held-out", cs_held_out_data)
for _task in ("ct_denoise", "mr_sr2", "mr_sr4", "xray_sr4"):
    register_data_spec(_task.replace("_", "-"), functools.partial(restoration_data, task=_task))
