"""Morphology stage: the shipped model on a small mock tile, card checks, ONNX = torch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import BadInputError, ConfigError
from pipeline.modelcard import sha256_file
from stages.morphology import MORPH_FLAGS, SHIPPED_MODEL, Morphology, load_stamp_model

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "card.json").exists(), reason="no shipped morphology model")


@pytest.fixture(scope="module")
def mock_tile(tmp_path_factory):
    """One 384^2 gri mock tile (test seed 101) through the classical stages."""
    pytest.importorskip("galsim")
    from workflows.train.stamps import simulate_release, tile_records

    root = tmp_path_factory.mktemp("morph_tile")
    manifest = simulate_release(root, 101, 1, 384, "gri")
    _, tile, prods, truth = next(tile_records(manifest))
    return {"exposure": tile, "sky": prods["sky"], "objects": prods["objects"]}, truth, manifest


def _copy_model(tmp_path: Path, src: Path = SHIPPED_MODEL) -> Path:
    d = tmp_path / "model"
    shutil.copytree(src, d)
    return d


def _edit_card(d: Path, **changes) -> None:
    card = json.loads((d / "card.json").read_text())
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".", 1)
            card[a][b] = v
        else:
            card[k] = v
    (d / "card.json").write_text(json.dumps(card))


def test_stage_outputs_one_row_per_object_with_probabilities_that_sum_to_one(mock_tile):
    inputs, _, _ = mock_tile
    st = Morphology()
    t = st.run(inputs, st.Config())["morphology"]
    objects = inputs["objects"]
    classes = t.attrs["morph_classes"]
    assert classes == ["star", "spheroid", "disk", "edgeon", "irregular"]
    assert len(t) == len(objects) and np.array_equal(t["objectId"], objects["objectId"])
    p = np.stack([t[f"morph_p_{c}"] for c in classes], axis=1)
    err = np.stack([t[f"morph_p_{c}Err"] for c in classes], axis=1)
    scored = t["morph_class"] >= 0
    assert scored.sum() >= 10
    np.testing.assert_allclose(p[scored].sum(axis=1), 1.0, atol=1e-4)
    assert np.all(err[scored] >= 0) and np.all(np.isfinite(err[scored]))
    assert np.array_equal(t["morph_class"][scored], p[scored].argmax(axis=1))
    np.testing.assert_allclose(t["morph_extendedness"][scored], 1 - t["morph_p_star"][scored], atol=1e-6)
    # unscored rows: NaN and the low_snr flag
    assert np.all(np.isnan(p[~scored]))
    assert np.all(t["morph_flags"][~scored] & MORPH_FLAGS["low_snr"])
    assert t.info["morph_p_star"].description and t.attrs["morph_model_sha256"] == json.loads(
        (SHIPPED_MODEL / "card.json").read_text())["sha256"]


def test_snr_threshold_is_configurable(mock_tile):
    inputs, _, _ = mock_tile
    st = Morphology()
    t = st.run(inputs, st.Config(min_snr=1e9))["morphology"]
    assert np.all(t["morph_class"] == -1) and np.all(np.isnan(t["morph_p_star"]))


def test_bright_stars_and_galaxies_are_told_apart(mock_tile):
    """On the tile's bright objects the star/galaxy call agrees with the truth."""
    from workflows.train.stamps import match_truth, truth_types

    inputs, truth, _ = mock_tile
    st = Morphology()
    t = st.run(inputs, st.Config())["morphology"]
    o = inputs["objects"]
    idx = match_truth(np.asarray(o["x"]), np.asarray(o["y"]), np.asarray(truth["x"]), np.asarray(truth["y"]),
                      np.asarray(truth["flux_i"]))
    ok = (idx >= 0) & (t["morph_class"] >= 0)
    bright = ok & (np.asarray(truth["mag_i"])[np.maximum(idx, 0)] < 22.5)
    is_star = (truth_types(truth) == "star")[idx[bright]]
    called_star = t["morph_extendedness"][bright] < 0.5
    assert bright.sum() >= 5
    assert np.mean(is_star == called_star) >= 0.9


def test_missing_band_gives_nan_or_a_bad_input_error(mock_tile):
    inputs, _, _ = mock_tile
    tile = inputs["exposure"]
    import dataclasses

    no_i = dataclasses.replace(tile, bands=[b for b in tile.bands if b != "i"])
    st = Morphology()
    t = st.run({**inputs, "exposure": no_i}, st.Config())["morphology"]
    assert np.all(np.isnan(t["morph_p_star"])) and np.all(t["morph_flags"] & MORPH_FLAGS["missing_band"])
    with pytest.raises(BadInputError, match=r"needs bands \['g', 'r', 'i'\]"):
        st.run({**inputs, "exposure": no_i}, st.Config(on_missing_band="error"))


def test_wrong_pixel_scale_is_refused(mock_tile):
    inputs, _, _ = mock_tile
    tile = inputs["exposure"]
    import dataclasses

    hdr = dict(tile.wcs_header, CD1_1=tile.wcs_header["CD1_1"] * 1.3, CD2_2=tile.wcs_header["CD2_2"] * 1.3)
    st = Morphology()
    with pytest.raises(BadInputError, match="trained on 0.2\"/pixel"):
        st.run({**inputs, "exposure": dataclasses.replace(tile, wcs_header=hdr)}, st.Config())


def test_card_mismatch_is_refused_with_a_clear_error(tmp_path):
    d = _copy_model(tmp_path)
    load_stamp_model(d, "cpu")  # the copy is fine
    _edit_card(d, bands=["g", "r"], **{"normalisation.scale_njy": {"g": 1.0, "r": 1.0}})
    with pytest.raises(ConfigError, match=r"declares 3 input channels but 2 band\(s\)"):
        load_stamp_model(d, "cpu")
    d2 = _copy_model(tmp_path / "b")
    card = json.loads((d2 / "card.json").read_text())
    card["inputs"]["input"]["shape"] = ["batch", 3, 48, 48]
    (d2 / "card.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match=r"ONNX input shape .* disagrees with the card .*stamps 48x48"):
        load_stamp_model(d2, "cpu")
    d3 = _copy_model(tmp_path / "c")
    _edit_card(d3, sha256="0" * 64)
    with pytest.raises(ConfigError, match="does not match its card"):
        load_stamp_model(d3, "cpu")
    d4 = _copy_model(tmp_path / "d")
    _edit_card(d4, classes=["a", "b"])
    with pytest.raises(ConfigError, match="ONNX gives 5 class probabilities, card lists 2"):
        load_stamp_model(d4, "cpu")


def test_onnx_equals_torch_on_fresh_inputs():
    torch = pytest.importorskip("torch")
    from pipeline.onnx import session
    from workflows.train.stamps import load_torch_model

    model = load_torch_model(SHIPPED_MODEL)
    assert model is not None, "model.pt and card.training.net are shipped"
    card, spec, _ = load_stamp_model(SHIPPED_MODEL, "cpu")
    rng = np.random.default_rng(123)
    x = np.arcsinh(rng.normal(0, 1, (37, spec.channels, spec.size, spec.size)) * rng.lognormal(0, 2, (37, 1, 1, 1)))
    x = x.astype(np.float32)
    got = session(card.onnx_path(SHIPPED_MODEL), device="cpu").run(["probs", "probs_std"], {spec.input_name: x})
    with torch.no_grad():
        ref = [v.numpy() for v in model(torch.from_numpy(x))]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-5)
    assert sha256_file(card.onnx_path(SHIPPED_MODEL)) == card.sha256


def test_both_stages_run_in_the_engine_and_their_tables_are_stored(mock_tile, tmp_path):
    """One tile through pipeline.runner.process_tile (the body of a Dask task) with both stages."""
    from pipeline.config import PipelineConfig
    from pipeline.manifest import load_manifest
    from pipeline.runner import process_tile
    from pipeline.store import CatalogStore

    manifest = load_manifest(mock_tile[2])
    cfg = PipelineConfig(stages=["stages:CLASSICAL_STAGES", "stages.morphology:Morphology", "stages.lenses:Lenses"])
    rec = process_tile(manifest, manifest.tiles[0].id, cfg, str(tmp_path / "run"))
    assert rec["status"] == "complete", rec
    store = CatalogStore(tmp_path / "run")
    tid = manifest.tiles[0].id
    morph, lenses, objects = (store.read_table(tid, n) for n in ("morphology", "lenses", "objects"))
    assert len(morph) == len(lenses) == len(objects)
    assert np.array_equal(morph["objectId"], objects["objectId"])
    assert morph.info["morph_p_disk"].description and lenses.info["lens_score"].description
    attrs = store.tile_attrs(tid)
    assert {"morphology", "lenses"} <= set(attrs["stages"])
    assert set(attrs["stages"]["morphology"]["models"]) == {"model.onnx", "card.json"}


def test_a_tile_without_objects_gives_an_empty_table(mock_tile):
    inputs, _, _ = mock_tile
    empty = inputs["objects"].select(np.zeros(len(inputs["objects"]), bool))
    st = Morphology()
    t = st.run({**inputs, "objects": empty}, st.Config())["morphology"]
    assert len(t) == 0 and "morph_p_star" in t and t.attrs["morph_classes"][0] == "star"
