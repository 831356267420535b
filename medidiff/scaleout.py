"""Scale-out of `medidiff batch` on Dask: a LocalCluster of worker processes, or an existing scheduler.

Each study is one Dask task (:func:`medidiff.batch.process_study`, one thread per worker process); the
pipeline and its models are built once per worker process (:func:`medidiff.batch.cached_pipeline`),
not per study. When a worker dies mid-study, the scheduler runs the task again on another worker; the
new attempt replaces the output folder whole, and the batch removes the dead attempt's partial folder.
Local workers get ``PR_SET_PDEATHSIG`` so a killed batch never leaves them running. Workers of a remote
scheduler must see the input and output folders at the same paths (a shared file system).
"""

from __future__ import annotations

import logging

from distributed import WorkerPlugin

from medidiff.errors import InputError

WORKER_START_SECONDS = 600  # each worker process imports torch and MONAI: slow on a busy machine


class DieWithParent(WorkerPlugin):
    """Worker plugin: the worker process is killed when the process that started it dies (Linux)."""

    name = "medidiff-die-with-parent"

    def setup(self, worker) -> None:
        import ctypes
        import os
        import signal
        import sys

        if sys.platform.startswith("linux"):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
            if os.getppid() == 1:  # the parent died before the call above
                os.kill(os.getpid(), signal.SIGKILL)


def _check_reachable(address: str) -> None:
    """Connect to ``tcp://host:port`` once (a dead address fails in a moment, not after Dask's timeout)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or not parts.port:
        raise InputError(f"--scheduler {address!r} is not tcp://host:port")
    socket.create_connection((parts.hostname, parts.port), timeout=5).close()


class DaskExecutor:
    """``workers`` local worker processes (a LocalCluster), or the cluster behind ``scheduler``."""

    def __init__(self, *, workers: int = 1, scheduler: str | None = None):
        self.workers, self.scheduler = workers, scheduler
        self.cluster = self.client = None
        self.capacity = workers

    def __enter__(self) -> DaskExecutor:
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)  # its INFO lines would break the JSON-lines log
        if self.scheduler:
            try:
                _check_reachable(self.scheduler)
                self.client = Client(self.scheduler, timeout=30)
            except OSError as exc:
                raise InputError(f"cannot reach the Dask scheduler {self.scheduler} ({exc}); check --scheduler "
                                 "(tcp://host:port) and that the scheduler is running") from None
            self.capacity = max(1, sum(w["nthreads"] for w in self.client.scheduler_info()["workers"].values()))
        else:
            self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR,
                                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})  # HTTP routes: loopback
            self.client = Client(self.cluster)
            self.client.register_plugin(DieWithParent())
            try:
                self.client.wait_for_workers(self.workers, timeout=WORKER_START_SECONDS)
            except TimeoutError:
                self.__exit__()
                raise InputError(f"{self.workers} Dask worker process(es) did not start within {WORKER_START_SECONDS} s; "
                                 "give fewer --workers or free memory and CPU") from None
        return self

    def __exit__(self, *exc) -> bool:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        return False

    def submit(self, task):
        from medidiff.batch import process_study

        return self.client.submit(process_study, task, pure=False)

    @staticmethod
    def wait(futures, timeout: float) -> set:
        from distributed import wait

        try:
            return set(wait(futures, timeout=timeout, return_when="FIRST_COMPLETED").done)
        except TimeoutError:
            return set()
