"""Reading one tile's multi-band FITS into calibrated arrays (nJy), with checks that name
the tile, the file and the reason for anything unprocessable.

Runs on the worker that processes the tile, so pixel data never crosses the network.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError
from .manifest import BandFile, InnerRegion, Manifest, TileSpec

NJY_ZEROPOINT = 31.4  # AB magnitude of 1 nJy
WCS_KEYS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2")


@dataclass
class TileData:
    """One tile, every present band on one pixel grid, calibrated to nJy.

    ``weight`` is inverse variance in nJy⁻²; ``bad`` is True where a pixel must not be used
    (input mask, zero weight, NaN/inf). Bands missing from the tile are simply absent.
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


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_hdu(tile: str, path: Path, hdu: int | str, what: str) -> tuple[np.ndarray, dict[str, Any]]:
    import fitsio

    if not path.exists():
        raise BadInputError(tile, str(path), f"{what} file does not exist")
    try:
        with fitsio.FITS(str(path)) as f:
            try:
                h = f[hdu]
            except (IndexError, KeyError, ValueError, OSError) as exc:
                raise BadInputError(tile, str(path), f"{what} HDU {hdu!r} not found ({len(f)} HDUs in file)") from exc
            if h.get_exttype() not in ("IMAGE_HDU",) or h.get_dims() == []:
                raise BadInputError(tile, str(path), f"{what} HDU {hdu!r} holds no image")
            data = h.read()
            hdr = h.read_header()
    except BadInputError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise BadInputError(tile, str(path), f"cannot read {what} HDU {hdu!r}: {exc}") from exc
    if data is None or data.ndim != 2:
        raise BadInputError(tile, str(path), f"{what} HDU {hdu!r} is not a 2-D image")
    header = {k: hdr[k] for k in hdr.keys() if k and k not in ("COMMENT", "HISTORY", "")}
    return data, header


def _wcs_of(tile: str, path: Path, header: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in WCS_KEYS if k not in header]
    if missing:
        raise BadInputError(tile, str(path), f"no celestial WCS in the image header (missing {', '.join(missing)})")
    keys = [k for k in header if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "CDELT", "PC1_", "PC2_", "CUNIT", "RADESYS", "EQUINOX", "LONPOLE", "LATPOLE"))]
    return {k: header[k] for k in keys} | {"NAXIS": 2, "NAXIS1": header.get("NAXIS1"), "NAXIS2": header.get("NAXIS2")}


def _same_wcs(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    from astropy.wcs import WCS

    wa, wb = WCS(a), WCS(b)
    if wa.wcs.ctype[0] != wb.wcs.ctype[0] or wa.wcs.ctype[1] != wb.wcs.ctype[1]:
        return f"projection differs ({list(wa.wcs.ctype)} vs {list(wb.wcs.ctype)})"
    sa = np.sqrt(abs(np.linalg.det(wa.pixel_scale_matrix)))
    sb = np.sqrt(abs(np.linalg.det(wb.pixel_scale_matrix)))
    if abs(sa / sb - 1) > 1e-6:
        return f"pixel scale differs ({sa*3600:.5f} vs {sb*3600:.5f} arcsec)"
    # a corner and the centre must land on the same sky position to 1 mas
    px = np.array([[0.0, 0.0], [1000.0, 1000.0]])
    ra, rb = wa.all_pix2world(px, 0), wb.all_pix2world(px, 0)
    if np.max(np.abs(ra - rb)) * 3600 > 1e-3:
        return "WCS reference differs (pixel grids do not line up)"
    return None


def load_tile(manifest: Manifest, spec: TileSpec, bands: list[str] | None = None) -> TileData:
    """Read, check and calibrate every band of a tile; raise :class:`BadInputError` if unusable."""
    tile = spec.id
    want = [b for b in (bands or manifest.bands) if b in spec.files]
    if not want:
        raise BadInputError(tile, None, f"none of the requested bands {bands or manifest.bands} is present")
    image, weight, bad, headers, files, sums = {}, {}, {}, {}, {}, {}
    ref_shape: tuple[int, int] | None = None
    ref_wcs: dict[str, Any] | None = None
    ref_file = ""
    for band in want:
        bf: BandFile = spec.files[band]
        path = manifest.resolve(bf.path)
        files[band] = str(path)
        sci, hdr = _read_hdu(tile, path, bf.image, f"band {band} image")
        if bf.weight is not None or bf.weight_path:
            wpath = manifest.resolve(bf.weight_path) if bf.weight_path else path
            wt, _ = _read_hdu(tile, wpath, bf.weight if bf.weight is not None else 0, f"band {band} weight")
        else:
            wpath = path
            wt = None
        if bf.mask is not None or bf.mask_path:
            mpath = manifest.resolve(bf.mask_path) if bf.mask_path else path
            msk, _ = _read_hdu(tile, mpath, bf.mask if bf.mask is not None else 0, f"band {band} mask")
        else:
            mpath, msk = path, None
        for arr, p, what in ((wt, wpath, "weight"), (msk, mpath, "mask")):
            if arr is not None and arr.shape != sci.shape:
                raise BadInputError(tile, str(p), f"band {band} {what} shape {arr.shape} differs from image {sci.shape}")
        if ref_shape is None:
            ref_shape, ref_file = sci.shape, str(path)
        elif sci.shape != ref_shape:
            raise BadInputError(tile, str(path), f"band {band} pixel grid {sci.shape} differs from {ref_shape} of {ref_file}")
        wcs = _wcs_of(tile, path, hdr)
        if ref_wcs is None:
            ref_wcs = wcs
        else:
            why = _same_wcs(ref_wcs, wcs)
            if why:
                raise BadInputError(tile, str(path), f"band {band} WCS inconsistent with {ref_file}: {why}")
        zp = bf.zeropoint if bf.zeropoint is not None else hdr.get("MAGZERO")
        if zp is None:
            raise BadInputError(tile, str(path), f"band {band}: no MAGZERO keyword and no zeropoint in the manifest")
        scale = np.float32(10.0 ** (-0.4 * (float(zp) - NJY_ZEROPOINT)))  # image unit -> nJy
        sci = sci.astype(np.float32, copy=False)
        finite = np.isfinite(sci)
        if wt is None:
            # no weight plane: estimate a constant inverse variance from the sky (MAD of the image)
            med = np.median(sci[finite]) if finite.any() else 0.0
            mad = np.median(np.abs(sci[finite] - med)) * 1.4826 if finite.any() else 0.0
            wt = np.full(sci.shape, 1.0 / mad**2 if mad > 0 else 0.0, np.float32)
        wt = wt.astype(np.float32, copy=False)
        if np.any(wt[np.isfinite(wt)] < 0):
            raise BadInputError(tile, str(wpath), f"band {band} weight has negative values (inverse variance must be >= 0)")
        badpix = ~finite | ~np.isfinite(wt) | (wt <= 0)
        if msk is not None:
            badpix |= msk != 0
        good = ~badpix
        if not good.any():
            raise BadInputError(tile, str(path), f"band {band} has no usable pixel (all masked, zero weight or NaN)")
        vals = sci[good]
        if np.ptp(vals) == 0:
            raise BadInputError(tile, str(path), f"band {band} image is constant ({float(vals[0])}): no data")
        sci = np.where(badpix, np.float32(0), sci) * scale
        wt = np.where(badpix, np.float32(0), wt) / (scale * scale)
        image[band] = sci.astype(np.float32, copy=False)
        weight[band] = wt.astype(np.float32, copy=False)
        bad[band] = badpix
        hdr_keep = {k: hdr[k] for k in ("SATURATE", "PSF_FWHM", "SEEING", "GAIN", "EXPTIME", "FILTER") if k in hdr}
        hdr_keep["FLUXSCALE"] = float(scale)
        if "SATURATE" in hdr_keep:
            hdr_keep["SATURATE_NJY"] = float(hdr_keep["SATURATE"]) * float(scale)
        headers[band] = hdr_keep
        for p in {path, wpath, mpath}:
            sums.setdefault(str(p), file_sha256(p))
    assert ref_wcs is not None and ref_shape is not None
    ref_wcs["NAXIS1"], ref_wcs["NAXIS2"] = ref_shape[1], ref_shape[0]
    return TileData(tile, want, image, weight, bad, headers, ref_wcs, spec.inner, files, sums)
