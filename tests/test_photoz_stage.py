"""The photoz stage on hand-made ``objects`` tables: a normalised p(z) for every object."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.table import Table
from stages.photoz import SHIPPED_MODEL, PhotoZ, PhotoZConfig, summarise

NJY = 31.4
SUMMARIES = ["photoz_median", "photoz_mode", "photoz_mean", "photoz_l68", "photoz_u68", "photoz_l95", "photoz_u95",
             "photoz_odds"]


def shipped_columns(bands: str = "ugrizy") -> dict[str, dict[str, str]]:
    from pipeline.modelcard import load_card

    cols = load_card(SHIPPED_MODEL).normalisation["pipeline_columns"]
    return {b: c for b, c in cols.items() if b.partition("@")[0] in bands}


def objects_table(n: int, columns: dict[str, dict[str, str]], seed: int = 100) -> Table:
    """Galaxy-like fluxes (i = 20-26), sky-like errors, some NaN / negative / zero-error entries.

    ``columns``: model band -> {"flux": column, "err": column} (the card's pipeline columns)."""
    rng = np.random.default_rng(seed)
    t = Table()
    t.add("objectId", np.arange(n, dtype=np.int64) + 5_000_000, "", "id")
    mi = rng.uniform(20, 26, n)
    col = rng.normal(0.4, 0.3, (n, 6)).cumsum(axis=1)
    err0 = {"u": 40.0, "g": 15.0, "r": 15.0, "i": 20.0, "z": 35.0, "y": 80.0}
    for band, c in columns.items():
        b = band[0]
        f = 10 ** (-0.4 * (mi + col[:, "ugrizy".index(b)] - col[:, 3] - NJY))
        e = np.full(n, err0[b]) * rng.uniform(0.8, 1.5, n)
        t.add(c["flux"], (f + rng.normal(0, 1, n) * e).astype(np.float32), "nJy")
        t.add(c["err"], e.astype(np.float32), "nJy")
    names = list(columns.values())
    if n >= 4:
        t.columns[names[0]["flux"]][0] = np.nan          # unmeasured -> missing
        t.columns[names[1]["err"]][1] = 0.0              # unusable error -> missing
        t.columns[names[2]["flux"]][2] = -50.0           # negative forced flux -> used
        for c in names:                                  # nothing usable at all
            t.columns[c["flux"]][3] = np.nan
    return t


def check_output(out: Table, objects: Table) -> None:
    assert list(out.columns)[0] == "objectId"
    np.testing.assert_array_equal(out["objectId"], objects["objectId"])
    grid, dz = np.asarray(out.attrs["z_grid"]), out.attrs["dz"]
    pdf = out["photoz_pdf"]
    assert pdf.shape == (len(objects), len(grid)) and pdf.dtype == np.float32
    assert np.isfinite(pdf).all() and (pdf >= 0).all()
    np.testing.assert_allclose(pdf.sum(axis=1) * dz, 1.0, atol=1e-4)
    for c in SUMMARIES:
        assert c in out and out[c].shape == (len(objects),) and np.isfinite(out[c]).all(), c
    assert (out["photoz_l95"] <= out["photoz_l68"] + 1e-6).all() and (out["photoz_l68"] <= out["photoz_median"] + 1e-6).all()
    assert (out["photoz_median"] <= out["photoz_u68"] + 1e-6).all() and (out["photoz_u68"] <= out["photoz_u95"] + 1e-6).all()
    assert ((out["photoz_odds"] >= 0) & (out["photoz_odds"] <= 1 + 1e-6)).all()


needs_shipped = pytest.mark.skipif(not (SHIPPED_MODEL / "card.json").exists(), reason="no shipped photo-z model")


@needs_shipped
def test_stage_writes_normalised_pdf_for_every_object():
    cols = shipped_columns()
    objs = objects_table(300, cols)
    out = PhotoZ().run({"objects": objs}, PhotoZConfig())["photoz"]
    check_output(out, objs)
    nb, B = out["photoz_nbands"], len({b.partition("@")[0] for b in cols})
    assert nb[3] == 0 and (nb[4:] == B).all() and nb[2] == B and nb[0] >= B - 1 and nb[1] >= B - 1
    assert out.attrs["photoz_model_sha256"]


@needs_shipped
def test_stage_handles_a_release_without_some_bands_and_empty_tiles():
    cols = shipped_columns("gri")
    objs = objects_table(50, cols)
    out = PhotoZ().run({"objects": objs}, PhotoZConfig())["photoz"]
    check_output(out, objs)
    assert out.attrs["photoz_bands_present"] == list(cols)
    assert (out["photoz_nbands"][4:] == 3).all()
    empty = objects_table(0, shipped_columns())
    out = PhotoZ().run({"objects": empty}, PhotoZConfig())["photoz"]
    assert len(out) == 0 and out["photoz_pdf"].shape == (0, len(out.attrs["z_grid"]))


@needs_shipped
def test_stage_declares_its_model_files():
    files = PhotoZ().model_files(PhotoZConfig())
    assert [f.name for f in files] == ["model.onnx", "card.json"] and all(f.exists() for f in files)


def test_summaries_of_a_known_pdf():
    dz = 0.02
    grid = np.arange(0.01, 4.0, dz)
    pdf = np.exp(-0.5 * ((grid - 1.0) / 0.1) ** 2)[None, :]
    pdf = pdf / (pdf.sum() * dz)
    s = summarise(pdf, grid, dz)
    assert s["photoz_median"][0] == pytest.approx(1.0, abs=2e-3)
    assert s["photoz_mode"][0] == pytest.approx(1.0, abs=2e-3)
    assert s["photoz_mean"][0] == pytest.approx(1.0, abs=2e-3)
    assert s["photoz_u68"][0] - s["photoz_l68"][0] == pytest.approx(2 * 0.0994, abs=4e-3)
    assert s["photoz_u95"][0] - s["photoz_l95"][0] == pytest.approx(2 * 0.196, abs=4e-3)
    assert s["photoz_odds"][0] == pytest.approx(0.770, abs=0.01)  # +-0.06 (1 + 1) = +-1.2 sigma


def _mixture_pdfs(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    dz = 0.02
    grid = np.arange(0.01, 4.0, dz)
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-0.2, 4.2, (n, 3))
    sg = rng.uniform(0.005, 0.5, (n, 3))
    w = rng.dirichlet([1.0, 1.0, 1.0], n)
    pdf = (w[:, :, None] * np.exp(-0.5 * ((grid - mu[:, :, None]) / sg[:, :, None]) ** 2) / sg[:, :, None]).sum(axis=1)
    pdf[0] = 0.0                                   # nothing on the grid: flat
    pdf[1] = 0.0
    pdf[1, 7] = 1.0                                # all in one bin
    pdf /= pdf.sum(axis=1, keepdims=True).clip(1e-300) * dz
    return pdf.astype(np.float32), grid, dz


def test_cdf_summaries_agree_with_the_pdf_summaries():
    """The stage's path (the model's CDF at the bin edges, binary-searched) == summarise(pdf)."""
    from stages.photoz import summarise_cdf

    pdf, grid, dz = _mixture_pdfs(3000)
    ref = summarise(pdf, grid, dz)
    mass = pdf.astype(np.float64) * dz
    cdf = np.concatenate([np.zeros((len(pdf), 1)), np.cumsum(mass, axis=1)], axis=1)
    cdf[1:] /= cdf[1:, -1:]
    got_pdf, got = summarise_cdf(cdf.astype(np.float32), grid, dz)
    np.testing.assert_allclose(got_pdf[1:], pdf[1:], atol=2e-4 * pdf.max())
    np.testing.assert_allclose(got_pdf[0], 1.0 / (len(grid) * dz), rtol=1e-5)  # flat
    for k in SUMMARIES:
        np.testing.assert_allclose(got[k], ref[k], atol=2e-3 if k != "photoz_odds" else 1e-3, err_msg=k)
    assert got["photoz_median"][1] == pytest.approx(grid[7], abs=dz / 2)
    # filled block by block into preallocated columns, as the stage does
    out = {k: np.full(len(pdf), np.nan) for k in SUMMARIES}
    pdf_out = np.empty_like(pdf)
    for r0 in range(0, len(pdf), 1024):
        summarise_cdf(cdf[r0:r0 + 1024].astype(np.float32), grid, dz, pdf_out=pdf_out[r0:r0 + 1024], out=out,
                      at=slice(r0, r0 + 1024))
    for k in SUMMARIES:
        np.testing.assert_array_equal(out[k], got[k])
    np.testing.assert_array_equal(pdf_out, got_pdf)


def test_fast_features_equal_the_reference_features():
    from workflows import photoz_data as pzd

    rng = np.random.default_rng(5)
    bands = ["u@psf", "g@psf", "r@psf", "u@kron", "g@kron", "r@kron"]
    n = 5000
    flux = rng.lognormal(5, 2, (n, len(bands))) * rng.choice([-1, 1], (n, len(bands)), p=[0.1, 0.9])
    err = rng.uniform(5, 80, (n, len(bands)))
    flux[rng.random(flux.shape) < 0.05] = np.nan
    err[rng.random(err.shape) < 0.03] = 0.0
    err[rng.random(err.shape) < 0.01] = np.inf
    norm = pzd.fit_normalisation(flux, err, bands)
    np.testing.assert_allclose(pzd.features(flux, err, norm), pzd.features_reference(flux, err, norm), atol=2e-6)
    np.testing.assert_array_equal(pzd.features(flux[:0], err[:0], norm).shape, (0, len(norm["features"])))


@needs_shipped
def test_stage_pdf_matches_the_models_binned_probabilities():
    """Whatever output the stage reads (cdf or prob), its p(z) is the model's prob / dz."""
    from pipeline.modelcard import load_card
    from pipeline.onnx import session
    from stages.photoz import predict
    from workflows import photoz_data as pzd

    card = load_card(SHIPPED_MODEL)
    objs = objects_table(700, shipped_columns())
    cols = card.normalisation["pipeline_columns"]
    flux = np.stack([np.asarray(objs[cols[b]["flux"]], float) for b in card.bands], axis=1)
    err = np.stack([np.asarray(objs[cols[b]["err"]], float) for b in card.bands], axis=1)
    res = predict(SHIPPED_MODEL, flux, err, card=card, batch=64)
    sess = session(card.onnx_path(SHIPPED_MODEL), device="cpu")
    (prob,) = sess.run(["prob"], {"features": pzd.features(flux, err, card.normalisation)})
    dz = card.z_grid["dz"]
    assert np.all(np.abs(res["pdf"] - prob / dz) <= 1e-4 / dz * prob.max(axis=1, keepdims=True))
    ref = summarise(prob / dz, np.asarray(card.z_grid["centres"]), dz)
    for k in SUMMARIES:
        np.testing.assert_allclose(res[k], ref[k], atol=3e-3, err_msg=k)


@pytest.mark.parametrize("same", [True, False])
def test_a_model_trained_on_other_photometry_is_a_caveat(tmp_path, same):
    """The card's pipeline fingerprint against the running classical stages: a mismatch makes the
    tile a partial success (p(z) calibrated for other errors), a match does not."""
    import json
    import shutil

    from pipeline.stage import CAVEATS
    from stages.fingerprint import classical_fingerprint

    d = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, d)
    card = json.loads((d / "card.json").read_text())
    card["training"]["pipeline_fingerprint"] = classical_fingerprint() if same else "0123456789abcdef"
    (d / "card.json").write_text(json.dumps(card))
    objects = objects_table(50, shipped_columns())
    out = PhotoZ().run({"objects": objects}, PhotoZConfig(model_dir=str(d)))
    assert out["photoz"].attrs["photoz_pipeline"] == classical_fingerprint()
    if same:
        assert CAVEATS not in out
    else:
        assert "0123456789abcdef" in out[CAVEATS][0] and "retrain" in out[CAVEATS][0]


def test_the_shipped_model_matches_the_running_classical_stages():
    """The shipped card was trained on photometry of the current classical stage versions: a
    default run is not flagged as needing a retrain."""
    import json

    from stages.fingerprint import classical_fingerprint

    card = json.loads((SHIPPED_MODEL / "card.json").read_text())
    assert card["training"]["pipeline_fingerprint"] == classical_fingerprint()


def test_the_fingerprint_moves_with_a_stage_version_or_config_but_not_with_its_source(monkeypatch):
    """A version bump (the engine's marker of changed outputs) or another default config gives a new
    fingerprint; nothing else about the stage enters it."""
    import stages
    from stages.fingerprint import classical_fingerprint

    base = classical_fingerprint()
    phot = stages.Photometry

    def fresh(**attrs):
        classical_fingerprint.cache_clear()
        monkeypatch.setattr(stages, "CLASSICAL_STAGES",
                            [c for c in stages.CLASSICAL_STAGES if c is not phot] + [type("P", (phot,), attrs)])
        try:
            return classical_fingerprint()
        finally:
            monkeypatch.undo()
            classical_fingerprint.cache_clear()

    assert fresh() == base  # same name, version, config: same fingerprint (order of stages kept by name)
    assert fresh(version=phot.version + ".1") != base

    class WiderConfig(phot.Config):
        apertures_pix: list[float] = [3.0, 6.0, 9.0]

    assert fresh(Config=WiderConfig) != base
