"""Export a run's catalogue: merge tiles, keep each object once, write FITS or Parquet.

Streams tile by tile (memory bounded by one tile's table), writes to a temporary name and
renames it into place only after the row count matches the store.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.errors import SurveypipeError
from pipeline.store import CatalogStore
from pipeline.table import ColumnInfo, Table

PRODUCT = "objects"
EXTRA_PRODUCTS = ("photoz", "morphology", "lenses")


def tile_tables(out: str | Path, *, primary_only: bool = True, columns: list[str] | None = None,
                where: str | None = None) -> Iterator[Table]:
    """One merged table per complete tile: photometry plus any downstream per-object products."""
    store = CatalogStore(out)
    for tid in store.tile_ids():
        if not store.is_complete(tid):
            continue
        prods = store.stored_products(tid)
        if PRODUCT not in prods:
            continue
        t = store.read_table(tid, PRODUCT)
        for extra in EXTRA_PRODUCTS:
            if extra in prods:
                e = store.read_table(tid, extra)
                e.columns.pop("objectId", None)
                t = t.merged(e)
        t.add("tile_id", np.array([tid] * len(t), dtype=f"U{max(len(tid), 1)}"), "", "id of the tile the object was measured on", "meta.id")
        if primary_only and "detect_isPrimary" in t:
            t = t.select(t["detect_isPrimary"])
        if where:
            t = t.select(_where(t, where))
        if columns:
            missing = [c for c in columns if c not in t]
            if missing:
                raise KeyError(f"unknown column(s) {missing}")
            t = Table({c: t[c] for c in columns}, {c: t.info.get(c, ColumnInfo()) for c in columns})
        yield t


def _where(t: Table, expr: str) -> np.ndarray:
    ns = {k: v for k, v in t.columns.items()} | {"np": np}
    try:
        sel = eval(compile(expr, "<where>", "eval"), {"__builtins__": {}}, ns)  # noqa: S307 - columns only
    except Exception as exc:
        raise ValueError(f"--where {expr!r}: {exc}") from exc
    return np.asarray(sel, bool)


def export_catalog(out: str | Path, fmt: str, dest: str | Path, *, columns: list[str] | None = None,
                   where: str | None = None, primary_only: bool = True) -> int:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tables = tile_tables(out, primary_only=primary_only, columns=columns, where=where)
    writers = {"fits": _write_fits, "parquet": _write_parquet}
    if fmt not in writers:
        from . import export_formats  # HATS / VOTable writers

        return export_formats.export(out, fmt, dest, tables)
    n = writers[fmt](tables, tmp)
    os.replace(tmp, dest)
    return n


def _structured(t: Table) -> np.ndarray:
    dt = []
    for k, v in t.columns.items():
        dt.append((k, v.dtype, v.shape[1:]) if v.ndim > 1 else (k, v.dtype))
    arr = np.empty(len(t), dtype=dt)
    for k, v in t.columns.items():
        arr[k] = v
    return arr


def _write_fits(tables: Iterable[Table], path: Path) -> int:
    import fitsio

    if path.exists():
        path.unlink()
    n = 0
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        first: Table | None = None
        for t in tables:
            if not len(t):
                if first is None:
                    first = t
                continue
            data = _structured(t)
            if n == 0:
                units = [t.info.get(k, ColumnInfo()).unit for k in t.columns]
                f.write(data, extname="OBJECTS", units=units)
                hdu = f[-1]
                for i, k in enumerate(t.columns, start=1):
                    desc = t.info.get(k, ColumnInfo()).description
                    if desc:
                        hdu.write_key(f"TCOMM{i}", desc[:68])
                first = t
            else:
                f[-1].append(data)
            n += len(t)
        if n == 0:
            raise SurveypipeError(f"nothing to export from the store (no complete tile with objects)")
    return n


def _write_parquet(tables: Iterable[Table], path: Path) -> int:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    n = 0
    try:
        for t in tables:
            cols, fields = [], []
            for k, v in t.columns.items():
                info = t.info.get(k, ColumnInfo())
                arr = pa.array(list(v)) if v.ndim > 1 else pa.array(v)
                cols.append(arr)
                fields.append(pa.field(k, arr.type, metadata={"unit": info.unit, "description": info.description, "ucd": info.ucd}))
            schema = pa.schema(fields, metadata={"surveypipe.columns": json.dumps(t.info_dict())})
            if writer is None:
                writer = pq.ParquetWriter(str(path), schema)
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            n += len(t)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise SurveypipeError("nothing to export from the store (no complete tile with objects)")
    return n
