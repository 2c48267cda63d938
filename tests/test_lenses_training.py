"""A tiny lens-model training run (a few steps) exports an ONNX model the stage accepts."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("lenstronomy")


@pytest.mark.training
def test_tiny_training_run_exports_a_working_onnx_model(tmp_path):
    from stages.lenses import Lenses
    from stages.morphology import load_stamp_model
    from workflows.train.lenses import main
    from workflows.train.stamps import LensSet, lens_sets, make_spec

    t0 = time.perf_counter()
    out = tmp_path / "lenses"
    rc = main(["--out", str(out), "--scale", "0.002", "--field", "256", "--pool", "2048", "--epochs", "1",
               "--max-steps", "2", "--batch", "16", "--no-throughput", "--workdir", str(tmp_path / "work")])
    assert rc == 0
    card = json.loads((out / "card.json").read_text())
    assert card["classes"] == ["nonlens", "lens"] and card["bands"] == ["g", "r", "i"]
    assert card["inputs"]["input"]["shape"] == ["batch", 3, 48, 48]
    assert card["metrics"]["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert card["training"]["seed"] == 1100 and card["training"]["net"]["mc_samples"] == 16
    # the stage's loader accepts it and the exported graph takes any batch size
    c, spec, sess = load_stamp_model(out, "cpu")
    for n in (1, 5):
        p, s = sess.run(["probs", "probs_std"], {"input": np.zeros((n, 3, 48, 48), np.float32)})
        assert p.shape == (n, 2) and s.shape == (n, 2)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert Lenses.Config(model_dir=str(out)).model_dir == str(out)
    assert time.perf_counter() - t0 < 120  # ~10 s of CPU on an idle core; generous for shared CI machines
