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
