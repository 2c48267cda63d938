"""Benchmark of the two image-based deep-learning stages (morphology and strong-lens scoring).

``surveypipe bench deeplearning --out DIR`` (part of ``make bench``). Everything is simulated with
benchmark seeds (9000-9999) that no training or validation used:

* **Morphology** -- mock tiles (seed 9000, ``--tiles`` x 2048^2 px, gri) through the classical
  stages and the ``Morphology`` stage itself (shipped model, default config); primary detections are
  matched to the truth (brightest true object within 2 px) and scored where the stage scored them.
  Printed: accuracy and confusion matrix per true i-magnitude bin, accuracy of galaxies with
  i < m5_i - 2 (goal >= 0.90), expected calibration error (goal <= 0.03); and the star/galaxy
  separation of ``morph_extendedness`` against the classical measure per magnitude bin, on the same
  objects: accuracy of ``morph_extendedness >= 0.5`` vs ``refExtendedness``, and ROC AUC of
  ``morph_extendedness`` vs ``-psfKronRatio`` (the continuous quantity ``refExtendedness`` cuts).
* **Lenses** -- stamps from :func:`workflows.train.stamps.lens_sets` (seed 9100): ``--negatives``
  ordinary plausible deflectors (true i < 23, g - i > 1, the stage's default cut; default 1e5),
  ``--lenses`` lenses around mock spheroids (every drawn lens, no S/N cut) and ``--hard`` hard
  negatives of each kind, scored through ONNX Runtime. Printed: ROC AUC, TPR at FPR 1 % and 0.1 %,
  TPR0 / TPR10 (highest TPR with 0 / fewer than 10 false positives); the same for lenses with
  theta_E > 1.4" and lensed-source S/N > 20 (goal TPR >= 0.90 at FPR 0.1 %); the false-positive
  rate of each hard-negative kind at the FPR-1 % and 0.1 % thresholds. Each TPR at fixed FPR comes
  with a 95 % stratified-bootstrap interval (:mod:`workflows.bench.roc_bootstrap`); the per-stamp
  scores are saved (``lens_scores.npz``), and ``--compare-lens-scores OTHER.npz`` prints this model's
  TPR minus another run's on the very same stamps, with paired-bootstrap intervals.
* **Throughput** -- stamps per second on one core: cutting + stretching (the cutout service),
  inference through ONNX Runtime and through the PyTorch model it was exported from (same
  batches); and the time each stage adds per tile (measured on the benchmark tiles, next to the
  classical stages' time on the same tiles).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MAG_BINS = (18.0, 20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.5)
DEFAULT_OUT = Path("out/bench/deeplearning")
GOALS = {"morph_bright_accuracy": 0.90, "morph_ece": 0.03, "lens_tpr_fpr0.001_easy": 0.90}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surveypipe bench deeplearning", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (results.json, report.txt)")
    p.add_argument("--workdir", type=Path, default=None, help="simulated tiles (default OUT/tiles; re-used)")
    p.add_argument("--morph-model", type=Path, default=None, help="morphology model dir (default: shipped)")
    p.add_argument("--lens-model", type=Path, default=None, help="lens model dir (default: shipped)")
    p.add_argument("--morph-seed", type=int, default=9000)
    p.add_argument("--lens-seed", type=int, default=9100)
    p.add_argument("--tiles", type=int, default=4, help="morphology benchmark tiles (2048^2 px)")
    p.add_argument("--tile-size", type=int, default=2048)
    p.add_argument("--negatives", type=int, default=100_000, help="ordinary deflector-like negatives")
    p.add_argument("--lenses", type=int, default=6000, help="simulated lenses")
    p.add_argument("--hard", type=int, default=1000, help="hard negatives of each kind")
    p.add_argument("--field", type=int, default=2048, help="lens mosaics: field side (pixels; smoke tests: 256)")
    p.add_argument("--pool", type=int, default=None, help="lens candidate population side (pixels; default by set size)")
    p.add_argument("--jobs", type=int, default=max(1, min(LENS_PARTS, os.cpu_count() or 1)),
                   help="processes for the lens benchmark set (the set itself does not depend on this)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the lens TPR intervals")
    p.add_argument("--compare-lens-scores", type=Path, default=None, metavar="NPZ",
                   help="another lens run's lens_scores.npz (same stamps): print the paired TPR differences")
    p.add_argument("--throughput-stamps", type=int, default=2048, help="stamps timed per model in the throughput part")
    p.add_argument("--seed-purpose", default="benchmark", choices=["benchmark", "validation"], help=(
        "range the morphology and lens seeds must come from: benchmark (the held-out default), or validation "
        "seeds (2000-2999) for judging a trained model without looking at the benchmark sets"))
    p.add_argument("--skip", choices=["morphology", "lenses", "throughput"], action="append", default=[],
                   help="leave out a part (repeatable)")
    return p


# ---------------------------------------------------------------- metrics
def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def _fmt_cm(cm: np.ndarray, classes: list[str], indent: str = "    ") -> list[str]:
    w = max(9, max(len(c) for c in classes) + 1)
    lines = [indent + "true\\pred".ljust(w) + "".join(c[:w - 1].rjust(w) for c in classes)]
    for c, row in zip(classes, cm):
        lines.append(indent + c.ljust(w) + "".join(str(v).rjust(w) for v in row))
    return lines


def _acc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b)) if len(a) else float("nan")


# ---------------------------------------------------------------- morphology
def bench_morphology(a: argparse.Namespace, out: dict[str, Any], say) -> None:
    from stages.lenses import Lenses
    from stages.morphology import Morphology
    from workflows.train import stamps as S

    survey = S.survey_config()
    S.check_purpose(a.morph_seed, a.seed_purpose)
    workdir = (a.workdir or a.out / "tiles") / f"morph-seed{a.morph_seed}"
    t0 = time.perf_counter()
    manifest = S.simulate_release(workdir, a.morph_seed, a.tiles, a.tile_size, S.BANDS)
    say(f"morphology: {a.tiles} benchmark tiles of {a.tile_size}^2 px (seed {a.morph_seed}) ready "
        f"({time.perf_counter() - t0:.0f} s)")
    mst, lst = Morphology(), Lenses()
    mcfg = mst.Config(**({"model_dir": str(a.morph_model)} if a.morph_model else {}))
    lcfg = lst.Config(**({"model_dir": str(a.lens_model)} if a.lens_model else {}))
    rows: list[dict[str, np.ndarray]] = []
    timing = {"classical_s": [], "morphology_s": [], "lenses_s": [], "objects": [], "scored": [], "candidates": [],
              "pixels": []}
    classes: list[str] = []
    for k, tile, prods, truth in _timed_tiles(manifest, timing):
        inputs = {"exposure": tile, "sky": prods["sky"], "objects": prods["objects"]}
        mst.run(inputs, mcfg) if k == 0 else None  # warm the session and card cache outside the timing
        lst.run(inputs, lcfg) if k == 0 else None
        t1 = time.perf_counter()
        mt = mst.run(inputs, mcfg)["morphology"]
        timing["morphology_s"].append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        lt = lst.run(inputs, lcfg)["lenses"]
        timing["lenses_s"].append(time.perf_counter() - t1)
        obj = prods["objects"]
        classes = list(mt.attrs["morph_classes"])
        timing["objects"].append(len(obj))
        timing["scored"].append(int(np.sum(mt["morph_class"] >= 0)))
        timing["candidates"].append(int(lt.attrs["lens_n_candidates"]))
        timing["pixels"].append(int(np.prod(tile.shape)))
        prim = np.asarray(obj["detect_isPrimary"], bool)
        idx = S.match_truth(np.asarray(obj["x"]), np.asarray(obj["y"]), np.asarray(truth["x"]), np.asarray(truth["y"]),
                            np.asarray(truth["flux_i"]))
        keep = prim & (idx >= 0)
        tt = truth[idx[keep]]
        types = np.array([S.MORPH_CLASSES.index(t) for t in S.truth_types(tt)], np.int64)
        probs = np.stack([np.asarray(mt[f"morph_p_{c}"])[keep] for c in classes], axis=1)
        ext = np.asarray(obj["refExtendedness"], float)[keep] if "refExtendedness" in obj else np.full(keep.sum(), np.nan)
        ratio = np.asarray(obj["psfKronRatio"], float)[keep] if "psfKronRatio" in obj else np.full(keep.sum(), np.nan)
        rows.append({"y": np.array([classes.index(S.MORPH_CLASSES[t]) for t in types], np.int64), "p": probs,
                     "mag_i": np.asarray(tt["mag_i"], float), "ref_ext": ext, "psf_kron": ratio,
                     "morph_ext": np.asarray(mt["morph_extendedness"], float)[keep] if "morph_extendedness" in mt else 1 - probs[:, 0]})
    R = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    scored = np.all(np.isfinite(R["p"]), axis=1)
    y, p, mag = R["y"][scored], R["p"][scored], R["mag_i"][scored]
    pred = p.argmax(axis=1)
    star = classes.index("star")
    bright_mag = float(survey.m5["i"] - 2.0)
    bright = (y != star) & (mag < bright_mag)
    res: dict[str, Any] = {"classes": classes, "n_matched_primary": int(len(R["y"])), "n_scored": int(scored.sum()),
                           "accuracy": _acc(pred, y), "ece": S.expected_calibration_error(p, y),
                           "bright_mag": bright_mag, "accuracy_bright_galaxies": _acc(pred[bright], y[bright]),
                           "n_bright_galaxies": int(bright.sum()),
                           "confusion": confusion(y, pred, len(classes)).tolist(), "by_mag": []}
    say("")
    say(f"MORPHOLOGY  ({res['n_scored']} scored of {res['n_matched_primary']} matched primary detections, "
        f"{a.tiles} tiles, seed {a.morph_seed})")
    say(f"  accuracy (all scored)                         {res['accuracy']:.4f}")
    say(f"  accuracy, galaxies with true i < {bright_mag:.2f} (m5_i-2)  {res['accuracy_bright_galaxies']:.4f}  "
        f"(n={res['n_bright_galaxies']}; goal >= {GOALS['morph_bright_accuracy']:.2f}: "
        f"{'met' if res['accuracy_bright_galaxies'] >= GOALS['morph_bright_accuracy'] else 'NOT met'})")
    say(f"  expected calibration error (15 bins)          {res['ece']:.4f}  (goal <= {GOALS['morph_ece']:.2f}: "
        f"{'met' if res['ece'] <= GOALS['morph_ece'] else 'NOT met'})")
    say("  confusion matrix, all magnitudes (rows true, columns predicted):")
    for line in _fmt_cm(np.asarray(res["confusion"]), classes):
        say(line)
    say("  by true i magnitude:   n      accuracy  ECE     confusion (rows true: " + ", ".join(classes) + ")")
    for lo, hi in zip(MAG_BINS[:-1], MAG_BINS[1:]):
        m = (mag >= lo) & (mag < hi)
        if not m.any():
            continue
        cm = confusion(y[m], pred[m], len(classes))
        e = S.expected_calibration_error(p[m], y[m])
        res["by_mag"].append({"mag": [lo, hi], "n": int(m.sum()), "accuracy": _acc(pred[m], y[m]), "ece": e,
                              "confusion": cm.tolist()})
        say(f"    i {lo:4.1f}-{hi:4.1f}       {int(m.sum()):6d}   {_acc(pred[m], y[m]):.4f}    {e:.4f}  "
            + " | ".join(" ".join(str(v) for v in row) for row in cm))
    # star / galaxy
    sg: list[dict[str, Any]] = []
    say("  star/galaxy on the same scored objects: accuracy of morph_extendedness >= 0.5 vs refExtendedness (binary), "
        "ROC AUC of morph_extendedness vs -psfKronRatio (the continuous classical measure behind refExtendedness)")
    say("    i bin         n_star  n_gal   acc_morph  acc_refExt  acc ok   AUC_morph  AUC_psfKron  AUC ok")
    is_gal = (y != star).astype(int)
    me = R["morph_ext"][scored]
    re_ = R["ref_ext"][scored]
    pk = R["psf_kron"][scored]
    acc_all_ok = auc_all_ok = True
    for lo, hi in zip(MAG_BINS[:-1], MAG_BINS[1:]):
        m = (mag >= lo) & (mag < hi) & np.isfinite(re_)
        if not m.any():
            continue
        acc_m = _acc((me[m] >= 0.5).astype(int), is_gal[m])
        acc_r = _acc((re_[m] >= 0.5).astype(int), is_gal[m])
        mk = m & np.isfinite(pk)
        auc_m, auc_r = S.roc_auc(me[mk], is_gal[mk]), S.roc_auc(-pk[mk], is_gal[mk])
        acc_ok = acc_m >= acc_r
        auc_ok = not (np.isfinite(auc_r) and np.isfinite(auc_m)) or auc_m >= auc_r
        acc_all_ok &= acc_ok
        auc_all_ok &= auc_ok
        sg.append({"mag": [lo, hi], "n_star": int((is_gal[m] == 0).sum()), "n_gal": int(is_gal[m].sum()),
                   "acc_morph": acc_m, "acc_refExtendedness": acc_r, "auc_morph": auc_m, "auc_psfKronRatio": auc_r,
                   "accuracy_at_least_as_good": bool(acc_ok), "auc_at_least_as_good": bool(auc_ok)})
        say(f"    i {lo:4.1f}-{hi:4.1f}   {sg[-1]['n_star']:6d} {sg[-1]['n_gal']:6d}    {acc_m:.4f}     {acc_r:.4f}     "
            f"{'yes' if acc_ok else 'NO ':3s}    {auc_m:.4f}     {auc_r:.4f}       {'yes' if auc_ok else 'NO'}")
    res["star_galaxy"] = sg
    res["star_galaxy_accuracy_at_least_as_good_everywhere"] = bool(acc_all_ok)
    res["star_galaxy_auc_at_least_as_good_everywhere"] = bool(auc_all_ok)
    say(f"  morph_extendedness at least as good as the classical measure in every bin: accuracy {'yes' if acc_all_ok else 'NO'}, "
        f"ROC AUC {'yes' if auc_all_ok else 'NO'}")
    px = np.asarray(timing["pixels"], float)
    res["timing"] = {k: [round(float(v), 4) for v in vals] for k, vals in timing.items()}
    out["morphology"] = res
    out["stage_time"] = {
        "tile_pixels": int(px.mean()), "tiles": len(px),
        "classical_s_per_tile": float(np.mean(timing["classical_s"])),
        "morphology_s_per_tile": float(np.mean(timing["morphology_s"])),
        "lenses_s_per_tile": float(np.mean(timing["lenses_s"])),
        "objects_per_tile": float(np.mean(timing["objects"])), "morph_scored_per_tile": float(np.mean(timing["scored"])),
        "lens_candidates_per_tile": float(np.mean(timing["candidates"])),
    }


def _timed_tiles(manifest: Path, timing: dict[str, list]):
    """tile_records with the classical stages timed (for the 'added time per tile' comparison)."""
    from astropy.table import Table

    from pipeline.manifest import load_manifest
    from pipeline.tile import load_tile
    from workflows.train import stamps as S

    m = load_manifest(manifest)
    root = Path(manifest).parent
    for k, spec in enumerate(m.tiles):
        tile = load_tile(m, spec)
        t0 = time.perf_counter()
        prods = S.classical_products(tile)
        timing["classical_s"].append(time.perf_counter() - t0)
        yield k, tile, prods, Table.read(root / "truth" / f"{spec.id}.fits")


# ---------------------------------------------------------------- lenses
LENS_PARTS = 4  # the lens benchmark set is made of this many independent parts (seeds base + 2 j, base + 2 j + 1)


def _score_lens_part(job: tuple[int, dict[str, int], str, float, float, int, int | None, str]) -> dict[str, np.ndarray]:
    """Simulate and score one part of the lens benchmark set (runs in a worker process)."""
    seed, counts, model_dir, max_mag, min_gi, field_px, pool_px, purpose = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pipeline.onnx import run_batched, session
    from stages.morphology import load_stamp_model
    from workflows.train import stamps as S

    from stages.lenses import load_screen, passes_screen

    card, spec, _ = load_stamp_model(model_dir, "cpu")
    sess = session(card.onnx_path(Path(model_dir)), device="cpu")
    screen = load_screen(card, Path(model_dir), "cpu")
    k_lens = card.classes.index("lens")
    cut = S.CandidateCut(max_mag_i=max_mag, min_gi=min_gi)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in LENS_SCORE_KEYS}
    t_inf, t_screen, t0 = 0.0, 0.0, time.perf_counter()
    for ls in S.lens_sets(seed, purpose, counts=counts, spec=spec, cut=cut, min_lens_snr=0.0,
                          field_px=field_px, pool_px=pool_px, progress=True):
        x = ls.x.astype(np.float32)
        t1 = time.perf_counter()
        p, s = run_batched(sess, {spec.input_name: x}, batch=256, outputs=["probs", "probs_std"])
        t_inf += time.perf_counter() - t1
        score, std, full = p[:, k_lens], s[:, k_lens], np.ones(len(x), bool)
        if screen is not None:  # what the stage outputs: the screen's score where it stays below its threshold
            t1 = time.perf_counter()
            ps, ss = run_batched(screen, {spec.input_name: x}, batch=256, outputs=["probs", "probs_std"])
            t_screen += time.perf_counter() - t1
            full = passes_screen(card, ps[:, k_lens])
            score, std = np.where(full, score, ps[:, k_lens]), np.where(full, std, ss[:, k_lens])
        for k, v in (("score", score), ("std", std), ("score_full", p[:, k_lens]), ("rescored", full), ("label", ls.label),
                     ("kind", ls.kind), ("theta_e", ls.theta_e), ("snr", ls.snr), ("mag_i", ls.mag_i)):
            cols[k].append(np.asarray(v))
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["seconds"] = np.array([time.perf_counter() - t0 - t_inf - t_screen, t_inf, t_screen])
    return out


#: per-stamp columns of the lens benchmark: ``score``/``std`` as the stage gives them (the screen's where it
#: screens out), ``score_full`` the full model's on every stamp, ``rescored`` where the stage runs the full model
LENS_SCORE_KEYS = ("score", "std", "score_full", "rescored", "label", "kind", "theta_e", "snr", "mag_i")


def bench_lenses(a: argparse.Namespace, out: dict[str, Any], say) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from stages.lenses import Lenses
    from workflows.bench.roc_bootstrap import tpr_at_fpr_interval
    from workflows.train import stamps as S
    from workflows.train.lenses import tpr_at_fpr, tpr_n_fp

    model_dir = str(a.lens_model or Lenses().model_dir(Lenses.Config()))
    S.check_purpose(a.lens_seed, a.seed_purpose)
    S.check_purpose(a.lens_seed + 2 * LENS_PARTS - 1, a.seed_purpose)
    counts = {"lens": a.lenses, "ordinary": a.negatives, **{k: a.hard for k in S.HARD_KINDS}}
    parts = [(a.lens_seed + 2 * j, {k: v // LENS_PARTS + (1 if j < v % LENS_PARTS else 0) for k, v in counts.items()},
              model_dir, 23.0, 1.0, a.field, a.pool, a.seed_purpose) for j in range(LENS_PARTS)]
    say("")
    say(f"LENSES  simulating {sum(counts.values())} stamps in {LENS_PARTS} parts (seeds {a.lens_seed}-"
        f"{a.lens_seed + 2 * LENS_PARTS - 1}, {a.jobs} process(es)): {counts}")
    t0 = time.perf_counter()
    if a.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_score_lens_part, parts))
    else:
        results = [_score_lens_part(p) for p in parts]
    cols = {k: [r[k] for r in results] for k in LENS_SCORE_KEYS}
    t_inf = float(sum(r["seconds"][1] for r in results))
    t_screen = float(sum(r["seconds"][2] for r in results))
    say(f"  ({time.perf_counter() - t0:.0f} s wall)")
    C = {k: np.concatenate(v) for k, v in cols.items()}
    sim_s = time.perf_counter() - t0 - t_inf - t_screen
    masks = lens_benchmark_masks(C)
    res: dict[str, Any] = {"counts": counts, "seconds_simulation": round(sim_s, 1), "seconds_inference": round(t_inf, 1)}
    if not C["rescored"].all():
        say(f"  the model's screen (one view) sends {C['rescored'].mean():.1%} of the stamps to the full model, as the "
            f"stage does; the scores below are the stage's")

    def block(name: str, sc: np.ndarray, lb: np.ndarray) -> dict[str, Any]:
        r = {"n_pos": int(lb.sum()), "n_neg": int((lb == 0).sum()), "roc_auc": S.roc_auc(sc, lb)}
        for f in (0.01, 0.001):
            r[f"tpr_at_fpr_{f:g}"], r[f"threshold_at_fpr_{f:g}"] = tpr_at_fpr(sc, lb, f)
            r[f"tpr_at_fpr_{f:g}_interval95"] = tpr_at_fpr_interval(sc, lb, f, n_boot=a.bootstrap)[1:]
        r["tpr0"], r["tpr10"] = tpr_n_fp(sc, lb, 1), tpr_n_fp(sc, lb, 10)
        ci = {f: "({:.4f}-{:.4f})".format(*r[f"tpr_at_fpr_{f:g}_interval95"]) for f in (0.01, 0.001)}
        say(f"  {name}: {r['n_pos']} lenses vs {r['n_neg']} ordinary negatives")
        say(f"    ROC AUC {r['roc_auc']:.4f};  TPR at FPR 1 % {r['tpr_at_fpr_0.01']:.4f} {ci[0.01]}, at FPR 0.1 % "
            f"{r['tpr_at_fpr_0.001']:.4f} {ci[0.001]};  TPR0 {r['tpr0']:.4f}, TPR10 {r['tpr10']:.4f}")
        return r

    say(f"  (in brackets: 95 % stratified-bootstrap intervals, {a.bootstrap} resamples of lenses and negatives)")

    m = masks["all"]
    res["all"] = block("all lenses (theta_E 0.5-3\", every drawn source)", C["score"][m], C["label"][m].astype(int))
    m = masks["restricted"]
    res["theta_e_gt_1.4_snr_gt_20"] = block("lenses with theta_E > 1.4\" and lensed-source S/N > 20", C["score"][m],
                                            C["label"][m].astype(int))
    t = res["theta_e_gt_1.4_snr_gt_20"]["tpr_at_fpr_0.001"]
    say(f"    goal TPR >= {GOALS['lens_tpr_fpr0.001_easy']:.2f} at FPR 0.1 %: {'met' if t >= GOALS['lens_tpr_fpr0.001_easy'] else 'NOT met'}")
    hard: dict[str, Any] = {}
    thr1, thr01 = res["all"]["threshold_at_fpr_0.01"], res["all"]["threshold_at_fpr_0.001"]
    say(f"  hard negatives: fraction scored above the FPR-1 % ({thr1:.4g}) and FPR-0.1 % ({thr01:.4g}) thresholds")
    for kind in S.HARD_KINDS:
        m = C["kind"] == S.LENS_KINDS.index(kind)
        if m.any():
            hard[kind] = {"n": int(m.sum()), "fpr_at_thr_1pct": float(np.mean(C["score"][m] > thr1)),
                          "fpr_at_thr_0.1pct": float(np.mean(C["score"][m] > thr01))}
            say(f"    {kind:8s} n={hard[kind]['n']:5d}   {hard[kind]['fpr_at_thr_1pct']:.4f}   {hard[kind]['fpr_at_thr_0.1pct']:.4f}")
    res["hard_negatives"] = hard
    res["screen"] = screen_effect(C, masks, say)
    scores_path = a.out / LENS_SCORES
    np.savez_compressed(scores_path, model_dir=np.array(model_dir), **C)
    res["scores_file"] = str(scores_path)
    if a.compare_lens_scores is not None:
        res["paired_difference"] = compare_lens_scores(C, a.compare_lens_scores, a.bootstrap, say)
    lb = C["label"] == 1
    bins = [(0.5, 1.0), (1.0, 1.4), (1.4, 2.0), (2.0, 3.0)]
    res["tpr_by_theta_e_at_fpr_0.001"] = {}
    say("  TPR at the FPR-0.1 % threshold by Einstein radius (all S/N | S/N > 20):")
    for lo, hi in bins:
        m = lb & (C["theta_e"] >= lo) & (C["theta_e"] < hi)
        m20 = m & (C["snr"] > 20)
        r = (float(np.mean(C["score"][m] > thr01)) if m.any() else float("nan"),
             float(np.mean(C["score"][m20] > thr01)) if m20.any() else float("nan"))
        res["tpr_by_theta_e_at_fpr_0.001"][f"{lo}-{hi}"] = r
        say(f"    theta_E {lo:.1f}-{hi:.1f}\"  n={int(m.sum()):5d}  {r[0]:.4f} | {r[1]:.4f}")
    say(f"  (CPU time: simulation {sim_s:.0f} s, ONNX inference {t_inf:.0f} s for {len(C['score'])} stamps with the "
        f"full model, {t_screen:.0f} s with the screen)")
    out["lenses"] = res


def screen_effect(C: dict[str, np.ndarray], masks: dict[str, np.ndarray], say) -> dict[str, Any]:
    """What the stage's screen changes: the stamps it sends to the full model, and every TPR of the
    stage's scores next to the full model's on every stamp (equal when nothing near the thresholds
    was screened out)."""
    from workflows.train import stamps as S
    from workflows.train.lenses import tpr_at_fpr

    ordinary = C["kind"] == S.LENS_KINDS.index("ordinary")
    out: dict[str, Any] = {"rescored_fraction": float(C["rescored"].mean()),
                           "rescored_fraction_ordinary": float(C["rescored"][ordinary].mean())}
    if C["rescored"].all():
        return out
    say(f"  screen: {out['rescored_fraction']:.1%} of all stamps and {out['rescored_fraction_ordinary']:.1%} of the "
        f"ordinary negatives re-scored by the full model; TPR, stage's scores vs the full model on every stamp:")
    for name, m in masks.items():
        lb = C["label"][m].astype(int)
        for f in (0.01, 0.001):
            got, full = tpr_at_fpr(C["score"][m], lb, f)[0], tpr_at_fpr(C["score_full"][m], lb, f)[0]
            out[f"{name}_tpr_at_fpr_{f:g}"] = [got, full]
            say(f"    {name:10s} TPR at FPR {100 * f:g} %: {got:.4f} vs {full:.4f}")
    return out


LENS_SCORES = "lens_scores.npz"
#: per-stamp arrays that must agree between two runs for their scores to be compared stamp by stamp
LENS_STAMP_KEYS = ("label", "kind", "theta_e", "snr", "mag_i")


def lens_benchmark_masks(C: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stamps of each scored population: lenses vs ordinary negatives (hard kinds are reported apart),
    all lenses and those with theta_E > 1.4" and lensed-source S/N > 20 (the goal's cut)."""
    from workflows.train import stamps as S

    lens = C["label"] == 1
    ordinary = (C["kind"] == S.LENS_KINDS.index("ordinary")) | lens
    return {"all": ordinary, "restricted": ordinary & (~lens | ((C["theta_e"] > 1.4) & (C["snr"] > 20)))}


def compare_lens_scores(C: dict[str, np.ndarray], other: Path, n_boot: int, say) -> dict[str, Any]:
    """This run's TPR minus another run's on the same stamps (``other``: its ``lens_scores.npz``),
    with paired-bootstrap intervals; refused unless both runs scored the very same stamps."""
    from workflows.bench.roc_bootstrap import paired_tpr_difference

    try:
        with np.load(other) as f:
            B = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"--compare-lens-scores {other}: cannot read it ({exc})") from None
    for k in LENS_STAMP_KEYS:
        same = k in B and B[k].shape == C[k].shape and np.array_equal(
            B[k], C[k], equal_nan=bool(np.issubdtype(C[k].dtype, np.floating)))
        if not same:
            raise ValueError(f"--compare-lens-scores {other}: its stamps differ from this run's ({k!r}); rerun "
                             f"both with the same --lens-seed, --negatives, --lenses, --hard, --field and --pool")
    other_model = str(B.get("model_dir", "?"))
    say(f"  paired difference, this model minus {other_model} (same stamps; 95 % paired-bootstrap interval):")
    out: dict[str, Any] = {"other_model": other_model, "other_scores": str(other)}
    for name, m in lens_benchmark_masks(C).items():
        lb = C["label"][m].astype(int)
        for f in (0.01, 0.001):
            d, lo, hi = paired_tpr_difference(C["score"][m], B["score"][m], lb, f, n_boot=n_boot)
            out[f"{name}_tpr_at_fpr_{f:g}"] = (d, lo, hi)
            say(f"    {name:10s} TPR at FPR {100 * f:g} %: {d:+.4f} ({lo:+.4f} to {hi:+.4f})")
    return out


# ---------------------------------------------------------------- throughput
def bench_throughput(a: argparse.Namespace, out: dict[str, Any], say) -> None:
    import torch

    from pipeline.cutouts import CutoutSpec
    from stages.lenses import Lenses
    from stages.morphology import Morphology, load_stamp_model
    from workflows.train import stamps as S
    from workflows.train.onnx_export import throughput

    torch.set_num_threads(1)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    h = w = 2048
    images = {b: rng.normal(0, 10, (h, w)).astype(np.float32) for b in "gri"}
    weights = {b: np.full((h, w), 0.01, np.float32) for b in "gri"}
    bad = {b: np.zeros((h, w), bool) for b in "gri"}
    res: dict[str, Any] = {}
    say("")
    say("THROUGHPUT  (one core: ONNX Runtime 1 intra-op thread, torch.set_num_threads(1); batches of 256)")
    for name, stage, model_dir in (("morphology", Morphology, a.morph_model), ("lenses", Lenses, a.lens_model)):
        d = Path(model_dir) if model_dir else stage().model_dir(stage.Config())
        card, spec, _ = load_stamp_model(d, "cpu")
        assert isinstance(spec, CutoutSpec)
        n = a.throughput_stamps
        x, y = rng.uniform(0, w, n), rng.uniform(0, h, n)
        cut_rate = throughput(lambda: spec.stamps(images, x, y, weights=weights, bad=bad), n)
        inp, _ = spec.stamps(images, x, y, weights=weights, bad=bad)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(card.onnx_path(d)), sess_options=opts, providers=["CPUExecutionProvider"])

        def run_ort():
            for i in range(0, n, 256):
                sess.run(None, {spec.input_name: inp[i:i + 256]})

        ort_rate = throughput(run_ort, n)
        model = S.load_torch_model(d)
        if model is not None:
            def run_torch():
                with torch.no_grad():
                    for i in range(0, n, 256):
                        model(torch.from_numpy(inp[i:i + 256]))
            torch_rate = throughput(run_torch, n)
        else:
            torch_rate = float("nan")
        res[name] = {"stamp": spec.size, "cutouts_per_s": cut_rate, "onnxruntime_per_s": ort_rate, "torch_per_s": torch_rate,
                     "end_to_end_onnx_per_s": 1.0 / (1.0 / cut_rate + 1.0 / ort_rate)}
        say(f"  {name:10s} ({spec.size}x{spec.size}x{spec.channels}): cutout+stretch {cut_rate:9.0f} stamps/s;  "
            f"ONNX Runtime {ort_rate:7.0f}/s;  PyTorch {torch_rate:7.0f}/s;  ORT/torch {ort_rate / torch_rate:.2f}x;  "
            f"cutout+ORT {res[name]['end_to_end_onnx_per_s']:.0f}/s")
    out["throughput"] = res
    st = out.get("stage_time")
    if st:
        say(f"  added time per {int(np.sqrt(st['tile_pixels']))}^2 tile (mean of {st['tiles']}): morphology "
            f"{st['morphology_s_per_tile']:.2f} s ({st['morph_scored_per_tile']:.0f} objects scored), lenses "
            f"{st['lenses_s_per_tile']:.2f} s ({st['lens_candidates_per_tile']:.0f} candidates); classical stages "
            f"{st['classical_s_per_tile']:.2f} s ({st['objects_per_tile']:.0f} objects) -> +"
            f"{100 * st['morphology_s_per_tile'] / st['classical_s_per_tile']:.0f} % and +"
            f"{100 * st['lenses_s_per_tile'] / st['classical_s_per_tile']:.0f} %")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    a.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    results: dict[str, Any] = {"argv": argv if argv is not None else sys.argv[1:]}
    t0 = time.perf_counter()
    try:
        if "morphology" not in a.skip:
            bench_morphology(a, results, say)
        if "lenses" not in a.skip:
            bench_lenses(a, results, say)
        if "throughput" not in a.skip:
            bench_throughput(a, results, say)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say(f"\n(bench deeplearning: {time.perf_counter() - t0:.0f} s)")
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    (a.out / "report.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out / 'results.json'} and {a.out / 'report.txt'}")
    return 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
