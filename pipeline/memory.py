"""Out-of-memory escalation: a tile that died of memory is retried on a worker with more of it.

A tile whose task raised ``MemoryError``, or whose worker was killed (the nanny terminates a
worker past its memory limit; after the scheduler's ``allowed-failures`` the task fails with
``KilledWorker``), is not worth retrying on a worker of the same size. The engine resubmits it
asking for the abstract Dask resource ``MEMORY`` (bytes) = 2**k x the largest worker limit, and
asks the cluster for such a worker if none advertises it:

* a LocalCluster (any ``SpecCluster`` of Nannies) gets one more worker process with that
  ``memory_limit``;
* a dask-jobqueue cluster (``SLURMCluster``) gets one more job of one worker process whose job
  memory (``--mem``) is that size.

The extra worker advertises ``MEMORY=<bytes>``, so only escalated tiles need to go there, and it
stays for the rest of the run (a second escalated tile reuses it).
"""
from __future__ import annotations

import copy
import logging
from typing import Any

MEMORY_RESOURCE = "MEMORY"
log = logging.getLogger("surveypipe")


def is_memory_failure(exc: BaseException) -> bool:
    """True for a task that failed because it ran out of memory (raised, or its worker killed)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        KilledWorker = ()  # type: ignore[assignment]
    return isinstance(exc, KilledWorker) or "MemoryError" in type(exc).__name__


def worker_memory(client: Any) -> dict[str, dict[str, float]]:
    """Per worker address: its ``memory_limit`` (bytes, 0 = none) and advertised ``MEMORY``."""
    info = client.scheduler_info(n_workers=-1).get("workers", {})
    return {addr: {"limit": float(w.get("memory_limit") or 0),
                   "advertised": float((w.get("resources") or {}).get(MEMORY_RESOURCE, 0))}
            for addr, w in info.items()}


def base_memory(client: Any) -> float:
    """The largest plain worker's memory limit (bytes): the size a tile first ran with; 0 = unlimited."""
    mem = list(worker_memory(client).values())
    plain = [m for m in mem if not m["advertised"]] or mem  # escalation workers of an earlier run don't count
    return max((m["limit"] for m in plain), default=0.0)


def grown_spec(spec: dict[str, Any], need: float) -> dict[str, Any]:
    """A worker spec like ``spec`` (a SpecCluster's ``new_spec``) with ``need`` bytes of memory,
    one worker process, advertising ``MEMORY=need``."""
    out = {"cls": spec["cls"], "options": copy.copy(spec.get("options", {}))}
    opts = out["options"]
    if "memory" in opts or "cores" in opts:  # a dask-jobqueue job: the job's memory is the worker's
        opts["memory"] = f"{int(need)}B"
        opts["processes"] = 1
        opts["worker_extra_args"] = [*(opts.get("worker_extra_args") or []), "--resources",
                                     f"{MEMORY_RESOURCE}={int(need)}"]
    else:  # a Nanny (LocalCluster)
        opts["memory_limit"] = int(need)
        opts["resources"] = {**(opts.get("resources") or {}), MEMORY_RESOURCE: int(need)}
    return out


def ensure_memory_worker(client: Any, need: float, *, timeout: float = 300.0) -> bool:
    """Make sure some worker advertises ``MEMORY >= need``; start one if the cluster can. Returns
    whether one is there (False: the cluster is not ours to grow, e.g. a remote scheduler)."""
    if any(m["advertised"] >= need for m in worker_memory(client).values()):
        return True
    cluster = getattr(client, "cluster", None)
    spec = getattr(cluster, "new_spec", None)
    if cluster is None or not spec or not hasattr(cluster, "worker_spec"):
        log.warning("cannot start a worker with %.2f GB: the cluster is not a SpecCluster", need / 1e9)
        return False
    name = f"surveypipe-mem-{int(need)}"
    if name not in cluster.worker_spec:
        log.warning("out of memory: starting a worker with %.2f GB for the tiles that need it", need / 1e9)
        cluster.worker_spec[name] = grown_spec(spec, need)
        cluster.sync(cluster._correct_state)
    import time

    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if any(m["advertised"] >= need for m in worker_memory(client).values()):
            return True
        time.sleep(0.2)
    log.warning("no worker with %.2f GB joined within %.0f s", need / 1e9, timeout)
    return False
