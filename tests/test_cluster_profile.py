"""Workers of a LocalCluster run without Dask's statistical profiler (it costs ~3 % of the stage CPU
time on tile tasks) unless asked for; the rest of Dask's config reaches them unchanged."""
from __future__ import annotations

import time

import dask

from pipeline.cluster import connect, local_cluster


def _busy_python(seconds: float = 0.6) -> int:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        n += 1
    return n


def _samples_and_config(profile: bool) -> tuple[int, dict, str]:
    cluster = local_cluster(1, dashboard=False, profile=profile)
    client = connect(cluster)
    try:
        client.submit(_busy_python, pure=False).result()
        samples = next(iter(client.run(lambda dask_worker: dask_worker.profile_recent.get("count", 0)).values()))
        limits = next(iter(client.run(lambda: dask.config.get("distributed.worker.memory")).values()))
        loop = next(iter(client.run(lambda: dask.config.get("distributed.admin.event-loop")).values()))
    finally:
        client.close()
        cluster.close()
    return samples, limits, loop


def test_worker_profiler_is_off_by_default_and_on_when_asked():
    off, limits, loop = _samples_and_config(False)
    on, _, _ = _samples_and_config(True)
    assert off == 0
    assert on > 10  # 0.6 s of Python sampled every 10 ms
    # the override is merged into Dask's config, not put in its place
    assert limits == dask.config.get("distributed.worker.memory")
    assert loop == dask.config.get("distributed.admin.event-loop")
