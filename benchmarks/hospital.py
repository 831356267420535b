"""Hospital integration on this machine: `medidiff batch` throughput with 1 and 2 Dask workers, end-to-end
latency of `medidiff listen` (C-STORE in -> derived series in Orthanc), memory per worker.

``.venv/bin/python -m benchmarks.hospital [--studies 4] [--pipeline bone-suppression]`` from the repository
root (needs Debian's ``orthanc``). The studies are copies of the bundled sample radiograph
(datasets/samples/chest-dx-sample) with fresh UIDs. Throughput counts the studies done between the first
study's start and the batch's end (so each worker's one pipeline build is inside it; the cluster's start is
not); memory is the peak resident set of each Dask worker process, sampled every 0.2 s. Dask starts its
workers with one BLAS/OpenMP thread each, so N workers use N cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pydicom
from pydicom.uid import generate_uid

from tests import orthanc as pacs
from tests.cli_runner import CLI

SAMPLE = Path("datasets/samples/chest-dx-sample/cxr-3000000.dcm")
DESCRIPTIONS = {"bone-suppression": "medidiff BS-LDM soft tissue", "normalize-preview": pacs.DERIVED_DESCRIPTION}


def sample_studies(folder: Path, count: int) -> list[Path]:
    """``count`` one-image studies: the sample radiograph with fresh study/series/instance UIDs."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        ds = pydicom.dcmread(SAMPLE)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"study{i:02d}.dcm")
        ds.save_as(paths[-1])
    return paths


def batch_run(pipeline: str, inputs: Path, output: Path, workers: int) -> dict:
    """One `medidiff batch` in a subprocess: studies per minute, seconds per study, peak RSS per worker (MiB)."""
    process = subprocess.Popen([*CLI, "batch", pipeline, str(inputs), "-o", str(output), "--workers", str(workers)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        parent = psutil.Process(process.pid)
        while not done.is_set():
            try:
                for child in parent.children(recursive=True):
                    if "distributed" in " ".join(child.cmdline()) or "multiprocessing" in " ".join(child.cmdline()):
                        peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stamped = [(time.perf_counter(), json.loads(line)) for line in process.stderr if line.startswith("{")]
    done.set()
    assert process.wait() == 0, stamped
    first = min(t for t, e in stamped if e["event"] == "study_started")
    end = max(t for t, e in stamped if e["event"] == "batch_finished")
    finished = [e for _, e in stamped if e["event"] == "study_done"]
    worker_peaks = sorted(peaks.values(), reverse=True)[:workers]
    return {"workers": workers, "studies": len(finished), "per_minute": 60 * len(finished) / (end - first),
            "seconds_per_study": sum(e["seconds"] for e in finished) / len(finished),
            "rss_mib": [round(p / 2**20) for p in worker_peaks]}


def listener_latency(pipeline: str, studies: list[Path], tmp: Path) -> list[float]:
    """Seconds from the start of each study's C-STORE to its derived series in Orthanc, one study at a time."""
    binary = pacs.orthanc_binary()
    if not binary:
        raise SystemExit("Orthanc is not installed: apt-get install orthanc")
    latencies = []
    listen_port, pacs_port = pacs.free_port(), pacs.free_port()
    with pacs.orthanc(binary, tmp / "orthanc", pacs_port, listen_port) as url, \
            pacs.listener(tmp, listen_port, f"{pacs.ORTHANC_AE}@127.0.0.1:{pacs_port}", 1.0, pipeline) as log:
        for path in studies:
            uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
            start = time.perf_counter()
            assert pacs.push([path], listen_port) == [0]
            pacs.wait_for(lambda uid=uid: [d for d in pacs.derived_series(url, DESCRIPTIONS[pipeline])
                                           if d["study_uid"] == uid], "the derived series in Orthanc", 900, log)
            latencies.append(time.perf_counter() - start)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4, help="studies per batch run")
    parser.add_argument("--pipeline", default="bone-suppression", choices=sorted(DESCRIPTIONS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample_studies(tmp / "in", args.studies)
        rows = [batch_run(args.pipeline, tmp / "in", tmp / f"out{workers}", workers) for workers in (1, 2)]
        latencies = listener_latency(args.pipeline, sample_studies(tmp / "pushed", 2), tmp)
    print(f"pipeline {args.pipeline}, {args.studies} one-radiograph studies per batch\n")
    print("| Dask workers | studies/min | s per study (in the worker) | peak RSS per worker (MiB) |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['workers']} | {row['per_minute']:.2f} | {row['seconds_per_study']:.1f} | "
              f"{', '.join(map(str, row['rss_mib']))} |")
    print(f"\nscaling 1 -> 2 workers: {rows[1]['per_minute'] / rows[0]['per_minute']:.2f}x")
    print(f"listener, C-STORE in -> derived series in Orthanc (idle 1 s): first study {latencies[0]:.1f} s, "
          f"second {latencies[1]:.1f} s")


if __name__ == "__main__":
    main()
