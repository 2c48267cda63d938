"""Reading one tile's multi-band FITS into calibrated arrays (nJy), with checks that name
the tile, the file and the reason for anything unprocessable.

Runs on the worker that processes the tile, so pixel data never crosses the network.

Two passes per tile:

1. headers only (cheap): every file exists, is complete (not truncated), holds a 2-D image in
   the named HDU, carries a celestial WCS and a zeropoint; every band has the same pixel
   scale, projection, pixel grid and sky alignment as the first band. A tile that fails here
   has read no pixels.
2. pixels, one band at a time: the image plane is read once as float32 and calibrated *in
   place*; NaN/inf pixels, zero weights and masked pixels become ``bad`` (value 0, weight 0);
   negative weights and constant or empty bands are refused. All per-pixel work runs in row
   blocks of :data:`BLOCK_PIXELS`, so the only full-size arrays are the returned planes
   (image and weight float32, bad bool) plus, transiently, the mask plane as stored.

The planes are then moved, band by band, into a file-backed scratch (:mod:`pipeline.scratch`)
whose pages stages hand back when a band is done; ``SURVEYPIPE_SCRATCH=memory`` keeps them in
the heap.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import BadInputError
from .manifest import BandFile, HduRef, InnerRegion, Manifest, TileSpec
from .scratch import PlaneFile, plane_bytes, plane_file, release, scratch_dir

NJY_ZEROPOINT = 31.4  # AB magnitude of 1 nJy
WCS_KEYS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2")
WCS_PREFIXES = ("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "CDELT", "PC1_", "PC2_", "CUNIT", "CROTA",
                "RADESYS", "EQUINOX", "LONPOLE", "LATPOLE", "A_", "B_", "AP_", "BP_", "PV1_", "PV2_")
BLOCK_PIXELS = 1 << 20      # pixels per block of the per-pixel checks (4 MiB of float32 temporaries)
SKY_SAMPLE_PIXELS = 1 << 20  # at most this many pixels estimate the noise when a band has no weight plane
ALIGN_TOLERANCE_ARCSEC = 1e-3  # two bands' pixels must land on the same sky position to 1 mas
SCALE_TOLERANCE = 1e-6       # relative difference of pixel scales still counted as equal
FITS_BLOCK = 2880


@dataclass
class TileData:
    """One tile, every present band on one pixel grid, calibrated to nJy.

    ``weight`` is inverse variance in nJy⁻²; ``bad`` is True where a pixel must not be used
    (input mask, zero weight, NaN/inf); there image and weight are 0. Bands missing from the
    tile are simply absent.
    """

    tile_id: str
    bands: list[str]
    image: dict[str, np.ndarray]
    weight: dict[str, np.ndarray]
    bad: dict[str, np.ndarray]
    header: dict[str, dict[str, Any]]
    wcs_header: dict[str, Any]
    inner: InnerRegion | None
    files: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    caveats: list[str] = field(default_factory=list)  # processable, with a reservation (missing band)
    consumed_by: str | None = None  # the stage that reused the pixel planes in place for its own product

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.image.values())).shape  # type: ignore[return-value]

    def wcs(self):
        from astropy.wcs import WCS

        return WCS(self.wcs_header)

    @property
    def pixel_scale_arcsec(self) -> float:
        return float(np.sqrt(abs(np.linalg.det(self.wcs().pixel_scale_matrix))) * 3600.0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for d in (self.image, self.weight, self.bad) for a in d.values())

    def release_pages(self, band: str | None = None) -> None:
        """Hand back the resident pages of one band's planes (None: every band); see :mod:`pipeline.scratch`."""
        for b in ([band] if band is not None else self.bands):
            release(self.image.get(b), self.weight.get(b), self.bad.get(b))


def file_sha256(path: Path) -> str:
    """sha256 of a file for provenance. ``hashlib.file_digest`` reads into one reused buffer:
    a loop of ``f.read(4 MiB)`` allocates (and page-faults) a fresh block each time and ran at
    a third of the hash's speed on a 2048² × 6 tile (0.41 vs 0.17 s)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------ HDU access
@dataclass
class _Plane:
    """Where one plane lives and what its header says (read before any pixel)."""

    path: Path
    hdu: HduRef
    what: str
    shape: tuple[int, int]
    header: dict[str, Any]


def _cfitsio_reason(exc: BaseException) -> str:
    """The first line of a cfitsio error (its stack dump follows on further lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _hdu_list(f) -> str:
    names = []
    for i in range(len(f)):
        ext = f[i].get_extname()
        names.append(f"{i}" + (f" ({ext})" if ext else ""))
    return ", ".join(names)


def _open_plane(tile: str, path: Path, hdu: HduRef, what: str) -> _Plane:
    """Check that ``path[hdu]`` exists, is complete and holds a 2-D image; read its header."""
    import fitsio

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadInputError(tile, str(path), f"{what} file does not exist") from None
    if not path.is_file():
        raise BadInputError(tile, str(path), f"{what} path is not a regular file")
    if size < FITS_BLOCK:
        raise BadInputError(tile, str(path), f"{what} file is truncated or not FITS ({size} bytes, "
                                             f"a FITS file has at least {FITS_BLOCK})")
    ragged = size % FITS_BLOCK != 0
    try:
        f = fitsio.FITS(str(path))
    except OSError as exc:
        if exc.errno is not None:
            raise  # a real OS error (I/O, permissions, stale handle): infrastructure
        hint = f"; its size ({size} bytes) is not a multiple of {FITS_BLOCK}: truncated?" if ragged else ""
        raise BadInputError(tile, str(path), f"{what} file is not a readable FITS file "
                                             f"({_cfitsio_reason(exc)}){hint}") from exc
    with f:
        n = len(f)
        end = f[n - 1].get_offsets()["data_end"] if n else 0
        if end > size:
            raise BadInputError(tile, str(path), f"{what} file is truncated: its HDUs need {end} bytes "
                                                 f"but the file has {size}")
        try:
            h = f[hdu]
        except (IndexError, KeyError, ValueError, OSError) as exc:
            hint = " (the file size is not a multiple of 2880 bytes: truncated?)" if ragged else ""
            raise BadInputError(tile, str(path), f"{what} HDU {hdu!r} not found; the file has {n} HDU(s): "
                                                 f"{_hdu_list(f)}{hint}") from exc
        if h.get_exttype() != "IMAGE_HDU":
            raise BadInputError(tile, str(path), f"{what} HDU {hdu!r} is a {h.get_exttype()}, not an image; "
                                                 f"HDUs: {_hdu_list(f)}")
        dims = list(h.get_dims() or [])
        if len(dims) != 2:
            hint = " (an empty primary HDU? images of .fits.fz files start at HDU 1)" if not dims else ""
            raise BadInputError(tile, str(path), f"{what} HDU {hdu!r} is not a 2-D image "
                                                 f"(NAXIS = {len(dims)}){hint}")
        if min(dims) < 1:
            raise BadInputError(tile, str(path), f"{what} HDU {hdu!r} has no pixels (shape {tuple(dims)})")
        try:
            hdr = h.read_header()
        except OSError as exc:
            raise BadInputError(tile, str(path), f"cannot read the {what} header of HDU {hdu!r}: "
                                                 f"{_cfitsio_reason(exc)}") from exc
    header = {k: hdr[k] for k in hdr.keys() if k and k not in ("COMMENT", "HISTORY", "")}
    return _Plane(path, hdu, what, (int(dims[0]), int(dims[1])), header)


def _read_pixels(tile: str, plane: _Plane) -> np.ndarray:
    """Read the pixels of a plane checked by :func:`_open_plane` (one allocation)."""
    import fitsio

    try:
        with fitsio.FITS(str(plane.path)) as f:
            data = f[plane.hdu].read()
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise BadInputError(tile, str(plane.path), f"cannot read the {plane.what} pixels of HDU {plane.hdu!r} "
                                                   f"(corrupt or truncated data: {_cfitsio_reason(exc)})") from exc
    if data is None or data.shape != plane.shape:
        raise BadInputError(tile, str(plane.path), f"{plane.what} HDU {plane.hdu!r} gave no {plane.shape} image")
    return data


def _as_float32(a: np.ndarray) -> np.ndarray:
    """``a`` as native float32, converting in place where possible (no second plane)."""
    if a.dtype == np.float32 and a.dtype.isnative and a.flags.writeable and a.flags.c_contiguous:
        return a
    if a.dtype.kind == "f" and a.dtype.itemsize == 4 and not a.dtype.isnative and a.flags.writeable:
        return a.byteswap(inplace=True).view(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a, dtype=np.float32)  # e.g. int16 or float64 pixels: one new plane


def _row_blocks(shape: tuple[int, int]) -> Iterator[slice]:
    rows = max(1, BLOCK_PIXELS // max(1, shape[1]))
    for r0 in range(0, shape[0], rows):
        yield slice(r0, min(r0 + rows, shape[0]))


# ------------------------------------------------------------------------------ WCS
def _wcs_of(tile: str, plane: _Plane) -> dict[str, Any]:
    """The celestial WCS keywords of an image header; refuse a missing or unusable WCS."""
    from astropy.wcs import WCS

    header = plane.header
    path = str(plane.path)
    missing = [k for k in WCS_KEYS if k not in header]
    has_scale = any(k in header for k in ("CD1_1", "CD2_2", "CDELT1", "CDELT2"))
    if missing or not has_scale:
        need = ", ".join(missing + ([] if has_scale else ["CD1_1/CDELT1"]))
        raise BadInputError(tile, path, f"{plane.what} header has no celestial WCS (missing {need})")
    keys = {k: header[k] for k in header if k.startswith(WCS_PREFIXES)}
    keys |= {"NAXIS": 2, "NAXIS1": plane.shape[1], "NAXIS2": plane.shape[0]}
    if any(k.startswith(("A_", "B_")) for k in keys) and "SIP" not in str(keys.get("CTYPE1", "")):
        keys = {k: v for k, v in keys.items() if not k.startswith(("A_", "B_", "AP_", "BP_"))}
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = WCS(keys)
        ok = w.has_celestial and w.naxis == 2
        det = float(np.linalg.det(w.pixel_scale_matrix)) if ok else 0.0
    except Exception as exc:  # astropy raises many types for broken WCS keywords
        raise BadInputError(tile, path, f"{plane.what} WCS cannot be interpreted: {type(exc).__name__}: {exc}") from exc
    if not ok:
        raise BadInputError(tile, path, f"{plane.what} WCS is not celestial (CTYPE {list(w.wcs.ctype)})")
    if not np.isfinite(det) or det == 0:
        raise BadInputError(tile, path, f"{plane.what} WCS is singular (pixel scale matrix determinant {det})")
    return keys


def _pixel_scale_arcsec(w) -> float:
    return float(np.sqrt(abs(np.linalg.det(w.pixel_scale_matrix))) * 3600.0)


def _separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1)))) * 3600.0


def grid_mismatch(ref: dict[str, Any], ref_shape: tuple[int, int], cur: dict[str, Any],
                  cur_shape: tuple[int, int]) -> tuple[str, str] | None:
    """Why two bands do not share one pixel grid, as (kind, detail), or None if they do.

    ``kind`` is one of ``pixel scale``, ``projection``, ``pixel grid`` (shape) and ``WCS``
    (same scale and shape but the pixels land elsewhere on the sky).
    """
    import warnings

    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wa, wb = WCS(ref), WCS(cur)
    sa, sb = _pixel_scale_arcsec(wa), _pixel_scale_arcsec(wb)
    if abs(sb / sa - 1) > SCALE_TOLERANCE:
        return "pixel scale", f"{sb:.5f} arcsec/pixel where the tile's grid has {sa:.5f}"
    if list(wa.wcs.ctype) != list(wb.wcs.ctype):
        return "projection", f"{list(wb.wcs.ctype)} where the tile's grid has {list(wa.wcs.ctype)}"
    if tuple(cur_shape) != tuple(ref_shape):
        return "pixel grid", f"{cur_shape[1]}x{cur_shape[0]} pixels where the tile's grid has {ref_shape[1]}x{ref_shape[0]}"
    h, w = ref_shape
    px = np.array([[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0], [(w - 1) / 2, (h - 1) / 2]])
    ra, rb = wa.all_pix2world(px, 0), wb.all_pix2world(px, 0)
    sep = _separation_arcsec(ra[:, 0], ra[:, 1], rb[:, 0], rb[:, 1])
    if not np.all(np.isfinite(sep)) or sep.max() > ALIGN_TOLERANCE_ARCSEC:
        i = int(np.nanargmax(np.where(np.isfinite(sep), sep, np.inf)))
        return "WCS", (f"pixel ({px[i, 0]:g}, {px[i, 1]:g}) lands {sep[i]:.4g} arcsec away from the same pixel "
                       f"of the tile's grid (tolerance {ALIGN_TOLERANCE_ARCSEC * 1000:g} mas)")
    return None


# ------------------------------------------------------------------------------ one band
@dataclass
class _BandPlan:
    band: str
    image: _Plane
    weight: _Plane | None
    mask: _Plane | None
    scale: np.float32  # image unit -> nJy


def _plan_band(tile: str, manifest: Manifest, band: str, bf: BandFile) -> _BandPlan:
    path = manifest.resolve(bf.path)
    image = _open_plane(tile, path, bf.image, f"band {band} image")
    weight = mask = None
    if bf.weight is not None or bf.weight_path:
        wpath = manifest.resolve(bf.weight_path) if bf.weight_path else path
        weight = _open_plane(tile, wpath, bf.weight if bf.weight is not None else 0, f"band {band} weight")
    if bf.mask is not None or bf.mask_path:
        mpath = manifest.resolve(bf.mask_path) if bf.mask_path else path
        mask = _open_plane(tile, mpath, bf.mask if bf.mask is not None else 0, f"band {band} mask")
    for p in (weight, mask):
        if p is not None and p.shape != image.shape:
            raise BadInputError(tile, str(p.path), f"{p.what} HDU {p.hdu!r} is {p.shape[1]}x{p.shape[0]} pixels "
                                                   f"but its image ({image.path.name}) is {image.shape[1]}x{image.shape[0]}")
    zp: Any = bf.zeropoint if bf.zeropoint is not None else image.header.get("MAGZERO")
    if zp is None:
        raise BadInputError(tile, str(path), f"band {band}: no MAGZERO keyword in HDU {bf.image!r} and no "
                                             "zeropoint in the manifest")
    try:
        zp = float(zp)
    except (TypeError, ValueError):
        raise BadInputError(tile, str(path), f"band {band}: MAGZERO {zp!r} is not a number") from None
    if not np.isfinite(zp):
        raise BadInputError(tile, str(path), f"band {band}: zeropoint {zp} is not finite")
    return _BandPlan(band, image, weight, mask, np.float32(10.0 ** (-0.4 * (zp - NJY_ZEROPOINT))))


def _noise_ivar(sci: np.ndarray, bad: np.ndarray) -> float:
    """Inverse variance of the sky from a strided sample of good pixels (no weight plane)."""
    step = max(1, int(np.ceil(np.sqrt(sci.size / SKY_SAMPLE_PIXELS))))
    sample = sci[::step, ::step][~bad[::step, ::step]]
    if sample.size < 2:
        sample = sci[~bad]  # tiny usable area: take all of it (small by construction)
    med = np.median(sample)
    sigma = float(np.median(np.abs(sample - med))) * 1.4826
    if not sigma > 0:
        sigma = float(np.std(sample))
    return 1.0 / sigma**2 if sigma > 0 else 0.0


def _load_band(tile: str, plan: _BandPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and calibrate one band in place; return (image nJy, weight nJy⁻², bad)."""
    img_path = str(plan.image.path)
    sci = _as_float32(_read_pixels(tile, plan.image))
    shape = sci.shape
    wt = None
    if plan.weight is not None:
        wt = _as_float32(_read_pixels(tile, plan.weight))
        negative = 0
        first: tuple[int, int] | None = None
        for rows in _row_blocks(shape):
            neg = wt[rows] < 0
            k = int(np.count_nonzero(neg))
            if k and first is None:
                y, x = np.unravel_index(int(np.argmax(neg)), neg.shape)
                first = (int(x), int(y) + rows.start)
            negative += k
        if negative:
            raise BadInputError(tile, str(plan.weight.path), f"band {plan.band} weight HDU {plan.weight.hdu!r} has "
                                                             f"{negative} negative value(s) (first at x={first[0]}, "
                                                             f"y={first[1]}): an inverse variance must be >= 0 "
                                                             "(use 0 for pixels to ignore)")
    msk = _read_pixels(tile, plan.mask) if plan.mask is not None else None
    bad = np.empty(shape, bool)
    vmin, vmax, ngood = np.inf, -np.inf, 0
    for rows in _row_blocks(shape):
        s, b = sci[rows], bad[rows]
        np.isfinite(s, out=b)
        np.logical_not(b, out=b)
        if wt is not None:
            w = wt[rows]
            b |= ~(w > 0)  # zero, NaN (and -inf, already refused) weights: masked
            b |= ~np.isfinite(w)
        if msk is not None:
            b |= msk[rows] != 0
        good = ~b
        n = int(np.count_nonzero(good))
        if n:
            ngood += n
            vmin = min(vmin, float(np.min(s, where=good, initial=np.inf)))
            vmax = max(vmax, float(np.max(s, where=good, initial=-np.inf)))
    del msk
    if ngood == 0:
        raise BadInputError(tile, img_path, f"band {plan.band} has no usable pixel (every pixel is masked, has zero "
                                            "weight or is NaN/inf)")
    if vmin == vmax:
        what = "all zero" if vmin == 0 else f"constant ({vmin:g})"
        raise BadInputError(tile, img_path, f"band {plan.band} image is {what} over its {ngood} usable pixels: no data")
    if wt is None:
        ivar = _noise_ivar(sci, bad)
        wt = np.full(shape, ivar, np.float32)
        if ivar == 0:
            bad[...] = True
    scale = plan.scale
    inv_scale2 = np.float32(1.0 / (float(scale) * float(scale)))
    for rows in _row_blocks(shape):
        s, w, b = sci[rows], wt[rows], bad[rows]
        s[b] = 0
        s *= scale
        w[b] = 0
        w *= inv_scale2
    return sci, wt, bad


# ------------------------------------------------------------------------------ the tile
def _plane_file(tile: str, plans: list[_BandPlan], scratch: Path | None) -> PlaneFile | None:
    h, w = plans[0].image.shape
    per_band = sum(plane_bytes((h, w), dt) for dt in (np.float32, np.float32, np.bool_))  # image, weight, bad
    return plane_file(per_band * len(plans), f"tile {tile}: pixel planes", scratch)


def _to_scratch(planes: tuple[np.ndarray, ...], store: PlaneFile) -> tuple[np.ndarray, ...]:
    out = []
    for a in planes:
        b = store.take(a.shape, a.dtype)
        b[...] = a
        release(b)  # written through to the page cache: not resident until a stage reads it
        out.append(b)
    return tuple(out)


def load_tile(manifest: Manifest, spec: TileSpec, bands: list[str] | None = None,
              scratch: Path | None | bool = True) -> TileData:
    """Read, check and calibrate every band of a tile; raise :class:`BadInputError` if unusable.

    Headers of every band are checked first (files, HDUs, WCS, pixel scale, grid), then the
    pixels are read one band at a time and calibrated in place. ``scratch``: True, the directory
    of :func:`pipeline.scratch.scratch_dir`; a path; or None/False for planes in the heap.
    """
    tile = spec.id
    want = [b for b in (bands or manifest.bands) if b in spec.files]
    if not want:
        raise BadInputError(tile, None, f"none of the requested bands {bands or manifest.bands} is present "
                                        f"(the tile has {sorted(spec.files)})")
    plans = [_plan_band(tile, manifest, b, spec.files[b]) for b in want]
    ref = plans[0]
    ref_wcs = _wcs_of(tile, ref.image)
    for p in plans[1:]:
        cur_wcs = _wcs_of(tile, p.image)
        why = grid_mismatch(ref_wcs, ref.image.shape, cur_wcs, p.image.shape)
        if why:
            kind, detail = why
            advice = {"pixel scale": "resample every band of a tile onto one grid before processing",
                      "projection": "every band of a tile must share one WCS",
                      "pixel grid": "every band of a tile must have the same pixel grid",
                      "WCS": "every band of a tile must share one WCS"}[kind]
            raise BadInputError(tile, str(p.image.path), f"band {p.band} {kind} differs from band {ref.band} "
                                                         f"({ref.image.path.name}): {detail}; {advice}")
    image, weight, bad, headers, files, sums = {}, {}, {}, {}, {}, {}
    store = _plane_file(tile, plans, scratch_dir() if scratch is True else (scratch or None))
    for p in plans:
        files[p.band] = str(p.image.path)
        planes = _load_band(tile, p)
        image[p.band], weight[p.band], bad[p.band] = _to_scratch(planes, store) if store is not None else planes
        del planes
        hdr = p.image.header
        keep = {k: hdr[k] for k in ("SATURATE", "PSF_FWHM", "SEEING", "GAIN", "EXPTIME", "FILTER") if k in hdr}
        keep["FLUXSCALE"] = float(p.scale)
        if "SATURATE" in keep:
            try:
                keep["SATURATE_NJY"] = float(keep["SATURATE"]) * float(p.scale)
            except (TypeError, ValueError):
                raise BadInputError(tile, str(p.image.path), f"band {p.band}: SATURATE {keep['SATURATE']!r} "
                                                             "is not a number") from None
        headers[p.band] = keep
        for q in (p.image, p.weight, p.mask):
            if q is not None and str(q.path) not in sums:  # once per file: the planes often share one
                sums[str(q.path)] = file_sha256(q.path)
    ref_wcs["NAXIS1"], ref_wcs["NAXIS2"] = ref.image.shape[1], ref.image.shape[0]
    caveats = [f"band {b} missing from the tile (no file in the manifest): its columns are absent"
               for b in (bands or manifest.bands) if b not in spec.files]
    return TileData(tile, want, image, weight, bad, headers, ref_wcs, spec.inner, files, sums, caveats)
