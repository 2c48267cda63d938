"""Exports stream tile by tile: tiles are read one at a time, in order, and the peak memory of an
export stays near one tile's table however many tiles the release has."""
from __future__ import annotations

import tracemalloc

import pyarrow as pa
import pytest

from pipeline.store import CatalogStore
from test_export_common import make_store
from workflows.export import export_catalog

SMALL, LARGE = 3, 8  # tiles in the two releases compared
ROWS = 20_000


def one_tile_bytes(store: CatalogStore) -> int:
    """In-memory size of one tile's stored table (every column, every row)."""
    return sum(v.nbytes for p in ("objects", "photoz") for v in store.read_table("s000", p).columns.values())


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {n: make_store(root / f"run{n}", n_tiles=n, rows=ROWS, seed=190) for n in (SMALL, LARGE)}


def test_tiles_are_read_one_at_a_time_in_order(stores, tmp_path, monkeypatch):
    store = stores[SMALL]
    reads: list[tuple[str, str, int]] = []
    real = CatalogStore.read_table

    def counting(self, tile, name, columns=None):
        t = real(self, tile, name, columns)
        reads.append((tile, name, len(t.columns)))
        return t

    monkeypatch.setattr(CatalogStore, "read_table", counting)
    export_catalog(store.out, "parquet", tmp_path / "c.parquet")
    count_pass = [r for r in reads if r[2] == 1]  # the row-count pre-pass reads one column per tile
    stream = [r for r in reads if r[2] > 1]
    assert [t for t, _, _ in count_pass] == store.tile_ids()
    assert [(t, p) for t, p, _ in stream] == [(t, p) for t in store.tile_ids() for p in ("objects", "photoz")]


def export_peak(store: CatalogStore, fmt: str, dest) -> tuple[int, int]:
    """(rows, peak bytes) of one export: tracemalloc for numpy/Python, a proxy pool for Arrow."""
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # Arrow's buffers are not seen by tracemalloc
    old_pool = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        n = export_catalog(store.out, fmt, dest)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(old_pool)
    return n, traced_peak + pool.max_memory()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fits", "parquet", "votable"])
def test_peak_memory_stays_near_one_tile_whatever_the_release_size(stores, tmp_path, fmt):
    """Three exports of each release: every peak stays under 4 tiles, and the usual peak (the least of
    the three) does not grow with the release. A single export's peak also carries a sporadic
    ~0.6-tile transient of the chunk reads, of any release size; comparing single exports made the
    growth check flaky."""
    one_tile = one_tile_bytes(stores[SMALL])
    export_catalog(stores[SMALL].out, fmt, tmp_path / f"warm.{fmt}")  # imports and caches outside the measurement
    runs = {k: [export_peak(stores[k], fmt, tmp_path / f"{k}-{i}.{fmt}") for i in range(3)] for k in (SMALL, LARGE)}
    rows = {k: {n for n, _ in v} for k, v in runs.items()}
    small, large = (min(p for _, p in runs[k]) for k in (SMALL, LARGE))
    worst = max(p for _, p in runs[LARGE])
    print(f"{fmt}: one tile {one_tile / 2**20:.1f} MiB; export peak {small / one_tile:.2f} tiles for a "
          f"{SMALL}-tile release, {large / one_tile:.2f} tiles for a {LARGE}-tile release (worst of three "
          f"{worst / one_tile:.2f})")
    assert len(rows[SMALL]) == len(rows[LARGE]) == 1 and min(rows[LARGE]) > 2 * min(rows[SMALL])
    assert worst < 4 * one_tile, f"{fmt} export peak {worst / one_tile:.1f} tiles (release of {LARGE})"
    assert large < 1.25 * small, f"{fmt} export peak grows with the release: {small} -> {large} bytes"
