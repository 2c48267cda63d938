"""Train the morphology model: a small CNN on gri stamps of mock-survey detections, exported to ONNX.

``surveypipe train morphology --out stages/models/morphology`` (what ``make models`` runs):

1. simulates mock tiles (training seed 1000, validation seed 2000; :func:`workflows.mock.release.
   write_release`, the same generator as every mock release), runs the classical stages on them in
   process and cuts stamps of every matched primary detection above the S/N cut at its detected
   position (:func:`workflows.train.stamps.morphology_set`);
2. trains :func:`workflows.train.stamps.stamp_net` (4 conv blocks, MC-dropout head) with
   cross-entropy on the population's own class mix, on one CPU thread;
3. fits a calibration temperature on one half of the validation tiles and measures the card's
   metrics on the other half;
4. exports ONNX (dynamic batch axis), checks ONNX Runtime against torch on fresh inputs, measures
   throughput, and writes ``model.onnx``, ``model.pt`` (weights, for saliency maps), ``card.json``
   and ``README.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from workflows.train import stamps as S

MODEL_NAME = "morphology"
MODEL_VERSION = "1"
DEFAULT_OUT = Path("stages/models/morphology")
DEFAULT_WORKDIR = Path("out/train/morphology")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surveypipe train morphology", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="simulated tiles (re-used when present)")
    p.add_argument("--seed", type=int, default=S.SEEDS["morphology"]["training"], help="training seed (1000-1999)")
    p.add_argument("--val-seed", type=int, default=S.SEEDS["morphology"]["validation"], help="validation seed (2000-2999)")
    p.add_argument("--train-tiles", type=int, default=16, help="training tiles")
    p.add_argument("--val-tiles", type=int, default=4, help="validation tiles (half calibrate, half measure)")
    p.add_argument("--tile-size", type=int, default=2048, help="tile side (pixels)")
    p.add_argument("--stamp", type=int, default=32, help="stamp side (pixels)")
    p.add_argument("--bands", default=S.BANDS, help="bands in channel order")
    p.add_argument("--min-snr", type=float, default=10.0, help="S/N cut the stage applies (card threshold)")
    p.add_argument("--train-min-snr", type=float, default=8.0, help="S/N cut of the training stamps")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--tta", type=int, default=4, choices=[1, 2, 4, 8], help="symmetries averaged at inference")
    p.add_argument("--widths", default="24,48,64,96", help="channels of the conv blocks")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement (smoke tests)")
    return p


def morphology_metrics(p: np.ndarray, y: np.ndarray, mag_i: np.ndarray, *, bright_mag: float,
                       classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class recall, ECE, the bright-galaxy accuracy and the confusion matrix."""
    pred = p.argmax(axis=1)
    gal = y != classes.index("star")
    bright = gal & (mag_i < bright_mag)
    cm = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(cm, (y, pred), 1)
    star = classes.index("star")
    roc_auc = S.roc_auc

    return {
        "n": int(len(y)),
        "accuracy": round(float(np.mean(pred == y)), 4),
        "accuracy_galaxies_bright": round(float(np.mean(pred[bright] == y[bright])), 4) if bright.any() else None,
        "bright_definition": f"galaxies with true i < {bright_mag:.2f} (m5_i - 2)",
        "n_galaxies_bright": int(bright.sum()),
        "ece": round(S.expected_calibration_error(p, y), 4),
        "recall": {c: round(float(np.mean(pred[y == k] == k)), 4) if np.any(y == k) else None for k, c in enumerate(classes)},
        "star_galaxy_auc": round(roc_auc(1.0 - p[:, star], (y != star).astype(int)), 4) if 0 < gal.sum() < len(y) else None,
        "confusion_matrix": {"rows_true_cols_predicted": classes, "counts": cm.tolist()},
    }


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    t_start = time.perf_counter()
    try:
        survey, spec = S.start_training(a, MODEL_NAME)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    classes = list(S.MORPH_CLASSES)
    print(f"train morphology: simulating {a.train_tiles} training + {a.val_tiles} validation tiles of "
          f"{a.tile_size}^2 px ({a.bands}), stamps {a.stamp}^2 px", flush=True)
    t0 = time.perf_counter()
    tr = S.morphology_set(a.workdir / f"seed{a.seed}", a.seed, "training", n_tiles=a.train_tiles, spec=spec,
                          min_snr=a.train_min_snr, tile_size=a.tile_size)
    va = S.morphology_set(a.workdir / f"seed{a.val_seed}", a.val_seed, "validation", n_tiles=a.val_tiles, spec=spec,
                          min_snr=a.min_snr, tile_size=a.tile_size)
    t_sim = time.perf_counter() - t0
    print(f"train morphology: {len(tr)} training stamps {tr.meta['class_counts']}, {len(va)} validation stamps "
          f"({t_sim:.0f} s)", flush=True)
    half = va.tile < max(1, a.val_tiles // 2)
    cal = np.flatnonzero(half) if half.any() and (~half).any() else np.arange(len(va))
    hold = np.flatnonzero(~half) if half.any() and (~half).any() else np.arange(len(va))

    net = {**S.NET_KWARGS, "tta": a.tta, "widths": [int(w) for w in a.widths.split(",")]}
    model = S.stamp_net(spec.channels, len(classes), **net)
    t0, c0 = time.perf_counter(), time.process_time()
    log = S.fit(model, tr.x, tr.label.astype(np.int64), epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed,
                x_val=va.x[cal], y_val=va.label[cal].astype(np.int64), max_steps=a.max_steps)
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    temp = S.fit_temperature(model, va.x[cal], va.label[cal].astype(np.int64))
    p_hold, s_hold = S.predict_torch(model, va.x[hold])
    bright_mag = float(survey.m5["i"] - 2.0)
    metrics = morphology_metrics(p_hold, va.label[hold].astype(np.int64), va.mag_i[hold], bright_mag=bright_mag,
                                 classes=classes)
    metrics["mean_probs_std"] = round(float(np.mean(s_hold.max(axis=1))), 4) if len(hold) else None
    a.out.mkdir(parents=True, exist_ok=True)
    onnx_path, diff = S.export_stamp_model(model, a.out, spec, seed=a.seed)
    thr = {} if a.no_throughput else stamp_throughput(model, onnx_path, spec)
    from workflows.train.onnx_export import finish_model

    card = finish_model(
        a.out, onnx_path, name=MODEL_NAME, version=MODEL_VERSION,
        inputs={spec.input_name: {"shape": ["batch", spec.channels, spec.size, spec.size], "dtype": "float32",
                                  "pixel_scale_arcsec": spec.pixel_scale_arcsec,
                                  "meaning": "stamps from pipeline.cutouts (centre pixel = round(x), round(y) of the "
                                             "detection), background-subtracted nJy, stretched per 'normalisation'"}},
        outputs={"probs": {"shape": ["batch", len(classes)], "meaning": "class probabilities (mean of MC-dropout samples)"},
                 "probs_std": {"shape": ["batch", len(classes)], "meaning": "their std over the samples"}},
        bands=list(spec.bands), classes=classes, normalisation=dict(spec.normalisation),
        thresholds={"min_snr": a.min_snr},
        training={"seed": a.seed, "n_tiles": a.train_tiles, "tile_size": a.tile_size, "n_stamps": len(tr),
                  "class_counts": tr.meta["class_counts"], "min_snr": a.train_min_snr, "epochs": a.epochs,
                  "steps": log["steps"], "batch": a.batch, "lr": a.lr, "threads": a.threads,
                  "simulate_seconds": round(t_sim, 1), "train_seconds": round(t_train, 1), "train_cpu_seconds": round(c_train, 1), "log": log["epochs"],
                  "temperature": round(temp, 4), "architecture": "workflows.train.stamps.stamp_net", "net": net, "data": "workflows.train.stamps.morphology_set (mock tiles "
                  "through the classical stages, detections matched to truth within 2 px)",
                  "command": "surveypipe train morphology " + " ".join(argv if argv is not None else sys.argv[1:])},
        metrics={"holdout": f"validation seed {a.val_seed}: tiles {a.val_tiles // 2}..{a.val_tiles - 1} "
                            f"(tiles 0..{a.val_tiles // 2 - 1} fitted the temperature), objects with S/N >= {a.min_snr}",
                 **metrics, "onnx_vs_torch_max_abs_diff": diff, "throughput": thr},
    )
    write_readme(a.out, card)
    print(f"train morphology: simulate {t_sim:.0f} s, train {t_train:.0f} s ({log['steps']} steps), "
          f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    print(f"train morphology: held-out accuracy {metrics['accuracy']}, bright-galaxy accuracy "
          f"{metrics['accuracy_galaxies_bright']} (n={metrics['n_galaxies_bright']}), ECE {metrics['ece']}, "
          f"star/galaxy AUC {metrics['star_galaxy_auc']}, |ORT - torch| {diff:.2e}", flush=True)
    print(f"wrote {a.out / 'card.json'}")
    return 0


def stamp_throughput(model: Any, onnx_path: Path, spec: Any, n: int = 1024) -> dict[str, float]:
    """Stamps per second on one thread: ONNX Runtime vs torch (same inputs, batch 256)."""
    import onnxruntime as ort
    import torch

    from workflows.train.onnx_export import throughput

    rng = np.random.default_rng(0)
    x = np.arcsinh(rng.normal(0, 1, (n, spec.channels, spec.size, spec.size))).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])

    def run_ort():
        for i in range(0, n, 256):
            sess.run(None, {spec.input_name: x[i:i + 256]})

    def run_torch():
        with torch.no_grad():
            for i in range(0, n, 256):
                model(torch.from_numpy(x[i:i + 256]))

    model.eval()
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"onnxruntime_per_s_1thread": round(throughput(run_ort, n), 1),
                "torch_per_s_1thread": round(throughput(run_torch, n), 1)}
    finally:
        torch.set_num_threads(n_threads)


def write_readme(out: Path, card: Any) -> None:
    m, t = card.metrics, card.training
    cm = m.get("confusion_matrix", {})
    lines = [f"# {card.name} v{card.version}", "",
             f"Morphological classes {card.classes} from a small CNN on {''.join(card.bands)} stamps of "
             f"{card.inputs['input']['shape'][-1]}x{card.inputs['input']['shape'][-1]} pixels "
             f"({card.inputs['input']['pixel_scale_arcsec']}\"/px), arcsinh-stretched with the sky noise per pixel "
             f"of each band as the scale. Network: {t.get('net')}; Monte-Carlo dropout ({t.get('net', {}).get('mc_samples')} "
             f"fixed masks) x {t.get('net', {}).get('tta', 1)} symmetries of the stamp give the probabilities (mean) and "
             "their uncertainties (std).", "",
             "Used by `stages.morphology.Morphology`; retrain with `surveypipe train morphology --out stages/models/morphology`.",
             "", "## Training", "",
             f"- data: {t.get('data')}; seed {t.get('seed')}, {t.get('n_tiles')} tiles, {t.get('n_stamps')} stamps "
             f"{t.get('class_counts')}",
             f"- {t.get('epochs')} epochs ({t.get('steps')} steps) on {t.get('threads')} CPU thread(s): "
             f"{t.get('train_seconds')} s training" + (f" ({t['train_cpu_seconds']} s CPU)" if t.get("train_cpu_seconds") else "")
             + f", {t.get('simulate_seconds')} s simulation" + (f" ({t['simulation_note']})" if t.get("simulation_note") else "") + f"; temperature {t.get('temperature')}",
             "", "## Held-out metrics", "", f"{m.get('holdout')}", "",
             f"- accuracy {m.get('accuracy')} (n={m.get('n')}); bright galaxies ({m.get('bright_definition')}): "
             f"{m.get('accuracy_galaxies_bright')} (n={m.get('n_galaxies_bright')})",
             f"- expected calibration error {m.get('ece')}; star/galaxy ROC AUC {m.get('star_galaxy_auc')}",
             f"- recall per class: {m.get('recall')}",
             f"- max |ONNX Runtime - torch| on fresh inputs: {m.get('onnx_vs_torch_max_abs_diff')}",
             f"- throughput (1 thread): {m.get('throughput')}", "",
             "Confusion matrix (rows: true class, columns: predicted):", "",
             "| true \\ pred | " + " | ".join(cm.get("rows_true_cols_predicted", [])) + " |",
             "|---" * (len(cm.get("rows_true_cols_predicted", [])) + 1) + "|"]
    for name, row in zip(cm.get("rows_true_cols_predicted", []), cm.get("counts", [])):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "Full card: `card.json`.", ""]
    (Path(out) / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
