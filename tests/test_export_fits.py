"""FITS export: one binary table, TUNIT/TCOMM on every column, clean under Debian's fitsverify,
read back exactly by astropy (2-D columns and the string tile_id included); the CLI end to end."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_export_common import NZ, make_store, stored_rows
from workflows.export import REQUIRED, export_catalog

FITSVERIFY = shutil.which("fitsverify")
needs_fitsverify = pytest.mark.skipif(FITSVERIFY is None, reason="fitsverify not installed (Debian package 'fitsverify')")
TESTS = Path(__file__).parent


def fitsverify(path: Path) -> tuple[int, int, str]:
    """(warnings, errors, full report) of Debian's fitsverify on ``path``."""
    p = subprocess.run([FITSVERIFY, str(path)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Verification found (\d+) warning\(s\) and (\d+) error\(s\)", p.stdout)
    assert m, p.stdout + p.stderr
    return int(m.group(1)), int(m.group(2)), p.stdout


@pytest.fixture
def exported(tmp_path):
    store = make_store(tmp_path / "run", n_tiles=4, rows=[120, 0, 75, 200], missing_band_tile=2)
    dest = tmp_path / "cat.fits"
    with pytest.warns(UserWarning):  # the tile without band r is filled (and says so)
        n = export_catalog(store.out, "fits", dest)
    return store, dest, n


@needs_fitsverify
def test_fitsverify_reports_no_error_and_no_warning(exported):
    _, dest, _ = exported
    warnings_, errors, report = fitsverify(dest)
    print(report)
    assert (warnings_, errors) == (0, 0), report


def test_every_column_has_tunit_and_tcomm(exported):
    from astropy.io import fits

    _, dest, _ = exported
    with fits.open(dest) as hdul:
        assert len(hdul) == 2 and isinstance(hdul[1], fits.BinTableHDU) and hdul[1].name == "OBJECTS"
        h = hdul[1].header
        ncol = h["TFIELDS"]
        for i in range(1, ncol + 1):
            assert f"TUNIT{i}" in h and f"TCOMM{i}" in h and h[f"TCOMM{i}"], h[f"TTYPE{i}"]
        names = [h[f"TTYPE{i}"] for i in range(1, ncol + 1)]
        units = {names[i - 1]: h[f"TUNIT{i}"] for i in range(1, ncol + 1)}
        comms = {names[i - 1]: h[f"TCOMM{i}"] for i in range(1, ncol + 1)}
    assert names[: len(REQUIRED)] == list(REQUIRED)
    assert units["coord_ra"] == "deg" and units["r_kronFlux"] == "nJy" and units["x"] == "pix"
    assert comms["g_kronFluxErr"] == "error of g_kronFlux (1sigma, nJy-1 free)", "Unicode made ASCII, not dropped"
    assert h["FLAGB03"] == "edge" and h["RELEASE"] == "synthetic" and h["NTILES"] == 4
    assert h["NAXIS2"] == len(fits.getdata(dest, 1))


def test_astropy_reads_back_every_value(exported):
    from astropy.table import Table

    store, dest, n = exported
    t = Table.read(dest, hdu=1)
    ref = stored_rows(store)
    assert len(t) == n == len(ref["objectId"])
    assert str(t["coord_dec"].unit) == "deg" and str(t["g_kronFlux"].unit) == "nJy"
    assert t["photoz_pdf"].shape == (n, NZ)
    assert [s.decode() if isinstance(s, bytes) else s for s in t["tile_id"]] == list(ref["tile_id"])
    for c in ref:
        if c in ("tile_id", "r_kronFlux", "r_kronFluxErr", "r_ap03Flux"):
            continue
        assert np.array_equal(np.asarray(t[c]), ref[c]), c
    assert t["flags"].dtype == np.uint32 and t["flags"].max() > 2**31
    # the tile without band r: NaN there, the stored values elsewhere
    in_s002 = np.asarray([s in (b"s002", "s002") for s in t["tile_id"]])
    r = np.ma.filled(np.ma.asarray(t["r_kronFlux"]), np.nan)  # astropy masks NaN on read
    assert np.isnan(r[in_s002]).all() and np.isfinite(r[~in_s002]).all()


def test_multidimensional_columns_and_empty_selection(tmp_path):
    from astropy.table import Table

    from pipeline.store import CatalogStore

    store = make_store(tmp_path / "run", n_tiles=2, rows=50)
    for tid in store.tile_ids():  # add a per-row 2x3 matrix to the photoz product
        p = store.read_table(tid, "photoz")
        cov = np.arange(len(p) * 6, dtype=np.float32).reshape(len(p), 2, 3)
        p.add("photoz_cov", cov, "", "a 2x3 matrix per object")
        o = store.read_table(tid, "objects")
        CatalogStore(store.out).commit_tile(tid, {"objects": o, "photoz": p}, {})
    dest = tmp_path / "cat.fits"
    n = export_catalog(store.out, "fits", dest, primary_only=False)
    t = Table.read(dest, hdu=1)
    assert t["photoz_cov"].shape == (n, 2, 3)
    assert np.array_equal(np.asarray(t["photoz_cov"][:50]), np.arange(300, dtype=np.float32).reshape(50, 2, 3))
    if FITSVERIFY:
        assert fitsverify(dest)[:2] == (0, 0)
    empty = tmp_path / "empty.fits"
    assert export_catalog(store.out, "fits", empty, where="g_kronFlux < 0") == 0
    assert len(Table.read(empty, hdu=1)) == 0
    if FITSVERIFY:
        assert fitsverify(empty)[:2] == (0, 0)


@pytest.mark.slow
def test_cli_export_of_a_real_run(tmp_path):
    """The pipeline's own photometry output, exported through the CLI, passes fitsverify."""
    from distributed import Client, LocalCluster

    from conftest import make_release
    from helpers_stages import CLASSICAL
    from pipeline.config import PipelineConfig
    from pipeline.execute import run_release
    from pipeline.manifest import load_manifest

    manifest, _ = make_release(tmp_path / "rel", n_tiles=2, size=96, seed=162)
    out = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c, Client(c) as cl:
        assert run_release(load_manifest(manifest), out, PipelineConfig(stages=CLASSICAL), cl, progress=False).exit_code == 0
    dest = tmp_path / "export" / "cat.fits"
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(out), "--format", "fits", "--to", str(dest),
                        "--columns", "flags"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    n = int(re.search(r"wrote (\d+) rows", p.stdout).group(1))
    from astropy.table import Table

    t = Table.read(dest, hdu=1)
    assert len(t) == n > 10
    assert t.colnames == list(REQUIRED) + ["g_kronFlux", "g_kronFluxErr", "r_kronFlux", "r_kronFluxErr", "flags"]
    if FITSVERIFY:
        w, e, report = fitsverify(dest)
        assert (w, e) == (0, 0), report
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(out), "--format", "fits", "--to",
                          str(dest), "--where", "__import__('os')"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not allowed" in bad.stderr
