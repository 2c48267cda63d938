"""Train the lens-finding model: a small CNN on gri stamps of plausible deflectors, exported to ONNX.

``surveypipe train lenses --out out/train/lenses/e36 --epochs 36 --threads 1`` then copying the result to
``stages/models/lenses`` (what ``make models`` runs; 36 epochs of one one-cycle schedule from scratch,
peak lr 3e-3, is the default):

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
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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
                        "(16 epochs with 'g-i,r-i' validated no better: ROC AUC 0.9675, TPR at FPR 0.1 %% 0.4925)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from the weights (model.pt) of this model directory, whose card's network must match "
                        "(continued training; --lr is then the peak of a new one-cycle schedule)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement (smoke tests)")
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
    tr = cached_lens_set(a.workdir, a.seed, "training", tr_counts, spec, a.min_lens_snr, kw)
    va = cached_lens_set(a.workdir, a.val_seed, "validation", va_counts, spec, 0.0, kw)
    t_sim = time.perf_counter() - t0
    sim_note = None
    made = [s.meta.get("seconds") for s in (tr, va)]
    if all(isinstance(v, (int, float)) for v in made) and t_sim < 0.5 * sum(made):
        sim_note = (f"sets re-used from the workdir cache; simulating them ({len(tr)} training + {len(va)} validation "
                    f"stamps) took {sum(made):.0f} s wall-clock")
    print(f"train lenses: {len(tr)} training stamps, {len(va)} validation stamps ({t_sim:.0f} s)", flush=True)

    try:
        resid = colour_residual_pairs(a.colour_residual, a.bands)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    net = {**S.NET_KWARGS, "tta": a.tta, "widths": [int(w) for w in a.widths.split(",")]}
    if resid:
        net["colour_residual"] = resid
    model = S.stamp_net(spec.channels, len(CLASSES), **net)
    init = None
    if a.init is not None:
        from pipeline.modelcard import load_card

        icard = load_card(a.init)
        if icard.training.get("net") != net:
            print(f"error: --init {a.init}: its network {icard.training.get('net')} differs from {net}", file=sys.stderr)
            return 2
        model.load_state_dict(torch.load(Path(a.init) / "model.pt", map_location="cpu", weights_only=True))
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
    print(f"train lenses: simulate {t_sim:.0f} s, train {t_train:.0f} s ({log['steps']} steps), "
          f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    print(f"train lenses: validation ROC AUC {metrics['roc_auc']}, TPR at FPR 1% {metrics['tpr_at_fpr_0.01']}, "
          f"at 0.1% {metrics['tpr_at_fpr_0.001']}, |ORT - torch| {diff:.2e}", flush=True)
    print(f"wrote {a.out / 'card.json'}")
    return 0


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
             + (f"reproduce with two runs: `{t['init'].get('command')}`, then `{t.get('command')}` (its `--init` "
                "naming the first run's output), copying the result to `stages/models/lenses`." if t.get("init")
                else f"reproduce with one run, `{t.get('command') or 'surveypipe train lenses'}` (what `make models` runs; "
                     "its `--out` may name a scratch directory whose files were then copied to `stages/models/lenses`)."), "",
             "## Training", "", f"- lenses: {t.get('lenses')}", f"- set: {t.get('counts')} ({t.get('n_stamps')} stamps), "
             f"training lenses with lensed-source S/N >= {t.get('min_lens_snr')}",
             *([f"- continued from the weights of `{t['init'].get('model_dir')}` (ONNX sha256 "
                f"{str(t['init'].get('onnx_sha256'))[:12]}…, {t['init'].get('epochs')} epochs at peak lr "
                f"{t['init'].get('lr')}: `{t['init'].get('command')}`)"] if t.get("init") else []),
             f"- {t.get('epochs')} epochs ({t.get('steps')} steps) on {t.get('threads')} CPU thread(s): "
             f"{t.get('train_seconds')} s training" + (f" ({t['train_cpu_seconds']} s CPU)" if t.get("train_cpu_seconds") else "")
             + f", {t.get('simulate_seconds')} s simulation" + (f" ({t['simulation_note']})" if t.get("simulation_note") else ""), "",
             "## Validation metrics", "", f"{m.get('holdout')}", "",
             f"- ROC AUC {m.get('roc_auc')}; TPR at FPR 1 % {m.get('tpr_at_fpr_0.01')}, at 0.1 % {m.get('tpr_at_fpr_0.001')}; "
             f"TPR0 {m.get('tpr0')}, TPR10 {m.get('tpr10')} (on {m.get('n_neg')} negatives)",
             f"- TPR at FPR 0.1 % for theta_E > 1.4\" and lensed-source S/N > 20: {m.get('tpr_at_fpr_0.001_theta_e_gt_1.4_snr_gt_20')}",
             f"- false-positive rate per negative kind at the FPR-1 % threshold: {m.get('fpr_by_kind_at_fpr_0.01_threshold')}",
             f"- max |ONNX Runtime - torch| on fresh inputs: {m.get('onnx_vs_torch_max_abs_diff')}",
             f"- throughput (1 thread): {m.get('throughput')}", "",
             "The benchmark with >= 1e5 negatives: `surveypipe bench deeplearning`.", "", "Full card: `card.json`.", ""]
    (Path(out) / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
