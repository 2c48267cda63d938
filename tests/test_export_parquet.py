"""Parquet export: units, descriptions and UCDs in the schema (per field and as one JSON blob),
one row group per tile, readable by pyarrow and pandas with every value intact."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_export_common import NZ, Z_GRID, make_store, stored_rows
from workflows.export import REQUIRED, export_catalog


@pytest.fixture
def exported(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=4, rows=[80, 0, 130, 60])
    dest = tmp_path / "cat.parquet"
    n = export_catalog(store.out, "parquet", dest)
    return store, dest, n


def test_schema_carries_units_descriptions_and_ucds(exported):
    _, dest, _ = exported
    schema = pq.read_schema(dest)
    assert schema.names[: len(REQUIRED)] == list(REQUIRED)
    for f in schema:
        meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
        assert set(meta) >= {"unit", "description", "ucd"}, f.name
        assert meta["description"], f.name
    field = {f.name: {k.decode(): v.decode() for k, v in f.metadata.items()} for f in schema}
    assert field["coord_ra"] == {"unit": "deg", "description": "right ascension (ICRS)", "ucd": "pos.eq.ra;meta.main"}
    assert field["g_kronFlux"]["unit"] == "nJy" and field["g_kronFlux"]["ucd"] == "phot.flux"
    blob = json.loads(schema.metadata[b"surveypipe.columns"])
    assert list(blob) == schema.names
    assert blob["r_kronFluxErr"] == {"unit": "nJy", "description": "error of r_kronFlux (1σ, nJy⁻¹ free)",
                                     "ucd": "stat.error;phot.flux", "dtype": "<f4", "shape": []}
    assert blob["photoz_pdf"]["shape"] == [NZ]
    attrs = json.loads(schema.metadata[b"surveypipe.table_attrs"])
    assert attrs["photoz"]["z_grid"] == pytest.approx(Z_GRID.tolist()) and attrs["objects"]["flag_bits"]["edge"] == 3
    export = json.loads(schema.metadata[b"surveypipe.export"])
    assert export["release"]["release"] == "synthetic" and export["tiles"] == 4 and export["primary_only"] is True


def test_pyarrow_reads_every_value(exported):
    store, dest, n = exported
    f = pq.ParquetFile(dest)
    assert f.metadata.num_rows == n and f.metadata.num_row_groups == 3, "one row group per non-empty tile"
    t = f.read()
    ref = stored_rows(store)
    assert t.schema.field("photoz_pdf").type == pa.list_(pa.float32(), NZ)
    assert t.schema.field("tile_id").type == pa.string()
    pdf = t["photoz_pdf"].combine_chunks().flatten().to_numpy().reshape(n, NZ)
    assert np.array_equal(pdf, ref["photoz_pdf"])
    for c in ref:
        if c == "photoz_pdf":
            continue
        got = t[c].to_numpy(zero_copy_only=False)
        assert np.array_equal(got, ref[c]), c
        if c != "tile_id":
            assert got.dtype == ref[c].dtype, c


def test_pandas_reads_it(exported):
    import pandas as pd

    store, dest, n = exported
    df = pd.read_parquet(dest)
    assert len(df) == n and list(df.columns[: len(REQUIRED)]) == list(REQUIRED)
    assert df["flags"].dtype == np.uint32 and df["detect_isPrimary"].all()
    assert len(df["photoz_pdf"].iloc[0]) == NZ
    assert df["objectId"].is_unique


def test_all_rows_and_columns_options(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=2, rows=100)
    dest = tmp_path / "all.parquet"
    n = export_catalog(store.out, "parquet", dest, primary_only=False, columns=["photoz_median"])
    t = pq.read_table(dest)
    assert n == 200 == t.num_rows and not t["detect_isPrimary"].to_numpy().all()
    assert t.column_names == list(REQUIRED) + ["g_kronFlux", "g_kronFluxErr", "r_kronFlux", "r_kronFluxErr",
                                               "photoz_median"]
