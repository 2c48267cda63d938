"""Bootstrap uncertainties of a true-positive rate at a fixed false-positive rate.

Why: the lens goal is read at FPR 0.1 % of 1e5 negatives, a threshold set by the ~100 highest
negative scores, with a few thousand positives above or below it. Two models a few thousandths
apart there may not differ at all, so the benchmark prints an interval for each TPR and, for two
models scored on the *same* stamps, a paired interval of their difference (the same resampled
stamps for both models, which cancels most of the sampling noise they share).

Semantics are those of :func:`workflows.train.lenses.tpr_at_fpr`: with ``k = floor(fpr * n_neg)``
false positives allowed, the threshold is the (k+1)-th highest negative score and the TPR is the
fraction of positives strictly above it. Positives and negatives are resampled separately
(stratified), so every replicate has the original class sizes.
"""
from __future__ import annotations

import numpy as np


def _split(score: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score, label = np.asarray(score, float), np.asarray(label).astype(bool)
    return score[label], score[~label]


def _tpr(pos: np.ndarray, neg: np.ndarray, k: int, ip: np.ndarray, ineg: np.ndarray) -> float:
    """TPR of the resample (``ip``, ``ineg`` index into ``pos``, ``neg``; ``neg`` sorted descending)."""
    if k >= ineg.size:
        return 1.0
    thr = neg[np.partition(ineg, k)[k]]  # the (k+1)-th smallest index of a descending array: (k+1)-th highest
    return float(np.mean(pos[ip] > thr))


def tpr_at_fpr_interval(score: np.ndarray, label: np.ndarray, fpr: float, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(TPR, low, high): the TPR at ``fpr`` and its stratified-bootstrap percentile interval."""
    pos, neg = _split(score, label)
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan"), float("nan")
    neg = np.sort(neg)[::-1]
    k = int(np.floor(fpr * neg.size))
    point = _tpr(pos, neg, k, np.arange(pos.size), np.arange(neg.size))
    rng = np.random.default_rng(seed)
    reps = np.array([_tpr(pos, neg, k, rng.integers(0, pos.size, pos.size), rng.integers(0, neg.size, neg.size))
                     for _ in range(n_boot)])
    lo, hi = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return point, float(lo), float(hi)


def paired_tpr_difference(score_a: np.ndarray, score_b: np.ndarray, label: np.ndarray, fpr: float,
                          n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(TPR_a - TPR_b, low, high) for two models' scores of the same stamps, by a paired
    stratified bootstrap: each replicate resamples the stamps once and scores both models on it."""
    score_a, score_b = np.asarray(score_a, float), np.asarray(score_b, float)
    if score_a.shape != score_b.shape or score_a.shape != np.shape(label):
        raise ValueError(f"paired scores need the same stamps: shapes {score_a.shape}, {score_b.shape}, "
                         f"labels {np.shape(label)}")
    lab = np.asarray(label).astype(bool)
    ip_all, in_all = np.flatnonzero(lab), np.flatnonzero(~lab)
    if ip_all.size == 0 or in_all.size == 0:
        return float("nan"), float("nan"), float("nan")
    k = int(np.floor(fpr * in_all.size))
    # per model: negatives sorted descending, and each negative stamp's rank in that order, so a resample
    # of stamps maps to indices into each model's sorted array
    sides = []
    for s in (score_a, score_b):
        order = np.argsort(-s[in_all], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        sides.append((s[ip_all], s[in_all][order], rank))

    def diff(ip: np.ndarray, ineg: np.ndarray) -> float:
        (pa, na, ra), (pb, nb, rb) = sides
        return _tpr(pa, na, k, ip, ra[ineg]) - _tpr(pb, nb, k, ip, rb[ineg])

    point = diff(np.arange(ip_all.size), np.arange(in_all.size))
    rng = np.random.default_rng(seed)
    reps = np.array([diff(rng.integers(0, ip_all.size, ip_all.size), rng.integers(0, in_all.size, in_all.size))
                     for _ in range(n_boot)])
    lo, hi = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return point, float(lo), float(hi)
