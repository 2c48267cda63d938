"""Lens report: top candidates of a run -> colour cutouts, SmoothGrad maps and an HTML page."""
from __future__ import annotations

import numpy as np
import pytest

from stages.lenses import SHIPPED_MODEL

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "card.json").exists(), reason="no shipped lens model")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-tile mock release (test seed 103) processed by the classical stages and the lens stage."""
    pytest.importorskip("galsim")
    from pipeline.config import PipelineConfig
    from pipeline.manifest import load_manifest
    from pipeline.runner import process_tile
    from workflows.train.stamps import simulate_release

    root = tmp_path_factory.mktemp("lens_report")
    manifest_path = simulate_release(root / "rel", 103, 1, 384, "gri")
    manifest = load_manifest(manifest_path)
    cfg = PipelineConfig(stages=["stages:CLASSICAL_STAGES", "stages.lenses:Lenses"])
    rec = process_tile(manifest, manifest.tiles[0].id, cfg, str(root / "run"))
    assert rec["status"] == "complete", rec
    return root / "run", manifest_path


def test_report_with_torch_saliency(run_dir, tmp_path):
    pytest.importorskip("torch")
    from PIL import Image

    from workflows.lens_report import main

    run, manifest = run_dir
    out = tmp_path / "report"
    assert main([str(run), "--manifest", str(manifest), "--out", str(out), "--top", "3", "--samples", "4"]) == 0
    page = (out / "index.html").read_text()
    n = page.count("<tr><td>")
    assert 1 <= n <= 3 and "SmoothGrad" in page and "torch gradients" in page
    for k in range(n):
        for kind in ("rgb", "saliency"):
            im = Image.open(out / f"cand_{k:03d}_{kind}.png")
            assert im.size == (192, 192) and im.mode == "RGB"


def test_report_with_onnx_finite_differences(run_dir, tmp_path):
    from workflows.lens_report import main

    run, manifest = run_dir
    out = tmp_path / "report"
    assert main([str(run), "--manifest", str(manifest), "--out", str(out), "--top", "1", "--samples", "1",
                 "--onnx-gradients"]) == 0
    assert "finite differences through ONNX Runtime" in (out / "index.html").read_text()


def test_finite_differences_match_the_torch_gradient():
    """The ONNX fallback estimates the same derivative as autograd (2x2 blocks, all bands together)."""
    torch = pytest.importorskip("torch")

    from pipeline.onnx import run_batched, session
    from stages.morphology import load_stamp_model
    from workflows.lens_report import smoothgrad_onnx, smoothgrad_torch
    from workflows.train.stamps import load_torch_model

    model = load_torch_model(SHIPPED_MODEL)
    card, spec, _ = load_stamp_model(SHIPPED_MODEL, "cpu")
    sess = session(card.onnx_path(SHIPPED_MODEL), device="cpu")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:spec.size, 0:spec.size] - spec.size // 2
    x = (rng.normal(0, 1, (1, spec.channels, spec.size, spec.size)) + 6 * np.exp(-(xx**2 + yy**2) / 20.0)).astype(np.float32)
    t = torch.from_numpy(x.astype(np.float64)).float().requires_grad_(True)
    p, _ = model(t)
    p[0, 1].backward()
    g = t.grad.numpy()[0].sum(axis=0)                                   # d p / d (all bands of a pixel)
    g_block = np.abs(g.reshape(spec.size // 2, 2, spec.size // 2, 2).sum(axis=(1, 3)))
    fd = smoothgrad_onnx(lambda b: run_batched(sess, {"input": b.astype(np.float32)}, outputs=["probs"])[0],
                         x, 1, samples=1, noise=0.0)[0, ::2, ::2]  # the report's own step
    big = g_block > np.percentile(g_block, 75)
    np.testing.assert_allclose(fd[big], g_block[big], rtol=0.25, atol=0.05 * g_block.max())
    sg = smoothgrad_torch(model, x, 1, samples=4, noise=0.1)
    assert sg.shape == (1, spec.size, spec.size) and np.all(sg >= 0) and sg.max() > 0
