"""Per-phase peak memory: each stage's own high-water mark, and the worker's lifetime peak."""
from __future__ import annotations

import os

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
