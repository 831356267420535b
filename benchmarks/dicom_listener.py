"""End-to-end latency of `medidiff listen`: C-STORE in -> derived series complete in a real Orthanc.

``.venv/bin/python -m benchmarks.dicom_listener [--sizes 1 20 100] [--idle 1]`` from the repository root
(needs Debian's ``orthanc``). One listener (pipeline normalize-preview) and one Orthanc on loopback;
for each study size, a CT study of that many 128x128 slices is pushed by C-STORE, and the clock stops
when Orthanc holds every derived instance. The table splits the time into the push, the idle wait
that declares the study complete, the pipeline run, and the rest (polling, spool, C-STORE out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests import orthanc as pacs


def ct_study(folder: Path, slices: int) -> tuple[str, list[Path]]:
    """One CT series of ``slices`` copies of CT_small.dcm, 1 mm apart; returns (StudyInstanceUID, files)."""
    folder.mkdir(parents=True)
    study, series, paths = generate_uid(), generate_uid(), []
    for i in range(slices):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(i)]
        ds.SliceLocation = float(i)
        paths.append(folder / f"{i:04d}.dcm")
        ds.save_as(paths[-1])
    return study, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 20, 100], help="slices per study")
    parser.add_argument("--idle", type=float, default=1.0, help="the listener's --idle-seconds")
    args = parser.parse_args()
    binary = pacs.orthanc_binary()
    if not binary:
        raise SystemExit("Orthanc is not installed: apt-get install orthanc")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listen_port, pacs_port = pacs.free_port(), pacs.free_port()
        with pacs.orthanc(binary, tmp / "orthanc", pacs_port, listen_port) as url, \
                pacs.listener(tmp, listen_port, f"{pacs.ORTHANC_AE}@127.0.0.1:{pacs_port}", args.idle) as log:
            for n, size in enumerate(args.sizes):
                study_uid, files = ct_study(tmp / f"study{n}", size)
                start = time.perf_counter()
                assert set(pacs.push(files, listen_port)) == {0}
                pushed = time.perf_counter() - start
                expected = {"study_uid": study_uid, "instances": size}
                pacs.wait_for(lambda want=expected: [d for d in pacs.derived_series(url) if d.items() >= want.items()],
                              "the derived series in Orthanc", 600, log)
                total = time.perf_counter() - start
                pipeline = pacs.events(log, "study_done")[-1]["seconds"]
                rows.append((size, pushed, args.idle, pipeline, total - pushed - args.idle - pipeline, total))
    print("| slices | C-STORE in (s) | idle wait (s) | pipeline (s) | spool, polls, C-STORE out (s) | total (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, pushed, idle, pipeline, rest, total in rows:
        print(f"| {size} | {pushed:.2f} | {idle:.1f} | {pipeline:.2f} | {rest:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
