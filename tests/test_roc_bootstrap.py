"""Bootstrap intervals of TPR at fixed FPR (workflows.bench.roc_bootstrap), against known truth."""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from workflows.bench.roc_bootstrap import paired_tpr_difference, tpr_at_fpr_interval
from workflows.train.lenses import tpr_at_fpr

SHIFT = 3.0  # positives ~ N(SHIFT, 1), negatives ~ N(0, 1)


def draw(rng: np.random.Generator, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    score = np.concatenate([rng.normal(SHIFT, 1, n_pos), rng.normal(0, 1, n_neg)])
    return score, np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]


def true_tpr(fpr: float) -> float:
    return float(norm.sf(norm.isf(fpr) - SHIFT))


def test_the_point_estimate_is_the_benchmark_tpr():
    score, label = draw(np.random.default_rng(101), 500, 5000)
    for fpr in (0.01, 0.001):
        t, lo, hi = tpr_at_fpr_interval(score, label, fpr, n_boot=200)
        assert t == tpr_at_fpr(score, label, fpr)[0]
        assert lo <= t <= hi


def test_the_95_percent_interval_covers_the_true_tpr_about_95_percent_of_the_time():
    rng = np.random.default_rng(102)
    fpr, truth = 0.001, true_tpr(0.001)
    hits, widths = 0, []
    trials = 60
    for _ in range(trials):
        score, label = draw(rng, 1000, 20000)
        _, lo, hi = tpr_at_fpr_interval(score, label, fpr, n_boot=300, seed=int(rng.integers(1 << 30)))
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    # binomial(60, 0.95): 52 or more in 99 % of runs; an interval that ignored the threshold's own
    # noise (positives resampled alone) covers far less often at 20 negatives above the threshold
    assert hits >= 52, hits
    assert 0.03 < np.median(widths) < 0.2


def test_more_data_gives_narrower_intervals():
    rng = np.random.default_rng(103)
    small = tpr_at_fpr_interval(*draw(rng, 300, 3000), 0.01, n_boot=300)
    large = tpr_at_fpr_interval(*draw(rng, 3000, 30000), 0.01, n_boot=300)
    assert (large[2] - large[1]) < 0.5 * (small[2] - small[1])


def test_identical_models_differ_by_exactly_zero():
    score, label = draw(np.random.default_rng(104), 500, 5000)
    assert paired_tpr_difference(score, score.copy(), label, 0.001, n_boot=200) == (0.0, 0.0, 0.0)


def test_a_better_model_on_the_same_stamps_is_found_better_where_unpaired_intervals_overlap():
    rng = np.random.default_rng(105)
    score_b, label = draw(rng, 2000, 20000)
    score_a = score_b.copy()
    score_a[label == 1] += 0.15  # model a: every lens a little higher, the negatives unchanged
    d, lo, hi = paired_tpr_difference(score_a, score_b, label, 0.001, n_boot=300)
    assert d == tpr_at_fpr(score_a, label, 0.001)[0] - tpr_at_fpr(score_b, label, 0.001)[0]
    assert 0 < lo <= d <= hi
    ia = tpr_at_fpr_interval(score_a, label, 0.001, n_boot=300)
    ib = tpr_at_fpr_interval(score_b, label, 0.001, n_boot=300)
    assert ia[1] < ib[2]  # the two separate intervals overlap: only the pairing resolves the difference


def test_paired_scores_of_different_stamps_are_refused():
    score, label = draw(np.random.default_rng(106), 50, 500)
    try:
        paired_tpr_difference(score, score[:-1], label, 0.01)
    except ValueError as exc:
        assert "same stamps" in str(exc)
    else:
        raise AssertionError("different lengths were accepted")
