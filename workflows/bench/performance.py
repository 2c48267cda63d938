"""Performance benchmark (issue 9): per-stage cost, I/O vs compute vs orchestration, memory
(each stage's peak on a fresh worker's first tile and over all tiles), scaling from 1 to N workers
with a control of N independent one-worker processes (the machine's own ceiling), per-task
overhead on many small tiles, and SExtractor as the yardstick.

Every figure is measured in this one run on this machine and printed with its unit.
``surveypipe bench performance --help`` lists the options.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.execute import RunSummary, run_release
from pipeline.manifest import load_manifest
from workflows.mock.seeds import check_seed

BENCH_SEED = 9500
CLASSICAL = ("background", "detection", "deblending", "photometry")


def machine_header() -> list[str]:
    import dask
    import numpy
    import onnxruntime as ort
    import sep
    import zarr

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    sx = "not installed"
    if shutil.which("source-extractor"):
        out = subprocess.run(["source-extractor", "--version"], capture_output=True, text=True)
        sx = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"
    return [
        f"machine: {platform.node()}  {cpu}  cores={os.cpu_count()}  memory={mem:.1f} GiB",
        f"versions: python {platform.python_version()}  numpy {numpy.__version__}  sep {sep.__version__}  "
        f"dask {dask.__version__}  zarr {zarr.__version__}  onnxruntime {ort.__version__} "
        f"(providers {ort.get_available_providers()})",
        f"sextractor: {sx}",
    ]


def simulate(path: Path, n_tiles: int, size: int, bands: str, seed: int) -> Path:
    from workflows.mock.release import write_release

    manifest = path / "manifest.yaml"
    stamp = path / "bench-params.json"
    params = {"n_tiles": n_tiles, "size": size, "bands": bands, "seed": seed}
    if manifest.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return manifest
    shutil.rmtree(path, ignore_errors=True)
    write_release(path, n_tiles=n_tiles, size=size, bands=bands, seed=seed, overlap=min(64, size // 4), progress=False)
    stamp.write_text(json.dumps(params))
    # the kernel would otherwise write the new files back while the first timed tiles run
    # (in `make bench` the first tile of the one-worker run once took 1.2x the others, every stage alike)
    os.sync()
    return manifest


def tile_bytes(manifest: Path) -> float:
    """Bytes of one tile's pixel data as delivered: the mean over tiles of the sizes of their FITS
    files (image, weight and mask HDUs of every band)."""
    m = load_manifest(manifest)
    sizes = []
    for spec in m.tiles:
        paths = {m.resolve(rel) for bf in spec.files.values() for rel in (bf.path, bf.weight_path, bf.mask_path) if rel}
        sizes.append(sum(p.stat().st_size for p in paths))
    return float(np.mean(sizes))


def run_once(manifest: Path, out: Path, workers: int, config: PipelineConfig) -> tuple[RunSummary, float, list[float], list[float]]:
    """Run the release on a fresh LocalCluster of ``workers`` processes; wall time and worker peak RSS."""

    from pipeline.cluster import connect, local_cluster

    shutil.rmtree(out, ignore_errors=True)
    m = load_manifest(manifest)
    cluster = local_cluster(workers, dashboard=False)
    client = connect(cluster)  # with the worker plugin, as `surveypipe run` does
    try:
        client.wait_for_workers(workers)
        # warm the workers (imports) so the timing is of the pipeline, not of Python start-up
        client.run(_warm_up)
        base = list(client.run(_rss_now_mb).values())
        t = time.perf_counter()
        summary = run_release(m, out, config, client, progress=False)
        wall = time.perf_counter() - t
        rss = list(client.run(_peak_mb).values())
    finally:
        client.close()
        cluster.close()
    return summary, wall, rss, base


def _warm_up() -> None:
    """Import what a tile task imports, so timings are of the pipeline, not of Python start-up."""
    import astropy.wcs  # noqa: F401
    import fitsio  # noqa: F401
    import onnxruntime  # noqa: F401

    import pipeline.runner  # noqa: F401
    import stages  # noqa: F401


def _peak_mb() -> float:
    """The worker's peak resident set (MB): per-phase resets of the kernel's high-water mark
    (pipeline.rss) also lower ``ru_maxrss``, so the engine keeps the lifetime maximum."""
    from pipeline.rss import lifetime_peak_mb

    return lifetime_peak_mb()


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def with_first_flags(records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], bool]]:
    """Each tile record with whether it was its worker's first tile (records come in completion order;
    a worker is its last process id, the one that finished the tile)."""
    seen: set[Any] = set()
    for rec in records:
        pid = (rec.get("pids") or [None])[-1]
        yield rec, pid not in seen
        seen.add(pid)


def stage_table(summary: RunSummary, mpix_band: float) -> dict[str, dict[str, float]]:
    """Per stage: wall and CPU seconds per megapixel per band, summed over tiles, and the highest
    resident set of a worker while the stage ran (MB; None where not measurable), over all tiles
    and over each worker's first tile only (a fresh worker: what one tile needs, without the heap
    kept from earlier tiles). The FITS read and Zarr write phases appear as ``(read)`` and
    ``(write)`` with their peaks only."""
    tot: dict[str, dict[str, Any]] = {}

    def peak(d: dict[str, Any], v: float | None, first: bool) -> None:
        if v is None:
            return
        for key in ("peak_rss_mb", "first_tile_peak_rss_mb") if first else ("peak_rss_mb",):
            d[key] = max(d.get(key) or 0.0, float(v))

    def phases(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = dict(rec.get("stages", {}))
        out.update({f"({ph})": {"peak_rss_mb": rec.get(f"{ph}_peak_rss_mb")} for ph in ("read", "write")})
        return out

    for rec, first in with_first_flags(summary.records):
        for name, st in phases(rec).items():
            d = tot.setdefault(name, {"peak_rss_mb": None, "first_tile_peak_rss_mb": None})
            if not name.startswith("("):
                d["seconds"] = d.get("seconds", 0.0) + st.get("seconds", 0.0)
                d["cpu_seconds"] = d.get("cpu_seconds", 0.0) + st.get("cpu_seconds", 0.0)
            peak(d, st.get("peak_rss_mb"), first)
    for v in tot.values():
        if "seconds" in v:
            v["wall_s_per_mpix_band"] = v["seconds"] / mpix_band
            v["cpu_s_per_mpix_band"] = v.pop("cpu_seconds") / mpix_band
    return tot


def time_budget(summary: RunSummary, wall: float, workers: int) -> dict[str, float]:
    """Shares of worker time: FITS read, Zarr write, stage compute, and the rest (orchestration)."""
    read = sum(r.get("read_seconds", 0.0) for r in summary.records)
    write = sum(r.get("write_seconds", 0.0) for r in summary.records)
    compute = sum(st.get("seconds", 0.0) for r in summary.records for st in r.get("stages", {}).values())
    capacity = wall * workers
    return {"read_s": read, "write_s": write, "compute_s": compute, "capacity_s": capacity,
            "io_share": (read + write) / capacity, "compute_share": compute / capacity,
            "orchestration_share": max(0.0, capacity - read - write - compute) / capacity}


def independent_shards_tile_seconds(manifest: Path, out: Path, n: int, stages: str, device: str) -> dict[str, float]:
    """Per-tile processing seconds with the release split into ``n`` shards run at once by ``n``
    separate ``surveypipe run --workers 1`` processes (a job array on one node). Each process's
    first tile is left out (it pays the imports and model loading), so the others compare with the
    same tiles in a one-worker run: how much the busy cores slow each other down. Empty if a
    shard failed or no shard had a second tile."""
    from workflows import surveypipe_command

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = out / "config.yaml"
    cfg.write_text(json.dumps({"stages": stages, "device": device}))
    procs = [subprocess.Popen(surveypipe_command("run", manifest, "--out", out / f"shard{i}", "--shard", f"{i}/{n}",
                                                 "--workers", "1", "--no-progress", "--config", cfg),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    errs = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        print(f"    control run failed (exit codes {[p.returncode for p in procs]}): {max(errs, key=len)[-500:]}")
        return {}
    runs = [json.loads(sorted((out / f"shard{i}" / "runs").glob("*.json"))[-1].read_text()) for i in range(n)]
    return {r["tile"]: float(r["seconds"]) for run in runs for r in run["records"][1:]}  # records in completion order


def sextractor_run(manifest: Path, config: PipelineConfig, work: Path) -> dict[str, Any] | None:
    """SExtractor's own processes over every tile of the release, as a user would run it for the same
    catalogue: dual-image mode on the pipeline's own detection image (the matched-filter S/N coadd of
    the detection bands, so the same threshold in sigma finds the same objects), measurement in every
    band with the pipeline's artefact mask as zero weight, settings matched to the stage configs
    (:func:`workflows.bench.sextractor.matched_settings`). The stages that make the detection image and
    the mask run first and are not timed, nor is the FITS writing for SExtractor, so SExtractor gets
    the detection image for free. Returns the seconds and the object counts; None when SExtractor is
    not installed or the stage list lacks a stage that it is matched to."""
    from pipeline.cluster import limit_math_threads
    from pipeline.tile import load_tile
    from stages.detection import detection_planes
    from workflows.bench import sextractor as sx

    if sx.executable() is None:
        return None
    plan = {s.name: s for s in config.load_stages()}
    if not {"background", "detection", "photometry"} <= set(plan):
        return None
    cfgs = config.stage_configs(list(plan.values()))
    settings = sx.matched_settings(cfgs["detection"], cfgs["photometry"], cfgs["background"])
    m = load_manifest(manifest)
    tile_s: dict[str, float] = {}
    n_sex, n_ours = 0, 0
    for spec in m.tiles:
        tile = load_tile(m, spec)
        # copies: the background stage subtracts the sky in the exposure's own planes
        images = {b: np.array(tile.image[b]) for b in tile.bands}
        weights = {b: np.array(tile.weight[b]) for b in tile.bands}
        products: dict[str, Any] = {"exposure": tile}
        with limit_math_threads(1):
            for name in ("artefacts", "background", "detection"):
                if name in plan:
                    st = plan[name]
                    products.update(st.run({r: products[r] for r in (*st.requires, *st.optional) if r in products},
                                           cfgs[name]))
        _, _, snr, nodata = detection_planes(tile, products["sky"], products["detections"].attrs)
        if "masks/artefacts" in products:
            weights = sx.masked_weights(weights, products["masks/artefacts"].planes)
        n_ours += len(products["detections"])
        del products, tile
        res = sx.run_dual(snr, (~nodata).astype(np.float32), images, weights, settings, work / spec.id)
        tile_s[spec.id] = res.wall_s
        n_sex += len(res.x)
        shutil.rmtree(work / spec.id, ignore_errors=True)
    return {"seconds": sum(tile_s.values()), "tile_s": tile_s, "objects": n_sex, "our_detections": n_ours}


def steady_state_ratios(summary: RunSummary, sextractor_tile_s: dict[str, float]) -> dict[str, Any] | None:
    """Ours / SExtractor on the tiles that were not a worker's first (records in completion order).

    A worker's first tile also pays the lazy imports, the ONNX sessions, the model checks and the
    first growth of the heap: about 1.4 s on a 2048² x 6 tile here, once per worker. A release
    has thousands of tiles per worker, so these ratios are what it sees; None with no such tile."""
    ours_all = ours_classical = sex = 0.0
    tiles = []
    for rec, first in with_first_flags(summary.records):
        if first or rec["tile"] not in sextractor_tile_s:
            continue
        st = rec.get("stages", {})
        read = rec.get("read_seconds", 0.0)
        ours_all += read + sum(v.get("seconds", 0.0) for v in st.values())
        ours_classical += read + sum(st[n].get("seconds", 0.0) for n in CLASSICAL if n in st)
        sex += sextractor_tile_s[rec["tile"]]
        tiles.append(rec["tile"])
    if not tiles or sex <= 0:
        return None
    return {"tiles": tiles, "ratio_classical": ours_classical / sex, "ratio_pipeline": ours_all / sex}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="surveypipe bench performance", description=__doc__)
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--bands", default="ugrizy")
    ap.add_argument("--seed", type=int, default=BENCH_SEED, help="release seed (the many-small-tiles release uses seed + 1)")
    ap.add_argument("--seed-purpose", default="benchmark", choices=["benchmark", "test"],
                    help="range the seeds must come from (test: smoke runs of the benchmark itself)")
    ap.add_argument("--workers", default="1,2", help="worker counts for the scaling test")
    ap.add_argument("--small-tiles", type=int, default=32, help="tiles of the many-small-tiles run")
    ap.add_argument("--small-size", type=int, default=256)
    ap.add_argument("--stages", default="stages:DEFAULT_STAGES", help="stage list (module:LIST)")
    ap.add_argument("--out", default="out/bench/performance")
    ap.add_argument("--device", default="cpu", choices=["cpu", "auto", "cuda"],
                    help="ONNX Runtime device of the pipeline's model stages and of the model table")
    ap.add_argument("--no-models", action="store_true", help="skip the ONNX Runtime vs PyTorch table")
    a = ap.parse_args(argv)
    check_seed(a.seed, a.seed_purpose)
    check_seed(a.seed + 1, a.seed_purpose)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for line in machine_header():
        print(line)
    t = time.perf_counter()
    manifest = simulate(out / "release", a.tiles, a.size, a.bands, a.seed)
    print(f"release: {a.tiles} tiles of {a.size}x{a.size} px in {len(a.bands)} bands (seed {a.seed}); "
          f"simulated/reused in {time.perf_counter() - t:.1f} s")
    config = PipelineConfig(stages=a.stages, device=a.device)
    mpix = a.tiles * a.size * a.size / 1e6
    mpix_band = mpix * len(a.bands)
    tile_pixel_bytes = tile_bytes(manifest)
    results: dict[str, Any] = {"tiles": a.tiles, "size": a.size, "bands": a.bands, "runs": {}}
    walls: dict[int, float] = {}
    summaries: dict[int, RunSummary] = {}
    for n in [int(x) for x in a.workers.split(",")]:
        summary, wall, rss, idle = run_once(manifest, out / f"run-w{n}", n, config)
        if summary.failed:
            print(f"FAILED tiles with {n} workers: {summary.failed}")
            return 1
        walls[n] = wall
        summaries[n] = summary
        results["runs"][n] = {"wall_s": wall, "tile_s": {r["tile"]: float(r["seconds"]) for r in summary.records},
                              "peak_rss_mb": rss, "idle_rss_mb": idle, "stages": stage_table(summary, mpix_band),
                              "budget": time_budget(summary, wall, n)}
    n1 = min(walls)
    base = results["runs"][n1]
    print(f"\nper stage ({n1} worker{'s' if n1 > 1 else ''}; seconds per megapixel per band, summed over tiles)")
    print(f"{'stage':14s} {'wall s/MPix/band':>18s} {'CPU s/MPix/band':>17s} {'peak RSS MB, 1st tile':>22s} "
          f"{'any tile':>9s}")
    classical_s = 0.0
    total_s = 0.0
    for name, v in base["stages"].items():
        pk = "".join(f"{v[k]:{w}.0f}" if v.get(k) is not None else f"{'-':>{w}s}"
                     for k, w in (("first_tile_peak_rss_mb", 22), ("peak_rss_mb", 10)))
        if "seconds" not in v:  # the read and write phases: memory only (their times are in the budget below)
            print(f"{name:14s} {'':18s} {'':17s} {pk}")
            continue
        print(f"{name:14s} {v['wall_s_per_mpix_band']:18.4f} {v['cpu_s_per_mpix_band']:17.4f} {pk}")
        total_s += v["seconds"]
        if name in CLASSICAL:
            classical_s += v["seconds"]
    b = base["budget"]
    print(f"\ntime budget ({n1} worker): FITS read {b['read_s']:.2f} s, Zarr write {b['write_s']:.2f} s, "
          f"stage compute {b['compute_s']:.2f} s, of {b['capacity_s']:.2f} worker-seconds")
    print(f"  shares: I/O {100 * b['io_share']:.1f} %, compute {100 * b['compute_share']:.1f} %, "
          f"orchestration {100 * b['orchestration_share']:.1f} %")
    peak = max(base["peak_rss_mb"])
    idle = max(base["idle_rss_mb"])
    print(f"peak resident memory per worker: {peak:.0f} MB ({idle:.0f} MB of it is the idle worker with its "
          f"libraries loaded); one tile's pixel data (its FITS files: image, weight and mask of {len(a.bands)} bands "
          f"of {a.size}²): "
          f"{tile_pixel_bytes / 2**20:.0f} MB; ratio peak/tile {peak * 2**20 / tile_pixel_bytes:.2f}, "
          f"(peak − idle)/tile {(peak - idle) * 2**20 / tile_pixel_bytes:.2f} (goal ≤ 3)")
    first = max((v.get("first_tile_peak_rss_mb") or 0.0) for v in base["stages"].values())
    if first:
        print(f"  first tile of a fresh worker: {first:.0f} MB, ratio {first * 2**20 / tile_pixel_bytes:.2f} (later "
              f"tiles start from a warm worker: what the first tile imported and initialised stays resident)")
        base["first_tile_peak_rss_mb"] = first
    cores = n1
    print(f"whole-pipeline throughput: {mpix / walls[n1] / cores:.3f} MPix/s/core of sky, "
          f"{mpix_band / walls[n1] / cores:.3f} band-MPix/s/core (wall {walls[n1]:.1f} s)")
    if len(walls) > 1:
        print("\nscaling (efficiency = T1 / (N·TN), goal ≥ 0.9):")
        for n, w in sorted(walls.items()):
            eff = walls[n1] * n1 / (n * w)
            bud = results["runs"][n]["budget"]
            print(f"  {n} workers: wall {w:.1f} s, efficiency {eff:.2f}, orchestration {100 * bud['orchestration_share']:.1f} %")
            results["runs"][n]["efficiency"] = eff
            if n > 1:  # the machine's own ceiling: how much slower a tile runs when n cores are busy
                ind = independent_shards_tile_seconds(manifest, out / f"run-shards{n}", n, a.stages, a.device)
                if ind:
                    one = sum(results["runs"][n1]["tile_s"][t] for t in ind)
                    ceiling = one / sum(ind.values())
                    print(f"    control: the same tiles in {n} independent one-worker processes at once (`surveypipe run "
                          f"--shard i/{n}`, no shared scheduler): {sum(ind.values()):.1f} s for {len(ind)} tiles vs "
                          f"{one:.1f} s in the one-worker run, so no engine can exceed an efficiency of {ceiling:.2f} "
                          f"here; the Dask run reaches {eff / ceiling:.2f} of that ceiling")
                    results["runs"][n]["independent_tile_s"] = ind
                    results["runs"][n]["machine_ceiling"] = ceiling
                else:
                    print("    control: no tile beyond each shard's first (needs ≥ 2 tiles per worker) or a shard failed")
    # per-task overhead: many small tiles
    small = simulate(out / "small-release", a.small_tiles, a.small_size, a.bands, a.seed + 1)
    nmax = max(walls)
    summary, wall, _, _ = run_once(small, out / "run-small", nmax, config)
    compute = sum(r.get("seconds", 0.0) for r in summary.records)
    overhead = (wall * nmax - compute) / max(1, a.small_tiles)
    print(f"\nmany small tiles: {a.small_tiles} tiles of {a.small_size}² on {nmax} workers: wall {wall:.1f} s, "
          f"task time {compute:.1f} s, per-task overhead {overhead * 1000:.0f} ms/tile")
    results["small_tiles"] = {"wall_s": wall, "task_s": compute, "overhead_s_per_tile": overhead}
    sxr = sextractor_run(manifest, config, out / "sextractor")
    if sxr is not None:
        sx = sxr["seconds"]
        print(f"\nSExtractor (dual-image on our detection image, all {len(a.bands)} bands, 1 core): {sx:.1f} s "
              f"= {sx / mpix_band:.4f} s/MPix/band; it catalogued {sxr['objects']} objects, our detection stage "
              f"{sxr['our_detections']}")
        read_s = base["budget"]["read_s"]
        print(f"  our classical stages + FITS read / SExtractor: {(classical_s + read_s) / sx:.2f} (goal ≤ 0.5)")
        print(f"  our whole pipeline (all stages on the CPU + FITS read) / SExtractor: {(total_s + read_s) / sx:.2f} (goal ≤ 3)")
        steady = steady_state_ratios(summaries[n1], sxr["tile_s"])
        if steady:
            print(f"  steady state, each worker's tiles after its first ({', '.join(steady['tiles'])}; a first tile also "
                  f"pays the imports, sessions and heap growth, once per worker): classical + read / SExtractor "
                  f"{steady['ratio_classical']:.2f}, whole pipeline / SExtractor {steady['ratio_pipeline']:.2f}")
            results["steady_state"] = steady
        results["sextractor_objects"] = sxr["objects"]
        results["our_detections"] = sxr["our_detections"]
        results["sextractor_s"] = sx
        results["ratio_classical"] = (classical_s + read_s) / sx
        results["ratio_pipeline"] = (total_s + read_s) / sx
    else:
        print("\nSExtractor: not run (it needs Debian's source-extractor, `make system-packages`, and the "
              "background, detection and photometry stages in the stage list)")
    if not a.no_models:
        from workflows.bench.model_speed import model_speeds, print_model_speeds

        rows = model_speeds(a.device)
        print_model_speeds(rows)
        results["models"] = rows
    (out / "performance.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"\nnumbers written to {out / 'performance.json'}")
    return 0
