"""HATS export through hats-import on a Dask cluster: LSDB opens it, and its cone search returns
exactly the rows a brute-force angular-distance selection picks from the same store."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster

from test_export_common import make_store, stored_rows
from workflows import export_formats
from workflows.export import REQUIRED, export_catalog

lsdb = pytest.importorskip("lsdb")
pytest.importorskip("hats_import")


def separation_arcsec(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(s))) * 3600


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c, Client(c) as cl:
        yield cl


@pytest.fixture(scope="module")
def hats_export(tmp_path_factory, client):
    """8 tiles on a 4x2 grid straddling RA = 0/360, split into several HATS partitions."""
    root = tmp_path_factory.mktemp("hats")
    store = make_store(root / "run", n_tiles=8, rows=600, seed=180, spread_deg=0.6, half_width_deg=0.35,
                       ra_origin=359.4)
    mp = pytest.MonkeyPatch()
    mp.setattr(export_formats, "HATS_PARTITION_BYTES", 60_000)  # ~300 rows: force several partitions
    mp.setattr(export_formats, "HATS_MAX_ORDER", 8)
    try:
        dest = root / "catalog_hats"
        n = export_catalog(store.out, "hats", dest, client=client)
    finally:
        mp.undo()
    return store, dest, n


def test_lsdb_opens_it_with_every_row_and_column(hats_export):
    store, dest, n = hats_export
    cat = lsdb.open_catalog(dest)
    assert cat.get_healpix_pixels().__len__() > 1, "the test wants a catalogue of several partitions"
    df = cat.compute()
    ref = stored_rows(store)
    assert len(df) == n == len(ref["objectId"])
    assert list(df.columns[: len(REQUIRED)]) == list(REQUIRED)
    order = np.argsort(df["objectId"].to_numpy())
    ref_order = np.argsort(ref["objectId"])
    for c in ("objectId", "coord_ra", "coord_dec", "g_kronFlux", "flags"):
        assert np.array_equal(df[c].to_numpy()[order], ref[c][ref_order]), c
    assert cat.hc_structure.catalog_info.total_rows == n


def test_cone_search_matches_brute_force(hats_export):
    store, dest, _ = hats_export
    cat = lsdb.open_catalog(dest)
    ref = stored_rows(store)
    rng = np.random.default_rng(181)
    assert ref["coord_ra"].min() < 1 and ref["coord_ra"].max() > 359, "the release straddles RA = 0"
    centres = [(359.9, 2.0, 900.0), (0.1, 2.6, 1500.0), (0.6, 2.3, 2400.0), (359.4, 2.0, 600.0)]
    centres += [(float(rng.uniform(-0.2, 1.6)) % 360, float(rng.uniform(1.8, 2.8)), 1200.0) for _ in range(2)]
    for ra, dec, radius in centres:
        got = np.sort(cat.cone_search(ra, dec, radius).compute()["objectId"].to_numpy())
        d = separation_arcsec(ra, dec, ref["coord_ra"], ref["coord_dec"])
        want = np.sort(ref["objectId"][d <= radius])
        assert len(want) > 10, "the cone must hold objects to be a test"
        assert np.array_equal(got, want), (ra, dec, radius, len(got), len(want))


def test_units_travel_into_the_hats_parquet(hats_export):
    _, dest, _ = hats_export
    schema = pq.read_schema(next((dest / "dataset").rglob("*.parquet")))
    meta = {k.decode(): v.decode() for k, v in schema.field("g_kronFlux").metadata.items()}
    assert meta["unit"] == "nJy" and meta["ucd"] == "phot.flux"
    assert "coord_ra" in json.loads(schema.metadata[b"surveypipe.columns"])
    assert not list(dest.parent.glob(".catalog_hats.tmp-*")), "staging removed"


def test_own_local_cluster_and_replacing_an_older_catalogue(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=2, rows=50, seed=182)
    dest = tmp_path / "cat_hats"
    n1 = export_catalog(store.out, "hats", dest, primary_only=False)  # no client given: a LocalCluster of its own
    n2 = export_catalog(store.out, "hats", dest)  # replaces the first one in place
    assert n1 == 100 and n2 < n1
    assert len(lsdb.open_catalog(dest).compute()) == n2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_hats", "run"]
