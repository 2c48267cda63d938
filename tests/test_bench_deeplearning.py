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
