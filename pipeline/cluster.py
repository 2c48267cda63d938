"""Dask clusters: a LocalCluster sized to the machine by default, per-worker setup as a plugin."""
from __future__ import annotations

import logging
import os
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin

log = logging.getLogger("surveypipe")


MALLOC_THRESHOLD = 32 * 2**20  # bytes: see tune_malloc


def tune_malloc(threshold: int | None = None) -> bool:
    """Set glibc's mmap and trim thresholds to ``threshold`` in this process (no-op elsewhere).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins the mmap
    threshold at 128 KiB: every array above that is mmapped and unmapped again, and the stages'
    many large temporaries page-fault on each use -- measured 45 % slower photometry on a 2048^2
    tile. Measured on three 2048^2 x 6-band tiles in one process: 32 MiB, 62 CPU-s and 1720 MB
    peak; 8 MiB, 80 CPU-s and 1265 MB (Dask's setting: slower still). ``SURVEYPIPE_MALLOC_THRESHOLD``
    (bytes) overrides the default of 32 MiB where memory is tighter than CPU time.
    """
    if threshold is None:
        threshold = int(os.environ.get("SURVEYPIPE_MALLOC_THRESHOLD", MALLOC_THRESHOLD))
    from .rss import glibc

    libc = glibc()
    if libc is None:
        return False
    try:
        m_trim, m_mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
        return bool(libc.mallopt(m_mmap, threshold)) and bool(libc.mallopt(m_trim, threshold))
    except AttributeError:
        return False


def limit_math_threads(n: int = 1) -> Any:
    """Limit the BLAS/OpenMP pools of this process to ``n`` threads, now; the returned object is also
    a context that restores them on exit (a no-op without threadpoolctl). Workers call it once;
    benchmarks that time stages in their own process wrap the stages in it, so they measure what a
    worker runs."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(n)


class SurveypipeWorkerSetup(WorkerPlugin):
    """Owns per-worker settings: zarr's async concurrency, single-threaded math libraries and
    glibc's allocator thresholds (:func:`tune_malloc`).

    Under Dask, zarr's own concurrency multiplies with worker threads; one tile per worker
    process is the unit of parallelism, so inner pools are kept small.
    """

    name = "surveypipe-setup"

    def __init__(self, zarr_concurrency: int = 4, threads: int = 1) -> None:
        self.zarr_concurrency = zarr_concurrency
        self.threads = threads

    def setup(self, worker: Any) -> None:  # pragma: no cover - runs in the worker process
        import zarr

        zarr.config.set({"async.concurrency": self.zarr_concurrency})
        tune_malloc()
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(self.threads))
        limit_math_threads(self.threads)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# Dask's statistical profiler samples every worker thread's stack every 10 ms for the dashboard's
# Profile page. On a tile task (seconds of mixed numpy and Python) it cost 3 % of the stage CPU time:
# 6 alternating runs of 4 tiles on 2 workers, lower with it off in all 6 (docs/performance.md).
# A batch pipeline runs without it; ``profile=True`` (``surveypipe run --worker-profile``) turns it on.
WORKER_PROFILE_ENV = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"


def worker_profile_config(profile: bool) -> dict[str, Any]:
    """The ``distributed`` config a Nanny hands its worker, with the statistical profiler on or off.

    Whole, not a fragment: the Nanny merges its ``config`` into Dask's one level deep only."""
    import dask.config

    return {"distributed": dask.config.merge(dask.config.get("distributed"),
                                             {"worker": {"profile": {"enabled": bool(profile)}}})}


def local_cluster(workers: int | None = None, *, memory_limit: str | None = "auto", dashboard: bool = True,
                  profile: bool = False) -> LocalCluster:
    """One single-threaded worker process per core (tiles are the unit of parallelism); Dask's
    worker profiler off unless ``profile``."""
    n = workers or default_workers()
    for noisy in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny", "bokeh"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, memory_limit=memory_limit,
        dashboard_address=":0" if dashboard else None, silence_logs=logging.ERROR,
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        config=worker_profile_config(profile),
    )


def connect(cluster: Any) -> Client:
    client = Client(cluster)
    client.register_plugin(SurveypipeWorkerSetup())
    return client
