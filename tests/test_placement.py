"""Heterogeneous clusters: stages asking for a GPU run on GPU workers, the rest on CPU workers."""
import numpy as np
import pytest
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

from conftest import make_release
from helpers_stages import CLASSICAL
from pipeline.config import PipelineConfig
from pipeline.execute import run_release, segments
from pipeline.manifest import load_manifest
from pipeline.store import CatalogStore


def test_segments_group_consecutive_stages_by_resources():
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:GpuCopy"])
    from pipeline.dag import Dag

    segs = segments(Dag(cfg.load_stages()).order)
    assert len(segs) == 2 and segs[0][0] == {} and segs[1] == ({"GPU": 1}, ["gpucopy"])
    assert {"background", "detection", "photometry"} <= set(segs[0][1])


@pytest.mark.slow
def test_gpu_stage_runs_on_gpu_worker_and_cpu_stages_elsewhere(tmp_path):
    manifest, _ = make_release(tmp_path / "rel", n_tiles=2, size=96)
    m = load_manifest(manifest)
    spec = {"cpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"CPU": 1}}},
            "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    with SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}) as c, Client(c) as cl:
        cl.wait_for_workers(2)
        by_name = cl.run(lambda dask_worker: (dask_worker.name, __import__("os").getpid()))
        pid_of = dict(by_name.values())
        s = run_release(m, tmp_path / "out", PipelineConfig(stages=[CLASSICAL, "helpers_stages:GpuCopy"]), cl, progress=False)
    assert s.exit_code == 0, s.failed
    store = CatalogStore(tmp_path / "out")
    for t in store.tile_ids():
        g = store.read_table(t, "gputable")
        assert set(g["pid"].tolist()) == {pid_of["gpu"]}
        st = store.tile_attrs(t)["stages"]
        assert st["photometry"]["reused"] is True      # made by the CPU task, handed over by checkpoint
        assert not (tmp_path / "out" / ".checkpoints" / t).exists()
    for r in s.records:  # one task per segment: classical stages on the CPU worker, then the GPU one
        assert r["pids"] == [pid_of["cpu"], pid_of["gpu"]]


@pytest.mark.slow
def test_without_gpu_workers_everything_runs_on_cpu_workers(tmp_path):
    manifest, _ = make_release(tmp_path / "rel", n_tiles=2, size=96)
    m = load_manifest(manifest)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c, Client(c) as cl:
        s = run_release(m, tmp_path / "out", PipelineConfig(stages=[CLASSICAL, "helpers_stages:GpuCopy"]), cl, progress=False)
    assert s.exit_code == 0 and len(s.done) == 2
