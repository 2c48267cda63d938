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
from .rss import lifetime_peak_mb, phase_peak, release_free_heap
from .scratch import release
from .stage import CAVEATS, ImageSet, Stage, cache_key, config_hash, model_sha256
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


def plan_key(plan: list[Stage], cfgs: dict[str, Any]) -> str:
    """What a tile's outcome depends on besides its inputs: every planned stage's version, resolved
    config (defaults included) and model files. A complete tile is skipped only when this matches:
    the user's config digest alone misses a new stage default, version or model after an upgrade
    (the per-stage cache keys then recompute only what changed)."""
    return hashlib.sha256(json.dumps([cache_key(s, cfgs[s.name], {}) for s in plan]).encode()).hexdigest()[:32]


def _drop_dead_products(products: dict[str, Any], later: list[Stage], reuse: dict[str, str | None],
                        transient: set[str], dag: Dag) -> bool:
    """Free the in-memory products no stage still to run reads: the exposure and transient products
    (the non-transient ones wait for the commit). A tile's planes and intermediate maps would
    otherwise stay resident through every later stage and the write. True when the exposure went."""
    needed = {r for s in later if not reuse[s.name] for r in dag.inputs(s)}
    dead = [p for p in products if p not in needed and (p == "exposure" or p in transient)]
    for p in dead:
        del products[p]
    return "exposure" in dead


def _release_product_pages(products: dict[str, Any]) -> None:
    """Hand back the resident pages of every file-backed product plane (e.g. the artefact masks) between
    stages, as for the exposure: the next stage faults in only what it reads."""
    for value in products.values():
        if isinstance(value, ImageSet):
            release(*value.planes.values())


def process_tile(manifest: Manifest, tile_id: str, config: PipelineConfig, out_dir: str, *,
                 from_stage: str | None = None, force: bool = False, segment: list[str] | None = None,
                 previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """One tile (:func:`_process_tile`); then, its planes freed, the heap handed back to the kernel
    (:func:`pipeline.rss.release_free_heap`), so the next tile's peak starts from the idle worker."""
    try:
        return _process_tile(manifest, tile_id, config, out_dir, from_stage=from_stage, force=force,
                             segment=segment, previous=previous)
    finally:
        release_free_heap()


def _process_tile(manifest: Manifest, tile_id: str, config: PipelineConfig, out_dir: str, *,
                  from_stage: str | None = None, force: bool = False, segment: list[str] | None = None,
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the configured stages on one tile and commit it; return a small status record.

    With ``segment`` (stage names), only the sub-graph those stages need runs and its products
    go to the tile's checkpoint, not the catalogue: the next task (e.g. ONNX stages on a GPU
    worker) reuses them and commits. ``previous`` is the record of that earlier task.
    """
    t0 = time.perf_counter()
    if previous is not None and previous.get("status") == "failed":
        return previous
    store = CatalogStore(out_dir)
    digest = config.digest()
    first_task = previous is None
    stages = config.load_stages()
    dag = Dag(stages)
    cfgs = config.stage_configs(stages)
    plan = dag.needed_for(segment if segment else config.targets)
    full_plan = dag.needed_for(config.targets)
    stages_key = plan_key(full_plan, cfgs)
    if not force and from_stage is None and store.is_complete(tile_id, digest) \
            and (store.tile_attrs(tile_id) or {}).get("plan_key") == stages_key:
        return {"tile": tile_id, "status": "skipped", "seconds": 0.0}
    if first_task and (force or from_stage):
        store.drop_checkpoint(tile_id)  # recompute means recompute, not reuse of an older partial
    final = segment is None
    must_run = dag.downstream_of(from_stage) if from_stage else set()
    committed = None if force else store.tile_attrs(tile_id)
    checkpoint = store.tile_attrs(tile_id, "checkpoint")
    sources = []  # newest first: this run's checkpoint, then the committed tile
    if checkpoint:
        sources.append(("checkpoint", checkpoint, True))
    if committed:
        sources.append(("tile", committed, False))

    products: dict[str, Any] = {}
    transient = {p for s in plan for p in s.transient}
    keys: dict[str, str] = {"exposure": _exposure_key(manifest, tile_id)}
    record: dict[str, Any] = {}
    tile: TileData | None = None
    tile_meta: dict[str, Any] | None = None  # what the commit needs of the tile once its planes are freed
    current: Stage | None = None
    try:
        # decide, in order, which stages can reuse outputs already on disk (same cache key)
        reuse: dict[str, str | None] = {}
        for s in plan:
            key = cache_key(s, cfgs[s.name], {r: keys[r] for r in dag.inputs(s)})
            for p in s.provides:
                keys[p] = key
            reuse[s.name] = None
            for where, attrs, overrides_must_run in sources:
                if s.name in must_run and not overrides_must_run:
                    continue
                prev = attrs.get("stages", {}).get(s.name, {})
                kept = [p for p in s.provides if p not in s.transient]
                if prev.get("key") == key and all(p in attrs.get("products", []) for p in kept):
                    reuse[s.name] = where
                    break
        # a reused stage whose transient product a running stage needs must run again (to a fix-point)
        while True:
            needed_inputs = {r for s in plan if not reuse[s.name] for r in dag.inputs(s)}
            redo = [s for s in plan if reuse[s.name] and any(p in needed_inputs for p in s.transient)]
            if not redo:
                break
            for s in redo:
                reuse[s.name] = None
        prev_records = {w: a.get("stages", {}) for w, a, _ in sources}
        for s in plan:
            if reuse[s.name]:
                for p in s.provides:
                    if p in needed_inputs:
                        products[p] = store.read_product(tile_id, p, reuse[s.name])
        for s in plan:
            if reuse[s.name]:
                record[s.name] = dict(prev_records[reuse[s.name]][s.name], reused=True)
                continue
            current = s
            if "exposure" in s.requires and tile is None:
                t_read = time.perf_counter()
                with phase_peak() as mem:
                    tile = load_tile(manifest, manifest.tile(tile_id))
                record["_read"] = {"seconds": round(time.perf_counter() - t_read, 4), "peak_rss_mb": mem.peak_mb}
                products["exposure"] = tile
                tile_meta = {"caveats": list(tile.caveats), "files": dict(tile.files), "sha256": dict(tile.checksums),
                             "bands": list(tile.bands), "shape": list(tile.shape)}
            ts, cpu0 = time.perf_counter(), time.process_time()
            try:
                with phase_peak() as mem:
                    out = s.run({r: products[r] for r in dag.inputs(s)}, cfgs[s.name])
            except (SurveypipeError, MemoryError, OSError):
                raise
            except Exception as exc:  # a bug or numerical failure in the stage: not retried
                raise AlgorithmError(f"stage {s.name!r} failed on tile {tile_id!r}: {type(exc).__name__}: {exc}") from exc
            caveats = [str(c) for c in (out.pop(CAVEATS, None) or [])]
            missing = set(s.provides) - set(out)
            if missing:
                raise AlgorithmError(f"stage {s.name!r} did not return {sorted(missing)}")
            products.update(out)
            del out
            if _drop_dead_products(products, plan[plan.index(s) + 1:], reuse, transient, dag):
                tile = None  # the exposure's last reader has run: its planes go before the next stage / the write
            elif tile is not None:
                tile.release_pages()  # file-backed planes: the next stage faults in only the bands it reads
            _release_product_pages(products)
            # the stage's freed temporaries go back to the kernel, so the next stage's peak starts from
            # what is still alive (photo-z, morphology and lenses peaked 70-100 MB lower on a 2048^2 tile)
            release_free_heap()
            record[s.name] = {
                "version": s.version, "key": keys[next(iter(s.provides))] if s.provides else "",
                "config": cfgs[s.name].model_dump(mode="json"), "config_hash": config_hash(cfgs[s.name]),
                "models": {str(p.name): model_sha256(p) for p in s.model_files(cfgs[s.name])},
                "seconds": round(time.perf_counter() - ts, 4), "cpu_seconds": round(time.process_time() - cpu0, 4),
                "peak_rss_mb": mem.peak_mb, "reused": False, **({"caveats": caveats} if caveats else {}),
            }
        current = None
        # products to store: everything non-transient of the plan, reused ones carried over
        to_store: dict[str, Any] = {}
        for s in plan:
            for p in s.provides:
                if p in s.transient:
                    continue
                if reuse[s.name] and p not in products:
                    products[p] = store.read_product(tile_id, p, reuse[s.name])
                to_store[p] = products[p]
        t_write = time.perf_counter()
        old = committed or checkpoint or {}
        input_caveats = list(tile_meta["caveats"] if tile_meta else old.get("input_caveats", []))
        caveats = input_caveats + [f"{name}: {c}" for name, rec in record.items() if not name.startswith("_")
                                   for c in rec.get("caveats", [])]
        attrs = {
            "tile_id": tile_id,
            "config_digest": digest,
            "plan_key": stages_key,
            "code_version": CODE_VERSION,
            "stages": {k: v for k, v in record.items() if not k.startswith("_")},
            "inputs": {"files": tile_meta["files"] if tile_meta else old.get("inputs", {}).get("files", {}),
                       "sha256": tile_meta["sha256"] if tile_meta else old.get("inputs", {}).get("sha256", {}),
                       "key": keys["exposure"]},
            "bands": tile_meta["bands"] if tile_meta else old.get("bands", []),
            "shape": tile_meta["shape"] if tile_meta else old.get("shape"),
            "host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
            "timings": {"read": record.get("_read", {}).get("seconds", 0.0)},
            "outcome": "partial" if caveats else "complete", "caveats": caveats, "input_caveats": input_caveats,
        }
        if final and [s.name for s in plan] != [s.name for s in full_plan]:
            raise AlgorithmError(f"tile {tile_id!r}: final task does not cover the whole plan")
        with phase_peak() as write_mem:
            store.commit_tile(tile_id, to_store, attrs, where="tile" if final else "checkpoint")
        write_s = time.perf_counter() - t_write
        total = time.perf_counter() - t0
        stage_times = {k: {"seconds": v.get("seconds", 0.0), "cpu_seconds": v.get("cpu_seconds", 0.0),
                           "peak_rss_mb": v.get("peak_rss_mb"), "reused": v.get("reused", False)}
                       for k, v in record.items() if not k.startswith("_")}
        if previous is not None:  # the earlier segment's timings belong to this tile too
            for k, v in previous.get("stages", {}).items():
                if not v.get("reused") and stage_times.get(k, {}).get("reused", True):
                    stage_times[k] = v
            total += previous.get("seconds", 0.0)
            write_s += previous.get("write_seconds", 0.0)
        return {"tile": tile_id, "status": "complete" if final else "checkpointed", "seconds": round(total, 3),
                "write_seconds": round(write_s, 4), "read_seconds": attrs["timings"]["read"]
                + (previous or {}).get("read_seconds", 0.0),
                "stages": stage_times, "host": socket.gethostname(), "caveats": caveats,
                "pids": [*(previous or {}).get("pids", []), os.getpid()],
                "read_peak_rss_mb": record.get("_read", {}).get("peak_rss_mb"), "write_peak_rss_mb": write_mem.peak_mb,
                "maxrss_mb": lifetime_peak_mb()}
    except BadInputError as exc:
        return _failure(tile_id, exc.kind, str(exc), stage=current.name if current else "read", file=exc.file,
                        seconds=time.perf_counter() - t0)
    except AlgorithmError as exc:
        return _failure(tile_id, exc.kind, str(exc), stage=current.name if current else None,
                        seconds=time.perf_counter() - t0, tb=traceback.format_exc(limit=8))
