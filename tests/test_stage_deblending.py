"""Deblending stage: close pairs split into children with explicit parent/child records."""
from __future__ import annotations

import numpy as np

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


def test_isolated_sources_have_no_parent_records():
    src = [{"x": 30.4, "y": 30.2, "flux": 8000.0}, {"x": 90.1, "y": 80.7, "flux": 8000.0}]
    o = run_stages(synthetic_tile(src))["objects"]
    assert len(o) == 2
    assert np.all(np.asarray(o["parentObjectId"]) == 0) and np.all(np.asarray(o["deblend_nChild"]) == 0)
    assert np.all(o["detect_isPrimary"])
    ids = np.asarray(o["objectId"])
    assert len(set(ids.tolist())) == 2 and ids.dtype == np.int64
