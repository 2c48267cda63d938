"""Nothing lost: a killed run resumes to the same catalogue; results do not depend on workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from distributed import Client, LocalCluster

from conftest import make_release
from helpers_stages import CLASSICAL
from pipeline.config import PipelineConfig
from pipeline.execute import run_release
from pipeline.manifest import load_manifest
from pipeline.store import CatalogStore

TESTS = Path(__file__).parent
SURVEYPIPE = [sys.executable, "-m", "pipeline.cli"]


def catalogue(out: Path) -> dict[str, dict[str, np.ndarray]]:
    store = CatalogStore(out)
    return {t: {p: store.read_table(t, p).columns for p in ("objects", "slowtable") if p in store.stored_products(t)}
            for t in store.tile_ids()}


def assert_same_catalogue(a: Path, b: Path) -> None:
    ca, cb = catalogue(a), catalogue(b)
    assert sorted(ca) == sorted(cb), "same tiles"
    for t in ca:
        for prod, cols in ca[t].items():
            assert list(cols) == list(cb[t][prod])
            for c in cols:
                assert cols[c].tobytes() == cb[t][prod][c].tobytes(), f"{t}/{prod}/{c} differs"


def run_cli(manifest: Path, out: Path, config: Path, workers: int = 2, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen(SURVEYPIPE + ["run", str(manifest), "--out", str(out), "--workers", str(workers),
                                          "--config", str(config), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


@pytest.mark.slow
def test_sigkill_whole_run_at_random_points_then_resume_equals_clean_run(tmp_path):
    manifest, _ = make_release(tmp_path / "rel", n_tiles=6, size=96)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"stages": [CLASSICAL, "helpers_stages:Slow"], "stage_config": {"slow": {"seconds": 0.7}}}))
    clean = tmp_path / "clean"
    p = run_cli(manifest, clean, cfg)
    out_text = p.communicate(timeout=180)[0].decode()
    assert p.returncode == 0, out_text

    victim = tmp_path / "victim"
    rng = np.random.default_rng(7)
    for delay in sorted(rng.uniform(3.0, 6.0, 3)):
        p = run_cli(manifest, victim, cfg)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGKILL)  # the client, the scheduler and every worker at once
        p.wait()
        # readers never see a half tile: every visible tile group is complete
        store = CatalogStore(victim)
        for t in store.tile_ids():
            assert store.is_complete(t)
            assert len(store.read_table(t, "slowtable")) == len(store.read_table(t, "objects"))
    p = run_cli(manifest, victim, cfg)
    text = p.communicate(timeout=180)[0].decode()
    assert p.returncode == 0, text
    assert_same_catalogue(clean, victim)


@pytest.mark.slow
def test_byte_identical_catalogue_across_worker_counts(tmp_path):
    manifest, _ = make_release(tmp_path / "rel", n_tiles=3, size=96)
    m = load_manifest(manifest)
    outs = []
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as c, Client(c) as cl:
            out = tmp_path / f"w{n}"
            assert run_release(m, out, PipelineConfig(stages=CLASSICAL), cl, progress=False).exit_code == 0
            outs.append(out)
    assert_same_catalogue(*outs)


@pytest.mark.slow
def test_many_workers_committing_small_tiles_leave_store_complete(tmp_path):
    manifest, truth = make_release(tmp_path / "rel", n_tiles=24, size=48, n_src=2, bands=("r",))
    m = load_manifest(manifest)
    with LocalCluster(n_workers=4, threads_per_worker=2, processes=True, dashboard_address=None) as c, Client(c) as cl:
        s = run_release(m, tmp_path / "out", PipelineConfig(stages=CLASSICAL), cl, progress=False)
    assert s.exit_code == 0 and len(s.done) == 24
    store = CatalogStore(tmp_path / "out")
    assert store.tile_ids() == sorted(truth)
    assert not list((tmp_path / "out" / ".staging").iterdir()), "no staging leftovers after a clean run"
    ids = np.concatenate([store.read_table(t, "objects")["objectId"] for t in store.tile_ids()])
    assert len(ids) == len(np.unique(ids))
