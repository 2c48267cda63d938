"""The engine's cutout service: stamps at edges and on masked pixels, normalisation, card checks."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.cutouts import STAMP_FLAGS, CutoutSpec, extract, stretch
from pipeline.errors import ConfigError
from pipeline.modelcard import ModelCard


def _planes(h=40, w=50):
    yy, xx = np.mgrid[0:h, 0:w]
    img = {"g": (xx + 100 * yy).astype(np.float32), "r": (2 * xx + 100 * yy).astype(np.float32)}
    wt = {b: np.full((h, w), 4.0, np.float32) for b in img}
    bad = {b: np.zeros((h, w), bool) for b in img}
    return img, wt, bad


def test_interior_stamp_is_the_image_around_the_rounded_centre():
    img, wt, bad = _planes()
    st = extract(img, [20.4, 10.6], [15.5, 30.2], 7, bands=["r", "g"], weights=wt, bad=bad)
    assert st.image.shape == (2, 2, 7, 7) and st.bands == ("r", "g")
    # stamp pixel (3, 3) is image pixel (round(y), round(x)); 15.5 rounds up (floor(y + 0.5))
    assert st.centre.tolist() == [[20, 16], [11, 30]]
    np.testing.assert_array_equal(st.image[0, 1], img["g"][13:20, 17:24])
    np.testing.assert_array_equal(st.image[1, 0], img["r"][27:34, 8:15])
    assert not st.mask.any() and not st.outside.any()
    assert np.all(st.weight == 4.0)
    assert np.all(st.flags() == 0)


def test_edge_stamps_are_zero_padded_masked_and_flagged():
    img, wt, bad = _planes()
    st = extract(img, [0.0, 49.0, 25.0, -3.0], [0.0, 39.0, 20.0, 5.0], 9, weights=wt, bad=bad)
    assert st.outside.tolist() == [True, True, False, True]
    # corner (0, 0): the upper-left 4x4 block lies outside the image
    assert np.all(st.image[0, :, :4, :] == 0) and np.all(st.image[0, :, :, :4] == 0)
    assert np.all(st.mask[0, :, :4, :]) and np.all(st.weight[0, :, :4, :] == 0)
    np.testing.assert_array_equal(st.image[0, 0, 4:, 4:], img["g"][0:5, 0:5])
    assert not st.mask[0, :, 4:, 4:].any()
    # opposite corner
    np.testing.assert_array_equal(st.image[1, 0, :5, :5], img["g"][35:40, 45:50])
    assert st.mask[1, :, 5:, :].all() and st.mask[1, :, :, 5:].all()
    # entirely off the image on the left side except a sliver
    assert st.mask[3, :, :, :3].all()
    f = st.flags()
    assert (f[0] & STAMP_FLAGS["edge"]) and not (f[2] & STAMP_FLAGS["edge"])


def test_masked_pixels_are_zeroed_and_counted():
    img, wt, bad = _planes()
    bad["g"][18:23, 23:28] = True          # a 5x5 hole on the object in g only
    wt["r"][20, 25] = 0.0                  # zero weight counts as masked
    img["r"][21, 26] = np.nan              # so does a non-finite pixel
    st = extract(img, [25.0], [20.0], 11, weights=wt, bad=bad)
    assert st.mask[0, 0].sum() == 25 and np.all(st.image[0, 0][st.mask[0, 0]] == 0)
    assert st.mask[0, 1].sum() == 2 and st.image[0, 1, 5, 5] == 0 and st.image[0, 1, 6, 6] == 0
    assert np.all(st.weight[0][st.mask[0]] == 0)
    frac = st.masked_fraction(radius=2.0)[0]
    assert frac == pytest.approx((13 + 2) / (2 * 13))     # 13 pixels within r <= 2
    assert st.flags(max_masked_fraction=0.1, radius=2.0)[0] & STAMP_FLAGS["masked"]
    assert not st.flags(max_masked_fraction=0.9, radius=2.0)[0] & STAMP_FLAGS["masked"]


def test_many_objects_in_one_vectorised_call():
    rng = np.random.default_rng(3)
    img, wt, bad = _planes(200, 300)
    x, y = rng.uniform(-5, 305, 5000), rng.uniform(-5, 205, 5000)
    st = extract(img, x, y, 16, weights=wt, bad=bad)
    assert len(st) == 5000 and st.size == 16
    k = int(np.flatnonzero(~st.outside)[0])
    cx, cy = st.centre[k]
    np.testing.assert_array_equal(st.image[k, 0], img["g"][cy - 8:cy + 8, cx - 8:cx + 8])


def test_bad_arguments_are_refused():
    img, wt, bad = _planes()
    with pytest.raises(ValueError, match="no image for band"):
        extract(img, [1.0], [1.0], 5, bands=["i"])
    with pytest.raises(ValueError, match="finite"):
        extract(img, [np.nan], [1.0], 5)
    with pytest.raises(ValueError, match="size"):
        extract(img, [1.0], [1.0], 0)


def test_arcsinh_stretch_with_per_band_scales_and_planes():
    img, wt, bad = _planes()
    bad["g"][20, 25] = True
    st = extract(img, [25.0], [20.0], 5, bands=["g", "r"], weights=wt, bad=bad)
    norm = {"stretch": "arcsinh", "scale_njy": {"g": 10.0, "r": 1000.0}, "clip": 5.0, "planes": ["image", "mask"]}
    x = stretch(st, norm)
    assert x.shape == (1, 4, 5, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 1], np.clip(np.arcsinh(st.image[0, 1] / 1000.0), -5, 5), rtol=1e-6)
    assert np.all(x[0, 0] <= 5.0) and x[0, 0, 2, 2] == 0.0      # masked pixel stays 0
    assert x[0, 2, 2, 2] == 1.0 and x[0, 2].sum() == 1.0       # mask plane of g
    with pytest.raises(ConfigError, match="scale_njy"):
        stretch(st, {"stretch": "arcsinh", "scale_njy": {"g": 1.0}})
    with pytest.raises(ConfigError, match="stretch"):
        stretch(st, {"stretch": "log", "scale_njy": {"g": 1.0, "r": 1.0}})


def _card(**kw):
    base = dict(name="m", version="1", sha256="0" * 64, bands=["g", "r", "i"], classes=["a", "b"],
                inputs={"input": {"shape": ["batch", 3, 32, 32], "pixel_scale_arcsec": 0.2}},
                normalisation={"stretch": "arcsinh", "scale_njy": {"g": 1.0, "r": 1.0, "i": 1.0}})
    base.update(kw)
    return ModelCard(**base)


class _Sess:
    def __init__(self, shape, name="input"):
        self.shape, self.name = shape, name

    def get_inputs(self):
        return [self]


def test_spec_from_card_and_mismatches_refused():
    spec = CutoutSpec.from_card(_card())
    assert spec.bands == ("g", "r", "i") and spec.size == 32 and spec.channels == 3
    spec.check_session(_Sess(["batch", 3, 32, 32]))
    with pytest.raises(ConfigError, match=r"ONNX input shape .* disagrees with the card"):
        spec.check_session(_Sess(["batch", 3, 48, 48]))
    with pytest.raises(ConfigError, match="3 channels for bands"):
        spec.check_session(_Sess(["batch", 5, 32, 32]))
    with pytest.raises(ConfigError, match="declares 4 input channels"):
        CutoutSpec.from_card(_card(inputs={"input": {"shape": ["batch", 4, 32, 32]}}))
    with pytest.raises(ConfigError, match="square"):
        CutoutSpec.from_card(_card(inputs={"input": {"shape": ["batch", 3, 32, 30]}}))
    with pytest.raises(ConfigError, match=r"band\(s\) \['i'\] are missing"):
        spec.check_tile(["g", "r", "z"], 0.2, tile="t0")
    with pytest.raises(ConfigError, match="trained on 0.2\"/pixel"):
        spec.check_tile(["g", "r", "i"], 0.263, tile="t0")
    spec.check_tile(["u", "g", "r", "i", "z"], 0.2)
