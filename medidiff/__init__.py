"""medidiff: diffusion models for medical imaging, from DICOM study to derived series.

Notebook entry points (imported lazily, so the CLI starts fast)::

    import medidiff
    study = medidiff.load_study("datasets/samples/chest-dx-sample")
    pipeline = medidiff.Pipeline.from_yaml("bone-suppression")
    item = pipeline(study.item(0))
    medidiff.show_before_after(item)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_study": "medidiff.io.loading",
    "load_item": "medidiff.io.loading",
    "discover": "medidiff.io.discovery",
    "Pipeline": "medidiff.pipeline",
    "run_pipeline": "medidiff.executor",
    "show_before_after": "medidiff.display",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medidiff' has no attribute {name!r}")
