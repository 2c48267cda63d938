"""Train the lens-finding model: a small CNN on gri stamps of plausible deflectors, exported to ONNX.

``surveypipe train lenses --out out/train/lenses/e36 --epochs 36 --threads 1`` (36 epochs of one
one-cycle schedule from scratch, peak lr 3e-3, the default), then four rounds of hard-negative mining
that each continue from the previous run's weights (``--init``; see below and the ``models`` target
of the Makefile for the exact commands), copying the last run's result to ``stages/models/lenses``:

1. simulates stamps with :func:`workflows.train.stamps.collect_lens_set` (training seed 1100,
   validation seed 2100): mock-population deflector candidates on mock-population neighbour
   fields, with lenstronomy lenses (SIE + shear, Einstein radii 0.5-3", lensed-source S/N >= 10
   for training) painted around mock spheroids for the positives, and hard negatives (blends,
   mergers, rings, spiral arms, edge-on disks, red stars) beside ordinary candidates;
2. trains :func:`workflows.train.stamps.stamp_net` (classes ``nonlens``, ``lens``) with
   cross-entropy on one CPU thread;
3. measures ROC AUC, TPR at low FPR and per-kind false-positive rates on the validation set;
4. exports ONNX (dynamic batch axis), checks ONNX Runtime against torch on fresh inputs, and writes
   ``model.onnx``, ``model.pt`` (weights, for the saliency maps of ``workflows.lens_report``),
   ``card.json`` and ``README.md``.

**Hard-negative mining** (``--hard-negatives N --mine-pool M [--mine-random R]``, see
:func:`mine_negatives`). The score threshold at FPR 0.1 % is set by the ~100 highest-scoring of
1e5 ordinary deflector-like galaxies, a tail that 7000 random ordinary training negatives barely
sample: the network never sees most of the rare ordinary galaxies that look lens-like to it. So a
pool of M ordinary candidates (plus 2 % of M of each hard-negative kind) is simulated from a
*training* seed (``--mine-seed``, default 1200: a population independent of the training set's),
scored with an existing model (``--mine-model``, default the ``--init`` model, else the shipped
one), and its N highest-scoring negatives, plus R random ordinary ones (a larger sample of the
ordinary population), are added to the training set; training then usually continues from that
model's weights (``--init``, a new one-cycle schedule). The pool uses the stage's default candidate
cut (i < 23, g - i > 1, like the benchmark), in parts of at most 25 000 ordinary candidates (seeds
``mine_seed + 2 j``). ``--val-negatives K`` adds K ordinary validation negatives (seed
``--val-neg-seed``, default 2200, same cut) for a less noisy estimate of the FPR-0.1 % metrics
(``metrics.extended`` of the card, computed the benchmark's way: ordinary negatives only).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from workflows.bench.roc_bootstrap import tpr_at_fpr_interval
from workflows.train import stamps as S

MODEL_NAME = "lenses"
MODEL_VERSION = "1"
DEFAULT_OUT = Path("stages/models/lenses")
DEFAULT_WORKDIR = Path("out/train/lenses")
CLASSES = ["nonlens", "lens"]
TRAIN_COUNTS = {"lens": 12000, "ordinary": 7000, "blend": 1000, "merger": 1000, "ring": 1000, "spiral": 1000,
                "edgeon": 800, "star": 400}
VAL_COUNTS = {"lens": 2000, "ordinary": 1500, "blend": 200, "merger": 200, "ring": 200, "spiral": 200,
              "edgeon": 150, "star": 100}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surveypipe train lenses", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    p.add_argument("--seed", type=int, default=S.SEEDS["lenses"]["training"], help="training seed (1000-1999)")
    p.add_argument("--val-seed", type=int, default=S.SEEDS["lenses"]["validation"], help="validation seed (2000-2999)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every set size by this (smoke tests: 0.01)")
    p.add_argument("--train-scale", type=float, default=1.0,
                   help="also multiply the training set's sizes (not the validation set's) by this: more stamps from "
                        "the same training seed, drawn from a correspondingly larger candidate population")
    p.add_argument("--stamp", type=int, default=48, help="stamp side (pixels)")
    p.add_argument("--bands", default=S.BANDS, help="bands in channel order")
    p.add_argument("--min-lens-snr", type=float, default=10.0, help="training lenses: lensed-source S/N at least this")
    p.add_argument("--drop-lenses-below-snr", type=float, default=0.0, help=(
        "drop training lenses whose lensed-source S/N is below this after the set is made or loaded (the cached set, "
        "made with --min-lens-snr, is re-used); tried at 20 as a fine-tune: no gain on validation, see "
        "docs/deeplearning.md"))
    p.add_argument("--bright-frac", type=float, default=0.0,
                   help="training set: this fraction of deflectors and of ordinary negatives drawn from candidates "
                        "with i < 20.5 (bright deflectors are rare in the population and the hardest lenses)")
    p.add_argument("--field", type=int, default=S.FIELD, help="mosaic field side (pixels)")
    p.add_argument("--pool", type=int, default=None, help="candidate population side (pixels; default: by set size)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="simulated sets are cached here")
    p.add_argument("--epochs", type=int, default=36,
                   help="epochs of one one-cycle (cosine) schedule; 36 validated better than 16 + 10 continued")
    p.add_argument("--tta", type=int, default=8, choices=[1, 2, 4, 8], help="symmetries averaged at inference")
    p.add_argument("--widths", default="16,32,64,96", help="channels of the conv blocks")
    p.add_argument("--colour-residual", default="none",
                   help="colour-residual input planes computed inside the network (band pairs a-b, e.g. 'g-i,r-i': "
                        "arcsinh(F_a - k F_b), k = the deflector's central flux ratio); 'none': the plain stamp "
                        "(16 epochs with 'g-i,r-i' validated no better: ROC AUC 0.9675, TPR at FPR 0.1 %% 0.4925; nor did 8 epochs "
                        "continued from the shipped model with --init: docs/deeplearning.md)")
    p.add_argument("--mirror-residual", action="store_true",
                   help="add one input plane per band inside the network: the stamp minus its 180-degree rotation "
                        "(the point-symmetric deflector cancels, arcs remain); tried, no gain on validation: "
                        "workflows/train/stamps.py stamp_net")
    p.add_argument("--init", type=Path, default=None,
                   help="start from the weights (model.pt) of this model directory, whose card's network must match or "
                        "lack only trailing --colour-residual planes (their first-layer weights then start at zero, "
                        "so training starts from the init model's function; continued training: --lr is then the "
                        "peak of a new one-cycle schedule)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--hard-negatives", type=int, default=0,
                   help="add the N highest-scoring negatives of a simulated mining pool to the training set "
                        "(hard-negative mining; see the module docstring)")
    p.add_argument("--mine-pool", type=int, default=0,
                   help="ordinary candidates in the mining pool (plus 2%% of this of each hard-negative kind)")
    p.add_argument("--mine-random", type=int, default=0,
                   help="also add this many random ordinary negatives of the mining pool")
    p.add_argument("--mine-seed", type=int, default=1200, help="mining pool seed (training range 1000-1999)")
    p.add_argument("--mine-model", type=Path, default=None,
                   help="model directory that scores the mining pool (default: --init, else the shipped model)")
    p.add_argument("--val-negatives", type=int, default=0,
                   help="extra ordinary validation negatives for the extended FPR-0.1 %% metrics")
    p.add_argument("--val-neg-seed", type=int, default=2200, help="seed of the extra validation negatives (2000-2999)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement (smoke tests)")
    p.add_argument("--no-screen", action="store_true", help=(
        "do not give the model a one-view screen (workflows.train.lens_screen; by default one is exported and its "
        "threshold set on the validation sets)"))
    return p


def _scaled(counts: dict[str, int], f: float) -> dict[str, int]:
    return {k: max(1, int(round(v * f))) for k, v in counts.items()}


def set_counts(scale: float = 1.0, train_scale: float = 1.0) -> tuple[dict[str, int], dict[str, int]]:
    """(training, validation) stamps per kind: ``scale`` multiplies both, ``train_scale`` only the training set."""
    return _scaled(TRAIN_COUNTS, scale * train_scale), _scaled(VAL_COUNTS, scale)


def tpr_at_fpr(score: np.ndarray, label: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, threshold) at the threshold that lets through at most ``fpr`` of the negatives."""
    neg = np.sort(score[label == 0])[::-1]
    pos = score[label == 1]
    if neg.size == 0 or pos.size == 0:
        return float("nan"), float("nan")
    k = int(np.floor(fpr * neg.size))          # number of false positives allowed
    thr = neg[k] if k < neg.size else -np.inf  # strictly above the (k+1)-th highest negative
    return float(np.mean(pos > thr)), float(thr)


def tpr_n_fp(score: np.ndarray, label: np.ndarray, n_fp: int) -> float:
    """Highest TPR with fewer than ``n_fp`` false positives (TPR0: n_fp = 1, TPR10: n_fp = 10)."""
    neg = np.sort(score[label == 0])[::-1]
    pos = score[label == 1]
    if pos.size == 0:
        return float("nan")
    thr = neg[n_fp - 1] if neg.size >= n_fp else -np.inf
    return float(np.mean(pos > thr))


def lens_metrics(score: np.ndarray, ls: Any) -> dict[str, Any]:
    label = ls.label.astype(int)
    out: dict[str, Any] = {"n_pos": int(label.sum()), "n_neg": int((label == 0).sum()),
                           "roc_auc": round(S.roc_auc(score, label), 4)}
    for f in (0.01, 0.001):
        t, thr = tpr_at_fpr(score, label, f)
        out[f"tpr_at_fpr_{f:g}"] = round(t, 4)
        out[f"threshold_at_fpr_{f:g}"] = round(thr, 6)
    out["tpr0"] = round(tpr_n_fp(score, label, 1), 4)
    out["tpr10"] = round(tpr_n_fp(score, label, 10), 4)
    thr = out["threshold_at_fpr_0.01"]
    out["fpr_by_kind_at_fpr_0.01_threshold"] = {
        k: round(float(np.mean(score[ls.kind == i] > thr)), 4) for i, k in enumerate(S.LENS_KINDS)
        if i > 0 and np.any(ls.kind == i)}
    easy = (label == 0) | ((ls.theta_e > 1.4) & (ls.snr > 20))
    t, _ = tpr_at_fpr(score[easy], label[easy], 0.001)
    out["tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20"] = round(t, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    t_start = time.perf_counter()
    try:
        survey, spec = S.start_training(a, MODEL_NAME)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    tr_counts, va_counts = set_counts(a.scale, a.train_scale)
    print(f"train lenses: simulating {sum(tr_counts.values())} training and {sum(va_counts.values())} validation "
          f"stamps of {a.stamp}^2 px ({a.bands})", flush=True)
    t0 = time.perf_counter()
    kw = {"field_px": a.field, "pool_px": a.pool}
    tr = cached_lens_set(a.workdir, a.seed, "training", tr_counts, spec, a.min_lens_snr,
                         {**kw, "bright_frac": a.bright_frac} if a.bright_frac > 0 else kw)
    va = cached_lens_set(a.workdir, a.val_seed, "validation", va_counts, spec, 0.0, kw)
    if a.drop_lenses_below_snr > 0:
        n0 = len(tr)
        tr = drop_faint_lenses(tr, a.drop_lenses_below_snr)
        print(f"train lenses: dropped {n0 - len(tr)} training lenses with S/N < {a.drop_lenses_below_snr:g}", flush=True)
    t_sim = time.perf_counter() - t0
    sim_note = None
    made = [s.meta.get("seconds") for s in (tr, va)]
    if all(isinstance(v, (int, float)) for v in made) and t_sim < 0.5 * sum(made):
        sim_note = (f"sets re-used from the workdir cache; simulating them ({len(tr)} training + {len(va)} validation "
                    f"stamps) took {sum(made):.0f} s wall-clock")
    print(f"train lenses: {len(tr)} training stamps, {len(va)} validation stamps ({t_sim:.0f} s)", flush=True)
    mined_info = None
    if a.hard_negatives > 0 or a.mine_random > 0:
        try:
            if a.mine_pool < a.hard_negatives + a.mine_random:
                raise ValueError(f"--mine-pool {a.mine_pool} is smaller than --hard-negatives + --mine-random")
            S.check_purpose(a.mine_seed, "training")
            mine_parts = mining_parts(a.mine_seed, a.mine_pool)
            for sd, _ in mine_parts:
                S.check_purpose(sd, "training")
                if {sd, sd + 1} & {a.seed, a.seed + 1}:
                    raise ValueError(f"mining seed {sd} overlaps the training set's populations (seeds {a.seed}, {a.seed + 1})")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        mine_model = a.mine_model or a.init or DEFAULT_OUT
        t0 = time.perf_counter()
        mined = mine_negatives(mine_model, mine_parts, a.hard_negatives, a.mine_random, spec, kw, a.workdir)
        t_mine = time.perf_counter() - t0
        mined_info = {**mined.meta, "model_dir": str(mine_model), "seconds_here": round(t_mine, 1)}
        tr = S.LensSet.concat([tr, mined])
        print(f"train lenses: + {len(mined)} mined negatives ({t_mine:.0f} s): {mined.meta.get('kinds')}", flush=True)
    xneg = None
    if a.val_negatives > 0:
        try:
            S.check_purpose(a.val_neg_seed, "validation")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        xneg = cached_lens_set(a.workdir, a.val_neg_seed, "validation", {"ordinary": a.val_negatives}, spec, 0.0,
                               {**kw, "cut": STAGE_CUT})

    try:
        resid = colour_residual_pairs(a.colour_residual, a.bands)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    net = {**S.NET_KWARGS, "tta": a.tta, "widths": [int(w) for w in a.widths.split(",")]}
    if resid:
        net["colour_residual"] = resid
    if a.mirror_residual:
        net["mirror_residual"] = True
    model = S.stamp_net(spec.channels, len(CLASSES), **net)
    init = None
    if a.init is not None:
        from pipeline.modelcard import load_card

        icard = load_card(a.init)
        if not continues_network(icard.training.get("net") or {}, net):
            print(f"error: --init {a.init}: its network {icard.training.get('net')} differs from {net}", file=sys.stderr)
            return 2
        load_widened(model, torch.load(Path(a.init) / "model.pt", map_location="cpu", weights_only=True))
        init = {"model_dir": str(a.init), "onnx_sha256": icard.sha256, "epochs": icard.training.get("epochs"),
                "steps": icard.training.get("steps"), "lr": icard.training.get("lr"),
                "command": icard.training.get("command"), "init": icard.training.get("init")}
        print(f"train lenses: starting from the weights of {a.init} ({init['epochs']} epochs)", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    log = S.fit(model, tr.x, tr.label.astype(np.int64), epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed,
                x_val=va.x, y_val=va.label.astype(np.int64), max_steps=a.max_steps)
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    p_val, s_val = S.predict_torch(model, va.x)
    metrics = lens_metrics(p_val[:, 1], va)
    metrics["mean_score_std"] = round(float(np.mean(s_val[:, 1])), 4) if len(va) else None
    a.out.mkdir(parents=True, exist_ok=True)
    onnx_path, diff = S.export_stamp_model(model, a.out, spec, seed=a.seed)
    from workflows.train.morphology import stamp_throughput
    from workflows.train.onnx_export import finish_model

    if xneg is not None:
        from pipeline.onnx import run_batched, session

        sess = session(onnx_path, device="cpu", threads=a.threads)
        p_x = run_batched(sess, {spec.input_name: xneg.x.astype(np.float32)}, batch=256, outputs=["probs"])[0]
        metrics["extended"] = extended_metrics(p_val[:, 1], va, p_x[:, 1])
        metrics["extended"]["holdout"] = (f"the validation set's lenses and ordinary negatives + {len(xneg)} ordinary "
                                          f"negatives of seed {a.val_neg_seed} (cut i < {STAGE_CUT.max_mag_i}, "
                                          f"g - i > {STAGE_CUT.min_gi}); hard kinds only for their rates")
    thr = {} if a.no_throughput else stamp_throughput(model, onnx_path, spec)
    card = finish_model(
        a.out, onnx_path, name=MODEL_NAME, version=MODEL_VERSION,
        inputs={spec.input_name: {"shape": ["batch", spec.channels, spec.size, spec.size], "dtype": "float32",
                                  "pixel_scale_arcsec": spec.pixel_scale_arcsec,
                                  "meaning": "stamps from pipeline.cutouts centred on the deflector's detected position, "
                                             "background-subtracted nJy, stretched per 'normalisation'"}},
        outputs={"probs": {"shape": ["batch", 2], "meaning": "[p(nonlens), p(lens)], mean of MC-dropout samples"},
                 "probs_std": {"shape": ["batch", 2], "meaning": "their std over the samples"}},
        bands=list(spec.bands), classes=CLASSES, normalisation=dict(spec.normalisation),
        thresholds={"score_at_fpr_0.01": metrics["threshold_at_fpr_0.01"],
                    "score_at_fpr_0.001": metrics["threshold_at_fpr_0.001"]},
        training={"seed": a.seed, "counts": tr_counts, "n_stamps": len(tr), "min_lens_snr": a.min_lens_snr,
                  **({"drop_lenses_below_snr": a.drop_lenses_below_snr} if a.drop_lenses_below_snr > 0 else {}),
                  **({"hard_negative_mining": mined_info} if mined_info else {}),
                  "epochs": a.epochs, "steps": log["steps"], **({"init": init} if init else {}), "batch": a.batch, "lr": a.lr, "threads": a.threads,
                  "simulate_seconds": round(t_sim, 1), **({"simulation_note": sim_note} if sim_note else {}),
                  "train_seconds": round(t_train, 1), "train_cpu_seconds": round(c_train, 1), "log": log["epochs"],
                  "lenses": "workflows.mock.lenses: SIE + external shear, theta_E U(0.5, 3)\", source z_d+U(0.3, 2), "
                            "Sersic or clumpy, CWW Scd..Im; deflectors = mock spheroids with i < 23.3, g-i > 0.8",
                  "architecture": "workflows.train.stamps.stamp_net", "net": net,
                  "data": "workflows.train.stamps.collect_lens_set (mosaics of mock candidates on mock neighbour fields)",
                  "command": "surveypipe train lenses " + " ".join(argv if argv is not None else sys.argv[1:])},
        metrics={"holdout": f"validation seed {a.val_seed}: {va_counts} (every drawn lens, no S/N cut)",
                 **metrics, "onnx_vs_torch_max_abs_diff": diff, "throughput": thr},
    )
    write_readme(a.out, card)
    if not a.no_screen:  # add_screen writes the screen into the card and the README's "Screen" section
        from .lens_screen import add_screen

        try:
            add_screen(a.out, [va] + ([xneg] if xneg is not None else []), log=lambda m: print(f"train lenses: {m}", flush=True))
        except ValueError as exc:  # tiny smoke-test sets: too few negatives to place the line
            print(f"train lenses: no screen ({exc})", flush=True)
    print(f"train lenses: simulate {t_sim:.0f} s, train {t_train:.0f} s ({log['steps']} steps), "
          f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    print(f"train lenses: validation ROC AUC {metrics['roc_auc']}, TPR at FPR 1% {metrics['tpr_at_fpr_0.01']}, "
          f"at 0.1% {metrics['tpr_at_fpr_0.001']}, |ORT - torch| {diff:.2e}", flush=True)
    if "extended" in metrics:
        e = metrics["extended"]
        print(f"train lenses: extended validation ({e['n_neg']} ordinary negatives): ROC AUC {e['roc_auc']}, TPR at "
              f"FPR 1% {e['tpr_at_fpr_0.01']}, at 0.1% {e['tpr_at_fpr_0.001']}, TPR0 {e['tpr0']}, TPR10 {e['tpr10']}; "
              f"theta_E > 1.4\" and S/N > 20: TPR at FPR 0.1% {e['tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20']} "
              f"(95 % bootstrap {e['tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20_interval95']}); "
              f"hard kinds above the 1% / 0.1% thresholds {e['fpr_by_kind']}", flush=True)
    print(f"wrote {a.out / 'card.json'}")
    return 0


#: the stage's default candidate cut (stages.lenses: i < 23, g - i > 1), used by the benchmark
STAGE_CUT = S.CandidateCut(max_mag_i=23.0, min_gi=1.0)
MINE_HARD_FRACTION = 0.02   # of the mining pool's ordinary count, per hard-negative kind
MINE_PART = 25000           # ordinary candidates per mining-pool part (one population per part)


def mining_parts(seed: int, pool: int) -> list[tuple[int, dict[str, int]]]:
    """(seed, counts) of each part of a mining pool of ``pool`` ordinary candidates (seeds seed + 2 j)."""
    n = max(1, int(np.ceil(pool / MINE_PART)))
    out = []
    for j in range(n):
        m = pool // n + (1 if j < pool % n else 0)
        h = max(1, int(round(m * MINE_HARD_FRACTION)))
        out.append((seed + 2 * j, {"ordinary": m, **{k: h for k in S.HARD_KINDS}}))
    return out


def mine_negatives(model_dir: Path, parts: list[tuple[int, dict[str, int]]], n_hard: int, n_random: int, spec: Any,
                   kw: dict[str, Any], workdir: Path) -> Any:
    """The ``n_hard`` highest-scoring negatives of a simulated pool, plus ``n_random`` random ordinary ones.

    Every part of the pool (:func:`mining_parts`) is simulated mosaic by mosaic with the stage's
    candidate cut and scored through ONNX Runtime with the model in ``model_dir``; only the stamps
    selected so far are kept, so the pool's size is not limited by memory. Cached in ``workdir`` by
    the arguments and the model's ONNX sha256.
    """
    import hashlib
    import json

    from pipeline.onnx import run_batched, session
    from stages.morphology import load_stamp_model

    card, mspec, _ = load_stamp_model(model_dir, "cpu")
    if ((mspec.size, tuple(mspec.bands), mspec.normalisation.get("scale_njy"))
            != (spec.size, tuple(spec.bands), spec.normalisation.get("scale_njy"))):
        raise ValueError(f"mining model {model_dir}: its stamps differ from the training stamps")
    sha = hashlib.sha256(Path(card.onnx_path(Path(model_dir))).read_bytes()).hexdigest()
    key = json.dumps({"parts": parts, "n_hard": n_hard, "n_random": n_random, "model": sha, "size": spec.size,
                      "bands": list(spec.bands), "norm": dict(spec.normalisation), "cut": STAGE_CUT, **kw},
                     sort_keys=True, default=str)
    path = Path(workdir) / f"mined-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        print(f"  lenses mining: cached set {path}", flush=True)
        return S.LensSet.load(path)
    sess = session(card.onnx_path(Path(model_dir)), device="cpu")
    k_lens = card.classes.index("lens")
    t0 = time.perf_counter()
    ordinary = S.LENS_KINDS.index("ordinary")
    kept, kept_score, kept_key = None, np.zeros(0), np.zeros(0)
    all_scores: dict[int, list[np.ndarray]] = {}
    n_seen = 0
    for seed, counts in parts:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11,)))
        for ls in S.lens_sets(seed, "training", counts=counts, spec=spec, cut=STAGE_CUT, min_lens_snr=0.0,
                              progress=False, **kw):
            p = run_batched(sess, {spec.input_name: ls.x.astype(np.float32)}, batch=256, outputs=["probs"])[0][:, k_lens]
            rk = rng.random(len(ls))
            n_seen += len(ls)
            for k in np.unique(ls.kind):
                all_scores.setdefault(int(k), []).append(p[ls.kind == k])
            kept = ls if kept is None else S.LensSet.concat([kept, ls])
            kept_score, kept_key = np.concatenate([kept_score, p]), np.concatenate([kept_key, rk])
            sel = np.zeros(len(kept), bool)
            if n_hard > 0:
                sel[np.argsort(-kept_score, kind="stable")[:n_hard]] = True
            if n_random > 0:
                cand = np.flatnonzero(~sel & (kept.kind == ordinary))
                sel[cand[np.argsort(-kept_key[cand], kind="stable")[:n_random]]] = True
            idx = np.flatnonzero(sel)
            kept = kept.select(idx)
            kept_score, kept_key = kept_score[idx], kept_key[idx]
        print(f"  lenses mining: part seed {seed} done, {n_seen} stamps scored ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    assert kept is not None
    hard = np.zeros(len(kept), bool)
    hard[np.argsort(-kept_score, kind="stable")[:n_hard]] = True
    q = {S.LENS_KINDS[k]: {"n": int(sum(v.size for v in vs)),
                           "score_quantiles_0.5_0.99_0.999": [round(float(x), 4) for x in
                                                              np.quantile(np.concatenate(vs), [0.5, 0.99, 0.999])]}
         for k, vs in sorted(all_scores.items())}
    kept.meta = {"parts": parts, "n_scored": n_seen, "n_hard": int(hard.sum()), "n_random": int((~hard).sum()),
                 "lowest_hard_score": round(float(kept_score[hard].min()), 4) if hard.any() else None,
                 "kinds": {S.LENS_KINDS[k]: int(np.sum(kept.kind[hard] == k)) for k in np.unique(kept.kind[hard])},
                 "pool_scores": q, "model_onnx_sha256": sha, "seconds": round(time.perf_counter() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    kept.save(path)
    return kept


def extended_metrics(score_val: np.ndarray, va: Any, score_extra: np.ndarray) -> dict[str, Any]:
    """Benchmark-style metrics: validation lenses vs the validation set's ordinary negatives plus extra ones."""
    ordinary = S.LENS_KINDS.index("ordinary")
    keep = (va.label == 1) | (va.kind == ordinary)
    sc = np.concatenate([score_val[keep], score_extra])
    lb = np.concatenate([va.label[keep].astype(int), np.zeros(score_extra.size, int)])
    th = np.concatenate([va.theta_e[keep], np.full(score_extra.size, np.nan)])
    sn = np.concatenate([va.snr[keep], np.full(score_extra.size, np.nan)])
    out: dict[str, Any] = {"n_pos": int(lb.sum()), "n_neg": int((lb == 0).sum()), "roc_auc": round(S.roc_auc(sc, lb), 4)}
    thr = {}
    for f in (0.01, 0.001):
        t, thr[f] = tpr_at_fpr(sc, lb, f)
        out[f"tpr_at_fpr_{f:g}"] = round(t, 4)
        out[f"threshold_at_fpr_{f:g}"] = round(thr[f], 6)
    out["tpr0"] = round(tpr_n_fp(sc, lb, 1), 4)
    out["tpr10"] = round(tpr_n_fp(sc, lb, 10), 4)
    easy = (lb == 0) | ((th > 1.4) & (sn > 20))
    for f in (0.01, 0.001):
        out[f"tpr_at_fpr_{f:g}_theta_e_gt_1.4_snr_gt_20"] = round(tpr_at_fpr(sc[easy], lb[easy], f)[0], 4)
    # how far the goal metric may move by chance alone (the benchmark prints the same interval)
    lo, hi = tpr_at_fpr_interval(sc[easy], lb[easy], 0.001, n_boot=1000)[1:]
    out["tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20_interval95"] = [round(lo, 4), round(hi, 4)]
    out["fpr_by_kind"] = {k: [round(float(np.mean(score_val[va.kind == i] > thr[f])), 4) for f in (0.01, 0.001)]
                          for i, k in enumerate(S.LENS_KINDS) if i > 0 and np.any(va.kind == i)}
    return out


def continues_network(init_net: dict[str, Any], net: dict[str, Any]) -> bool:
    """Whether a model of ``net`` can start from weights of ``init_net``: the same network, or one
    that appends colour-residual planes and/or the mirror-residual planes (which come last) to the
    init's (loaded by :func:`load_widened`)."""
    def rest(n: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in n.items() if k not in ("colour_residual", "mirror_residual")}

    ires, nres = list(init_net.get("colour_residual", [])), list(net.get("colour_residual", []))
    imir, nmir = bool(init_net.get("mirror_residual")), bool(net.get("mirror_residual"))
    if imir and (not nmir or nres != ires):  # the init's mirror planes must stay the last planes
        return False
    return rest(init_net) == rest(net) and nres[:len(ires)] == ires


def load_widened(model: Any, state: dict[str, Any]) -> None:
    """Load ``state`` into ``model``, whose first convolution may take more input planes than the state's.

    The extra planes are the colour-residual (or mirror-residual) planes a model adds to an ``--init``
    model that had fewer (they are appended after the stamp's channels): their first-layer weights start at zero,
    so training starts from exactly the init model's function and learns how much to use them."""
    import torch

    key = "features.0.weight"
    own = model.state_dict()[key]
    w = state[key]
    if w.shape != own.shape:
        if w.shape[0] != own.shape[0] or w.shape[2:] != own.shape[2:] or w.shape[1] > own.shape[1]:
            raise ValueError(f"first convolution {tuple(w.shape)} cannot be widened to {tuple(own.shape)}")
        wide = torch.zeros_like(own)
        wide[:, :w.shape[1]] = w
        state = {**state, key: wide}
    model.load_state_dict(state)


def drop_faint_lenses(ls: Any, min_snr: float) -> Any:
    """``ls`` without its lenses whose lensed-source S/N is below ``min_snr`` (negatives all kept)."""
    return ls.select(~((ls.label == 1) & ~(ls.snr >= min_snr)))


def colour_residual_pairs(text: str, bands: str) -> list[list[int]]:
    """``"g-i,r-i"`` -> channel index pairs ``[[0, 2], [1, 2]]`` for ``bands`` ("none" or "": no pairs)."""
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for item in text.split(","):
        a, _, b = item.strip().partition("-")
        if a not in bands or b not in bands or a == b:
            raise ValueError(f"--colour-residual {item!r}: need two different bands of {bands!r} as a-b")
        out.append([bands.index(a), bands.index(b)])
    return out


def cached_lens_set(workdir: Path, seed: int, purpose: str, counts: dict[str, int], spec: Any, min_lens_snr: float,
                    kw: dict[str, Any]) -> Any:
    """:func:`workflows.train.stamps.collect_lens_set`, cached in ``workdir`` by its arguments."""
    import hashlib
    import json

    key = json.dumps({"seed": seed, "counts": counts, "size": spec.size, "bands": list(spec.bands),
                      "norm": dict(spec.normalisation), "min_lens_snr": min_lens_snr, **kw}, sort_keys=True, default=str)
    path = Path(workdir) / f"{purpose}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        print(f"  lenses {purpose}: cached set {path}", flush=True)
        return S.LensSet.load(path)
    ls = S.collect_lens_set(seed, purpose, counts=counts, spec=spec, min_lens_snr=min_lens_snr, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    ls.save(path)
    return ls


def _chain(t: dict[str, Any]) -> list[str]:
    """The training commands of a model and of the models its ``--init`` continued, oldest first."""
    cmds, node = [t.get("command") or "surveypipe train lenses"], t.get("init")
    while node:
        cmds.append(node.get("command") or "?")
        node = node.get("init")
    return cmds[::-1]


def screen_section(sc: dict[str, Any]) -> list[str]:
    """The README lines that describe a card's screen (``card.screen``)."""
    return ["", "## Screen", "", f"`{sc.get('onnx')}`: {sc.get('meaning')}. Threshold {sc.get('threshold')}: "
            f"{sc.get('rule')} (lowest such screen score {sc.get('lowest_screen_score_above_the_line')}, "
            f"{sc.get('n_above_the_line')} stamps). It sends {sc.get('ordinary_negatives_passing')} of the ordinary "
            f"validation negatives and {sc.get('lenses_passing')} of the lenses to the full model; CPU seconds full vs "
            f"screen on {sc.get('n_validation_stamps')} stamps: {sc.get('cpu_seconds_full_vs_screen')}. Made by "
            "`surveypipe train lens_screen` (or at the end of `surveypipe train lenses`)."]


def write_readme(out: Path, card: Any) -> None:
    m, t = card.metrics, card.training
    lines = [f"# {card.name} v{card.version}", "",
             f"Strong-lens score from a small CNN on {''.join(card.bands)} stamps of "
             f"{card.inputs['input']['shape'][-1]}x{card.inputs['input']['shape'][-1]} pixels "
             f"({card.inputs['input']['pixel_scale_arcsec']}\"/px) centred on plausible deflectors, arcsinh-stretched "
             "with the sky noise per pixel of each band as the scale. Classes: "
             f"{card.classes}; `lens_score` = p(lens), the mean over Monte-Carlo dropout ({t.get('net', {}).get('mc_samples')} "
             f"fixed masks) x {t.get('net', {}).get('tta', 1)} symmetries of the stamp; `lens_scoreErr` their std. "
             f"Network: {t.get('net')}.", "",
             "Used by `stages.lenses.Lenses`; "
             + (f"reproduce with {len(_chain(t))} runs: " + ", then ".join(f"`{c}`" for c in _chain(t))
                + " (each `--init` naming the previous run's output), copying the result to `stages/models/lenses`."
                if t.get("init")
                else f"reproduce with one run, `{t.get('command') or 'surveypipe train lenses'}` (what `make models` runs; "
                     "its `--out` may name a scratch directory whose files were then copied to `stages/models/lenses`)."), "",
             "## Training", "", f"- lenses: {t.get('lenses')}", f"- set: {t.get('counts')} ({t.get('n_stamps')} stamps), "
             f"training lenses with lensed-source S/N >= {t.get('min_lens_snr')}",
             *([f"- continued from the weights of `{t['init'].get('model_dir')}` (ONNX sha256 "
                f"{str(t['init'].get('onnx_sha256'))[:12]}…, {t['init'].get('epochs')} epochs at peak lr "
                f"{t['init'].get('lr')}: `{t['init'].get('command')}`)"] if t.get("init") else []),
             *([f"- hard-negative mining: {t['hard_negative_mining'].get('n_hard')} highest-scoring + "
                f"{t['hard_negative_mining'].get('n_random')} random ordinary negatives of a pool of "
                f"{t['hard_negative_mining'].get('n_scored')} stamps (seeds "
                f"{[q[0] for q in t['hard_negative_mining'].get('parts', [])]}, per seed "
                f"{(t['hard_negative_mining'].get('parts') or [[None, None]])[0][1]}) scored by "
                f"`{t['hard_negative_mining'].get('model_dir')}`; "
                f"mined kinds {t['hard_negative_mining'].get('kinds')}, lowest mined score "
                f"{t['hard_negative_mining'].get('lowest_hard_score')}"] if t.get("hard_negative_mining") else []),
             f"- {t.get('epochs')} epochs ({t.get('steps')} steps) on {t.get('threads')} CPU thread(s): "
             f"{t.get('train_seconds')} s training" + (f" ({t['train_cpu_seconds']} s CPU)" if t.get("train_cpu_seconds") else "")
             + f", {t.get('simulate_seconds')} s simulation" + (f" ({t['simulation_note']})" if t.get("simulation_note") else ""), "",
             "## Validation metrics", "", f"{m.get('holdout')}", "",
             f"- ROC AUC {m.get('roc_auc')}; TPR at FPR 1 % {m.get('tpr_at_fpr_0.01')}, at 0.1 % {m.get('tpr_at_fpr_0.001')}; "
             f"TPR0 {m.get('tpr0')}, TPR10 {m.get('tpr10')} (on {m.get('n_neg')} negatives)",
             f"- TPR at FPR 0.1 % for theta_E > 1.4\" and lensed-source S/N > 20: {m.get('tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20')}",
             f"- false-positive rate per negative kind at the FPR-1 % threshold: {m.get('fpr_by_kind_at_fpr_0.01_threshold')}",
             f"- max |ONNX Runtime - torch| on fresh inputs: {m.get('onnx_vs_torch_max_abs_diff')}",
             f"- throughput (1 thread): {m.get('throughput')}",
             *([f"- extended validation, the benchmark's way ({m['extended'].get('holdout')}): ROC AUC "
                f"{m['extended'].get('roc_auc')}; TPR at FPR 1 % {m['extended'].get('tpr_at_fpr_0.01')}, at 0.1 % "
                f"{m['extended'].get('tpr_at_fpr_0.001')}; TPR0 {m['extended'].get('tpr0')}, TPR10 "
                f"{m['extended'].get('tpr10')}; theta_E > 1.4\" and S/N > 20: TPR at FPR 1 % "
                f"{m['extended'].get('tpr_at_fpr_0.01_theta_e_gt_1.4_snr_gt_20')}, at 0.1 % "
                f"{m['extended'].get('tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20')}; hard kinds above the FPR-1 % / "
                f"0.1 % thresholds {m['extended'].get('fpr_by_kind')}"] if m.get("extended") else []), "",
             *(screen_section(card.screen) if card.screen else []),
             "", "The benchmark with >= 1e5 negatives: `surveypipe bench deeplearning`.", "", "Full card: `card.json`.", ""]
    (Path(out) / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
