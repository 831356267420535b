"""CT denoising of a whole series, end to end: seconds for ``medidiff run`` on a 133-slice 512x512 CT.

``python benchmarks/ct_series.py [--methods regression one_step resshift] [--slices 133] [--repeats 1]``
writes a low-dose chest CT as a DICOM CT series in a temporary folder: the simulated low-dose slices
of the training CT (``ct_training_cache``; this times the product, it is not a quality result). It
then runs the ``ct-denoising`` pipeline on it once per method, as a user would: a new ``medidiff run``
process with torch's default threads (reading, the model on every slice, the derived DICOM series and
the PNG panel). It prints whole-process seconds, seconds per slice and the ratio against the first
method, all from one run. Needs ``make drr-data`` (the chest CT); the low-dose cache is built on first
use (about 7 minutes).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def write_ct_series(folder: Path, slices: int) -> int:
    """The first ``slices`` low-dose training slices (full dose, int16 HU) as one CT series; returns the count."""
    from medidiff.datasets.drr import chest_ct_dir, read_chest_ct
    from medidiff.datasets.restoration_images import CT_DOSE_FACTORS, ct_training_cache

    _, noisy = ct_training_cache()
    hu = noisy[CT_DOSE_FACTORS.index(1.0), :slices]
    _, _, (dz, dy, dx) = read_chest_ct(chest_ct_dir())
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for z, image in enumerate(hu):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientName, ds.PatientID = "Benchmark^Series", "ct-series-benchmark"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns = image.shape
        ds.PixelSpacing, ds.SliceThickness = [dy, dx], dz
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-dx * image.shape[1] / 2, -dy * image.shape[0] / 2, z * dz]
        ds.SliceLocation, ds.InstanceNumber = z * dz, z + 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(image, np.int16).tobytes()
        ds.save_as(folder / f"slice_{z:03d}.dcm")
    return len(hu)


def run_seconds(pipeline: Path, series: Path, output: Path, slices: int) -> float:
    """Whole-process seconds of ``medidiff run PIPELINE SERIES -o OUTPUT``, which must write all ``slices``."""
    start = time.perf_counter()
    subprocess.run([shutil.which("medidiff") or "medidiff", "run", str(pipeline), str(series), "-o", str(output),
                    "--no-progress"], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    written = len(list(output.glob("*/*/dicom/*.dcm")))
    if written != slices:
        raise SystemExit(f"{pipeline.name}: wrote {written} of {slices} slices; see {output}/report.txt")
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["regression", "one_step"])
    p.add_argument("--slices", type=int, default=133)
    p.add_argument("--repeats", type=int, default=1, help="runs per method (the median is printed)")
    a = p.parse_args(argv)
    from medidiff.resources import pipeline_file

    base = yaml.safe_load(pipeline_file("ct-denoising").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = write_ct_series(tmp / "series", a.slices)
        seconds = {}
        for method in a.methods:
            pipeline = tmp / f"ct-denoising-{method}.yaml"
            pipeline.write_text(yaml.safe_dump({**base, "stages": [{"denoise": {"method": method}}]}))
            runs = [run_seconds(pipeline, tmp / "series", tmp / f"out-{method}-{k}", count) for k in range(a.repeats)]
            seconds[method] = float(np.median(runs))
    first = a.methods[0]
    print(f"ct-denoising on a {count}-slice 512x512 CT series, whole `medidiff run` process "
          f"(median of {a.repeats})\n")
    print(f"| method | seconds | s / slice | vs {first} |")
    print("|---|---:|---:|---:|")
    for method, s in seconds.items():
        print(f"| {method} | {s:.1f} | {s / count:.2f} | {s / seconds[first]:.2f}x |")


if __name__ == "__main__":
    main()
