"""The true population: number counts, redshifts, sizes, types, blend groups, determinism."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("galsim")

from workflows.mock import SurveyConfig, TYPES  # noqa: E402
from workflows.mock.population import Footprint, combined_hlr, make_population  # noqa: E402

SEED = 103


@pytest.fixture(scope="module")
def pop():
    return make_population(Footprint(2048, 2048), SEED)


def test_galaxy_counts_slope(pop):
    gal = pop["type"] > 0
    mi = pop.mag("i")[gal]
    assert mi.min() >= 18.0 - 1e-9 and mi.max() <= SurveyConfig().m5["i"] + 1.5 + 1e-9
    edges = np.arange(19.0, 26.51, 0.5)
    n, _ = np.histogram(mi, edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    slope = np.polyfit(centres, np.log10(n), 1, w=np.sqrt(n))[0]
    assert slope == pytest.approx(0.3, abs=0.03)
    # ~200 galaxies per arcmin^2 at the default depth, extending 1.5 mag past the i-band m5
    area = Footprint(2048, 2048).area_arcmin2
    assert 150 < gal.sum() / area < 260
    assert np.mean(mi > SurveyConfig().m5["i"]) > 0.3


def test_redshift_and_size_depend_on_magnitude(pop):
    gal = pop["type"] > 0
    mi, z, hlr = pop.mag("i")[gal], pop["z"][gal], pop["hlr"][gal]
    bright, faint = mi < 22, mi > 25
    assert np.median(z[faint]) > np.median(z[bright]) + 0.3
    assert np.median(hlr[faint]) < 0.5 * np.median(hlr[bright])
    # SED follows morphology: spheroids carry E-like SEDs, irregulars Im-like
    ty = pop["type"][gal]
    assert np.all(pop["sed_disk"][gal][ty == TYPES.index("irregular")] >= 2.4)
    assert np.all(pop["sed_bulge"][gal][ty == TYPES.index("spheroid")] <= 0.3)
    # at the same redshift, spheroids are redder in g - i than irregulars
    gi = pop.mag("g")[gal] - mi
    zsel = (z > 0.3) & (z < 0.6)
    assert np.median(gi[zsel & (ty == 1)]) > np.median(gi[zsel & (ty == 4)]) + 0.5
    assert set(np.unique(ty)) == {1, 2, 3, 4}
    edge = ty == TYPES.index("edgeon")
    assert np.median(pop["q"][gal][edge]) < 0.3 < np.median(pop["q"][gal][ty == 2])


def test_stars_with_some_saturating():
    fp = Footprint(2048, 2048)
    p = make_population(fp, SEED, bright_star_regions=[(0, (0, 2048, 0, 2048))], min_bright_stars=2)
    star = p["type"] == 0
    assert 80 < star.sum() < 400
    assert (p.mag("i")[star] < 17.5).sum() >= 2
    assert np.all(p["hlr"][star] == 0)
    assert np.all(p["teff"][star] > 2500)


def test_combined_hlr_limits():
    h = combined_hlr(np.array([0.0, 1.0, 0.3]), np.array([0.5, 0.5, 0.3]), np.array([1.0, 1.0, 1.0]))
    assert h[0] == pytest.approx(1.0, rel=1e-4)
    assert h[1] == pytest.approx(0.5, rel=1e-4)
    assert 0.3 < h[2] < 1.0


def test_blend_groups_link_close_pairs(pop):
    cfg = SurveyConfig()
    det = np.flatnonzero(pop.mag("i") < cfg.m5["i"] + 1.0)
    from scipy.spatial import cKDTree

    pos = np.stack([pop["X"][det], pop["Y"][det]], 1) * 0.2
    pairs = cKDTree(pos).query_pairs(1.5, output_type="ndarray")
    assert len(pairs) > 20                               # natural blends from the density alone
    g = pop["blend_group"]
    assert np.all(g[det[pairs[:, 0]]] == g[det[pairs[:, 1]]])
    # group id is the smallest member id; sizes are consistent
    for gid in np.unique(g[pop["blend_size"] > 1])[:50]:
        members = np.flatnonzero(g == gid)
        assert pop["id"][members].min() == gid
        assert np.all(pop["blend_size"][members] == members.size)
    faint = pop.mag("i") >= cfg.m5["i"] + 1.0
    assert np.all(g[faint] == pop["id"][faint])


def test_population_is_seeded_and_local():
    a = make_population(Footprint(700, 600), 104)
    b = make_population(Footprint(700, 600), 104)
    c = make_population(Footprint(700, 600), 105)
    np.testing.assert_array_equal(a["X"], b["X"])
    np.testing.assert_array_equal(a["flux"], b["flux"])
    assert len(a) != len(c) or not np.allclose(a["X"], c["X"])
    # the first 512 x 512 cell holds the same objects whatever the footprint size
    big = make_population(Footprint(1500, 1500), 104)
    sel_a = (a["X"] < 512) & (a["Y"] < 512)
    sel_b = (big["X"] < 512) & (big["Y"] < 512)
    np.testing.assert_array_equal(np.sort(a["X"][sel_a]), np.sort(big["X"][sel_b]))
