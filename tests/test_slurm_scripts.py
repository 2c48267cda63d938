"""SLURM job scripts and jobqueue settings, asserted as text: no SLURM needed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.slurm import (PROJECT_ROOT, SCHEDULER_PLACEHOLDER, duration_seconds, job_script,
                            make_slurm_cluster, slurm_settings, walltime_seconds, worker_lifetime,
                            SlurmJobSettings, start_adaptive)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "slurm"
PYTHONPATH_LINE = f'export PYTHONPATH="{PROJECT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"'
THREADS_LINE = "export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1"
PROFILE_OFF_LINE = "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"


def header(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def worker_command(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    assert len(lines) == 1, script
    return lines[0].split()


def option(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, f"{name} once in {cmd}"
    return cmd[cmd.index(name) + 1]


def write(tmp_path: Path, data: dict, name: str = "jq.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


TEST_SITE = {
    "slurm": {"queue": "debug", "account": "astro", "cores": 2, "processes": 2, "memory": "6GB",
              "walltime": "00:30:00", "interface": "lo", "log-directory": "logs",
              "job-script-prologue": ["module load python/3.11", "echo starting on $(hostname)"]},
    "adapt": {"minimum-jobs": 2, "maximum-jobs": 5},
}


def test_package_default_script_line_by_line():
    script = job_script(slurm_settings(None, {}))
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert header(script) == [
        "#SBATCH -J surveypipe-worker",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=4G",
        "#SBATCH -t 01:00:00",
    ]
    # the prologue sits between the header and the worker command
    body = [line for line in lines[1:] if line and not line.startswith("#SBATCH")]
    assert body[:-1] == [THREADS_LINE, PROFILE_OFF_LINE, PYTHONPATH_LINE]
    cmd = body[-1].split()
    assert cmd[:4] == [sys.executable, "-m", "distributed.cli.dask_worker", SCHEDULER_PLACEHOLDER]
    assert option(cmd, "--nthreads") == "1"
    assert option(cmd, "--memory-limit") == "3.73GiB"
    assert "--nanny" in cmd and "--nworkers" not in cmd
    assert option(cmd, "--death-timeout") == "60"
    # 1 h walltime: retire at 54 min +- 3 min, always before SLURM's kill
    assert option(cmd, "--lifetime") == "54m"
    assert option(cmd, "--lifetime-stagger") == "3m"
    assert "--resources" not in cmd and "--interface" not in cmd


def test_site_file_line_by_line(tmp_path):
    s = slurm_settings(write(tmp_path, TEST_SITE), {})
    script = job_script(s)
    assert header(script) == [
        "#SBATCH -J surveypipe-worker",
        "#SBATCH -e logs/surveypipe-worker-%J.err",
        "#SBATCH -o logs/surveypipe-worker-%J.out",
        "#SBATCH -p debug",
        "#SBATCH -A astro",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=6G",
        "#SBATCH -t 00:30:00",
    ]
    body = [line for line in script.splitlines()[1:] if line and not line.startswith("#SBATCH")]
    # user prologue first (modules, environments), then surveypipe's import path, then the worker
    assert body[:-1] == ["module load python/3.11", "echo starting on $(hostname)", THREADS_LINE, PROFILE_OFF_LINE,
                         PYTHONPATH_LINE]
    cmd = body[-1].split()
    assert option(cmd, "--nworkers") == "2"
    assert option(cmd, "--nthreads") == "1"
    assert option(cmd, "--memory-limit") == "2.79GiB"
    assert option(cmd, "--interface") == "lo"
    assert option(cmd, "--lifetime") == "27m"      # 30 min - 3 min margin
    assert option(cmd, "--lifetime-stagger") == "90s"
    assert s["adapt"] == {"minimum_jobs": 2, "maximum_jobs": 5}


def test_worker_profiler_is_off_unless_asked_for(tmp_path):
    assert PROFILE_OFF_LINE in job_script(slurm_settings(None, {})).splitlines()
    on_cli = job_script(slurm_settings(None, {"worker_profile": True}))
    on_file = job_script(slurm_settings(write(tmp_path, {"slurm": {"worker-profile": True}}), {}))
    for script in (on_cli, on_file):
        assert "PROFILE" not in script and THREADS_LINE in script.splitlines()


def test_dry_run_leaves_no_log_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job_script(slurm_settings(None, {"log_directory": "deep/logs"}))
    assert not (tmp_path / "deep").exists()


def test_layering_defaults_then_file_then_cli(tmp_path):
    f = write(tmp_path, TEST_SITE)
    s = slurm_settings(f, {"queue": "long", "walltime": "02:00:00", "min_jobs": 3, "max_jobs": None,
                           "memory": None})
    assert s["slurm"]["queue"] == "long"              # CLI beats file
    assert s["slurm"]["account"] == "astro"           # file beats package default (None)
    assert s["slurm"]["memory"] == "6GB"              # None on the CLI means "not given"
    assert s["slurm"]["job_name"] == "surveypipe-worker"   # package default kept
    assert s["adapt"] == {"minimum_jobs": 3, "maximum_jobs": 5}
    cmd = worker_command(job_script(s))
    assert option(cmd, "--lifetime") == "110m" and option(cmd, "--lifetime-stagger") == "5m"
    assert "#SBATCH -t 02:00:00" in header(job_script(s))
    # lists replace, they do not accumulate across layers
    s2 = slurm_settings(f, {"job_script_prologue": ["source /opt/env"]})
    assert s2["slurm"]["job_script_prologue"] == ["source /opt/env"]


def test_dask_jobqueue_layout_is_accepted(tmp_path):
    f = write(tmp_path, {"jobqueue": {"slurm": {"queue": "cpu", "cores": 4, "processes": 4, "memory": "16GB"}}})
    s = slurm_settings(f, {})
    h = header(job_script(s))
    assert "#SBATCH -p cpu" in h and "#SBATCH --cpus-per-task=4" in h and "#SBATCH --mem=15G" in h


def test_job_directives_skip_drops_clashing_site_lines(tmp_path):
    f = write(tmp_path, {"slurm": {"queue": "fixedmem", "job-directives-skip": ["--mem", "-A"],
                                   "account": "x", "job-extra-directives": ["--mem-per-cpu=3G", "--qos=low"]}})
    h = header(job_script(slurm_settings(f, {})))
    assert not any(line.startswith("#SBATCH --mem=") for line in h)
    assert "#SBATCH -A x" not in h
    # extra directives are added after the skip: a site can replace a generated line
    assert h[-2:] == ["#SBATCH --mem-per-cpu=3G", "#SBATCH --qos=low"]
    assert "#SBATCH -p fixedmem" in h


def test_gpu_variant_has_gres_and_gpu_resource(tmp_path):
    s = slurm_settings(write(tmp_path, TEST_SITE), {})
    cpu, gpu = job_script(s), job_script(s, gpu=True)
    assert "#SBATCH --gres=gpu:1" in header(gpu)
    assert not any("gres" in line for line in header(cpu))
    assert "#SBATCH -J surveypipe-gpu-worker" in header(gpu)
    g = worker_command(gpu)
    assert option(g, "--resources") == "GPU=1"
    assert "--resources" not in worker_command(cpu)
    # everything the gpu section does not set is the CPU job's
    assert "#SBATCH -p debug" in header(gpu) and "#SBATCH --mem=6G" in header(gpu)
    assert option(g, "--lifetime") == "27m"


def test_gpu_section_replaces_keys(tmp_path):
    site = {"slurm": {"queue": "cpu", "job-extra-directives": ["--constraint=cpu"], "worker-resources": {"CPU": 1}},
            "gpu": {"queue": "gpu", "cores": 4, "job-extra-directives": ["--gres=gpu:a100:1"],
                    "worker-resources": {"GPU": 1}}}
    s = slurm_settings(write(tmp_path, site), {})
    h = header(job_script(s, gpu=True))
    assert "#SBATCH -p gpu" in h and "#SBATCH --cpus-per-task=4" in h
    assert "#SBATCH --gres=gpu:a100:1" in h and "#SBATCH --constraint=cpu" not in h
    assert option(worker_command(job_script(s, gpu=True)), "--resources") == "GPU=1"
    assert option(worker_command(job_script(s)), "--resources") == "CPU=1"


def test_several_resources_are_quoted():
    s = slurm_settings(None, {"worker_resources": {"GPU": 2, "MEM": 8e9}})
    line = [x for x in job_script(s).splitlines() if "dask_worker" in x][0]
    assert '--resources "GPU=2 MEM=8e+09"' in line


@pytest.mark.parametrize("walltime,lifetime,stagger", [
    ("00:10:00", "9m", "30s"),      # short jobs: at least a minute of margin
    ("01:00:00", "54m", "3m"),
    ("12:00:00", "710m", "5m"),     # long jobs: at most 10 min of margin
    ("1-00:00:00", "1430m", "5m"),
])
def test_auto_lifetime_stays_below_walltime(walltime, lifetime, stagger):
    job = SlurmJobSettings(walltime=walltime)
    assert worker_lifetime(job) == (lifetime, stagger)
    assert duration_seconds(lifetime) + duration_seconds(stagger) < walltime_seconds(walltime)


def test_lifetime_reaching_walltime_is_refused_before_any_job(tmp_path):
    with pytest.raises(ConfigError, match="reaches the walltime"):
        slurm_settings(None, {"walltime": "01:00:00", "worker_lifetime": "58m", "worker_lifetime_stagger": "5m"})
    with pytest.raises(ConfigError, match="too short"):
        slurm_settings(None, {"walltime": "00:01:00"})
    s = slurm_settings(None, {"walltime": "01:00:00", "worker_lifetime": "50m", "worker_lifetime_stagger": "5m"})
    cmd = worker_command(job_script(s))
    assert option(cmd, "--lifetime") == "50m" and option(cmd, "--lifetime-stagger") == "5m"
    # switched off (workers then die at walltime): null in a file, "off" on the command line
    s = slurm_settings(write(tmp_path, {"slurm": {"worker-lifetime": None}}), {})
    assert "--lifetime" not in worker_command(job_script(s))
    s = slurm_settings(None, {"worker_lifetime": "off"})
    assert "--lifetime" not in worker_command(job_script(s))


@pytest.mark.parametrize("overrides,match", [
    ({"memroy": "4GB"}, "unknown jobqueue setting"),
    ({"memory": "lots"}, "not a memory size"),
    ({"walltime": "soon"}, "not a SLURM walltime"),
    ({"min_jobs": 5, "max_jobs": 2}, "minimum-jobs 5 > maximum-jobs 2"),
    ({"cores": 0}, "cores"),
])
def test_bad_settings_fail_with_a_clear_message(overrides, match):
    with pytest.raises(ConfigError, match=match):
        slurm_settings(None, overrides)


def test_numbers_from_yaml(tmp_path):
    s = slurm_settings(write(tmp_path, {"slurm": {"worker-lifetime": 3000, "worker-lifetime-stagger": 60}}), {})
    cmd = worker_command(job_script(s))
    assert option(cmd, "--lifetime") == "50m" and option(cmd, "--lifetime-stagger") == "1m"
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("slurm:\n  walltime: 4:00:00\n")   # YAML 1.1 reads this as 14400
    with pytest.raises(ConfigError, match="quote it"):
        slurm_settings(unquoted, {})


def test_bad_user_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        slurm_settings(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match="unknown section"):
        slurm_settings(write(tmp_path, {"slrum": {}}), {})
    with pytest.raises(ConfigError, match="slurm.qeue"):
        slurm_settings(write(tmp_path, {"slurm": {"qeue": "x"}}), {})


def test_walltime_and_duration_parsing():
    assert [walltime_seconds(w) for w in ("30", "10:30", "01:00:00", "1-0", "1-02:03", "2-00:00:00")] == \
        [1800, 630, 3600, 86400, 93780, 172800]
    assert [duration_seconds(d) for d in ("3h30m", "50m", "90", "1 hour", "01:30:00")] == \
        [12600, 3000, 90, 3600, 5400]
    for bad in ("x", "1:2:3:4", "-5"):
        with pytest.raises(ValueError):
            walltime_seconds(bad)


def test_shipped_example_config_is_valid():
    s = slurm_settings(DEPLOY / "jobqueue.yaml", {})
    h, g = header(job_script(s)), header(job_script(s, gpu=True))
    assert "#SBATCH -p cpu" in h and "#SBATCH -p gpu" in g and "#SBATCH --gres=gpu:1" in g
    assert option(worker_command(job_script(s)), "--lifetime") == "210m"


def test_cluster_script_matches_dry_run(tmp_path):
    """The script SLURMCluster submits is the dry-run one, with the real scheduler address."""
    s = slurm_settings(write(tmp_path, TEST_SITE), {"log_directory": str(tmp_path / "logs")})
    with make_slurm_cluster(s) as cluster:  # starts a scheduler, submits nothing
        real = cluster.job_script()
        assert real == job_script(s).replace(SCHEDULER_PLACEHOLDER, cluster.scheduler_address)
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")  # interface lo
        with pytest.raises(ConfigError):
            start_adaptive(cluster, 3, 2)
        assert not cluster.workers


def test_cli_dry_run_prints_the_job_script(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("name: x\n")
    f = write(tmp_path, TEST_SITE)
    r = CliRunner().invoke(main, ["run", str(manifest), "--out", str(tmp_path / "out"), "--cluster", "slurm",
                                  "--jobqueue-config", str(f), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == job_script(slurm_settings(f, {})).strip()


def test_sbatch_templates():
    array = (DEPLOY / "array.sbatch").read_text()
    assert 'run "$MANIFEST" --out "$OUT" --shard "${SLURM_ARRAY_TASK_ID}/${N}" --workers 1' in array
    final = (DEPLOY / "finalize.sbatch").read_text()
    assert 'status "$OUT" --manifest "$MANIFEST" --json' in final
    assert 'export "$OUT" --format "$FORMAT" --to "$DEST"' in final
    for name in ("array.sbatch", "finalize.sbatch", "submit-array.sh", "local-cluster.sh"):
        r = subprocess.run(["bash", "-n", str(DEPLOY / name)], capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert (DEPLOY / name).stat().st_mode & 0o111, f"{name} is executable"


def test_submit_array_dry_run(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: x\n")
    r = subprocess.run([str(DEPLOY / "submit-array.sh"), "--dry-run", "-n", "3", "--max-parallel", "2",
                        "-p", "debug", "--singleton", str(manifest), str(tmp_path / "run")],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "SURVEYPIPE": "sp"})
    assert r.returncode == 0, r.stderr
    ids = dict(line.split("=", 1) for line in r.stdout.split())
    cmds = [line for line in r.stderr.splitlines() if line.startswith("sbatch ")]
    assert len(cmds) == 2
    assert "--array=0-2%2" in cmds[0] and "--dependency=singleton" in cmds[0] and "--partition=debug" in cmds[0]
    assert cmds[0].endswith(f"array.sbatch {manifest} {tmp_path / 'run'} 3")
    assert f"--dependency=afterok:{ids['ARRAY_JOB_ID']}" in cmds[1] and "--kill-on-invalid-dep=yes" in cmds[1]
    assert cmds[1].endswith(f"finalize.sbatch {manifest} {tmp_path / 'run'} {tmp_path / 'run' / 'catalog.parquet'} parquet")
    assert not (tmp_path / "run").exists()
