"""Mock strong lenses (lenstronomy): flux conservation, geometry, colours, determinism, impostors."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lenstronomy")
pytest.importorskip("galsim")

from workflows.mock import lenses as L  # noqa: E402
from workflows.mock.sed import galaxy_mags, mag_to_njy  # noqa: E402
from workflows.train.stamps import survey_config  # noqa: E402


@pytest.fixture(scope="module")
def survey():
    return survey_config()


def _lens(**kw):
    p = L.draw_lenses(np.random.default_rng(5), np.array([0.5]), np.array([0.8]), np.array([30.0])).row(0)
    p.update(kw)
    return p


def test_parameters_follow_the_documented_ranges():
    rng = np.random.default_rng(0)
    z_d = rng.uniform(0.2, 1.0, 2000)
    lp = L.draw_lenses(rng, z_d, np.full(2000, 0.7), np.full(2000, 10.0))
    assert lp["theta_e"].min() >= 0.5 and lp["theta_e"].max() <= 3.0
    assert np.all(lp["z_s"] > lp["z_d"] + 0.29) and lp["z_s"].max() <= 3.5
    assert np.all(np.hypot(lp["src_x"], lp["src_y"]) <= 0.6 * lp["theta_e"] + 1e-9)
    assert 0.4 < lp["src_kind"].mean() < 0.6 and np.all(lp["n_clumps"][lp["src_kind"] == 0] == 0)


def test_lensed_light_is_the_magnified_source_flux(survey):
    lens = _lens(theta_e=1.2, src_kind=0, n_clumps=0, clump_frac=0.0, src_re=0.15, src_x=0.1, src_y=0.0)
    img, mu = L.paint_lensed_source(lens, "gri", survey, 64)
    assert mu > 2.0, "a source inside the caustics is multiply imaged and magnified"
    for k, b in enumerate("gri"):
        f = mag_to_njy(galaxy_mags(lens["src_sed"], lens["z_s"], lens["src_mag_i"], b)[0][0]) / survey.band(b).njy_per_unit
        assert img[k].sum() == pytest.approx(mu * f, rel=0.01)


def test_a_centred_source_makes_a_ring_at_the_einstein_radius(survey):
    lens = _lens(theta_e=1.5, q_mass=1.0, gamma=0.0, src_kind=0, n_clumps=0, clump_frac=0.0, src_re=0.08,
                 src_x=0.0, src_y=0.0)
    img, _ = L.paint_lensed_source(lens, "gri", survey, 64)
    yy, xx = np.mgrid[0:64, 0:64] - 32
    r = np.hypot(xx, yy) * survey.pixel_scale
    w = img[2]
    assert np.sum(w * r) / np.sum(w) == pytest.approx(1.5, abs=0.15)


def test_sources_are_bluer_than_their_deflectors(survey):
    rng = np.random.default_rng(3)
    z_d = np.full(200, 0.5)
    lp = L.draw_lenses(rng, z_d, np.full(200, 0.8), np.zeros(200))
    src_gi = np.array([np.subtract(*galaxy_mags(s, z, 22.0, "gi")[0]) for s, z in zip(lp["src_sed"], lp["z_s"])])
    defl_gi = np.subtract(*galaxy_mags(0.0, 0.5, 20.0, "gi")[0])
    assert np.median(src_gi) < defl_gi - 0.8


def test_painting_is_deterministic_and_sub_pixel_offsets_move_the_image(survey):
    lens = _lens(theta_e=1.0)
    a, _ = L.paint_lensed_source(lens, "gri", survey, 48)
    b, _ = L.paint_lensed_source(lens, "gri", survey, 48)
    np.testing.assert_array_equal(a, b)
    c, _ = L.paint_lensed_source(lens, "gri", survey, 48, (0.5, 0.0))
    yy, xx = np.mgrid[0:48, 0:48]
    # the stamp centre sits 0.5 px to the right of the deflector: the light moves 0.5 px left
    assert np.sum(xx * c[2]) / c[2].sum() == pytest.approx(np.sum(xx * a[2]) / a[2].sum() - 0.5, abs=0.05)


@pytest.mark.parametrize("kind", ["ring", "spiral", "tail"])
def test_impostors_have_the_requested_flux(survey, kind):
    rng = np.random.default_rng(11)
    if kind == "ring":
        img, info = L.paint_ring(rng, 0.4, 21.0, "gri", survey, 64)
    elif kind == "spiral":
        img, info = L.paint_spiral_arms(rng, 0.4, 21.0, 0.7, 20.0, 0.8, "gri", survey, 64)
    else:
        img, info = L.paint_tidal_tail(rng, 0.4, 21.0, (0.5, 0.3), "gri", survey, 64)
    fi = mag_to_njy(galaxy_mags(info["sed"], 0.4, 21.0, "i")[0][0]) / survey.band("i").njy_per_unit
    assert img[2].sum() == pytest.approx(fi, rel=0.08)   # light beyond the stamp is lost
    assert np.all(np.isfinite(img)) and img.min() > -1e-6 * img.max()


def test_lensed_snr_scales_with_flux(survey):
    img, _ = L.paint_lensed_source(_lens(theta_e=1.2), "gri", survey, 48)
    s1 = L.lensed_snr(img, "gri", survey)
    assert L.lensed_snr(2 * img, "gri", survey) == pytest.approx(2 * s1)
