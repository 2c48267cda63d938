"""Smoke run of ``surveypipe bench performance`` on a tiny release (test seeds): the scaling table,
its independent-process control, the small-tiles run and the per-stage memory all come out."""
from __future__ import annotations

import json

import pytest

from workflows.bench import performance, sextractor


@pytest.mark.slow
def test_bench_performance_smoke_reports_scaling_with_its_machine_control(tmp_path, capsys):
    out = tmp_path / "perf"
    args = ["--tiles", "4", "--size", "256", "--bands", "gri", "--seed", "160", "--seed-purpose", "test",
            "--small-tiles", "2", "--small-size", "128", "--no-models", "--out", str(out)]
    assert performance.main(args) == 0
    text = capsys.readouterr().out
    assert "scaling (efficiency" in text and "independent one-worker processes" in text
    res = json.loads((out / "performance.json").read_text())
    one, two = res["runs"]["1"], res["runs"]["2"]
    tiles = {"t0000", "t0001", "t0002", "t0003"}
    assert set(one["tile_s"]) == set(two["tile_s"]) == tiles
    assert 0 < two["efficiency"] <= 2.5 and one["wall_s"] > 0
    # each shard's first tile pays the imports and is left out: one tile per shard remains
    ind = two["independent_tile_s"]
    assert len(ind) == 2 and set(ind) < tiles and all(v > 0 for v in ind.values())
    assert two["machine_ceiling"] > 0
    assert res["small_tiles"]["task_s"] > 0
    for stage in ("background", "detection", "deblending", "photometry"):
        st = one["stages"][stage]
        assert st["seconds"] > 0 and 0 < st["first_tile_peak_rss_mb"] <= st["peak_rss_mb"]
    assert 0 < one["first_tile_peak_rss_mb"] <= max(one["peak_rss_mb"])
    if sextractor.executable():  # SExtractor runs on our detection image: it finds the objects we find
        ours, sex = res["our_detections"], res["sextractor_objects"]
        assert ours > 20 and abs(sex - ours) <= 0.1 * ours
        assert res["sextractor_s"] > 0 and res["ratio_pipeline"] > res["ratio_classical"] > 0
        steady = res["steady_state"]  # one worker: every tile but its first
        assert len(steady["tiles"]) == 3 and steady["ratio_pipeline"] > steady["ratio_classical"] > 0


def test_bench_performance_refuses_a_training_seed(tmp_path):
    with pytest.raises(ValueError):
        performance.main(["--seed", "1000", "--out", str(tmp_path)])
