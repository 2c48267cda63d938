"""A tiny morphology-model training run (a few steps) exports an ONNX model the stage accepts."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("galsim")


@pytest.mark.training
def test_tiny_training_run_exports_a_working_onnx_model(tmp_path):
    from stages.morphology import Morphology, load_stamp_model
    from workflows.train.morphology import main
    from workflows.train.stamps import simulate_release, tile_records

    out = tmp_path / "morph"
    rc = main(["--out", str(out), "--workdir", str(tmp_path / "work"), "--tile-size", "256", "--train-tiles", "1",
               "--val-tiles", "1", "--epochs", "1", "--max-steps", "2", "--batch", "16", "--no-throughput"])
    assert rc == 0
    card = json.loads((out / "card.json").read_text())
    assert card["classes"] == ["star", "spheroid", "disk", "edgeon", "irregular"]
    assert card["inputs"]["input"]["shape"] == ["batch", 3, 32, 32]
    assert card["metrics"]["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert card["normalisation"]["stretch"] == "arcsinh" and set(card["normalisation"]["scale_njy"]) == {"g", "r", "i"}
    _, spec, sess = load_stamp_model(out, "cpu")
    for n in (1, 7):
        p, s = sess.run(["probs", "probs_std"], {"input": np.zeros((n, 3, 32, 32), np.float32)})
        assert p.shape == (n, 5) and s.shape == (n, 5)
    # and the stage runs with it on the training tile
    _, tile, prods, _ = next(tile_records(simulate_release(tmp_path / "work" / "seed1000", 1000, 1, 256, "gri")))
    st = Morphology()
    t = st.run({"exposure": tile, "sky": prods["sky"], "objects": prods["objects"]}, st.Config(model_dir=str(out)))
    assert len(t["morphology"]) == len(prods["objects"])
