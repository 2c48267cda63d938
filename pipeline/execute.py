"""Running a release on any Dask cluster: one task per tile, a summary and an exit code.

The tile is the unit of distribution: each task reads its own FITS and writes its own Zarr
group, so only a small status record travels back to the client.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from distributed import Client, as_completed

from . import __version__
from .config import PipelineConfig
from .dag import Dag
from .manifest import Manifest
from .memory import MEMORY_RESOURCE, base_memory, ensure_memory_worker, is_memory_failure
from .stage import Stage
from .runner import _failure, process_tile
from .store import CatalogStore

EXIT_OK, EXIT_SOME_FAILED, EXIT_NONE_DONE = 0, 1, 3
CPU_RESOURCE = "CPU"  # advertised by CPU-only workers of a heterogeneous cluster (see deploy/slurm)


@dataclass
class RunSummary:
    """What a run did: tiles done, skipped and failed (with their error records), and time."""

    done: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)  # done, with caveats (a subset of ``done``)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if not self.failed:
            return EXIT_OK
        return EXIT_SOME_FAILED if (self.done or self.skipped) else EXIT_NONE_DONE

    def as_dict(self) -> dict[str, Any]:
        return {"done": self.done, "partial": self.partial, "skipped": self.skipped, "failed": self.failed,
                "seconds": round(self.seconds, 3), "exit_code": self.exit_code}

    def text(self) -> str:
        lines = [f"tiles done: {len(self.done)} ({len(self.partial)} partial, with caveats), skipped (already complete): {len(self.skipped)}, "
                 f"failed: {len(self.failed)}, wall time: {self.seconds:.1f} s"]
        for tid, rec in sorted(self.failed.items()):
            lines.append(f"  FAILED {tid} [{rec.get('kind')}] {rec.get('error')}")
        for rec in self.records:
            if rec.get("tile") in self.partial:
                lines.append(f"  PARTIAL {rec['tile']}: " + "; ".join(rec.get("caveats", [])))
        return "\n".join(lines)


def select_tiles(manifest: Manifest, tiles: Iterable[str] | None = None, shard: tuple[int, int] | None = None) -> list[str]:
    """Tile ids to process: an explicit list, or shard I of N (disjoint, stable across runs)."""
    ids = sorted(t.id for t in manifest.tiles)
    if tiles:
        wanted = list(dict.fromkeys(tiles))
        unknown = [t for t in wanted if t not in ids]
        if unknown:
            raise KeyError(f"tile(s) {unknown} not in manifest {manifest.name!r}")
        ids = wanted
    if shard:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"shard {i}/{n}: need 0 <= I < N")
        ids = ids[i::n]
    return ids


def segments(plan: list[Stage]) -> list[tuple[dict[str, float], list[str]]]:
    """Split the ordered plan into runs of consecutive stages asking for the same resources."""
    out: list[tuple[dict[str, float], list[str]]] = []
    for s in plan:
        res = dict(s.resources)
        if out and out[-1][0] == res:
            out[-1][1].append(s.name)
        else:
            out.append((res, [s.name]))
    return out


def cluster_resources(client: Client) -> set[str]:
    """Names of the abstract resources (e.g. GPU) that at least one worker advertises now."""
    info = client.scheduler_info(n_workers=-1)
    return {r for w in info.get("workers", {}).values() for r in (w.get("resources") or {})}


def run_release(manifest: Manifest, out_dir: str | Path, config: PipelineConfig, client: Client, *,
                tiles: Iterable[str] | None = None, shard: tuple[int, int] | None = None,
                from_stage: str | None = None, force: bool = False, progress: bool = True,
                placement: bool | None = None,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
    """Process the selected tiles of a release on ``client``; resume skips complete tiles.

    With ``placement`` (default: when some worker advertises a resource a stage asks for, e.g.
    ``GPU``), a tile becomes a chain of tasks, one per run of stages with equal resources, handing
    over through the tile's checkpoint; otherwise one task per tile on any worker.
    """
    t0 = time.perf_counter()
    stages = config.load_stages()  # validate everything before any work is submitted
    dag = Dag(stages)
    config.stage_configs(stages)
    dag.needed_for(config.targets)
    if from_stage:
        dag.downstream_of(from_stage)
    store = CatalogStore(out_dir)
    store.init({"release": manifest.name, "manifest_sha256": manifest.sha256, "bands": manifest.bands,
                "code_version": __version__, "config": config.model_dump(mode="json"),
                "config_digest": config.digest()})
    summary = RunSummary()
    selected = select_tiles(manifest, tiles, shard)
    if not tiles:  # manifest-level rejects count as failed tiles of this run (in its shard)
        rejected = [p for p in manifest.problems if not shard or p.tile in _shard_of([p.tile for p in manifest.problems], shard)]
        for p in rejected:
            rec = _failure(p.tile, "bad_input", p.message(), stage="manifest", file=p.file)
            summary.failed[p.tile] = rec
            store.record_failure(p.tile, rec)
    token = uuid.uuid4().hex[:8]
    plan = dag.needed_for(config.targets)
    segs = segments(plan)
    wanted = {r for res, _ in segs for r in res}
    available = cluster_resources(client)
    if placement is None:
        placement = bool(wanted) and wanted <= available
    if not placement:
        segs = [({}, [s.name for s in plan])]
    elif CPU_RESOURCE in available:  # keep plain stages off the GPU workers when CPU ones say so
        segs = [(res or {CPU_RESOURCE: 1}, names) for res, names in segs]
    def one_tile(tid: str) -> Manifest:  # what a task ships: the manifest of its own tile only
        return manifest.model_copy(update={"tiles": [manifest.tile(tid)], "problems": []})

    by_key: dict[str, str] = {}
    futures = []
    for tid in selected:
        one = one_tile(tid)
        prev = None
        for i, (res, names) in enumerate(segs):
            last = i == len(segs) - 1
            prev = client.submit(process_tile, one, tid, config, str(out_dir), from_stage=from_stage, force=force,
                                 segment=None if last else names, previous=prev,
                                 key=f"tile-{tid}-{token}-{i}", pure=False, retries=config.retries,
                                 resources=res or None)
        futures.append(prev)
        by_key[prev.key] = tid
    bar = _progress(len(futures), progress)
    base_mem = base_memory(client) if config.memory_escalations else 0.0
    escalations: dict[str, int] = {}
    pending = as_completed(futures)
    for fut in pending:
        tid = by_key[fut.key]
        try:
            rec = fut.result()
        except Exception as exc:  # retries exhausted: lost workers, I/O, memory
            level = escalations.get(tid, 0)
            if is_memory_failure(exc) and base_mem > 0 and level < config.memory_escalations:
                need = base_mem * 2 ** (level + 1)
                if ensure_memory_worker(client, need):  # one task for the whole tile, checkpoint reused
                    escalations[tid] = level + 1
                    retry = client.submit(process_tile, one_tile(tid), tid, config, str(out_dir), from_stage=from_stage,
                                          force=force, key=f"tile-{tid}-{token}-mem{level + 1}", pure=False,
                                          retries=config.retries, resources={MEMORY_RESOURCE: need})
                    by_key[retry.key] = tid
                    pending.add(retry)
                    fut.release()
                    continue
            why = "out of memory" if is_memory_failure(exc) else "infrastructure failure"
            rec = _failure(tid, "infrastructure", f"{why} after {config.retries} retr(y/ies)"
                           + (f" and {escalations[tid]} memory escalation(s) (last {base_mem * 2 ** escalations[tid] / 1e9:.2f} GB)"
                              if escalations.get(tid) else "") + f": {type(exc).__name__}: {exc}", stage=None)
        if escalations.get(tid):
            rec["memory_escalations"] = escalations[tid]
            rec["memory_bytes"] = base_mem * 2 ** escalations[tid]
        summary.records.append(rec)
        status = rec["status"]
        if status == "complete":
            summary.done.append(tid)
            if rec.get("caveats"):
                summary.partial.append(tid)
        elif status == "skipped":
            summary.skipped.append(tid)
        else:
            summary.failed[tid] = rec
            store.record_failure(tid, rec)
        if on_result:
            on_result(rec)
        bar.update(1)
        bar.set_postfix_str(f"failed={len(summary.failed)}")
        fut.release()
    bar.close()
    summary.done.sort()
    summary.partial.sort()
    summary.skipped.sort()
    summary.seconds = time.perf_counter() - t0
    runs = Path(out_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{time.strftime('%Y%m%dT%H%M%S')}-{token}.json").write_text(
        json.dumps({**summary.as_dict(), "records": summary.records}, indent=1, default=str))
    return summary


def _shard_of(ids: list[str], shard: tuple[int, int]) -> list[str]:
    i, n = shard
    return sorted(ids)[i::n]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tile", desc="tiles", disable=not enabled, dynamic_ncols=True)


def tile_status(out_dir: str | Path, manifest: Manifest | None = None) -> dict[str, Any]:
    """Per-tile status of a run directory (complete / failed / pending), for ``surveypipe status``."""
    store = CatalogStore(out_dir)
    tiles: dict[str, dict[str, Any]] = {}
    for tid in store.tile_ids():
        a = store.tile_attrs(tid) or {}
        status = a.get("status", "unknown")
        tiles[tid] = {"status": "partial" if status == "complete" and a.get("caveats") else status,
                      **({"caveats": a["caveats"]} if a.get("caveats") else {}),
                      "seconds": round(sum(s.get("seconds", 0) for s in a.get("stages", {}).values()), 3),
                      "stages": {k: {"version": v.get("version"), "reused": v.get("reused", False)}
                                 for k, v in a.get("stages", {}).items()}}
    for tid, rec in store.failures().items():
        if tid not in tiles:
            tiles[tid] = {"status": "failed", "kind": rec.get("kind"), "error": rec.get("error"),
                          "stage": rec.get("stage"), "file": rec.get("file")}
        else:  # committed earlier, failed on a later rerun: the committed version stands
            tiles[tid]["last_error"] = rec.get("error")
    if manifest is not None:
        for t in manifest.tiles:
            tiles.setdefault(t.id, {"status": "pending"})
    counts: dict[str, int] = {}
    for v in tiles.values():
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    return {"out": str(out_dir), "release": store.release_attrs().get("release"), "counts": counts,
            "tiles": dict(sorted(tiles.items()))}
