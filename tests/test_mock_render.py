"""Rendering and noise: k-space renderer against GalSim, flux, weights, saturation, dead pixels."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("galsim")

from workflows.mock import MASK_BITS, SurveyConfig, TYPES  # noqa: E402
from workflows.mock.population import Footprint, make_population  # noqa: E402
from workflows.mock.render import add_noise, fast_size, render_model, stamp_radius  # noqa: E402
from workflows.mock.seeds import make_rng  # noqa: E402

CFG = SurveyConfig()


@pytest.fixture(scope="module")
def pop():
    return make_population(Footprint(1024, 1024), 111)


@pytest.mark.parametrize("kind", TYPES)
def test_fast_renderer_matches_galsim(pop, kind):
    band = CFG.band("g")
    mi = pop.mag("i")
    cand = np.flatnonzero((pop["type"] == TYPES.index(kind)) & (mi < 24.5))
    assert cand.size, kind
    for o in cand[:3]:
        one = pop.take(np.array([o]))
        one.cols["X"] = one["X"] % 1 + 100.0   # keep the sub-pixel phase, move well inside
        one.cols["Y"] = one["Y"] % 1 + 90.0
        assert fast_size(stamp_radius(one, band))[0] > 0
        fast, _ = render_model(one, band, (200, 200), engine="fast")
        ref, info = render_model(one, band, (200, 200), engine="galsim")
        assert info.n_galsim == 1
        flux = one.flux("g")[0] / band.njy_per_unit
        assert fast.sum() == pytest.approx(flux, rel=2e-3)        # periodic stamps keep all the light
        assert ref.sum() == pytest.approx(flux, rel=5e-3)         # GalSim stamps lose a little wing light
        assert np.abs(fast - ref).max() < 2e-3 * ref.max()


def test_render_auto_splits_engines_and_conserves_flux(pop):
    band = CFG.band("r")
    model, info = render_model(pop, band, (512, 512), galsim_mag=CFG.m5["i"] - 2)
    assert info.n_galsim > 0 and info.n_fast > info.n_galsim
    assert 0 < info.index.size < len(pop)          # only objects that touch the tile are drawn
    inside = (pop["X"] > 60) & (pop["X"] < 452) & (pop["Y"] > 60) & (pop["Y"] < 452)
    # light of objects well inside the tile is all there (edge objects spill out)
    sub = pop.take(np.flatnonzero(inside))
    m2, _ = render_model(sub, band, (512, 512), galsim_mag=CFG.m5["i"] - 2)
    assert m2.sum() == pytest.approx(sub.flux("r").sum() / band.njy_per_unit, rel=3e-3)


@pytest.mark.parametrize("mag_r", [19.5, 23.0])
def test_isolated_star_sums_to_its_true_flux(pop, mag_r):
    """A star alone on a tile: sky-subtracted pixel sum = true flux within the noise."""
    band = CFG.band("r")
    star = np.flatnonzero(pop["type"] == 0)[0]
    one = pop.take(np.array([star]))
    one.cols["flux"] = one["flux"] * 10 ** (-0.4 * (mag_r - one.mag("r")[0]))
    one.cols["flux_disk"] = one.cols["flux"].copy()
    one.cols["X"], one.cols["Y"] = np.array([100.3]), np.array([99.8])
    model, info = render_model(one, band, (200, 200), galsim_mag=CFG.m5["i"] - 2)
    assert info.n_galsim + info.n_fast == 1
    res = add_noise(model, band, make_rng(115, int(mag_r)), dead_fraction=0.0)
    img = res.image - res.background
    yy, xx = np.mgrid[0:200, 0:200]
    ap = np.hypot(xx - 100.3, yy - 99.8) < 30
    flux = img[ap].sum() * band.njy_per_unit
    err = np.sqrt(np.sum(1.0 / res.weight[ap])) * band.njy_per_unit
    true = one.flux("r")[0]
    assert abs(flux - true) < 4 * err + 0.005 * true, (flux, true, err)
    assert err < 0.2 * true


def test_noise_weight_is_inverse_variance():
    band = CFG.band("i")
    model = np.zeros((300, 300))
    model[150, 150] = 5000.0   # a bright pixel: source Poisson noise counts in the weight
    res = add_noise(model, band, make_rng(112, 9), bkg_sigma=0.0, dead_fraction=0.0)
    sky = res.image[:140]
    assert np.var(sky) * np.median(res.weight[:140]) == pytest.approx(1.0, rel=0.05)
    assert res.weight[150, 150] < 0.1 * np.median(res.weight)
    assert np.abs(np.mean(sky)) < 0.01 * band.sigma_sky * 30


def test_saturation_and_dead_pixels():
    band = CFG.band("r")
    model = np.zeros((200, 200))
    psf = band.psf_image(41)
    model[80:121, 80:121] = psf * 10 ** (-0.4 * (15.0 - band.magzero))   # a 15th-mag star
    res = add_noise(model, band, make_rng(113, 9), dead_fraction=2e-4)
    sat = (res.mask & MASK_BITS["saturated"]) != 0
    assert sat[100, 100] and sat.sum() > 5
    assert np.all(res.image[sat] == np.float32(band.saturate))
    assert res.image[~sat].max() <= np.float32(band.saturate)
    dead = (res.mask & MASK_BITS["bad"]) != 0
    assert dead.sum() >= 1
    assert np.all(res.weight[dead] == 0) and np.all(res.image[dead] == 0)
    assert np.all(res.weight[~dead] > 0)


def test_residual_background_is_recorded():
    band = CFG.band("g")
    res = add_noise(np.zeros((256, 256)), band, make_rng(114, 9), bkg_sigma=3.0, dead_fraction=0.0)
    c0, cx, cy = res.bkg_coeffs
    # the smooth plane is recoverable from the image by least squares
    yy, xx = np.mgrid[0:256, 0:256]
    a = np.stack([np.ones(xx.size), ((xx - 127.5) / 256).ravel(), ((yy - 127.5) / 256).ravel()], 1)
    fit = np.linalg.lstsq(a, res.image.ravel().astype(float), rcond=None)[0]
    np.testing.assert_allclose(fit, [c0, cx, cy], atol=5 * band.sigma_sky / 256 * 4)
    assert np.std(res.background) > 0
