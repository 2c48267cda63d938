"""Dask workers in SLURM jobs: layered jobqueue settings, the SLURMCluster, its job script.

Settings come in layers, lowest first: dask-jobqueue's own defaults and the user's dask config (only
for keys surveypipe leaves null) < ``pipeline/jobqueue_defaults.yaml`` (package defaults) < a user
YAML file (``--jobqueue-config PATH``) < command-line overrides. The result is validated as a whole
before any job is submitted.

Two traps from dask-jobqueue's tracker are handled here rather than left to each site's config:

- workers die at walltime unless ``--lifetime`` is set below it: surveypipe always derives a
  ``--lifetime`` (and ``--lifetime-stagger``) below the walltime, and refuses one that is not;
- site ``#SBATCH`` lines can clash with generated ones: ``job_directives_skip`` drops them.
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

DEFAULTS_FILE = Path(__file__).with_name("jobqueue_defaults.yaml")
# A checkout (not an installed wheel) is put on the workers' PYTHONPATH so they import this code.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEDULER_PLACEHOLDER = "tcp://<scheduler-address>:8786"

_ADAPT_ALIASES = {"min_jobs": "minimum_jobs", "max_jobs": "maximum_jobs",
                  "minimum_jobs": "minimum_jobs", "maximum_jobs": "maximum_jobs"}
# Keyword arguments of SLURMCluster that belong to the cluster (scheduler), not to the job.
_CLUSTER_ONLY = ("scheduler_options", "shared_temp_directory")


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class SlurmJobSettings(BaseModel):
    """One worker job: SLURMCluster keyword arguments plus surveypipe's worker lifetime/resources."""

    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True)

    job_name: str = Field("surveypipe-worker", description="SLURM job name (#SBATCH -J)")
    queue: str | None = Field(None, description="partition (#SBATCH -p)")
    account: str | None = Field(None, description="account (#SBATCH -A)")
    cores: int = Field(1, ge=1, description="threads per job, split over processes")
    processes: int = Field(1, ge=1, description="Dask worker processes per job")
    memory: str = Field("4GB", description="memory per job, e.g. '4GB'")
    walltime: str | None = Field("01:00:00", description="SLURM time limit, e.g. '01:00:00'")
    job_cpu: int | None = Field(None, ge=1, description="--cpus-per-task if not cores")
    job_mem: str | None = Field(None, description="--mem if not derived from memory")
    worker_lifetime: str | None = Field("auto", description="dask-worker --lifetime; 'auto', or null/'off'")
    worker_lifetime_stagger: str | None = Field("auto", description="dask-worker --lifetime-stagger")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="Dask worker resources")
    interface: str | None = Field(None, description="network interface for scheduler and workers")
    protocol: str | None = Field(None, description="e.g. 'tcp://'")
    death_timeout: int | None = Field(60, ge=1, description="s a worker waits for its scheduler")
    local_directory: str | None = Field(None, description="node-local scratch for spilling")
    log_directory: str | None = Field(None, description="where SLURM writes worker logs")
    job_extra_directives: list[str] = Field(default_factory=list, description="extra #SBATCH lines")
    job_directives_skip: list[str] = Field(default_factory=list, description="drop #SBATCH lines containing these")
    job_script_prologue: list[str] = Field(default_factory=list, description="shell lines before the worker")
    worker_extra_args: list[str] = Field(default_factory=list, description="more dask-worker arguments")
    worker_command: str | None = Field(None, description="module run as the worker")
    nanny: bool = Field(True, description="run workers under a nanny")
    worker_profile: bool = Field(False, description="Dask's statistical profiler in the workers (costs ~3 % CPU)")
    shebang: str | None = Field(None, description="first line of the job script")
    python: str | None = Field(None, description="worker interpreter; null: this one")
    scheduler_options: dict[str, Any] = Field(default_factory=dict, description="Scheduler kwargs")
    shared_temp_directory: str | None = Field(None, description="for TLS temporary files")

    @field_validator("worker_lifetime", "worker_lifetime_stagger", "memory", "job_mem", mode="before")
    @classmethod
    def _number_to_text(cls, v: Any) -> Any:  # lifetimes in seconds, memory in bytes
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("walltime", mode="before")
    @classmethod
    def _quoted_walltime(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise ValueError(f"walltime {v!r} is a number: quote it, e.g. '01:00:00' "
                             "(YAML reads an unquoted 1:00:00 as the number 3600)")
        return v

    @field_validator("memory", "job_mem")
    @classmethod
    def _bytes(cls, v: str | None) -> str | None:
        if v is not None:
            from dask.utils import parse_bytes
            try:
                parse_bytes(v)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"not a memory size: {v!r} (use e.g. '4GB')") from exc
        return v

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str | None) -> str | None:
        if v is not None:
            walltime_seconds(v)
        return v


class GpuOverrides(BaseModel):
    """What a GPU worker job changes relative to the CPU one: each key given replaces it."""

    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True)

    job_name: str | None = None
    queue: str | None = None
    account: str | None = None
    cores: int | None = Field(None, ge=1)
    processes: int | None = Field(None, ge=1)
    memory: str | None = None
    walltime: str | None = None
    job_cpu: int | None = Field(None, ge=1)
    job_mem: str | None = None
    worker_lifetime: str | None = None
    worker_lifetime_stagger: str | None = None
    worker_resources: dict[str, float] | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    job_extra_directives: list[str] | None = None
    job_directives_skip: list[str] | None = None
    job_script_prologue: list[str] | None = None
    worker_extra_args: list[str] | None = None


class AdaptSettings(BaseModel):
    """Bounds of adaptive scaling, in SLURM jobs."""

    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True)

    minimum_jobs: int = Field(1, ge=0, description="jobs kept even when idle (lost ones are replaced)")
    maximum_jobs: int = Field(8, ge=1, description="jobs at most")


class SlurmSettings(BaseModel):
    """All of it: the CPU job, the GPU variant, adaptive bounds."""

    model_config = ConfigDict(extra="forbid")

    slurm: SlurmJobSettings = Field(default_factory=SlurmJobSettings)
    adapt: AdaptSettings = Field(default_factory=AdaptSettings)
    gpu: GpuOverrides = Field(default_factory=GpuOverrides)


# --------------------------------------------------------------------------- time arithmetic

def walltime_seconds(walltime: str) -> int:
    """Seconds in a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    text = str(walltime).strip()
    days, dash, rest = text.partition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days)
    except ValueError:
        parts, d = [], -1
    if dash and 1 <= len(parts) <= 3:      # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    elif not dash and len(parts) == 1:     # MM
        h, m, s = 0, parts[0], 0
    elif not dash and len(parts) == 2:     # MM:SS
        h, m, s = 0, parts[0], parts[1]
    elif not dash and len(parts) == 3:     # HH:MM:SS
        h, m, s = parts
    else:
        h = m = s = -1
    if min(d, h, m, s) < 0:
        raise ValueError(f"not a SLURM walltime: {walltime!r} (use HH:MM:SS or D-HH:MM:SS)")
    return ((d * 24 + h) * 60 + m) * 60 + s


_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


def duration_seconds(value: str | float) -> float:
    """Seconds in '50m', '3h30m', '1 hour', '90' (seconds) or a SLURM-style 'HH:MM:SS'."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    if ":" in text:
        return float(walltime_seconds(text))
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if not parts or re.sub(r"[\d.\sa-z]", "", text) or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ConfigError(f"not a duration: {value!r} (use e.g. '50m', '3h30m', '5400s')")
    total = 0.0
    for number, unit in parts:
        if unit and unit not in _UNITS:
            raise ConfigError(f"not a duration: {value!r} (unknown unit {unit!r})")
        total += float(number) * _UNITS[unit or "s"]
    return total


def _fmt_seconds(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m" if s % 60 == 0 and s >= 60 else f"{s}s"


def worker_lifetime(job: SlurmJobSettings) -> tuple[str, str] | None:
    """(--lifetime, --lifetime-stagger) for a job, derived or checked against its walltime.

    ``auto`` leaves a margin of clamp(10 % of walltime, 60 s, 600 s) and staggers by half of it,
    so that lifetime + stagger stays below the walltime and workers retire before SLURM kills them.
    """
    if job.worker_lifetime is None or str(job.worker_lifetime).lower() in ("off", "none", "no"):
        return None
    if job.walltime is None:
        if job.worker_lifetime == "auto":
            return None
        wall = None
    else:
        wall = walltime_seconds(job.walltime)
    margin = min(max(0.1 * wall, 60.0), 600.0) if wall is not None else 0.0
    if job.worker_lifetime == "auto":
        if wall <= 2 * 60:
            raise ConfigError(f"walltime {job.walltime!r} is too short to derive a worker lifetime; "
                              "set worker-lifetime explicitly or raise the walltime")
        lifetime = wall - margin
    else:
        lifetime = duration_seconds(job.worker_lifetime)
    stagger_raw = job.worker_lifetime_stagger
    if stagger_raw in (None, "auto"):
        stagger = margin / 2 if stagger_raw == "auto" else 0.0
    else:
        stagger = duration_seconds(stagger_raw)
    if lifetime <= 0 or stagger < 0 or stagger >= lifetime:
        raise ConfigError(f"worker lifetime {lifetime:.0f} s with stagger {stagger:.0f} s is not usable")
    if wall is not None and lifetime + stagger >= wall:
        raise ConfigError(
            f"worker lifetime {_fmt_seconds(lifetime)} + stagger {_fmt_seconds(stagger)} reaches the "
            f"walltime {job.walltime}: SLURM would kill workers before they retire. "
            "Lower worker-lifetime or use 'auto'.")
    return _fmt_seconds(lifetime), _fmt_seconds(stagger)


# --------------------------------------------------------------------------- layering

def _normalise(obj: Any) -> Any:
    """Keys '-' -> '_' at the section level, recursively, except inside free-form mappings."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = str(k).replace("-", "_")
            # worker_resources and scheduler_options hold user names (GPU, dashboard_address): keep.
            out[key] = v if key in ("worker_resources", "scheduler_options") else _normalise(v)
        return out
    return obj


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; everything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"jobqueue config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"jobqueue config {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"jobqueue config {str(p)!r} must be a mapping with slurm/adapt/gpu sections")
    data = _normalise(data)
    # Also accept dask-jobqueue's own layout (jobqueue: slurm: ...) for the `slurm` section.
    if "jobqueue" in data:
        jq = data.pop("jobqueue") or {}
        if set(jq) - {"slurm"}:
            raise ConfigError(f"{str(p)!r}: only jobqueue.slurm is used, not {sorted(set(jq) - {'slurm'})}")
        data = _merge({"slurm": jq.get("slurm") or {}}, data)
    unknown = set(data) - {"slurm", "adapt", "gpu"}
    if unknown:
        raise ConfigError(f"{str(p)!r}: unknown section(s) {sorted(unknown)}; use slurm, adapt, gpu")
    return data


def _overrides_layer(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """CLI flags -> a layer. Flat keys go to `slurm`, min/max jobs to `adapt`; None means unset."""
    layer: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        k = str(key).replace("-", "_")
        if k in ("slurm", "adapt", "gpu") and isinstance(value, dict):
            layer = _merge(layer, {k: _normalise(value)})
        elif k in _ADAPT_ALIASES:
            layer.setdefault("adapt", {})[_ADAPT_ALIASES[k]] = value
        elif k in SlurmJobSettings.model_fields:
            layer.setdefault("slurm", {})[k] = value
        else:
            raise ConfigError(f"unknown jobqueue setting {key!r}; known: "
                              f"{sorted(SlurmJobSettings.model_fields) + sorted(_ADAPT_ALIASES)}")
    return layer


def _why(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def slurm_settings(user_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Package defaults < ``user_file`` < ``overrides``, validated; returns a plain dict.

    The dict has sections ``slurm`` (job keyword arguments), ``adapt`` (``minimum_jobs``,
    ``maximum_jobs``) and ``gpu`` (what a GPU job changes), with '_' keys. ``overrides`` takes flat
    keys (``queue``, ``walltime``, ``min_jobs``, ``max_jobs``...) or whole sections; None values
    are ignored so unset CLI options do not override. Raises ConfigError on anything invalid,
    including a worker lifetime that does not fit in the walltime.
    """
    layers = [_normalise(yaml.safe_load(DEFAULTS_FILE.read_text()) or {})]
    if user_file:
        layers.append(_read_yaml(user_file))
    layers.append(_overrides_layer(overrides))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer)
    try:
        settings = SlurmSettings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"jobqueue settings invalid: {_why(exc)}") from exc
    if settings.adapt.minimum_jobs > settings.adapt.maximum_jobs:
        raise ConfigError(f"adapt: minimum-jobs {settings.adapt.minimum_jobs} > "
                          f"maximum-jobs {settings.adapt.maximum_jobs}")
    for gpu in (False, True):  # fail now, not when the first job is submitted
        worker_lifetime(_job(settings.model_dump(), gpu=gpu))
    return settings.model_dump()


# --------------------------------------------------------------------------- cluster and script

def _job(settings: dict[str, Any], *, gpu: bool) -> SlurmJobSettings:
    """The job settings, with the GPU variant applied when asked for."""
    base = dict(settings["slurm"])
    if gpu:  # every key the gpu section sets replaces the CPU job's value, lists and mappings too
        base.update({k: v for k, v in (settings.get("gpu") or {}).items() if v is not None})
    try:
        return SlurmJobSettings.model_validate(base)
    except ValidationError as exc:
        raise ConfigError(f"jobqueue settings invalid: {_why(exc)}") from exc


def _prologue(job: SlurmJobSettings) -> list[str]:
    lines = list(job.job_script_prologue)
    # tiles are the unit of parallelism: one math thread per worker process, as on a LocalCluster,
    # so a catalogue does not depend on where it was made (BLAS thread counts change float sums)
    lines.append("export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1")
    if not job.worker_profile:  # as on a LocalCluster: Dask's stack-sampling profiler costs ~3 % CPU
        from .cluster import WORKER_PROFILE_ENV

        lines.append(f"export {WORKER_PROFILE_ENV}=False")
    if (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "pipeline").is_dir():
        # Workers import surveypipe's code from this checkout even where it is not pip-installed.
        lines.append(f'export PYTHONPATH="{PROJECT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"')
    return lines


def cluster_kwargs(settings: dict[str, Any], *, gpu: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``SLURMCluster``; keys left None fall through to dask config."""
    job = _job(settings, gpu=gpu)
    args = list(job.worker_extra_args)
    life = worker_lifetime(job)
    if life is not None:
        args += ["--lifetime", life[0], "--lifetime-stagger", life[1]]
    if job.worker_resources:
        res = " ".join(f"{k}={v:g}" for k, v in sorted(job.worker_resources.items()))
        args += ["--resources", f'"{res}"' if " " in res else res]
    kw: dict[str, Any] = {
        "job_name": job.job_name,
        "queue": job.queue,
        "account": job.account,
        "cores": job.cores,
        "processes": job.processes,
        "memory": job.memory,
        "walltime": job.walltime,
        "job_cpu": job.job_cpu,
        "job_mem": job.job_mem,
        "interface": job.interface,
        "protocol": job.protocol,
        "death_timeout": job.death_timeout,
        "local_directory": job.local_directory,
        "log_directory": job.log_directory,
        "job_extra_directives": list(job.job_extra_directives),
        "job_directives_skip": list(job.job_directives_skip),
        "job_script_prologue": _prologue(job),
        "worker_extra_args": args,
        "worker_command": job.worker_command,
        "nanny": job.nanny,
        "shebang": job.shebang,
        "python": job.python or sys.executable,
        "scheduler_options": dict(job.scheduler_options),
        "shared_temp_directory": job.shared_temp_directory,
    }
    return {k: v for k, v in kw.items() if v is not None}


def make_slurm_cluster(settings: dict[str, Any], *, gpu: bool = False, **extra: Any):
    """A ``dask_jobqueue.SLURMCluster`` from :func:`slurm_settings` output; no job is submitted yet.

    ``gpu=True`` builds workers from the GPU variant (``--gres=gpu:1``, Dask resource ``GPU=1``);
    they run CPU tasks too. ``extra`` goes to SLURMCluster as is (e.g. ``asynchronous=True``).
    """
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**cluster_kwargs(settings, gpu=gpu), **extra)


def job_script(settings: dict[str, Any], *, gpu: bool = False) -> str:
    """The sbatch script each worker job would run (for ``--dry-run``); starts no scheduler.

    The scheduler address and worker name are placeholders, as in ``SLURMCluster.job_script()``.
    """
    from dask_jobqueue.slurm import SLURMJob

    kw = cluster_kwargs(settings, gpu=gpu)
    for k in _CLUSTER_ONLY:
        kw.pop(k, None)
    # dask-jobqueue creates the log directory when it builds a job; a dry run leaves no trace.
    created: list[Path] = []
    if kw.get("log_directory"):
        p = Path(kw["log_directory"]).absolute()
        while not p.exists():
            created.append(p)
            p = p.parent
    try:
        return SLURMJob(SCHEDULER_PLACEHOLDER, name="dummy-name", **kw).job_script()
    finally:
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break


def start_adaptive(cluster, minimum_jobs: int, maximum_jobs: int, **adapt_kwargs: Any):
    """Scale ``cluster`` between ``minimum_jobs`` and ``maximum_jobs`` SLURM jobs.

    A job that SLURM loses (scancel, node failure, walltime) is replaced as long as the minimum
    is above the number still alive; dask only declares it lost after
    ``distributed.deploy.lost-worker-timeout`` (15 s), which must stay above worker start-up time.
    """
    if minimum_jobs < 0 or maximum_jobs < 1 or minimum_jobs > maximum_jobs:
        raise ConfigError(f"adaptive bounds must satisfy 0 <= min ({minimum_jobs}) <= max ({maximum_jobs}), max >= 1")
    return cluster.adapt(minimum_jobs=minimum_jobs, maximum_jobs=maximum_jobs, **adapt_kwargs)


class GpuWorkers:
    """GPU worker jobs attached to an existing cluster's scheduler (a heterogeneous cluster).

    They are not scaled by ``adapt``: they live until :meth:`close` (scancel), their
    ``--lifetime``, or ``death-timeout`` seconds after the scheduler is gone.
    """

    def __init__(self, cluster, jobs: list) -> None:
        self.cluster, self.jobs = cluster, jobs

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]

    @property
    def names(self) -> list[str]:
        return [j.name for j in self.jobs]

    def close(self) -> None:
        async def _close():
            for j in self.jobs:
                await j.close()
        if self.jobs and self.cluster.status.name not in ("closed",):
            self.cluster.sync(_close)
        else:
            import subprocess
            ids = [i for i in self.job_ids if i]
            if ids:
                subprocess.run(["scancel", *ids], check=False)
        self.jobs = []

    def __enter__(self) -> "GpuWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_gpu_workers(cluster, settings: dict[str, Any], n: int) -> GpuWorkers:
    """Submit ``n`` worker jobs of the ``gpu`` variant to ``cluster``'s scheduler.

    A mixed cluster: the CPU workers come from ``cluster`` (give them ``worker-resources:
    {CPU: 1}`` so plain stages stay off the GPUs) and these advertise ``GPU=1`` (and
    ``--gres=gpu:1``), so the engine places ONNX stages on them.
    """
    from dask_jobqueue.slurm import SLURMJob

    if n < 1:
        raise ConfigError(f"add_gpu_workers: n must be >= 1, not {n}")
    kw = cluster_kwargs(settings, gpu=True)
    for k in _CLUSTER_ONLY:
        kw.pop(k, None)
    first = getattr(cluster, "_surveypipe_gpu_count", 0)
    cluster._surveypipe_gpu_count = first + n

    async def _start():
        jobs = [SLURMJob(cluster.scheduler_address, name=f"gpu-{first + i}", **kw) for i in range(n)]
        for job in jobs:
            await job  # sbatch
        return jobs

    return GpuWorkers(cluster, cluster.sync(_start))
