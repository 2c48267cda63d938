"""Export a run's catalogue: merge tiles, keep each object once, write FITS, Parquet, HATS or VOTable.

The export is planned from the store's metadata alone (which tiles, which columns with which
dtype, unit, description and UCD, how many rows to expect), then streamed tile by tile: one
tile's table is in memory at a time, whatever the size of the release. Every format is written
under a temporary name next to the destination and renamed into place only after the rows in
the written file match the store (sum of ``detect_isPrimary`` over the complete tiles, or of
all rows with ``primary_only=False``). Object ids shared by two tiles are refused.

FITS and Parquet writers live here; HATS and VOTable in :mod:`workflows.export_formats`.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import unicodedata
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pipeline.errors import SurveypipeError
from pipeline.ids import LOCAL_BITS
from pipeline.store import CatalogStore
from pipeline.table import ColumnInfo, Table

PRODUCT = "objects"
EXTRA_PRODUCTS = ("photoz", "morphology", "lenses")  # per-object tables, same rows and order as objects
REQUIRED = ("objectId", "tile_id", "x", "y", "coord_ra", "coord_dec", "detect_isPrimary")
FORMATS = ("fits", "parquet", "hats", "votable")
KRON = re.compile(r"^(?P<band>.+)_kronFlux(?P<err>Err)?$")

# UCDs (IVOA UCD1+) of columns whose producer left the UCD empty
_UCD_BY_NAME = {
    "objectId": "meta.id;meta.main",
    "tile_id": "meta.id;obs.field",
    "parentObjectId": "meta.id.parent",
    "x": "pos.cartesian.x;instr.det",
    "y": "pos.cartesian.y;instr.det",
    "coord_ra": "pos.eq.ra;meta.main",
    "coord_dec": "pos.eq.dec;meta.main",
    "detect_isPrimary": "meta.code",
    "flags": "meta.code",
}
_UCD_BY_SUFFIX = (("FluxErr", "stat.error;phot.flux"), ("Flux", "phot.flux"))
_COLUMN_INFO = {
    "tile_id": ColumnInfo("", "id of the tile the object was measured on", "meta.id;obs.field"),
}


class ExportError(SurveypipeError):
    """The catalogue cannot be exported as asked (nothing to export, bad column, ...)."""

    kind = "export"


class ObjectIdCollisionError(ExportError):
    """Two rows of the store share one ``objectId``: the catalogue would be ambiguous."""


class RowCountError(ExportError):
    """The written file does not hold the rows the store says it should: nothing published."""


class ExportWarning(UserWarning):
    """The export left something out or filled something in (failed tiles, missing columns)."""


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class OutColumn:
    """One column of the exported table: name, numpy dtype, per-row shape and metadata."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    info: ColumnInfo
    product: str  # the store product it comes from ("" for tile_id, made by the export)


@dataclass
class ExportPlan:
    """What an export will write, worked out from the store's metadata before any row is read."""

    out: Path
    tiles: list[str]
    columns: list[OutColumn]
    primary_only: bool
    where: str | None
    expected_rows: int | None  # from the store; None when --where selects rows
    release: dict[str, Any] = field(default_factory=dict)
    table_attrs: dict[str, Any] = field(default_factory=dict)  # product -> its table attrs (first tile's)
    left_out: dict[str, str] = field(default_factory=dict)  # tile -> why it is not in the export
    products: dict[str, list[str]] = field(default_factory=dict)  # tile -> products read
    available: set[str] = field(default_factory=set)  # every stored column (--where may use any)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> OutColumn:
        return next(c for c in self.columns if c.name == name)

    def metadata(self) -> dict[str, Any]:
        """Small JSON-able provenance written into every format."""
        keys = ("release", "manifest_sha256", "code_version", "config_digest", "bands")
        return {"release": {k: self.release.get(k) for k in keys if k in self.release},
                "tiles": len(self.tiles), "primary_only": self.primary_only, "where": self.where,
                "left_out": self.left_out}


def default_ucd(name: str, ucd: str = "") -> str:
    if ucd:
        return ucd
    if name in _UCD_BY_NAME:
        return _UCD_BY_NAME[name]
    for suffix, u in _UCD_BY_SUFFIX:
        if name.endswith(suffix):
            return u
    return ""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _array_meta(group_dir: Path, col: str) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and per-row shape of a stored column, from its zarr.json (no data read)."""
    meta = _read_json(group_dir / col / "zarr.json")
    dt = meta.get("data_type")
    try:
        dtype = np.dtype(dt) if isinstance(dt, str) else None
    except TypeError:
        dtype = None
    if dtype is None:  # an exotic data type: let zarr interpret it
        import zarr

        dtype = zarr.open_array(group_dir / col, mode="r").dtype
    return dtype, tuple(int(s) for s in meta["shape"][1:])


def _fill_value(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind in "SU":
        return ""
    return 0


def plan_export(out: str | Path, *, columns: list[str] | None = None, where: str | None = None,
                primary_only: bool = True) -> ExportPlan:
    """Work out tiles, columns and the expected row count from the store's metadata."""
    out = Path(out)
    store = CatalogStore(out)
    if not (store.path / "zarr.json").exists():
        raise ExportError(f"{str(out)!r} holds no catalogue store (expected {store.path})")
    release = store.release_attrs()
    failures = store.failures()
    tiles: list[str] = []
    left_out: dict[str, str] = {}
    products: dict[str, list[str]] = {}
    for tid in store.tile_ids():
        if not store.is_complete(tid):
            left_out[tid] = "not complete"
            continue
        stored = store.stored_products(tid)
        if PRODUCT not in stored:
            left_out[tid] = f"no {PRODUCT!r} product (stored: {stored})"
            continue
        tiles.append(tid)
        products[tid] = [PRODUCT] + [p for p in EXTRA_PRODUCTS if p in stored]
    for tid, rec in failures.items():
        if tid not in tiles and tid not in left_out:
            left_out[tid] = f"failed: {rec.get('error', rec.get('kind', 'unknown error'))}"
    if not tiles:
        raise ExportError(f"nothing to export from {str(out)!r}: no complete tile with an {PRODUCT!r} table"
                          + (f" ({len(left_out)} tile(s) failed or incomplete)" if left_out else ""))

    # union of the columns of every tile, in first-seen order; dtypes promoted, shapes must agree
    union: dict[str, OutColumn] = {}
    seen_in: dict[str, set[str]] = {}
    table_attrs: dict[str, Any] = {}
    for tid in tiles:
        for prod in products[tid]:
            gdir = store.tile_path(tid) / prod
            gattrs = _read_json(gdir / "zarr.json").get("attributes", {})
            info = gattrs.get("info", {})
            if gattrs.get("table_attrs"):
                table_attrs.setdefault(prod, gattrs["table_attrs"])
            for col in gattrs.get("columns", []):
                if prod != PRODUCT and col == "objectId":
                    continue
                dtype, shape = _array_meta(gdir, col)
                ci = ColumnInfo(**info.get(col, {}))
                ci = ColumnInfo(ci.unit, ci.description, default_ucd(col, ci.ucd))
                prev = union.get(col)
                if prev is None:
                    union[col] = OutColumn(col, dtype, shape, ci, prod)
                elif prev.product != prod:
                    raise ExportError(f"column {col!r} is provided by both {prev.product!r} and {prod!r} "
                                      f"(tile {tid!r}): rename one of them")
                else:
                    if prev.shape != shape:
                        raise ExportError(f"column {col!r} has per-row shape {shape} in tile {tid!r} but "
                                          f"{prev.shape} in earlier tiles")
                    if prev.dtype != dtype:
                        union[col] = OutColumn(col, np.result_type(prev.dtype, dtype), shape, prev.info, prod)
                seen_in.setdefault(col, set()).add(tid)
    for col in REQUIRED:
        if col == "tile_id":
            continue
        missing = [t for t in tiles if t not in seen_in.get(col, set())]
        if missing:
            raise ExportError(f"tile {missing[0]!r} has no {col!r} column in {PRODUCT!r}"
                              + (f" (nor {len(missing) - 1} other tile(s))" if len(missing) > 1 else "")
                              + ": a catalogue always carries " + ", ".join(REQUIRED))
    width = max(len(t) for t in tiles)
    union["tile_id"] = OutColumn("tile_id", np.dtype(f"U{width}"), (), _COLUMN_INFO["tile_id"], "")

    bands = [str(b) for b in release.get("bands", [])]
    kron = [c for c in union if KRON.match(c)]
    kron.sort(key=lambda c: (bands.index(KRON.match(c)["band"]) if KRON.match(c)["band"] in bands else len(bands),
                             KRON.match(c)["band"], bool(KRON.match(c)["err"])))
    names = list(REQUIRED) + kron
    if columns:
        asked = [c.strip() for c in columns if c.strip()]
        unknown = [c for c in asked if c not in union]
        if unknown:
            raise ExportError(f"unknown column(s) {unknown}; available: {', '.join(union)}")
        names += [c for c in dict.fromkeys(asked) if c not in names]
    else:
        names += [c for c in union if c not in names]
    if where:
        where_names(where, set(union) - {"tile_id"})  # syntax and names, before any work

    partial = {c: sorted(set(tiles) - seen_in.get(c, set())) for c in names if c != "tile_id"}
    partial = {c: t for c, t in partial.items() if t}
    if partial:
        warnings.warn("columns missing from some tiles are filled (NaN for floats, 0/False otherwise): "
                      + "; ".join(f"{c}: {len(t)} tile(s), e.g. {t[0]!r}" for c, t in list(partial.items())[:8]),
                      ExportWarning, stacklevel=2)
    expected = None
    if not where:
        expected = 0
        for tid in tiles:
            if primary_only:
                expected += int(np.count_nonzero(store.read_table(tid, PRODUCT, ["detect_isPrimary"])["detect_isPrimary"]))
            else:
                expected += int(_read_json(store.tile_path(tid) / PRODUCT / "zarr.json")["attributes"]["nrows"])
    return ExportPlan(out, tiles, [union[n] for n in names], primary_only, where, expected, release, table_attrs,
                      left_out, products, set(union) - {"tile_id"})


# ------------------------------------------------------------------------------ --where
_WHERE_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": np.abs, "sqrt": np.sqrt, "log10": np.log10, "log": np.log, "exp": np.exp,
    "isfinite": np.isfinite, "isnan": np.isnan, "hypot": np.hypot,
}
_BINOPS = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.true_divide,
           ast.Pow: np.power, ast.Mod: np.mod, ast.BitAnd: np.bitwise_and, ast.BitOr: np.bitwise_or,
           ast.BitXor: np.bitwise_xor}
_CMPOPS = {ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater, ast.GtE: np.greater_equal,
           ast.Eq: np.equal, ast.NotEq: np.not_equal}


def _parse_where(expr: str) -> ast.Expression:
    try:
        return ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise ExportError(f"--where {expr!r}: not an expression ({exc.msg})") from exc


def _func_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy"):
        return node.attr
    return None


def where_names(expr: str, available: set[str]) -> set[str]:
    """Columns an expression uses; refuses anything but columns, numbers, operators and a few functions."""
    tree = _parse_where(expr)
    used: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Expression):
            visit(node.body)
        elif isinstance(node, ast.BoolOp):
            for v in node.values:
                visit(v)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert, ast.USub, ast.UAdd)):
            visit(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            visit(node.left)
            visit(node.right)
        elif isinstance(node, ast.Compare) and all(type(o) in _CMPOPS for o in node.ops):
            visit(node.left)
            for c in node.comparators:
                visit(c)
        elif isinstance(node, ast.Call) and _func_name(node.func) in _WHERE_FUNCS and not node.keywords:
            for a in node.args:
                visit(a)
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
            pass
        elif isinstance(node, ast.Name):
            if node.id not in available:
                raise ExportError(f"--where {expr!r}: unknown column {node.id!r}")
            used.add(node.id)
        else:
            raise ExportError(f"--where {expr!r}: {ast.unparse(node)!r} is not allowed (use columns, numbers, "
                              f"comparisons, & | ~ and/or/not, + - * / ** and {', '.join(sorted(_WHERE_FUNCS))})")

    visit(tree)
    return used


def evaluate_where(expr: str, columns: dict[str, np.ndarray], n: int) -> np.ndarray:
    """One boolean per row: the rows an expression selects (validated by :func:`where_names`)."""
    tree = _parse_where(expr)

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BoolOp):
            vals = [np.asarray(ev(v), bool) for v in node.values]
            return np.logical_and.reduce(vals) if isinstance(node.op, ast.And) else np.logical_or.reduce(vals)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            if isinstance(node.op, ast.Not):
                return np.logical_not(v)
            if isinstance(node.op, ast.Invert):
                return np.logical_not(v) if np.asarray(v).dtype == bool else np.invert(v)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare):
            left, result = ev(node.left), None
            for op, comp in zip(node.ops, node.comparators):
                right = ev(comp)
                r = _CMPOPS[type(op)](left, right)
                result = r if result is None else np.logical_and(result, r)
                left = right
            return result
        if isinstance(node, ast.Call):
            return _WHERE_FUNCS[_func_name(node.func)](*[ev(a) for a in node.args])  # type: ignore[index]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return columns[node.id]
        raise ExportError(f"--where {expr!r}: cannot evaluate {ast.unparse(node)!r}")

    with np.errstate(all="ignore"):
        sel = np.asarray(ev(tree))
    if sel.dtype != bool:
        raise ExportError(f"--where {expr!r} gives {sel.dtype} values, not true/false")
    sel = np.broadcast_to(sel, (n,)) if sel.ndim == 0 else sel
    if sel.shape != (n,):
        raise ExportError(f"--where {expr!r} gives shape {sel.shape}, not one value per row")
    return sel


# ------------------------------------------------------------------------------ streaming
class IdRegistry:
    """Detects objectIds shared by two tiles while streaming, keeping O(tiles) state.

    Ids are ``tile_key << LOCAL_BITS | row`` (:mod:`pipeline.ids`): the high bits of a tile's ids
    are remembered; only when two tiles share high bits are their ids compared exactly.
    """

    def __init__(self, store: CatalogStore) -> None:
        self.store = store
        self.owner: dict[int, list[str]] = {}

    def add(self, tile: str, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        uniq = np.unique(ids)
        if len(uniq) != len(ids):
            vals, counts = np.unique(ids, return_counts=True)
            dup = int(vals[counts > 1][0])
            raise ObjectIdCollisionError(f"tile {tile!r}: objectId {dup} appears {int(counts[counts > 1][0])} times "
                                         "in one tile; refusing to export an ambiguous catalogue")
        for prefix in np.unique(uniq >> np.int64(LOCAL_BITS)).tolist():
            for other in self.owner.get(prefix, []):
                theirs = self.store.read_table(other, PRODUCT, ["objectId"])["objectId"]
                shared = np.intersect1d(uniq, theirs, assume_unique=True)
                if shared.size:
                    raise ObjectIdCollisionError(
                        f"objectId collision: tiles {other!r} and {tile!r} share {shared.size} objectId(s) "
                        f"(e.g. {int(shared[0])}); ids must be unique across the release (two tile ids whose "
                        "40-bit keys collide, or a stage writing ids of its own?): rename one tile and rerun it")
            self.owner.setdefault(prefix, []).append(tile)


def _read_tile(store: CatalogStore, plan: ExportPlan, tid: str, extra_needed: set[str]) -> Table:
    """The columns this export needs of one tile, all rows, products joined side by side."""
    want = set(plan.names) | extra_needed | {"objectId", "detect_isPrimary"}
    merged: dict[str, np.ndarray] = {}
    ids = None
    for prod in plan.products[tid]:
        gdir = store.tile_path(tid) / prod
        stored = _read_json(gdir / "zarr.json")["attributes"]["columns"]
        cols = [c for c in stored if c in want and (prod == PRODUCT or c != "objectId")]
        if prod != PRODUCT:
            cols = ["objectId"] + cols
        t = store.read_table(tid, prod, cols)
        if prod == PRODUCT:
            ids = t["objectId"]
        elif not np.array_equal(t["objectId"], ids):
            raise ExportError(f"tile {tid!r}: the rows of {prod!r} do not match those of {PRODUCT!r} "
                              "(objectId differs): the product cannot be joined")
        merged.update({c: t[c] for c in cols if not (prod != PRODUCT and c == "objectId")})
    return Table(merged)


def iter_tiles(plan: ExportPlan) -> Iterator[tuple[str, Table]]:
    """Yield (tile id, exported rows) one tile at a time, in tile order, cast to the plan's dtypes."""
    store = CatalogStore(plan.out)
    ids = IdRegistry(store)
    where_cols = where_names(plan.where, plan.available) if plan.where else set()
    for tid in plan.tiles:
        t = _read_tile(store, plan, tid, where_cols)
        n = len(t)
        ids.add(tid, t["objectId"])
        sel = np.ones(n, bool)
        if plan.primary_only:
            sel &= np.asarray(t["detect_isPrimary"], bool)
        if plan.where:
            missing = where_cols - set(t.columns)
            if missing:  # columns this tile lacks take their fill value
                t = Table({**t.columns, **{c: np.full(n, np.nan) for c in missing}})
            sel &= evaluate_where(plan.where, t.columns, n)
        k = int(np.count_nonzero(sel))
        out = Table()
        for c in plan.columns:
            if c.name == "tile_id":
                values = np.full(k, tid, dtype=c.dtype)
            elif c.name in t:
                values = np.asarray(t[c.name][sel], dtype=c.dtype)
            else:
                values = np.full((k, *c.shape), _fill_value(c.dtype), dtype=c.dtype)
            out.columns[c.name] = values
            out.info[c.name] = c.info
        del t
        yield tid, out
        del out  # the consumer holds it now; it must not outlive the next tile's read here


class _Counted:
    """Wraps the tile stream, counting the rows handed to a writer."""

    def __init__(self, it: Iterable[tuple[str, Table]]) -> None:
        self.it, self.rows, self.tiles = iter(it), 0, 0

    def __iter__(self) -> Iterator[Table]:
        for _, t in self.it:
            self.rows += len(t)
            self.tiles += 1
            yield t
            del t  # so that reading the next tile never holds two


# ------------------------------------------------------------------------------ entry point
def export_catalog(out: str | Path, fmt: str, dest: str | Path, *, columns: list[str] | None = None,
                   where: str | None = None, primary_only: bool = True, client: Any = None) -> int:
    """Merge every complete tile into one table and publish it at ``dest``; return the row count.

    ``client``: a ``distributed.Client`` for the HATS import (a small LocalCluster if None).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    plan = plan_export(out, columns=columns, where=where, primary_only=primary_only)
    if plan.left_out:
        warnings.warn(f"{len(plan.left_out)} tile(s) are not in the export: "
                      + "; ".join(f"{t}: {why}" for t, why in list(plan.left_out.items())[:10]),
                      ExportWarning, stacklevel=2)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and (fmt == "hats") != dest.is_dir():
        raise ExportError(f"{str(dest)!r} exists and is a {'directory' if dest.is_dir() else 'file'}; "
                          f"a {fmt} export writes a {'directory' if fmt == 'hats' else 'file'}")
    if fmt == "hats" and dest.exists() and any(dest.iterdir()) and not _looks_like_hats(dest):
        raise ExportError(f"{str(dest)!r} is a non-empty directory that is not a HATS catalogue: not replacing it")
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}")
    stream = _Counted(iter_tiles(plan))
    try:
        if fmt == "fits":
            artefact, written = tmp, _write_fits(plan, stream, tmp)
        elif fmt == "parquet":
            artefact, written = tmp, _write_parquet(plan, stream, tmp)
        else:
            from . import export_formats

            if fmt == "votable":
                artefact, written = tmp, export_formats.write_votable(plan, stream, tmp)
            else:
                artefact, written = export_formats.write_hats(plan, stream, tmp, name=dest.name, client=client)
        in_file = count_rows(fmt, artefact, plan)
        expected = plan.expected_rows if plan.expected_rows is not None else stream.rows
        if not (written == stream.rows == in_file == expected):
            raise RowCountError(f"row count check failed, nothing published: the store has {expected} row(s) to "
                                f"export, {stream.rows} were read, the writer reports {written} and the written "
                                f"{fmt} file holds {in_file}")
        _publish(artefact, dest)
    finally:
        _remove(tmp)
    return written


def count_rows(fmt: str, path: Path, plan: ExportPlan | None = None) -> int:
    """Rows in a written export, read back from the file itself (headers/footers only)."""
    if fmt == "fits":
        import fitsio

        with fitsio.FITS(str(path)) as f:
            return int(f[1].read_header()["NAXIS2"])
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(str(path)).metadata.num_rows)
    from . import export_formats

    if fmt == "votable":
        if plan is None:
            raise ValueError("counting VOTable rows needs the export plan (bytes per row)")
        return export_formats.count_votable_rows(path, plan)
    return export_formats.count_hats_rows(path)


def _looks_like_hats(path: Path) -> bool:
    return (path / "hats.properties").exists() or (path / "properties").exists()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _publish(artefact: Path, dest: Path) -> None:
    """Rename the finished export into place (a directory replaces an older one atomically if possible)."""
    if artefact.is_dir():
        if dest.exists():
            from pipeline.store import _exchange

            if _exchange(artefact, dest):
                return  # artefact now holds the old catalogue; the caller removes it
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(dest, old)
            os.rename(artefact, dest)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(artefact, dest)


# ------------------------------------------------------------------------------ shared helpers
_ASCII = str.maketrans({"σ": "sigma", "μ": "mu", "α": "alpha", "δ": "delta", "λ": "lambda", "χ": "chi",
                        "²": "2", "³": "3", "⁻": "-", "¹": "1", "×": "x", "·": ".", "–": "-", "—": "-",
                        "≥": ">=", "≤": "<=", "°": "deg", "″": "arcsec", "′": "arcmin", "±": "+/-", "≈": "~"})


def ascii_text(text: str) -> str:
    """Printable ASCII for FITS header values (units and descriptions may hold Unicode)."""
    text = unicodedata.normalize("NFKD", str(text).translate(_ASCII))
    return "".join(ch for ch in text.encode("ascii", "ignore").decode() if 32 <= ord(ch) < 127)


def column_metadata(plan: ExportPlan) -> dict[str, dict[str, Any]]:
    return {c.name: {"unit": c.info.unit, "description": c.info.description, "ucd": c.info.ucd,
                     "dtype": c.dtype.str, "shape": list(c.shape)} for c in plan.columns}


def arrow_schema(plan: ExportPlan):
    """The Arrow schema of an export: units, descriptions and UCDs per field and as one JSON blob."""
    import pyarrow as pa

    fields = []
    for c in plan.columns:
        if c.dtype.kind == "U":
            typ = pa.string()
        else:
            typ = pa.from_numpy_dtype(c.dtype)
            if c.shape:
                typ = pa.list_(typ, int(np.prod(c.shape)))
        meta = {"unit": c.info.unit, "description": c.info.description, "ucd": c.info.ucd}
        if len(c.shape) > 1:
            meta["shape"] = json.dumps(list(c.shape))
        fields.append(pa.field(c.name, typ, metadata=meta))
    meta = {"surveypipe.columns": json.dumps(column_metadata(plan)),
            "surveypipe.export": json.dumps(plan.metadata(), default=str),
            "surveypipe.table_attrs": json.dumps(plan.table_attrs, default=str)}
    return pa.schema(fields, metadata=meta)


def arrow_table(plan: ExportPlan, t: Table, schema=None):
    """One tile's rows as an Arrow table (2-D columns as fixed-size lists, no Python lists)."""
    import pyarrow as pa

    schema = schema if schema is not None else arrow_schema(plan)
    arrays = []
    for c, f in zip(plan.columns, schema):
        v = t[c.name]
        if c.shape:
            flat = pa.array(np.ascontiguousarray(v).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, int(np.prod(c.shape))))
        else:
            arrays.append(pa.array(v, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# ------------------------------------------------------------------------------ FITS
def _fits_dtype(c: OutColumn) -> np.dtype:
    """The column dtype as FITS can store it (and astropy read back) exactly."""
    if c.dtype.kind == "U":
        return np.dtype(f"S{max(1, c.dtype.itemsize // 4)}")
    if c.dtype == np.int8:
        return np.dtype(np.int16)  # FITS bytes are unsigned; a signed byte needs TZERO that readers mishandle
    if c.dtype == np.float16:
        return np.dtype(np.float32)
    return c.dtype


def _write_fits(plan: ExportPlan, tables: Iterable[Table], path: Path) -> int:
    """One binary table, TUNIT and TCOMM for every column, provenance keywords; appended per tile."""
    import fitsio

    dtype = np.dtype([(c.name, _fits_dtype(c), c.shape) if c.shape else (c.name, _fits_dtype(c))
                      for c in plan.columns])
    meta = plan.metadata()
    rel = meta["release"]
    n = 0
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.create_table_hdu(dtype=dtype, extname="OBJECTS")
        hdu = f[-1]
        hdu.write_key("LONGSTRN", "OGIP 1.0", comment="long strings use the OGIP CONTINUE convention")
        for i, c in enumerate(plan.columns, start=1):
            hdu.write_key(f"TUNIT{i}", ascii_text(c.info.unit), comment="physical unit of field")
            desc = ascii_text(c.info.description) or f"{c.name} (no description recorded)"
            hdu.write_key(f"TCOMM{i}", desc, comment="")
        hdu.write_key("ORIGIN", "surveypipe", comment="software that wrote this file")
        for key, value, comment in (("RELEASE", rel.get("release"), "data release (manifest name)"),
                                    ("SPVERS", rel.get("code_version"), "surveypipe version of the run"),
                                    ("MANIFSHA", rel.get("manifest_sha256"), "sha256 of the release manifest"),
                                    ("CONFDIGT", rel.get("config_digest"), "digest of the pipeline config"),
                                    ("NTILES", len(plan.tiles), "tiles merged into this table"),
                                    ("PRIMONLY", plan.primary_only, "only detect_isPrimary rows (each object once)"),
                                    ("ROWWHERE", plan.where, "row filter applied at export")):
            if value is not None and value != "":
                hdu.write_key(key, ascii_text(value) if isinstance(value, str) else value, comment=comment)
        bits = plan.table_attrs.get(PRODUCT, {}).get("flag_bits")
        if isinstance(bits, dict):
            for name, idx in sorted(bits.items(), key=lambda kv: kv[1]):
                if isinstance(idx, int) and 0 <= idx < 100:
                    hdu.write_key(f"FLAGB{idx:02d}", ascii_text(name), comment=f"name of bit {idx} of flags")
        for t in tables:
            if not len(t):
                continue
            arr = np.empty(len(t), dtype=dtype)
            for c in plan.columns:
                arr[c.name] = t[c.name]
            hdu.append(arr)
            n += len(t)
            del arr, t  # before the stream reads the next tile
    return n


# ------------------------------------------------------------------------------ Parquet
def _write_parquet(plan: ExportPlan, tables: Iterable[Table], path: Path) -> int:
    """One row group per tile; units, descriptions and UCDs in field and schema metadata."""
    import pyarrow.parquet as pq

    schema = arrow_schema(plan)
    n = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        for t in tables:
            if not len(t):
                continue
            writer.write_table(arrow_table(plan, t, schema))
            n += len(t)
            del t  # before the stream reads the next tile
    return n
