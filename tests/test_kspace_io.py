"""Raw k-space files: fastMRI HDF5 and .npy round trips, and a clear error for each bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from medidiff.errors import InputError
from medidiff.io.kspace import read_kspace, write_fastmri_h5


def _kspace(*shape: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_single_coil_h5_round_trip_with_column_mask_and_header(tmp_path):
    kspace = _kspace(3, 32, 24)
    columns = np.zeros(24, bool)
    columns[::4] = True
    path = write_fastmri_h5(tmp_path / "knee.h5", torch.from_numpy(kspace), columns, field_of_view_mm=(180.0, 135.0, 3.0))
    with h5py.File(path) as f:
        assert f["kspace"].shape == (3, 32, 24) and f["kspace"].dtype == np.complex64
    data = read_kspace(path)
    assert data.kspace.dtype == torch.complex64 and data.kspace.shape == (3, 1, 32, 24)
    assert (data.slices, data.coils) == (3, 1) and data.source == path
    assert np.array_equal(data.kspace[:, 0].numpy(), kspace)
    assert data.mask.shape == (32, 24) and data.mask.dtype == torch.bool
    assert torch.equal(data.mask[5], torch.from_numpy(columns))
    assert data.field_of_view_mm == (180.0, 135.0, 3.0)


def test_multicoil_h5_and_npy_round_trips(tmp_path):
    kspace = _kspace(2, 4, 16, 16)
    mask = np.ones((16, 16), np.float32)
    data = read_kspace(write_fastmri_h5(tmp_path / "brain.h5", kspace, mask))
    assert data.coils == 4 and np.array_equal(data.kspace.numpy(), kspace) and data.mask.all()
    assert data.field_of_view_mm is None
    np.save(tmp_path / "brain.npy", kspace.astype(np.complex128))
    from_npy = read_kspace(tmp_path / "brain.npy")
    assert from_npy.kspace.dtype == torch.complex64 and from_npy.mask is None
    assert np.array_equal(from_npy.kspace.numpy(), kspace)


def test_header_for_another_grid_is_ignored(tmp_path):
    path = write_fastmri_h5(tmp_path / "a.h5", _kspace(1, 16, 16), field_of_view_mm=(200.0, 200.0, 5.0))
    with h5py.File(path, "a") as f:
        header = f["ismrmrd_header"][()].replace(b"<x>16</x>", b"<x>640</x>")  # oversampled readout
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = header
    assert read_kspace(path).field_of_view_mm is None
    with h5py.File(path, "a") as f:
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = b"<not xml"
    assert read_kspace(path).kspace.shape == (1, 1, 16, 16)


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
    return path


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


def _npy(path, array):
    np.save(path, array)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: _h5(d / "real.h5", kspace=np.ones((2, 8, 8), np.float32)), r"must be complex.*got float32"),
    (lambda d: _npy(d / "real.npy", np.ones((2, 8, 8))), r"must be complex.*got float64"),
    (lambda d: _h5(d / "flat.h5", kspace=_kspace(8, 8)), r"\(slices, H, W\).*got shape \(8, 8\); add a slice axis"),
    (lambda d: _h5(d / "5d.h5", kspace=_kspace(1, 1, 2, 8, 8)), r"got shape \(1, 1, 2, 8, 8\)"),
    (lambda d: _h5(d / "none.h5", kspace=_kspace(0, 8, 8)), r"k-space is empty"),
    (lambda d: _h5(d / "nan.h5", kspace=np.where(np.eye(8)[None], np.nan, _kspace(1, 8, 8))), r"8 NaN or infinite"),
    (lambda d: _npy(d / "inf.npy", np.full((1, 4, 4), np.inf + 0j)), r"16 NaN or infinite"),
    (lambda d: _h5(d / "mask.h5", kspace=_kspace(1, 8, 12), mask=np.ones(8)), r"mask shape \(8,\) matches neither"),
    (lambda d: _h5(d / "mask0.h5", kspace=_kspace(1, 8, 8), mask=np.zeros(8)), r"mask samples nothing"),
    (lambda d: _h5(d / "other.h5", image=np.ones((8, 8))), r"no 'kspace' dataset \(found: image\)"),
    (lambda d: _file(d / "empty.h5", b""), r"is empty \(0 bytes\)"),
    (lambda d: _file(d / "text.h5", b"hello"), r"is not an HDF5 file"),
    (lambda d: _file(d / "text.npy", b"hello"), r"not a readable \.npy array"),
    (lambda d: _npy(d / "obj.npy", np.array([{}], object)), r"not a readable \.npy array"),
    (lambda d: d / "scan.dat", r"not a k-space file"),
    (lambda d: d / "missing.h5", r"no such file"),
], ids=["real-h5", "real-npy", "2d", "5d", "empty-array", "nan", "inf", "mask-shape", "mask-empty",
        "no-kspace", "empty-file", "not-hdf5", "not-npy", "pickle", "suffix", "missing"])
def test_bad_kspace_gives_one_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as err:
        read_kspace(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_hdf5_is_refused(tmp_path):
    path = write_fastmri_h5(tmp_path / "cut.h5", _kspace(4, 64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or damaged"):
        read_kspace(path)


def test_writer_refuses_bad_kspace_and_leaves_nothing(tmp_path):
    bad = _kspace(1, 8, 8)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_fastmri_h5(tmp_path / "bad.h5", bad)
    assert list(tmp_path.iterdir()) == []
