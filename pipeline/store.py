"""The Zarr v3 catalogue store: one group per tile, committed atomically, with provenance.

Layout (see DESIGN.md §5)::

    OUT/catalog.zarr/zarr.json                     release attrs (manifest hash, code version)
    OUT/catalog.zarr/tiles/<tile>/zarr.json        status + provenance of the tile
    OUT/catalog.zarr/tiles/<tile>/<product>/<col>  1-D (or 2-D per-row) arrays of table columns
    OUT/catalog.zarr/tiles/<tile>/masks/<name>/<band>   2-D image planes, chunked, compressed
    OUT/status/<tile>.json                         error record of a tile that failed
    OUT/.staging/                                  tiles being written (never read)

A tile is written by exactly one task into ``.staging`` and made visible by one ``rename``
(an atomic exchange when it replaces an older version), so readers never see half a tile.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.storage import LocalStore

from .stage import ImageSet
from .table import ColumnInfo, Table

COMPLETE = "complete"
IMAGE_CHUNK = 1024
_RENAME_EXCHANGE = 2


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_write_attrs(meta: Path, attrs: dict[str, Any]) -> None:
    """Merge attributes into a group's zarr.json with one atomic replace (readers never see it torn)."""
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {}).update(_jsonable(attrs))
    _atomic_write_text(meta, json.dumps(doc, indent=2))


def exchange_dirs(a: Path, b: Path) -> bool:
    return _exchange(a, b)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories with renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


class CatalogStore:
    """Reads and writes the per-tile catalogue groups of one run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        self.path = self.out / "catalog.zarr"
        self.tiles_path = self.path / "tiles"
        self.staging = self.out / ".staging"
        self.status_dir = self.out / "status"
        self.checkpoints = self.out / ".checkpoints"

    # ---------------------------------------------------------------- release level
    def init(self, attrs: dict[str, Any]) -> None:
        """Create the store (idempotent) and record release-level attributes."""
        from zarr.errors import ContainsGroupError

        self.out.mkdir(parents=True, exist_ok=True)
        for attempt in range(20):  # job-array shards may create a new store at the same moment
            try:
                root = zarr.open_group(LocalStore(self.path), mode="a", zarr_format=3)
                root.require_group("tiles")
                break
            except (ContainsGroupError, FileExistsError, json.JSONDecodeError):
                time.sleep(0.05 * (attempt + 1))
        else:
            raise OSError(f"cannot create the store {self.path} (another process keeps racing for it)")
        if attrs:
            _atomic_write_attrs(self.path / "zarr.json", attrs)
        self.staging.mkdir(exist_ok=True)
        self.status_dir.mkdir(exist_ok=True)

    def release_attrs(self) -> dict[str, Any]:
        if not (self.path / "zarr.json").exists():
            return {}
        return dict(zarr.open_group(LocalStore(self.path, read_only=True), mode="r").attrs)

    def clean_staging(self) -> int:
        """Remove leftovers of tiles whose writer died; returns how many were removed."""
        if not self.staging.exists():
            return 0
        n = 0
        for p in self.staging.iterdir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        return n

    # ---------------------------------------------------------------- tile level
    def tile_path(self, tile_id: str, where: str = "tile") -> Path:
        """The committed tile group, or (``where="checkpoint"``) the partial products of a
        tile whose later stages run in another task (e.g. ONNX stages on a GPU worker)."""
        return (self.tiles_path if where == "tile" else self.checkpoints) / tile_id

    def tile_ids(self) -> list[str]:
        if not self.tiles_path.exists():
            return []
        return sorted(p.name for p in self.tiles_path.iterdir() if (p / "zarr.json").exists())

    def tile_attrs(self, tile_id: str, where: str = "tile") -> dict[str, Any] | None:
        meta = self.tile_path(tile_id, where) / "zarr.json"
        if not meta.exists():
            return None
        return json.loads(meta.read_text()).get("attributes", {})

    def is_complete(self, tile_id: str, config_digest: str | None = None) -> bool:
        attrs = self.tile_attrs(tile_id)
        if not attrs or attrs.get("status") != COMPLETE:
            return False
        return config_digest is None or attrs.get("config_digest") == config_digest

    def _group(self, tile_id: str, where: str = "tile") -> zarr.Group:
        return zarr.open_group(LocalStore(self.tile_path(tile_id, where), read_only=True), mode="r")

    def stored_products(self, tile_id: str) -> list[str]:
        attrs = self.tile_attrs(tile_id) or {}
        return list(attrs.get("products", []))

    def read_product(self, tile_id: str, name: str, where: str = "tile") -> Table | ImageSet:
        g = self._group(tile_id, where)[name]
        kind = g.attrs.get("kind")
        if kind == "table":
            info = {k: ColumnInfo(**v) for k, v in g.attrs.get("info", {}).items()}
            cols = {c: g[c][...] for c in g.attrs["columns"]}
            return Table(cols, info, dict(g.attrs.get("table_attrs", {})))
        if kind == "images":
            return ImageSet({b: g[b][...] for b in g.attrs["bands"]}, dict(g.attrs.get("image_attrs", {})))
        raise KeyError(f"tile {tile_id!r}: {name!r} is not a stored product")

    def read_table(self, tile_id: str, name: str, columns: Iterable[str] | None = None) -> Table:
        g = self._group(tile_id)[name]
        info = {k: ColumnInfo(**v) for k, v in g.attrs.get("info", {}).items()}
        names = list(columns) if columns is not None else list(g.attrs["columns"])
        return Table({c: g[c][...] for c in names}, {c: info[c] for c in names if c in info})

    def commit_tile(self, tile_id: str, products: dict[str, Any], attrs: dict[str, Any], where: str = "tile") -> None:
        """Write every product into a staging group, then make it visible in one rename."""
        self.staging.mkdir(parents=True, exist_ok=True)
        stage_dir = self.staging / f"{tile_id}.{uuid.uuid4().hex}"
        group = zarr.open_group(LocalStore(stage_dir), mode="w", zarr_format=3)
        written, jobs, array_attrs = [], [], {}
        for name, value in products.items():
            if isinstance(value, Table):
                jobs += _write_table(group, name, value)
            elif isinstance(value, ImageSet):
                new = _write_images(group, name, value)
                if new:
                    array_attrs[id(new[0][0])] = _jsonable(value.attrs)
                jobs += new
            else:
                continue  # not a storable product (e.g. an in-memory handle)
            written.append(name)
        _write_arrays(jobs, array_attrs)
        group.attrs.update({**attrs, "products": written, "status": COMPLETE})
        final = self.tile_path(tile_id, where)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if _exchange(stage_dir, final):
                shutil.rmtree(stage_dir, ignore_errors=True)  # now holds the old version
            else:
                old = self.staging / f"{tile_id}.old.{uuid.uuid4().hex}"
                os.rename(final, old)
                os.rename(stage_dir, final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage_dir, final)
        if where == "tile":
            self.clear_failure(tile_id)
            self.drop_checkpoint(tile_id)

    def drop_checkpoint(self, tile_id: str) -> None:
        cp = self.tile_path(tile_id, "checkpoint")
        if cp.exists():
            trash = self.staging / f"{tile_id}.cp.{uuid.uuid4().hex}"
            os.rename(cp, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # ---------------------------------------------------------------- failures
    def record_failure(self, tile_id: str, record: dict[str, Any]) -> None:
        _atomic_write_text(self.status_dir / f"{tile_id}.json", json.dumps(record, indent=1, default=str))

    def clear_failure(self, tile_id: str) -> None:
        try:
            (self.status_dir / f"{tile_id}.json").unlink()
        except FileNotFoundError:
            pass

    def failures(self) -> dict[str, dict[str, Any]]:
        if not self.status_dir.exists():
            return {}
        out = {}
        for p in sorted(self.status_dir.glob("*.json")):
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
        return out


def _subgroup(group: zarr.Group, name: str) -> zarr.Group:
    g = group
    for part in name.split("/"):
        g = g[part] if part in g else g.create_group(part)
    return g


def _write_table(group: zarr.Group, name: str, table: Table) -> list[tuple[zarr.Group, str, np.ndarray, tuple[int, ...]]]:
    """Create the table's group and attributes; return its columns for the concurrent write."""
    g = _subgroup(group, name)
    jobs = []
    for col, values in table.columns.items():
        values = np.ascontiguousarray(values)
        if values.dtype.kind in "OUS":
            raise TypeError(f"column {col!r} of {name!r}: store numbers, not strings")
        chunks = values.shape if values.size else tuple(max(1, s) for s in values.shape)
        jobs.append((g, col, values, chunks))
    g.attrs.update({
        "kind": "table",
        "columns": list(table.columns),
        "info": table.info_dict(),
        "table_attrs": _jsonable(table.attrs),
        "nrows": len(table),
    })
    return jobs


def _write_images(group: zarr.Group, name: str, images: ImageSet) -> list[tuple[zarr.Group, str, np.ndarray, tuple[int, ...]]]:
    g = _subgroup(group, name)
    jobs = []
    for band, plane in images.planes.items():
        jobs.append((g, band, np.ascontiguousarray(plane), tuple(min(IMAGE_CHUNK, s) for s in plane.shape)))
    g.attrs.update({"kind": "images", "bands": list(images.planes), "image_attrs": _jsonable(images.attrs)})
    return jobs


def _write_arrays(jobs: list[tuple[zarr.Group, str, np.ndarray, tuple[int, ...]]], attrs: dict[str, Any]) -> None:
    """Create and fill every array concurrently (zarr's async API): one event-loop round trip per
    tile instead of one per column, which is what dominates writing many small columns."""
    import asyncio

    from zarr.core.sync import sync

    async def one(g: zarr.Group, name: str, values: np.ndarray, chunks: tuple[int, ...]) -> None:
        arr = await g._async_group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunks,
                                                fill_value=0, attributes=attrs.get(id(g), {}))
        if values.size:
            await arr.setitem(Ellipsis, values)

    async def all_of() -> None:
        await asyncio.gather(*(one(*j) for j in jobs))

    sync(all_of())


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
