"""Processing one tile through the stage graph: the body of one Dask task.

Reads its own FITS (no pixels cross the network), reuses upstream products whose cache key
is unchanged, runs the rest, and commits the tile to the store in one atomic step. Bad input
and algorithm errors become a failure record; infrastructure errors propagate so the
scheduler retries them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from . import __version__ as CODE_VERSION
from .config import PipelineConfig
from .dag import Dag
from .errors import AlgorithmError, BadInputError, SurveypipeError
from .manifest import Manifest
from .stage import Stage, cache_key, config_hash, model_sha256
from .store import CatalogStore
from .tile import TileData, load_tile



def _exposure_key(manifest: Manifest, tile_id: str) -> str:
    """Cheap key of a tile's inputs: paths, sizes and mtimes (sha256s go to provenance)."""
    spec = manifest.tile(tile_id)
    parts = []
    for band in sorted(spec.files):
        bf = spec.files[band]
        for rel in filter(None, (bf.path, bf.weight_path, bf.mask_path)):
            p = manifest.resolve(rel)
            try:
                st = p.stat()
                parts.append((band, str(p), st.st_size, st.st_mtime_ns, bf.model_dump_json()))
            except OSError:
                parts.append((band, str(p), -1, -1, bf.model_dump_json()))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _failure(tile_id: str, kind: str, message: str, *, stage: str | None = None, file: str | None = None,
             seconds: float = 0.0, tb: str | None = None) -> dict[str, Any]:
    return {"tile": tile_id, "status": "failed", "kind": kind, "error": message, "stage": stage,
            "file": file, "seconds": round(seconds, 3), "traceback": tb, "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def process_tile(manifest: Manifest, tile_id: str, config: PipelineConfig, out_dir: str, *,
                 from_stage: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run the configured stages on one tile and commit it; return a small status record."""
    t0 = time.perf_counter()
    store = CatalogStore(out_dir)
    digest = config.digest()
    if not force and from_stage is None and store.is_complete(tile_id, digest):
        return {"tile": tile_id, "status": "skipped", "seconds": 0.0}
    stages = config.load_stages()
    dag = Dag(stages)
    cfgs = config.stage_configs(stages)
    plan = dag.needed_for(config.targets)
    must_run = dag.downstream_of(from_stage) if from_stage else set()
    old = None if force else store.tile_attrs(tile_id)
    old_stages: dict[str, Any] = (old or {}).get("stages", {})
    stored = set((old or {}).get("products", []))

    products: dict[str, Any] = {}
    keys: dict[str, str] = {"exposure": _exposure_key(manifest, tile_id)}
    record: dict[str, Any] = {}
    tile: TileData | None = None
    current: Stage | None = None
    try:
        # decide, in order, which stages can reuse the committed outputs of the previous run
        reuse: dict[str, bool] = {}
        for s in plan:
            key = cache_key(s, cfgs[s.name], {r: keys[r] for r in dag.inputs(s)})
            for p in s.provides:
                keys[p] = key
            prev = old_stages.get(s.name, {})
            reuse[s.name] = (s.name not in must_run and prev.get("key") == key
                             and all(p in stored for p in s.provides))
        # a stage that runs needs its inputs: pull reusable ones from the store, else recompute
        needed_inputs = {r for s in plan if not reuse[s.name] for r in dag.inputs(s)}
        for s in plan:
            if reuse[s.name]:
                for p in s.provides:
                    if p in needed_inputs:
                        products[p] = store.read_product(tile_id, p)
        for s in plan:
            if reuse[s.name]:
                record[s.name] = dict(old_stages[s.name], reused=True)
                continue
            current = s
            if "exposure" in s.requires and tile is None:
                t_read = time.perf_counter()
                tile = load_tile(manifest, manifest.tile(tile_id))
                record["_read"] = {"seconds": round(time.perf_counter() - t_read, 4)}
                products["exposure"] = tile
            ts, cpu0 = time.perf_counter(), time.process_time()
            try:
                out = s.run({r: products[r] for r in dag.inputs(s)}, cfgs[s.name])
            except (BadInputError, AlgorithmError, MemoryError, OSError):
                raise
            except SurveypipeError:
                raise
            except Exception as exc:  # a bug or numerical failure in the stage: not retried
                raise AlgorithmError(f"stage {s.name!r} failed on tile {tile_id!r}: {type(exc).__name__}: {exc}") from exc
            missing = set(s.provides) - set(out)
            if missing:
                raise AlgorithmError(f"stage {s.name!r} did not return {sorted(missing)}")
            products.update(out)
            record[s.name] = {
                "version": s.version, "key": keys[next(iter(s.provides))] if s.provides else "",
                "config": cfgs[s.name].model_dump(mode="json"), "config_hash": config_hash(cfgs[s.name]),
                "models": {str(p.name): model_sha256(p) for p in s.model_files(cfgs[s.name])},
                "seconds": round(time.perf_counter() - ts, 4), "cpu_seconds": round(time.process_time() - cpu0, 4),
                "reused": False,
            }
        current = None
        # products to store: everything non-transient made now, plus reused ones carried over
        to_store: dict[str, Any] = {}
        for s in plan:
            for p in s.provides:
                if p in s.transient:
                    continue
                if reuse[s.name] and p not in products:
                    products[p] = store.read_product(tile_id, p)
                to_store[p] = products[p]
        t_write = time.perf_counter()
        attrs = {
            "tile_id": tile_id,
            "config_digest": digest,
            "code_version": CODE_VERSION,
            "stages": {k: v for k, v in record.items() if not k.startswith("_")},
            "inputs": {"files": tile.files if tile else (old or {}).get("inputs", {}).get("files", {}),
                       "sha256": tile.checksums if tile else (old or {}).get("inputs", {}).get("sha256", {}),
                       "key": keys["exposure"]},
            "bands": tile.bands if tile else (old or {}).get("bands", []),
            "shape": list(tile.shape) if tile else (old or {}).get("shape"),
            "host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
            "timings": {"read": record.get("_read", {}).get("seconds", 0.0)},
        }
        store.commit_tile(tile_id, to_store, attrs)
        write_s = time.perf_counter() - t_write
        total = time.perf_counter() - t0
        return {"tile": tile_id, "status": "complete", "seconds": round(total, 3),
                "write_seconds": round(write_s, 4), "read_seconds": attrs["timings"]["read"],
                "stages": {k: {"seconds": v.get("seconds", 0.0), "cpu_seconds": v.get("cpu_seconds", 0.0),
                               "reused": v.get("reused", False)} for k, v in record.items() if not k.startswith("_")},
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    except BadInputError as exc:
        return _failure(tile_id, exc.kind, str(exc), stage=current.name if current else "read", file=exc.file,
                        seconds=time.perf_counter() - t0)
    except AlgorithmError as exc:
        return _failure(tile_id, exc.kind, str(exc), stage=current.name if current else None,
                        seconds=time.perf_counter() - t0, tb=traceback.format_exc(limit=8))
