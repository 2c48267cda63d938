"""Writing a mock data release: tiles on a sky grid, per-band FITS, truth tables, manifest.

Layout: ``n_tiles`` tiles of ``size`` x ``size`` pixels on an ``nx`` x ``ny`` grid (``nx * ny ==
n_tiles``, as square as possible; a prime count gives a strip) stepping by ``size - overlap``.
All tiles share one TAN projection (CD matrix, 0.2"/px, north up, east left) centred on
(RA, Dec) = (150, 2) -- a tile's WCS is the global one with CRPIX shifted -- so a pixel of an
overlap is the same sky position in every tile that holds it. Inner regions cut every overlap in
the middle and reach the tile edge on the outside of the grid: they partition the footprint.

Per tile and band one FITS file ``{tile}_{band}.fits`` (HDU 0 image, 1 WEIGHT, 2 MASK) or, with
``compress=True``, ``{tile}_{band}.fits.fz`` (RICE_1, SUBTRACTIVE_DITHER_2, qlevel 16, a fixed
dither seed per file; HDU 0 is then empty and the planes are HDUs 1, 2, 3).

Image: float32, sky subtracted, in units with ``MAGZERO`` (AB mag of one unit, 27.0 by default)
with a small residual background plane left in (``BKG_C0/BKG_CX/BKG_CY`` in the header, model
``c0 + cx (x - (nx-1)/2)/nx + cy (y - (ny-1)/2)/ny``, 0-based pixels). Weight: the exact inverse
variance used to draw the noise (sky + source Poisson + read noise), 0 on dead pixels. Mask
(int16): 1 = bad (dead) pixel, 2 = saturated (clipped at ``SATURATE``).

Truth: ``truth/{tile}.fits`` with every object whose centre lies on the tile's pixels
(x, y in [-0.5, size - 0.5)), ``truth.fits`` with the primary (``in_inner``) rows of all tiles,
each object exactly once. Files are byte-identical for identical arguments.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .population import TYPES, Footprint, Population, make_population
from .psf import SurveyConfig
from .render import MASK_BITS, add_noise, render_model
from .sed import LSST_BANDS, njy_to_mag
from .seeds import make_rng

NOISE_KEY = 2
ARTEFACT_KEY = 4
RELEASE_NAME = "mock-dr1"
ArtefactInjector = Callable[..., np.ndarray]


@dataclass(frozen=True)
class TileGeometry:
    """One tile of the grid: id, grid position, global pixel origin and inner region (local)."""

    id: str
    index: int
    ix: int
    iy: int
    x0: int
    y0: int
    size: int
    inner: tuple[int, int, int, int]  # xmin, xmax, ymin, ymax (half-open, local 0-based pixels)

    def inner_dict(self) -> dict[str, int]:
        return dict(zip(("xmin", "xmax", "ymin", "ymax"), self.inner))

    def global_inner(self) -> tuple[float, float, float, float]:
        x0, x1, y0, y1 = self.inner
        return (self.x0 + x0, self.x0 + x1, self.y0 + y0, self.y0 + y1)

    def in_inner(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x0, x1, y0, y1 = self.inner
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def grid_shape(n_tiles: int) -> tuple[int, int]:
    """(nx, ny) with nx * ny == n_tiles, nx >= ny, as square as possible."""
    ny = max(d for d in range(1, int(math.isqrt(n_tiles)) + 1) if n_tiles % d == 0)
    return n_tiles // ny, ny


def tile_layout(n_tiles: int, size: int, overlap: int, *, ra0: float = 150.0, dec0: float = 2.0,
                pixel_scale: float = 0.2) -> tuple[list[TileGeometry], Footprint]:
    """Tiles on the grid and the footprint (global pixel grid + WCS) they cover."""
    if n_tiles < 1:
        raise ValueError("n_tiles must be >= 1")
    if size < 16:
        raise ValueError("size must be >= 16 pixels")
    nx, ny = grid_shape(n_tiles)
    if n_tiles == 1:
        overlap = 0   # nothing to overlap with
    if not 0 <= overlap < size // 2:
        raise ValueError(f"overlap must lie in [0, size/2) = [0, {size // 2}), got {overlap}")
    step = size - overlap
    lo, hi = overlap // 2, size - (overlap - overlap // 2)
    tiles = []
    for iy in range(ny):
        for ix in range(nx):
            k = iy * nx + ix
            inner = (0 if ix == 0 else lo, size if ix == nx - 1 else hi,
                     0 if iy == 0 else lo, size if iy == ny - 1 else hi)
            tiles.append(TileGeometry(f"t{k:04d}", k, ix, iy, ix * step, iy * step, size, inner))
    fp = Footprint(nx * step + overlap, ny * step + overlap, ra0=ra0, dec0=dec0, pixel_scale=pixel_scale)
    return tiles, fp


def _cards(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, tuple):
            out.append({"name": k, "value": v[0], "comment": v[1]})
        else:
            out.append({"name": k, "value": v})
    return out


def _write_fits(path: Path, planes: list[tuple[np.ndarray, str, dict[str, Any]]], compress: bool, dither_seed: int) -> dict[str, int]:
    """Write image/weight/mask planes; returns the HDU index of each plane."""
    import fitsio

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    hdus = {}
    with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
        for k, (arr, name, hdr) in enumerate(planes):
            kw: dict[str, Any] = {}
            if compress:
                kw = dict(compress="RICE", tile_dims=[1, arr.shape[1]])
                if arr.dtype.kind == "f":
                    kw.update(qlevel=16, qmethod="SUBTRACTIVE_DITHER_2", dither_seed=int(dither_seed) + k)
            f.write(arr, extname=None if (k == 0 and not compress) else name, header=_cards(hdr), **kw)
            hdus[name] = k + (1 if compress else 0)
    tmp.replace(path)
    return hdus


def _truth_table(pop: Population, sel: np.ndarray, tile: TileGeometry, bands: str, is_sat: np.ndarray):
    from astropy.table import Table

    x = pop["X"][sel] - tile.x0
    y = pop["Y"][sel] - tile.y0
    t = Table()
    t["id"] = pop["id"][sel].astype(np.int64)
    t["x"], t["y"] = x, y
    t["ra"], t["dec"] = pop["ra"][sel], pop["dec"][sel]
    t["type"] = np.array([TYPES[k] for k in pop["type"][sel]], dtype="U9")
    t["z"] = pop["z"][sel]
    for b in bands:
        t[f"flux_{b}"] = pop.flux(b)[sel]
    for b in bands:
        t[f"mag_{b}"] = njy_to_mag(pop.flux(b)[sel])
    for name in ("hlr", "q", "beta"):
        t[name] = pop[name][sel]
    t["blend_group"] = pop["blend_group"][sel].astype(np.int64)
    t["blend_size"] = pop["blend_size"][sel].astype(np.int32)
    t["is_saturated"] = is_sat
    t["in_inner"] = tile.in_inner(x, y)
    for name in ("bulge_frac", "sed_bulge", "sed_disk", "hlr_bulge", "hlr_disk", "incl", "h_over_r", "knot_frac", "teff"):
        t[name] = pop[name][sel]
    t["n_knots"] = pop["n_knots"][sel].astype(np.int16)
    units = {"x": "pix", "y": "pix", "ra": "deg", "dec": "deg", "hlr": "arcsec", "beta": "deg", "hlr_bulge": "arcsec",
             "hlr_disk": "arcsec", "incl": "deg", "teff": "K"}
    units.update({f"flux_{b}": "nJy" for b in bands})
    units.update({f"mag_{b}": "mag" for b in bands})
    for k, u in units.items():
        t[k].unit = u
    descr = {
        "id": "object id, unique in the release (same in overlapping tiles)",
        "x": "true centre, 0-based pixel x in this tile", "y": "true centre, 0-based pixel y in this tile",
        "type": "star / spheroid / disk / edgeon / irregular", "z": "redshift (0 for stars)",
        "hlr": "circularised half-light radius sqrt(ab) of the intrinsic i-band light (0 for stars)",
        "q": "axis ratio b/a", "beta": "position angle of the major axis, ccw from +x",
        "blend_group": "friends-of-friends blend group (smallest member id)", "blend_size": "members in the blend group",
        "is_saturated": "centre pixel saturated in at least one band", "in_inner": "centre in this tile's inner region (primary)",
        "bulge_frac": "i-band bulge-to-total flux ratio", "sed_bulge": "CWW template index of the bulge (0=E..3=Im)",
        "sed_disk": "CWW template index of the disk/star-forming component", "incl": "disk inclination (edgeon)",
        "h_over_r": "disk scale height / scale radius (edgeon)", "knot_frac": "fraction of the disk light in knots",
        "n_knots": "number of star-forming knots", "teff": "blackbody temperature of stars",
    }
    for k, d in descr.items():
        t[k].description = d
    return t


def write_tile(out_dir: Path, tile: TileGeometry, pop: Population, config: SurveyConfig, bands: str, seed: int, *,
               compress: bool = False, artefact_injector: ArtefactInjector | None = None, galsim_mag: float | None = None,
               fp: Footprint) -> dict[str, Any]:
    """Render, noise and write one tile (all bands) and its truth table; returns its manifest entry."""
    out_dir = Path(out_dir)
    size = tile.size
    margin = 600
    near = np.flatnonzero((pop["X"] > tile.x0 - margin) & (pop["X"] < tile.x0 + size + margin)
                          & (pop["Y"] > tile.y0 - margin) & (pop["Y"] < tile.y0 + size + margin))
    sub = pop.take(near)
    xl, yl = sub["X"] - tile.x0, sub["Y"] - tile.y0
    on_tile = np.flatnonzero((xl >= -0.5) & (xl < size - 0.5) & (yl >= -0.5) & (yl < size - 0.5))
    ix = np.clip(np.round(xl[on_tile]).astype(np.int64), 0, size - 1)
    iy = np.clip(np.round(yl[on_tile]).astype(np.int64), 0, size - 1)
    is_sat = np.zeros(on_tile.size, bool)
    wcs = fp.wcs_header(tile.x0, tile.y0, size, size)
    wcs_cards = {k: v for k, v in wcs.items() if k not in ("NAXIS", "NAXIS1", "NAXIS2")}
    files: dict[str, Any] = {}
    bkg_meta: dict[str, float] = {}
    ext = ".fits.fz" if compress else ".fits"
    truth_dir = out_dir / "truth"
    truth = _truth_table(sub, on_tile, tile, bands, is_sat)
    star_rows = np.flatnonzero(truth["type"] == "star")
    gmag = config.m5["i"] - 2.0 if galsim_mag is None else galsim_mag
    for b in bands:
        bs = config.band(b)
        bi = LSST_BANDS.index(b)
        model, _ = render_model(sub, bs, (size, size), (tile.x0, tile.y0), galsim_mag=gmag)
        peak = model[iy, ix]
        rng = make_rng(seed, NOISE_KEY, tile.index, bi)
        nr = add_noise(model, bs, rng, bkg_sigma=config.bkg_residual_sigma)
        del model
        is_sat |= (nr.mask[iy, ix] & MASK_BITS["saturated"]) != 0
        c0, cx, cy = nr.bkg_coeffs
        bkg_meta.update({f"BKG0_{b.upper()}": c0, f"BKGX_{b.upper()}": cx, f"BKGY_{b.upper()}": cy})
        hdr: dict[str, Any] = {
            **wcs_cards,
            **bs.header_cards(),
            "TILEID": (tile.id, "tile id in the manifest"),
            "RELEASE": (RELEASE_NAME, "mock survey release"),
            "SIMSEED": (int(seed), "surveypipe mock seed"),
            "BKG_C0": (float(np.float32(c0)), "residual background: constant (image units)"),
            "BKG_CX": (float(np.float32(cx)), "residual background: x slope per tile width"),
            "BKG_CY": (float(np.float32(cy)), "residual background: y slope per tile height"),
            "BKGMODEL": ("C0+CX*(x-(nx-1)/2)/nx+CY*(y-(ny-1)/2)/ny", "0-based pixels"),
            "MASKBITS": ("1=BAD 2=SATURATED", "mask HDU bits"),
        }
        whdr = {**wcs_cards, "BUNIT": ("image units**-2", "inverse variance"), "FILTER": (b, "")}
        mhdr = {**wcs_cards, "MASK_BAD": (MASK_BITS["bad"], "dead pixel"),
                "MASK_SAT": (MASK_BITS["saturated"], "saturated (clipped at SATURATE)"), "FILTER": (b, "")}
        if artefact_injector is not None:
            stars = truth[star_rows]
            stars["peak"] = peak[star_rows]  # noiseless centre-pixel value in this band (image units)
            stars["peak"].description = "noiseless centre pixel value in this band (image units)"
            bits = artefact_injector(nr.image, nr.weight, band=b, rng=make_rng(seed, ARTEFACT_KEY, tile.index, bi),
                                     stars=stars, saturate=float(np.float32(bs.saturate)), psf_fwhm_pix=bs.fwhm_pix)
            bits = np.zeros(nr.image.shape, np.uint16) if bits is None else np.asarray(bits).astype(np.uint16, copy=False)
            if bits.shape != nr.image.shape:
                raise ValueError(f"artefact_injector returned a mask of shape {bits.shape}, expected {nr.image.shape}")
            _write_plain(truth_dir / f"{tile.id}_{b}_artefacts.fits", bits, {**wcs_cards, "TILEID": tile.id, "FILTER": b})
        path = out_dir / f"{tile.id}_{b}{ext}"
        hdus = _write_fits(path, [(nr.image, "IMAGE", hdr), (nr.weight, "WEIGHT", whdr), (nr.mask, "MASK", mhdr)],
                           compress, _dither_seed(seed, tile.index, bi))
        files[b] = {"path": path.name, "image": hdus["IMAGE"], "weight": hdus["WEIGHT"], "mask": hdus["MASK"]}
    truth["is_saturated"] = is_sat
    truth.meta.update({"TILEID": tile.id, "SIMSEED": int(seed), "BANDS": bands, "X0": tile.x0, "Y0": tile.y0,
                       "MAGZERO": config.magzero})
    truth.meta.update({k: float(np.float32(v)) for k, v in bkg_meta.items()})
    _write_table(truth, truth_dir / f"{tile.id}.fits")
    return {"id": tile.id, "files": files, "inner": tile.inner_dict(), "_truth": truth,
            "_n_objects": len(truth), "_n_primary": int(np.sum(truth["in_inner"]))}


def _write_plain(path: Path, arr: np.ndarray, hdr: dict[str, Any]) -> None:
    import fitsio

    tmp = path.with_name(path.name + ".tmp")
    with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
        f.write(arr, header=_cards(hdr))
    tmp.replace(path)


def _dither_seed(seed: int, tile_index: int, band_index: int) -> int:
    """A fixed dither seed (1..10000 as cfitsio requires) for one file; +k for its k-th plane."""
    return 1 + (int(seed) * 7919 + tile_index * 61 + band_index * 7) % 9990


def _write_table(table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    table.write(tmp, format="fits", overwrite=True)
    tmp.replace(path)


def _manifest_yaml(bands: str, tiles: list[dict[str, Any]]) -> str:
    import yaml

    doc = {"name": RELEASE_NAME, "bands": list(bands),
           "tiles": [{"id": t["id"], "files": t["files"], "inner": t["inner"]} for t in tiles]}
    class _Dumper(yaml.SafeDumper):
        def increase_indent(self, flow=False, indentless=False):  # indent list items under their key
            return super().increase_indent(flow, False)

    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=200)


def _parse_bands(bands: str | Iterable[str]) -> str:
    b = "".join(bands) if not isinstance(bands, str) else bands
    b = b.replace(",", "").replace(" ", "")
    if not b or any(c not in LSST_BANDS for c in b) or len(set(b)) != len(b):
        raise ValueError(f"bands must be distinct letters of {LSST_BANDS!r}, got {bands!r}")
    return "".join(c for c in LSST_BANDS if c in b)


def write_release(out_dir: str | Path, *, n_tiles: int = 4, size: int = 1024, bands: str | Iterable[str] = "ugrizy",
                  seed: int = 42, overlap: int = 64, compress: bool = False,
                  depth: float | dict[str, float] | None = None,
                  artefact_injector: ArtefactInjector | None = None, progress: bool = True,
                  galsim_mag: float | None = None) -> Path:
    """Simulate a mock data release into ``out_dir`` and return the path of ``manifest.yaml``.

    ``depth``: None for the default LSST-like depths (r = 26.0, see :mod:`workflows.mock.psf`), a
    number for the r-band 5 sigma depth (all bands shifted alike) or a ``{band: m5}`` mapping.
    ``artefact_injector(image, weight, band=, rng=, stars=, saturate=, psf_fwhm_pix=)`` is called
    per tile and band after the noise; it edits ``image`` (and ``weight``) in place and returns a
    uint16 per-pixel truth mask, written to ``truth/{tile}_{band}_artefacts.fits``.
    ``galsim_mag``: objects brighter than this in i are drawn with GalSim, the rest with the
    batched k-space renderer (default m5_i - 2).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    bands = _parse_bands(bands)
    seed = int(seed)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    config = SurveyConfig.with_depth(depth)
    tiles, fp = tile_layout(int(n_tiles), int(size), int(overlap))
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(exist_ok=True)
    pop = make_population(fp, seed, config, bright_star_regions=[(t.index, t.global_inner()) for t in tiles])
    if progress:
        nx, ny = grid_shape(int(n_tiles))
        print(f"simulate: {len(pop)} objects on {nx}x{ny} tiles of {size}x{size} px, bands {bands}, seed {seed} "
              f"({time.perf_counter() - t_start:.1f} s)", flush=True)
    entries = []
    per_tile = []
    for k, tile in enumerate(tiles):
        t0 = time.perf_counter()
        e = write_tile(out, tile, pop, config, bands, seed, compress=compress, artefact_injector=artefact_injector,
                       galsim_mag=galsim_mag, fp=fp)
        dt = time.perf_counter() - t0
        per_tile.append(dt)
        entries.append(e)
        if progress:
            print(f"simulate: tile {tile.id} ({k + 1}/{len(tiles)}): {len(bands)} bands, {e['_n_objects']} objects "
                  f"({e['_n_primary']} primary), {dt:.1f} s", flush=True)
    from astropy.table import vstack

    parts = []
    for e in entries:
        tt = e["_truth"][e["_truth"]["in_inner"]]
        tt["tile"] = np.array([e["id"]] * len(tt), dtype="U16")
        parts.append(tt)
    merged = vstack(parts, metadata_conflicts="silent")
    merged.sort("id")
    merged.meta = {"SIMSEED": seed, "BANDS": bands, "NTILES": len(tiles), "MAGZERO": config.magzero}
    if len(merged) != len(pop) or len(np.unique(merged["id"])) != len(merged):
        raise RuntimeError(f"inner regions do not partition the footprint: {len(merged)} primary rows for {len(pop)} objects")
    _write_table(merged, out / "truth.fits")
    _write_params(out / "simulation.yaml", seed=seed, n_tiles=int(n_tiles), size=int(size), bands=bands,
                  overlap=int(overlap), compress=bool(compress), config=config, fp=fp,
                  galsim_mag=config.m5["i"] - 2.0 if galsim_mag is None else galsim_mag,
                  artefacts=describe_injector(artefact_injector))
    manifest = out / "manifest.yaml"
    tmp = manifest.with_name("manifest.yaml.tmp")
    tmp.write_text(_manifest_yaml(bands, entries))
    tmp.replace(manifest)
    if progress:
        total = time.perf_counter() - t_start
        print(f"simulate: wrote {len(tiles)} tiles to {out} in {total:.1f} s "
              f"({np.mean(per_tile):.1f} s per tile) -> {manifest}", flush=True)
    return manifest


def describe_injector(injector: ArtefactInjector | None) -> dict[str, Any] | None:
    """What injected the artefacts, for simulation.yaml: the function and its bound settings (rates, classes).

    Without it a release with artefacts and its clean twin (same seed) had identical simulation.yaml files
    while their images differ in most pixels."""
    if injector is None:
        return None
    import dataclasses
    import functools
    import json

    fn, kw = injector, {}
    if isinstance(injector, functools.partial):
        fn, kw = injector.func, dict(injector.keywords)
    doc: dict[str, Any] = {"injector": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"}
    for k, v in kw.items():
        doc[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    from . import artefacts as art

    if fn is art.inject_artefacts and "rates" not in kw:
        doc["rates"] = dataclasses.asdict(art.DEFAULT_RATES)
    return json.loads(json.dumps(doc, default=str))  # tuples to lists, anything else to text: plain YAML


def _write_params(path: Path, *, seed: int, n_tiles: int, size: int, bands: str, overlap: int, compress: bool,
                  config: SurveyConfig, fp: Footprint, galsim_mag: float, artefacts: dict[str, Any] | None = None) -> None:
    import yaml

    doc = {
        "generator": "workflows.mock",
        "seed": seed, "n_tiles": n_tiles, "size": size, "bands": bands, "overlap": overlap, "compress": compress,
        "center_radec_deg": [fp.ra0, fp.dec0], "pixel_scale_arcsec": fp.pixel_scale,
        "footprint_px": [fp.width, fp.height],
        "magzero": config.magzero,
        "psf": {"type": "Moffat", "beta": config.psf_beta, "fwhm_arcsec": {b: config.fwhm[b] for b in bands}},
        "m5_point_source": {b: round(float(config.m5[b]), 4) for b in bands},
        "sky_mag_per_arcsec2": {b: config.sky_mag[b] for b in bands},
        "saturation_point_source_mag": config.sat_mag,
        "galsim_mag_i": round(float(galsim_mag), 4),
        "mask_bits": dict(MASK_BITS),
        "artefacts": artefacts,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=200))
