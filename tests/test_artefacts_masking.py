"""How the classical stages use the artefact mask: masked bright cosmic rays are neither detected nor
taken for saturated cores, the sharp classes' wings are grown into the mask, nothing changes
without a mask, and small gaps the mask encloses (a hot column crossing a trail) are closed."""
from __future__ import annotations

import numpy as np

from pipeline.stage import ImageSet
from stages import Background
from stages.artefacts import ARTEFACT_BITS
from stages.background import artefact_bad
from test_stage_detection import run_stages, synthetic_tile

SIZE = 128
SAT = 20000.0


def _cr_tile(peak: float = 15000.0, wing: float = 40.0):
    """A star and, in r only, a 3x2 px cosmic ray brighter than half SATURATE with a faint 1-px rim."""
    cr = {b: np.zeros((SIZE, SIZE)) for b in "gri"}
    cr["r"][59:64, 89:93] = wing  # rim: below the mask's edge, still adds up in the matched filter
    cr["r"][60:63, 90:92] = peak
    tile = synthetic_tile([{"x": 30.2, "y": 30.6, "flux": 20000.0}], size=SIZE, saturate=SAT, extra=cr)
    art = {b: np.zeros((SIZE, SIZE), np.uint16) for b in "gri"}
    art["r"][60:63, 90:92] = ARTEFACT_BITS["cosmic_ray"]
    return tile, ImageSet(art, {"bits": ARTEFACT_BITS.as_attrs()})


def _near(det, x: float, y: float, r: float = 3.0) -> bool:
    return bool(np.any(np.hypot(np.asarray(det["x"]) - x, np.asarray(det["y"]) - y) < r))


def test_masked_bright_cosmic_ray_is_not_saturation_nor_a_detection():
    tile, masks = _cr_tile()
    without = run_stages(tile, upto="detection")
    with_mask = run_stages(tile, upto="detection", artefacts=masks)
    for b in "gri":  # saturation comes from the input mask alone: the same with and without the artefact mask
        assert np.array_equal(with_mask["sky"].saturated[b], without["sky"].saturated[b])
    assert not with_mask["sky"].saturated["r"][60:63, 90:92].any()
    assert _near(without["detections"], 90.5, 61.0)
    assert not _near(with_mask["detections"], 90.5, 61.0), "a masked cosmic ray must not be filled at SATURATE"
    assert _near(with_mask["detections"], 30.2, 30.6), "the star is still detected"


def test_masked_cosmic_ray_above_saturate_is_not_filled():
    tile, masks = _cr_tile(peak=3 * SAT)  # clipped at SATURATE and masked by the input mask, as the mock does
    assert tile.bad["r"][60:63, 90:92].all()
    with_mask = run_stages(tile, upto="detection", artefacts=masks)
    assert not with_mask["sky"].saturated["r"][60:63, 90:92].any()
    assert not _near(with_mask["detections"], 90.5, 61.0)


def test_sharp_classes_grown_by_one_pixel_others_not():
    plane = np.zeros((32, 32), np.uint16)
    plane[10, 10] = ARTEFACT_BITS["cosmic_ray"]
    plane[20, 20] = ARTEFACT_BITS["hot_pixel"]
    plane[5, :] = ARTEFACT_BITS["satellite_trail"]
    masks = ImageSet({"r": plane}, {"bits": ARTEFACT_BITS.as_attrs()})
    grown = artefact_bad(masks, "r", plane.shape, 1, ("cosmic_ray", "hot_pixel"))
    assert grown[9:12, 9:12].all() and grown[19:22, 19:22].all()
    assert grown.sum() == 9 + 9 + 32, "the trail is not grown"
    assert np.array_equal(artefact_bad(masks, "r", plane.shape), plane != 0)
    # the mask's own bit table decides which bits are which
    other = ImageSet({"r": plane}, {"bits": {"cosmic_ray": 4, "hot_pixel": 0}})
    assert artefact_bad(other, "r", plane.shape, 1, ("cosmic_ray",))[19:22, 19:22].all()
    assert artefact_bad(other, "r", plane.shape, 1, ("cosmic_ray",)).sum() == 9 + 1 + 32


def test_background_grows_the_mask_and_is_unchanged_without_one():
    tile, masks = _cr_tile()
    cfg = Background.Config(reuse_exposure=False)  # the same tile runs three times
    sky = Background().run({"exposure": tile, "masks/artefacts": masks}, cfg)["sky"]
    assert sky.bad["r"][59:64, 89:93].all() and (sky.weight["r"][59:64, 89:93] == 0).all()
    assert not sky.bad["g"][59:64, 89:93].any()
    # no mask: the artefact settings play no part
    a = Background().run({"exposure": tile}, cfg)["sky"]
    b = Background().run({"exposure": tile}, Background.Config(artefact_grow=0, reuse_exposure=False))["sky"]
    for band in "gri":
        assert np.array_equal(a.image[band], b.image[band]) and np.array_equal(a.bad[band], b.bad[band])
        assert np.array_equal(a.saturated[band], b.saturated[band])


def _crossing(hole: slice = slice(50, 52)) -> np.ndarray:
    """A trail (rows 48-55) crossed by a hot column (x = 70) with an unmasked gap where they meet."""
    trail, column = ARTEFACT_BITS["satellite_trail"], ARTEFACT_BITS["hot_column"]
    plane = np.zeros((SIZE, SIZE), np.uint16)
    plane[48:56, :] |= trail
    plane[:, 70] |= column
    plane[hole, 69:72] = 0
    return plane


def test_a_gap_where_a_hot_column_crosses_a_trail_gets_the_bits_of_both():
    from stages.artefacts import fill_enclosed_holes

    plane = _crossing()
    before = plane.copy()
    assert fill_enclosed_holes(plane, 16) == 1
    both = ARTEFACT_BITS["satellite_trail"] | ARTEFACT_BITS["hot_column"]
    assert (plane[50:52, 69:72] == both).all()
    changed = plane != before
    assert changed.sum() == 6 and changed[50:52, 69:72].all()


def test_only_small_enclosed_islands_are_filled():
    from stages.artefacts import fill_enclosed_holes

    big = _crossing(slice(49, 55))                           # 18 px: larger than the limit
    assert fill_enclosed_holes(big, 16) == 0 and (big[49:55, 69:72] == 0).all()
    off = _crossing()
    assert fill_enclosed_holes(off, 0) == 0 and (off[50:52, 69:72] == 0).all()
    edge = np.zeros((SIZE, SIZE), np.uint16)                 # an island open to the tile's edge
    edge[0:4, 0:4] = ARTEFACT_BITS["cosmic_ray"]
    edge[0:2, 0:2] = 0
    assert fill_enclosed_holes(edge, 16) == 0 and (edge[0:2, 0:2] == 0).all()
    sky = np.zeros((SIZE, SIZE), np.uint16)                  # the sky itself is never an island
    sky[10, 10] = ARTEFACT_BITS["hot_pixel"]
    assert fill_enclosed_holes(sky, SIZE * SIZE) == 0


def test_gaps_in_a_hot_line_are_bridged_along_it_and_nothing_else_is_touched():
    from stages.artefacts import close_line_gaps

    hot, dead, trail = ARTEFACT_BITS["hot_column"], ARTEFACT_BITS["dead_column"], ARTEFACT_BITS["satellite_trail"]
    plane = np.zeros((SIZE, SIZE), np.uint16)
    plane[40, :] = hot                                        # a hot row with gaps of 1, 3 and 30 pixels
    plane[40, [10, 50, 51, 52]] = 0
    plane[40, 80:110] = 0
    plane[:, 20] |= dead                                      # a dead column with a 2-pixel gap
    plane[60:62, 20] = 0
    plane[90, 0:20] = hot                                     # too short to be a line: its gap stays
    plane[90, 5] = 0
    plane[100, :] |= trail                                    # not a line class: its gap stays
    plane[100, 30] = 0
    before = plane.copy()
    added = close_line_gaps(plane, 16)
    assert (plane[40, [10, 50, 51, 52]] == hot).all()
    assert (plane[40, 80:110] == 0).all()                     # longer than max_gap
    assert (plane[60:62, 20] == dead).all()
    assert plane[90, 5] == 0 and plane[100, 30] == 0
    assert added == 6 and np.count_nonzero(plane != before) == 6
    assert close_line_gaps(before.copy(), 0) == 0


def _sky_with_star(fwhm: float, peak_snr: float, seed: int = 101) -> np.ndarray:
    """Unit-variance noise with a Moffat (beta 3) star of the given FWHM (pixels), off the pixel grid."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE]
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / 3) - 1))
    r2 = (x - 64.3) ** 2 + (y - 63.8) ** 2
    return (rng.normal(size=(SIZE, SIZE)) + peak_snr * (1 + r2 / alpha ** 2) ** -3).astype(np.float32)


def test_sharp_pixels_finds_hits_and_tracks_but_never_a_star():
    from stages.artefacts import sharp_pixels

    ones = np.ones((SIZE, SIZE), np.float32)
    usable = np.ones((SIZE, SIZE), bool)
    for fwhm in (2.0, 3.5, 5.0):                               # undersampled to poor seeing, saturating S/N
        img = _sky_with_star(fwhm, 5000.0)
        assert not sharp_pixels(img, ones, usable, fwhm).any(), fwhm
    img = _sky_with_star(3.5, 300.0)
    img[20, 30] += 40.0                                         # a hot pixel
    img[100, 10:16] += 60.0                                     # a cosmic-ray track along a row
    img[64, 70] += 200.0                                        # a hit on the star's wing
    hits = sharp_pixels(img, ones, usable, 3.5)
    assert hits[20, 30] and hits[100, 10:16].all() and hits[64, 70]
    assert hits.sum() == 8
    assert not sharp_pixels(img, ones, usable, 3.5, snr_min=0).any()


def test_sharp_pixels_ignores_masked_neighbours():
    from stages.artefacts import sharp_pixels

    ones = np.ones((SIZE, SIZE), np.float32)
    img = _sky_with_star(3.5, 300.0)
    img[:, 62] = -500.0                                         # a dead column through the star, masked
    usable = np.ones((SIZE, SIZE), bool)
    usable[:, 62] = False
    assert not sharp_pixels(img, ones, usable, 3.5).any()
    assert sharp_pixels(img, ones, np.ones((SIZE, SIZE), bool), 3.5).any()   # counted, it would make the star "sharp"
