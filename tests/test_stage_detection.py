"""Detection stage: matched-filter multi-band detection image, masks honoured, sep overflow handled.

Also holds :func:`synthetic_tile`, the in-memory tile builder the other classical-stage tests use
(Moffat point sources, Gaussian noise, known truth; no FITS, no GalSim, fast).
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.manifest import InnerRegion
from pipeline.tile import TileData
from stages import Background, Deblending, Detection, Photometry
from stages.flags import OBJECT_FLAGS
from stages.psf import moffat_pixelised

PIXSCALE = 0.2  # arcsec / pixel
FWHM = {"g": 0.88, "r": 0.82, "i": 0.78, "z": 0.74, "u": 0.95, "y": 0.70}  # arcsec


def wcs_header(size: int) -> dict:
    s = PIXSCALE / 3600.0
    return {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0, "CRPIX1": size / 2 + 0.5,
            "CRPIX2": size / 2 + 0.5, "CD1_1": -s, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": s, "NAXIS": 2,
            "NAXIS1": size, "NAXIS2": size}


def add_star(img: np.ndarray, x: float, y: float, flux: float, fwhm_pix: float, beta: float = 3.0, half: int = 30) -> None:
    """Add a pixel-integrated Moffat point source of total ``flux`` centred at (x, y)."""
    ix, iy = int(round(x)), int(round(y))
    stamp = moffat_pixelised(fwhm_pix, beta, half, offset=(x - ix, y - iy), oversample=5) * flux
    h, w = img.shape
    y0, y1, x0, x1 = iy - half, iy + half + 1, ix - half, ix + half + 1
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = stamp.shape[0] - max(0, y1 - h), stamp.shape[1] - max(0, x1 - w)
    img[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] += stamp[sy0:sy1, sx0:sx1].astype(np.float32)


def synthetic_tile(sources: list[dict], *, size: int = 128, bands: str = "gri", noise: float = 5.0, seed: int = 100,
                   saturate: float | None = None, bad: np.ndarray | None = None, extra: dict | None = None,
                   tile_id: str = "t0000", inner: InnerRegion | None = None) -> TileData:
    """A tile of Moffat point sources: each source is ``{"x", "y", "flux"}`` (flux: nJy, a number or a
    ``{band: flux}`` dict). ``saturate`` clips pixels above it and masks them (as the mock survey
    does); ``bad`` marks masked pixels in every band; ``extra`` adds images per band (e.g. artefacts)."""
    rng = np.random.default_rng(seed)
    image, weight, badm, header = {}, {}, {}, {}
    for b in bands:
        fwhm_pix = FWHM[b] / PIXSCALE
        img = np.zeros((size, size), np.float32)
        for s in sources:
            f = s["flux"][b] if isinstance(s["flux"], dict) else s["flux"]
            add_star(img, s["x"], s["y"], f, fwhm_pix)
        img += rng.normal(0.0, noise, img.shape).astype(np.float32)
        if extra and b in extra:
            img += extra[b].astype(np.float32)
        m = np.zeros(img.shape, bool) if bad is None else bad.copy()
        hdr = {"PSF_FWHM": FWHM[b], "FLUXSCALE": 1.0}
        if saturate is not None:
            sat = img > saturate
            img[sat] = saturate
            m |= sat
            hdr["SATURATE"] = hdr["SATURATE_NJY"] = float(saturate)
        img[m] = 0.0
        w = np.where(m, 0.0, 1.0 / noise**2).astype(np.float32)
        image[b], weight[b], badm[b], header[b] = img, w, m, hdr
    return TileData(tile_id, list(bands), image, weight, badm, header, wcs_header(size), inner)


def run_stages(tile: TileData, upto: str = "photometry", configs: dict | None = None, artefacts=None) -> dict:
    """Run the classical stages in order on an in-memory tile; returns every product. The tile's planes
    are left as they were (tests run one tile several times), unless ``configs`` says otherwise."""
    configs = {"background": {"reuse_exposure": False}} | (configs or {})
    products = {"exposure": tile}
    if artefacts is not None:
        products["masks/artefacts"] = artefacts
    for cls in (Background, Detection, Deblending, Photometry):
        st = cls()
        products.update(st.run({r: products[r] for r in (*st.requires, *st.optional) if r in products},
                               cls.Config(**configs.get(st.name, {}))))
        if st.name == upto:
            break
    return products


def detection_snr(products: dict) -> np.ndarray:
    """The matched-filter S/N detection image of a run (recomputed as the stages do)."""
    from stages.detection import detection_planes

    return detection_planes(products["exposure"], products["sky"], products["detections"].attrs)[2]


def grid_sources(n_side: int, size: int, flux, margin: int = 16, seed: int = 101) -> list[dict]:
    """Isolated sources on a jittered grid (sub-pixel positions)."""
    rng = np.random.default_rng(seed)
    step = (size - 2 * margin) / (n_side - 1)
    return [{"x": margin + i * step + rng.uniform(-0.5, 0.5), "y": margin + j * step + rng.uniform(-0.5, 0.5), "flux": flux}
            for i in range(n_side) for j in range(n_side)]


def nearest(det_x, det_y, x, y):
    d = np.hypot(np.asarray(det_x)[:, None] - x, np.asarray(det_y)[:, None] - y)
    return d.min(axis=0), d.argmin(axis=0)


def test_isolated_sources_detected_at_their_positions():
    src = grid_sources(4, 128, 20000.0)
    p = run_stages(synthetic_tile(src), upto="detection")
    det = p["detections"]
    x, y = np.array([s["x"] for s in src]), np.array([s["y"] for s in src])
    d, _ = nearest(det["x"], det["y"], x, y)
    assert len(det) == len(src), "one detection per source, nothing spurious"
    assert np.all(d < 0.1), f"high-S/N positions within 0.1 px, got max {d.max():.3f}"


def test_detection_image_is_unit_noise_and_clean_on_pure_noise():
    p = run_stages(synthetic_tile([], size=256, seed=102), upto="detection")
    snr = detection_snr(p)
    assert 0.9 < snr.std() < 1.1 and abs(snr.mean()) < 0.2
    assert len(p["detections"]) <= 1  # 4 sigma on 65k pixels of matched-filter noise: ~no false detection


def test_masked_column_is_not_detected():
    size = 128
    bad = np.zeros((size, size), bool)
    bad[:, 70] = True
    hot = {b: np.zeros((size, size)) for b in "gri"}
    for b in hot:
        hot[b][:, 70] = 5000.0  # a hot column, masked in every band
    src = [{"x": 30.3, "y": 40.7, "flux": 20000.0}]
    p = run_stages(synthetic_tile(src, bad=bad, extra=hot), upto="detection")
    det = p["detections"]
    assert len(det) == 1 and abs(det["x"][0] - 30.3) < 0.2
    assert detection_snr(p)[:, 70].max() < 4.0


def test_unmasked_hot_column_would_be_detected():
    """The control: the same column without its mask is detected (so the test above tests the mask)."""
    size = 128
    hot = {b: np.zeros((size, size)) for b in "gri"}
    for b in hot:
        hot[b][:, 70] = 5000.0
    det = run_stages(synthetic_tile([], extra=hot), upto="detection")["detections"]
    assert np.any(np.abs(np.asarray(det["x"]) - 70) < 2)


def test_artefact_mask_pixels_excluded_from_detection():
    from pipeline.stage import ImageSet
    from stages.artefacts import ARTEFACT_BITS

    size = 128
    cr = {b: np.zeros((size, size)) for b in "gri"}
    cr["r"][60:63, 90:92] = 30000.0  # a cosmic ray in r only
    art = {b: np.zeros((size, size), np.uint16) for b in "gri"}
    art["r"][60:63, 90:92] = ARTEFACT_BITS["cosmic_ray"]
    tile = synthetic_tile([{"x": 30.2, "y": 30.6, "flux": 20000.0}], extra=cr)
    masks = ImageSet(art, {"bits": ARTEFACT_BITS.as_attrs()})
    with_mask = run_stages(tile, upto="detection", artefacts=masks)["detections"]
    without = run_stages(tile, upto="detection")["detections"]
    assert not np.any(np.hypot(np.asarray(with_mask["x"]) - 90.5, np.asarray(with_mask["y"]) - 61) < 3)
    assert np.any(np.hypot(np.asarray(without["x"]) - 90.5, np.asarray(without["y"]) - 61) < 3)


def test_sep_overflow_becomes_a_flag_not_a_failure():
    src = grid_sources(3, 128, 30000.0) + [{"x": 64.0, "y": 64.0 + 5.0, "flux": 25000.0}]
    tile = synthetic_tile(src)
    # sub-object limit 1 with no retries: sep's deblending overflows, the tile is extracted without it
    cfg = {"detection": {"sub_object_limit": 1, "overflow_retries": 0}}
    with pytest.warns(RuntimeWarning, match="deblending overflow"):
        p = run_stages(tile, configs=cfg)
    f = np.asarray(p["objects"]["flags"])
    assert len(p["objects"]) >= 9
    assert np.all(f & OBJECT_FLAGS["deblend_overflow"])
    # a tiny pixel stack is grown until it fits: same objects as with the default, flagged
    small = run_stages(tile, upto="detection", configs={"detection": {"pixstack": 100}})["detections"]
    ref = run_stages(tile, upto="detection")["detections"]
    assert len(small) == len(ref)
    assert np.all(np.asarray(small["detect_flags"]) & OBJECT_FLAGS["pixstack_overflow"])
    assert not np.any(np.asarray(ref["detect_flags"]) & OBJECT_FLAGS["pixstack_overflow"])


def test_detection_image_mostly_above_threshold_is_refused_naming_tile_and_reason():
    from stages.detection import DetectionConfig, check_above_fraction

    rng = np.random.default_rng(102)
    snr = rng.normal(0.0, 1.0, (256, 256)).astype(np.float32)
    nodata = np.zeros(snr.shape, bool)
    check_above_fraction("t0042", snr, nodata, DetectionConfig())  # sky of unit noise: nothing above 4 sigma
    # a background left under-subtracted by ~0.5 sigma per pixel shows as S/N ~5.5 after the matched filter
    with pytest.raises(ValueError, match=r"tile 't0042': (8[0-9]|9[0-9]) % of the detection image.*median matched-filter S/N 5\.[0-9]"):
        check_above_fraction("t0042", snr + 5.5, nodata, DetectionConfig())
    # pixels without data do not count
    nodata[:, 40:] = True
    check_above_fraction("t0042", np.where(nodata, snr + 5.5, snr), nodata, DetectionConfig())


def test_detection_stage_applies_the_above_threshold_limit():
    tile = synthetic_tile(grid_sources(4, 128, 30000.0), tile_id="t0007")
    run_stages(tile, upto="detection")  # the default limit (half the tile) passes a normal tile
    with pytest.raises(ValueError, match="tile 't0007'.*above the 4-sigma threshold"):
        run_stages(tile, upto="detection", configs={"detection": {"max_above_fraction": 0.01}})
