"""Train the artefact-segmentation U-Net on mock-survey tiles and ship it as ONNX with its card.

    surveypipe train artefacts [--out stages/models/artefacts] [--work out/train/artefacts]
                               [--steps 4000] [--finetune-steps 1500] [--init W --init-card C]
                               [--threads 1] [--quick]

The shipped model is four runs, each continuing the previous one's weights (``model.pt``, written
beside the ONNX file) with its card (the training record nests); ``make models`` runs them:

    surveypipe train artefacts --out out/train/artefacts/m2 --steps 5500
    surveypipe train artefacts --out out/train/artefacts/m3 --init out/train/artefacts/m2/model.pt \
        --init-card out/train/artefacts/m2/card.json --steps 0
    surveypipe train artefacts --out out/train/artefacts/m4 --init out/train/artefacts/m3/model.pt \
        --init-card out/train/artefacts/m3/card.json --steps 3000 --lr 1e-3
    surveypipe train artefacts --out stages/models/artefacts --init out/train/artefacts/m4/model.pt \
        --init-card out/train/artefacts/m4/card.json --steps 0 --finetune-steps 3000

(5500 general steps, 1500 fine-tuning steps (spikes vs trails), then 1500 more; 3000 general steps
at a lower rate and 1500 fine-tuning steps; 3000 more fine-tuning steps; all on seeds 1000-1011,
about 42 minutes on one core. The default architecture is the space-to-depth U-Net of
:func:`build_model`.)

1. Simulates (or reuses, in ``--work``) training releases (seeds 1000-1999) whose tiles carry
   artefacts from :func:`workflows.mock.artefacts.inject_artefacts` at ``--train-density`` times the
   default rates, and a validation release (seed 2000-2999) at the default rates.
2. Reads every band through the engine's tile loader (exactly what the stage sees), normalises it
   as the card says (:func:`stages.artefacts.normalise`).
3. Trains :class:`LeanUNet` (one model for every band) on random ``--crop`` px crops, half of them
   centred on an artefact pixel of a randomly chosen class; x/y flips (no transposes: bleed
   trails run along columns only); per-class binary cross-entropy.
4. Exports ONNX (dynamic batch and spatial axes), checks ONNX Runtime against torch on fresh
   inputs, measures the exact dependency radius of an output pixel (-> patch margin), chooses each
   class's probability threshold on the validation set (maximum pixel IoU) and writes the card.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from stages.artefacts import ARTEFACT_BITS, ARTEFACT_CLASSES, MODEL_DIR, normalise, predict_probabilities

NORMALISATION = {
    "recipe": "snr_asinh_logw_bad",
    "asinh_scale": 1.0,
    "logw_clip": [-5.0, 3.0],
    "channels": [
        "asinh(image * sqrt(weight) / asinh_scale): per-pixel S/N, stretched (0 on bad pixels)",
        "clip(log(weight / median of the band's weight > 0), logw_clip) (0 on bad pixels)",
        "1 on bad pixels (zero weight, NaN, input mask), else 0",
    ],
    "function": "stages.artefacts.normalise",
}
ARCH_DEFAULT = {"s2d": True, "detail": True, "c0": 16, "widths": [32, 48, 64], "dilated_from": 1}
ARCH_KEYS = ("c0", "widths", "dilated_from", "s2d", "detail")  # what build_model reads


def recorded_architecture(recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The ``build_model`` arguments in a card's ``architecture`` record (a card from before the
    space-to-depth option has the full-resolution stem)."""
    return {"s2d": False, "detail": False, **{k: v for k, v in (recorded or {}).items() if k in ARCH_KEYS}}


def card_architecture(card: Any) -> dict[str, Any]:
    """:func:`recorded_architecture` of a loaded model card."""
    return recorded_architecture(card.model_extra.get("architecture"))

# positive-pixel weights of the BCE: rare, small classes count more (thresholds are re-chosen on validation)
POS_WEIGHT = {"cosmic_ray": 5.0, "satellite_trail": 2.0, "hot_column": 3.0, "dead_column": 3.0, "hot_pixel": 20.0,
              "saturation": 10.0, "diffraction_spike": 2.0}
DICE_WEIGHT = 0.5
# second phase: diffraction spikes and satellite trails are both PSF-wide straight lines; crops centred on
# them more often and spikes weighted up teach the network to tell them apart (spikes fade and point at a star)
FINETUNE_CLASS_WEIGHTS = {"diffraction_spike": 3.0, "satellite_trail": 2.0}
FINETUNE_POS_WEIGHT = {"diffraction_spike": 5.0}


# ------------------------------------------------------------------ the network
def build_model(arch: dict[str, Any] | None = None, n_classes: int = len(ARTEFACT_CLASSES)):
    """A lean U-Net: full-resolution stem of ``c0`` channels, stride-2 encoder levels of ``widths``
    channels (3x3 convs, dilated by 2 from level ``dilated_from`` for a wide receptive field),
    transposed-conv (2x2, stride 2) upsampling *added* to the skip (no concatenation), one 3x3 conv
    per decoder level, 1x1 head. Returns logits in training; the export wrapper adds the sigmoid.

    ``s2d``: the stem starts with a space-to-depth step (each 2x2 pixel block becomes the 12 channels
    of one half-resolution pixel, losslessly) and the head ends with the inverse (4 sub-pixel outputs
    per class), so no convolution runs at full resolution, where the plain stem and last decoder
    level spend most of the time (a single hot pixel still has its own input and output values)."""
    import torch
    import torch.nn as nn

    arch = {**ARCH_DEFAULT, **(arch or {})}

    def cbr(ci: int, co: int, s: int = 1, d: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(ci, co, 3, s, padding=d, dilation=d, bias=False), nn.BatchNorm2d(co),
                             nn.ReLU(inplace=True))

    class LeanUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c0, widths = int(arch["c0"]), [int(w) for w in arch["widths"]]
            ch = [c0, *widths]
            self.s2d = bool(arch.get("s2d", False))
            if self.s2d:  # each 2x2 pixel block becomes 4 channels per input plane: the stem runs at half resolution
                # (a linear 2x2 stride-2 convolution, started as the exact space-to-depth permutation: ONNX
                # Runtime runs it far faster than the Reshape/Transpose that PixelUnshuffle exports to)
                s2d = nn.Conv2d(3, 12, 2, stride=2, bias=False)
                with torch.no_grad():
                    s2d.weight.zero_()
                    for c in range(3):
                        for k in range(4):
                            s2d.weight[4 * c + k, c, k // 2, k % 2] = 1.0
                self.stem = nn.Sequential(s2d, cbr(12, c0), cbr(c0, c0))
            else:
                self.stem = nn.Sequential(cbr(3, c0), cbr(c0, c0))
            self.down = nn.ModuleList([
                nn.Sequential(cbr(ch[i], ch[i + 1], s=2), cbr(ch[i + 1], ch[i + 1], d=2 if i >= arch["dilated_from"] else 1))
                for i in range(len(widths))])
            self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, 2) for i in range(len(widths))])
            self.dec = nn.ModuleList([cbr(ch[i], ch[i]) for i in range(len(widths))])
            if self.s2d:  # back to full resolution: 4 sub-pixel outputs per class and half-resolution pixel
                self.head = nn.ConvTranspose2d(c0, n_classes, 2, stride=2)  # = 1x1 conv to 4 x classes + depth-to-space
                # + a full-resolution 3x3 filter of the input added to the logits: a pixel-sharp term (a hot
                # pixel, a cosmic-ray hit) that the half-resolution path gates with its context
                self.detail = nn.Conv2d(3, n_classes, 3, padding=1) if arch.get("detail") else None
            else:
                self.head = nn.Conv2d(c0, n_classes, 1)
            self.stride = 2 ** (len(widths) + int(self.s2d))

        def forward(self, x):
            skips = []
            x0 = x
            x = self.stem(x)
            for d in self.down:
                skips.append(x)
                x = d(x)
            for i in reversed(range(len(self.down))):
                x = self.dec[i](self.up[i](x) + skips[i])
            if self.s2d and self.detail is not None:
                return self.head(x) + self.detail(x0)
            return self.head(x)

    return LeanUNet()


def with_sigmoid(model):
    import torch

    class Prob(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return torch.sigmoid(self.m(x))

    return Prob(model).eval()


def dependency_radius(arch: dict[str, Any] | None = None, size: int = 512) -> int:
    """Exact radius (pixels) of the input region an output pixel depends on: the support of the
    impulse response of the same architecture with all weights positive and no biases (every
    path counts), for impulses at every phase of the stride (one batch). The network is the same
    along x and y, so the x extent on a strip of 2 strides' height is the radius."""
    import torch

    m = build_model(arch).eval().double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                mod.weight.fill_(1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        while True:
            h = 2 * m.stride
            x = torch.zeros(m.stride, 3, h, size, dtype=torch.float64)
            c = size // 2
            for ph in range(m.stride):
                x[ph, :, m.stride, c + ph] = 1.0
            y = m(x).sum(1)
            radius = 0
            touches = False
            for ph in range(m.stride):
                xs = torch.nonzero(y[ph] > 0, as_tuple=True)[1]
                radius = max(radius, int(torch.max(torch.abs(xs - c - ph))))
                touches |= bool(xs.min() == 0 or xs.max() == size - 1)
            if not touches:
                return radius
            size *= 2


# ------------------------------------------------------------------ data
@dataclass
class BandImage:
    tile: str
    band: str
    x: np.ndarray          # (3, H, W) float16 normalised input
    truth: np.ndarray      # (H, W) uint16 truth bits
    at_sat: np.ndarray     # (H, W) bool: unmasked pixels at the SATURATE level


def simulate(out: Path, seed: int, *, n_tiles: int, size: int, bands: str, density: float = 1.0,
             hot_pixel_density: float | None = None, clean_twin: bool = False, overlap: int = 64,
             progress: bool = False) -> Path:
    """Write (or reuse) a mock release with artefacts at ``density`` x the default rates."""
    from workflows.mock.artefacts import DEFAULT_RATES, inject_artefacts
    from workflows.mock.release import write_release

    manifest = out / "manifest.yaml"
    stamp = out / "params.json"
    from workflows.mock import artefacts as inj

    params = {"seed": seed, "n_tiles": n_tiles, "size": size, "bands": bands, "density": density,
              "hot_pixel_density": hot_pixel_density, "overlap": overlap, "clean_twin": clean_twin,
              "injector": inj.INJECTOR_VERSION}
    if manifest.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return manifest
    dense = density != 1.0 or (hot_pixel_density is not None and hot_pixel_density != 1.0)
    injector = (functools.partial(inject_artefacts, rates=DEFAULT_RATES.scaled(density, hot_pixel_density)) if dense
                else inject_artefacts)
    write_release(out, n_tiles=n_tiles, size=size, bands=bands, seed=seed, overlap=overlap, artefact_injector=injector,
                  progress=progress)
    if clean_twin:
        write_release(out / "clean", n_tiles=n_tiles, size=size, bands=bands, seed=seed, overlap=overlap, progress=progress)
    stamp.write_text(json.dumps(params))
    return manifest


def load_set(manifest_path: Path, norm: dict[str, Any] | None = None, bands: Iterable[str] | None = None,
             with_tiles: bool = False) -> list[BandImage] | tuple[list[BandImage], dict[str, Any]]:
    """Every band image of a release, read by the engine's loader and normalised, with its truth."""
    import fitsio

    from pipeline.manifest import load_manifest
    from pipeline.tile import load_tile

    norm = norm or NORMALISATION
    man = load_manifest(manifest_path)
    root = Path(manifest_path).parent
    out, tiles = [], {}
    for spec in man.tiles:
        td = load_tile(man, spec)
        if with_tiles:
            tiles[spec.id] = td
        for b in td.bands:
            if bands and b not in bands:
                continue
            x = normalise(td.image[b], td.weight[b], td.bad[b], norm).astype(np.float16)
            tp = root / "truth" / f"{spec.id}_{b}_artefacts.fits"
            truth = fitsio.read(str(tp)).astype(np.uint16) if tp.exists() else np.zeros(td.shape, np.uint16)
            sat = td.header[b].get("SATURATE_NJY")
            at_sat = (td.image[b] >= np.float32(sat) * np.float32(1 - 1e-5)) & ~td.bad[b] if sat else np.zeros(td.shape, bool)
            out.append(BandImage(spec.id, b, x, truth, at_sat))
    return (out, tiles) if with_tiles else out


def truth_planes(truth: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 0/1 targets from a truth bit plane."""
    return np.stack([((truth >> ARTEFACT_BITS.bits[c].index) & 1).astype(np.float32) for c in ARTEFACT_CLASSES])


class CropSampler:
    """Random crops: a fraction centred on a pixel of a random class present in the set."""

    def __init__(self, images: Sequence[BandImage], crop: int, rng: np.random.Generator, focus: float = 0.5,
                 sat_mask_prob: float = 0.3, class_weights: dict[str, float] | None = None) -> None:
        self.images, self.crop, self.rng, self.focus, self.sat_mask_prob = images, crop, rng, focus, sat_mask_prob
        self.class_weights = class_weights or {}
        self.where: dict[int, list[tuple[int, np.ndarray]]] = {k: [] for k in range(len(ARTEFACT_CLASSES))}
        for i, im in enumerate(images):
            for k, c in enumerate(ARTEFACT_CLASSES):
                idx = np.flatnonzero(im.truth & np.uint16(ARTEFACT_BITS[c]))
                if idx.size:
                    self.where[k].append((i, idx))
        self.present = [k for k, v in self.where.items() if v]
        w = np.array([self.class_weights.get(ARTEFACT_CLASSES[k], 1.0) for k in self.present], float)
        self.present_p = w / w.sum() if len(w) else w

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng, c = self.rng, self.crop
        xs = np.empty((n, 3, c, c), np.float32)
        ts = np.empty((n, len(ARTEFACT_CLASSES), c, c), np.float32)
        for j in range(n):
            if self.present and rng.random() < self.focus:
                if self.class_weights:
                    k = self.present[int(rng.choice(len(self.present), p=self.present_p))]
                else:  # uniform: the draw of the general phase of the shipped model (same random stream)
                    k = self.present[int(rng.integers(len(self.present)))]
                i, idx = self.where[k][int(rng.integers(len(self.where[k])))]
                im = self.images[i]
                cy, cx = np.unravel_index(int(idx[int(rng.integers(idx.size))]), im.truth.shape)
                y0 = int(np.clip(cy - rng.integers(8, c - 8), 0, im.truth.shape[0] - c))
                x0 = int(np.clip(cx - rng.integers(8, c - 8), 0, im.truth.shape[1] - c))
            else:
                im = self.images[int(rng.integers(len(self.images)))]
                y0 = int(rng.integers(0, im.truth.shape[0] - c + 1))
                x0 = int(rng.integers(0, im.truth.shape[1] - c + 1))
            x = im.x[:, y0:y0 + c, x0:x0 + c].astype(np.float32)
            t = truth_planes(im.truth[y0:y0 + c, x0:x0 + c])
            if rng.random() < self.sat_mask_prob:  # the other presentation: saturated pixels masked as bad
                s = im.at_sat[y0:y0 + c, x0:x0 + c]
                x[0][s], x[1][s], x[2][s] = 0.0, 0.0, 1.0
            if rng.random() < 0.5:
                x, t = x[:, :, ::-1], t[:, :, ::-1]
            if rng.random() < 0.5:
                x, t = x[:, ::-1, :], t[:, ::-1, :]
            xs[j], ts[j] = x, t
        return xs, ts


# ------------------------------------------------------------------ scores
def _bins() -> np.ndarray:
    return np.linspace(-20.0, 20.0, 4001)


def score_histograms(prob: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of logit(p) for positive and negative pixels (for AUC and threshold choice).
    Logits beyond the bins go to the end bins: a pixel the network is sure of (p = 1 in float32,
    or the stage's saturation rule) still counts."""
    p = np.clip(prob.astype(np.float64), 1e-9, 1 - 1e-9)
    b = _bins()
    lg = np.clip(np.log(p) - np.log1p(-p), b[0], b[-1])
    pos = np.histogram(lg[target], b)[0]
    neg = np.histogram(lg[~target], b)[0]
    return pos, neg


def auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC (ties within a bin count one half)."""
    P, N = pos.sum(), neg.sum()
    if P == 0 or N == 0:
        return float("nan")
    neg_below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    return float((np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg)) / (P * N))


def best_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(probability threshold, IoU) maximising the pixel IoU = TP / (TP + FP + FN)."""
    tp = np.cumsum(pos[::-1])[::-1]
    fp = np.cumsum(neg[::-1])[::-1]
    fn = pos.sum() - tp
    iou = tp / np.maximum(tp + fp + fn, 1)
    k = int(np.argmax(iou))
    lg = _bins()[k]
    return float(1.0 / (1.0 + math.exp(-lg))), float(iou[k])


def scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel precision, recall, IoU, and the same with one pixel of tolerance.

    Tolerant: a predicted pixel is right when a truth pixel lies within 1 px (8-neighbourhood), a
    truth pixel is found when a predicted pixel lies within 1 px; IoU_tol = TP / (TP + FP + FN)
    with those counts (TP = predicted pixels that are right).
    """
    from scipy.ndimage import binary_dilation

    k = np.ones((3, 3), bool)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    near_t = binary_dilation(truth, k)
    near_p = binary_dilation(pred, k)
    tp_t = int(np.count_nonzero(pred & near_t))
    fp_t = int(np.count_nonzero(pred & ~near_t))
    fn_t = int(np.count_nonzero(truth & ~near_p))
    return {"tp": tp, "fp": fp, "fn": fn, "tp_tol": tp_t, "fp_tol": fp_t, "fn_tol": fn_t}


def summarise(c: dict[str, float]) -> dict[str, float]:
    def div(a: float, b: float) -> float:
        return float(a / b) if b else float("nan")

    return {
        "precision": div(c["tp"], c["tp"] + c["fp"]), "recall": div(c["tp"], c["tp"] + c["fn"]),
        "iou": div(c["tp"], c["tp"] + c["fp"] + c["fn"]),
        "precision_tol": div(c["tp_tol"], c["tp_tol"] + c["fp_tol"]),
        "recall_tol": div(c["tp"] + c["fn"] - c["fn_tol"], c["tp"] + c["fn"]),
        "iou_tol": div(c["tp_tol"], c["tp_tol"] + c["fp_tol"] + c["fn_tol"]),
    }


def evaluate(images: Sequence[BandImage], predict: Callable[[np.ndarray], np.ndarray],
             thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-class histograms, AUC and (with ``thresholds``) precision / recall / IoU and tolerant ones."""
    C = len(ARTEFACT_CLASSES)
    pos = np.zeros((C, 4000), np.int64)
    neg = np.zeros((C, 4000), np.int64)
    counts = [dict(tp=0, fp=0, fn=0, tp_tol=0, fp_tol=0, fn_tol=0) for _ in range(C)]
    for im in images:
        p = predict(im.x.astype(np.float32))
        for k, c in enumerate(ARTEFACT_CLASSES):
            t = (im.truth & np.uint16(ARTEFACT_BITS[c])) != 0
            a, b = score_histograms(p[k], t)
            pos[k] += a
            neg[k] += b
            if thresholds:
                s = scores(p[k] >= thresholds[c], t)
                for key in s:
                    counts[k][key] += s[key]
    out: dict[str, Any] = {"pos": pos, "neg": neg, "per_class": {}}
    for k, c in enumerate(ARTEFACT_CLASSES):
        row = {"auc": auc_from_hist(pos[k], neg[k]), "n_pixels": int(pos[k].sum())}
        if thresholds:
            row.update(summarise(counts[k]))
            row["threshold"] = thresholds[c]
            row["fp_rate"] = counts[k]["fp"] / max(int(neg[k].sum()), 1)
        out["per_class"][c] = row
    return out


# ------------------------------------------------------------------ training
def train_model(images: Sequence[BandImage], *, steps: int, batch: int = 8, crop: int = 160, lr: float = 3e-3,
                seed: int = 1000, arch: dict[str, Any] | None = None, log: Callable[[str], None] = print,
                log_every: int = 100, model: Any = None, focus: float = 0.5,
                class_weights: dict[str, float] | None = None, pos_weight: dict[str, float] | None = None,
                pct_start: float = 0.1, tag: str = "train"):
    """One phase of training (``model`` given: continue from it). Returns (model, wall s, CPU s)."""
    import torch

    torch.manual_seed(seed)
    model = build_model(arch) if model is None else model
    rng = np.random.default_rng(seed)
    sampler = CropSampler(images, crop, rng, focus=focus, class_weights=class_weights)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=pct_start)
    pw = {**POS_WEIGHT, **(pos_weight or {})}
    pos_w = torch.tensor([pw[c] for c in ARTEFACT_CLASSES]).reshape(-1, 1, 1)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=pos_w)

    def loss_fn(logits, target):
        # BCE + soft Dice per class over the batch (Dice balances classes of very different areas)
        p = torch.sigmoid(logits)
        inter = (p * target).sum((0, 2, 3))
        dice = 1.0 - (2.0 * inter + 1.0) / (p.sum((0, 2, 3)) + target.sum((0, 2, 3)) + 1.0)
        return bce(logits, target) + DICE_WEIGHT * dice.mean()

    model.train()
    t0 = time.perf_counter()
    c0 = time.process_time()
    run = 0.0
    for step in range(1, steps + 1):
        xb, tb = sampler.sample(batch)
        out = model(torch.from_numpy(xb))
        loss = loss_fn(out, torch.from_numpy(tb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = loss.item()
        run = 0.98 * run + 0.02 * lv if step > 1 else lv
        if step % log_every == 0 or step == steps:
            log(f"{tag} artefacts: step {step}/{steps} loss {run:.4f} ({time.perf_counter() - t0:.0f} s wall, "
                f"{time.process_time() - c0:.0f} CPU-s)")
    model.eval()
    return model, time.perf_counter() - t0, time.process_time() - c0


def torch_predictor(model, margin: int, core: int = 1024) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    net = with_sigmoid(model)

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return lambda x: predict_probabilities(fn, x, core=core, margin=margin, stride=model.stride)


def onnx_predictor(path: Path, margin: int, stride: int, core: int = 1024, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    sess = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fn = lambda x: sess.run(None, {name: x})[0]  # noqa: E731
    return lambda x: predict_probabilities(fn, x, core=core, margin=margin, stride=stride)


def export(model, out_dir: Path, *, arch: dict[str, Any], train_info: dict[str, Any], val: Sequence[BandImage] | None,
           log: Callable[[str], None] = print, threads: int = 1) -> Any:
    """ONNX export, torch/ONNX check, margin, thresholds on ``val``, card."""
    import torch

    from workflows.train.onnx_export import export_onnx, finish_model, max_abs_diff_onnx_torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = with_sigmoid(model)
    onnx_path = out_dir / "model.onnx"
    export_onnx(net, [torch.zeros(1, 3, 64, 64)], onnx_path, input_names=["input"], output_names=["prob"],
                dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "prob": {0: "batch", 2: "height", 3: "width"}})
    rng = np.random.default_rng(7)
    fresh = np.concatenate([rng.normal(0, 1, (2, 1, 96, 160)), rng.normal(0, 0.5, (2, 1, 96, 160)),
                            (rng.random((2, 1, 96, 160)) < 0.01)], axis=1).astype(np.float32)
    fresh[:, 0] = np.arcsinh(fresh[:, 0] + 50 * (rng.random((2, 96, 160)) < 0.003))
    diff = max_abs_diff_onnx_torch(net, onnx_path, {"input": fresh})
    log(f"train artefacts: max |onnxruntime - torch| on fresh inputs = {diff:.2e}")
    radius = dependency_radius(arch)
    stride = model.stride
    margin = int(math.ceil(radius / stride) * stride)
    log(f"train artefacts: dependency radius {radius} px -> patch margin {margin} px")
    thresholds = {c: 0.5 for c in ARTEFACT_CLASSES}
    metrics: dict[str, Any] = {}
    if val:
        pred = onnx_predictor(onnx_path, margin, stride, threads=threads)
        ev = evaluate(val, pred)
        for k, c in enumerate(ARTEFACT_CLASSES):
            if ev["pos"][k].sum():
                thresholds[c], _ = best_threshold(ev["pos"][k], ev["neg"][k])
        ev2 = evaluate(val, pred, thresholds)
        metrics = {"set": train_info.get("validation", {}), "per_class": {c: {k: (round(v, 5) if isinstance(v, float) else v)
                                                                             for k, v in r.items()}
                                                                         for c, r in ev2["per_class"].items()}}
        for c, r in ev2["per_class"].items():
            log(f"train artefacts: val {c:18s} thr {thresholds[c]:.3f} AUC {r['auc']:.4f} P {r['precision']:.3f} "
                f"R {r['recall']:.3f} IoU {r['iou']:.3f} IoU_tol {r['iou_tol']:.3f}")
    card = finish_model(
        out_dir, onnx_path, name="artefacts", version="1",
        inputs={"input": {"shape": ["batch", 3, "height", "width"], "dtype": "float32",
                          "meaning": "one band, normalised as 'normalisation' says; any height/width "
                                     f"(multiples of {stride} keep the stride grid aligned)"}},
        outputs={"prob": {"shape": ["batch", len(ARTEFACT_CLASSES), "height", "width"], "dtype": "float32",
                          "meaning": "per-class probability (sigmoid; classes in 'classes' order; multi-label)"}},
        bands=list("ugrizy"), classes=list(ARTEFACT_CLASSES), normalisation=NORMALISATION,
        thresholds={c: round(float(t), 6) for c, t in thresholds.items()},
        training=train_info, metrics=metrics,
        bits=ARTEFACT_BITS.as_attrs(),
        architecture={"type": "LeanUNet", **arch, "code": "workflows.train.artefacts.build_model",
                      "parameters": int(sum(p.numel() for p in model.parameters()))},
        inference={"stride": stride, "dependency_radius": radius, "margin": margin,
                   "patching": "stages.artefacts.predict_probabilities: zero-pad to the stride, overlapping "
                               "windows of core + 2 margin, keep the cores"},
        onnx_vs_torch_max_abs_diff=diff,
    )
    write_readme(out_dir, card)
    return card


def _phase_text(p: dict[str, Any]) -> str:
    if "steps" not in p:
        t = p.get("training", {})
        inner = "; ".join(_phase_text(q) for q in t.get("phases", [])) or f"{t.get('steps')} steps, seeds {t.get('train_seeds')}"
        return f"initial weights from {p.get('from')} ({inner}; {t.get('train_seconds')} s wall, {t.get('train_cpu_seconds')} CPU-s)"
    return (f"{p['phase']}: {p['steps']} steps, lr {p['lr']}, seeds {p['seeds'][0]}-{p['seeds'][-1]}, class weights "
            f"{p['class_weights'] or 'uniform'}, {p['seconds']} s wall, {p['cpu_seconds']} CPU-s")


def _totals(tr: dict[str, Any]) -> tuple[int, float, float]:
    """(steps, wall s, CPU s) of a training record, earlier runs it started from included."""
    steps, wall, cpu = 0, 0.0, 0.0
    for p in tr.get("phases", []):
        if "steps" in p:
            steps, wall, cpu = steps + int(p["steps"]), wall + float(p["seconds"]), cpu + float(p["cpu_seconds"])
        else:
            t = p.get("training", {})
            if t.get("phases"):
                s2, w2, c2 = _totals(t)
            else:
                s2, w2, c2 = int(t.get("steps", 0)), float(t.get("train_seconds", 0.0)), float(t.get("train_cpu_seconds", 0.0))
            steps, wall, cpu = steps + s2, wall + w2, cpu + c2
    return steps, wall, cpu


def write_readme(out_dir: Path, card: Any) -> None:
    """A human-readable README.md beside the model (the card stays the machine-readable truth)."""
    inf = card.model_extra.get("inference", {})
    arch = card.model_extra.get("architecture", {})
    tr = card.training
    lines = [
        f"# {card.name} v{card.version}: artefact segmentation (lean U-Net, ONNX)", "",
        "Per-pixel, multi-label segmentation of instrumental and environmental artefacts in one band image "
        "(one model for every band), used by `stages.artefacts.Artefacts`. Trained by "
        "`surveypipe train artefacts` (`workflows/train/artefacts.py`) on mock-survey tiles whose artefacts come "
        "from `workflows/mock/artefacts.py` with exact per-pixel truth.", "",
        "## Input", "",
        "`input`: float32 `(batch, 3, height, width)`, any height/width (the stage pads to a multiple of "
        f"{inf.get('stride')}):", "",
        *[f"{i}. {c}" for i, c in enumerate(card.normalisation.get("channels", []))], "",
        f"asinh_scale = {card.normalisation.get('asinh_scale')}, logw_clip = {card.normalisation.get('logw_clip')}; "
        "implemented once in `stages.artefacts.normalise`.", "",
        "## Output", "",
        "`prob`: float32 `(batch, 7, height, width)`, sigmoid probability per class (multi-label); a class's bit "
        "is set where its probability reaches the threshold below (chosen on the validation set to maximise the "
        "pixel IoU).", "",
        "| class | bit | threshold | val AUC | val IoU | val IoU (1 px tol.) |", "|---|---|---|---|---|---|",
    ]
    pc = card.metrics.get("per_class", {})
    for c in card.classes:
        m = pc.get(c, {})
        lines.append(f"| {c} | {ARTEFACT_BITS.bits[c].index} | {card.thresholds[c]:.3f} | {m.get('auc', float('nan')):.4f} | "
                     f"{m.get('iou', float('nan')):.3f} | {m.get('iou_tol', float('nan')):.3f} |")
    lines += [
        "", "## Architecture", "",
        f"{arch.get('type')}: "
        + (f"space-to-depth input (each 2x2 pixel block becomes 12 channels of one half-resolution pixel), stem of "
           f"{arch.get('c0')} channels at half resolution, " if arch.get("s2d") else
           f"full-resolution stem of {arch.get('c0')} channels, ")
        + f"stride-2 encoder levels of "
        f"{arch.get('widths')} channels (3x3 conv + BN + ReLU, dilation 2 from level {arch.get('dilated_from')}), "
        "2x2 transposed-conv upsampling added to the skip, one 3x3 conv per decoder level, 1x1 head"
        + (" to 4 sub-pixel outputs per class, depth-to-space back to full resolution; " if arch.get("s2d") else "; ")
        + f"{arch.get('parameters')} parameters. Dependency radius of an output pixel: {inf.get('dependency_radius')} px; "
        f"the stage runs overlapping patches with {inf.get('margin')} px margins and keeps their cores, so the "
        "result does not depend on the patch size (no seams).", "",
        "## Training", "",
        f"Seeds {tr.get('train_seeds')} ({tr.get('train_band_images')} band images, {tr.get('train_mpix')} MPix, "
        f"artefact rates x{tr.get('train_artefact_density')}, hot pixels x{tr.get('train_hot_pixel_density')}), validation seed {tr.get('validation', {}).get('seed')} "
        f"({tr.get('validation', {}).get('band_images')} band images at the default rates). {tr.get('steps')} steps of "
        f"{tr.get('batch')} crops of {tr.get('crop')} px, {tr.get('optimizer')}, {tr.get('loss')}; {tr.get('sampling')}. "
        "Phases: " + "; ".join(_phase_text(p) for p in tr.get("phases", [])) + ". "
        f"This run: {tr.get('train_seconds')} s wall-clock, {tr.get('train_cpu_seconds')} CPU-s, on "
        f"{tr.get('torch_threads')} torch thread(s) (torch {tr.get('torch')}); data simulation {tr.get('data_seconds')} s. "
        "All phases together (earlier runs it started from included): {} steps, {:.0f} s wall-clock ({:.1f} min), "
        "{:.0f} CPU-s ({:.1f} CPU-min).".format(*(lambda t: (t[0], t[1], t[1] / 60, t[2], t[2] / 60))(_totals(tr))), "",
        f"Command: `{tr.get('command')}`", "",
        f"ONNX Runtime vs torch on fresh inputs: max |diff| = {card.model_extra.get('onnx_vs_torch_max_abs_diff'):.2e}. "
        f"sha256 of model.onnx: `{card.sha256}`.", "",
        "`model.pt` is the PyTorch state_dict the ONNX file was exported from "
        "(`workflows.train.artefacts.build_model(card architecture)`; the benchmark's PyTorch timing, `--init` of a "
        "further run).", "",
        "The full card (every field) is `card.json`.", "",
    ]
    (Path(out_dir) / "README.md").write_text("\n".join(lines))


# ------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="surveypipe train artefacts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(MODEL_DIR), help="model directory to write (model.onnx, card.json, README.md)")
    ap.add_argument("--work", default="out/train/artefacts", help="where the simulated releases are kept (reused)")
    ap.add_argument("--train-seeds", default="1000-1011", help="training release seeds (range a-b or list a,b)")
    ap.add_argument("--train-tiles", type=int, default=4, help="tiles per training release")
    ap.add_argument("--train-size", type=int, default=512, help="training tile side (px)")
    ap.add_argument("--train-density", type=float, default=2.0, help="artefact rates in training tiles, x default")
    ap.add_argument("--train-hot-pixel-density", type=float, default=6.0, help="hot-pixel rate in training tiles, x default")
    ap.add_argument("--val-seed", type=int, default=2000)
    ap.add_argument("--val-tiles", type=int, default=4)
    ap.add_argument("--val-size", type=int, default=1024)
    ap.add_argument("--bands", default="ugrizy")
    ap.add_argument("--steps", type=int, default=4000, help="steps of the general phase")
    ap.add_argument("--finetune-steps", type=int, default=1500, help="steps of the second phase (spikes vs trails)")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-class-weights", default=None,
                    help=f"JSON: crop-centre class weights of the second phase (default {json.dumps(FINETUNE_CLASS_WEIGHTS)})")
    ap.add_argument("--finetune-pos-weight", default=None,
                    help=f"JSON: extra BCE pos_weight per class in the second phase (default {json.dumps(FINETUNE_POS_WEIGHT)})")
    ap.add_argument("--init", default=None, help="start from this state_dict (e.g. --init out/train/artefacts/m2/model.pt "
                                                 "--steps 0 continues an earlier run with its fine-tuning phase; "
                                                 "`make models` chains the shipped model's three runs so)")
    ap.add_argument("--init-card", default=None, help="card.json of the run that made --init (its training record is kept)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=160)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is the fastest per CPU-second on small convs)")
    ap.add_argument("--arch", default=None, help="JSON overriding the architecture, e.g. '{\"c0\": 12}'")
    ap.add_argument("--quick", action="store_true", help="tiny run (tests): one small tile, few steps, no validation")
    a = ap.parse_args(list(argv) if argv is not None else None)
    try:
        ft_weights = json.loads(a.finetune_class_weights) if a.finetune_class_weights else FINETUNE_CLASS_WEIGHTS
        ft_pos = json.loads(a.finetune_pos_weight) if a.finetune_pos_weight else FINETUNE_POS_WEIGHT
        if not (isinstance(ft_weights, dict) and isinstance(ft_pos, dict)):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        ap.error(f"--finetune-class-weights/--finetune-pos-weight must be JSON objects such as "
                 f"'{{\"hot_column\": 3.0}}' ({exc})")
    for name in (*ft_weights, *ft_pos):  # before minutes of simulation, not after
        if name not in ARTEFACT_CLASSES:
            ap.error(f"unknown artefact class {name!r} in --finetune-class-weights/--finetune-pos-weight "
                     f"(classes: {', '.join(ARTEFACT_CLASSES)})")

    import torch

    from workflows.mock.seeds import check_seed

    torch.set_num_threads(a.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    work = Path(a.work)
    # a continued run keeps the architecture its weights were trained with (old cards: the full-resolution stem)
    init_card = json.loads(Path(a.init_card).read_text()) if a.init_card else {}
    recorded = recorded_architecture(init_card.get("architecture")) if init_card else {}
    arch = {**ARCH_DEFAULT, **recorded, **(json.loads(a.arch) if a.arch else {})}
    if "-" in a.train_seeds:
        lo, hi = (int(v) for v in a.train_seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(v) for v in a.train_seeds.split(",")]
    for s in seeds:
        check_seed(s, "training")
    check_seed(a.val_seed, "validation")
    if a.quick:
        seeds, a.train_tiles, a.train_size, a.bands = seeds[:1], 1, 128, a.bands[:1] if a.bands else "r"
        a.finetune_steps = min(a.finetune_steps, 2)
    t0 = time.perf_counter()
    images: list[BandImage] = []
    for s in seeds:
        m = simulate(work / f"train-{s}-{a.train_tiles}x{a.train_size}", s, n_tiles=a.train_tiles, size=a.train_size,
                     bands=a.bands, density=a.train_density, hot_pixel_density=a.train_hot_pixel_density)
        images += load_set(m)
    val: list[BandImage] = []
    if not a.quick:
        m = simulate(work / f"val-{a.val_seed}-{a.val_tiles}x{a.val_size}", a.val_seed, n_tiles=a.val_tiles,
                     size=a.val_size, bands=a.bands)
        val = load_set(m)
    t_data = time.perf_counter() - t0
    npix = sum(im.truth.size for im in images)
    log(f"train artefacts: {len(images)} training band images ({npix / 1e6:.1f} MPix), {len(val)} validation; "
        f"data {t_data:.0f} s")
    crop = min(a.crop, min(min(im.truth.shape) for im in images))
    model = build_model(arch)
    phases: list[dict[str, Any]] = []
    if a.init:
        model.load_state_dict(torch.load(a.init, map_location="cpu"))
        prev = init_card.get("training", {})
        phases.append({"phase": "initial weights", "from": a.init, "training": prev})
        log(f"train artefacts: starting from {a.init}")
    t_train = cpu_train = 0.0
    common = dict(batch=a.batch, crop=crop, arch=arch, log=log, model=model)
    if a.steps:
        model, tw, tc = train_model(images, steps=a.steps, lr=a.lr, seed=seeds[0], **common)
        common["model"] = model
        t_train, cpu_train = t_train + tw, cpu_train + tc
        phases.append({"phase": "general", "seeds": seeds, "steps": a.steps, "lr": a.lr, "focus": 0.5,
                       "class_weights": {}, "pos_weight": POS_WEIGHT, "seconds": round(tw, 1), "cpu_seconds": round(tc, 1)})
        log(f"train artefacts: {a.steps} steps in {tw:.0f} s wall ({tw / 60:.1f} min), {tc:.0f} CPU-s "
            f"({tc / 60:.1f} CPU-min), {a.threads} torch thread(s)")
    if a.finetune_steps:
        model, tw, tc = train_model(images, steps=a.finetune_steps, lr=a.finetune_lr, seed=seeds[0] + 1, focus=0.6,
                                    class_weights=ft_weights, pos_weight=ft_pos,
                                    pct_start=0.05, tag="finetune", **common)
        t_train, cpu_train = t_train + tw, cpu_train + tc
        phases.append({"phase": "fine-tune (spikes vs trails)" if ft_weights == FINETUNE_CLASS_WEIGHTS
                       else "fine-tune (weighted classes)", "seeds": seeds, "steps": a.finetune_steps,
                       "lr": a.finetune_lr, "focus": 0.6, "class_weights": ft_weights,
                       "pos_weight": {**POS_WEIGHT, **ft_pos}, "seconds": round(tw, 1),
                       "cpu_seconds": round(tc, 1)})
        log(f"train artefacts: fine-tuning {a.finetune_steps} steps in {tw:.0f} s wall ({tw / 60:.1f} min), {tc:.0f} CPU-s "
            f"({tc / 60:.1f} CPU-min)")
    model.eval()
    info = {
        "train_seeds": seeds, "train_tiles_per_seed": a.train_tiles, "train_tile_size": a.train_size, "bands": a.bands,
        "train_band_images": len(images), "train_mpix": round(npix / 1e6, 2), "train_artefact_density": a.train_density,
        "train_hot_pixel_density": a.train_hot_pixel_density,
        "validation": {"seed": a.val_seed, "tiles": a.val_tiles, "size": a.val_size, "band_images": len(val),
                       "artefact_density": 1.0},
        "steps": a.steps + a.finetune_steps, "phases": phases, "batch": a.batch, "crop": crop, "lr": a.lr,
        "optimizer": "AdamW + OneCycle per phase",
        "loss": f"per-class BCE (pos_weight per phase) + {DICE_WEIGHT} x soft Dice per class",
        "sampling": "a fraction of the crops centred on a pixel of a class drawn with the phase's class weights; "
                    "x/y flips; 30 % of crops with saturated pixels masked as bad", "torch_threads": a.threads,
        "train_seconds": round(t_train, 1), "train_cpu_seconds": round(cpu_train, 1), "data_seconds": round(t_data, 1),
        "torch": torch.__version__, "code": "workflows/train/artefacts.py",
        "command": "surveypipe train artefacts " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    # the weights beside the ONNX file: the PyTorch timing of the benchmark, and --init of a later run
    Path(a.out).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(a.out) / "model.pt")
    card = export(model, Path(a.out), arch=arch, train_info=info, val=val, log=log)
    log(f"train artefacts: wrote {Path(a.out) / 'model.onnx'} ({(Path(a.out) / 'model.onnx').stat().st_size / 1e6:.2f} MB), "
        f"sha256 {card.sha256[:12]}; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
