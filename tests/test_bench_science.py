"""Smoke run of ``surveypipe bench science`` on one tiny simulated tile (test seed)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from workflows.bench import science, sextractor


def test_bench_science_smoke(tmp_path, capsys):
    args = ["--tiles", "1", "--size", "256", "--bands", "gri", "--seed", "150", "--seed-purpose", "test",
            "--out", str(tmp_path / "bench")]
    if sextractor.executable() is None:
        args.append("--no-sextractor")
    assert science.main(args) == 0
    out = capsys.readouterr().out
    for text in ("Completeness vs true", "Purity", "Photometric accuracy", "Astrometry", "Error calibration", "Throughput",
                 "Goals:"):
        assert text in out
    res = json.loads((tmp_path / "bench" / "science.json").read_text())
    assert set(res) == {"meta", "metrics", "throughput", "goals"}
    m = res["metrics"]
    assert m["limits"]["ours"]["m90"] > 18
    assert res["throughput"]["cpu"]["ours_det_deblend_phot"] > 0
    if sextractor.executable() is not None:
        assert res["throughput"]["cpu"]["sextractor"] > 0 and "sextractor" in m["purity"]
        c = m["completeness"]  # paired counts: the completeness difference is carried by the discordant objects
        for n, o, s, oo, so in zip(c["n_true"], c["ours"], c["sextractor"], c["ours_only"], c["sextractor_only"]):
            if n:
                assert abs((o - s) * n - (oo - so)) < 1e-6 and 0 <= oo <= n and 0 <= so <= n
        assert "found by ours only / by SExtractor only" in out
        for who in ("ours", "sextractor"):  # every unmatched primary detection is put in one kind
            pu = m["purity"][who]
            assert sum(pu["unmatched_kinds"].values()) == round((1 - pu["overall"]) * pu["n"])
        bright = m["astrometry"]["bins"][1]  # 20-22 mag: SExtractor's windowed positions come with its catalogue
        assert bright["galaxies_sextractor_win"]["n"] == bright["galaxies_sextractor"]["n"] > 0
    bright = m["astrometry"]["bins"][1]
    # bright galaxies' centroids land well inside the 1" match radius (the mock's PSF FWHM is about 0.7")
    assert bright["galaxies_ours"]["n"] > 0 and bright["galaxies_ours"]["median"] < 0.1


def test_match_offsets_are_distances_to_the_matched_detection_and_nan_elsewhere():
    tx, ty = np.array([0.0, 10.0, 20.0]), np.array([0.0, 0.0, 0.0])
    dx, dy = np.array([10.3, 0.0]), np.array([0.4, 0.0])
    d = science.match_offsets(tx, ty, dx, dy, np.array([1, 0, -1]))
    assert d[0] == 0.0 and abs(d[1] - 0.5) < 1e-12 and np.isnan(d[2])
    assert np.isnan(science.match_offsets(tx, ty, np.zeros(0), np.zeros(0), np.full(3, -1))).all()


def test_astrometry_bins_split_stars_from_galaxies_and_skip_unmatched_objects():
    n = 6
    cat = {"inner": np.ones(n, bool), "sat": np.array([0, 0, 0, 0, 0, 1], bool),
           "star": np.array([1, 1, 0, 0, 0, 0], bool), "tmag": np.array([18.0, 18.5, 21.0, 21.5, 21.2, 21.0]),
           "d_ours": np.array([0.01, 0.03, 0.05, np.nan, 0.07, 9.0])}
    a = science.astrometry(cat, have_sex=False)
    first, second = a["bins"][0], a["bins"][1]
    assert first["stars_ours"]["n"] == 2 and abs(first["stars_ours"]["median"] - 0.02) < 1e-12
    assert first["galaxies_ours"]["n"] == 0 and first["galaxies_ours"]["median"] is None
    # the unmatched (NaN) and the saturated galaxy are left out
    assert second["galaxies_ours"]["n"] == 2 and abs(second["galaxies_ours"]["median"] - 0.06) < 1e-12
    assert "stars_sextractor" not in first


def test_unmatched_detections_are_told_apart_by_their_nearest_true_object():
    tx, ty = np.array([0.0, 100.0, 200.0]), np.array([0.0, 100.0, 200.0])
    matched = np.array([True, False, True])
    # a second piece of object 0, an off-centre detection of object 1, a peak far from everything,
    # and one just beyond two radii of object 2
    dx, dy = np.array([3.0, 106.0, 300.0, 211.0]), np.array([0.0, 100.0, 300.0, 200.0])
    kinds = science.unmatched_kinds(dx, dy, tx, ty, matched, radius=5.0)
    assert kinds.tolist() == [0, 1, 2, 2]
    assert science.unmatched_kinds(np.zeros(0), np.zeros(0), tx, ty, matched, 5.0).size == 0


def test_bench_refuses_a_non_benchmark_seed(tmp_path):
    assert science.main(["--seed", "150", "--out", str(tmp_path)]) == 2


def test_one_to_one_matching_gives_each_detection_once():
    tx, ty, tm = np.array([0.0, 1.0, 10.0]), np.array([0.0, 0.0, 0.0]), np.array([20.0, 22.0, 21.0])
    dx, dy = np.array([0.4, 10.2]), np.array([0.0, 0.0])
    m = science.match_brightest_first(tx, ty, tm, dx, dy, radius=5.0)
    assert m.tolist() == [0, -1, 1]  # the brighter true object takes the shared detection


@pytest.mark.parametrize("level,expect", [(0.9, 21.9), (0.5, 23.5)])
def test_completeness_limit_interpolates(level, expect):
    mags = np.repeat(np.arange(20.125, 25, 0.25), 100)
    found = np.concatenate([np.arange(100) < int(100 * c) for c in np.clip(1 - (np.arange(20.125, 25, 0.25) - 21.5) / 4, 0, 1)])
    assert abs(science.completeness_limit(mags, found, level) - expect) < 0.2


def test_bench_science_with_artefacts_runs_the_artefact_stage_first(tmp_path, capsys):
    args = ["--tiles", "1", "--size", "256", "--bands", "gri", "--seed", "151", "--seed-purpose", "test",
            "--out", str(tmp_path / "bench"), "--artefacts"]
    if sextractor.executable() is None:
        args.append("--no-sextractor")
    assert science.main(args) == 0
    out = capsys.readouterr().out
    assert "Artefacts injected; our artefact stage ran first" in out
    res = json.loads((tmp_path / "bench" / "science.json").read_text())
    assert res["meta"]["artefacts"] is True
    assert "artefacts" in res["meta"]["per_tile"][0]["timing"]
    assert set(res["throughput"]["cpu"]["per_stage"]) == {"background", "detection", "deblending", "photometry"}
    sim = (tmp_path / "bench" / "release" / "simulation.yaml").read_text()
    assert "inject_artefacts" in sim


def test_colour_accuracy_reads_each_kinds_colour_against_the_true_one():
    """Two galaxies and a star, bands g r i: the model fluxes carry the true colours, the PSF fluxes a g-band excess
    of 5 % (-0.053 mag in g - r); the star, the unmatched object and the outer one are left out."""
    from workflows.bench.science import colour_accuracy, colour_residuals

    truth = {"g": np.array([1000.0, 2000.0, 500.0, 800.0, 900.0]), "r": np.array([1500.0, 2500.0, 500.0, 900.0, 950.0]),
             "i": np.array([2000.0, 3000.0, 500.0, 1000.0, 990.0])}
    mo = np.array([0, 1, 2, -1, 3])          # true object 3 unmatched
    ours = {"apcorr": {b: {"ap06": 1.0} for b in "gri"}}
    for b in "gri":
        det = np.r_[truth[b][[0, 1, 2, 4]]]
        ours[f"{b}_modelFlux"] = det.copy()
        ours[f"{b}_psfFlux"] = det * (1.05 if b == "g" else 1.0)
        ours[f"{b}_kronFlux"] = ours[f"{b}_ap06Flux"] = det * 0.9
    results = [{"bands": ["g", "r", "i"], "ours": ours}]
    rows = [{"truth": truth, "mo": mo, "ms": np.full(5, -1)}]
    cat = {"inner": np.array([True, True, True, True, False]), "sat": np.zeros(5, bool),
           "star": np.array([False, False, True, False, False]), "tmag": np.array([19.0, 19.5, 18.0, 19.2, 19.0])}
    out = colour_accuracy(results, rows, cat, m90=23.0, have_sex=False)
    assert out["colours"] == ["g-r", "r-i"] and "sextractor AUTO" not in out["kinds"]
    gr = out["table"]["g-r"]["bright"]
    assert gr["ours model"]["n"] == 2 and abs(gr["ours model"]["median"]) < 1e-9
    assert np.isclose(gr["ours PSF"]["median"], -2.5 * np.log10(1.05))
    assert abs(out["table"]["r-i"]["bright"]["ours PSF"]["median"]) < 1e-9
    assert out["table"]["g-r"]["faint"]["ours model"]["n"] == 0
    assert np.isnan(colour_residuals(np.array([-1.0]), np.array([1.0]), np.array([1.0]), np.array([1.0])))[0]
