"""Benchmark of the artefact stage on held-out mock tiles (benchmark seeds 9000-9999, never tuned on).

    surveypipe bench artefacts [--out out/bench/artefacts] [--seed 9000] [--tiles 4] [--size 1024]
                               [--bands ugrizy] [--model stages/models/artefacts] [--work DIR]

Prints, per class: ROC AUC, precision, recall and IoU at the card's threshold, and the same within
one pixel of the truth (tolerant scores, see :func:`workflows.train.artefacts.scores`); then

* spurious detections caused by artefacts, with and without the stage: the release is simulated
  twice with one seed, with and without artefacts (the sky and its noise are identical, the
  artefacts have their own random stream); a detection of the artefact tile with no detection of
  the clean twin within 3 px is caused by artefacts, and a clean-twin detection with no detection
  of the artefact tile within 3 px is lost (artefacts also bias the sky: without the mask the
  sources-and-cosmic-rays mask of the background stage grows and its sky estimate fails). Detection
  is the pipeline's own
  (``stages.background.Background`` + ``stages.detection.Detection``), run without the mask
  and with it (given to every stage that takes ``masks/artefacts``; if detection does not take it
  yet, masked pixels are set bad per band in the sky, i.e. that band is dropped there);
* cosmic rays: astroscrappy (L.A.Cosmic) on the same images (sky-subtracted nJy, its inverse
  variance, saturation level, bad-pixel mask) at several ``sigclip``, and the network's scores at
  the same false-positive rate;
* CPU seconds per megapixel per band of the stage through ONNX Runtime (1 thread) and of the same
  network in PyTorch (1 thread), process time, patches included.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stages.artefacts import ARTEFACT_BITS, ARTEFACT_CLASSES, MODEL_DIR, Artefacts, ArtefactsConfig, normalise, predict_probabilities
from workflows.train.artefacts import (auc_from_hist, build_model, card_architecture, load_set, score_histograms,
                                       scores, simulate, summarise, with_sigmoid, _bins)


def _fmt(v: float) -> str:
    return "   nan" if v != v else f"{v:6.3f}"


def _match(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray, r: float) -> np.ndarray:
    """For each a, whether some b lies within r pixels."""
    from scipy.spatial import cKDTree

    if len(xa) == 0:
        return np.zeros(0, bool)
    if len(xb) == 0:
        return np.zeros(len(xa), bool)
    d, _ = cKDTree(np.c_[xb, yb]).query(np.c_[xa, ya], k=1)
    return d <= r


def detect(tile: Any, mask: dict[str, np.ndarray] | None, via: str = "pipeline") -> tuple[Any, str]:
    """Background + Detection of the pipeline on ``tile``, optionally with the artefact mask.

    ``via="pipeline"``: the mask goes to every stage that declares ``masks/artefacts`` optional (if
    none does, as below). ``via="bench"``: the stages run without it and the masked pixels are then
    set bad in the sky of their band (that band is dropped there; the sky's saturated-pixel map
    stays the one made without the mask). Returns the detections and how the mask was applied."""
    from pipeline.stage import ImageSet
    from stages.background import Background
    from stages.detection import Detection

    mset = ImageSet(mask, {"bits": ARTEFACT_BITS.as_attrs()}) if mask is not None else None
    bg, det = Background(), Detection()
    takers = [s.name for s in (bg, det) if "masks/artefacts" in s.optional] if via == "pipeline" else []
    ins: dict[str, Any] = {"exposure": tile}
    if mset is not None and bg.name in takers:
        ins["masks/artefacts"] = mset
    sky = bg.run(ins, bg.Config(reuse_exposure=False))["sky"]  # the tile is measured again with other masks
    ins = {"exposure": tile, "sky": sky}
    how = "none"
    if mset is not None:
        if det.name in takers:
            ins["masks/artefacts"] = mset
        if takers:
            how = "by the pipeline's own " + " and ".join(takers) + " stage(s)"
        else:  # no stage reads the mask (yet): drop masked pixels of each band from the sky
            fields = {f.name for f in dataclasses.fields(sky)}
            kw: dict[str, Any] = {"image": dict(sky.image), "bad": dict(sky.bad)}
            for name in ("weight", "sigma"):
                if name in fields:
                    kw[name] = dict(getattr(sky, name))
            for b, m in mask.items():
                hit = m != 0
                kw["bad"][b] = kw["bad"][b] | hit
                kw["image"][b] = np.where(hit, np.float32(0), kw["image"][b])
                if "weight" in kw:
                    kw["weight"][b] = np.where(hit, np.float32(0), kw["weight"][b])
                if "sigma" in kw:
                    kw["sigma"][b] = np.where(hit, np.float32(np.inf), kw["sigma"][b])
            ins["sky"] = dataclasses.replace(sky, **kw)
            how = "by the benchmark (masked pixels set bad per band in the sky)"
    # without the mask the sky can be so far off that the pipeline refuses the tile (max_above_fraction);
    # this benchmark measures exactly that failure, so it detects anyway
    cfg = det.Config() if mset is not None else det.Config(max_above_fraction=1.0)
    return det.run(ins, cfg)["detections"], how


def astroscrappy_mask(tile: Any, band: str, sigclip: float) -> np.ndarray:
    import astroscrappy

    img = tile.image[band].astype(np.float32)
    w = tile.weight[band]
    bad = tile.bad[band]
    var = np.where(w > 0, 1.0 / np.maximum(w, 1e-30), 1e30).astype(np.float32)
    sat = tile.header[band].get("SATURATE_NJY", 1e30)
    fwhm = tile.header[band].get("PSF_FWHM", 0.8) / tile.pixel_scale_arcsec
    crmask, _ = astroscrappy.detect_cosmics(img, inmask=bad, invar=var, sigclip=sigclip, sigfrac=0.3, objlim=5.0,
                                            gain=1.0, readnoise=0.0, satlevel=float(sat), niter=4, sepmed=True,
                                            cleantype="meanmask", fsmode="median", psfmodel="gauss", psffwhm=float(fwhm),
                                            verbose=False)
    return np.asarray(crmask, bool)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="surveypipe bench artefacts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=9000, help="benchmark seed (9000-9999)")
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--bands", default="ugrizy")
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--out", default="out/bench/artefacts", help="results directory (results.json; the simulated "
                                                                "benchmark release is kept there too, unless --work)")
    ap.add_argument("--work", default=None, help="where the simulated benchmark release is kept (default: --out)")
    ap.add_argument("--patch", type=int, default=ArtefactsConfig().patch, help="stage patch (core) size (default: the stage's)")
    ap.add_argument("--mosaic", type=int, default=4096, help="side of the mosaic (of benchmark band images) on which "
                                                            "the speed with patches is measured (0: skip)")
    ap.add_argument("--sigclip", default="3,4.5,6,8", help="astroscrappy sigclip values ('' = skip astroscrappy)")
    ap.add_argument("--torch-weights", default=None,
                    help="state_dict of the net for the PyTorch timing (default: model.pt beside the ONNX file in "
                         "--model, the weights it was exported from; if missing: the same architecture with random "
                         "weights, which costs the same)")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file (default: --out/results.json)")
    a = ap.parse_args(list(argv) if argv is not None else None)

    import torch

    from pipeline.modelcard import load_card
    from workflows.mock.seeds import check_seed

    check_seed(a.seed, "benchmark")
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_all = time.perf_counter()
    work = Path(a.work or a.out)
    a.json = a.json or str(Path(a.out) / "results.json")
    man = simulate(work / f"bench-{a.seed}-{a.tiles}x{a.size}", a.seed, n_tiles=a.tiles, size=a.size, bands=a.bands,
                   clean_twin=True)
    images, tiles = load_set(man, with_tiles=True)
    _, clean_tiles = load_set(man.parent / "clean" / "manifest.yaml", with_tiles=True)
    card = load_card(a.model)
    thr = dict(card.thresholds)
    npix_band = sum(im.truth.size for im in images)
    log(f"bench artefacts: seed {a.seed}, {len(tiles)} tiles of {a.size}x{a.size}, bands {a.bands}: "
        f"{len(images)} band images, {npix_band / 1e6:.1f} MPix; model {card.name} v{card.version} sha256 {card.sha256[:12]}")

    # ---- the stage itself (ONNX Runtime, 1 thread): masks + timing
    stage = Artefacts()
    cfg = ArtefactsConfig(model_dir=a.model, patch=a.patch, device="cpu", threads=1)
    stage.run({"exposure": next(iter(tiles.values()))}, cfg)  # warm-up: session creation
    masks: dict[str, dict[str, np.ndarray]] = {}
    cpu = 0.0
    for tid, td in tiles.items():
        c0 = time.process_time()
        masks[tid] = stage.run({"exposure": td}, cfg)["masks/artefacts"].planes
        cpu += time.process_time() - c0
    onnx_s_per_mpix = cpu / (npix_band / 1e6)

    # ---- probabilities for the AUC (the same network and patching as the stage, saturation rule applied)
    from pipeline.onnx import session

    geo = card.model_extra.get("inference", {})
    stride, margin = int(geo["stride"]), int(geo["margin"])
    sess = session(card.onnx_path(Path(a.model)), device="cpu", threads=1)
    fn = lambda x: sess.run(None, {"input": x})[0]  # noqa: E731
    C = len(ARTEFACT_CLASSES)
    pos = np.zeros((C, len(_bins()) - 1), np.int64)
    neg = np.zeros_like(pos)
    counts = [dict(tp=0, fp=0, fn=0, tp_tol=0, fp_tol=0, fn_tol=0) for _ in range(C)]
    cr_hist: dict[str, Any] = {}
    scrappy: dict[float, list[dict[str, int]]] = {}
    sigclips = [float(s) for s in a.sigclip.split(",") if s.strip()]
    t_scrappy = 0.0
    for im in images:
        td = tiles[im.tile]
        p = predict_probabilities(fn, im.x.astype(np.float32), core=a.patch, margin=margin, stride=stride)
        sat = td.header[im.band].get("SATURATE_NJY")
        if sat:
            hit = (td.image[im.band] >= np.float32(sat) * np.float32(1 - 1e-5)) & ~td.bad[im.band]
            p[ARTEFACT_CLASSES.index("saturation")][hit] = 1.0
        m = masks[im.tile][im.band]
        for k, c in enumerate(ARTEFACT_CLASSES):
            t = (im.truth & np.uint16(ARTEFACT_BITS[c])) != 0
            hp, hn = score_histograms(p[k], t)
            pos[k] += hp
            neg[k] += hn
            s = scores((m & np.uint16(ARTEFACT_BITS[c])) != 0, t)
            for key in s:
                counts[k][key] += s[key]
        if sigclips:
            t_cr = (im.truth & np.uint16(ARTEFACT_BITS["cosmic_ray"])) != 0
            t_crhp = (im.truth & np.uint16(ARTEFACT_BITS["cosmic_ray"] | ARTEFACT_BITS["hot_pixel"])) != 0
            for sc in sigclips:
                c0 = time.process_time()
                pred = astroscrappy_mask(td, im.band, sc)
                t_scrappy += time.process_time() - c0
                s = scores(pred, t_cr)
                s["fp_vs_crhp"] = int(np.count_nonzero(pred & ~t_crhp))
                s["neg_crhp"] = int(np.count_nonzero(~t_crhp))
                scrappy.setdefault(sc, []).append(s)
        del p

    results: dict[str, Any] = {"seed": a.seed, "tiles": len(tiles), "size": a.size, "bands": a.bands,
                               "band_images": len(images), "mpix": round(npix_band / 1e6, 3), "per_class": {}}
    log("")
    log("per class (pixels of the benchmark tiles; threshold from the card; tol = within 1 px of the truth)")
    log(f"{'class':18s} {'truth px':>9s} {'thresh':>6s} {'AUC':>7s} {'prec':>6s} {'recall':>6s} {'IoU':>6s}"
        f" {'prec1':>6s} {'rec1':>6s} {'IoU1':>6s}")
    for k, c in enumerate(ARTEFACT_CLASSES):
        s = summarise(counts[k])
        auc = auc_from_hist(pos[k], neg[k])
        row = {"auc": auc, "threshold": thr[c], "truth_pixels": int(pos[k].sum()),
               "fp_rate": counts[k]["fp"] / max(int(neg[k].sum()), 1), **s}
        results["per_class"][c] = row
        log(f"{c:18s} {row['truth_pixels']:9d} {thr[c]:6.3f} {auc:7.4f} {_fmt(s['precision'])} {_fmt(s['recall'])} "
            f"{_fmt(s['iou'])} {_fmt(s['precision_tol'])} {_fmt(s['recall_tol'])} {_fmt(s['iou_tol'])}")
    any_fp = sum(counts[k]["fp"] for k in range(C))
    log(f"false-positive pixels (all classes) per pixel: {any_fp / npix_band:.2e}")

    # ---- astroscrappy vs the network on cosmic rays at equal false-positive rate
    if sigclips:
        k = ARTEFACT_CLASSES.index("cosmic_ray")
        P, N = int(pos[k].sum()), int(neg[k].sum())
        tp_cum = np.cumsum(pos[k][::-1])[::-1]
        fp_cum = np.cumsum(neg[k][::-1])[::-1]
        log("")
        log(f"cosmic rays: astroscrappy {getattr(__import__('astroscrappy'), '__version__', '?')} (L.A.Cosmic) vs the network "
            f"at equal false-positive rate ({P} CR pixels)")
        log(f"{'method':28s} {'FP rate':>9s} {'prec':>6s} {'recall':>6s} {'IoU':>6s} {'prec1':>6s} {'rec1':>6s} {'IoU1':>6s}"
            f" {'FP rate vs CR+hot px':>21s}")
        results["astroscrappy"] = []
        for sc, rows in scrappy.items():
            tot = {key: sum(r[key] for r in rows) for key in ("tp", "fp", "fn", "tp_tol", "fp_tol", "fn_tol",
                                                              "fp_vs_crhp", "neg_crhp")}
            s = summarise(tot)
            fpr = tot["fp"] / N
            j = int(np.argmin(np.abs(fp_cum / N - fpr)))
            tp, fp = int(tp_cum[j]), int(fp_cum[j])
            net = {"fp_rate": fp / N, "precision": tp / max(tp + fp, 1), "recall": tp / max(P, 1),
                   "iou": tp / max(P + fp, 1), "threshold": float(1 / (1 + np.exp(-_bins()[j])))}
            results["astroscrappy"].append({"sigclip": sc, "fp_rate": fpr, **s,
                                            "fp_rate_vs_cr_or_hot": tot["fp_vs_crhp"] / max(tot["neg_crhp"], 1),
                                            "network_at_equal_fp_rate": net})
            log(f"{'astroscrappy sigclip ' + format(sc, 'g'):28s} {fpr:9.2e} {_fmt(s['precision'])} {_fmt(s['recall'])} "
                f"{_fmt(s['iou'])} {_fmt(s['precision_tol'])} {_fmt(s['recall_tol'])} {_fmt(s['iou_tol'])}"
                f" {tot['fp_vs_crhp'] / max(tot['neg_crhp'], 1):21.2e}")
            log(f"{'  network, same FP rate':28s} {net['fp_rate']:9.2e} {_fmt(net['precision'])} {_fmt(net['recall'])} "
                f"{_fmt(net['iou'])}   (threshold {net['threshold']:.3g})")
        log(f"astroscrappy: {t_scrappy / (len(sigclips) * npix_band / 1e6):.2f} CPU-s per MPix per band per run")
        results["astroscrappy_cpu_s_per_mpix"] = t_scrappy / (len(sigclips) * npix_band / 1e6)

    # ---- spurious detections caused by artefacts
    log("")
    log("detections (pipeline Background + Detection, all bands): spurious = no clean-twin detection within 3 px")
    n_clean = 0
    variants = {"without": None, "with": "pipeline", "with_bench": "bench"}
    n_sp = {v: 0 for v in variants}
    n_lost = {v: 0 for v in variants}
    by_class: dict[str, dict[str, int]] = {v: {} for v in variants}
    how: dict[str, str] = {}
    for tid, td in tiles.items():
        d_clean, _ = detect(clean_tiles[tid], None)
        union = np.zeros(td.shape, np.uint16)
        for im in images:
            if im.tile == tid:
                union |= im.truth
        n_clean += len(d_clean)
        xc, yc = np.asarray(d_clean["x"]), np.asarray(d_clean["y"])
        for v, via in variants.items():
            d, how[v] = detect(td, masks[tid] if via else None, via=via or "pipeline")
            xd, yd = np.asarray(d["x"]), np.asarray(d["y"])
            sp = ~_match(xd, yd, xc, yc, 3.0)
            n_sp[v] += int(sp.sum())
            n_lost[v] += int((~_match(xc, yc, xd, yd, 3.0)).sum())
            for x, y in zip(xd[sp], yd[sp]):
                iy, ix = int(round(y)), int(round(x))
                box = union[max(iy - 2, 0):iy + 3, max(ix - 2, 0):ix + 3]
                hit = [c for c in ARTEFACT_CLASSES if np.any(box & np.uint16(ARTEFACT_BITS[c]))]
                key = hit[0] if hit else "none"
                by_class[v][key] = by_class[v].get(key, 0) + 1
    log(f"clean-twin detections: {n_clean}")
    results["detections"] = {"clean": n_clean}
    for v in variants:
        red = 1.0 - n_sp[v] / n_sp["without"] if n_sp["without"] else float("nan")
        label = {"without": "without the stage", "with": "with the stage, mask applied " + how["with"],
                 "with_bench": "with the stage, mask applied " + how["with_bench"]}[v]
        extra = "" if v == "without" else f" ({100 * red:.1f} % fewer; goal >= 95 %)"
        log(f"spurious detections caused by artefacts, {label}: {n_sp[v]}{extra}")
        log("    at (first truth class within 2 px): " + ", ".join(f"{c} {n}" for c, n in by_class[v].items()))
        log(f"    clean-twin detections without a counterpart: {n_lost[v]}")
        results["detections"][v] = {"spurious": n_sp[v], "reduction": red, "by_class": by_class[v],
                                    "clean_lost": n_lost[v], "mask_applied": how[v]}

    # ---- speed: ONNX Runtime (the stage) and PyTorch, 1 thread, CPU seconds per MPix per band
    arch = card_architecture(card)
    model = build_model(arch)
    weights = "random (same architecture and cost)"
    wpath = Path(a.torch_weights) if a.torch_weights else Path(a.model) / "model.pt"
    if wpath.exists():
        model.load_state_dict(torch.load(wpath, map_location="cpu"))
        weights = str(wpath)
    net = with_sigmoid(model)

    def tfn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    sub = [im for im in images if im.tile == next(iter(tiles))]
    c0 = time.process_time()
    for im in sub:
        predict_probabilities(tfn, im.x.astype(np.float32), core=a.patch, margin=margin, stride=stride)
    torch_s = (time.process_time() - c0) / (sum(im.truth.size for im in sub) / 1e6)
    log("")
    log(f"speed (1 thread, process CPU time; normalisation, thresholds and patches of {a.patch} px + {margin} px margins "
        f"included):")
    log(f"  stage via ONNX Runtime, {a.size}x{a.size} tiles: {onnx_s_per_mpix:.3f} CPU-s per MPix per band (goal <= 0.5)")
    log(f"  same network in PyTorch, {a.size}x{a.size} tiles: {torch_s:.3f} CPU-s per MPix per band (weights: {weights})")
    results["speed"] = {"onnx_cpu_s_per_mpix_band": onnx_s_per_mpix, "torch_cpu_s_per_mpix_band": torch_s, "patch": a.patch,
                        "margin": margin, "torch_weights": weights, "tile_size": a.size}
    if a.mosaic:
        # a large tile (patched): the benchmark band images side by side, run through the stage
        from pipeline.tile import TileData

        n = a.mosaic
        t0 = next(iter(tiles.values()))
        band = t0.bands[0]
        srcs = [td for td in tiles.values()]
        reps = -(-n // t0.shape[0])
        img = np.block([[srcs[(i * reps + j) % len(srcs)].image[band] for j in range(reps)] for i in range(reps)])[:n, :n]
        wt = np.block([[srcs[(i * reps + j) % len(srcs)].weight[band] for j in range(reps)] for i in range(reps)])[:n, :n]
        bad = np.block([[srcs[(i * reps + j) % len(srcs)].bad[band] for j in range(reps)] for i in range(reps)])[:n, :n]
        big = TileData("mosaic", [band], {band: np.ascontiguousarray(img)}, {band: np.ascontiguousarray(wt)},
                       {band: np.ascontiguousarray(bad)}, {band: dict(t0.header[band])}, t0.wcs_header, None)
        c0 = time.process_time()
        stage.run({"exposure": big}, cfg)
        big_s = (time.process_time() - c0) / (n * n / 1e6)
        c0 = time.process_time()
        predict_probabilities(tfn, normalise(img, wt, bad, card.normalisation), core=a.patch, margin=margin, stride=stride)
        big_t = (time.process_time() - c0) / (n * n / 1e6)
        log(f"  stage via ONNX Runtime, one {n}x{n} band (patched): {big_s:.3f} CPU-s per MPix")
        log(f"  same network in PyTorch, one {n}x{n} band (patched): {big_t:.3f} CPU-s per MPix")
        results["speed"].update({"mosaic": n, "onnx_cpu_s_per_mpix_mosaic": big_s, "torch_cpu_s_per_mpix_mosaic": big_t})
    log(f"bench artefacts: done in {time.perf_counter() - t_all:.0f} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
