"""Per-phase peak memory: each stage's own high-water mark, and the worker's lifetime peak."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_release
from helpers_stages import CLASSICAL
from pipeline.config import PipelineConfig
from pipeline.manifest import load_manifest
from pipeline.rss import lifetime_peak_mb, phase_peak
from pipeline.runner import process_tile

needs_reset = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                 reason="the kernel's high-water mark cannot be reset here (not Linux)")


@needs_reset
def test_a_phase_reports_its_own_peak_not_an_earlier_one():
    with phase_peak() as big:
        block = np.ones(300 * 2**20, np.uint8)
        del block
    with phase_peak() as small:
        np.ones(2**20, np.uint8).sum()
    assert big.peak_mb is not None and small.peak_mb is not None
    assert big.peak_mb - small.peak_mb > 250  # the reset forgot the first phase's 300 MB
    assert lifetime_peak_mb() >= big.peak_mb  # ... but the lifetime peak did not


@needs_reset
def test_the_runner_records_each_stage_peak_and_the_worker_peak(tmp_path):
    manifest, _ = make_release(tmp_path / "release", n_tiles=1)
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:Touch"], stage_config={"touch": {"mb": 500}})
    rec = process_tile(load_manifest(manifest), "t0000", cfg, str(tmp_path / "out"))
    assert rec["status"] == "complete", rec
    st = rec["stages"]
    assert st["touch"]["peak_rss_mb"] - st["photometry"]["peak_rss_mb"] > 300  # 500 MiB touched
    assert rec["read_peak_rss_mb"] > 0 and rec["write_peak_rss_mb"] > 0
    assert rec["maxrss_mb"] >= st["touch"]["peak_rss_mb"]


def test_the_exposure_is_freed_once_no_later_stage_reads_it(tmp_path, monkeypatch):
    """The engine drops a tile's planes (and transient products) after their last reader: the
    stages after photometry and the write do not carry the exposure."""
    import weakref

    import helpers_stages
    import pipeline.runner as runner

    loaded = []

    def tracking_load(*a, **k):
        tile = runner.load_tile.__wrapped__(*a, **k)
        helpers_stages.EXPOSURES.append(weakref.ref(tile))
        loaded.append(tile.tile_id)
        return tile

    tracking_load.__wrapped__ = runner.load_tile
    monkeypatch.setattr(runner, "load_tile", tracking_load)
    monkeypatch.setattr(helpers_stages, "EXPOSURES", [])
    monkeypatch.setattr(helpers_stages, "EXPOSURE_ALIVE", [])
    manifest, _ = make_release(tmp_path / "release", n_tiles=1)
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:ExposureProbe"])
    rec = process_tile(load_manifest(manifest), "t0000", cfg, str(tmp_path / "out"))
    assert rec["status"] == "complete", rec
    assert loaded == ["t0000"] and helpers_stages.EXPOSURE_ALIVE == [False]
    # ... and nothing the commit needs of it was lost
    from pipeline.store import CatalogStore
    attrs = CatalogStore(tmp_path / "out").tile_attrs("t0000")
    assert len(attrs["inputs"]["sha256"]) == len(attrs["bands"]) > 0 and len(attrs["shape"]) == 2


HEAP_PROBE = """
import gc, os, sys
import numpy as np
from pipeline.cluster import tune_malloc
from pipeline.rss import release_free_heap
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
tune_malloc(32 << 20)  # as in a worker: blocks under 32 MiB come from the heap and stay there when freed
big, small = [], []
for _ in range(48):  # 48 x 8 MB, touched, each followed by a small live block: freed, they leave holes
    big.append(np.ones(1 << 20))
    small.append(np.ones(512))
del big
gc.collect()
before = rss_mb()
done = release_free_heap()
print(done, before - rss_mb())
"""


@pytest.mark.parametrize("setting", ["1", "0"])
def test_release_free_heap_hands_a_freed_tiles_worth_of_heap_back(setting):
    import subprocess
    import sys

    if not Path("/proc/self/statm").exists():
        pytest.skip("/proc needed to read the resident set")
    env = {**os.environ, "SURVEYPIPE_MALLOC_TRIM": setting}
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True, check=True)
    done, freed_mb = out.stdout.split()
    if setting == "1":
        assert done == "True" and float(freed_mb) > 200, f"of 384 MB freed, {freed_mb} MB went back"
    else:
        assert done == "False" and float(freed_mb) < 50, "SURVEYPIPE_MALLOC_TRIM=0 turns the release off"
