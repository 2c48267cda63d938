"""Shared fixtures of the export tests (a synthetic store written without running the pipeline),
and tests of what every format shares: planning, --where, --columns, de-duplication, id
collisions, the row-count check and publishing."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.ids import object_ids
from pipeline.store import CatalogStore
from pipeline.table import Table
from workflows import export as ex

BANDS = ("g", "r")
NZ = 12
Z_GRID = np.linspace(0.0, 3.0, NZ)


def objects_table(tid: str, n: int, rng: np.random.Generator, *, bands=BANDS, ra0: float = 150.0,
                  dec0: float = 2.0, half_width_deg: float = 0.05, primary_fraction: float = 0.8) -> Table:
    """An ``objects`` table like the photometry stage's, with random but valid values."""
    t = Table()
    t.add("objectId", object_ids(tid, n), "", "unique object id", "meta.id;meta.main")
    t.add("x", rng.uniform(0, 512, n), "pix", "centroid x (0-based)", "pos.cartesian.x")
    t.add("y", rng.uniform(0, 512, n), "pix", "centroid y (0-based)", "pos.cartesian.y")
    dec = dec0 + rng.uniform(-half_width_deg, half_width_deg, n)
    ra = (ra0 + rng.uniform(-half_width_deg, half_width_deg, n) / np.cos(np.radians(dec))) % 360.0
    t.add("coord_ra", ra, "deg", "right ascension (ICRS)", "pos.eq.ra;meta.main")
    t.add("coord_dec", dec, "deg", "declination (ICRS)", "pos.eq.dec;meta.main")
    t.add("detect_isPrimary", rng.random(n) < primary_fraction, "", "inside the tile's inner region")
    for b in bands:
        f = rng.lognormal(8, 1, n).astype(np.float32)
        t.add(f"{b}_kronFlux", f, "nJy", f"Kron flux, {b} band", "phot.flux")
        t.add(f"{b}_kronFluxErr", (0.05 * f).astype(np.float32), "nJy", f"error of {b}_kronFlux (1σ, nJy⁻¹ free)",
              "stat.error;phot.flux")
        t.add(f"{b}_ap03Flux", f * np.float32(0.7), "nJy", f"3-pixel aperture flux, {b} band")
    t.add("flags", rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32), "", "object flags")
    t.add("deblend_nChild", rng.integers(0, 5, n).astype(np.int8), "", "number of children")
    t.attrs["flag_bits"] = {"blended": 0, "edge": 3}
    return t


def photoz_table(objects: Table, rng: np.random.Generator) -> Table:
    n = len(objects)
    pdf = rng.random((n, NZ)).astype(np.float32)
    pdf /= pdf.sum(axis=1, keepdims=True)
    t = Table()
    t.add("objectId", objects["objectId"], "", "unique object id")
    t.add("photoz_median", (pdf.cumsum(axis=1) < 0.5).sum(axis=1).astype(np.float32) * np.float32(Z_GRID[1]), "",
          "median photometric redshift")
    t.add("photoz_pdf", pdf, "", "p(z) on the stored redshift grid")
    t.attrs["z_grid"] = Z_GRID.tolist()
    return t


def make_store(out: Path, n_tiles: int = 3, rows: int = 200, *, seed: int = 160, photoz: bool = True,
               missing_band_tile: int | None = None, spread_deg: float = 0.3, ra_origin: float = 150.0,
               **kw) -> CatalogStore:
    """A run directory with ``n_tiles`` complete tiles (objects, optionally photoz)."""
    rng = np.random.default_rng(seed)
    store = CatalogStore(out)
    store.init({"release": "synthetic", "manifest_sha256": "0" * 64, "bands": list(BANDS), "code_version": "test",
                "config_digest": "abc"})
    for i in range(n_tiles):
        tid = f"s{i:03d}"
        bands = BANDS[:1] if i == missing_band_tile else BANDS
        n = rows if isinstance(rows, int) else rows[i]
        obj = objects_table(tid, n, rng, bands=bands, ra0=ra_origin + spread_deg * (i % 4),
                            dec0=2.0 + spread_deg * (i // 4), **kw)
        products = {"objects": obj}
        if photoz:
            products["photoz"] = photoz_table(obj, rng)
        store.commit_tile(tid, products, {"tile_id": tid})
    return store


def stored_rows(store: CatalogStore, primary_only: bool = True) -> dict[str, np.ndarray]:
    """Every exported column straight from the store (the brute-force reference)."""
    parts: dict[str, list[np.ndarray]] = {}
    for tid in store.tile_ids():
        t = store.read_table(tid, "objects")
        if "photoz" in store.stored_products(tid):
            p = store.read_table(tid, "photoz")
            p.columns.pop("objectId")
            t = t.merged(p)
        sel = t["detect_isPrimary"] if primary_only else np.ones(len(t), bool)
        for c in t:
            parts.setdefault(c, []).append(t[c][sel])
        parts.setdefault("tile_id", []).append(np.array([tid] * int(sel.sum())))
    return {c: np.concatenate(v) for c, v in parts.items()}


@pytest.fixture
def store3(tmp_path) -> CatalogStore:
    return make_store(tmp_path / "run", n_tiles=3, rows=[150, 0, 220])


# ------------------------------------------------------------------------------ planning
def test_plan_orders_required_columns_first_and_counts_primary_rows(store3):
    plan = ex.plan_export(store3.out)
    assert plan.names[:11] == ["objectId", "tile_id", "x", "y", "coord_ra", "coord_dec", "detect_isPrimary",
                               "g_kronFlux", "g_kronFluxErr", "r_kronFlux", "r_kronFluxErr"]
    assert "photoz_pdf" in plan.names and plan.column("photoz_pdf").shape == (NZ,)
    ref = stored_rows(store3)
    assert plan.expected_rows == len(ref["objectId"]) > 0
    assert ex.plan_export(store3.out, primary_only=False).expected_rows == 150 + 0 + 220
    assert plan.column("tile_id").dtype == np.dtype("U4")
    assert plan.column("coord_ra").info.ucd == "pos.eq.ra;meta.main"
    assert plan.column("g_ap03Flux").info.ucd == "phot.flux", "UCD filled in from the column name"


def test_columns_option_always_keeps_the_required_columns(store3):
    plan = ex.plan_export(store3.out, columns=["photoz_median", "flags", "x"])
    assert plan.names == list(ex.REQUIRED) + ["g_kronFlux", "g_kronFluxErr", "r_kronFlux", "r_kronFluxErr",
                                              "photoz_median", "flags"]
    with pytest.raises(ex.ExportError, match=r"unknown column\(s\) \['nope'\]; available: objectId"):
        ex.plan_export(store3.out, columns=["nope"])


def test_tile_missing_a_band_is_filled_with_nan_and_warned(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=3, missing_band_tile=1, photoz=False)
    with pytest.warns(ex.ExportWarning, match=r"r_kronFlux: 1 tile\(s\), e\.g\. 's001'"):
        plan = ex.plan_export(store.out)
    tables = dict(ex.iter_tiles(plan))
    assert np.isnan(tables["s001"]["r_kronFlux"]).all() and np.isfinite(tables["s000"]["r_kronFlux"]).all()


def test_empty_or_missing_store(tmp_path):
    with pytest.raises(ex.ExportError, match=r"holds no catalogue store"):
        ex.plan_export(tmp_path / "nothing")
    store = CatalogStore(tmp_path / "run")
    store.init({"release": "x"})
    store.record_failure("t1", {"kind": "bad_input", "error": "tile 't1': truncated"})
    with pytest.raises(ex.ExportError, match=r"no complete tile .* \(1 tile\(s\) failed or incomplete\)"):
        ex.plan_export(store.out)


def test_failed_tiles_are_named_in_a_warning(store3, tmp_path):
    store3.record_failure("bad1", {"kind": "bad_input", "error": "tile 'bad1', file 'x.fits': truncated"})
    with pytest.warns(ex.ExportWarning, match=r"1 tile\(s\) are not in the export: bad1: failed: tile 'bad1'"):
        ex.export_catalog(store3.out, "parquet", tmp_path / "c.parquet")


# ------------------------------------------------------------------------------ --where
@pytest.mark.parametrize("expr, expect", [
    ("g_kronFlux > 3000", lambda c: c["g_kronFlux"] > 3000),
    ("(g_kronFlux > 3000) & (r_kronFlux < 5000)", lambda c: (c["g_kronFlux"] > 3000) & (c["r_kronFlux"] < 5000)),
    ("g_kronFlux > 3000 and not flags & 1", lambda c: (c["g_kronFlux"] > 3000) & ~((c["flags"] & 1) != 0)),
    ("1000 < g_kronFlux <= 4000", lambda c: (c["g_kronFlux"] > 1000) & (c["g_kronFlux"] <= 4000)),
    ("-2.5 * log10(g_kronFlux) + 31.4 < 23", lambda c: -2.5 * np.log10(c["g_kronFlux"]) + 31.4 < 23),
    ("np.isfinite(photoz_median) | ~detect_isPrimary", lambda c: np.isfinite(c["photoz_median"]) | ~c["detect_isPrimary"]),
])
def test_where_selects_the_same_rows_as_numpy(store3, expr, expect):
    plan = ex.plan_export(store3.out, where=expr)
    assert plan.expected_rows is None
    got = np.concatenate([t["objectId"] for _, t in ex.iter_tiles(plan)])
    ref = stored_rows(store3)
    assert np.array_equal(got, ref["objectId"][expect(ref)])


@pytest.mark.parametrize("expr, reason", [
    ("__import__('os').system('true')", r"is not allowed"),
    ("g_kronFlux.__class__", r"is not allowed"),
    ("nope > 1", r"unknown column 'nope'"),
    ("g_kronFlux >", r"not an expression"),
    ("[x for x in y]", r"is not allowed"),
])
def test_where_refuses_anything_but_columns_and_arithmetic(store3, expr, reason):
    with pytest.raises(ex.ExportError, match=reason):
        ex.plan_export(store3.out, where=expr)


def test_where_must_give_booleans(store3):
    plan = ex.plan_export(store3.out, where="g_kronFlux + 1")
    with pytest.raises(ex.ExportError, match=r"gives float32 values, not true/false"):
        list(ex.iter_tiles(plan))


# ------------------------------------------------------------------------------ merging
def test_overlap_duplicates_are_kept_once(tmp_path):
    """Objects seen by two overlapping tiles: each tile marks only its inner-region copy primary."""
    rng = np.random.default_rng(161)
    store = CatalogStore(tmp_path / "run")
    store.init({"release": "overlap", "bands": list(BANDS)})
    sky = objects_table("sky", 300, rng)  # one set of true objects
    inner_a = sky["coord_ra"] < 150.0  # tile a owns the west half, tile b the east half
    for tid, rows, owns in (("a", sky["coord_ra"] < 150.01, inner_a), ("b", sky["coord_ra"] > 149.99, ~inner_a)):
        t = sky.select(rows)
        t.columns["objectId"] = object_ids(tid, len(t))
        t.columns["detect_isPrimary"] = owns[rows]
        store.commit_tile(tid, {"objects": t}, {})
    dest = tmp_path / "c.parquet"
    n = ex.export_catalog(store.out, "parquet", dest)
    import pyarrow.parquet as pq

    got = pq.read_table(dest)
    assert n == len(sky) == got.num_rows, "every object once, none lost in the overlap"
    assert np.array_equal(np.sort(got["coord_ra"].to_numpy()), np.sort(sky["coord_ra"]))
    assert ex.export_catalog(store.out, "parquet", dest, primary_only=False) > len(sky)


def test_object_id_collision_across_tiles_is_refused(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=2, photoz=False)
    t = store.read_table("s000", "objects")
    clash = store.read_table("s001", "objects")
    clash.columns["objectId"] = t["objectId"][: len(clash)].copy()  # as if two tile keys collided
    store.commit_tile("s001", {"objects": clash}, {})
    dest = tmp_path / "c.fits"
    with pytest.raises(ex.ObjectIdCollisionError,
                       match=r"objectId collision: tiles 's000' and 's001' share 200 objectId\(s\) \(e\.g\. \d+\)"):
        ex.export_catalog(store.out, "fits", dest)
    assert not dest.exists() and list(tmp_path.glob(".c.fits*")) == []


def test_object_id_repeated_inside_a_tile_is_refused(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=1, photoz=False)
    t = store.read_table("s000", "objects")
    t.columns["objectId"][5] = t["objectId"][4]
    store.commit_tile("s000", {"objects": t}, {})
    with pytest.raises(ex.ObjectIdCollisionError, match=r"tile 's000': objectId \d+ appears 2 times"):
        ex.export_catalog(store.out, "parquet", tmp_path / "c.parquet")


def test_ids_with_foreign_high_bits_are_compared_exactly(tmp_path):
    """Ids not made by pipeline.ids (a shared high-bit prefix) pass when they do not really collide."""
    store = make_store(tmp_path / "run", n_tiles=2, rows=100, photoz=False)
    for i, tid in enumerate(("s000", "s001")):
        t = store.read_table(tid, "objects")
        t.columns["objectId"] = np.arange(100, dtype=np.int64) + 1000 * i
        store.commit_tile(tid, {"objects": t}, {})
    assert ex.export_catalog(store.out, "parquet", tmp_path / "c.parquet", primary_only=False) == 200


# ------------------------------------------------------------------------------ publishing
@pytest.mark.parametrize("fmt", ["fits", "parquet", "votable"])
def test_row_count_mismatch_publishes_nothing_and_keeps_the_old_file(store3, tmp_path, monkeypatch, fmt):
    dest = tmp_path / f"cat.{fmt}"
    dest.write_text("previous export")
    real = ex.iter_tiles

    def lossy(plan):  # a tile that loses rows between planning and reading (e.g. a concurrent rerun)
        for tid, t in real(plan):
            yield tid, (t.select(np.arange(len(t)) > 0) if tid == "s002" else t)

    monkeypatch.setattr(ex, "iter_tiles", lossy)
    with pytest.raises(ex.RowCountError, match=r"row count check failed, nothing published: the store has \d+ row"):
        ex.export_catalog(store3.out, fmt, dest)
    assert dest.read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", dest.name])


def test_unknown_format_and_wrong_kind_of_destination(store3, tmp_path):
    with pytest.raises(ex.ExportError, match=r"unknown format 'csv'"):
        ex.export_catalog(store3.out, "csv", tmp_path / "c.csv")
    (tmp_path / "dir.fits").mkdir()
    with pytest.raises(ex.ExportError, match=r"exists and is a directory; a fits export writes a file"):
        ex.export_catalog(store3.out, "fits", tmp_path / "dir.fits")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    with pytest.raises(ex.ExportError, match=r"non-empty directory that is not a HATS catalogue"):
        ex.export_catalog(store3.out, "hats", tmp_path / "notes")


def test_ascii_text_for_fits_headers():
    assert ex.ascii_text("error (1σ) in nJy⁻²·arcsec²") == "error (1sigma) in nJy-2.arcsec2"
    assert ex.ascii_text("é\tx") == "ex"
