"""Lens stage: deflector selection, an obvious lens against an isolated elliptical, ONNX = torch."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.table import Table
from stages.lenses import LENS_FLAGS, SHIPPED_MODEL, Lenses, LensesConfig, deflector_candidates

HAVE_MODEL = (SHIPPED_MODEL / "card.json").exists()


def _objects(mag_i, gi, ext=None, x=None):
    n = len(mag_i)
    t = Table()
    t.add("objectId", np.arange(1, n + 1, dtype=np.int64))
    t.add("x", np.full(n, 10.0) if x is None else np.asarray(x, float))
    t.add("y", np.full(n, 10.0))
    fi = 10 ** (-0.4 * (np.asarray(mag_i) - 31.4))
    fg = 10 ** (-0.4 * (np.asarray(mag_i) + np.asarray(gi) - 31.4))
    for b, f in (("g", fg), ("r", np.sqrt(fg * fi)), ("i", fi)):
        t.add(f"{b}_kronFlux", f.astype(np.float32))
        t.add(f"{b}_kronFluxErr", (0.01 * f + 1).astype(np.float32))
    if ext is not None:
        t.add("refExtendedness", np.asarray(ext, np.float32))
    return t


def test_deflector_selection_cuts_magnitude_colour_and_extendedness():
    o = _objects([21.0, 23.5, 21.0, 21.0, 22.9], [1.8, 1.8, 0.5, 1.8, 1.1], ext=[1, 1, 1, 0, 1])
    sel, used = deflector_candidates(o, LensesConfig())
    assert sel.tolist() == [True, False, False, False, True]
    assert used["min_extendedness"] == 0.5 and used["color"] == "g-i"
    sel, _ = deflector_candidates(o, LensesConfig(max_mag=24.0, min_color=None, min_extendedness=None))
    assert sel.all()
    # without refExtendedness no extendedness cut is made, and the record says so
    sel, used = deflector_candidates(_objects([21.0], [1.5]), LensesConfig())
    assert sel.tolist() == [True] and "not applied" in used["min_extendedness"]
    # a source with no g flux counts as red
    o2 = _objects([21.0], [1.5])
    o2.columns["g_kronFlux"][:] = -5.0
    assert deflector_candidates(o2, LensesConfig())[0].tolist() == [True]
    # missing band -> nothing selected
    o3 = _objects([21.0], [1.5])
    del o3.columns["g_kronFlux"]
    sel, used = deflector_candidates(o3, LensesConfig())
    assert not sel.any() and used["missing_bands"] == ["g"]


def _scene(with_lens: bool, seed: int = 102):
    """A bright mock elliptical alone in a 128^2 gri tile (same noise), with or without a lensed source."""
    pytest.importorskip("galsim")
    pytest.importorskip("lenstronomy")
    from stages.background import Background
    from workflows.mock.lenses import draw_lenses, paint_lensed_source
    from workflows.mock.population import SPHEROID, Footprint, make_population
    from workflows.mock.render import add_noise, render_model
    from workflows.mock.seeds import make_rng
    from workflows.train.stamps import survey_config, tile_from_arrays

    survey = survey_config()
    pop = make_population(Footprint(1024, 1024), seed, survey, min_bright_stars=0)
    mi, gi = pop.mag("i"), pop.mag("g") - pop.mag("i")
    cand = np.flatnonzero((pop["type"] == SPHEROID) & (mi > 19.5) & (mi < 21.5) & (gi > 1.3))
    o = int(cand[0])
    one = pop.take(np.array([o]))
    one.cols["X"], one.cols["Y"] = np.array([64.3]), np.array([63.8])
    lens = draw_lenses(np.random.default_rng(1), one["z"], one["q"], one["beta"]).row(0)
    lens.update(theta_e=1.6, src_mag_i=21.5, src_x=0.08, src_y=-0.05, src_re=0.25, src_kind=0, n_clumps=0, clump_frac=0.0)
    images, weights, masks = {}, {}, {}
    for k, b in enumerate("gri"):
        bs = survey.band(b)
        model, _ = render_model(one, bs, (128, 128), (0, 0), galsim_mag=survey.m5["i"] - 2)
        if with_lens:
            img, _ = paint_lensed_source(lens, "gri", survey, 64, (64 - 64.3, 64 - 63.8))
            model[32:96, 32:96] += img[k]
        nr = add_noise(model, bs, make_rng(seed, 99, k), bkg_sigma=0.0)
        images[b], weights[b], masks[b] = nr.image, nr.weight, nr.mask
    tile = tile_from_arrays("scene", images, weights, masks, survey, Footprint(128, 128).wcs_header())
    sky = Background().run({"exposure": tile}, Background.Config())["sky"]
    objects = _objects([float(mi[o])], [float(gi[o])], ext=[1.0], x=[64.3])
    objects.columns["y"][:] = 63.8
    return {"exposure": tile, "sky": sky, "objects": objects}


@pytest.mark.skipif(not HAVE_MODEL, reason="no shipped lens model")
def test_an_obvious_lens_scores_above_an_isolated_elliptical():
    st = Lenses()
    lens = st.run(_scene(True), st.Config())["lenses"]
    plain = st.run(_scene(False), st.Config())["lenses"]
    s_lens, s_plain = float(lens["lens_score"][0]), float(plain["lens_score"][0])
    assert np.isfinite(s_lens) and np.isfinite(s_plain)
    assert s_lens > s_plain
    assert s_lens > 0.5 > s_plain
    assert lens["lens_scoreErr"][0] >= 0 and lens.attrs["lens_n_candidates"] == 1


@pytest.mark.skipif(not HAVE_MODEL, reason="no shipped lens model")
def test_non_candidates_get_nan_and_a_flag():
    scene = _scene(False)
    st = Lenses()
    t = st.run(scene, st.Config(max_mag=10.0))["lenses"]
    assert np.isnan(t["lens_score"][0]) and t["lens_flags"][0] & LENS_FLAGS["not_candidate"]
    assert t.attrs["lens_n_candidates"] == 0


@pytest.mark.skipif(not HAVE_MODEL, reason="no shipped lens model")
def test_onnx_equals_torch_on_fresh_inputs():
    torch = pytest.importorskip("torch")
    from pipeline.onnx import session
    from stages.morphology import load_stamp_model
    from workflows.train.stamps import load_torch_model

    model = load_torch_model(SHIPPED_MODEL)
    assert model is not None
    card, spec, _ = load_stamp_model(SHIPPED_MODEL, "cpu")
    rng = np.random.default_rng(7)
    x = np.arcsinh(rng.normal(0, 1, (19, spec.channels, spec.size, spec.size)) * rng.lognormal(0, 2, (19, 1, 1, 1)))
    x = x.astype(np.float32)
    got = session(card.onnx_path(SHIPPED_MODEL), device="cpu").run(["probs", "probs_std"], {spec.input_name: x})
    with torch.no_grad():
        ref = [v.numpy() for v in model(torch.from_numpy(x))]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.skipif(not HAVE_MODEL, reason="no shipped lens model")
def test_a_tile_without_objects_gives_an_empty_table():
    scene = _scene(False)
    empty = scene["objects"].select(np.zeros(1, bool))
    st = Lenses()
    t = st.run({**scene, "objects": empty}, st.Config())["lenses"]
    assert len(t) == 0 and "lens_score" in t and t.attrs["lens_n_candidates"] == 0
