"""The ``surveypipe`` command line: simulate, run, rerun, status, export, train, bench."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .errors import SurveypipeError

log = logging.getLogger("surveypipe")


def _fail(exc: Exception, code: int = 2) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use I/N, e.g. 3/16")
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"{value!r}: need 0 <= I < N")
    return i, n


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surveypipe")
@click.option("-v", "--verbose", count=True, help="more log output")
def main(verbose: int) -> None:
    """surveypipe: survey FITS tiles -> a science catalogue, on a LocalCluster or SLURM."""
    logging.basicConfig(level=logging.WARNING - 10 * verbose, format="%(levelname)s %(name)s: %(message)s")


def _cluster_options(f):
    f = click.option("--workers", type=int, default=None, help="Dask workers (default: one per core)")(f)
    f = click.option("--cluster", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                     help="LocalCluster on this machine, or dask-jobqueue SLURMCluster")(f)
    f = click.option("--scheduler", default=None, help="address of an existing Dask scheduler to use instead")(f)
    f = click.option("--jobqueue-config", type=click.Path(dir_okay=False), default=None,
                     help="SLURM: user jobqueue YAML layered over the package defaults")(f)
    f = click.option("--min-jobs", type=int, default=None, help="SLURM: adaptive minimum jobs (default: jobqueue YAML)")(f)
    f = click.option("--max-jobs", type=int, default=None, help="SLURM: adaptive maximum jobs (default: jobqueue YAML)")(f)
    f = click.option("--gpu-jobs", type=int, default=0, show_default=True,
                     help="SLURM: extra GPU worker jobs (--gres=gpu:1, resource GPU=1) for the ONNX stages")(f)
    f = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="pipeline config YAML (stages, per-stage settings)")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="STAGE.FIELD=VALUE", help="override a stage setting")(f)
    f = click.option("--no-progress", is_flag=True, help="no progress bar")(f)
    f = click.option("--worker-profile", is_flag=True,
                     help="run Dask's statistical profiler in the workers (the dashboard's Profile page); "
                          "off by default: it costs about 3 %% of the CPU time")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                     help="ONNX stages: CUDA when usable (auto), or force cpu/cuda")(f)
    return f


def _open_client(cluster: str, workers: int | None, scheduler: str | None, jobqueue_config: str | None,
                 min_jobs: int | None, max_jobs: int | None, gpu_jobs: int = 0, out: str | None = None,
                 worker_profile: bool = False):
    """A client on an existing scheduler, a SLURMCluster (adaptive, plus GPU jobs), or a LocalCluster."""
    from distributed import Client

    from .cluster import connect, local_cluster

    if scheduler:
        return Client(scheduler), []
    if cluster == "slurm":
        from . import slurm

        over = {"min_jobs": min_jobs, "max_jobs": max_jobs if max_jobs is not None else workers,
                "worker_profile": True if worker_profile else None}
        settings = slurm.slurm_settings(jobqueue_config, over)
        if out and not settings["slurm"].get("log_directory"):  # keep worker logs with the run
            settings = slurm.slurm_settings(jobqueue_config, {**over, "log_directory": str(Path(out) / "logs" / "slurm")})
        c = slurm.make_slurm_cluster(settings)
        slurm.start_adaptive(c, settings["adapt"]["minimum_jobs"], settings["adapt"]["maximum_jobs"])
        owned = [c]
        if gpu_jobs:
            owned.insert(0, slurm.add_gpu_workers(c, settings, gpu_jobs))
        return connect(c), owned
    c = local_cluster(workers, profile=worker_profile)
    return connect(c), [c]


def _check_local_cuda(stage_configs: dict) -> None:
    """Refuse ``device: cuda`` before any tile when this host cannot run ONNX Runtime on CUDA."""
    wants = sorted(name for name, c in stage_configs.items() if getattr(c, "device", None) == "cuda")
    if not wants:
        return
    from .errors import ConfigError
    from .onnx import cuda_problem

    problem = cuda_problem()
    if problem:
        raise ConfigError(f"device cuda for stage(s) {wants}: {problem}; use --device auto (CUDA where usable, "
                          "else the CPU) or cpu, or run on GPU nodes (--cluster slurm --gpu-jobs N)")


def _run(manifest_path: str, out: str, *, tiles=None, shard=None, from_stage=None, force=False, workers=None,
         cluster="local", scheduler=None, jobqueue_config=None, min_jobs=None, max_jobs=None, config_path=None,
         overrides=(), no_progress=False, targets=None, device=None, gpu_jobs=0, worker_profile=False) -> int:
    from .config import load_config
    from .execute import run_release
    from .manifest import load_manifest

    manifest = load_manifest(manifest_path)
    config = load_config(config_path, list(overrides), targets=targets, device=device)
    stages = config.load_stages()
    from .dag import Dag

    Dag(stages).needed_for(config.targets)
    stage_configs = config.stage_configs(stages)
    if cluster == "local" and not scheduler:  # workers on this host: a CUDA request it cannot meet fails every tile
        _check_local_cuda(stage_configs)
    client, owned = _open_client(cluster, workers, scheduler, jobqueue_config, min_jobs, max_jobs, gpu_jobs, out,
                                 worker_profile)
    try:
        click.echo(f"release {manifest.name!r}: {len(manifest.tiles)} tiles, bands {manifest.bands}; "
                   f"dashboard {client.dashboard_link}", err=True)
        summary = run_release(manifest, out, config, client, tiles=tiles, shard=shard, from_stage=from_stage,
                              force=force, progress=not no_progress)
    finally:
        client.close()
        for c in owned:
            c.close()
    click.echo(summary.text())
    return summary.exit_code


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory (catalog.zarr goes here)")
@click.option("--tile", "tiles", multiple=True, help="only these tile ids (repeatable)")
@click.option("--shard", default=None, help="process shard I of N disjoint tile sets, e.g. 0/4 (job arrays)")
@click.option("--target", "targets", multiple=True, help="only make these products/stages (and what they need)")
@click.option("--force", is_flag=True, help="recompute complete tiles too")
@click.option("--dry-run", is_flag=True, help="SLURM: print the generated job script and exit")
@_cluster_options
def run(manifest, out, tiles, shard, targets, force, dry_run, workers, cluster, scheduler, jobqueue_config,
        min_jobs, max_jobs, gpu_jobs, config_path, overrides, no_progress, worker_profile, device):
    """Process a data release (resumes: complete tiles are skipped).

    Exit code 0: every tile done; 1: some tiles failed; 3: no tile done.
    """
    if dry_run:
        from . import slurm

        try:
            settings = slurm.slurm_settings(jobqueue_config, {"min_jobs": min_jobs, "max_jobs": max_jobs,
                                                              "worker_profile": True if worker_profile else None})
        except SurveypipeError as exc:
            _fail(exc)
        click.echo(slurm.job_script(settings))
        if gpu_jobs:
            click.echo(slurm.job_script(settings, gpu=True))
        return
    try:
        code = _run(manifest, out, tiles=list(tiles) or None, shard=_parse_shard(shard), force=force,
                    workers=workers, cluster=cluster, scheduler=scheduler, jobqueue_config=jobqueue_config,
                    min_jobs=min_jobs, max_jobs=max_jobs, config_path=config_path, overrides=overrides,
                    no_progress=no_progress, targets=list(targets) or None, device=device, gpu_jobs=gpu_jobs,
                    worker_profile=worker_profile)
    except (SurveypipeError, KeyError, ValueError) as exc:
        _fail(exc)
    sys.exit(code)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory")
@click.option("--tile", "tiles", multiple=True, required=True, help="tile id to rerun (repeatable)")
@click.option("--from", "from_stage", default=None, help="rerun from this stage; upstream products are reused")
@_cluster_options
def rerun(manifest, out, tiles, from_stage, workers, cluster, scheduler, jobqueue_config, min_jobs, max_jobs,
          gpu_jobs, config_path, overrides, no_progress, worker_profile, device):
    """Recompute single tiles (all stages, or from STAGE on), leaving other tiles untouched."""
    try:
        code = _run(manifest, out, tiles=list(tiles), from_stage=from_stage, force=from_stage is None,
                    workers=workers or 1, cluster=cluster, scheduler=scheduler, jobqueue_config=jobqueue_config,
                    min_jobs=min_jobs, max_jobs=max_jobs, config_path=config_path, overrides=overrides,
                    no_progress=no_progress, device=device, gpu_jobs=gpu_jobs, worker_profile=worker_profile)
    except (SurveypipeError, KeyError, ValueError) as exc:
        _fail(exc)
    sys.exit(code)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False), default=None,
              help="also list tiles of this manifest not yet processed (pending)")
@click.option("--json", "as_json", is_flag=True, help="print per-tile status as JSON")
def status(out, manifest, as_json):
    """Per-tile status of a run directory: complete, partial (with caveats), failed (with the reason) or pending."""
    from .execute import tile_status
    from .manifest import load_manifest

    st = tile_status(out, load_manifest(manifest) if manifest else None)
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    click.echo(f"run {out} (release {st['release']}): " + ", ".join(f"{k}: {v}" for k, v in sorted(st["counts"].items())))
    for tid, rec in st["tiles"].items():
        extra = f"  [{rec.get('kind')}] {rec.get('error')}" if rec["status"] == "failed" else ""
        if rec["status"] == "partial":
            extra = "  caveats: " + "; ".join(rec.get("caveats", []))
        click.echo(f"  {tid:20s} {rec['status']}{extra}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="directory of the new release")
@click.option("--tiles", "n_tiles", type=int, default=4, show_default=True, help="number of tiles")
@click.option("--size", type=int, default=1024, show_default=True, help="tile side in pixels")
@click.option("--bands", default="ugrizy", show_default=True, help="bands, e.g. gri")
@click.option("--seed", type=int, default=42, show_default=True, help="random seed (see workflows.mock.seeds)")
@click.option("--overlap", type=int, default=64, show_default=True, help="tile overlap in pixels")
@click.option("--compress", is_flag=True, help="write RICE tile-compressed .fits.fz")
@click.option("--artefacts/--no-artefacts", default=False, show_default=True, help="inject instrumental artefacts")
def simulate(out, n_tiles, size, bands, seed, overlap, compress, artefacts):
    """Write a mock data release (FITS tiles, manifest.yaml and truth catalogues)."""
    from workflows.mock.release import write_release

    kwargs = {}
    if artefacts:
        from workflows.mock.artefacts import inject_artefacts

        kwargs["artefact_injector"] = inject_artefacts
    path = write_release(out, n_tiles=n_tiles, size=size, bands=bands, seed=seed, overlap=overlap,
                         compress=compress, **kwargs)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["fits", "parquet", "hats", "votable"]), required=True)
@click.option("--to", "dest", required=True, type=click.Path(), help="output file (or directory for HATS)")
@click.option("--columns", default=None, help="comma-separated columns to keep")
@click.option("--where", default=None, help="row filter, e.g. 'r_kronFlux > 1000'")
@click.option("--all-rows", is_flag=True, help="keep overlap duplicates (detect_isPrimary false) too")
def export(out, fmt, dest, columns, where, all_rows):
    """Merge every tile into one table (each object once) and write FITS, Parquet, HATS or VOTable."""
    from workflows.export import export_catalog

    try:
        n = export_catalog(out, fmt, dest, columns=columns.split(",") if columns else None, where=where,
                           primary_only=not all_rows)
    except (SurveypipeError, ValueError, KeyError) as exc:
        _fail(exc)
    click.echo(f"wrote {n} rows to {dest}")


def _dispatch(package: str, name: str, args: tuple[str, ...]) -> None:
    import importlib

    try:
        mod = importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(f"{package}.{name}"):
            raise click.BadParameter(f"no {package.split('.')[-1]} workflow named {name!r}")
        raise
    code = mod.main(list(args))
    sys.exit(code or 0)


# The workflow commands pass every argument after NAME, ``--help`` included, to the workflow's own parser
# (click's help option would answer ``train lenses --help`` with this group's help instead).
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _own_help_or_dispatch(package: str, name: str, args: tuple[str, ...]) -> None:
    if name in ("-h", "--help"):
        ctx = click.get_current_context()
        click.echo(ctx.get_help())
        ctx.exit(0)
    _dispatch(package, name, args)


@main.command(context_settings=_PASS_THROUGH)
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(name, args):
    """Train a model: NAME is artefacts, photoz, morphology or lenses (see NAME --help)."""
    _own_help_or_dispatch("workflows.train", name, args)


@main.command(context_settings=_PASS_THROUGH)
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name, args):
    """Run a benchmark: NAME is science, artefacts, photoz, deeplearning or performance (see NAME --help)."""
    _own_help_or_dispatch("workflows.bench", name, args)


@main.command(context_settings=_PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def photoz(args):
    """Apply a photo-z model to any catalogue table (see --help)."""
    _dispatch("workflows", "photoz_apply", args)


if __name__ == "__main__":
    main()
