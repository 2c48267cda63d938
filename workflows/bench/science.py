"""``surveypipe bench science``: the classical stages against truth, next to SExtractor on the same images.

Simulates held-out tiles with a *benchmark* seed (9000-9999, never used by tests or tuning), runs
the classical stages (background, detection, deblending, photometry) directly on each tile -- so
the timings are of the stages themselves, not of I/O or scheduling -- and SExtractor in dual-image
mode on the same detection image with matched settings (:mod:`workflows.bench.sextractor`).
Both catalogues are cross-matched to the truth one-to-one within 1 arcsec (true objects brightest
first, each taking the nearest free detection), and it prints, for both:

* completeness vs true magnitude (reference band), the magnitudes where it falls to 90 % and 50 %;
* purity (fraction of detections matched to a true object) brighter than the 90 % magnitude and overall;
* photometric accuracy: median and sigma_MAD of (measured - true) magnitude in true-magnitude bins,
  for Kron (all objects and point sources) and an aperture flux corrected to total (point sources);
* error calibration: fraction of |(f - f_true) / sigma_f| < 1 for isolated stars, aperture flux
  corrected to total, all bands (0.68 expected);
* blend recovery: fraction of true pairs closer than 1.5", both brighter than the 90 % magnitude,
  detected as two objects;
* throughput: seconds per megapixel per band, ours (detection + deblending + photometry, and with
  the background stage) and SExtractor's (all its per-band runs), as ratios measured in the same run.

Every number is printed with its unit and written as JSON to ``--out``/science.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stages.flags import BAND_PIXEL_FLAGS, OBJECT_FLAGS

NJY_ZP = 31.4
STAGE_NAMES = ("background", "detection", "deblending", "photometry")
CALIB_APERTURE = 6.0  # pixels: small enough that undetected faint galaxies rarely fall in it


def mag(flux: np.ndarray) -> np.ndarray:
    f = np.asarray(flux, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, -2.5 * np.log10(np.where(f > 0, f, 1.0)) + NJY_ZP, np.inf)


def _text(col: Any) -> np.ndarray:
    """A string column as str (FITS tables read back as bytes)."""
    a = np.asarray(col)
    return np.char.strip(np.char.decode(a) if a.dtype.kind == "S" else a.astype(str))


def sigma_mad(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


def match_brightest_first(tx: np.ndarray, ty: np.ndarray, tmag: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                          radius: float) -> np.ndarray:
    """One-to-one match: true objects in order of brightness take the nearest free detection within ``radius``.

    Returns, for every true object, the index of its detection or -1.
    """
    from scipy.spatial import cKDTree

    out = np.full(tx.size, -1, np.int64)
    if tx.size == 0 or dx.size == 0:
        return out
    tree = cKDTree(np.c_[dx, dy])
    cand = tree.query_ball_point(np.c_[tx, ty], radius)
    used = np.zeros(dx.size, bool)
    for i in np.argsort(tmag, kind="stable"):
        c = cand[i]
        if not c:
            continue
        c = np.asarray(c)
        c = c[~used[c]]
        if c.size == 0:
            continue
        j = c[np.argmin(np.hypot(dx[c] - tx[i], dy[c] - ty[i]))]
        out[i] = j
        used[j] = True
    return out


def process_tile(manifest_path: str, tile_id: str, work: str, run_sex: bool,
                 settings: dict[str, dict[str, Any]] | None = None, artefacts: bool = False) -> dict[str, Any]:
    """Our stages and SExtractor on one tile; returns the columns the metrics need and the timings.

    ``settings``: per-stage config overrides ({stage: {field: value}}), also given to SExtractor
    where it has the same setting (thresholds, deblending, apertures, Kron factor). ``artefacts``:
    the artefact stage runs first and its mask goes to every classical stage that takes it, as in
    the pipeline; SExtractor gets the same mask as zero weight (SExtractor + a MaxiMask-like mask).
    Its time is reported apart, not in the classical throughput."""
    from pipeline.manifest import load_manifest
    from pipeline.tile import load_tile
    from stages import Background, Deblending, Detection, Photometry

    from . import sextractor

    m = load_manifest(manifest_path)
    tile = load_tile(m, m.tile(tile_id))
    products: dict[str, Any] = {"exposure": tile}
    timing: dict[str, dict[str, float]] = {}
    given = {k: dict(v) for k, v in (settings or {}).items()}
    if run_sex:  # SExtractor measures the raw planes after our stages: the background must not reuse them
        given.setdefault(Background.name, {}).setdefault("reuse_exposure", False)
    cfgs = {cls: cls.Config(**given.get(cls.name, {})) for cls in (Background, Detection, Deblending, Photometry)}
    # one BLAS/OpenMP thread, as the pipeline's workers run (pipeline.cluster): a second thread's
    # spinning would count as CPU time against SExtractor's single thread
    from pipeline.cluster import limit_math_threads

    with limit_math_threads(1):
        if artefacts:
            from stages import Artefacts

            st = Artefacts()
            w0, c0 = time.perf_counter(), time.process_time()
            products.update(st.run({"exposure": tile}, Artefacts.Config(device="cpu", **given.get(st.name, {}))))
            timing[st.name] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
        for cls, cfg in cfgs.items():
            st = cls()
            ins = {r: products[r] for r in (*st.requires, *st.optional) if r in products}
            w0, c0 = time.perf_counter(), time.process_time()
            products.update(st.run(ins, cfg))
            timing[st.name] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    obj = products["objects"]
    det_cfg = cfgs[Detection]
    phot_cfg = cfgs[Photometry]
    ours: dict[str, Any] = {c: np.asarray(obj[c]) for c in ("x", "y", "detect_isPrimary", "detect_isDeblendedSource",
                                                            "flags", "refExtendedness")}
    for b in tile.bands:
        for kind in ("kron", "psf", "model", f"ap{int(CALIB_APERTURE):02d}"):
            ours[f"{b}_{kind}Flux"] = np.asarray(obj[f"{b}_{kind}Flux"], np.float64)
            ours[f"{b}_{kind}FluxErr"] = np.asarray(obj[f"{b}_{kind}FluxErr"], np.float64)
        if f"{b}_flags" in obj:
            ours[f"{b}_flags"] = np.asarray(obj[f"{b}_flags"])
    ours["apcorr"] = obj.attrs["apcorr"]
    out: dict[str, Any] = {"tile": tile_id, "shape": list(tile.shape), "bands": list(tile.bands),
                           "inner": tile.inner.model_dump() if tile.inner else None, "ours": ours, "timing": timing,
                           "n_rows": len(obj), "deblend": {k: v for k, v in products["deblended"].attrs.items() if k.startswith("n_")}}
    if run_sex:
        from stages.detection import detection_planes

        _, _, snr, nodata = detection_planes(tile, products["sky"], products["detections"].attrs)
        settings = sextractor.matched_settings(det_cfg, phot_cfg, cfgs[Background])
        weights = {b: tile.weight[b] for b in tile.bands}
        if "masks/artefacts" in products:  # the same artefact mask for SExtractor: masked pixels get no weight
            weights = sextractor.masked_weights(weights, products["masks/artefacts"].planes)
        with tempfile.TemporaryDirectory(dir=work, prefix=f"sex-{tile_id}-") as tmp:
            r = sextractor.run_dual(snr, (~nodata).astype(np.float32),
                                    {b: tile.image[b] for b in tile.bands}, weights, settings, tmp)
            ref = "i" if "i" in tile.bands else tile.bands[0]
            sextractor.windowed_positions(r, tmp, ref, settings)
        out["sex"] = {"x": r.x, "y": r.y, "xwin": r.xwin, "ywin": r.ywin, "flags": r.flags, "flux": r.flux,
                      "wall_s": r.wall_s, "cpu_s": r.cpu_s, "runs": r.runs}
    return out


UNMATCHED_KINDS = ("near_a_matched_object", "near_an_unmatched_object", "isolated")


def unmatched_kinds(dx: np.ndarray, dy: np.ndarray, tx: np.ndarray, ty: np.ndarray, true_matched: np.ndarray,
                    radius: float) -> np.ndarray:
    """What each unmatched detection at (dx, dy) is, by its nearest true object within 2 match radii:
    0 = that object was matched to another detection (a second piece of one object: a shred or a
    duplicate), 1 = that object went unmatched (its detection's centroid lies beyond the match
    radius), 2 = no true object that close (a noise peak or an artefact)."""
    from scipy.spatial import cKDTree

    out = np.full(dx.size, 2, np.int8)
    if dx.size == 0 or tx.size == 0:
        return out
    d, j = cKDTree(np.c_[tx, ty]).query(np.c_[dx, dy], distance_upper_bound=2 * radius)
    near = np.isfinite(d)
    out[near] = np.where(true_matched[j[near]], 0, 1)
    return out


def _in_inner(inner: dict | None, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if not inner:
        return np.ones(x.size, bool)
    return (x >= inner["xmin"]) & (x < inner["xmax"]) & (y >= inner["ymin"]) & (y < inner["ymax"])


def evaluate(results: list[dict[str, Any]], truth_dir: Path, ref: str, pixel_scale: float) -> dict[str, Any]:
    """All metrics from the per-tile results and the truth tables."""
    from astropy.table import Table as ATable

    radius = 1.0 / pixel_scale
    rows: dict[str, list] = {k: [] for k in ("tmag", "inner", "star", "iso", "sat", "m_ours", "m_sex", "d_ours", "d_sex", "d_sexwin")}
    flux_rows: list[dict[str, Any]] = []
    pur: dict[str, list] = {"ours_mag": [], "ours_ok": [], "sex_mag": [], "sex_ok": [], "ours_kind": [], "sex_kind": []}
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for res in results:
        tr = ATable.read(truth_dir / f"{res['tile']}.fits")
        tx, ty = np.asarray(tr["x"], np.float64), np.asarray(tr["y"], np.float64)
        tm = np.asarray(tr[f"mag_{ref}"], np.float64)
        o = res["ours"]
        meas = o["detect_isDeblendedSource"]
        oidx = np.flatnonzero(meas)
        mo = match_brightest_first(tx, ty, tm, o["x"][oidx], o["y"][oidx], radius)
        mo = np.where(mo >= 0, oidx[np.maximum(mo, 0)], -1)
        ms = np.full(tx.size, -1)
        if "sex" in res:
            s = res["sex"]
            ms = match_brightest_first(tx, ty, tm, s["x"], s["y"], radius)
        inner_t = np.asarray(tr["in_inner"], bool)
        rows["tmag"].append(tm)
        rows["inner"].append(inner_t)
        rows["star"].append(_text(tr["type"]) == "star")
        rows["iso"].append(np.asarray(tr["blend_size"]) == 1)
        rows["sat"].append(np.asarray(tr["is_saturated"], bool))
        rows["m_ours"].append(mo)
        rows["m_sex"].append(ms)
        rows["d_ours"].append(match_offsets(tx, ty, o["x"], o["y"], mo) * pixel_scale)
        for key, xk, yk in (("d_sex", "x", "y"), ("d_sexwin", "xwin", "ywin")):
            rows[key].append(match_offsets(tx, ty, res["sex"][xk], res["sex"][yk], ms) * pixel_scale
                             if "sex" in res and res["sex"].get(xk) is not None else np.full(tx.size, np.nan))
        flux_rows.append({"tile": res["tile"], "truth": {b: np.asarray(tr[f"flux_{b}"], np.float64) for b in res["bands"]},
                          "mo": mo, "ms": ms})
        # purity: primary detections (ours: isPrimary; SExtractor: centroid in the inner region)
        prim = np.flatnonzero(o["detect_isPrimary"])
        ok = np.zeros(o["x"].size, bool)
        ok[mo[mo >= 0]] = True
        pur["ours_mag"].append(mag(o[f"{ref}_kronFlux"][prim]))
        pur["ours_ok"].append(ok[prim])
        bad = prim[~ok[prim]]
        pur["ours_kind"].append(unmatched_kinds(o["x"][bad], o["y"][bad], tx, ty, mo >= 0, radius))
        if "sex" in res:
            s = res["sex"]
            sp = np.flatnonzero(_in_inner(res["inner"], s["x"], s["y"]))
            oks = np.zeros(s["x"].size, bool)
            oks[ms[ms >= 0]] = True
            pur["sex_mag"].append(mag(s["flux"][ref]["auto"][sp]))
            pur["sex_ok"].append(oks[sp])
            bad = sp[~oks[sp]]
            pur["sex_kind"].append(unmatched_kinds(s["x"][bad], s["y"][bad], tx, ty, ms >= 0, radius))
        # close true pairs (both on this tile, the first in the inner region)
        from scipy.spatial import cKDTree

        pr = cKDTree(np.c_[tx, ty]).query_pairs(1.5 / pixel_scale, output_type="ndarray")
        if pr.size:
            i, j = pr[:, 0], pr[:, 1]
            keep = inner_t[i] | inner_t[j]
            pairs.append((np.maximum(tm[i], tm[j])[keep], (mo[i] >= 0)[keep] & (mo[j] >= 0)[keep],
                          (ms[i] >= 0)[keep] & (ms[j] >= 0)[keep], np.hypot(tx[i] - tx[j], ty[i] - ty[j])[keep] * pixel_scale,
                          np.minimum(tm[i], tm[j])[keep]))
    cat = {k: np.concatenate(v) for k, v in rows.items()}
    have_sex = "sex" in results[0]
    inner = cat["inner"]
    # ---- completeness
    edges = np.arange(16.0, 28.01, 0.5)
    comp: dict[str, Any] = {"bin_lo": edges[:-1].tolist(), "bin_hi": edges[1:].tolist(), "n_true": [], "ours": [], "sextractor": [],
                            "ours_only": [], "sextractor_only": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = inner & (cat["tmag"] >= lo) & (cat["tmag"] < hi)
        comp["n_true"].append(int(sel.sum()))
        comp["ours"].append(float(np.mean(cat["m_ours"][sel] >= 0)) if sel.any() else None)
        comp["sextractor"].append(float(np.mean(cat["m_sex"][sel] >= 0)) if sel.any() and have_sex else None)
        # the same true objects face both catalogues: the difference lies in the discordant ones (paired)
        found_o, found_s = cat["m_ours"][sel] >= 0, cat["m_sex"][sel] >= 0
        comp["ours_only"].append(int(np.sum(found_o & ~found_s)) if have_sex else None)
        comp["sextractor_only"].append(int(np.sum(found_s & ~found_o)) if have_sex else None)
    lim = {who: {"m90": completeness_limit(cat["tmag"][inner], cat[key][inner] >= 0, 0.9),
                 "m50": completeness_limit(cat["tmag"][inner], cat[key][inner] >= 0, 0.5)}
           for who, key in (("ours", "m_ours"), ("sextractor", "m_sex")) if who == "ours" or have_sex}
    m90 = min(v["m90"] for v in lim.values())
    # ---- purity
    purity: dict[str, Any] = {}
    for who, mk, okk, kk in (("ours", "ours_mag", "ours_ok", "ours_kind"), ("sextractor", "sex_mag", "sex_ok", "sex_kind")):
        if not pur[mk]:
            continue
        mm, ok = np.concatenate(pur[mk]), np.concatenate(pur[okk])
        kinds = np.bincount(np.concatenate(pur[kk]).astype(np.int64), minlength=len(UNMATCHED_KINDS))
        bright = mm < m90
        purity[who] = {"above_m90": float(ok[bright].mean()) if bright.any() else None, "n_above_m90": int(bright.sum()),
                       "overall": float(ok.mean()) if ok.size else None, "n": int(ok.size),
                       "bins": [float(ok[(mm >= lo) & (mm < hi)].mean()) if np.any((mm >= lo) & (mm < hi)) else None
                                for lo, hi in zip(edges[:-1], edges[1:])],
                       "bin_unmatched": [int(np.sum(~ok[(mm >= lo) & (mm < hi)])) for lo, hi in zip(edges[:-1], edges[1:])],
                       "bin_n": [int(np.sum((mm >= lo) & (mm < hi))) for lo, hi in zip(edges[:-1], edges[1:])],
                       "unmatched_kinds": {k: int(v) for k, v in zip(UNMATCHED_KINDS, kinds)}}
    # ---- photometry and error calibration
    phot = photometric_accuracy(results, flux_rows, cat, ref, m90, have_sex)
    # ---- blend recovery
    blend: dict[str, Any] = {}
    if pairs:
        fm, ok_o, ok_s, sep_arcsec, bm = (np.concatenate([p[k] for p in pairs]) for k in range(5))
        sel = fm < m90
        blend = {"n_pairs": int(sel.sum()), "max_sep_arcsec": 1.5, "mag_limit": m90,
                 "ours": float(ok_o[sel].mean()) if sel.any() else None,
                 "sextractor": float(ok_s[sel].mean()) if sel.any() and have_sex else None,
                 "by_separation": [], "other_limits": []}
        for lo, hi in ((0.0, 0.5), (0.5, 0.75), (0.75, 1.0), (1.0, 1.25), (1.25, 1.5)):
            ss = sel & (sep_arcsec >= lo) & (sep_arcsec < hi)
            blend["by_separation"].append({"lo": lo, "hi": hi, "n": int(ss.sum()),
                                           "ours": float(ok_o[ss].mean()) if ss.any() else None,
                                           "sextractor": float(ok_s[ss].mean()) if ss.any() and have_sex else None})
        for who, v in lim.items():  # the same with each catalogue's own 90 % magnitude as the limit
            ss = fm < v["m90"]
            blend["other_limits"].append({"limit_of": who, "mag_limit": v["m90"], "n": int(ss.sum()),
                                          "ours": float(ok_o[ss].mean()) if ss.any() else None,
                                          "sextractor": float(ok_s[ss].mean()) if ss.any() and have_sex else None})
    return {"completeness": comp, "limits": lim, "m90_common": m90, "purity": purity, "photometry": phot, "blend_recovery": blend,
            "astrometry": astrometry(cat, have_sex), "colours": colour_accuracy(results, flux_rows, cat, m90, have_sex)}


def match_offsets(tx: np.ndarray, ty: np.ndarray, dx: np.ndarray, dy: np.ndarray, match: np.ndarray) -> np.ndarray:
    """Distance (pix) from every true object to its matched detection (NaN where unmatched)."""
    j = np.maximum(match, 0)
    d = np.hypot(np.asarray(dx, np.float64)[j] - tx, np.asarray(dy, np.float64)[j] - ty) if len(dx) else np.zeros(tx.size)
    return np.where(match >= 0, d, np.nan)


ASTROMETRY_BINS = ((16.0, 20.0), (20.0, 22.0), (22.0, 23.0), (23.0, 24.0), (24.0, 25.0))


def astrometry(cat: Mapping[str, np.ndarray], have_sex: bool) -> dict[str, Any]:
    """Centroid offsets from the true positions (arcsec) of matched unsaturated objects in the inner regions,
    per true-magnitude bin, stars and galaxies apart: median and 90th percentile, ours and SExtractor's
    (X_IMAGE, the isophotal barycentre it matched with, and XWIN_IMAGE of the reference band, its
    precise windowed centroid). Each catalogue counts the objects it matched."""
    out: dict[str, Any] = {"bins": []}
    base = cat["inner"] & ~cat["sat"]
    for lo, hi in ASTROMETRY_BINS:
        row: dict[str, Any] = {"lo": lo, "hi": hi}
        for kind, sel_k in (("stars", cat["star"]), ("galaxies", ~cat["star"])):
            sel = base & sel_k & (cat["tmag"] >= lo) & (cat["tmag"] < hi)
            for who, key in (("ours", "d_ours"), ("sextractor", "d_sex"), ("sextractor_win", "d_sexwin")):
                if who != "ours" and not have_sex:
                    continue
                d = cat[key][sel]
                d = d[np.isfinite(d)]
                row[f"{kind}_{who}"] = {"n": int(d.size),
                                        "median": float(np.median(d)) if d.size else None,
                                        "p90": float(np.percentile(d, 90)) if d.size else None}
        out["bins"].append(row)
    return out


def completeness_limit(tmag: np.ndarray, found: np.ndarray, level: float, width: float = 0.25) -> float:
    """Faintest magnitude where the completeness (in bins of ``width`` mag) is still >= ``level``, interpolated."""
    edges = np.arange(16.0, 29.0 + width, width)
    c, centre = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (tmag >= lo) & (tmag < hi)
        if sel.sum() >= 5:
            c.append(found[sel].mean())
            centre.append(0.5 * (lo + hi))
    c, centre = np.asarray(c), np.asarray(centre)
    if c.size == 0:
        return float("nan")
    # first bin, from the bright side, after which the completeness stays below the level
    above = c >= level
    if not above.any():
        return float(centre[0])
    k = int(np.flatnonzero(above)[-1])
    if k + 1 >= c.size:
        return float(centre[-1])
    c0, c1 = c[k], c[k + 1]
    return float(centre[k] + (c0 - level) / max(c0 - c1, 1e-9) * (centre[k + 1] - centre[k]))


def photometric_accuracy(results, flux_rows, cat, ref: str, m90: float, have_sex: bool) -> dict[str, Any]:
    """Median and sigma_MAD of Delta mag per true-magnitude bin; error calibration of isolated stars."""
    bins = [(b, b + 1.0) for b in np.arange(16.0, np.floor(m90) + 1.0, 1.0)]
    ap = f"ap{int(CALIB_APERTURE):02d}"
    rec: dict[str, list] = {k: [] for k in ("tmag", "star", "iso", "sat", "ko", "ao", "ks", "as_", "ok_o", "ok_s")}
    calib: dict[str, list] = {"ours": [], "sex": [], "ours_masked": []}
    rejected: dict[str, int] = {}  # isolated star-bands with S/N >= 5 that each of our bad flags removes
    for res, fr in zip(results, flux_rows):
        o = res["ours"]
        tf = fr["truth"][ref]
        mo, ms = fr["mo"], fr["ms"]
        corr = res["ours"]["apcorr"]
        # reference-band magnitudes of the matched objects
        ko = np.where(mo >= 0, mag(o[f"{ref}_kronFlux"][np.maximum(mo, 0)]), np.nan)
        ao = np.where(mo >= 0, mag(o[f"{ref}_{ap}Flux"][np.maximum(mo, 0)] * corr[ref][ap]), np.nan)
        rec["ko"].append(ko)
        rec["ao"].append(ao)
        ok_o = mo >= 0
        if have_sex:
            s = res["sex"]
            ks = np.where(ms >= 0, mag(s["flux"][ref]["auto"][np.maximum(ms, 0)]), np.nan)
            as_ = np.where(ms >= 0, mag(s["flux"][ref][ap][np.maximum(ms, 0)] * corr[ref][ap]), np.nan)
        else:
            ks = as_ = np.full(mo.size, np.nan)
        rec["ks"].append(ks)
        rec["as_"].append(as_)
        # error calibration: isolated unsaturated stars, all bands, brighter than m90 in the band's own terms
        from astropy.table import Table as ATable  # noqa: F401  (truth already read)

        for b in res["bands"]:
            ftrue = fr["truth"][b]
            for who, m_idx in (("ours", mo), ("sex", ms)):
                if who == "sex" and not have_sex:
                    continue
                sel = (m_idx >= 0) & cat_slice(cat, "star", results, res) & cat_slice(cat, "iso", results, res) \
                    & ~cat_slice(cat, "sat", results, res)
                j = m_idx[sel]
                if who == "ours":
                    f = o[f"{b}_{ap}Flux"][j] * corr[b][ap]
                    e = o[f"{b}_{ap}FluxErr"][j] * corr[b][ap]
                    fo = _band_flags(o, b)[j]
                    bad = (fo & _bad_flags()) != 0
                else:
                    f = res["sex"]["flux"][b][ap][j] * corr[b][ap]
                    e = res["sex"]["flux"][b][f"{ap}_err"][j] * corr[b][ap]
                    bad = res["sex"]["flags"][j] >= 4
                ft = ftrue[sel]
                snr_true = ft / np.where(e > 0, e, np.inf)
                use = ~bad & (e > 0) & (snr_true >= 5)  # detected in this band
                calib[who].append(np.c_[(f[use] - ft[use]) / e[use], snr_true[use]])
                if who == "ours":
                    # masked pixels in the aperture union (any band) are filled by the object's own model: are the
                    # errors of those objects calibrated too? (with artefacts, most isolated stars carry the flag)
                    live = (e > 0) & (snr_true >= 5)
                    for name in _BAD_FLAG_NAMES:
                        rejected[name] = rejected.get(name, 0) + int(np.sum(live & ((fo & OBJECT_FLAGS[name]) != 0)))
                    only_masked = live & bad & ((fo & (_bad_flags() & ~OBJECT_FLAGS["masked_pixels"])) == 0)
                    calib["ours_masked"].append(np.c_[(f[only_masked] - ft[only_masked]) / e[only_masked], snr_true[only_masked]])
    data = {k: np.concatenate(v) for k, v in rec.items() if v}
    tm, star = cat["tmag"], cat["star"]
    out: dict[str, Any] = {"bins": [list(b) for b in bins], "aperture": ap, "ref_band": ref}
    for name, key, sel_fn in (("kron_all", ("ko", "ks"), lambda: np.ones(tm.size, bool)),
                              ("kron_stars", ("ko", "ks"), lambda: star),
                              ("kron_galaxies", ("ko", "ks"), lambda: ~star),
                              (f"{ap}_corrected_stars", ("ao", "as_"), lambda: star)):
        sel0 = sel_fn() & cat["inner"] & ~cat["sat"]
        tab = []
        for lo, hi in bins:
            sel = sel0 & (tm >= lo) & (tm < hi)
            row: dict[str, Any] = {"lo": lo, "hi": hi}
            for who, k in zip(("ours", "sextractor"), key):
                d = data[k][sel] - tm[sel]
                d = d[np.isfinite(d)]
                row[who] = {"n": int(d.size), "median": float(np.median(d)) if d.size else None,
                            "sigma_mad": sigma_mad(d) if d.size > 2 else None}
            tab.append(row)
        bright = sel0 & (tm < m90 - 2.0)
        summary = {}
        for who, k in zip(("ours", "sextractor"), key):
            d = data[k][bright] - tm[bright]
            d = d[np.isfinite(d)]
            summary[who] = {"n": int(d.size), "median": float(np.median(d)) if d.size else None,
                            "sigma_mad": sigma_mad(d) if d.size > 2 else None}
        out[name] = {"bins": tab, "brighter_than_m90_minus_2": summary}
    out["error_calibration"] = {}
    for who in ("ours", "sex"):
        if calib[who]:
            out["error_calibration"]["sextractor" if who == "sex" else "ours"] = _pull_summary(np.concatenate(calib[who]))
    if calib["ours_masked"]:
        out["error_calibration_masked_only"] = _pull_summary(np.concatenate(calib["ours_masked"]))
    out["error_calibration_rejected_by_flag"] = rejected
    return out


#: flux kinds whose colours the bench compares with the true colours: (who, label, flux key in a tile result)
COLOUR_KINDS = (("ours", "model", "model"), ("ours", "PSF", "psf"), ("ours", "Kron", "kron"),
                ("ours", "ap", "ap"), ("sextractor", "AUTO", "auto"), ("sextractor", "ap", "ap"))


def colour_residuals(f1: np.ndarray, f2: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """Measured minus true colour [mag] from two bands' fluxes (NaN where a measured flux is not positive)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        d = -2.5 * np.log10(f1 / f2) + 2.5 * np.log10(t1 / t2)
    return np.where((f1 > 0) & (f2 > 0) & (t1 > 0) & (t2 > 0), d, np.nan)


def _kind_flux(res: dict[str, Any], who: str, key: str, band: str, ap: str) -> np.ndarray:
    """One flux kind of one band from a tile result: ours or SExtractor's; ``"ap"`` is the ``ap`` aperture,
    corrected to total with our point-source correction for both codes."""
    k = ap if key == "ap" else key
    f = res["ours"][f"{band}_{k}Flux"] if who == "ours" else res["sex"]["flux"][band][k]
    return f * res["ours"]["apcorr"][band][ap] if key == "ap" else f


def colour_accuracy(results: list[dict[str, Any]], flux_rows: list[dict[str, Any]], cat: dict[str, np.ndarray],
                    m90: float, have_sex: bool) -> dict[str, Any]:
    """Median and sigma_MAD of (measured - true) colour of matched galaxies (inner, unsaturated), for each adjacent
    band pair and each flux kind, brighter than m90 - 2 and between m90 - 2 and m90 (true reference magnitude).

    A PSF fit or a fixed aperture takes a share of a galaxy's light that depends on the band's seeing, so
    their colours carry a size-dependent error; Kron and model fluxes aim at the whole galaxy."""
    ap = f"ap{int(CALIB_APERTURE):02d}"
    bands = results[0]["bands"]
    pairs = list(zip(bands[:-1], bands[1:]))
    ranges = (("bright", -np.inf, m90 - 2.0), ("faint", m90 - 2.0, m90))
    resid: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for res, fr in zip(results, flux_rows):
        for who, label, key in COLOUR_KINDS:
            if who == "sextractor" and not have_sex:
                continue
            idx = fr["mo"] if who == "ours" else fr["ms"]
            ok = idx >= 0
            j = np.maximum(idx, 0)
            for b1, b2 in pairs:
                d = colour_residuals(_kind_flux(res, who, key, b1, ap)[j], _kind_flux(res, who, key, b2, ap)[j],
                                     fr["truth"][b1], fr["truth"][b2])
                resid.setdefault((who, label, f"{b1}-{b2}"), []).append(np.where(ok, d, np.nan))
    sel0 = cat["inner"] & ~cat["sat"] & ~cat["star"]
    tm = cat["tmag"]
    out: dict[str, Any] = {"aperture": ap, "ranges": {n: [lo, hi] for n, lo, hi in ranges}, "colours": [f"{a}-{b}" for a, b in pairs],
                           "kinds": [f"{who} {label}" for who, label, _ in COLOUR_KINDS if who == "ours" or have_sex], "table": {}}
    for (who, label, colour), parts in resid.items():
        d_all = np.concatenate(parts)
        for name, lo, hi in ranges:
            d = d_all[sel0 & (tm >= lo) & (tm < hi)]
            d = d[np.isfinite(d)]
            out["table"].setdefault(colour, {}).setdefault(name, {})[f"{who} {label}"] = {
                "n": int(d.size), "median": float(np.median(d)) if d.size else None,
                "sigma_mad": sigma_mad(d) if d.size > 2 else None}
    return out


_BAD_FLAG_NAMES = ("saturated", "edge", "masked_pixels", "bad_photometry", "aperture_truncated")


def _bad_flags() -> int:
    return OBJECT_FLAGS.value(*_BAD_FLAG_NAMES)


def _band_flags(o: Any, band: str) -> np.ndarray:
    """An object's flags as band ``band`` sees them: that band's pixel flags (``<band>_flags``, photometry v5 on)
    plus the object-level ones (edge, truncated aperture, ...); the all-band ``flags`` where there is none."""
    if f"{band}_flags" not in o:
        return np.asarray(o["flags"])
    return (np.asarray(o["flags"]) & ~np.uint32(BAND_PIXEL_FLAGS)) | np.asarray(o[f"{band}_flags"])


def _pull_summary(zz: np.ndarray) -> dict[str, dict[str, Any]]:
    """Error calibration of (pull, true S/N) rows in two S/N ranges."""
    d = {}
    for tag, lo, hi in (("snr_5_100", 5.0, 100.0), ("snr_ge_5", 5.0, np.inf)):
        z = zz[(zz[:, 1] >= lo) & (zz[:, 1] < hi), 0]
        d[tag] = {"fraction_within_1sigma": float(np.mean(np.abs(z) < 1)) if z.size else None, "n": int(z.size),
                  "median_pull": float(np.median(z)) if z.size else None, "sigma_mad_pull": sigma_mad(z)}
    return d


def cat_slice(cat: dict[str, np.ndarray], key: str, results: list, res: dict) -> np.ndarray:
    """The part of a concatenated truth column that belongs to tile ``res``."""
    start = 0
    for r in results:
        n = r["_ntruth"]
        if r is res:
            return cat[key][start:start + n]
        start += n
    raise KeyError(res["tile"])


def throughput(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per megapixel per band, ours and SExtractor's, and their ratios."""
    mpix_band = sum(r["shape"][0] * r["shape"][1] * len(r["bands"]) for r in results) / 1e6
    out: dict[str, Any] = {"megapixel_bands": mpix_band}
    for clock in ("cpu_s", "wall_s"):
        core = sum(r["timing"][s][clock] for r in results for s in ("detection", "deblending", "photometry"))
        full = core + sum(r["timing"]["background"][clock] for r in results)
        d = {"ours_det_deblend_phot": core / mpix_band, "ours_with_background": full / mpix_band,
             "per_stage": {s: sum(r["timing"][s][clock] for r in results) / mpix_band for s in STAGE_NAMES}}
        if "sex" in results[0]:
            sx = sum(r["sex"][clock] for r in results) / mpix_band
            d["sextractor"] = sx
            d["ratio_ours_over_sextractor"] = d["ours_det_deblend_phot"] / sx if sx > 0 else None
            d["ratio_with_background_over_sextractor"] = d["ours_with_background"] / sx if sx > 0 else None
        out[clock.replace("_s", "")] = d
    return out


def _binom_se(p: float | None, n: int) -> float | None:
    """Binomial standard error of a fraction ``p`` of ``n`` (None when undefined)."""
    if p is None or n <= 0:
        return None
    return float(np.sqrt(max(p * (1 - p), 1.0 / n) / n))  # at least ~1/n: a fraction 0 or 1 of few is not exact


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "   n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def report(metrics: dict[str, Any], thr: dict[str, Any], meta: dict[str, Any]) -> str:
    """The printed benchmark table (every number with its unit)."""
    L = []
    L.append(f"surveypipe bench science: {meta['tiles']} tile(s) of {meta['size']}x{meta['size']} px, bands {meta['bands']}, "
             f"seed {meta['seed']}, reference band {meta['ref']}, match radius 1.0 arcsec one-to-one")
    L.append(f"SExtractor: {meta['sextractor']} (dual-image mode, same detection image, matched settings)")
    if meta.get("artefacts"):
        L.append("Artefacts injected; our artefact stage ran first and its mask went to our classical stages and, "
                 "as zero weight, to SExtractor")
    L.append("")
    c = metrics["completeness"]
    L.append(f"Completeness vs true {meta['ref']} magnitude (fraction of true objects in the inner regions detected)")
    L.append("  mag bin [mag]     N_true   ours    SExtractor   found by ours only / by SExtractor only")
    for lo, hi, n, o, s, oo, so in zip(c["bin_lo"], c["bin_hi"], c["n_true"], c["ours"], c["sextractor"],
                                       c.get("ours_only", [None] * len(c["bin_lo"])),
                                       c.get("sextractor_only", [None] * len(c["bin_lo"]))):
        if n:
            L.append(f"  {lo:5.1f}-{hi:5.1f}     {n:6d}   {_f(o)}   {_f(s)}" + (f"        {oo:5d} / {so:d}" if oo is not None else ""))
    for who, v in metrics["limits"].items():
        L.append(f"  {who:10s}: 90 % completeness at {v['m90']:.2f} mag, 50 % at {v['m50']:.2f} mag")
    L.append("")
    L.append(f"Purity (fraction of primary detections matched to a true object; measured Kron/AUTO {meta['ref']} mag)")
    for who, v in metrics["purity"].items():
        L.append(f"  {who:10s}: brighter than m90 = {metrics['m90_common']:.2f} mag: {_f(v['above_m90'])} (N={v['n_above_m90']});"
                 f" overall: {_f(v['overall'])} (N={v['n']})")
    pu = metrics["purity"]
    if "sextractor" in pu and "bin_unmatched" in pu["ours"]:
        rows = [f"{lo:g}: {a}/{na} vs {b}/{nb}" for lo, a, na, b, nb in
                zip(c["bin_lo"], pu["ours"]["bin_unmatched"], pu["ours"]["bin_n"], pu["sextractor"]["bin_unmatched"],
                    pu["sextractor"]["bin_n"]) if a or b]
        L.append("  unmatched / all primary detections per measured-magnitude bin, ours vs SExtractor: " + "; ".join(rows))
    if all("unmatched_kinds" in v for v in pu.values()):
        L.append("  unmatched primary detections by their nearest true object within 2 match radii (matched to another "
                 "detection: a shred or duplicate / unmatched: a centroid beyond the radius / none: noise or artefact):")
        for who, v in pu.items():
            L.append(f"    {who:10s}: " + ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in v["unmatched_kinds"].items()))
    L.append("")
    ph = metrics["photometry"]
    L.append(f"Photometric accuracy: (measured - true) {meta['ref']} magnitude [mag], median / sigma_MAD (N), unsaturated, inner")
    for name in ("kron_all", "kron_stars", "kron_galaxies", f"{ph['aperture']}_corrected_stars"):
        L.append(f"  {name}:")
        L.append("    true mag [mag]   ours: median  sigma_MAD     N    SExtractor: median  sigma_MAD     N")
        for row in ph[name]["bins"]:
            o, s = row["ours"], row["sextractor"]
            if o["n"] or s["n"]:
                L.append(f"    {row['lo']:5.1f}-{row['hi']:5.1f}      {_f(o['median'], '{:+.4f}'):>8s}  {_f(o['sigma_mad'], '{:.4f}'):>8s} {o['n']:6d}"
                         f"               {_f(s['median'], '{:+.4f}'):>8s}  {_f(s['sigma_mad'], '{:.4f}'):>8s} {s['n']:6d}")
        br = ph[name]["brighter_than_m90_minus_2"]
        L.append(f"    brighter than m90-2 = {metrics['m90_common'] - 2:.2f} mag: ours median {_f(br['ours']['median'], '{:+.4f}')} mag "
                 f"(N={br['ours']['n']}), SExtractor median {_f(br['sextractor']['median'], '{:+.4f}')} mag (N={br['sextractor']['n']})")
    L.append("")
    L.append(f"Error calibration: isolated unsaturated stars, {ph['aperture']} flux corrected to total, all bands pooled")
    for tag, what in (("snr_5_100", "true S/N 5-100 (statistical errors dominate)"), ("snr_ge_5", "true S/N >= 5 (bright stars add systematics)")):
        L.append(f"  {what}:")
        for who, vv in ph["error_calibration"].items():
            v = vv[tag]
            L.append(f"    {who:10s}: fraction |f - f_true| < sigma_f = {_f(v['fraction_within_1sigma'])} (expected 0.68; N={v['n']}); "
                     f"median pull {_f(v['median_pull'], '{:+.3f}')}, sigma_MAD of pulls {_f(v['sigma_mad_pull'])}")
        v = (ph.get("error_calibration_masked_only") or {}).get(tag)
        if v:
            L.append(f"    ours, star-bands flagged masked_pixels only (excluded above; own model fills those pixels): fraction "
                     f"{_f(v['fraction_within_1sigma'])} (N={v['n']}); median pull {_f(v['median_pull'], '{:+.3f}')}, "
                     f"sigma_MAD of pulls {_f(v['sigma_mad_pull'])}")
    rej = ph.get("error_calibration_rejected_by_flag") or {}
    if rej:
        L.append("  our isolated star-bands (true S/N >= 5) carrying each excluding flag: "
                 + ", ".join(f"{k} {v}" for k, v in rej.items()))
    L.append("")
    col = metrics.get("colours")
    if col and col["table"]:
        rng = col["ranges"]
        L.append(f"Colour accuracy: (measured - true) colour of matched galaxies [mag], median / sigma_MAD, unsaturated, inner; "
                 f"bright: true {meta['ref']} < {rng['bright'][1]:.2f} (m90 - 2), faint: {rng['faint'][0]:.2f}-{rng['faint'][1]:.2f};"
                 f" ap = {col['aperture']} corrected to total as for a point source")
        L.append("  colour  range   " + "".join(f"{k:>19s}" for k in col["kinds"]))
        for colour in col["colours"]:
            for name in ("bright", "faint"):
                cells = col["table"].get(colour, {}).get(name, {})
                L.append(f"  {colour:6s}  {name:6s}  " + "".join(
                    f"{_f(cells.get(k, {}).get('median'), '{:+.3f}'):>8s} / {_f(cells.get(k, {}).get('sigma_mad'), '{:.3f}'):>6s}  "
                    for k in col["kinds"]))
        n = col["table"][col["colours"][0]]["bright"].get(col["kinds"][0], {}).get("n")
        L.append(f"  ({n} galaxies in the bright range of {col['colours'][0]})")
        L.append("")
    ast = metrics.get("astrometry")
    if ast:
        L.append("Astrometry: offset of the matched centroid from the true position [milliarcsec], median / 90th percentile (N),"
                 " unsaturated, inner; SExtractor's X_IMAGE (isophotal barycentre on the detection image) and "
                 "XWIN_IMAGE (windowed, reference band)")
        L.append("  true mag [mag]  " + "".join(f"{k + ': ' + w:23s}" for k in ("stars", "galaxies")
                                                 for w in ("ours", "SExtractor", "SExtractor XWIN")))
        ms = lambda v: ("  n/a                  " if not v or v["median"] is None  # noqa: E731
                        else f"{1000 * v['median']:5.0f} / {1000 * v['p90']:5.0f} ({v['n']:4d})  ")
        for r in ast["bins"]:
            L.append(f"  {r['lo']:5.1f}-{r['hi']:5.1f}     " + "".join(ms(r.get(f"{k}_{w}")) for k in ("stars", "galaxies")
                                                                   for w in ("ours", "sextractor", "sextractor_win")))
        L.append("")
    bl = metrics["blend_recovery"]
    if bl:
        L.append(f"Blend recovery: true pairs closer than 1.5 arcsec, both brighter than {bl['mag_limit']:.2f} mag, detected as two objects")
        L.append(f"  all pairs (N={bl['n_pairs']}): ours {_f(bl['ours'])} +- {_f(_binom_se(bl['ours'], bl['n_pairs']))}, "
                 f"SExtractor {_f(bl['sextractor'])} +- {_f(_binom_se(bl['sextractor'], bl['n_pairs']))} (binomial standard errors;"
                 f" more pairs: more tiles, --tiles)")
        for r in bl["by_separation"]:
            L.append(f"  separation {r['lo']:.2f}-{r['hi']:.2f} arcsec (N={r['n']}): ours {_f(r['ours'])}, SExtractor {_f(r['sextractor'])}")
        for r in bl["other_limits"]:
            L.append(f"  with the {r['limit_of']} 90 % magnitude {r['mag_limit']:.2f} as the limit (N={r['n']}): "
                     f"ours {_f(r['ours'])}, SExtractor {_f(r['sextractor'])}")
    L.append("")
    L.append(f"Throughput [s per megapixel per band] over {thr['megapixel_bands']:.2f} megapixel-bands")
    for clock in ("cpu", "wall"):
        d = thr[clock]
        L.append(f"  {clock:4s}: ours detection+deblending+photometry {d['ours_det_deblend_phot']:.4f} s/(Mpix band), "
                 f"with background {d['ours_with_background']:.4f}; SExtractor {_f(d.get('sextractor'), '{:.4f}')} s/(Mpix band); "
                 f"ratio ours/SExtractor {_f(d.get('ratio_ours_over_sextractor'))} (with background {_f(d.get('ratio_with_background_over_sextractor'))})")
        L.append("        per stage [s/(Mpix band)]: " + ", ".join(f"{k} {v:.4f}" for k, v in d["per_stage"].items()))
    return "\n".join(L)


def goals(metrics: dict[str, Any], thr: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, each with the numbers it was judged on."""
    g: dict[str, Any] = {}
    c = metrics["completeness"]
    if c["sextractor"][0] is not None or any(v is not None for v in c["sextractor"]):
        def worse_bins(ours, sex, ns_o, ns_s):
            out = []
            for lo, o, s, no, ns in zip(c["bin_lo"], ours, sex, ns_o, ns_s):
                if o is None or s is None or o >= s:
                    continue
                sig = np.sqrt(o * (1 - o) / max(no, 1) + s * (1 - s) / max(ns, 1))
                out.append({"bin_lo": lo, "ours": o, "sextractor": s, "n": no, "significant_2sigma": bool(s - o > 2 * sig)})
            return out
        worse = worse_bins(c["ours"], c["sextractor"], c["n_true"], c["n_true"])
        if "ours_only" in c:  # paired (same true objects): exact one-sided sign test on the discordant objects
            from scipy.stats import binom

            for w in worse:
                k = c["bin_lo"].index(w["bin_lo"])
                a, b = c["ours_only"][k], c["sextractor_only"][k]
                w.update({"ours_only": a, "sextractor_only": b, "paired_p": float(binom.cdf(a, a + b, 0.5))})
                w["significant_2sigma"] = w["paired_p"] < 0.0228  # one-sided 2 sigma
        g["completeness_ge_sextractor_every_bin"] = {"pass": not worse, "bins_worse": worse,
                                                     "pass_within_2sigma": not any(w["significant_2sigma"] for w in worse)}
        pu = metrics["purity"]
        if "sextractor" in pu:
            worse = worse_bins(pu["ours"]["bins"], pu["sextractor"]["bins"], pu["ours"]["bin_n"], pu["sextractor"]["bin_n"])
            g["purity_ge_sextractor_every_bin"] = {"pass": not worse, "bins_worse": worse,
                                                   "pass_within_2sigma": not any(w["significant_2sigma"] for w in worse),
                                                   "above_m90": (pu["ours"]["above_m90"], pu["sextractor"]["above_m90"]),
                                                   "overall": (pu["ours"]["overall"], pu["sextractor"]["overall"])}
        bl = metrics["blend_recovery"]
        if bl and bl.get("ours") is not None and bl.get("sextractor") is not None:
            se = np.hypot(_binom_se(bl["ours"], bl["n_pairs"]) or 0.0, _binom_se(bl["sextractor"], bl["n_pairs"]) or 0.0)
            g["blend_recovery_ge_sextractor_plus_10pt"] = {"pass": bl["ours"] >= bl["sextractor"] + 0.10,
                                                           "ours": bl["ours"], "sextractor": bl["sextractor"],
                                                           "n_pairs": bl["n_pairs"], "difference_se": float(se)}
        r = thr["cpu"].get("ratio_ours_over_sextractor")
        g["no_slower_than_sextractor"] = {"pass": r is not None and r <= 1.0, "cpu_ratio": r,
                                          "wall_ratio": thr["wall"].get("ratio_ours_over_sextractor")}
    ph = metrics["photometry"]
    for name in ("kron_all", f"{ph['aperture']}_corrected_stars"):
        med = ph[name]["brighter_than_m90_minus_2"]["ours"]["median"]
        g[f"abs_median_dmag_lt_0.02_{name}"] = {"pass": med is not None and abs(med) < 0.02, "median": med}
    ec = ph["error_calibration"].get("ours", {}).get("snr_5_100", {}).get("fraction_within_1sigma")
    g["error_calibration_0.63_0.73"] = {"pass": ec is not None and 0.63 <= ec <= 0.73, "fraction": ec}
    return g


def _goal_text(name: str, v: dict[str, Any]) -> str:
    text = f"{name}: {'PASS' if v['pass'] else 'FAIL'}"
    if not v["pass"] and "bins_worse" in v:
        bins = ", ".join(f"{w['bin_lo']:g}" + (f" ({w['ours_only']} vs {w['sextractor_only']} found by one only, paired p = "
                                                f"{w['paired_p']:.2f})" if "paired_p" in w else "") for w in v["bins_worse"])
        text += (f" (lower in bins starting at {bins} mag; "
                 f"{'none' if v['pass_within_2sigma'] else 'some'} by more than 2 sigma)")
    if "difference_se" in v:
        text += f" ({v['ours'] - v['sextractor']:+.3f} +- {v['difference_se']:.3f} on {v['n_pairs']} pairs)"
    return text


def _run_tile(args: tuple[str, str, str, bool, dict[str, dict[str, Any]], bool]) -> dict[str, Any]:
    return process_tile(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="surveypipe bench science", description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=2, help="tiles to simulate (default 2)")
    p.add_argument("--size", type=int, default=2048, help="tile size in pixels (default 2048)")
    p.add_argument("--bands", default="ugrizy", help="bands (default ugrizy)")
    p.add_argument("--seed", type=int, default=9001, help="benchmark seed, 9000-9999 (default 9001)")
    p.add_argument("--workers", type=int, default=1, help="tiles processed in parallel (default 1: cleanest timings)")
    p.add_argument("--out", default="out/bench/science", help="output directory (science.json, the simulated release)")
    p.add_argument("--ref-band", default="i", help="band of the true magnitudes (default i, the mock's reference)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (default 64)")
    p.add_argument("--data", default=None, help="use this already simulated release (manifest.yaml) instead of simulating")
    p.add_argument("--no-sextractor", action="store_true", help="skip SExtractor (no comparison numbers)")
    p.add_argument("--artefacts", action="store_true", help=(
        "inject instrumental artefacts into the simulated tiles (as make run's demo release) and run the "
        "artefact stage before the classical stages; SExtractor gets the same mask as zero weight"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a classical stage's setting (repeatable), as surveypipe run --set")
    p.add_argument("--seed-purpose", default="benchmark", choices=["benchmark", "test", "validation"], help=(
        "range the seed must come from: benchmark (the held-out default), or test/validation seeds for iterating "
        "on the stages without looking at the benchmark tiles"))
    a = p.parse_args(argv)

    from workflows.mock.seeds import check_seed

    from . import sextractor

    try:
        check_seed(a.seed, a.seed_purpose)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run_sex = not a.no_sextractor
    if run_sex and sextractor.executable() is None:
        print("error: source-extractor not found (apt-get install -y source-extractor), or pass --no-sextractor", file=sys.stderr)
        return 2
    if a.data:
        manifest = Path(a.data)
    else:
        from workflows.mock import write_release

        t0 = time.perf_counter()
        inject = None
        if a.artefacts:
            from workflows.mock.artefacts import inject_artefacts as inject
        manifest = write_release(out / "release", n_tiles=a.tiles, size=a.size, bands=a.bands, seed=a.seed, overlap=a.overlap,
                                 artefact_injector=inject)
        print(f"simulated {a.tiles} tile(s) in {time.perf_counter() - t0:.1f} s", flush=True)
    from pipeline.manifest import load_manifest

    m = load_manifest(manifest)
    tiles = sorted(t.id for t in m.tiles)
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    try:
        settings = load_config(overrides=a.overrides).stage_config if a.overrides else {}
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    jobs = [(str(manifest), tid, str(out), run_sex, settings, a.artefacts) for tid in tiles]
    t0 = time.perf_counter()
    if a.workers > 1:
        with ProcessPoolExecutor(max_workers=a.workers) as ex:
            results = list(ex.map(_run_tile, jobs))
    else:
        results = []
        for j in jobs:
            results.append(_run_tile(j))
            r = results[-1]
            print(f"tile {r['tile']}: {r['n_rows']} rows; stages " + ", ".join(f"{k} {v['cpu_s']:.2f}" for k, v in r["timing"].items())
                  + " s CPU" + (f"; SExtractor {r['sex']['cpu_s']:.2f} s CPU" if run_sex else ""), flush=True)
    truth_dir = Path(manifest).parent / "truth"
    from astropy.table import Table as ATable

    for r in results:
        r["_ntruth"] = len(ATable.read(truth_dir / f"{r['tile']}.fits"))
    from pipeline.tile import load_tile

    scale = load_tile(m, m.tile(tiles[0]), bands=[m.bands[0]]).pixel_scale_arcsec
    ref = a.ref_band if a.ref_band in results[0]["bands"] else results[0]["bands"][len(results[0]["bands"]) // 2]
    metrics = evaluate(results, truth_dir, ref, scale)
    thr = throughput(results)
    meta = {"tiles": len(tiles), "size": a.size if not a.data else results[0]["shape"][0], "bands": "".join(results[0]["bands"]),
            "seed": a.seed, "ref": ref, "settings": settings, "artefacts": bool(a.artefacts), "sextractor": sextractor.version() if run_sex else "not run",
            "pixel_scale_arcsec": scale, "processing_wall_s": time.perf_counter() - t0, "workers": a.workers,
            "per_tile": [{"tile": r["tile"], "rows": r["n_rows"], **r["deblend"], "timing": r["timing"],
                          **({"sextractor_cpu_s": r["sex"]["cpu_s"], "sextractor_wall_s": r["sex"]["wall_s"],
                              "sextractor_rows": int(r["sex"]["x"].size)} if run_sex else {})} for r in results]}
    text = report(metrics, thr, meta)
    g = goals(metrics, thr)
    print(text)
    print("")
    print("Goals: " + "; ".join(_goal_text(k, v) for k, v in g.items()))
    (out / "science.json").write_text(json.dumps({"meta": meta, "metrics": metrics, "throughput": thr, "goals": g},
                                                 indent=1, default=_json_default))
    print(f"wrote {out / 'science.json'}")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
