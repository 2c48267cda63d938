"""A tiny lens-model training run (a few steps) exports an ONNX model the stage accepts."""
from __future__ import annotations

import json

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


def test_colour_residual_pairs_parse_band_names():
    from workflows.train.lenses import colour_residual_pairs

    assert colour_residual_pairs("g-i,r-i", "gri") == [[0, 2], [1, 2]]
    assert colour_residual_pairs("none", "gri") == []
    with pytest.raises(ValueError):
        colour_residual_pairs("g-z", "gri")


def test_colour_residual_planes_remove_the_deflector_colour_and_export_to_onnx(tmp_path):
    import torch

    from workflows.train.stamps import NET_KWARGS, export_stamp_model, make_spec, stamp_net

    torch.manual_seed(0)
    plain = stamp_net(3, 2, **NET_KWARGS)
    assert plain.with_residuals(torch.zeros(1, 3, 48, 48)).shape[1] == 3      # default (morphology): unchanged
    net = stamp_net(3, 2, **{**NET_KWARGS, "tta": 8, "colour_residual": [[0, 2], [1, 2]]})
    net.eval()
    # a red "deflector" (g = 0.4 i, r = 0.7 i in sky-sigma units) plus a blue arc only in g
    yy, xx = np.mgrid[:48, :48] - 24.0
    gal = 300.0 * np.exp(-0.5 * (xx**2 + yy**2) / 9.0)
    arc = 5.0 * np.exp(-0.5 * ((np.hypot(xx, yy) - 9.0) / 1.0) ** 2)
    flux = np.stack([0.4 * gal + arc, 0.7 * gal, gal])
    x = torch.from_numpy(np.arcsinh(flux)[None].astype(np.float32))
    planes = net.with_residuals(x)[0].numpy()
    assert planes.shape == (5, 48, 48)
    core = (np.abs(xx) < 3) & (np.abs(yy) < 3)
    ring = np.abs(np.hypot(xx, yy) - 9.0) < 1.0
    k = (0.4 * gal[20:28, 20:28].sum() + arc[20:28, 20:28].sum()) / gal[20:28, 20:28].sum()
    np.testing.assert_allclose(planes[3], np.arcsinh(flux[0] - k * flux[2]), atol=2e-3)
    assert np.abs(planes[3][core]).max() < 0.5 and planes[3][ring].mean() > 2.0   # arc left, deflector gone
    np.testing.assert_allclose(planes[4], 0.0, atol=2e-3)                       # r - k i: nothing blue there
    # the residual planes follow every symmetry of the stamp (same k), and the graph exports
    for view in (x.flip(3), x.transpose(2, 3), torch.rot90(x, 1, (2, 3))):
        assert np.allclose(net.with_residuals(view)[0, 3:].numpy().sum(), planes[3:].sum(), rtol=1e-4)
    _, diff = export_stamp_model(net, tmp_path, make_spec("lenses", 48))
    assert diff < 1e-4


def test_mirror_residual_cancels_a_centred_deflector_keeps_an_arc_and_exports_to_onnx(tmp_path):
    import torch

    from workflows.train.stamps import NET_KWARGS, export_stamp_model, make_spec, stamp_net

    torch.manual_seed(0)
    net = stamp_net(3, 2, **{**NET_KWARGS, "tta": 8, "mirror_residual": True})
    net.eval()
    # an elliptical deflector on the object's pixel (24, 24) plus an arc on one side only
    yy, xx = np.mgrid[:48, :48] - 24.0
    gal = 300.0 * np.exp(-0.5 * (xx**2 / 16.0 + yy**2 / 6.0))
    arc = 5.0 * np.exp(-0.5 * ((np.hypot(xx, yy) - 9.0) / 1.0) ** 2) * (xx > 3)
    x = torch.from_numpy(np.arcsinh(np.stack([gal + arc, 0.7 * gal, gal]))[None].astype(np.float32))
    planes = net.with_residuals(x)[0].numpy()
    assert planes.shape == (6, 48, 48)
    np.testing.assert_array_equal(planes[:3], x[0].numpy())
    np.testing.assert_allclose(planes[4:], 0.0, atol=1e-5)                      # no arc in r, i: nothing left
    iy, ix = np.nonzero((np.abs(np.hypot(xx, yy) - 9.0) < 1.0) & (xx > 4))
    assert planes[3][iy, ix].min() > 0.05 and planes[3][48 - iy, 48 - ix].max() < -0.05  # the arc (+), its mirror (-)
    assert planes[3][iy, ix].mean() > 0.5
    _, diff = export_stamp_model(net, tmp_path, make_spec("lenses", 48))
    assert diff < 1e-4


def test_widened_init_starts_from_the_init_models_exact_function():
    import torch

    from workflows.train.lenses import continues_network, load_widened
    from workflows.train.stamps import NET_KWARGS, stamp_net

    torch.manual_seed(1)
    base = stamp_net(3, 2, **{**NET_KWARGS, "tta": 2})
    for m in base.modules():  # non-trivial batch-norm statistics, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    wide = stamp_net(3, 2, **{**NET_KWARGS, "tta": 2, "colour_residual": [[0, 2], [1, 2]]})
    load_widened(wide, base.state_dict())
    base.eval()
    wide.eval()
    x = torch.randn(4, 3, 48, 48) * 3.0
    with torch.no_grad():
        assert torch.equal(base(x)[0], wide(x)[0])
    first = wide.state_dict()["features.0.weight"]
    assert first.shape[1] == 5 and torch.count_nonzero(first[:, 3:]) == 0
    narrow = stamp_net(3, 2, **{**NET_KWARGS, "tta": 2})
    with pytest.raises(ValueError, match="cannot be widened"):
        load_widened(narrow, wide.state_dict())
    # the card check in front of it: planes may be appended, never dropped, and nothing else may differ
    plain, resid = {**NET_KWARGS, "tta": 2}, {**NET_KWARGS, "tta": 2, "colour_residual": [[0, 2], [1, 2]]}
    assert continues_network(plain, resid) and continues_network(resid, resid)
    assert not continues_network(resid, plain) and not continues_network({**plain, "tta": 8}, resid)
    # mirror planes come last: they may be added to any init, and an init's mirror planes must stay last
    mirror, both = {**plain, "mirror_residual": True}, {**resid, "mirror_residual": True}
    assert continues_network(plain, mirror) and continues_network(resid, both) and continues_network(plain, both)
    assert not continues_network(mirror, plain) and not continues_network(mirror, both)
    mirrored = stamp_net(3, 2, **mirror)
    load_widened(mirrored, base.state_dict())
    mirrored.eval()
    with torch.no_grad():
        assert torch.equal(base(x)[0], mirrored(x)[0])


def test_dropping_faint_lenses_keeps_every_negative_and_aligned_columns():
    from workflows.train.lenses import drop_faint_lenses
    from workflows.train.stamps import LensSet

    n = 6
    label = np.array([1, 1, 0, 1, 0, 1], np.int8)
    snr = np.array([5.0, 25.0, np.nan, 19.9, np.nan, 40.0])
    ls = LensSet(x=np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1), label=label, kind=label ^ 1, theta_e=snr / 10,
                 snr=snr, mu=snr, mag_i=np.arange(n, dtype=float), gi=np.zeros(n), z_d=np.zeros(n), flags=np.zeros(n, np.int32))
    kept = drop_faint_lenses(ls, 20.0)
    assert kept.mag_i.tolist() == [1, 2, 4, 5]           # lenses at S/N 25 and 40, and both negatives
    assert kept.x[:, 0, 0, 0].tolist() == [1, 2, 4, 5] and kept.label.tolist() == [1, 0, 0, 1]
    assert np.array_equal(kept.snr, snr[[1, 2, 4, 5]], equal_nan=True)


def test_train_scale_enlarges_only_the_training_set():
    from workflows.train.lenses import TRAIN_COUNTS, VAL_COUNTS, _parser, set_counts

    assert set_counts() == (TRAIN_COUNTS, VAL_COUNTS)
    a = _parser().parse_args(["--train-scale", "2", "--scale", "0.5"])
    tr, va = set_counts(a.scale, a.train_scale)
    assert tr == TRAIN_COUNTS
    assert va == {k: int(round(v * 0.5)) for k, v in VAL_COUNTS.items()}


@pytest.mark.training
def test_hard_negative_mining_adds_the_top_scoring_pool_negatives(tmp_path):
    from workflows.train.lenses import main, mining_parts
    from workflows.train.stamps import HARD_KINDS

    parts = mining_parts(1200, 60000)
    assert [s for s, _ in parts] == [1200, 1202, 1204]
    assert sum(c["ordinary"] for _, c in parts) == 60000 and all(c[k] == 400 for _, c in parts for k in HARD_KINDS)
    out = tmp_path / "lenses"
    args = ["--out", str(out), "--scale", "0.002", "--field", "256", "--pool", "4096", "--epochs", "1", "--max-steps",
            "2", "--batch", "16", "--no-throughput", "--workdir", str(tmp_path / "work"), "--hard-negatives", "6",
            "--mine-pool", "40", "--mine-random", "4", "--val-negatives", "30"]
    assert main(args) == 0
    card = json.loads((out / "card.json").read_text())
    hn = card["training"]["hard_negative_mining"]
    assert hn["n_hard"] == 6 and hn["n_random"] == 4 and hn["n_scored"] == 40 + 6
    assert hn["model_dir"] == "stages/models/lenses" and card["training"]["n_stamps"] == sum(card["training"]["counts"].values()) + 10
    assert hn["lowest_hard_score"] >= hn["pool_scores"]["ordinary"]["score_quantiles_0.5_0.99_0.999"][0]
    ext = card["metrics"]["extended"]
    assert ext["n_neg"] >= 30 and 0.0 <= ext["roc_auc"] <= 1.0 and "tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20" in ext
    lo, hi = ext["tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20_interval95"]
    assert 0.0 <= lo <= ext["tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20"] <= hi <= 1.0
    assert "hard-negative mining" in (out / "README.md").read_text()
    # cached: a second run re-uses the mined set; the mining seed must be a training seed whose populations are
    # not the training set's, and the pool must hold the stamps asked for
    assert main(args) == 0
    assert len(list((tmp_path / "work").glob("mined-*.npz"))) == 1
    assert main(args + ["--mine-seed", "2200"]) == 2
    assert main(args + ["--mine-seed", "1100"]) == 2 and main(args + ["--mine-pool", "9"]) == 2


def test_bright_frac_draws_deflectors_and_impostors_from_the_brightest_candidates():
    from workflows.train.stamps import lens_sets, make_spec

    spec = make_spec("lenses", 48, "gri")
    kw = dict(counts={"lens": 12, "ordinary": 12}, spec=spec, min_lens_snr=0.0, field_px=256, pool_px=4096,
              progress=False)
    bright = [s for s in lens_sets(101, "test", bright_frac=1.0, **kw)]
    plain = [s for s in lens_sets(101, "test", **kw)]
    mb = np.concatenate([s.mag_i for s in bright])
    mp = np.concatenate([s.mag_i for s in plain])
    assert mb.size == mp.size == 24
    assert (mb < 20.5).all()                 # every deflector and every ordinary impostor is bright
    assert (mp >= 20.5).mean() > 0.5         # the population's own draw is mostly fainter
