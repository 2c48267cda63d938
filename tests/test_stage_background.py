"""Background stage: sky level and slope removed, noise from the weight map, saturation, artefact masks."""
from __future__ import annotations

import numpy as np
import pytest

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
                           Background.Config(reuse_exposure=False))["sky"]
    assert out.bad["g"][10:12, 50:80].all() and (out.weight["g"][10:12, 50:80] == 0).all()
    assert (out.image["g"][10:12, 50:80] == 0).all()
    assert not out.bad["r"][10:12, 50:80].any()
    assert not tile.bad["g"].any(), "the exposure itself is not modified"


def test_reusing_the_exposure_planes_gives_the_same_sky_and_marks_the_tile_consumed():
    size = 128
    art = {b: np.zeros((size, size), np.uint16) for b in "gri"}
    art["r"][30:33, 10:90] = ARTEFACT_BITS["satellite_trail"]
    masks = ImageSet(art, {"bits": ARTEFACT_BITS.as_attrs()})
    src = [{"x": 40.0, "y": 60.0, "flux": 5000.0}, {"x": 90.0, "y": 20.0, "flux": 800.0}]
    copy_tile, own_tile = synthetic_tile(src, size=size), synthetic_tile(src, size=size)
    ref = Background().run({"exposure": copy_tile, "masks/artefacts": masks}, Background.Config(reuse_exposure=False))["sky"]
    assert copy_tile.consumed_by is None
    sky = Background().run({"exposure": own_tile, "masks/artefacts": masks}, Background.Config())["sky"]
    for b in "gri":
        assert np.array_equal(sky.image[b], ref.image[b]) and np.array_equal(sky.weight[b], ref.weight[b])
        assert np.array_equal(sky.bad[b], ref.bad[b]) and np.array_equal(sky.saturated[b], ref.saturated[b])
        assert np.shares_memory(sky.image[b], own_tile.image[b]), "no copy of the image planes"
        assert np.shares_memory(sky.weight[b], own_tile.weight[b])
    assert own_tile.consumed_by == "background"
    with pytest.raises(ValueError, match="already reused in place by the 'background' stage"):
        Background().run({"exposure": own_tile}, Background.Config())


def test_the_memory_option_stays_out_of_cache_keys_and_the_fingerprint():
    from pipeline.stage import config_hash
    from stages.fingerprint import fingerprint_payload

    assert config_hash(Background.Config()) == config_hash(Background.Config(reuse_exposure=False))
    assert config_hash(Background.Config()) != config_hash(Background.Config(mesh=64))
    assert "reuse_exposure" not in fingerprint_payload()["background"]["config"]


@pytest.mark.parametrize("grow", [1, 2, 3])
@pytest.mark.parametrize("density", [0.001, 0.3])
def test_grow_square_equals_repeated_3x3_dilation_at_edges_too(grow, density):
    from scipy import ndimage as ndi

    from stages.background import grow_square

    rng = np.random.default_rng(160 + grow)
    m = rng.random((97, 130)) < density
    m[0, 0] = m[96, 129] = m[50, 0] = m[0, 77] = True  # corners and edges
    want = ndi.binary_dilation(m, structure=np.ones((3, 3), bool), iterations=grow)
    assert np.array_equal(grow_square(m, grow), want)
    assert np.array_equal(grow_square(np.zeros_like(m), grow), np.zeros_like(m))


def test_block_sums_equal_the_plain_sums_and_drop_the_partial_blocks():
    from stages.background import _bin

    rng = np.random.default_rng(5)
    a = rng.integers(0, 1000, (67, 45)).astype(np.float32)  # integers: every summation order is exact
    got = _bin(a, 4)
    assert got.shape == (16, 11) and got.dtype == np.float32
    assert np.array_equal(got, a[:64, :44].reshape(16, 4, 11, 4).sum(axis=(1, 3)))
    assert np.array_equal(_bin(a > 500, 4), (a[:64, :44] > 500).reshape(16, 4, 11, 4).sum(axis=(1, 3)))
