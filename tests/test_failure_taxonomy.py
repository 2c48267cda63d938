"""The failure taxonomy's last two kinds: partial success with caveats, and out-of-memory tiles
retried on a worker with more memory (the other kinds are pinned in test_engine_run and
test_tile_bad_input)."""
from __future__ import annotations

import dask
import numpy as np
import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster

from conftest import make_release
from helpers_stages import CLASSICAL
from pipeline.cli import main as cli
from pipeline.config import PipelineConfig
from pipeline.execute import EXIT_OK, EXIT_SOME_FAILED, run_release, tile_status
from pipeline.manifest import load_manifest
from pipeline.memory import MEMORY_RESOURCE, grown_spec, is_memory_failure
from pipeline.store import CatalogStore

MB = 1e6


def test_a_stage_caveat_makes_a_partial_tile_that_status_and_summary_report(tmp_path):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=2, size=96, seed=131)
    m = load_manifest(manifest_path)
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:Warn"],
                         stage_config={"warn": {"caveat": "three objects not measured"}})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c, Client(c) as cl:
        s = run_release(m, tmp_path / "out", cfg, cl, progress=False)
        assert s.exit_code == EXIT_OK and s.done == ["t0000", "t0001"] and s.partial == ["t0000", "t0001"]
        assert "PARTIAL t0000: warn: three objects not measured" in s.text()
        st = tile_status(tmp_path / "out")
        assert st["counts"] == {"partial": 2}
        assert st["tiles"]["t0001"]["caveats"] == ["warn: three objects not measured"]
        # a rerun that reuses the stage keeps its caveat; the tile is complete, not redone
        s2 = run_release(m, tmp_path / "out", cfg, cl, tiles=["t0000"], from_stage="warn", progress=False)
        assert s2.partial == ["t0000"]
    assert CatalogStore(tmp_path / "out").is_complete("t0000", cfg.digest())
    out = CliRunner().invoke(cli, ["status", str(tmp_path / "out")])
    assert out.exit_code == 0 and "partial" in out.output and "three objects not measured" in out.output


def test_a_tile_missing_a_band_is_a_partial_success_naming_the_band(tmp_path):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=2, size=96, seed=132)
    import yaml

    raw = yaml.safe_load(manifest_path.read_text())
    del raw["tiles"][1]["files"]["r"]
    manifest_path.write_text(yaml.safe_dump(raw))
    m = load_manifest(manifest_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c, Client(c) as cl:
        s = run_release(m, tmp_path / "out", PipelineConfig(stages=CLASSICAL), cl, progress=False)
    assert s.exit_code == EXIT_OK and s.partial == ["t0001"]
    st = tile_status(tmp_path / "out")
    assert st["tiles"]["t0000"]["status"] == "complete"
    assert st["tiles"]["t0001"]["status"] == "partial"
    assert any("band r missing" in c for c in st["tiles"]["t0001"]["caveats"])


@pytest.fixture
def small_workers():
    """One plain worker of 400 MB (a Nanny: a real process with a real memory limit)."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="400MB",
                          dashboard_address=None) as c, Client(c) as cl:
            yield cl


def test_out_of_memory_tile_is_retried_on_a_worker_with_twice_the_memory(tmp_path, small_workers):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=2, size=96, seed=133)
    m = load_manifest(manifest_path)
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:Hog"], stage_config={"hog": {"need_mb": 600}},
                         retries=0, memory_escalations=2)
    s = run_release(m, tmp_path / "out", cfg, small_workers, progress=False)
    assert s.exit_code == EXIT_OK and s.done == ["t0000", "t0001"], s.text()
    recs = {r["tile"]: r for r in s.records}
    assert recs["t0000"]["memory_escalations"] == 1 and recs["t0000"]["memory_bytes"] == pytest.approx(800 * MB)
    t = CatalogStore(tmp_path / "out").read_table("t0000", "hogtable")
    assert np.all(np.asarray(t["worker_limit"]) == pytest.approx(800 * MB))
    workers = small_workers.scheduler_info(n_workers=-1)["workers"].values()
    assert sorted((w.get("resources") or {}).get(MEMORY_RESOURCE, 0) for w in workers) == [0, 800 * MB]


def test_a_tile_too_big_for_every_escalation_fails_as_out_of_memory_and_the_rest_complete(tmp_path, small_workers):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=2, size=96, seed=134)
    m = load_manifest(manifest_path)
    # t0000 needs 1.5 GB: 400 MB -> 800 MB -> (no third level) fails; t0001 fits from the start
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:Hog"],
                         stage_config={"hog": {"need_mb": 1500, "only_tile": "t0000"}}, retries=0, memory_escalations=1)
    s = run_release(m, tmp_path / "out", cfg, small_workers, tiles=["t0000"], progress=False)
    assert s.exit_code != EXIT_OK
    rec = s.failed["t0000"]
    assert rec["kind"] == "infrastructure" and "out of memory" in rec["error"] and "1 memory escalation" in rec["error"]
    s3 = run_release(m, tmp_path / "out", cfg, small_workers, tiles=["t0000", "t0001"], progress=False)
    assert s3.exit_code == EXIT_SOME_FAILED and list(s3.failed) == ["t0000"] and s3.done == ["t0001"]


@pytest.mark.slow
def test_a_worker_killed_by_its_nanny_for_memory_is_retried_bigger(tmp_path, small_workers):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=1, size=96, seed=135)
    m = load_manifest(manifest_path)
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:Hog"],
                         stage_config={"hog": {"need_mb": 500, "allocate": True}}, retries=0, memory_escalations=2)
    s = run_release(m, tmp_path / "out", cfg, small_workers, progress=False)
    assert s.exit_code == EXIT_OK, s.text()
    assert s.records[0]["memory_escalations"] >= 1


def test_memory_failures_are_recognised():
    from distributed.scheduler import KilledWorker

    assert is_memory_failure(MemoryError("x")) and is_memory_failure(KilledWorker("k", None, 0))
    assert not is_memory_failure(OSError("disk")) and not is_memory_failure(ValueError("bad"))


def test_grown_spec_of_a_slurm_job_asks_slurm_for_the_memory():
    spec = {"cls": object, "options": {"cores": 4, "memory": "8GB", "processes": 4, "worker_extra_args": ["--x"]}}
    g = grown_spec(spec, 16e9)
    assert g["options"]["memory"] == "16000000000B" and g["options"]["processes"] == 1
    assert g["options"]["worker_extra_args"] == ["--x", "--resources", f"{MEMORY_RESOURCE}=16000000000"]
    assert spec["options"]["memory"] == "8GB"  # the original spec is untouched
    n = grown_spec({"cls": object, "options": {"memory_limit": "2GB", "nthreads": 1}}, 4e9)
    assert n["options"]["memory_limit"] == 4000000000 and n["options"]["resources"] == {MEMORY_RESOURCE: 4000000000}
