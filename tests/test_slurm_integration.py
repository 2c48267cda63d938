"""surveypipe on a real single-node SLURM (slurmctld + slurmd + munge on localhost).

The session fixture brings the cluster up with deploy/slurm/local-cluster.sh (as root; it installs
the Debian packages when missing) and takes it down again if it started it. Tests skip only when
SLURM cannot start here (not root, no packages); SURVEYPIPE_REQUIRE_SLURM=1 (CI) makes that a
failure. Jobs are followed by polling squeue, never `sbatch --wait` (which polls slowly).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slurm

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DEPLOY = REPO / "deploy" / "slurm"
LOCAL_CLUSTER = DEPLOY / "local-cluster.sh"
SURVEYPIPE = str(Path(sys.executable).with_name("surveypipe"))
WORKER_JOB = "surveypipe-worker"


# --------------------------------------------------------------------------- helpers

def squeue() -> list[dict[str, str]]:
    """Jobs SLURM lists now (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True, check=True).stdout
    return [dict(zip(("id", "name", "state"), line.split("|"))) for line in out.splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; squeue: {squeue()}")
        time.sleep(interval)


def job_states(job_id: str) -> list[str]:
    """JobState of a job (every task of an array), from slurmctld's memory (MinJobAge=300 s)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return re.findall(r"JobState=(\w+)", out)


def no_worker_jobs() -> bool:
    return not [j for j in squeue() if j["name"].startswith(WORKER_JOB)]


def catalogue(out: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Every table product of every tile: {tile: {product: {column: values}}}."""
    from pipeline.store import CatalogStore

    store = CatalogStore(out)
    cat = {}
    for t in store.tile_ids():
        assert store.is_complete(t), f"{out}: tile {t} not complete"
        cat[t] = {}
        for p in store.stored_products(t):
            prod = store.read_product(t, p)
            if hasattr(prod, "columns"):
                cat[t][p] = dict(prod.columns)
    return cat


def assert_same_catalogue(a: Path, b: Path, products: tuple[str, ...] | None = None) -> None:
    ca, cb = catalogue(a), catalogue(b)
    assert sorted(ca) == sorted(cb), "same tiles"
    for t in ca:
        prods = products or tuple(ca[t])
        assert set(prods) <= set(cb[t]), f"{t}: products {prods} vs {sorted(cb[t])}"
        for p in prods:
            assert list(ca[t][p]) == list(cb[t][p]), f"{t}/{p}: same columns in the same order"
            for c, v in ca[t][p].items():
                assert v.dtype == cb[t][p][c].dtype and v.tobytes() == cb[t][p][c].tobytes(), f"{t}/{p}/{c} differs"


def sp(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([SURVEYPIPE, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"surveypipe {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def jobqueue_file(path: Path, logs: Path, **slurm) -> Path:
    """A test site: 1-core 2 GB jobs on the local `debug` partition, all on 127.0.0.1."""
    conf = {"slurm": {"queue": "debug", "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00",
                      "interface": "lo", "log-directory": str(logs), **slurm}}
    path.write_text(yaml.safe_dump(conf))
    return path


# --------------------------------------------------------------------------- fixtures

def _cannot_start(reason: str):
    if os.environ.get("SURVEYPIPE_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM required (SURVEYPIPE_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def local_slurm():
    """A running single-node SLURM; started (and later stopped) here unless one already runs."""
    up = shutil.which("sinfo") and subprocess.run([str(LOCAL_CLUSTER), "status"], capture_output=True).returncode == 0
    if up:
        yield
        return
    if os.geteuid() != 0:
        _cannot_start(f"a local SLURM needs root to start (deploy/slurm/local-cluster.sh); running as uid {os.geteuid()}")
    t0 = time.monotonic()
    r = subprocess.run([str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if r.returncode in (10, 11):
        _cannot_start(f"local SLURM cannot start here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, f"local-cluster.sh start failed ({r.returncode}):\n{r.stderr}"
    print(f"local SLURM started in {time.monotonic() - t0:.1f} s")
    try:
        yield
    finally:
        subprocess.run([str(LOCAL_CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def release(tmp_path_factory, local_slurm) -> Path:
    """A 2-tile mock release (256x256 px, bands g and r) written by `surveypipe simulate`."""
    root = tmp_path_factory.mktemp("slurm-release")
    sp("simulate", "--out", str(root), "--tiles", "2", "--size", "256", "--bands", "gr", "--seed", "11")
    return root / "manifest.yaml"


@pytest.fixture(scope="module")
def local_reference(release, tmp_path_factory) -> tuple[Path, Path]:
    """The same release through a LocalCluster: (run directory, exported Parquet)."""
    root = tmp_path_factory.mktemp("slurm-local-ref")
    out = root / "out"
    sp("run", str(release), "--out", str(out), "--cluster", "local", "--workers", "1", "--no-progress")
    sp("export", str(out), "--format", "parquet", "--to", str(root / "catalog.parquet"))
    return out, root / "catalog.parquet"


@pytest.fixture(autouse=True)
def no_leftover_jobs(local_slurm):
    """Each test starts and ends with no surveypipe job in the queue."""
    wait_for(lambda: not [j for j in squeue() if j["name"].startswith("surveypipe")], 30, "an empty queue")
    yield
    wait_for(lambda: not [j for j in squeue() if j["name"].startswith("surveypipe")], 30,
             "this test's jobs to leave the queue")


# --------------------------------------------------------------------------- tests

def test_smoke_sbatch(tmp_path):
    """The scheduler runs a plain batch job (polls squeue, not sbatch --wait)."""
    out = tmp_path / "hostname.out"
    job = subprocess.run(["sbatch", "--parsable", "-J", "surveypipe-smoke", "-o", str(out), "--wrap", "hostname"],
                         capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: job not in {j["id"] for j in squeue()}, 30, f"job {job}")
    assert job_states(job) == ["COMPLETED"]
    assert out.read_text().strip()


def test_slurmcluster_run_equals_localcluster(release, local_reference, tmp_path):
    """`surveypipe run --cluster slurm`: workers are SLURM jobs and the catalogue is the local one."""
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    conf = jobqueue_file(tmp_path / "jobqueue.yaml", logs)
    proc = subprocess.Popen([SURVEYPIPE, "run", str(release), "--out", str(out), "--cluster", "slurm",
                             "--jobqueue-config", str(conf), "--min-jobs", "2", "--max-jobs", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, set[str]] = {}
    try:
        while proc.poll() is None:
            for j in squeue():
                if j["name"] == WORKER_JOB:
                    seen.setdefault(j["id"], set()).add(j["state"])
            time.sleep(0.2)
        text = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text
    running = [jid for jid, states in seen.items() if "RUNNING" in states]
    assert running, f"no worker job seen running in squeue: {seen}"
    assert len(seen) == 2, f"--min-jobs 2 --max-jobs 2 submits two worker jobs: {seen}"
    # the workers wrote their logs where the jobqueue file said: they really ran as SLURM jobs
    assert {p.name for p in logs.glob("*.err")} >= {f"{WORKER_JOB}-{jid}.err" for jid in running}
    wait_for(no_worker_jobs, 30, "the worker jobs to be cancelled when the run ends")

    ref_out, ref_parquet = local_reference
    assert_same_catalogue(ref_out, out)
    sp("export", str(out), "--format", "parquet", "--to", str(tmp_path / "catalog.parquet"))
    import pyarrow.parquet as pq

    a, b = pq.read_table(ref_parquet), pq.read_table(tmp_path / "catalog.parquet")
    assert a.num_rows > 0 and a.schema.equals(b.schema)
    # pandas' equals treats NaN in the same place as equal (unscored objects carry NaN scores)
    assert a.to_pandas().equals(b.to_pandas()), "exported catalogues identical row for row"


def test_scancel_a_worker_mid_run_every_tile_once(release, tmp_path):
    """A worker job cancelled mid-tile: its tile is redone elsewhere, adapt replaces the job."""
    from distributed import Client

    from helpers_stages import CLASSICAL
    from pipeline.config import PipelineConfig
    from pipeline.execute import run_release
    from pipeline.manifest import load_manifest
    from pipeline.slurm import make_slurm_cluster, slurm_settings, start_adaptive
    from pipeline.store import CatalogStore

    manifest = load_manifest(release)
    tiles = sorted(t.id for t in manifest.tiles)
    slow = PipelineConfig(stages=[CLASSICAL, "helpers_stages:Slow"], stage_config={"slow": {"seconds": 4.0}},
                          retries=0)
    # workers import the test-only Slow stage from tests/
    conf = jobqueue_file(tmp_path / "jobqueue.yaml", tmp_path / "logs",
                         **{"job-script-prologue": [f'export PYTHONPATH="{TESTS}${{PYTHONPATH:+:$PYTHONPATH}}"']})
    settings = slurm_settings(conf, {})
    out = tmp_path / "out"
    with make_slurm_cluster(settings) as cluster, Client(cluster) as client:
        start_adaptive(cluster, minimum_jobs=2, maximum_jobs=2)
        client.wait_for_workers(2, timeout=90)
        # the job script's prologue reached the workers: Dask's profiler off, as on a LocalCluster
        profiling = client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled"))
        assert set(profiling.values()) == {False}, profiling
        first_jobs = {job.job_id for job in cluster.workers.values()}
        assert first_jobs <= {j["id"] for j in squeue() if j["name"] == WORKER_JOB}, "workers are SLURM jobs"

        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(
            summary=run_release(manifest, out, slow, client, progress=False)), daemon=True)
        runner.start()

        def busy_worker():  # a worker in the middle of a tile
            busy = [addr for addr, keys in client.processing().items() if any("tile-" in str(k) for k in keys)]
            return busy[0] if len(busy) == 2 else None

        addr = wait_for(busy_worker, 60, "both workers to be processing a tile")
        time.sleep(1.0)  # inside the tile task (the Slow stage sleeps 4 s of it)
        name = client.scheduler_info(n_workers=-1)["workers"][addr]["name"]
        victim = cluster.workers[name].job_id
        subprocess.run(["scancel", victim], check=True)
        wait_for(lambda: victim not in {j["id"] for j in squeue()}, 30, f"job {victim} to leave the queue")

        runner.join(timeout=120)
        assert not runner.is_alive(), "run_release did not finish"
        summary = result["summary"]
        assert not summary.failed, summary.text()
        assert sorted(summary.done + summary.skipped) == tiles, "every tile exactly once"
        assert len(summary.done) == len(set(summary.done))

        # adapt(minimum_jobs=2) replaced the cancelled job (after the 15 s lost-worker timeout)
        def replaced():
            running = {j["id"] for j in squeue() if j["name"] == WORKER_JOB and j["state"] == "RUNNING"}
            return len(running) == 2 and running - first_jobs
        wait_for(replaced, 60, "a replacement worker job")
        # the catalogue an undisturbed run makes (same stages, no sleeping), on the healed cluster
        ref = tmp_path / "ref"
        fast = slow.model_copy(update={"stage_config": {"slow": {"seconds": 0.0}}})
        assert run_release(manifest, ref, fast, client, progress=False).done == tiles
    wait_for(no_worker_jobs, 30, "the worker jobs to be cancelled at close")

    store = CatalogStore(out)
    assert store.tile_ids() == tiles and all(store.is_complete(t) for t in tiles)
    assert not store.failures()
    for t in tiles:  # the Slow stage ran to completion on every tile, once
        assert np.array_equal(store.read_table(t, "slowtable")["objectId"], store.read_table(t, "objects")["objectId"])
    assert_same_catalogue(ref, out, products=("objects", "slowtable"))


def test_job_array_then_dependent_export(release, local_reference, tmp_path):
    """submit-array.sh: N shards as an array, then an afterok job that checks and exports."""
    import pyarrow.parquet as pq

    from pipeline.manifest import load_manifest

    out = tmp_path / "out"
    dest = tmp_path / "release.parquet"
    env = dict(os.environ, SURVEYPIPE=SURVEYPIPE)
    r = subprocess.run([str(DEPLOY / "submit-array.sh"), "--shards", "2", "--export", str(dest),
                        "--name", "surveypipe-array-test", str(release), str(out)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    ids = dict(line.split("=", 1) for line in r.stdout.split())
    array_id, final_id = ids["ARRAY_JOB_ID"], ids["FINALIZE_JOB_ID"]

    wait_for(lambda: not ({array_id, final_id} & {j["id"].split("_")[0] for j in squeue()}), 120,
             f"array {array_id} and finalize {final_id}")
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((out / "logs").glob("*.out")))
    assert job_states(array_id) == ["COMPLETED", "COMPLETED"], logs
    assert job_states(final_id) == ["COMPLETED"], logs
    assert sorted(p.name for p in (out / "logs").glob("*.out")) == sorted(
        [f"surveypipe-array-test-{array_id}_0.out", f"surveypipe-array-test-{array_id}_1.out",
         f"surveypipe-array-test-finalize-{final_id}.out"])

    tiles = sorted(t.id for t in load_manifest(release).tiles)
    merged = pq.read_table(dest).to_pandas()
    assert sorted(merged["tile_id"].unique()) == tiles, "every tile's objects are in the merged output"
    assert merged["objectId"].is_unique, "each object once"
    ref = pq.read_table(local_reference[1]).to_pandas()
    assert len(merged) == len(ref) > 0
    key = ["tile_id", "objectId"]
    a = merged.sort_values(key).reset_index(drop=True)
    b = ref.sort_values(key).reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        assert a[c].equals(b[c]), f"column {c} differs from the LocalCluster run"
    assert_same_catalogue(local_reference[0], out)


def test_job_array_finalize_refuses_an_incomplete_run(release, local_reference, tmp_path):
    """The finalize job alone, on a run missing a tile: it fails and exports nothing."""
    out = tmp_path / "out"
    shutil.copytree(local_reference[0], out)
    shutil.rmtree(out / "catalog.zarr" / "tiles" / "t0001")  # as if shard 1 never ran
    log = tmp_path / "finalize.out"
    dest = tmp_path / "never.parquet"
    env = dict(os.environ, SURVEYPIPE=SURVEYPIPE)
    job = subprocess.run(["sbatch", "--parsable", "-J", "surveypipe-finalize-test", "-o", str(log),
                          str(DEPLOY / "finalize.sbatch"), str(release), str(out), str(dest)],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    wait_for(lambda: job not in {j["id"] for j in squeue()}, 60, f"finalize job {job}")
    assert job_states(job) == ["FAILED"], log.read_text()
    assert "1 of 2 tiles not complete: t0001 (pending)" in log.read_text()
    assert not dest.exists()


def test_heterogeneous_gpu_stage_on_the_gres_worker_job(release, tmp_path):
    """CPU worker jobs + a `--gres=gpu:1` worker job on one scheduler: the GPU stage runs there.

    local-cluster.sh declares one pretend GPU, so the GPU template is scheduled like on a real
    GPU node; the stage itself only records which worker process ran it.
    """
    from distributed import Client

    from helpers_stages import CLASSICAL
    from pipeline.config import PipelineConfig
    from pipeline.execute import run_release
    from pipeline.manifest import load_manifest
    from pipeline.slurm import add_gpu_workers, make_slurm_cluster, slurm_settings, start_adaptive
    from pipeline.store import CatalogStore

    prologue = [f'export PYTHONPATH="{TESTS}${{PYTHONPATH:+:$PYTHONPATH}}"']
    conf = jobqueue_file(tmp_path / "jobqueue.yaml", tmp_path / "logs", **{"job-script-prologue": prologue,
                                                                          "worker-resources": {"CPU": 1}})
    settings = slurm_settings(conf, {})
    manifest = load_manifest(release)
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:GpuCopy"])
    with make_slurm_cluster(settings) as cluster, Client(cluster) as client:
        start_adaptive(cluster, 1, 1)
        with add_gpu_workers(cluster, settings, 1) as gpus:
            client.wait_for_workers(2, timeout=90)
            jobs = {j["id"]: j for j in squeue()}
            assert jobs[gpus.job_ids[0]]["name"] == "surveypipe-gpu-worker"
            gres = subprocess.run(["scontrol", "show", "job", gpus.job_ids[0]], capture_output=True, text=True).stdout
            assert "gres/gpu=1" in gres or "gres:gpu:1" in gres, gres
            info = client.scheduler_info(n_workers=-1)["workers"].values()
            pids = client.run(lambda dask_worker: (dask_worker.name, __import__("os").getpid()))
            pid_of = dict(pids.values())
            resources = {w["name"]: w["resources"] for w in info}
            assert resources["gpu-0"] == {"GPU": 1} and list(resources.values()).count({"CPU": 1}) == 1
            summary = run_release(manifest, tmp_path / "out", cfg, client, progress=False)
        cpu_name = next(n for n in pid_of if n != "gpu-0")
    wait_for(lambda: not [j for j in squeue() if j["name"].startswith("surveypipe")], 30, "all worker jobs to end")
    assert summary.exit_code == 0, summary.text()
    for r in summary.records:  # classical stages in the CPU job, then the GPU stage in the GPU job
        assert r["pids"] == [pid_of[cpu_name], pid_of["gpu-0"]]
    store = CatalogStore(tmp_path / "out")
    for t in store.tile_ids():
        assert set(store.read_table(t, "gputable")["pid"].tolist()) == {pid_of["gpu-0"]}


def test_out_of_memory_tile_is_retried_in_a_bigger_slurm_job(release, tmp_path):
    """A tile that needs more memory than the 600 MB worker jobs have: the engine submits one more
    job with twice the memory (``--mem``) advertising ``MEMORY``, and the tile completes there."""
    from distributed import Client

    from helpers_stages import CLASSICAL
    from pipeline.config import PipelineConfig
    from pipeline.execute import run_release
    from pipeline.manifest import load_manifest
    from pipeline.memory import MEMORY_RESOURCE
    from pipeline.slurm import make_slurm_cluster, slurm_settings
    from pipeline.store import CatalogStore

    prologue = [f'export PYTHONPATH="{TESTS}${{PYTHONPATH:+:$PYTHONPATH}}"']
    conf = jobqueue_file(tmp_path / "jobqueue.yaml", tmp_path / "logs", memory="600MB",
                         **{"job-script-prologue": prologue})
    manifest = load_manifest(release)
    first = sorted(t.id for t in manifest.tiles)[0]
    cfg = PipelineConfig(stages=[CLASSICAL, "helpers_stages:Hog"], retries=0, memory_escalations=2,
                         stage_config={"hog": {"need_mb": 900, "only_tile": first}})
    with make_slurm_cluster(slurm_settings(conf, {})) as cluster, Client(cluster) as client:
        cluster.scale(jobs=1)
        client.wait_for_workers(1, timeout=90)
        summary = run_release(manifest, tmp_path / "out", cfg, client, progress=False)
        workers = list(client.scheduler_info(n_workers=-1)["workers"].values())
        big_jobs = [j for j in squeue() if j["name"].startswith("surveypipe")]
    wait_for(lambda: not [j for j in squeue() if j["name"].startswith("surveypipe")], 30, "all worker jobs to end")
    assert summary.exit_code == 0, summary.text()
    rec = {r["tile"]: r for r in summary.records}
    # dask-jobqueue hands the worker "572.20 MiB" for 600 MB: the base size is 599995187 B
    assert rec[first]["memory_escalations"] == 1 and rec[first]["memory_bytes"] == pytest.approx(1.2e9, rel=1e-4)
    mem = sorted((w.get("resources") or {}).get(MEMORY_RESOURCE, 0) for w in workers)
    assert mem[0] == 0 and mem[1] == pytest.approx(1.2e9, rel=1e-4)
    assert len(big_jobs) == 2, big_jobs  # the plain job and the bigger one
    limits = CatalogStore(tmp_path / "out").read_table(first, "hogtable")["worker_limit"]
    assert np.all(np.asarray(limits) == pytest.approx(1.2e9, rel=1e-2))  # the job's --memory-limit, rounded by jobqueue
