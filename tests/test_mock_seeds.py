"""The seed registry keeps purposes apart; streams are reproducible and independent."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from workflows.mock import seeds


def test_ranges_are_disjoint_and_named():
    for (a, ra), (b, rb) in itertools.combinations(seeds.SEED_RANGES.items(), 2):
        assert not set(ra) & set(rb), (a, b)
    assert seeds.purpose_of(42) == "demo"
    assert seeds.purpose_of(150) == "test"
    assert seeds.purpose_of(9123) == "benchmark"
    assert seeds.purpose_of(5000) is None
    assert seeds.check_seed(seeds.BENCHMARK_SEED, "benchmark") == 9000
    assert seeds.check_seed(seeds.TEST_SEED, "test") == 100


@pytest.mark.parametrize("seed,purpose", [(101, "benchmark"), (9000, "test"), (42, "training"), (5000, "validation")])
def test_check_seed_rejects_foreign_seeds(seed, purpose):
    with pytest.raises(ValueError, match=purpose):
        seeds.check_seed(seed, purpose)


def test_unknown_purpose():
    with pytest.raises(ValueError, match="unknown seed purpose"):
        seeds.check_seed(100, "tuning")


def test_streams_reproducible_and_independent():
    a = seeds.make_rng(101, 2, 0, 3).random(5)
    b = seeds.make_rng(101, 2, 0, 3).random(5)
    c = seeds.make_rng(101, 2, 1, 3).random(5)
    d = seeds.make_rng(102, 2, 0, 3).random(5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    assert 1 <= seeds.galsim_seed(seeds.make_rng(1)) < 2**31
