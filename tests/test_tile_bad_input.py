"""The bad-input matrix: each broken tile fails alone with a message naming tile, file and reason,
and every other tile of the same release still completes.

One release holds a tile per case (plus clean tiles); it is run once on a one-worker cluster and
each case then checks its own failure record. Loader-level tests check the same messages
without Dask, and that the loader keeps memory near the planes it returns.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import fitsio
import numpy as np
import pytest
import yaml
from distributed import Client, LocalCluster

from conftest import PIXSCALE, make_release, wcs_header, write_band
from helpers_stages import CLASSICAL
from pipeline.config import PipelineConfig
from pipeline.errors import BadInputError
from pipeline.execute import EXIT_NONE_DONE, EXIT_SOME_FAILED, run_release, tile_status
from pipeline.manifest import load_manifest
from pipeline.store import CatalogStore
from pipeline.tile import load_tile

SIZE = 96
SURVEYPIPE = [sys.executable, "-m", "pipeline.cli"]
TESTS = Path(__file__).parent


# ------------------------------------------------------------------------------ FITS surgery
def read_band(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    with fitsio.FITS(str(path)) as f:
        hdr = f[0].read_header()
        header = {k: hdr[k] for k in hdr.keys() if k and k not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2",
                                                                      "EXTEND", "COMMENT", "HISTORY", "MAGZERO", "PSF_FWHM")}
        return f[0].read(), f[1].read(), f[2].read(), header


def rewrite_band(path: Path, *, image=None, weight=None, mask=None, header=None, drop=()) -> None:
    img, wt, msk, hdr = read_band(path)
    hdr = {k: v for k, v in {**hdr, **(header or {})}.items() if k not in drop}
    write_band(path, img if image is None else image, wt if weight is None else weight,
               msk if mask is None else mask, hdr)


def break_truncated(root: Path, entry: dict) -> None:
    p = root / entry["files"]["g"]["path"]
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.6)])  # cut inside the weight HDU's data


def break_wrong_hdu(root: Path, entry: dict) -> None:
    entry["files"]["g"]["image"] = 7


def break_table_hdu(root: Path, entry: dict) -> None:
    p = root / entry["files"]["g"]["path"]
    with fitsio.FITS(str(p), "rw") as f:
        f.write(np.zeros(3, dtype=[("a", "f4")]), extname="CATALOG")
    entry["files"]["g"]["image"] = "CATALOG"


def break_missing_file(root: Path, entry: dict) -> None:
    entry["files"]["g"]["path"] = "no_such_file_g.fits"


def break_nan_pixels(root: Path, entry: dict) -> None:
    p = root / entry["files"]["g"]["path"]
    img, *_ = read_band(p)
    img[10:30, 10:30] = np.nan
    img[50, 5:15] = np.inf
    img[60, 5:15] = -np.inf
    rewrite_band(p, image=img)


def break_all_zero(root: Path, entry: dict) -> None:
    p = root / entry["files"]["g"]["path"]
    rewrite_band(p, image=np.zeros((SIZE, SIZE), np.float32))


def break_constant(root: Path, entry: dict) -> None:
    p = root / entry["files"]["r"]["path"]
    rewrite_band(p, image=np.full((SIZE, SIZE), 7.0, np.float32))


def break_zero_weight(root: Path, entry: dict) -> None:
    p = root / entry["files"]["g"]["path"]
    _, wt, _, _ = read_band(p)
    wt[:, :20] = 0.0
    rewrite_band(p, weight=wt)


def break_negative_weight(root: Path, entry: dict) -> None:
    p = root / entry["files"]["g"]["path"]
    _, wt, _, _ = read_band(p)
    wt[40, 33] = -1.0
    wt[41, 33] = -2.0
    rewrite_band(p, weight=wt)


def break_no_wcs(root: Path, entry: dict) -> None:
    p = root / entry["files"]["r"]["path"]
    rewrite_band(p, drop=("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1",
                          "CD2_2", "CUNIT1", "CUNIT2"))


def break_wcs_inconsistent(root: Path, entry: dict) -> None:
    p = root / entry["files"]["r"]["path"]
    _, _, _, hdr = read_band(p)
    rewrite_band(p, header={"CRVAL2": hdr["CRVAL2"] + 0.5 / 3600})  # r lands 0.5 arcsec north of g


def break_other_scale(root: Path, entry: dict) -> None:
    p = root / entry["files"]["r"]["path"]
    _, _, _, hdr = read_band(p)
    half = SIZE // 2
    rng = np.random.default_rng(150)
    write_band(p, rng.normal(0, 5, (half, half)).astype(np.float32), np.full((half, half), 0.04, np.float32),
               np.zeros((half, half), np.int16),
               {**hdr, "CD1_1": -2 * PIXSCALE, "CD2_2": 2 * PIXSCALE, "CRPIX1": half / 2 + 0.5, "CRPIX2": half / 2 + 0.5})


def break_grid(root: Path, entry: dict) -> None:
    p = root / entry["files"]["r"]["path"]
    img, wt, msk, hdr = read_band(p)
    write_band(p, img[:80], wt[:80], msk[:80], hdr)  # same scale and reference, 16 rows fewer


def break_unsafe_id(root: Path, entry: dict) -> None:
    entry["id"] = "../escaped"


def break_unsafe_band(root: Path, entry: dict) -> None:
    entry["files"]["../x"] = entry["files"].pop("r")


def break_unknown_band(root: Path, entry: dict) -> None:
    entry["files"]["q"] = entry["files"].pop("r")


def drop_band(root: Path, entry: dict) -> None:
    del entry["files"]["r"]


# tile id -> (how to break it, None if the tile must complete, else (file it must name, reason regex))
CASES: dict[str, tuple] = {
    "ok-a": (None, None),
    "ok-b": (None, None),
    "truncated": (break_truncated, ("_g.fits", r"truncated")),
    "wrong-hdu": (break_wrong_hdu, ("_g.fits", r"HDU 7 not found; the file has 3 HDU\(s\): 0, 1 \(WEIGHT\), 2 \(MASK\)")),
    "table-hdu": (break_table_hdu, ("_g.fits", r"HDU 'CATALOG' is a BINARY_TBL, not an image")),
    "missing-file": (break_missing_file, ("no_such_file_g.fits", r"file does not exist")),
    "nan-pixels": (break_nan_pixels, None),
    "all-zero": (break_all_zero, ("_g.fits", r"band g image is all zero")),
    "constant": (break_constant, ("_r.fits", r"band r image is constant \(7\)")),
    "zero-weight": (break_zero_weight, None),
    "negative-weight": (break_negative_weight, ("_g.fits", r"band g weight .* 2 negative value\(s\) \(first at x=33, y=40\)")),
    "no-wcs": (break_no_wcs, ("_r.fits", r"band r image header has no celestial WCS")),
    "wcs-inconsistent": (break_wcs_inconsistent, ("_r.fits", r"band r WCS differs from band g .*0\.5 arcsec")),
    "other-scale": (break_other_scale, ("_r.fits", r"band r pixel scale differs from band g .*0\.40000 arcsec/pixel.*0\.20000")),
    "grid": (break_grid, ("_r.fits", r"band r pixel grid differs from band g .*96x80 pixels")),
    "g-only": (drop_band, None),
}
# rejected while reading the manifest: (safe failure key, label in the message, file it must name, reason)
MANIFEST_CASES: dict[str, tuple] = {
    "unsafe-id": (break_unsafe_id, "manifest-entry-", "../escaped", "manifest.yaml", r"tile id '\.\./escaped' is not allowed"),
    "unsafe-band": (break_unsafe_band, "unsafe-band", "unsafe-band", "manifest.yaml", r"band name '\.\./x' is not allowed"),
    "unknown-band": (break_unknown_band, "unknown-band", "unknown-band", "_r.fits", r"unknown band\(s\) \['q'\]"),
}
BIG = "big"  # a tile 4x the side (16x the pixels) of the others


def build_matrix_release(root: Path) -> Path:
    names = list(CASES) + list(MANIFEST_CASES)
    manifest_path, _ = make_release(root, n_tiles=len(names), size=SIZE, seed=120)
    doc = yaml.safe_load(manifest_path.read_text())
    for name, entry in zip(names, doc["tiles"]):
        breaker = CASES[name][0] if name in CASES else MANIFEST_CASES[name][0]
        entry["id"] = name
        if breaker:
            breaker(root, entry)
    big_manifest, _ = make_release(root / "big", n_tiles=1, size=4 * SIZE, seed=121, n_src=40)
    big = yaml.safe_load(big_manifest.read_text())["tiles"][0]
    big["id"] = BIG
    for f in big["files"].values():
        f["path"] = f"big/{f['path']}"
    doc["tiles"].append(big)
    dup = json.loads(json.dumps(doc["tiles"][0]))
    for e in (dup, json.loads(json.dumps(dup))):
        e["id"] = "dup"
        doc["tiles"].append(e)
    manifest_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest_path


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c, Client(c) as cl:
        yield cl


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("matrix")
    manifest_path = build_matrix_release(root / "release")
    out = root / "work" / "out"
    summary = run_release(load_manifest(manifest_path), out, PipelineConfig(stages=CLASSICAL), client, progress=False)
    return manifest_path, out, summary


def complete_tiles(out: Path) -> set[str]:
    store = CatalogStore(out)
    return {t for t in store.tile_ids() if store.is_complete(t)}


def expected_complete() -> set[str]:
    return {name for name, (_, expect) in CASES.items() if expect is None} | {BIG}


# ------------------------------------------------------------------------------ the run
def test_every_good_tile_completes_and_only_broken_tiles_fail(matrix_run):
    _, out, summary = matrix_run
    assert summary.exit_code == EXIT_SOME_FAILED
    assert set(summary.done) == expected_complete()
    assert complete_tiles(out) == expected_complete()
    broken = {n for n, (_, e) in CASES.items() if e is not None}
    unsafe = {k for k in summary.failed if k.startswith("manifest-entry-")}
    assert len(unsafe) == 1, "the entry with an unsafe id is failed under a safe name"
    assert set(summary.failed) == broken | unsafe | {"dup", "unsafe-band", "unknown-band"}
    for rec in summary.failed.values():
        assert rec["kind"] == "bad_input", rec  # never retried as an infrastructure failure


@pytest.mark.parametrize("name", [n for n, (_, e) in CASES.items() if e is not None])
def test_broken_tile_message_names_tile_file_and_reason(matrix_run, name):
    _, out, summary = matrix_run
    file_part, reason = CASES[name][1]
    rec = summary.failed[name]
    assert rec["error"].startswith(f"tile {name!r}, file "), rec["error"]
    assert file_part in rec["file"] and file_part in rec["error"]
    assert re.search(reason, rec["error"]), rec["error"]
    status = tile_status(out)["tiles"][name]  # what `surveypipe status` shows
    assert status["status"] == "failed" and status["error"] == rec["error"] and status["file"] == rec["file"]


@pytest.mark.parametrize("name", list(MANIFEST_CASES))
def test_manifest_rejected_tile_message_names_tile_file_and_reason(matrix_run, name):
    _, out, summary = matrix_run
    _, key, label, file_part, reason = MANIFEST_CASES[name]
    [(k, rec)] = [(k, r) for k, r in summary.failed.items() if k.startswith(key)]
    assert rec["error"].startswith(f"tile {label!r}, file "), rec["error"]
    assert file_part in rec["error"] and file_part in rec["file"]
    assert re.search(reason, rec["error"]), rec["error"]
    assert rec["stage"] == "manifest"


def test_unsafe_ids_write_nothing_outside_the_output_directory(matrix_run):
    manifest_path, out, _ = matrix_run
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())
        assert ".." not in p.name
    assert not (out / "escaped").exists() and not (out.parent / "escaped.json").exists()
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.json", p.name) for p in (out / "status").iterdir())


def test_duplicate_tile_id_refuses_both_entries(matrix_run):
    _, out, summary = matrix_run
    rec = summary.failed["dup"]
    assert rec["error"].startswith("tile 'dup', file ") and "manifest.yaml" in rec["file"]
    assert re.search(r"duplicate tile id: entries \[\d+, \d+\] .* none of them is processed", rec["error"])
    assert "dup" not in complete_tiles(out)


def test_nan_and_inf_pixels_are_masked_not_propagated(matrix_run):
    manifest_path, out, _ = matrix_run
    m = load_manifest(manifest_path)
    tile = load_tile(m, m.tile("nan-pixels"))
    img, bad, wt = tile.image["g"], tile.bad["g"], tile.weight["g"]
    assert np.isfinite(img).all() and np.isfinite(wt).all()
    assert bad[10:30, 10:30].all() and bad[50, 5:15].all() and bad[60, 5:15].all()
    assert (img[bad] == 0).all() and (wt[bad] == 0).all()
    assert not tile.bad["r"][10:30, 10:30].any(), "only the band with NaNs is masked there"
    t = CatalogStore(out).read_table("nan-pixels", "objects")
    assert len(t) > 5
    for c in t:
        if t[c].dtype.kind == "f":
            assert np.isfinite(t[c]).all(), f"{c} has non-finite values"


def test_zero_weight_pixels_are_masked(matrix_run):
    manifest_path, out, _ = matrix_run
    m = load_manifest(manifest_path)
    tile = load_tile(m, m.tile("zero-weight"))
    assert tile.bad["g"][:, :20].all() and not tile.bad["g"][:, 20:].any()
    assert (tile.image["g"][:, :20] == 0).all()
    assert "zero-weight" in complete_tiles(out)


def test_tile_missing_a_band_completes_without_it(matrix_run):
    _, out, _ = matrix_run
    t = CatalogStore(out).read_table("g-only", "objects")
    assert "g_kronFlux" in t and "r_kronFlux" not in t
    st = tile_status(out)["tiles"]["g-only"]  # a partial success, saying which band is missing
    assert st["status"] == "partial" and any("band r missing" in c for c in st["caveats"])


def test_large_tile_completes(matrix_run):
    _, out, summary = matrix_run
    store = CatalogStore(out)
    assert store.tile_attrs(BIG)["shape"] == [4 * SIZE, 4 * SIZE]
    assert len(store.read_table(BIG, "objects")) >= 30


def test_run_where_every_tile_is_bad_reports_none_done(tmp_path, client):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=2, size=64, seed=122)
    for tid in ("t0000", "t0001"):
        (tmp_path / "rel" / f"{tid}_g.fits").unlink()
    s = run_release(load_manifest(manifest_path), tmp_path / "out", PipelineConfig(stages=CLASSICAL), client,
                    progress=False)
    assert s.exit_code == EXIT_NONE_DONE and sorted(s.failed) == ["t0000", "t0001"]


@pytest.mark.slow
def test_cli_exit_code_and_status_json_with_one_truncated_tile(tmp_path):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=2, size=64, seed=123)
    break_truncated(tmp_path / "rel", {"files": {"g": {"path": "t0001_g.fits"}}})
    out = tmp_path / "out"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"stages": CLASSICAL}))
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run(SURVEYPIPE + ["run", str(manifest_path), "--out", str(out), "--workers", "1", "--config",
                                     str(cfg), "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAILED t0001 [bad_input] tile 't0001', file " in p.stdout and "truncated" in p.stdout
    st = subprocess.run(SURVEYPIPE + ["status", str(out), "--json"], env=env, capture_output=True, text=True, timeout=120)
    tiles = json.loads(st.stdout)["tiles"]
    assert tiles["t0000"]["status"] == "complete"
    assert tiles["t0001"]["status"] == "failed" and tiles["t0001"]["kind"] == "bad_input"
    assert tiles["t0001"]["file"].endswith("t0001_g.fits") and "truncated" in tiles["t0001"]["error"]


# ------------------------------------------------------------------------------ the loader alone
@pytest.fixture
def one_tile(tmp_path):
    manifest_path, _ = make_release(tmp_path / "rel", n_tiles=1, size=64, seed=124)
    return tmp_path / "rel", yaml.safe_load(manifest_path.read_text()), manifest_path


def load_entry(root: Path, doc: dict, manifest_path: Path):
    manifest_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    m = load_manifest(manifest_path)
    return load_tile(m, m.tiles[0])


def test_truncated_at_an_hdu_boundary_names_the_missing_hdu(one_tile):
    root, doc, mp = one_tile
    p = root / "t0000_g.fits"
    with fitsio.FITS(str(p)) as f:
        end0 = f[0].get_offsets()["data_end"]
    p.write_bytes(p.read_bytes()[:end0])  # only the image HDU survives
    with pytest.raises(BadInputError, match=r"band g weight HDU 1 not found; the file has 1 HDU\(s\)") as e:
        load_entry(root, doc, mp)
    assert e.value.tile == "t0000" and e.value.file.endswith("t0000_g.fits")


def test_garbage_file_is_not_fits(one_tile):
    root, doc, mp = one_tile
    (root / "t0000_r.fits").write_bytes(b"this is not FITS " * 400)
    with pytest.raises(BadInputError, match=r"band r image file is not a readable FITS file"):
        load_entry(root, doc, mp)


def test_empty_primary_hdu_hints_at_hdu_1(one_tile):
    root, doc, mp = one_tile
    img, wt, msk, hdr = read_band(root / "t0000_g.fits")
    with fitsio.FITS(str(root / "t0000_g.fits.fz"), "rw", clobber=True) as f:
        f.write(img, header=[{"name": k, "value": v} for k, v in {**hdr, "MAGZERO": 31.4}.items()], compress="RICE")
        f.write(wt, extname="WEIGHT", compress="RICE")
    doc["tiles"][0]["files"]["g"] = {"path": "t0000_g.fits.fz", "image": 0, "weight": 2}
    with pytest.raises(BadInputError, match=r"band g image HDU 0 is not a 2-D image \(NAXIS = 0\) \(an empty primary"):
        load_entry(root, doc, mp)
    doc["tiles"][0]["files"]["g"] = {"path": "t0000_g.fits.fz", "image": 1, "weight": "WEIGHT"}
    tile = load_entry(root, doc, mp)  # the same file read right: tile-compressed planes work
    assert tile.image["g"].shape == (64, 64)


def test_weight_plane_of_another_shape(one_tile):
    root, doc, mp = one_tile
    p = root / "t0000_r.fits"
    img, wt, msk, hdr = read_band(p)
    write_band(p, img, wt[:50], msk, hdr)
    with pytest.raises(BadInputError, match=r"band r weight HDU 1 is 64x50 pixels but its image"):
        load_entry(root, doc, mp)


def test_magzero_missing_or_overridden(one_tile):
    root, doc, mp = one_tile
    p = root / "t0000_r.fits"
    img, wt, msk, hdr = read_band(p)
    with fitsio.FITS(str(p), "rw", clobber=True) as f:
        f.write(img, header=[{"name": k, "value": v} for k, v in hdr.items()])
        f.write(wt, extname="WEIGHT")
        f.write(msk, extname="MASK")
    with pytest.raises(BadInputError, match=r"band r: no MAGZERO keyword in HDU 0 and no zeropoint"):
        load_entry(root, doc, mp)
    doc["tiles"][0]["files"]["r"]["zeropoint"] = 31.4 - 2.5  # 1 image unit = 10 nJy
    tile = load_entry(root, doc, mp)
    assert np.allclose(tile.image["r"][~tile.bad["r"]], 10 * img[~tile.bad["r"]], rtol=1e-5)


def test_a_band_missing_from_every_requested_band(one_tile):
    root, doc, mp = one_tile
    mp.write_text(yaml.safe_dump(doc, sort_keys=False))
    m = load_manifest(mp)
    with pytest.raises(BadInputError, match=r"none of the requested bands \['z'\] is present"):
        load_tile(m, m.tiles[0], bands=["z"])


def test_no_weight_plane_estimates_the_noise_from_the_sky(one_tile):
    root, doc, mp = one_tile
    del doc["tiles"][0]["files"]["g"]["weight"]
    tile = load_entry(root, doc, mp)
    w = tile.weight["g"][~tile.bad["g"]]
    assert np.ptp(w) == 0 and 0.5 < 1 / np.sqrt(w[0]) / 5.0 < 1.5  # the noise was 5 image units = 5 nJy


def write_large_tile(root: Path, size: int, bands=("g", "r")) -> Path:
    rng = np.random.default_rng(125)
    root.mkdir(parents=True)
    files = {}
    for b in bands:
        img = rng.normal(0.0, 5.0, (size, size)).astype(np.float32)
        img[100:140, 200:260] = np.nan
        wt = np.full((size, size), 0.04, np.float32)
        wt[:, :8] = 0
        write_band(root / f"big_{b}.fits", img, wt, np.zeros((size, size), np.int16),
                   wcs_header(crpix=(size / 2 + 0.5, size / 2 + 0.5)))
        del img, wt
        files[b] = {"path": f"big_{b}.fits", "image": 0, "weight": 1, "mask": 2}
    mp = root / "manifest.yaml"
    mp.write_text(yaml.safe_dump({"name": "big", "bands": list(bands), "tiles": [{"id": "big", "files": files}]}))
    return mp


def test_loader_makes_no_extra_float32_plane_on_a_large_tile(tmp_path):
    """Peak traced memory of ``load_tile`` stays below the planes it returns plus one float32 plane.

    A 2048x2048 tile in two bands with image, weight and int16 mask planes: the returned planes
    are 2 x (4 + 4 + 1) bytes per pixel; everything else the loader allocates at once (the mask
    as stored, row-block temporaries, the checksum buffer) must stay under one 4-byte plane.
    """
    size = 2048
    m = load_manifest(write_large_tile(tmp_path / "rel", size))
    load_tile(m, m.tiles[0], bands=["g"])  # warm imports and caches outside the measurement
    tracemalloc.start()
    try:
        tile = load_tile(m, m.tiles[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    plane = size * size * 4
    assert tile.nbytes == 2 * (plane + plane + plane // 4)
    overhead = peak - tile.nbytes
    print(f"returned planes {tile.nbytes / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
          f"overhead {overhead / plane:.2f} float32 planes")
    assert overhead < plane, f"loader overhead {overhead / 2**20:.1f} MiB >= one float32 plane ({plane / 2**20:.0f} MiB)"
    assert tile.bad["g"][100:140, 200:260].all() and tile.bad["g"][:, :8].all()
    assert np.isfinite(tile.image["g"]).all()
