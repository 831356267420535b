"""Raw MRI k-space files: fastMRI-style HDF5 and ``.npy`` arrays, read whole and checked.

Both hold complex k-space as ``(slices, H, W)`` (single coil) or ``(slices, coils, H, W)`` (multi-coil),
centred as fastMRI stores it (zero frequency at ``(H // 2, W // 2)``; see
:mod:`medidiff.physics.measurements`). HDF5 files keep it in a ``kspace`` dataset, with an optional
``mask`` dataset (``(W,)`` sampled columns, or ``(H, W)``) and an optional ``ismrmrd_header`` (XML),
of which only the encoded field of view is read. A 3-D array is always slices of one coil: a
single-slice multi-coil array must be given as ``(1, coils, H, W)``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medidiff.errors import InputError
from medidiff.io.atomic import atomic_write
from medidiff.io.text import clean_text

if TYPE_CHECKING:
    import torch

SUFFIXES = (".h5", ".hdf5", ".npy")
LAYOUTS = "(slices, H, W) single-coil or (slices, coils, H, W) multi-coil"


@dataclass(frozen=True)
class KSpace:
    """Checked k-space of one file: ``kspace`` complex64 ``(slices, coils, H, W)`` (``coils`` = 1 for
    single-coil files), ``mask`` bool ``(H, W)`` of sampled locations when the file gives one, and the
    encoded field of view in mm along (H, W, slab) when an ISMRMRD header gives one for this grid."""

    kspace: torch.Tensor
    mask: torch.Tensor | None
    source: Path
    field_of_view_mm: tuple[float, float, float] | None = None

    @property
    def coils(self) -> int:
        return self.kspace.shape[1]

    @property
    def slices(self) -> int:
        return self.kspace.shape[0]


def read_kspace(path: str | Path) -> KSpace:
    """Read and check a ``.h5``/``.hdf5`` (fastMRI) or ``.npy`` k-space file; ``InputError`` naming the
    file and the fix for anything that is not usable k-space."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"{path}: not a k-space file; give a fastMRI-style .h5 file or a complex .npy array")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes); copy the k-space file again")
    if path.suffix.lower() == ".npy":
        return _checked(path, _read_npy(path), None, None)
    return _read_h5(path)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npy array ({clean_text(exc, 80)}); save k-space with "
                         "numpy.save(path, complex_array)") from None


def _read_h5(path: Path) -> KSpace:
    import h5py

    if not h5py.is_hdf5(path):
        raise InputError(f"{path} is not an HDF5 file; fastMRI k-space is HDF5 with a 'kspace' dataset "
                         "(or give a complex .npy array)")
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get("kspace"), h5py.Dataset):
                found = ", ".join(clean_text(k, 32) for k in list(f.keys())[:8]) or "nothing"
                raise InputError(f"{path} has no 'kspace' dataset (found: {found}); write k-space to a "
                                 "dataset named 'kspace' as fastMRI does")
            kspace = f["kspace"][()]
            mask = f["mask"][()] if isinstance(f.get("mask"), h5py.Dataset) else None
            header = f["ismrmrd_header"][()] if isinstance(f.get("ismrmrd_header"), h5py.Dataset) else None
    except OSError as exc:
        raise InputError(f"{path}: HDF5 data cannot be read ({clean_text(exc, 80)}); the file is truncated "
                         "or damaged, copy it again") from None
    return _checked(path, kspace, mask, header)


def _checked(path: Path, kspace: np.ndarray, mask: np.ndarray | None, header) -> KSpace:
    """The ``KSpace`` of arrays read from ``path`` after every check."""
    import torch  # here, not at the top: discovery imports this module and stays torch-free

    kspace = np.asarray(kspace)
    if not np.iscomplexobj(kspace):
        raise InputError(f"{path}: k-space must be complex (complex64), got {kspace.dtype}; raw k-space is "
                         "complex, magnitude images are not k-space")
    if kspace.ndim not in (3, 4):
        raise InputError(f"{path}: k-space must be {LAYOUTS}, got shape {kspace.shape}"
                         + ("; add a slice axis (array[None])" if kspace.ndim == 2 else ""))
    if kspace.size == 0:
        raise InputError(f"{path}: k-space is empty (shape {kspace.shape}); export the acquisition again")
    bad = int(kspace.size - np.isfinite(kspace).sum())
    if bad:
        raise InputError(f"{path}: k-space holds {bad} NaN or infinite values; export the raw data again")
    if kspace.ndim == 3:
        kspace = kspace[:, None]
    h, w = kspace.shape[-2:]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape == (w,):
            mask = np.broadcast_to(mask, (h, w))
        elif mask.shape != (h, w):
            raise InputError(f"{path}: mask shape {mask.shape} matches neither the k-space columns ({w},) nor "
                             f"its plane ({h}, {w}); write the mask of this acquisition")
        if not mask.any():
            raise InputError(f"{path}: the mask samples nothing; write the mask of this acquisition")
        mask = torch.from_numpy(mask != 0)
    return KSpace(torch.from_numpy(np.ascontiguousarray(kspace, np.complex64)), mask, path,
                  _field_of_view(header, (h, w)))


def _field_of_view(header, shape: tuple[int, int]) -> tuple[float, float, float] | None:
    """ISMRMRD ``encodedSpace`` field of view (x, y, z mm) when its matrix is this k-space's (H, W), else None."""
    if header is None:
        return None
    try:
        space = ET.fromstring(header).find("{*}encoding/{*}encodedSpace")
        matrix = tuple(int(space.find(f"{{*}}matrixSize/{{*}}{a}").text) for a in "xy")
        fov = tuple(float(space.find(f"{{*}}fieldOfView_mm/{{*}}{a}").text) for a in "xyz")
    except (ET.ParseError, AttributeError, TypeError, ValueError):
        return None
    return fov if matrix == shape else None


def ismrmrd_header(shape: tuple[int, int], field_of_view_mm: tuple[float, float, float]) -> bytes:
    """A minimal ISMRMRD XML header giving the encoded matrix (H, W) and field of view (mm)."""
    x, y, z = field_of_view_mm
    return (f'<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
            f"<encodedSpace><matrixSize><x>{shape[0]}</x><y>{shape[1]}</y><z>1</z></matrixSize>"
            f"<fieldOfView_mm><x>{x}</x><y>{y}</y><z>{z}</z></fieldOfView_mm></encodedSpace>"
            "</encoding></ismrmrdHeader>").encode()


def write_fastmri_h5(path: str | Path, kspace, mask=None,
                     field_of_view_mm: tuple[float, float, float] | None = None) -> Path:
    """Write k-space (numpy or torch, a layout ``read_kspace`` accepts) as a fastMRI-style HDF5 file:
    ``kspace`` complex64, optional ``mask`` ((W,) or (H, W)) and ``ismrmrd_header``; atomically,
    after the reader's checks."""
    import h5py
    import torch

    path = Path(path)
    array, mask_array = (None if a is None else a.detach().cpu().numpy() if isinstance(a, torch.Tensor)
                         else np.asarray(a) for a in (kspace, mask))
    checked = _checked(path, array, mask_array, None)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=checked.kspace.numpy()[:, 0] if array.ndim == 3 else checked.kspace.numpy())
        if mask_array is not None:
            f.create_dataset("mask", data=mask_array.astype(bool))
        if field_of_view_mm is not None:
            f.create_dataset("ismrmrd_header", data=ismrmrd_header(checked.kspace.shape[-2:], field_of_view_mm))
    return path
