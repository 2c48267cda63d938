"""Deblending stage: close pairs split into children with explicit parent/child records."""
from __future__ import annotations

import numpy as np

from pipeline.stage import ImageSet
from stages.artefacts import ARTEFACT_BITS
from stages.flags import OBJECT_FLAGS
from test_stage_detection import run_stages, synthetic_tile

RED = {"u": 500.0, "g": 1500.0, "r": 3000.0, "i": 5000.0, "z": 7000.0, "y": 8000.0}
BLUE = {"u": 6000.0, "g": 6000.0, "r": 4000.0, "i": 2500.0, "z": 1500.0, "y": 1000.0}
GREY = {b: 3000.0 for b in "ugrizy"}


def pair(sep_pix: float, a=RED, b=BLUE):
    x0, y0 = 60.3, 64.4
    return [{"x": x0, "y": y0, "flux": a}, {"x": x0 + 0.8 * sep_pix, "y": y0 + 0.6 * sep_pix, "flux": b}]


def test_close_pair_of_different_colours_split_into_two_children_with_a_parent():
    src = pair(5.0)  # 1.0 arcsec, ~1.2 PSF FWHM: no saddle in the matched-filter image
    tile = synthetic_tile(src, bands="ugrizy", noise=3.0, seed=104)
    sex_like = run_stages(tile, upto="deblending", configs={"deblending": {"peaks": False}})["deblended"]
    assert len(sex_like) == 1, "sep's multi-threshold deblending alone does not split this pair"
    p = run_stages(tile)
    d, o = p["deblended"], p["objects"]
    assert len(d) == 3
    parent = np.flatnonzero(np.asarray(o["deblend_nChild"]) > 0)
    assert parent.size == 1 and o["deblend_nChild"][parent[0]] == 2
    kids = np.flatnonzero(np.asarray(o["parentObjectId"]) == o["objectId"][parent[0]])
    assert kids.size == 2
    assert not o["detect_isPrimary"][parent[0]] and not o["detect_isDeblendedSource"][parent[0]]
    assert np.all(o["detect_isPrimary"][kids]) and o["parentObjectId"][parent[0]] == 0
    assert np.all(np.asarray(o["flags"])[kids] & OBJECT_FLAGS["deblended_child"])
    # each child at its source, within 0.25 px; each with its own colours (neighbour not in its flux)
    for s in src:
        dist = np.hypot(o["x"][kids] - s["x"], o["y"][kids] - s["y"])
        k = kids[np.argmin(dist)]
        assert dist.min() < 0.25
        for b in "ugrizy":
            f, e = o[f"{b}_psfFlux"][k], o[f"{b}_psfFluxErr"][k]
            assert abs(f - s["flux"][b]) < max(6 * e, 0.04 * s["flux"][b]), (b, f, s["flux"][b], e)
    # the segmentation gives every footprint pixel to one child, none to the parent
    owner = p["deblend_segmentation"].planes["owner"]
    assert set(np.unique(owner)) == {0, *(kids + 1)}


def test_pair_of_identical_colours_split_only_behind_a_valley():
    close = run_stages(synthetic_tile(pair(3.0, GREY, GREY), bands="ugrizy", noise=3.0, seed=105), upto="deblending")
    assert len(close["deblended"]) == 1, "no colour difference and no valley: one object (no shredding of galaxies)"
    wide = run_stages(synthetic_tile(pair(9.0, GREY, GREY), bands="ugrizy", noise=3.0, seed=105), upto="deblending")
    assert len(wide["deblended"]) == 3, "a clear saddle: sep splits it"


def _red_galaxy_with_masked_column(sig: float, offset: int, bands: str):
    """A red Gaussian galaxy of ``sig`` px and a dead column ``offset`` px from its centre in ``bands``."""
    size, x0, y0 = 128, 64.3, 63.6
    yy, xx = np.mgrid[:size, :size]
    prof = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sig ** 2)) / (2 * np.pi * sig ** 2)
    art = {b: np.zeros((size, size), np.uint16) for b in "ugrizy"}
    for b in bands:
        art[b][:, int(round(x0)) + offset] = ARTEFACT_BITS["dead_column"]
    tile = synthetic_tile([], bands="ugrizy", noise=3.0, seed=116, extra={b: 40 * RED[b] * prof for b in "ugrizy"})
    return tile, ImageSet(art, {"bits": ARTEFACT_BITS.as_attrs()}), (x0, y0)


def test_a_column_masked_in_one_band_does_not_split_a_bright_galaxy():
    """A dead column in the brightest band 2 px from a red galaxy's centre: the plain S/N coadd has a valley
    along it and a second peak beyond it (a duplicate child); the filled peak image keeps one galaxy."""
    tile, masks, (x0, y0) = _red_galaxy_with_masked_column(4.0, 2, "y")
    plain = run_stages(tile, upto="deblending", artefacts=masks, configs={"deblending": {"peak_fill_pix": 0}})
    assert len(plain["deblended"]) == 3, "control: the valley along the column splits the galaxy"
    d = run_stages(tile, upto="deblending", artefacts=masks)["deblended"]
    assert len(d) == 1 and np.hypot(d["x"][0] - x0, d["y"][0] - y0) < 0.5


def test_filling_a_masked_column_raises_no_ridge_on_a_compact_galaxy():
    """The fill interpolates across the column from its neighbours: on a compact galaxy's convex flank a
    smoothing fill (a 5x5 box mean was tried) overshoots into a ridge and splits the galaxy; this one does not."""
    tile, masks, _ = _red_galaxy_with_masked_column(2.0, 3, "zy")
    assert len(run_stages(tile, upto="deblending", artefacts=masks)["deblended"]) == 1


def test_fill_masked_bands_interpolates_each_band_from_itself():
    from types import SimpleNamespace

    from stages.deblending import fill_masked_bands
    from stages.detection import coadd_planes

    yy, xx = np.mgrid[:32, :32].astype(np.float32)
    img = {"g": 10 + xx, "r": 50 + 2 * yy}  # smooth, different per band
    wt = {"g": np.full((32, 32), 4.0, np.float32), "r": np.full((32, 32), 1.0, np.float32)}
    wt["r"][:, 10] = 0  # a dead column in r only
    wt["r"][20, 20] = 0
    sky = SimpleNamespace(image=img, weight=wt, saturated={})
    num, den = coadd_planes(sky, ["g", "r"])
    fill_masked_bands(num, den, sky, ["g", "r"], 1)
    full_num = 4 * img["g"] + img["r"]
    assert np.allclose(den, 5.0) and np.allclose(num, full_num, rtol=1e-5)
    num0, den0 = coadd_planes(sky, ["g", "r"])
    fill_masked_bands(num0, den0, sky, ["g", "r"], 0)
    assert np.allclose(den0[:, 10], 4.0), "0: no filling"


def test_isolated_sources_have_no_parent_records():
    src = [{"x": 30.4, "y": 30.2, "flux": 8000.0}, {"x": 90.1, "y": 80.7, "flux": 8000.0}]
    o = run_stages(synthetic_tile(src))["objects"]
    assert len(o) == 2
    assert np.all(np.asarray(o["parentObjectId"]) == 0) and np.all(np.asarray(o["deblend_nChild"]) == 0)
    assert np.all(o["detect_isPrimary"])
    ids = np.asarray(o["objectId"])
    assert len(set(ids.tolist())) == 2 and ids.dtype == np.int64



def knotty_galaxy(seed: int = 2, size: int = 128, knot_frac: float = 0.3, n_knots: int = 21, hlr: float = 12.0,
                  flux_i: float = 40000.0):
    """A clumpy irregular galaxy as the mock survey draws one: an exponential disk (half-light radius ``hlr`` px)
    plus ``n_knots`` point-like knots of its colour (``knot_frac`` of the light) in clusters of three; centred at
    (64.3, 63.8). Returns the knots (sources), the disk (extra images, convolved with each band's PSF), the centre."""
    from scipy import ndimage as ndi

    from test_stage_detection import FWHM, PIXSCALE

    rng = np.random.default_rng(seed)
    x0, y0, h = 64.3, 63.8, hlr / 1.678
    yy, xx = np.mgrid[:size, :size]
    disk = np.exp(-np.hypot(xx - x0, yy - y0) / h)
    disk /= disk.sum()
    pos = []
    for _ in range(n_knots // 3):
        cx, cy = x0 + rng.normal(0, 0.7 * hlr), y0 + rng.normal(0, 0.7 * hlr)
        pos += [(cx + rng.normal(0, 2.0), cy + rng.normal(0, 2.0)) for _ in range(3)]
    scale = flux_i / RED["i"]
    knots = [{"x": x, "y": y, "flux": {b: knot_frac / len(pos) * scale * f for b, f in RED.items()}} for x, y in pos]
    extra = {b: ((1 - knot_frac) * scale * f * ndi.gaussian_filter(disk, FWHM[b] / PIXSCALE / 2.355)).astype(np.float32)
             for b, f in RED.items()}
    return knots, extra, (x0, y0)


def test_knots_of_a_clumpy_galaxy_are_not_children():
    knots, extra, (x0, y0) = knotty_galaxy()
    tile = synthetic_tile(knots, bands="ugrizy", noise=5.0, seed=107, extra=extra)
    old = {"peak_samesep": False, "peak_excess_all": False, "sep_barycentre": False, "peak_residual": False}
    for cfg, n_expect in ((old, 2), ({}, 1)):
        d = run_stages(tile, upto="deblending", configs={"deblending": cfg})["deblended"]
        meas = np.asarray(d["detect_isDeblendedSource"])
        dist = np.hypot(np.asarray(d["x"])[meas] - x0, np.asarray(d["y"])[meas] - y0)
        if cfg is old:  # the control: the peak tests alone split it into clumps, none within 1 arcsec of the centre
            assert meas.sum() >= n_expect and dist.min() > 5.0, (meas.sum(), dist)
        else:
            assert meas.sum() == n_expect, "one galaxy, one measured object (knots are not children)"
            assert dist[0] < 5.0, "at the galaxy's centre (within 1 arcsec), not on a knot"
    o = run_stages(tile)["objects"]
    meas = np.asarray(o["detect_isDeblendedSource"])
    assert meas.sum() == 1 and np.hypot(o["x"][meas][0] - x0, o["y"][meas][0] - y0) < 5.0


def galaxy_with_companion(sep_pix: float, ratio: float, hlr: float = 8.0, flux_i: float = 60000.0, seed: int = 120):
    """A red exponential disk (half-light radius ``hlr`` px, PSF-convolved per band) at (64.3, 63.8) and, when
    ``ratio`` > 0, a blue point source ``ratio`` times its i flux at ``sep_pix`` px: a shoulder on its slope, no
    local maximum of its own. Returns the tile, the disk's centre and the companion's position."""
    from scipy import ndimage as ndi

    from test_stage_detection import FWHM, PIXSCALE

    x0, y0 = 64.3, 63.8
    yy, xx = np.mgrid[:128, :128]
    disk = np.exp(-np.hypot(xx - x0, yy - y0) / (hlr / 1.678))
    disk /= disk.sum()
    scale = flux_i / RED["i"]
    extra = {b: (scale * f * ndi.gaussian_filter(disk, FWHM[b] / PIXSCALE / 2.355)).astype(np.float32)
             for b, f in RED.items()}
    cx, cy = x0 + 0.8 * sep_pix, y0 + 0.6 * sep_pix
    comp = [{"x": cx, "y": cy, "flux": {b: ratio * flux_i * f / BLUE["i"] for b, f in BLUE.items()}}] if ratio else []
    return synthetic_tile(comp, bands="ugrizy", noise=5.0, seed=seed, extra=extra), (x0, y0), (cx, cy)


def test_a_fainter_galaxy_on_a_bright_galaxys_slope_is_found_by_the_mirror_residual():
    tile, (x0, y0), (cx, cy) = galaxy_with_companion(4.0, 0.1)  # 0.8 arcsec, 2.5 mag fainter
    off = run_stages(tile, upto="deblending", configs={"deblending": {"peak_residual": False}})["deblended"]
    assert np.asarray(off["detect_isDeblendedSource"]).sum() == 1, "the control: no local maximum, one object"
    o = run_stages(tile)["objects"]
    kids = np.flatnonzero(np.asarray(o["parentObjectId"]) != 0)
    assert kids.size == 2 and np.asarray(o["detect_isDeblendedSource"]).sum() == 2
    d_comp = np.hypot(o["x"][kids] - cx, o["y"][kids] - cy)
    d_gal = np.hypot(o["x"][kids] - x0, o["y"][kids] - y0)
    comp, gal = kids[np.argmin(d_comp)], kids[np.argmin(d_gal)]
    # (the galaxy child's windowed centroid is pushed ~0.5" away from the companion: the neighbour models are
    # Gaussians, the disk is exponential; on the validation tiles blended centroids did not get worse)
    assert comp != gal and d_comp.min() < 1.0 and d_gal.min() < 3.0, (d_comp, d_gal)
    # each child has its own colour: the blue companion's g/i well above 1, the red galaxy's well below
    assert o["g_psfFlux"][comp] / o["i_psfFlux"][comp] > 1.2 and o["g_psfFlux"][gal] / o["i_psfFlux"][gal] < 0.6


def test_a_symmetric_bright_galaxy_or_saturated_star_makes_no_mirror_residual_child():
    tile, _, _ = galaxy_with_companion(4.0, 0.0)
    assert np.asarray(run_stages(tile, upto="deblending")["deblended"]["detect_isDeblendedSource"]).sum() == 1
    star = synthetic_tile([{"x": 64.3, "y": 63.6, "flux": 3e6}], bands="ugrizy", noise=5.0, seed=121, saturate=20000.0)
    d = run_stages(star, upto="deblending")["deblended"]
    assert np.asarray(d["detect_isDeblendedSource"]).sum() == 1


def test_mirror_residual_peaks_finds_the_asymmetric_light_only():
    from stages.deblending import mirror_residual_peaks

    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    gal = 1000 * np.exp(-((xx - 31.6) ** 2 + (yy - 32.3) ** 2) / (2 * 4.0 ** 2))
    bump = 300 * np.exp(-((xx - 37.0) ** 2 + (yy - 32.0) ** 2) / (2 * 1.2 ** 2))
    foot = np.ones((64, 64), np.int32)
    q = (np.array([32]), np.array([32]))  # integer peak; the mirror is taken through the sub-pixel one
    ry, rx = mirror_residual_peaks(gal, foot, *q, 10, 5.0, 2.0, 0.3)
    assert ry.size == 0, "a symmetric profile off the pixel grid leaves no residual peak"
    ry, rx = mirror_residual_peaks(gal + bump, foot, *q, 10, 5.0, 2.0, 0.3)
    assert ry.size == 1 and abs(rx[0] - 37) <= 1 and abs(ry[0] - 32) <= 1
    exclude = np.zeros((64, 64), bool)
    exclude[30:35, 35:40] = True  # e.g. saturated pixels: no residual taken there
    assert mirror_residual_peaks(gal + bump, foot, *q, 10, 5.0, 2.0, 0.3, exclude)[0].size == 0


def test_peak_tests_of_a_crowded_footprint_are_bounded_and_flagged(monkeypatch):
    """A footprint with many more peaks than max_children allows (here a dense, touching grid of stars)
    compares only the brightest CANDIDATES_PER_CHILD x max_children of them pairwise, and is flagged."""
    import stages.deblending as D
    from test_stage_detection import grid_sources

    sizes = []
    orig = D._group_pairs

    def spy(group):
        sizes.append(int(np.bincount(group).max()) if group.size else 0)
        return orig(group)

    monkeypatch.setattr(D, "_group_pairs", spy)
    src = grid_sources(12, 96, 20000.0, margin=16, seed=103)  # 144 stars 5.8 px apart: one footprint
    tile = synthetic_tile(src, size=128)
    p = run_stages(tile, upto="deblending", configs={"deblending": {"max_children": 3}})
    deb = p["deblended"]
    nchild = np.asarray(deb["deblend_nChild"])
    assert nchild.max() <= 3
    assert max(sizes) <= D.CANDIDATES_PER_CHILD * 3
    big = np.asarray(deb["footprintId"]) == np.asarray(deb["footprintId"])[np.argmax(nchild)]
    assert np.all(np.asarray(deb["detect_flags"])[big] & OBJECT_FLAGS["deblend_overflow"])
    # control: with room for 100 children the same footprint has more peaks than the cap above let through
    sizes.clear()
    run_stages(tile, upto="deblending", configs={"deblending": {"max_children": 100}})
    assert max(sizes) > D.CANDIDATES_PER_CHILD * 3
