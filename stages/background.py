"""Background and noise per band (sep's mesh background), the first classical stage.

Per band: the unusable pixels (input mask, zero weight, and -- when the artefact stage runs --
every pixel the artefact mask marks, its cosmic rays and hot pixels grown by ``artefact_grow``
pixels) are excluded; sep's mesh background (sigma-clipped mode per
mesh, median-filtered) is subtracted; the per-pixel noise is the weight map's (inverse variance,
which for these data includes the sources' Poisson noise), and sep's global RMS is kept as a check
of it. Saturated pixels are recognised as masked pixels connected to pixels near ``SATURATE``
(the loader zeroes masked pixels, so saturation is inferred from the unmasked rim of each masked
patch) or as unmasked pixels at or above ``SATURATE``. Saturation is inferred from the input mask
alone, never from the artefact mask: a patch the artefact mask adds around a bright cosmic ray is
not a saturated core (the detection stage fills saturated pixels at the saturation level).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import sep
from pydantic import Field
from scipy import ndimage as ndi

from pipeline.scratch import release, released_after_each
from pipeline.stage import Stage, StageConfig


@dataclass
class Sky:
    """Per band: background-subtracted image (nJy, 0 where bad), inverse variance (nJy^-2, 0 where bad),
    bad and saturated pixel masks, sep's global background level and RMS (nJy)."""

    image: dict[str, np.ndarray]
    weight: dict[str, np.ndarray]
    bad: dict[str, np.ndarray]
    saturated: dict[str, np.ndarray]
    level: dict[str, float]
    rms: dict[str, float] = field(default_factory=dict)
    weight_rms: dict[str, float] = field(default_factory=dict)

    @property
    def sigma(self) -> dict[str, np.ndarray]:
        """Per-pixel sigma (nJy; inf where unusable), computed on demand."""
        return {b: np.where(w > 0, 1.0 / np.sqrt(np.maximum(w, 1e-30)), np.inf).astype(np.float32)
                for b, w in self.weight.items()}


class BackgroundConfig(StageConfig):
    mesh: int = Field(128, ge=8, le=1024, description=(
        "background mesh size (pixels); coadds have little sky structure below ~25 arcsec, and a larger mesh adds less noise"))
    filter_size: int = Field(3, ge=1, le=11, description="median filter of the mesh (meshes)")
    mask_sources: bool = Field(True, description=(
        "estimate the sky a second time with the sources masked (from a binned multi-band S/N image)"))
    mask_bin: int = Field(4, ge=1, le=16, description="binning (pixels) of the S/N image that finds the sources to mask")
    mask_thresh: float = Field(3.0, gt=0, le=100, description="S/N of the binned coadd above which pixels are masked")
    mask_grow: int = Field(8, ge=0, le=256, description="growth of the source mask (pixels)")
    saturation_rim: float = Field(0.5, gt=0, le=1, description=(
        "a masked patch is saturated when an unmasked neighbour is brighter than this fraction of SATURATE"))
    artefact_grow: int = Field(1, ge=0, le=16, description=(
        "growth (pixels, 8-connected) of the artefact mask's sharp classes ('artefact_grow_classes') before they are "
        "made bad: their wings below the mask's 1-sigma edge still add up in the matched-filtered detection image"))
    artefact_grow_classes: tuple[str, ...] = Field(("cosmic_ray", "hot_pixel"), description=(
        "artefact classes grown by 'artefact_grow' (classes of the mask's 'bits' attribute)"))
    reuse_exposure: bool = Field(True, json_schema_extra={"output_neutral": True}, description=(
        "subtract the sky in the exposure's own image planes and zero artefact weights in its weight planes "
        "instead of copies: one tile's image and weight planes less per worker (about 200 MB of a 2048^2 x 6 "
        "tile); the exposure is then marked consumed (its planes are the sky's). False for callers that need "
        "the raw pixels afterwards (e.g. a benchmark that also runs SExtractor on them)"))


def artefact_bad(artefacts: Any, band: str, shape: tuple[int, int], grow: int = 0,
                 grow_classes: tuple[str, ...] = ()) -> np.ndarray | None:
    """Pixels the optional artefact mask (ImageSet of uint16 per band) marks in ``band``, or None.

    The pixels of ``grow_classes`` (names of the mask's ``bits`` attribute, ``{class: bit index}``;
    classes it lacks are ignored) are grown by ``grow`` pixels (8-connected)."""
    if artefacts is None:
        return None
    planes = getattr(artefacts, "planes", artefacts)
    plane = planes.get(band)
    if plane is None:
        return None
    plane = np.asarray(plane)
    if plane.shape != shape:
        raise ValueError(f"artefact mask of band {band} has shape {plane.shape}, image {shape}")
    out = plane != 0
    if grow > 0 and grow_classes:
        sharp = artefact_class_pixels(artefacts, plane, grow_classes)
        out |= grow_square(sharp, int(grow))
    return out


def grow_square(mask: np.ndarray, grow: int) -> np.ndarray:
    """``mask`` grown by ``grow`` pixels, 8-connected (= ``grow`` binary dilations by a 3x3 square).

    Sharp artefacts are a few thousand pixels of a tile: their (2 grow + 1)^2 squares are painted
    directly (~7x faster than a dilation pass over the whole plane); dense masks take the dilation."""
    ys, xs = np.nonzero(mask)
    if grow <= 0 or ys.size == 0:
        return mask.copy()
    if ys.size * (2 * grow + 1) ** 2 > mask.size // 8:
        return ndi.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=grow)
    h, w = mask.shape
    d = np.arange(-grow, grow + 1)
    out = mask.copy()
    # clipping maps an offset beyond the edge onto the edge pixel, itself within ``grow`` of the source
    out[np.clip(ys[:, None, None] + d[None, :, None], 0, h - 1), np.clip(xs[:, None, None] + d[None, None, :], 0, w - 1)] = True
    return out


def artefact_class_pixels(artefacts: Any, plane: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Pixels of one artefact bit plane marked with any of ``classes``, decoded with the mask's ``bits``
    attribute (``{class: bit index}``; the artefact stage's registry when absent; unknown classes ignored)."""
    bits = (getattr(artefacts, "attrs", None) or {}).get("bits")
    if not bits:
        from .artefacts import ARTEFACT_BITS

        bits = ARTEFACT_BITS.as_attrs()
    sel = sum(1 << int(bits[c]) for c in classes if c in bits)
    if not sel:
        return np.zeros(plane.shape, bool)
    return (plane & np.asarray(sel).astype(plane.dtype)) != 0


def saturated_pixels(image: np.ndarray, bad: np.ndarray, saturate: float | None, rim: float) -> np.ndarray:
    """Saturated pixels: unmasked pixels >= ``saturate``, and masked patches touching a pixel >= rim*saturate.

    Only the (few) bright pixels are examined; masked patches are labelled only when one touches them.
    """
    out = np.zeros(image.shape, bool)
    if saturate is None or not np.isfinite(saturate) or saturate <= 0:
        return out
    by, bx = np.nonzero(image >= np.float32(rim * saturate))
    if by.size == 0:
        return out
    out[by, bx] = image[by, bx] >= np.float32(saturate)
    h, w = image.shape
    # masked pixels next to a bright pixel, then the whole masked patch they belong to
    ny = np.clip(by[:, None] + np.array([-1, -1, -1, 0, 0, 1, 1, 1]), 0, h - 1).ravel()
    nx = np.clip(bx[:, None] + np.array([-1, 0, 1, -1, 1, -1, 0, 1]), 0, w - 1).ravel()
    touch = bad[ny, nx]
    if not touch.any():
        return out
    lab, nlab = ndi.label(bad, structure=np.ones((3, 3), int))
    lut = np.zeros(nlab + 1, bool)
    lut[lab[ny[touch], nx[touch]]] = True
    lut[0] = False
    out |= lut[lab]
    return out


def _bin(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over k x k blocks (the image cropped to a multiple of k), float32.

    Added up as k² strided planes: 4x faster on 2048² than numpy's reduction over two axes of a
    4-d view (which walks the short block axes innermost)."""
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    v = a[:h, :w].reshape(h // k, k, w // k, k)
    out = np.zeros((h // k, w // k), np.float32)
    for i in range(k):
        for j in range(k):
            out += v[:, i, :, j]
    return out


def source_mask(planes: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], config: BackgroundConfig) -> np.ndarray | None:
    """Pixels of sources and their surroundings, to keep them out of the second sky estimate.

    Per band the image is binned k x k and sky-subtracted on the binned grid (sep, mesh/k); the
    bands are combined into an inverse-variance S/N image (binning ~ a matched filter for a PSF of
    FWHM ~k), thresholded at ``mask_thresh`` and grown by ``mask_grow`` pixels. Binning keeps this
    ~20x cheaper than on the full grid. Without it the sky is biased high by the sources' wings and
    the faint sources below the threshold (~0.1 sigma per pixel on LSST-like coadds), and every
    flux low.
    """
    k = config.mask_bin
    num = den = None
    shape = next(iter(planes.values()))[0].shape
    if min(shape) < 4 * k:
        return None
    for img, bad, w in released_after_each(planes.values(), lambda p: p):
        good = (~bad).astype(np.float32)
        n_good = _bin(good, k)
        s_img = _bin(img * good, k)
        mean = np.where(n_good > 0, s_img / np.maximum(n_good, 1), 0).astype(np.float32)
        bmask = n_good < 0.5 * k * k
        mesh = max(config.mesh // k, 4)
        bk = sep.Background(mean, mask=bmask, bw=mesh, bh=mesh, fw=config.filter_size, fh=config.filter_size)
        sub = mean - bk.back()
        wb = _bin(w, k)  # inverse variance of the block sum / n^2 ... of the mean: sum of w for equal weights
        wb = np.where(bmask, 0, wb).astype(np.float32)
        num = sub * wb if num is None else num + sub * wb
        den = wb if den is None else den + wb
    snr = np.where(den > 0, num / np.sqrt(np.maximum(den, 1e-37)), 0)
    m = snr > config.mask_thresh
    grow = int(np.ceil(config.mask_grow / k))
    if grow:
        m = ndi.maximum_filter(m, size=2 * grow + 1)
    full = np.zeros(shape, bool)
    hb, wb_ = m.shape
    full[: hb * k, : wb_ * k] = np.repeat(np.repeat(m, k, axis=0), k, axis=1)
    return full


class Background(Stage):
    """Subtracts a smooth sky per band; noise from the weight map; flags saturated pixels."""

    name = "background"
    version = "2"
    requires = ("exposure",)
    optional = ("masks/artefacts",)
    provides = {"sky": "background-subtracted images (nJy), inverse variance, bad and saturated pixels per band"}
    transient = ("sky",)
    Config = BackgroundConfig

    def run(self, inputs: Mapping[str, Any], config: BackgroundConfig) -> dict[str, Any]:
        tile = inputs["exposure"]
        if getattr(tile, "consumed_by", None):
            raise ValueError(f"tile {tile.tile_id!r}: its pixel planes were already reused in place by the "
                             f"{tile.consumed_by!r} stage; load the tile again, or run that stage with reuse_exposure=false")
        in_place = config.reuse_exposure
        artefacts = inputs.get("masks/artefacts")
        images, weights, bads, sats, level, rms, wrms = {}, {}, {}, {}, {}, {}, {}
        planes = {}
        for band in tile.bands:
            img, bad, w = tile.image[band], tile.bad[band], tile.weight[band]
            # saturation is inferred from the input mask alone, as without the artefact stage: the
            # artefact mask covers bright non-stellar pixels (cosmic rays, hot pixels), and a masked
            # patch touching one would otherwise be taken for a saturated core and filled at the
            # saturation level by the detection stage (a strong spurious source)
            sat = saturated_pixels(img, bad, tile.header.get(band, {}).get("SATURATE_NJY"), config.saturation_rim)
            art = artefact_bad(artefacts, band, img.shape, config.artefact_grow, tuple(config.artefact_grow_classes))
            if art is not None:
                if sat.any():  # nor is a pixel the mask calls a cosmic ray or hot pixel (and not saturation)
                    plane = np.asarray(getattr(artefacts, "planes", artefacts)[band])
                    sharp = artefact_class_pixels(artefacts, plane, ("cosmic_ray", "hot_pixel"))
                    sat = sat & ~(sharp & ~artefact_class_pixels(artefacts, plane, ("saturation",)))
                if in_place:
                    np.logical_or(bad, art, out=bad)
                    np.putmask(w, art, np.float32(0))
                else:
                    bad = bad | art
                    w = np.where(art, np.float32(0), w)
            planes[band] = (img, bad, w, sat)
            # file-backed planes (pipeline.scratch): only the band in hand stays resident
            release(img, bad, w, getattr(artefacts, "planes", {}).get(band) if artefacts is not None else None)
        src = source_mask({b: p[:3] for b, p in planes.items()}, config) if config.mask_sources else None
        for band in tile.bands:
            img, bad, w, sat = planes[band]
            mask = bad if src is None else (bad | src)
            bkg = sep.Background(img, mask=mask, bw=config.mesh, bh=config.mesh, fw=config.filter_size, fh=config.filter_size)
            sub = img if in_place and img.dtype == np.float32 and img.flags.c_contiguous and img.flags.writeable \
                else np.array(img, dtype=np.float32, copy=True)
            bkg.subfrom(sub)
            np.putmask(sub, bad, np.float32(0))
            images[band] = sub
            weights[band] = w
            bads[band] = bad
            sats[band] = sat
            level[band] = float(bkg.globalback)
            rms[band] = float(bkg.globalrms)
            good = w[:: 8, :: 8]
            good = good[good > 0]
            wrms[band] = float(1.0 / np.sqrt(np.median(good))) if good.size else float("nan")
            release(img, sub, w, bad)
        if in_place:
            tile.consumed_by = self.name  # its image, weight and bad planes are now the sky's
        return {"sky": Sky(images, weights, bads, sats, level, rms, wrms)}
