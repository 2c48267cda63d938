"""Smoke run of the throughput part of ``surveypipe bench deeplearning`` with the shipped models."""
from __future__ import annotations

import json
import math

import pytest

from workflows.bench import deeplearning

pytest.importorskip("torch")  # the bench compares ONNX Runtime with the PyTorch model each ONNX came from


def test_bench_deeplearning_throughput_times_both_shipped_models(tmp_path, capsys):
    out = tmp_path / "dl"
    assert deeplearning.main(["--skip", "morphology", "--skip", "lenses", "--throughput-stamps", "128",
                              "--out", str(out)]) == 0
    assert "ORT/torch" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())["throughput"]
    assert set(res) == {"morphology", "lenses"}
    for name, r in res.items():
        for key in ("cutouts_per_s", "onnxruntime_per_s", "torch_per_s", "end_to_end_onnx_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["end_to_end_onnx_per_s"] < min(r["cutouts_per_s"], r["onnxruntime_per_s"])


TINY_LENS_BENCH = ["--skip", "morphology", "--skip", "throughput", "--negatives", "300", "--lenses", "60", "--hard", "4",
                   "--field", "256", "--jobs", "1", "--bootstrap", "50"]


def test_lens_bench_saves_its_scores_and_compares_two_runs_stamp_by_stamp(tmp_path, capsys):
    import numpy as np

    first = tmp_path / "first"
    assert deeplearning.main(TINY_LENS_BENCH + ["--out", str(first)]) == 0
    res = json.loads((first / "results.json").read_text())["lenses"]
    lo, hi = res["theta_e_gt_1.4_snr_gt_20"]["tpr_at_fpr_0.001_interval95"]
    assert lo <= res["theta_e_gt_1.4_snr_gt_20"]["tpr_at_fpr_0.001"] <= hi
    with np.load(first / deeplearning.LENS_SCORES) as f:
        saved = {k: f[k] for k in f.files}
    assert saved["label"].sum() == 60 and (saved["label"] == 0).sum() == 300 + 4 * 6
    # the stage's scores: the full model's where the screen sent the stamp on, the screen's (below its threshold) elsewhere
    from pipeline.modelcard import load_card
    from stages.lenses import SHIPPED_MODEL

    screen = load_card(SHIPPED_MODEL).screen
    on = saved["rescored"].astype(bool)
    assert np.array_equal(saved["score"][on], saved["score_full"][on])
    if screen:
        assert (saved["score"][~on] < screen["threshold"]).all() and on[saved["label"] == 1].mean() > 0.9
        assert set(res["screen"]) >= {"rescored_fraction", "restricted_tpr_at_fpr_0.001"}

    # the same model on the same stamps: every paired difference is exactly zero
    second = tmp_path / "second"
    assert deeplearning.main(TINY_LENS_BENCH + ["--out", str(second), "--compare-lens-scores",
                                                str(first / deeplearning.LENS_SCORES)]) == 0
    diff = json.loads((second / "results.json").read_text())["lenses"]["paired_difference"]
    assert {k: v for k, v in diff.items() if "tpr" in k} == {
        f"{m}_tpr_at_fpr_{f}": [0.0, 0.0, 0.0] for m in ("all", "restricted") for f in ("0.01", "0.001")}

    # scores of other stamps are refused, naming the file and the reason
    saved["theta_e"] = saved["theta_e"] + 0.1
    other = tmp_path / "other.npz"
    np.savez(other, **saved)
    capsys.readouterr()
    assert deeplearning.main(TINY_LENS_BENCH + ["--out", str(tmp_path / "third"), "--compare-lens-scores", str(other)]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and "stamps differ" in err


def test_lens_bench_takes_validation_seeds_only_when_asked(tmp_path, capsys):
    import numpy as np

    assert deeplearning.main(TINY_LENS_BENCH + ["--lens-seed", "2400", "--out", str(tmp_path / "refused")]) == 2
    assert "2400" in capsys.readouterr().err
    out = tmp_path / "validation"
    assert deeplearning.main(TINY_LENS_BENCH + ["--lens-seed", "2400", "--seed-purpose", "validation", "--out", str(out)]) == 0
    with np.load(out / deeplearning.LENS_SCORES) as f:
        assert f["label"].sum() == 60 and np.isfinite(f["score"]).all()
