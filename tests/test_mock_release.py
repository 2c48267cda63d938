"""A written mock release: manifest, FITS planes, truth, overlaps, determinism, artefact hook."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("galsim")
fitsio = pytest.importorskip("fitsio")

from astropy.table import Table  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.tile import load_tile  # noqa: E402
from workflows.mock import MASK_BITS, write_release  # noqa: E402
from workflows.mock.release import grid_shape, tile_layout  # noqa: E402

SEED = 120


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mock") / "rel"
    return write_release(out, n_tiles=4, size=256, seed=SEED, overlap=64, progress=False)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    with fitsio.FITS(str(path)) as f:
        hdr = f[spec.image].read_header()
        return f[spec.image].read(), f[spec.weight].read(), f[spec.mask].read(), {k: hdr[k] for k in hdr.keys()}


def _bkg(hdr, shape):
    ny, nx = shape
    x = (np.arange(nx) - (nx - 1) / 2) / nx
    y = (np.arange(ny) - (ny - 1) / 2) / ny
    return hdr["BKG_C0"] + hdr["BKG_CX"] * x[None] + hdr["BKG_CY"] * y[:, None]


def test_manifest_loads_and_tiles_read(release):
    text = release.read_text()
    assert text.startswith("name: mock-dr1\nbands: [u, g, r, i, z, y]\ntiles:\n  - id: t0000\n")
    assert "g: {path: t0000_g.fits, image: 0, weight: 1, mask: 2}" in text
    m = load_manifest(release)
    assert not m.problems and [t.id for t in m.tiles] == ["t0000", "t0001", "t0002", "t0003"]
    assert m.tiles[0].inner.model_dump() == {"xmin": 0, "xmax": 224, "ymin": 0, "ymax": 224}
    assert m.tiles[3].inner.model_dump() == {"xmin": 32, "xmax": 256, "ymin": 32, "ymax": 256}
    td = load_tile(m, m.tiles[1])
    assert td.bands == list("ugrizy") and td.shape == (256, 256)
    assert td.pixel_scale_arcsec == pytest.approx(0.2)
    fwhm = [td.header[b]["PSF_FWHM"] for b in "ugrizy"]
    assert fwhm == sorted(fwhm, reverse=True) and fwhm[0] > fwhm[-1]
    assert all("SATURATE" in td.header[b] for b in "ugrizy")


def test_truth_columns_and_partition(release):
    root = release.parent
    merged = Table.read(root / "truth.fits")
    for col in ["id", "x", "y", "ra", "dec", "type", "z", "hlr", "q", "beta", "blend_group", "is_saturated", "in_inner"] + \
            [f"flux_{b}" for b in "ugrizy"] + [f"mag_{b}" for b in "ugrizy"]:
        assert col in merged.colnames, col
    assert merged["id"].dtype.kind == "i" and merged["id"].dtype.itemsize == 8
    assert merged["blend_group"].dtype.kind == "i" and merged["blend_group"].dtype.itemsize == 8
    assert set(merged["type"]) <= {"star", "spheroid", "disk", "edgeon", "irregular"}
    assert len(np.unique(merged["id"])) == len(merged)
    np.testing.assert_allclose(merged["mag_r"], 31.4 - 2.5 * np.log10(merged["flux_r"]), atol=1e-9)
    per_tile = [Table.read(root / "truth" / f"t000{k}.fits") for k in range(4)]
    primary = np.concatenate([t["id"][t["in_inner"]] for t in per_tile])
    assert sorted(primary) == sorted(merged["id"])            # every object primary exactly once
    # inner regions partition the footprint geometrically, too
    tiles, fp = tile_layout(4, 256, 64)
    gx, gy = np.meshgrid(np.arange(0, fp.width, 3) + 0.37, np.arange(0, fp.height, 3) + 0.61)
    owners = sum(t.in_inner(gx - t.x0, gy - t.y0) & (gx - t.x0 < t.size) & (gy - t.y0 < t.size) for t in tiles)
    inside = (gx < fp.width - 1) & (gy < fp.height - 1)
    assert np.all(owners[inside] == 1)
    assert any(t["is_saturated"].any() for t in per_tile)


def test_overlap_objects_and_pixels_agree(release):
    root = release.parent
    m = load_manifest(release)
    ta, tb = Table.read(root / "truth" / "t0000.fits"), Table.read(root / "truth" / "t0001.fits")
    common = np.intersect1d(ta["id"], tb["id"])
    assert common.size > 3
    a = ta[np.searchsorted(ta["id"], common)]
    b = tb[np.searchsorted(tb["id"], common)]
    for col in ("ra", "dec", "flux_r", "type", "blend_group"):
        assert np.all(a[col] == b[col]), col
    only_two = a["y"] < 192                                   # below the overlap with tiles 2 and 3
    assert np.all(a["in_inner"][only_two] ^ b["in_inner"][only_two])   # owned by exactly one of the two
    for band in ("r", "u"):
        ima, wa, ma, ha = _read(root / m.tiles[0].files[band].path, m.tiles[0].files[band])
        imb, wb, mb, hb = _read(root / m.tiles[1].files[band].path, m.tiles[1].files[band])
        wcs_a, wcs_b = WCS(ha), WCS(hb)
        ra, dec = wcs_a.all_pix2world(a["x"], a["y"], 0)
        np.testing.assert_allclose(ra, a["ra"], atol=1e-3 / 3600)
        xb, yb = wcs_b.all_world2pix(ra, dec, 0)
        np.testing.assert_allclose(xb, b["x"], atol=1e-3)
        np.testing.assert_allclose(yb, b["y"], atol=1e-3)
        # the overlap columns (tile 0 x >= 192 == tile 1 x < 64) hold the same sky: chi^2 ~ 1
        da = ima[:, 192:] - _bkg(ha, ima.shape)[:, 192:]
        db = imb[:, :64] - _bkg(hb, imb.shape)[:, :64]
        good = (ma[:, 192:] == 0) & (mb[:, :64] == 0)
        chi = (da - db)[good] * np.sqrt(1 / (1 / wa[:, 192:][good] + 1 / wb[:, :64][good]))
        assert np.mean(chi**2) == pytest.approx(1.0, abs=0.05)
        if band == "r":   # ...and sources are really there in both: signal well above the noise
            assert np.sum(da[good] * np.sqrt(wa[:, 192:][good]) > 5) > 20


def test_sky_weight_is_inverse_variance(release):
    root = release.parent
    m = load_manifest(release)
    # the weight is the inverse variance of empty sky (within 5 %)
    spec = m.tiles[0]
    for band in "gz":
        im, w, mk, hdr = _read(root / spec.files[band].path, spec.files[band])
        r = im - _bkg(hdr, im.shape)
        sky = (mk == 0) & (w > 0.9995 * np.median(w[mk == 0]))
        d = r[sky]
        mad_sigma = 1.4826 * np.median(np.abs(d - np.median(d)))
        assert mad_sigma * np.sqrt(np.median(w[sky])) == pytest.approx(1.0, rel=0.05)
        assert hdr["SKYSIG"] == pytest.approx(1 / np.sqrt(np.median(w[sky])), rel=0.01)


def test_saturated_pixels_are_masked(release):
    root = release.parent
    m = load_manifest(release)
    n_sat = 0
    for spec in m.tiles:
        truth = Table.read(root / "truth" / f"{spec.id}.fits")
        sat = truth[truth["is_saturated"]]
        assert len(sat) >= 1                          # every tile gets a saturating star
        im, w, mk, hdr = _read(root / spec.files["r"].path, spec.files["r"])
        flag = (mk & MASK_BITS["saturated"]) != 0
        n_sat += flag.sum()
        assert np.all(im[flag] == np.float32(hdr["SATURATE"]))
        assert im.max() <= np.float32(hdr["SATURATE"])
        assert np.all(w[(mk & MASK_BITS["bad"]) != 0] == 0)
    assert n_sat > 0


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    kw = dict(n_tiles=2, size=96, bands="gi", overlap=16, progress=False)
    a = write_release(tmp_path / "a", seed=130, **kw).parent
    b = write_release(tmp_path / "b", seed=130, **kw).parent
    c = write_release(tmp_path / "c", seed=131, **kw).parent
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert da == db
    assert set(da) == set(dc)
    for k in ("t0000_g.fits", "t0001_i.fits", "truth.fits", "truth/t0000.fits"):
        assert da[k] != dc[k], k


def test_compressed_release_is_deterministic_and_loads(tmp_path):
    kw = dict(n_tiles=2, size=96, bands="r", overlap=16, progress=False, compress=True, seed=132)
    a = write_release(tmp_path / "a", **kw)
    b = write_release(tmp_path / "b", **kw)
    assert _digests(a.parent) == _digests(b.parent)
    m = load_manifest(a)
    f = m.tiles[0].files["r"]
    assert f.path == "t0000_r.fits.fz" and (f.image, f.weight, f.mask) == (1, 2, 3)
    td = load_tile(m, m.tiles[0])
    assert np.isfinite(td.image["r"]).all()
    plain = write_release(tmp_path / "p", **{**kw, "compress": False})
    ref = fitsio.read(str(plain.parent / "t0000_r.fits"), ext=0)
    got = fitsio.read(str(a.parent / "t0000_r.fits.fz"), ext=1)
    sig = fitsio.read_header(str(plain.parent / "t0000_r.fits"), ext=0)["SKYSIG"]
    assert np.abs(got - ref).max() < 0.1 * sig             # RICE quantisation well below the noise


def test_artefact_injector_hook(tmp_path):
    calls = []

    def inject(image, weight, *, band, rng, stars, saturate, psf_fwhm_pix):
        calls.append((band, len(stars), saturate, psf_fwhm_pix, image.shape))
        assert image.dtype == np.float32 and weight.shape == image.shape
        assert {"x", "y", "flux_" + band, "peak"} <= set(stars.colnames)
        bits = np.zeros(image.shape, np.uint16)
        col = int(rng.integers(10, image.shape[1] - 10))
        image[:, col] = saturate
        bits[:, col] = 4
        return bits

    man = write_release(tmp_path / "a", n_tiles=2, size=96, bands="gr", overlap=16, seed=133, progress=False,
                        artefact_injector=inject)
    root = man.parent
    assert [c[0] for c in calls] == ["g", "r", "g", "r"]
    assert all(c[3] > 3 for c in calls)
    for tile in ("t0000", "t0001"):
        for band in "gr":
            bits = fitsio.read(str(root / "truth" / f"{tile}_{band}_artefacts.fits"))
            assert bits.dtype == np.uint16 and bits.shape == (96, 96)
            col = np.flatnonzero(bits.any(axis=0))
            assert col.size == 1
            img = fitsio.read(str(root / f"{tile}_{band}.fits"), ext=0)
            sat = fitsio.read_header(str(root / f"{tile}_{band}.fits"), ext=0)["SATURATE"]
            assert np.all(img[:, col[0]] == np.float32(sat))


def test_layout_shapes():
    assert grid_shape(4) == (2, 2) and grid_shape(6) == (3, 2) and grid_shape(7) == (7, 1) and grid_shape(1) == (1, 1)
    tiles, fp = tile_layout(6, 100, 20)
    assert fp.width == 3 * 80 + 20 and fp.height == 2 * 80 + 20
    assert tiles[0].inner == (0, 90, 0, 90) and tiles[1].inner == (10, 90, 0, 90) and tiles[5].inner == (10, 100, 10, 100)
    with pytest.raises(ValueError):
        tile_layout(2, 100, 60)
    with pytest.raises(ValueError):
        write_release("/nonexistent/never", bands="ugq", progress=False)


def test_depth_argument_sets_noise(tmp_path):
    deep = write_release(tmp_path / "d", n_tiles=1, size=64, bands="r", seed=134, progress=False)
    shallow = write_release(tmp_path / "s", n_tiles=1, size=64, bands="r", seed=134, progress=False, depth={"r": 25.0})
    hd = fitsio.read_header(str(deep.parent / "t0000_r.fits"), ext=0)
    hs = fitsio.read_header(str(shallow.parent / "t0000_r.fits"), ext=0)
    assert hd["M5"] == 26.0 and hs["M5"] == 25.0
    assert hs["SKYSIG"] / hd["SKYSIG"] == pytest.approx(10 ** 0.4, rel=1e-4)   # 1 mag shallower
    assert hd["MAGZERO"] == 27.0 and hd["PSF_FWHM"] == pytest.approx(0.82)


def test_simulation_yaml_records_the_artefact_injection(tmp_path):
    import yaml

    from workflows.mock.artefacts import DEFAULT_RATES, inject_artefacts

    clean = write_release(tmp_path / "clean", n_tiles=1, size=96, bands="gr", overlap=16, seed=134, progress=False)
    dirty = write_release(tmp_path / "dirty", n_tiles=1, size=96, bands="gr", overlap=16, seed=134, progress=False,
                          artefact_injector=inject_artefacts)
    a = yaml.safe_load((clean.parent / "simulation.yaml").read_text())
    b = yaml.safe_load((dirty.parent / "simulation.yaml").read_text())
    assert a["artefacts"] is None
    assert b["artefacts"]["injector"] == "workflows.mock.artefacts.inject_artefacts"
    assert b["artefacts"]["rates"]["cosmic_rays_per_mpix"] == list(DEFAULT_RATES.cosmic_rays_per_mpix)
    assert {k: v for k, v in a.items() if k != "artefacts"} == {k: v for k, v in b.items() if k != "artefacts"}
