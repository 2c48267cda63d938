"""Photo-z training: a tiny ensemble recovers a known colour-redshift relation; ONNX == torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workflows import photoz_data as pzd

pytestmark = pytest.mark.training
BANDS = "griz"


def synthetic_catalog(n: int, seed: int) -> dict[str, np.ndarray]:
    """Galaxies whose colours are known smooth functions of z (one template), 2 % + sky noise."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.05, 2.0, n)
    mi = rng.uniform(20.0, 23.5, n)
    mags = {"i": mi, "r": mi + 0.2 + 0.5 * z}
    mags["g"] = mags["r"] + 0.3 + 0.9 * np.sin(1.2 * z)
    mags["z"] = mi - 0.1 - 0.3 * z**2
    cols: dict[str, np.ndarray] = {"object_id": np.arange(n, dtype=np.int64) + 1000, "zspec": z}
    for b in BANDS:
        f = 10 ** (-0.4 * (mags[b] - 31.4))
        e = 0.02 * f + 30.0
        cols[f"{b}_mag"] = -2.5 * np.log10(np.abs(f + rng.normal(0, 1, n) * e)) + 31.4
        cols[f"{b}_magerr"] = pzd.POGSON * e / f
    cols["g_mag"][:25] = 99.0       # some coded non-detections with a limit in the error column
    cols["g_magerr"][:25] = 26.0
    return cols


MAPPING = {"id": "object_id", "redshift": "zspec", "nondetection": {"mag": 99.0},
           "bands": {b: {"mag": f"{b}_mag", "err": f"{b}_magerr"} for b in BANDS}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import yaml

    from workflows.train import photoz as tp

    d = tmp_path_factory.mktemp("photoz")
    cat = pzd.write_table(d / "train.fits", synthetic_catalog(2400, 101))
    hold = pzd.write_table(d / "hold.parquet", synthetic_catalog(600, 102))
    (d / "mapping.yaml").write_text(yaml.safe_dump(MAPPING))
    rc = tp.main(["--catalog", str(cat), "--mapping", str(d / "mapping.yaml"), "--out", str(d / "model"),
                  "--val-catalog", str(hold), "--epochs", "25", "--members", "2", "--components", "3",
                  "--hidden", "32,32", "--batch", "256", "--lr", "3e-3", "--seed", "7",
                  "--throughput-n", "1000"])
    assert rc == 0
    return d


def test_tiny_training_recovers_the_colour_redshift_relation(trained):
    card = json.loads((trained / "model" / "card.json").read_text())
    m = card["metrics"]
    assert m["n_holdout"] == 600
    assert m["sigma_nmad"] < 0.04 and abs(m["bias"]) < 0.01 and m["outlier_frac_015"] < 0.03, m
    assert 0.5 < m["coverage_68"] < 0.85 and m["coverage_95"] > 0.85, m


def test_card_has_what_users_need(trained):
    from pipeline.modelcard import load_card

    card = load_card(trained / "model")  # verifies the sha256
    assert card.bands == list(BANDS) and card.name == "photoz"
    assert card.z_grid["n"] == len(card.z_grid["centres"]) == 200 and card.z_grid["dz"] == 0.02
    assert len(card.normalisation["feature_mean"]) == len(card.normalisation["features"]) == 4 * len(BANDS) - 1
    assert card.training["seed"] == 7 and card.training["n_train"] + card.training["n_validation_split"] == 2400
    assert card.training["mapping"]["redshift"] == "zspec"
    assert card.metrics["onnx_vs_torch_max_abs_diff"] < 1e-5


def test_onnx_matches_torch_on_fresh_inputs(trained):
    from workflows.bench.photoz import load_torch
    from workflows.train.onnx_export import max_abs_diff_onnx_torch

    model = load_torch(trained / "model")
    rng = np.random.default_rng(12345)
    x = rng.normal(0, 1.5, (300, 4 * len(BANDS) - 1)).astype(np.float32)
    x[:, -len(BANDS):] = rng.random((300, len(BANDS))) < 0.2
    assert max_abs_diff_onnx_torch(model, trained / "model" / "model.onnx", {"features": x}) < 1e-5


def test_apply_cli_writes_every_column_with_ids(trained, capsys):
    from workflows import photoz_apply

    out = trained / "applied.parquet"
    assert photoz_apply.main(["--model", str(trained / "model"), "--catalog", str(trained / "hold.parquet"),
                              "--out", str(out)]) == 0
    import pyarrow.parquet as pq

    t = pq.read_table(out)
    names = t.column_names
    assert names[0] == "object_id"
    for c in ("photoz_median", "photoz_mode", "photoz_mean", "photoz_l68", "photoz_u68", "photoz_l95", "photoz_u95",
              "photoz_odds", "photoz_pdf"):
        assert c in names
    pdf = np.stack(t.column("photoz_pdf").to_numpy(zero_copy_only=False))
    meta = json.loads(t.schema.metadata[b"surveypipe.photoz"])
    assert pdf.shape == (600, len(meta["z_grid"]))
    np.testing.assert_allclose(pdf.sum(axis=1) * meta["dz"], 1.0, atol=1e-4)
    z = pq.read_table(trained / "hold.parquet").column("zspec").to_numpy()
    med = t.column("photoz_median").to_numpy()
    assert np.median(np.abs(med - z) / (1 + z)) < 0.03


def test_missing_column_refused_by_the_trainer(trained, capsys):
    from workflows.train import photoz as tp

    rc = tp.main(["--catalog", str(trained / "train.fits"), "--out", str(trained / "x"), "--redshift", "zspec",
                  "--band", "g:mag:g_mag:g_magerr", "--band", "r:mag:r_mag:r_mag_err"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'r_mag_err'" in err and "train.fits" in err and "r_magerr" in err


def test_stage_runs_a_user_trained_model_with_a_band_absent(trained):
    from pipeline.table import Table
    from stages.photoz import PhotoZ, PhotoZConfig

    cat = synthetic_catalog(40, 103)
    t = Table()
    t.add("objectId", cat["object_id"])
    for b in "gri":  # no z band in this "release"
        f = 10 ** (-0.4 * (cat[f"{b}_mag"] - 31.4))
        t.add(f"{b}_kronFlux", f)
        t.add(f"{b}_kronFluxErr", f * cat[f"{b}_magerr"] / pzd.POGSON)
    out = PhotoZ().run({"objects": t}, PhotoZConfig(model_dir=str(trained / "model")))["photoz"]
    np.testing.assert_allclose(out["photoz_pdf"].sum(axis=1) * out.attrs["dz"], 1.0, atol=1e-4)
    assert (out["photoz_nbands"][25:] == 3).all()
    good = np.arange(25, 40)
    assert np.median(np.abs(out["photoz_median"][good] - cat["zspec"][good]) / (1 + cat["zspec"][good])) < 0.15


def test_bench_scores_model_and_baselines_side_by_side(trained, capsys):
    import yaml

    from workflows.bench import photoz as bench

    (trained / "m.yaml").write_text(yaml.safe_dump(MAPPING))
    out = trained / "bench"
    assert bench.main(["--catalog", str(trained / "hold.parquet"), "--train-catalog", str(trained / "train.fits"),
                       "--model", str(trained / "model"), "--mapping", str(trained / "m.yaml"), "--out", str(out),
                       "--throughput-n", "1000"]) == 0
    text = capsys.readouterr().out
    for label in ("sigma_NMAD", "outliers |dz|>0.15", "sigma_IQR", "coverage 68 %", "PIT KS", "mean CRPS",
                  "kNN", "random forest", "extra trees", "onnx_pdf", "torch_pdf", "goals:"):
        assert label in text, label
    for label in ("point estimates", "p(z) median", "p(z) mode", "p(z) mean", "regressor output",
                  "each at its best point estimate"):
        assert label in text, label
    res = json.loads((out / "photoz_bench.json").read_text())
    assert len(res["results"]) == 4 and res["throughput"]["onnx_pdf"] > 0
    assert "by magnitude (AB magnitude of i)" in text
    rows = res["by_magnitude"]  # the held-out galaxies have i in 20-23.5: three bins hold them all
    assert [r["n"] for r in rows[3:]] == [0, 0, 0] and sum(r["n"] for r in rows) == 600
    assert all(set(r) == {"bin", "n", *res["results"]} for r in rows)
    ours, *base = res["results"].values()
    assert set(ours["point_estimates"]) == {"photoz_median", "photoz_mode", "photoz_mean"}
    assert ours["point_estimates"]["photoz_median"]["sigma_nmad"] == ours["sigma_nmad"]  # the table's row
    for b in base:  # the baselines' table rows stay their regressor output
        assert set(b["point_estimates"]) == {"regressor", "photoz_median", "photoz_mode", "photoz_mean"}
        assert b["point_estimates"]["regressor"]["sigma_nmad"] == b["sigma_nmad"]


def test_bench_scores_every_point_estimate_of_a_skewed_pdf():
    """A p(z) with its peak at the truth and a long tail: the mode is exact, median and mean lie high."""
    from workflows.bench.photoz import evaluate_model

    dz = 0.01
    grid = np.arange(0.005, 4.0, dz)
    zt = np.array([0.5, 1.0, 1.5])
    pdf = np.where(grid[None, :] >= zt[:, None], np.exp(-(grid[None, :] - zt[:, None]) / 0.3), 0.0)
    pdf += 1e-3 * np.exp(-0.5 * ((grid[None, :] - zt[:, None]) / 0.005) ** 2)  # a smooth peak at the truth
    pdf /= pdf.sum(axis=1, keepdims=True) * dz
    pe = evaluate_model(pdf, grid, dz, zt)["point_estimates"]
    assert abs(pe["photoz_mode"]["bias"]) < 0.01
    # exponential tail of scale 0.3 above the truth: median ln2 x 0.3, mean 0.3 above it
    assert pe["photoz_median"]["bias"] == pytest.approx(np.median(0.3 * np.log(2) / (1 + zt)), abs=0.01)
    assert pe["photoz_mean"]["bias"] == pytest.approx(np.median(0.3 / (1 + zt)), abs=0.01)
    got = evaluate_model(pdf, grid, dz, zt, point=zt + 0.1)
    assert got["point_estimates"]["regressor"]["bias"] == pytest.approx(np.median(0.1 / (1 + zt)))
    assert got["bias"] == got["point_estimates"]["regressor"]["bias"]


def test_crps_and_pit_of_a_known_gaussian():
    from workflows.bench.photoz import crps, pit_values

    dz = 0.01
    grid = np.arange(0.005, 4.0, dz)
    sig = 0.1
    pdf = np.exp(-0.5 * ((grid - 1.0) / sig) ** 2)[None, :].repeat(3, axis=0)
    pdf /= pdf.sum(axis=1, keepdims=True) * dz
    zt = np.array([1.0, 1.1, 0.8])
    # CRPS of N(mu, s) at y: s * (w (2 Phi(w) - 1) + 2 phi(w) - 1/sqrt(pi)), w = (y - mu)/s
    from scipy.stats import norm

    w = (zt - 1.0) / sig
    want = sig * (w * (2 * norm.cdf(w) - 1) + 2 * norm.pdf(w) - 1 / np.sqrt(np.pi))
    np.testing.assert_allclose(crps(pdf, grid, dz, zt), want, atol=2e-4)
    np.testing.assert_allclose(pit_values(pdf, grid, dz, zt), norm.cdf(w), atol=2e-3)


def test_cdf_output_is_the_cumulative_binned_probability(trained):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(trained / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["prob", "weight", "mu", "sigma", "cdf"]
    x = np.random.default_rng(4).normal(0, 1.5, (200, 4 * len(BANDS) - 1)).astype(np.float32)
    x[:, -len(BANDS):] = 0.0
    prob, cdf = sess.run(["prob", "cdf"], {"features": x})
    assert cdf.shape == (200, prob.shape[1] + 1)
    np.testing.assert_allclose(cdf[:, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(cdf[:, -1], 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diff(cdf, axis=1), prob, atol=2e-6)


def test_holdout_early_stopping_trains_on_every_row(tmp_path):
    from workflows.train import photoz as tp

    mapping = pzd.ColumnMapping.from_dict(MAPPING)
    tr = pzd.photometry_from_columns(synthetic_catalog(400, 201), mapping, need_redshift=True)
    ho = pzd.photometry_from_columns(synthetic_catalog(120, 202), mapping, need_redshift=True)
    s = tp.TrainSettings(members=2, components=2, hidden=(16,), epochs=3, batch=128, early_stop="holdout", seed=3)
    res = tp.train(tr, s, log=lambda m: None, holdout=ho)
    assert res.n_train == 400 and res.n_val == 0 and res.val_idx is None
    s.early_stop = "split"
    res = tp.train(tr, s, log=lambda m: None, holdout=ho)
    assert res.n_train + res.n_val == 400 and res.n_val == 60


def test_member_crps_is_the_closed_form_of_a_gaussian_mixture():
    import torch

    from workflows.train.photoz import member_crps

    class Mix:
        def mixture(self, x):
            return (torch.log(torch.tensor([[[0.3, 0.7]]])), torch.tensor([[[0.1, 0.5]]]),
                    torch.tensor([[[0.05, 0.2]]]))

    got = float(member_crps(Mix(), None, torch.tensor([0.3]))[0])
    rng = np.random.default_rng(0)
    n = 1_000_000

    def draw():
        return np.where(rng.random(n) < 0.3, rng.normal(0.1, 0.05, n), rng.normal(0.5, 0.2, n))

    x1, x2 = draw(), draw()
    want = np.mean(np.abs(x1 - 0.3)) - 0.5 * np.mean(np.abs(x1 - x2))
    assert got == pytest.approx(want, abs=1.5e-3)


def test_torch_features_match_the_numpy_features():
    """The flux-noise augmentation rebuilds features in torch: the same numbers as pzd.features."""
    import torch

    from workflows.train import photoz as tp

    mapping = pzd.ColumnMapping.from_dict(MAPPING)
    p = pzd.photometry_from_columns(synthetic_catalog(300, 301), mapping, need_redshift=True)
    p.flux[:20, 1] = np.nan  # missing bands
    p.err[20:30, 2] = 0.0
    p.flux[30:40, 3] = -50.0  # negative fluxes, as forced photometry gives
    norm = pzd.fit_normalisation(p.flux, p.err, p.bands)
    want = pzd.features(p.flux, p.err, norm)
    ok = np.isfinite(p.flux) & np.isfinite(p.err) & (p.err > 0)
    got = tp.TorchFeatures(norm)(torch.from_numpy(np.where(ok, p.flux, 0.0).astype(np.float32)),
                                 torch.from_numpy(np.where(ok, p.err, 0.0).astype(np.float32)), torch.from_numpy(ok))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4)


def test_flux_noise_dropout_and_cosine_schedule(tmp_path):
    from workflows.train import photoz as tp

    a = tp._parser().parse_args(["--out", "x", "--flux-noise", "0.7", "--dropout", "0.2", "--schedule", "cosine",
                                 "--weight-decay", "1e-4"])
    s = tp.settings_from_args(a)
    assert (s.flux_noise, s.dropout, s.schedule, s.weight_decay) == (0.7, 0.2, "cosine", 1e-4)
    d = tp.TrainSettings()
    assert (d.flux_noise, d.dropout, d.schedule) == (0.0, 0.0, "plateau")  # the defaults change nothing
    mapping = pzd.ColumnMapping.from_dict(MAPPING)
    tr = pzd.photometry_from_columns(synthetic_catalog(400, 211), mapping, need_redshift=True)
    ho = pzd.photometry_from_columns(synthetic_catalog(120, 212), mapping, need_redshift=True)
    s = tp.TrainSettings(members=2, components=2, hidden=(16, 16), epochs=4, patience=10, batch=128,
                         early_stop="holdout", seed=3, flux_noise=1.0, dropout=0.2, schedule="cosine")
    res = tp.train(tr, s, log=lambda m: None, holdout=ho)
    lrs = [h["lr"] for h in res.history]
    assert len(lrs) == 4 and all(b < a for a, b in zip(lrs, lrs[1:]))  # cosine decay, every epoch
    assert all(np.isfinite(h["train_nll"]) and np.isfinite(h["val_nll"]) for h in res.history)
    import torch

    x = torch.from_numpy(pzd.features(ho.flux, ho.err, res.norm))
    with torch.no_grad():  # dropout acts in training only: the exported model is deterministic
        np.testing.assert_array_equal(res.model(x)[0].numpy(), res.model(x)[0].numpy())
    card = tp.export(res, tmp_path / "m", holdout=ho, holdout_label="hold", training_info={}, throughput_n=500,
                     log=lambda m: None)
    assert card.metrics["onnx_vs_torch_max_abs_diff"] < 1e-5
    from workflows.bench.photoz import load_torch

    assert load_torch(tmp_path / "m") is not None


def test_per_magnitude_scatter_is_recovered_bin_by_bin_with_non_detections_in_the_faintest():
    from workflows.bench.photoz import by_magnitude, magnitude_column

    rng = np.random.default_rng(103)
    n = 20000
    mag = rng.uniform(20.0, 27.0, n)
    mag[:500] = np.nan  # non-detections
    zt = rng.uniform(0.1, 2.0, n)
    sigma = np.where(np.isnan(mag), 0.2, 0.01 * 2 ** (np.nan_to_num(mag, nan=27.0) - 20.0))  # doubles per magnitude
    sigma = np.where(mag < 22.0, 0.01, sigma)
    zp = zt + (1 + zt) * rng.normal(0, 1, n) * sigma
    rows = by_magnitude({"m": (zp, zt)}, mag, edges=(22.0, 23.0))
    assert [r["bin"] for r in rows] == [[-np.inf, 22.0], [22.0, 23.0], [23.0, np.inf]]
    assert rows[2]["n"] == int(np.sum(np.isnan(mag) | (mag >= 23.0)))
    assert abs(rows[0]["m"]["sigma_nmad"] / 0.01 - 1) < 0.1            # the bright bin's own scatter
    assert 0.04 < rows[1]["m"]["sigma_nmad"] < 0.08                    # 0.04-0.08 across 22-23
    assert by_magnitude({"m": (zp, zt)}, mag, edges=(20.0001,))[0]["m"] is None  # < 10 objects: no figure

    class Phot:  # the Kron flux is preferred when a band has several kinds of flux
        bands = ["i@psf", "i@kron", "r@kron"]
        flux = np.array([[100.0, 10 ** (-0.4 * (24.0 - 31.4)), 1.0], [1.0, -5.0, 1.0]])
    m, col = magnitude_column(Phot())
    assert col == "i@kron" and abs(m[0] - 24.0) < 1e-9 and np.isnan(m[1])
