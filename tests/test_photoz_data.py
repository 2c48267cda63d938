"""Photo-z inputs: column mapping (clear refusals), formats, non-detection coding, features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workflows import photoz_data as pzd

MAPPING_YAML = """\
id: object_id                 # optional; else row order is kept
redshift: redshift            # training only
bands:
  u: {mag: mag_u_lsst, err: mag_err_u_lsst}
  g: {mag: mag_g_lsst, err: mag_err_g_lsst}
  r: {flux: flux_r, err: flux_err_r, unit: uJy}
nondetection: {mag: 99.0}
"""


def _table(n: int = 6) -> dict[str, np.ndarray]:
    return {
        "object_id": np.arange(n, dtype=np.int64) + 10,
        "redshift": np.linspace(0.1, 1.0, n),
        "mag_u_lsst": np.array([24.0, 99.0, 99.0, 25.0, 23.0, 22.0])[:n],
        "mag_err_u_lsst": np.array([0.1, 26.5, 99.0, 0.2, 0.05, 0.03])[:n],  # 26.5: a 1-sigma limit
        "mag_g_lsst": np.full(n, 23.5),
        "mag_err_g_lsst": np.full(n, 0.05),
        "flux_r": np.array([1.0, 2.0, np.nan, -0.01, 0.5, 3.0])[:n],    # uJy
        "flux_err_r": np.array([0.01, 0.02, 0.01, 0.02, 0.0, 0.03])[:n],
        "name": np.array([f"obj{i}" for i in range(n)]),
    }


@pytest.fixture
def mapping_file(tmp_path: Path) -> Path:
    p = tmp_path / "mapping.yaml"
    p.write_text(MAPPING_YAML)
    return p


@pytest.mark.parametrize("ext", ["fits", "parquet", "h5"])
def test_reads_every_format_through_the_issue_mapping(tmp_path, mapping_file, ext):
    path = pzd.write_table(tmp_path / f"cat.{ext}", _table())
    m = pzd.ColumnMapping.from_yaml(mapping_file)
    ph = pzd.load_catalog(path, m, need_redshift=True)
    assert ph.bands == ["u", "g", "r"] and list(ph.ids) == list(range(10, 16))
    np.testing.assert_allclose(ph.z, np.linspace(0.1, 1.0, 6))
    # u: measured, coded 99 with a limiting magnitude -> 0 +- limit, coded 99 without a usable limit -> missing
    assert list(ph.status[:, 0]) == [pzd.MEASURED, pzd.NONDETECTED, pzd.MISSING, pzd.MEASURED, pzd.MEASURED, pzd.MEASURED]
    assert ph.flux[1, 0] == 0.0 and ph.err[1, 0] == pytest.approx(10 ** (-0.4 * (26.5 - 31.4)))
    np.testing.assert_allclose(ph.flux[0, 0], 10 ** (-0.4 * (24.0 - 31.4)))
    np.testing.assert_allclose(ph.err[0, 0], ph.flux[0, 0] * 0.1 / pzd.POGSON)
    # r in uJy -> nJy; NaN flux (not a declared code here) and err 0 -> missing; a negative flux is a measurement
    assert ph.flux[0, 2] == pytest.approx(1000.0) and ph.err[0, 2] == pytest.approx(10.0)
    assert list(ph.status[:, 2]) == [0, 0, pzd.MISSING, 0, pzd.MISSING, 0]
    assert ph.flux[3, 2] == pytest.approx(-10.0)


def test_missing_column_named_with_file_and_suggestion(tmp_path, mapping_file):
    t = _table()
    t["mag_g_lsts"] = t.pop("mag_g_lsst")  # a typo in the catalogue
    path = pzd.write_table(tmp_path / "cat.parquet", t)
    with pytest.raises(pzd.MappingError) as e:
        pzd.load_catalog(path, pzd.ColumnMapping.from_yaml(mapping_file), need_redshift=True)
    msg = str(e.value)
    assert "'mag_g_lsst'" in msg and "cat.parquet" in msg and "band 'g'" in msg and "mag_g_lsts" in msg


def test_mistyped_column_named(tmp_path):
    path = pzd.write_table(tmp_path / "cat.fits", _table())
    m = pzd.ColumnMapping.from_dict({"redshift": "name", "bands": {"g": {"mag": "mag_g_lsst", "err": "mag_err_g_lsst"}}})
    with pytest.raises(pzd.MappingError, match=r"column 'name' \(redshift\) holds .*not numbers"):
        pzd.load_catalog(path, m, need_redshift=True)
    m = pzd.ColumnMapping.from_dict({"bands": {"g": {"mag": "name", "err": "mag_err_g_lsst"}}})
    with pytest.raises(pzd.MappingError, match=r"cat.fits.*column 'name' \(band 'g' mag\)"):
        pzd.load_catalog(path, m, need_redshift=False)


def test_training_needs_the_redshift_column(tmp_path):
    path = pzd.write_table(tmp_path / "cat.parquet", _table())
    m = pzd.ColumnMapping.from_dict({"bands": {"g": {"mag": "mag_g_lsst", "err": "mag_err_g_lsst"}}})
    with pytest.raises(pzd.MappingError, match="redshift"):
        pzd.load_catalog(path, m, need_redshift=True)
    m = pzd.ColumnMapping.from_dict({"redshift": "z_spec", "bands": {"g": {"mag": "mag_g_lsst", "err": "mag_err_g_lsst"}}})
    with pytest.raises(pzd.MappingError, match="'z_spec'"):
        pzd.load_catalog(path, m, need_redshift=True)


@pytest.mark.parametrize("bad, match", [
    ({"bands": {"g": {"mag": "a"}}}, "'err'"),
    ({"bands": {"g": {"mag": "a", "flux": "b", "err": "c"}}}, "exactly one"),
    ({"bands": {"g": {"flux": "a", "err": "b", "unit": "furlong"}}}, "unknown flux unit"),
    ({"bands": {"g": {"mag": "a", "err": "b"}}, "nondetection": "sometimes"}, "nondetection"),
    ({"bands": {"g": {"mag": "a", "err": "b"}}, "redshfit": "z"}, "unknown key"),
    ({"id": "x"}, "'bands'"),
])
def test_bad_mapping_refused(bad, match):
    with pytest.raises(pzd.MappingError, match=match):
        pzd.ColumnMapping.from_dict(bad)


@pytest.mark.parametrize("spec, want", [
    ({"mag": 99.0}, pzd.NonDetection(mag=(99.0,))), ("nan", pzd.NonDetection(nan=True)),
    (float("nan"), pzd.NonDetection(nan=True)), ({"flux_le": 0}, pzd.NonDetection(flux_le=0.0)),
    ("none", pzd.NonDetection()), ({"mag": [99, -99]}, pzd.NonDetection(mag=(99.0, -99.0))),
])
def test_nondetection_codes(spec, want):
    assert pzd.parse_nondetection(spec) == want


def test_flux_nondetection_codes_and_flags():
    data = {"f": np.array([5.0, -1.0, np.nan, 3.0]), "e": np.array([1.0, 1.0, 1.0, np.inf])}
    m = pzd.ColumnMapping.from_flags(id=None, redshift=None, bands=["r:flux:f:e:nJy"], nondetection="flux_le=0")
    ph = pzd.photometry_from_columns(data, m, need_redshift=False)
    assert list(ph.status[:, 0]) == [pzd.MEASURED, pzd.NONDETECTED, pzd.MISSING, pzd.MISSING]
    assert ph.flux[1, 0] == 0.0 and ph.err[1, 0] == 1.0
    m = pzd.ColumnMapping.from_flags(id=None, redshift=None, bands=["r:flux:f:e"], nondetection="nan")
    ph = pzd.photometry_from_columns(data, m, need_redshift=False)
    assert list(ph.status[:, 0]) == [pzd.MEASURED, pzd.MEASURED, pzd.NONDETECTED, pzd.MISSING]
    assert list(ph.ids) == [0, 1, 2, 3] and ph.id_name == "row"


def test_features_finite_for_any_flux_and_missing_bands_explicit():
    flux = np.array([[100.0, 200.0, 300.0], [-5.0, 0.0, 1e6], [np.nan, 50.0, 60.0]])
    err = np.array([[10.0, 10.0, 10.0], [10.0, 10.0, 10.0], [10.0, 10.0, 0.0]])
    norm = pzd.fit_normalisation(flux, err, ["g", "r", "i"])
    x = pzd.features(flux, err, norm)
    names = norm["features"]
    assert x.shape == (3, len(names)) == (3, 11) and np.isfinite(x).all()
    row = dict(zip(names, x[2]))
    assert row["missing_g"] == 1 and row["missing_i"] == 1 and row["missing_r"] == 0
    assert row["mu_g"] == 0 and row["g-r"] == 0 and row["r-i"] == 0 and row["mu_r"] != 0
    assert dict(zip(names, x[0]))["missing_g"] == 0


def test_reorder_adds_missing_bands():
    ph = pzd.Photometry(["r", "g"], np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2), np.uint8), np.arange(2))
    r = ph.reorder(["u", "g", "r"])
    assert list(r.status[0]) == [pzd.MISSING, 0, 0] and np.isnan(r.flux[0, 0])


def test_match_to_truth_prefers_the_dominant_object():
    obj = {"x": np.array([10.0, 50.0, 90.0]), "y": np.array([10.0, 50.0, 90.0])}
    truth = {"x": np.array([10.3, 11.5, 50.2, 300.0]), "y": np.array([10.0, 10.0, 50.0, 300.0]),
             "flux_i": np.array([10.0, 1000.0, 50.0, 5.0])}
    idx, d = pzd.match_to_truth(obj, truth)
    assert list(idx) == [1, 2, -1]
    assert d[0] == pytest.approx(1.5) and np.isinf(d[2])


def test_several_flux_sets_per_band():
    m = pzd.mock_mapping("gri", kind="psf,ap03")
    bands = list(m.bands)
    assert bands == ["g@psf", "r@psf", "i@psf", "g@ap03", "r@ap03", "i@ap03"]
    assert m.bands["r@ap03"].value == "r_ap03Flux"
    names = pzd.feature_names(bands)
    assert "g@psf-r@psf" in names and "i@psf-g@ap03" not in names and len(names) == 4 * 6 - 2
    flux = np.array([[100.0, 200.0, 300.0, np.nan, 150.0, 250.0]])
    err = np.full((1, 6), 10.0)
    norm = pzd.fit_normalisation(np.repeat(flux, 3, 0), np.repeat(err, 3, 0), bands)
    x = dict(zip(names, pzd.features(flux, err, norm)[0]))
    assert x["missing_g@ap03"] == 1 and x["g@ap03-r@ap03"] == 0 and x["missing_g@psf"] == 0


@pytest.mark.training
def test_band_dropout_blanks_every_set_of_a_band():
    from workflows.train.photoz import band_feature_maps, pipeline_columns

    bands = ["g@psf", "r@psf", "g@ap03", "r@ap03"]
    blank, ind = band_feature_maps(bands)
    names = pzd.feature_names(bands)
    assert blank.shape == ind.shape == (2, len(names))
    g = {n for n, v in zip(names, blank[0]) if v}
    assert g == {"mu_g@psf", "logdmu_g@psf", "mu_g@ap03", "logdmu_g@ap03", "g@psf-r@psf", "g@ap03-r@ap03"}
    assert {n for n, v in zip(names, ind[0]) if v} == {"missing_g@psf", "missing_g@ap03"}
    assert pipeline_columns(["g", "r@ap06"], "psf") == {"g": {"flux": "g_psfFlux", "err": "g_psfFluxErr"},
                                                        "r@ap06": {"flux": "r_ap06Flux", "err": "r_ap06FluxErr"}}


@pytest.mark.slow
def test_mock_seeds_simulated_side_by_side_equal_those_made_one_at_a_time(tmp_path):
    """The photo-z mock catalogue is the same table whether its seeds are simulated and measured
    one after another or two at a time (each seed is independent and cached on its own)."""
    from workflows.photoz_data import build_mock_catalog, read_columns, table_meta

    paths = {}
    for jobs in (1, 2):
        paths[jobs] = build_mock_catalog("150-151", tmp_path / f"cat{jobs}.parquet", workdir=tmp_path / f"work{jobs}",
                                         size=256, bands="gri", jobs=jobs, log=lambda m: None)
    assert table_meta(paths[1])["seeds"] == table_meta(paths[2])["seeds"] == [150, 151]
    cols = ["seed", "truth_id", "z_true", "i_kronFlux", "i_kronFluxErr"]
    one, two = read_columns(paths[1], cols), read_columns(paths[2], cols)
    assert len(one["seed"]) > 20 and set(np.unique(one["seed"])) == {150, 151}
    for c in cols:
        np.testing.assert_array_equal(one[c], two[c], err_msg=c)
