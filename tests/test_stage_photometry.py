"""Photometry stage: fluxes and errors against truth, flags, neighbours, noise-only calibration."""
from __future__ import annotations

import numpy as np

from pipeline.stage import ImageSet
from pipeline.table import Table
from stages import Photometry
from stages.artefacts import ARTEFACT_BITS
from stages.flags import OBJECT_FLAGS
from test_stage_detection import grid_sources, nearest, run_stages, synthetic_tile


def test_isolated_point_sources_positions_and_fluxes_against_truth():
    src = grid_sources(4, 128, 5000.0, seed=110)
    p = run_stages(synthetic_tile(src, seed=111))
    o = p["objects"]
    x, y = np.array([s["x"] for s in src]), np.array([s["y"] for s in src])
    d, k = nearest(o["x"], o["y"], x, y)
    assert len(o) == len(src) and np.all(d < 0.1)
    corr = o.attrs["apcorr"]
    for b in "gri":
        for col, c in (("psfFlux", 1.0), ("ap06Flux", corr[b]["ap06"]), ("ap12Flux", corr[b]["ap12"]), ("kronFlux", 1.0)):
            f = o[f"{b}_{col}"][k] * c
            e = o[f"{b}_{col}Err"][k] * c
            pull = (f - 5000.0) / e
            assert np.all(np.abs(pull) < 4.5), (b, col, pull)
            assert abs(np.median(pull)) < 1.2, (b, col, np.median(pull))
        # the model flux of a point source: its model is the PSF widened by the noise of its measured size, so
        # it may run high by about 1 % (1 sigma here); the PSF flux is the one for point sources
        f, e = o[f"{b}_modelFlux"][k], o[f"{b}_modelFluxErr"][k]
        assert np.all(np.abs(f - 5000.0) / e < 4.5) and abs(np.median(f) / 5000.0 - 1) < 0.015, (b, np.median(f))
    assert np.all(o["refExtendedness"] == 0), "point sources"
    # sky positions from the WCS
    ra, dec = p["exposure"].wcs().all_pix2world(o["x"], o["y"], 0)
    assert np.allclose(o["coord_ra"], ra) and np.allclose(o["coord_dec"], dec)
    assert o.info["g_psfFlux"].unit == "nJy" and o.info["coord_ra"].unit == "deg"
    assert o["g_psfFlux"].dtype == np.float32


def test_saturated_star_flagged_and_its_neighbour_not():
    src = [{"x": 50.2, "y": 60.7, "flux": 3e6}, {"x": 100.3, "y": 30.1, "flux": 8000.0}]
    o = run_stages(synthetic_tile(src, saturate=20000.0, seed=112))["objects"]
    d, k = nearest(o["x"], o["y"], np.array([50.2, 100.3]), np.array([60.7, 30.1]))
    f = np.asarray(o["flags"])
    assert d[0] < 0.3, "the saturated star is one object at its position, not a ring of fragments"
    assert f[k[0]] & OBJECT_FLAGS["saturated"]
    assert not f[k[1]] & OBJECT_FLAGS["saturated"]
    # its masked core is filled by its PSF model fitted to the wings: a total flux within a few %
    assert abs(o["r_psfFlux"][k[0]] / 3e6 - 1) < 0.05


def test_masked_pixels_in_aperture_flagged_and_filled():
    size = 128
    bad = np.zeros((size, size), bool)
    bad[:, 64] = True
    src = [{"x": 62.6, "y": 60.2, "flux": 20000.0}, {"x": 20.2, "y": 100.4, "flux": 20000.0}]
    o = run_stages(synthetic_tile(src, bad=bad, seed=113))["objects"]
    d, k = nearest(o["x"], o["y"], np.array([62.6, 20.2]), np.array([60.2, 100.4]))
    f = np.asarray(o["flags"])
    assert f[k[0]] & OBJECT_FLAGS["masked_pixels"] and not f[k[1]] & OBJECT_FLAGS["masked_pixels"]
    # the masked column through the star is filled with its model: flux not biased low
    for b in "gri":
        assert abs(o[f"{b}_ap06Flux"][k[0]] / o[f"{b}_ap06Flux"][k[1]] - 1) < 0.03


def test_artefact_classes_touching_an_aperture_become_flag_bits_in_their_band():
    size = 128
    art = {b: np.zeros((size, size), np.uint16) for b in "gri"}
    art["r"][40, 44] = ARTEFACT_BITS["hot_pixel"]                      # 3 px from the first star
    art["i"][40:42, 30:60] = ARTEFACT_BITS["satellite_trail"]         # across it
    src = [{"x": 41.3, "y": 40.2, "flux": 20000.0}, {"x": 100.3, "y": 100.6, "flux": 20000.0}]
    masks = ImageSet(art, {"bits": ARTEFACT_BITS.as_attrs()})
    o = run_stages(synthetic_tile(src, seed=114), artefacts=masks)["objects"]
    d, k = nearest(o["x"], o["y"], np.array([41.3, 100.3]), np.array([40.2, 100.6]))
    f = np.asarray(o["flags"])
    assert f[k[0]] & OBJECT_FLAGS["artefact_hot_pixel"] and f[k[0]] & OBJECT_FLAGS["artefact_satellite_trail"]
    assert not f[k[0]] & OBJECT_FLAGS["artefact_cosmic_ray"]
    assert not f[k[1]] & (OBJECT_FLAGS["artefact_hot_pixel"] | OBJECT_FLAGS["artefact_satellite_trail"])
    # per band: each band's flags name only what lies in that band's pixels; flags is their union
    fr, fi, fg = (np.asarray(o[f"{b}_flags"]) for b in "rig")
    assert fr[k[0]] & OBJECT_FLAGS["artefact_hot_pixel"] and not fr[k[0]] & OBJECT_FLAGS["artefact_satellite_trail"]
    assert fi[k[0]] & OBJECT_FLAGS["artefact_satellite_trail"] and not fi[k[0]] & OBJECT_FLAGS["artefact_hot_pixel"]
    art_bits = OBJECT_FLAGS.value(*[n for n in OBJECT_FLAGS.bits if n.startswith("artefact_")])
    assert not fg[k[0]] & art_bits
    assert np.all((fr | fi | fg) & art_bits == f & art_bits)


def test_bright_neighbour_does_not_bias_a_faint_source():
    src = [{"x": 60.2, "y": 64.3, "flux": 400000.0}, {"x": 74.7, "y": 64.6, "flux": 3000.0}]
    tile = synthetic_tile(src, noise=3.0, seed=115)
    out = {}
    for nm in (True, False):
        o = run_stages(tile, configs={"photometry": {"neighbour_models": nm}})["objects"]
        d, k = nearest(o["x"], o["y"], np.array([74.7]), np.array([64.6]))
        assert d[0] < 0.3
        c = o.attrs["apcorr"]["r"]["ap06"]
        out[nm] = ((o["r_ap06Flux"][k[0]] * c - 3000.0) / (o["r_ap06FluxErr"][k[0]] * c),
                   (o["r_psfFlux"][k[0]] - 3000.0) / o["r_psfFluxErr"][k[0]])
    assert abs(out[True][0]) < 3 and abs(out[True][1]) < 3, out[True]
    assert out[False][0] > 5, "without neighbour models the bright star's wings leak in (the control)"


def forced_on_grid(p: dict, size: int, config=None, seed: int = 117):
    """Photometry forced at isolated places (no neighbour within 32 pixels) of a run's products."""
    rng = np.random.default_rng(seed)
    g = np.arange(24, size - 24, 32, dtype=np.float64)
    x, y = (v.ravel() + rng.uniform(-0.5, 0.5, v.size) for v in np.meshgrid(g, g))
    n = x.size
    det = Table()
    det.add("objectId", np.arange(1, n + 1, dtype=np.int64))
    det.add("parentObjectId", np.zeros(n, np.int64))
    det.add("deblend_nChild", np.zeros(n, np.int32))
    det.add("footprintId", np.zeros(n, np.int32))
    det.add("x", x)
    det.add("y", y)
    det.add("a", np.full(n, 2.5, np.float32))
    det.add("b", np.full(n, 2.5, np.float32))
    det.add("theta", np.zeros(n, np.float32))
    det.add("npix", np.zeros(n, np.int32))
    det.add("detect_peakSnr", np.full(n, 5.0, np.float32))
    det.add("detect_isDeblendedSource", np.ones(n, bool))
    det.add("detect_flags", np.zeros(n, np.uint32))
    inputs = {**p, "deblended": det, "deblend_segmentation": ImageSet({"owner": np.zeros((size, size), np.int32)})}
    return Photometry().run({r: inputs[r] for r in Photometry.requires}, config or Photometry.Config())["objects"]


def test_error_calibration_on_pure_noise():
    """Forced photometry at random places on pure noise: |f / sigma| < 1 for ~68 %."""
    size = 512
    p = run_stages(synthetic_tile([], size=size, noise=5.0, seed=116), upto="detection")
    o = forced_on_grid(p, size)
    for col in ("ap03", "ap06", "ap12", "psf", "kron"):
        z = np.concatenate([o[f"{b}_{col}Flux"] / o[f"{b}_{col}FluxErr"] for b in "gri"])
        frac = np.mean(np.abs(z) < 1)
        assert 0.60 < frac < 0.76, (col, frac)
        assert abs(np.median(z)) < 0.25, (col, np.median(z))
    # white noise as the weight map says: the empty apertures find (almost) nothing to add
    for b in "gri":
        extra = o.attrs["empty_apertures"][b]["extra_sigma"]
        assert extra[1] < 0.3 * 5.0 * np.sqrt(np.pi * 36), (b, extra)


def test_noise_the_weight_map_misses_is_added_from_empty_apertures():
    """Correlated noise (as left by background subtraction, undetected sources, resampling) that the weight map
    does not describe: with the empty-aperture term the errors are calibrated again, without it they are not."""
    from scipy import ndimage as ndi

    size = 512
    rng = np.random.default_rng(118)
    corr = {b: 0.8 * ndi.gaussian_filter(rng.normal(0, 1, (size, size)), 2.0) / 0.141 for b in "gri"}  # 0.8 nJy/pixel
    p = run_stages(synthetic_tile([], size=size, noise=5.0, seed=119, extra=corr), upto="detection")
    fr = {}
    for n_empty in (0, Photometry.Config().empty_apertures):
        o = forced_on_grid(p, size, Photometry.Config(empty_apertures=n_empty), seed=120)
        z = np.concatenate([o[f"{b}_ap06Flux"] / o[f"{b}_ap06FluxErr"] for b in "gri"])
        fr[n_empty] = np.mean(np.abs(z) < 1)
    assert fr[0] < 0.58, fr  # the weight map alone: errors too small
    assert 0.6 < fr[Photometry.Config().empty_apertures] < 0.76, fr


def de_vaucouleurs_planes(size: int, flux: float, hlr_arcsec: float, x: float, y: float) -> dict[str, np.ndarray]:
    """A PSF-convolved de Vaucouleurs galaxy (q = 0.7) per band, drawn by GalSim on the tests' pixel grid."""
    import galsim

    from test_stage_detection import FWHM

    gal = galsim.DeVaucouleurs(half_light_radius=hlr_arcsec, flux=flux).shear(q=0.7, beta=30 * galsim.degrees)
    return {b: galsim.Convolve(gal, galsim.Moffat(beta=3.0, fwhm=FWHM[b])).drawImage(
                nx=size, ny=size, scale=0.2, offset=(x - (size - 1) / 2, y - (size - 1) / 2)).array
            for b in "gri"}


def test_bright_galaxy_and_the_stars_on_its_wings_keep_their_own_light():
    """A bright de Vaucouleurs galaxy with three stars (other colours) on its wings: the stars' models must not
    take the galaxy's wing light (fitted wings on its model), nor its Kron ellipse shrink to the core of its
    light (a deblended child takes the larger of its footprint-share and windowed shapes). Before both: the
    galaxy's Kron flux 65 % of its total, the stars' PSF fluxes 1.35-1.8x theirs."""
    size, flux, gx, gy = 256, 3e5, 128.3, 126.2
    stars = [{"x": 143.6, "y": 134.1, "flux": {"g": 2000.0, "r": 5000.0, "i": 9000.0}},
             {"x": 112.2, "y": 115.4, "flux": {"g": 8000.0, "r": 5000.0, "i": 3000.0}},
             {"x": 131.0, "y": 147.5, "flux": {"g": 1500.0, "r": 4000.0, "i": 6000.0}}]
    tile = synthetic_tile(stars, size=size, noise=5.0, seed=118, extra=de_vaucouleurs_planes(size, flux, 1.6, gx, gy))
    sx, sy = np.array([s["x"] for s in stars]), np.array([s["y"] for s in stars])
    star_r = np.array([s["flux"]["r"] for s in stars])
    ratios = {}
    for wings in (True, False):
        o = run_stages(tile, configs={"photometry": {"profile_wings": wings}})["objects"]
        d, k = nearest(o["x"], o["y"], np.r_[gx, sx], np.r_[gy, sy])
        assert np.all(d < 1.0) and len(set(k.tolist())) == 4, ("the galaxy and the three stars are four objects", d)
        assert o["parentObjectId"][k[0]] != 0, "the galaxy is a deblended child"
        ratios[wings] = (np.array([o[f"{b}_kronFlux"][k[0]] / flux for b in "gri"]), o["r_psfFlux"][k[1:]] / star_r)
        # the blend's model flux is its children's sum, so every row has a finite one
        pid = np.asarray(o["parentObjectId"])
        parent = np.flatnonzero(np.asarray(o["objectId"]) == pid[k[0]])[0]
        assert np.isclose(o["r_modelFlux"][parent], o["r_modelFlux"][pid == pid[k[0]]].sum(), rtol=1e-5)
        assert np.isfinite(np.asarray(o["r_modelFluxErr"])).all()
    kron, star = ratios[True]
    assert np.all(kron > 0.8), kron         # a 2.5 Kron-radius aperture holds ~90 % of a de Vaucouleurs profile
    assert np.all(np.abs(star - 1) < 0.1), star
    assert np.all(ratios[False][1] > 1.25), ratios[False][1]  # the control: single-Gaussian models lose the wing light


def test_wing_fractions_recovered_from_a_noiseless_profile():
    """fit_wing_fractions on an object drawn with known wings (core covariance C, 30 % at 4 C, 20 % at 16 C)."""
    from stages.photometry import Stamps, WING_VARIANCE_SCALES, fit_wing_fractions, render_models
    from stages.psf import moffat_mixture

    assert WING_VARIANCE_SCALES == (4.0, 16.0)
    size, x, y = 160, np.array([80.3]), np.array([79.6])
    psf = moffat_mixture(3.5, 3.0)
    cov = np.array([[6.0], [3.0], [1.0], [0.3], [0.2]])
    st = Stamps.make(np.array([0]), x, y, 63, (size, size))
    img = np.zeros(size * size, np.float32)
    st.scatter_add(img, 1000.0 * render_models(psf, st, cov))
    f = fit_wing_fractions(img.reshape(size, size), np.ones((size, size), np.float32), np.zeros((size, size), np.int32),
                           np.array([0]), x, y, cov, psf, (size, size))
    assert np.allclose(f[:, 0], [0.3, 0.2], atol=0.01), f[:, 0]


def test_measuring_in_small_stamp_blocks_gives_the_same_catalogue(monkeypatch):
    """The band loop measures its stamps in blocks of at most BLOCK_PIXELS (memory); every measurement is per
    stamp, so splitting each set into blocks of one stamp changes no flag or count, and a flux by at most
    float32 rounding (numpy's reductions take another path for one stamp than for many)."""
    import stages.photometry as phot

    size, flux, gx, gy = 256, 3e5, 128.3, 126.2
    stars = [{"x": 143.6, "y": 134.1, "flux": {"g": 2000.0, "r": 5000.0, "i": 9000.0}},
             {"x": 60.2, "y": 65.4, "flux": 4000.0}, {"x": 200.0, "y": 210.5, "flux": 800.0},
             {"x": 70.7, "y": 190.1, "flux": 1500.0}]
    tile = synthetic_tile(stars, size=size, noise=5.0, seed=119, extra=de_vaucouleurs_planes(size, flux, 1.6, gx, gy))
    whole = run_stages(tile)["objects"]
    blocks_seen = []
    orig = phot.stamp_blocks

    def one_stamp_per_block(sets, pixels=phot.BLOCK_PIXELS):
        for item in orig(sets, 700):  # 700 < 27^2: every block holds one stamp
            blocks_seen.append(item[1].rows.size)
            yield item

    monkeypatch.setattr(phot, "stamp_blocks", one_stamp_per_block)
    blocks = run_stages(tile)["objects"]
    assert len(whole) == len(blocks) >= 5 and set(blocks_seen) == {1} and len(blocks_seen) >= 3 * len(blocks)
    for c in whole:
        if whole[c].dtype.kind == "f":
            assert np.allclose(whole[c], blocks[c], rtol=1e-6, atol=0, equal_nan=True), c
        else:
            assert np.array_equal(whole[c], blocks[c]), c


def test_model_flux_colours_do_not_depend_on_the_bands_seeing():
    """Small exponential galaxies (hlr 0.5", about the PSF) with a flat spectrum, seen through g, r and i PSFs of
    0.88", 0.82" and 0.78": the PSF fit takes more of a galaxy's light where the PSF is wider, so its g/i ratio
    comes out above 1 (1.077 when written); the model flux convolves the same intrinsic profile with each band's
    PSF, so its colours are the galaxies' own (0.999)."""
    import galsim

    from test_stage_detection import FWHM

    size, flux = 256, 20000.0
    centres = [(40.3 + 58.0 * i, 41.7 + 58.0 * j) for i in range(4) for j in range(4)]
    gal = galsim.Exponential(half_light_radius=0.5, flux=flux).shear(q=0.8, beta=20 * galsim.degrees)
    extra = {}
    for b in "gri":
        img = np.zeros((size, size))
        conv = galsim.Convolve(gal, galsim.Moffat(beta=3.0, fwhm=FWHM[b]))
        for x, y in centres:
            img += conv.drawImage(nx=size, ny=size, scale=0.2, offset=(x - (size - 1) / 2, y - (size - 1) / 2)).array
        extra[b] = img
    o = run_stages(synthetic_tile([], size=size, noise=3.0, seed=119, extra=extra))["objects"]
    d, k = nearest(o["x"], o["y"], np.array([c[0] for c in centres]), np.array([c[1] for c in centres]))
    assert np.all(d < 0.5) and len(set(k.tolist())) == len(centres)
    g_i = {kind: o[f"g_{kind}Flux"][k] / o[f"i_{kind}Flux"][k] for kind in ("model", "psf")}
    assert np.median(g_i["psf"]) > 1.03, ("the PSF fit's colour depends on the seeing", np.median(g_i["psf"]))
    assert abs(np.median(g_i["model"]) - 1) < 0.01, np.median(g_i["model"])
    # the colour's scatter is no larger than its errors say (the size estimate's noise moves every band's model
    # flux alike: the totals scatter more than their errors, the colours do not)
    fg, fi = o["g_modelFlux"][k], o["i_modelFlux"][k]
    err = g_i["model"] * np.hypot(o["g_modelFluxErr"][k] / fg, o["i_modelFluxErr"][k] / fi)
    pull = (g_i["model"] - 1.0) / err
    assert np.all(np.abs(pull) < 4) and 1.4826 * np.median(np.abs(pull)) < 1.5, pull
    for b in "gri":
        assert abs(np.median(o[f"{b}_modelFlux"][k]) / flux - 1) < 0.05, b
    assert o["g_modelFlux"].dtype == np.float32 and o.info["g_modelFlux"].unit == "nJy"


def test_faint_objects_keep_their_detection_positions_and_bright_ones_are_refined():
    """Below ``centroid_min_snr`` (detection peak S/N) the windowed centroid follows the noise as often as the
    object, so the footprint's barycentre stays; brighter objects get the windowed centroid."""
    src = [{"x": 40.3, "y": 50.6, "flux": 60000.0}, {"x": 90.2, "y": 80.7, "flux": 120.0},
           {"x": 30.6, "y": 100.2, "flux": 130.0}]
    p = run_stages(synthetic_tile(src, seed=121))
    o, d = p["objects"], p["deblended"]
    snr = np.asarray(d["detect_peakSnr"])
    faint, bright = snr < 8.0, snr >= 8.0
    assert faint.any() and bright.any(), snr
    assert np.array_equal(np.asarray(o["objectId"]), np.asarray(d["objectId"]))
    assert np.array_equal(o["x"][faint], d["x"][faint]) and np.array_equal(o["y"][faint], d["y"][faint])
    assert not np.allclose(o["x"][bright], d["x"][bright])
    off = run_stages(synthetic_tile(src, seed=121), configs={"photometry": {"centroid_min_snr": 0.0}})["objects"]
    assert not np.allclose(off["x"][faint], d["x"][faint]), "0 refines every object"
