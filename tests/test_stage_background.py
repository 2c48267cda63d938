"""Background stage: sky level and slope removed, noise from the weight map, saturation, artefact masks."""
from __future__ import annotations

import numpy as np

from pipeline.stage import ImageSet
from stages import Background
from stages.artefacts import ARTEFACT_BITS
from test_stage_detection import grid_sources, run_stages, synthetic_tile


def plane(size: int, c0: float, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return c0 + cx * (xx - size / 2) / size + cy * (yy - size / 2) / size


def test_sloped_sky_is_removed_to_a_small_fraction_of_sigma():
    size, noise = 256, 5.0
    sky_in = {b: plane(size, 12.0, 6.0, -4.0) for b in "gri"}
    src = grid_sources(3, size, 8000.0, margin=40)
    p = run_stages(synthetic_tile(src, size=size, noise=noise, extra=sky_in, seed=103), upto="background")
    sky = p["sky"]
    yy, xx = np.mgrid[0:size, 0:size]
    far = np.ones((size, size), bool)
    for s in src:
        far &= np.hypot(xx - s["x"], yy - s["y"]) > 15
    for b in "gri":
        resid = sky.image[b][far]
        assert abs(resid.mean()) < 0.05 * noise, f"{b}: sky residual {resid.mean():.3f} nJy"
        assert abs(sky.level[b] - 12.0) < 1.0
        # noise from the weight map; sep's own RMS agrees
        assert np.allclose(sky.sigma[b][~sky.bad[b]], noise, rtol=1e-5)
        assert abs(sky.rms[b] / noise - 1) < 0.1


def test_saturated_core_recognised_and_dead_pixel_not():
    size = 128
    bad = np.zeros((size, size), bool)
    bad[100, 20] = True  # a dead pixel far from any star
    tile = synthetic_tile([{"x": 64.2, "y": 60.7, "flux": 4e6}, {"x": 30.0, "y": 30.0, "flux": 5000.0}],
                          size=size, saturate=20000.0, bad=bad)
    sky = run_stages(tile, upto="background")["sky"]
    for b in "gri":
        sat = sky.saturated[b]
        assert sat[61, 64], "the clipped core is saturated"
        assert sat.sum() == (tile.bad[b] & ~bad).sum(), "exactly the clipped (masked) core"
        assert not sat[100, 20] and not sat[30, 30]


def test_artefact_mask_marks_pixels_bad_with_zero_weight():
    size = 128
    art = {b: np.zeros((size, size), np.uint16) for b in "gri"}
    art["g"][10:12, 50:80] = ARTEFACT_BITS["satellite_trail"]
    tile = synthetic_tile([], size=size)
    out = Background().run({"exposure": tile, "masks/artefacts": ImageSet(art, {"bits": ARTEFACT_BITS.as_attrs()})},
                           Background.Config())["sky"]
    assert out.bad["g"][10:12, 50:80].all() and (out.weight["g"][10:12, 50:80] == 0).all()
    assert (out.image["g"][10:12, 50:80] == 0).all()
    assert not out.bad["r"][10:12, 50:80].any()
    assert not tile.bad["g"].any(), "the exposure itself is not modified"
