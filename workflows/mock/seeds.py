"""Seeds of the mock survey: one registry of ranges kept apart, and the stream derivation.

Every simulated data set names its purpose, and its seed must come from that purpose's range, so
no benchmark ever runs on tiles a test or a model was tuned on:

=============  ===========  =====================================================
purpose        seeds        used by
=============  ===========  =====================================================
``test``       100 - 199    unit and end-to-end tests (``tests/``)
``demo``       42           ``make run`` / the README demo
``training``   1000 - 1999  simulated training sets of the ONNX models
``validation`` 2000 - 2999  held-out sets for model cards and tuning
``benchmark``  9000 - 9999  ``make bench`` / ``surveypipe bench`` (never tuned on)
=============  ===========  =====================================================

Random streams: every independent piece of randomness gets its own generator from
``np.random.SeedSequence(seed, spawn_key=(purpose_key, ...))`` -- the same mechanism as
``SeedSequence(seed).spawn`` but addressed by a fixed key (population cell, tile, band), so a
stream never depends on how many other streams were drawn before it.
"""
from __future__ import annotations

import numpy as np

SEED_RANGES: dict[str, range] = {
    "test": range(100, 200),
    "demo": range(42, 43),
    "training": range(1000, 2000),
    "validation": range(2000, 3000),
    "benchmark": range(9000, 10000),
}

DEMO_SEED = 42
TEST_SEED = 100
BENCHMARK_SEED = 9000


def purpose_of(seed: int) -> str | None:
    """The purpose whose range holds ``seed`` (None if it is in none)."""
    for name, r in SEED_RANGES.items():
        if int(seed) in r:
            return name
    return None


def check_seed(seed: int, purpose: str) -> int:
    """Return ``seed`` if it belongs to ``purpose``; raise ValueError otherwise."""
    if purpose not in SEED_RANGES:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {sorted(SEED_RANGES)}")
    r = SEED_RANGES[purpose]
    if int(seed) not in r:
        owner = purpose_of(seed)
        where = f"it belongs to {owner!r}" if owner else "it is in no registered range"
        raise ValueError(f"seed {seed} is not a {purpose} seed ({r.start}-{r.stop - 1}); {where}")
    return int(seed)


def make_rng(seed: int, *key: int) -> np.random.Generator:
    """An independent PCG64 generator for stream ``key`` of ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key))))


def galsim_seed(rng: np.random.Generator) -> int:
    """A seed for ``galsim.BaseDeviate`` drawn from a numpy generator (never 0, which means 'time')."""
    return int(rng.integers(1, 2**31 - 1))
