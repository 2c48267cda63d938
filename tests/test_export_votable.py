"""VOTable export: astropy reads it back with every value, units, descriptions and UCDs for
positions and fluxes; the base64 stream stays valid when appended tile by tile."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from test_export_common import NZ, make_store, stored_rows
from workflows import export_formats
from workflows.export import REQUIRED, export_catalog, iter_tiles, plan_export


@pytest.fixture
def exported(tmp_path):
    # tiles of uneven sizes (and an empty one) so row bytes straddle the base64 chunks of the writer
    store = make_store(tmp_path / "run", n_tiles=7, rows=[211, 0, 1, 97, 305, 13, 150], seed=170)
    dest = tmp_path / "cat.vot"
    n = export_catalog(store.out, "votable", dest)
    return store, dest, n


def test_astropy_reads_every_value(exported):
    from astropy.table import Table

    store, dest, n = exported
    t = Table.read(dest, format="votable")
    ref = stored_rows(store)
    assert len(t) == n == len(ref["objectId"])
    assert t.colnames[: len(REQUIRED)] == list(REQUIRED)
    assert list(t["tile_id"]) == list(ref["tile_id"])
    assert t["photoz_pdf"].shape == (n, NZ)
    for c in ref:
        if c == "tile_id":
            continue
        got = np.ma.filled(np.ma.asarray(t[c]), np.nan) if t[c].dtype.kind == "f" else np.asarray(t[c])
        assert np.array_equal(got, ref[c], equal_nan=got.dtype.kind == "f"), c
    assert (np.asarray(t["flags"], np.int64) == ref["flags"].astype(np.int64)).all(), "uint32 kept in a long"


def test_ucds_units_and_descriptions(exported):
    from astropy.io.votable import parse
    from astropy.io.votable.ucd import check_ucd
    from astropy.table import Table

    _, dest, _ = exported
    t = Table.read(dest, format="votable")
    assert t["coord_ra"].meta["ucd"] == "pos.eq.ra;meta.main"
    assert t["coord_dec"].meta["ucd"] == "pos.eq.dec;meta.main"
    assert t["g_kronFlux"].meta["ucd"] == "phot.flux" and t["r_ap03Flux"].meta["ucd"] == "phot.flux"
    assert t["g_kronFluxErr"].meta["ucd"] == "stat.error;phot.flux"
    assert t["objectId"].meta["ucd"] == "meta.id;meta.main"
    assert str(t["g_kronFlux"].unit) == "nJy" and str(t["coord_ra"].unit) == "deg"
    assert t["coord_ra"].description == "right ascension (ICRS)"
    vt = parse(str(dest))
    for f in vt.get_first_table().fields:
        if f.ucd:
            assert check_ucd(f.ucd, check_controlled_vocabulary=True), (f.name, f.ucd)
    infos = {i.name: i.value for i in vt.resources[0].infos}
    assert '"release": "synthetic"' in infos["surveypipe_export"]


def test_strict_votable_parse_and_row_count(exported):
    from astropy.io.votable import parse

    store, dest, n = exported
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any VOTable spec warning fails the test
        vt = parse(str(dest), verify="exception")
    assert len(vt.get_first_table().array) == n
    assert export_formats.count_votable_rows(dest, plan_export(store.out)) == n


def test_multidimensional_column_arraysize(tmp_path):
    from astropy.table import Table

    from pipeline.store import CatalogStore

    store = make_store(tmp_path / "run", n_tiles=1, rows=40, photoz=True)
    p = store.read_table("s000", "photoz")
    p.add("photoz_cov", np.arange(40 * 6, dtype=np.float32).reshape(40, 2, 3), "", "a 2x3 matrix per object")
    CatalogStore(store.out).commit_tile("s000", {"objects": store.read_table("s000", "objects"), "photoz": p}, {})
    dest = tmp_path / "cat.vot"
    export_catalog(store.out, "votable", dest, primary_only=False)
    t = Table.read(dest, format="votable")
    assert t["photoz_cov"].shape == (40, 2, 3)
    assert np.array_equal(np.asarray(t["photoz_cov"]), np.arange(240, dtype=np.float32).reshape(40, 2, 3))


def test_numpy_packing_is_byte_identical_to_astropy(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=2, rows=[1500, 700], missing_band_tile=1, seed=171)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_export(store.out)
    dtype = export_formats._binary2_dtype(plan)
    for _, t in iter_tiles(plan):  # the NaN-filled band included
        ours = bytes(export_formats._binary2_rows(plan, t, dtype))
        theirs = export_formats._stream_bytes(export_formats._votable_xml(plan, t, header=False))
        assert ours == theirs
