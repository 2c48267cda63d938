"""SEDs -> colours: the cached grid against GalSim, colours that follow redshift, mixing."""
from __future__ import annotations

import numpy as np
import pytest

galsim = pytest.importorskip("galsim")

from workflows.mock import sed  # noqa: E402


@pytest.mark.parametrize("name", sed.SED_TYPES)
def test_magnitudes_match_galsim(name):
    s = sed.load_sed(name)
    for z in (0.0, 0.7, 1.5):
        ours = sed.sed_ab_mags(s, "ugrizy", z, igm=False)
        ref = [(s.atRedshift(z) if z else s).calculateMagnitude(sed.load_bandpass(b)) for b in "ugrizy"]
        np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_elliptical_reddens_with_redshift():
    grid = sed.colour_grid()
    gr = [float(grid.colour(0, z, "g", "r")) for z in (0.0, 0.2, 0.4, 0.8)]
    assert gr[1] > gr[0] and gr[2] > gr[1]          # 4000 A break moves through g -> r
    assert gr[3] - gr[0] > 0.5
    # early types are redder than late types at the same redshift
    assert grid.colour(0, 0.3, "g", "i") > grid.colour(1, 0.3, "g", "i") > grid.colour(3, 0.3, "g", "i")


def test_galaxy_mags_reference_band_and_grid_interpolation():
    z = np.array([0.0, 0.333, 1.0, 2.5])
    m = sed.galaxy_mags(np.array([0, 1, 2, 3]), z, np.array([20.0, 21.0, 22.0, 23.0]))
    np.testing.assert_allclose(m[:, "ugrizy".index("i")], [20, 21, 22, 23], atol=1e-9)
    # interpolated grid agrees with the direct integral between grid nodes
    direct = sed.sed_ab_mags(sed.load_sed("Sbc"), "ugrizy", 0.333)
    np.testing.assert_allclose(m[1] - m[1, 3], direct - direct[3], atol=0.01)


def test_fractional_type_is_flux_mixture():
    z, mi = 0.6, 22.0
    a = sed.galaxy_mags(1.0, z, mi)[0]
    b = sed.galaxy_mags(2.0, z, mi)[0]
    mix = sed.galaxy_mags(1.25, z, mi)[0]
    expect = -2.5 * np.log10(0.75 * 10 ** (-0.4 * a) + 0.25 * 10 ** (-0.4 * b))
    np.testing.assert_allclose(mix, expect, atol=1e-9)
    w = np.array([[0.0, 0.75, 0.25, 0.0]])
    np.testing.assert_allclose(sed.galaxy_mags(w, z, mi)[0], expect, atol=1e-9)
    np.testing.assert_allclose(sed.galaxy_mags(1.25, z, mi, bands="gr")[0], expect[[1, 2]], atol=1e-9)


def test_igm_dims_u_band_at_high_redshift():
    s = sed.load_sed("Im")
    with_igm = sed.sed_ab_mags(s, "ug", 3.0, igm=True)
    no_igm = sed.sed_ab_mags(s, "ug", 3.0, igm=False)
    assert with_igm[0] - no_igm[0] > 0.4        # Lyman limit and forest in u at z = 3
    assert with_igm[1] - no_igm[1] < with_igm[0] - no_igm[0]
    assert sed.sed_ab_mags(s, "r", 0.5, igm=True)[0] == pytest.approx(sed.sed_ab_mags(s, "r", 0.5, igm=False)[0])


def test_star_colours_follow_temperature():
    m = sed.star_mags([3200.0, 5800.0, 10000.0], 20.0, bands="gri")
    gi = m[:, 0] - m[:, 2]
    assert gi[0] > gi[1] > gi[2]
    assert gi[0] > 1.5 and gi[2] < 0.0
