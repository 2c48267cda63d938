"""Artefact segmentation: a lean ONNX U-Net that labels instrumental and environmental contaminants.

Per band it writes one uint16 bit plane (``masks/artefacts``), a pixel may carry several bits:

=====================  ===  ==========================================================
class                  bit  meaning
=====================  ===  ==========================================================
cosmic_ray             0    charged-particle hit or track (sharp, not PSF-convolved)
satellite_trail        1    satellite / airplane trail (straight, PSF-wide)
hot_column             2    hot column or line (partial ones too)
dead_column            3    dead (low-response) column or line
hot_pixel              4    isolated hot pixel
saturation             5    saturated core or bleed trail
diffraction_spike      6    diffraction spike of a bright star
=====================  ===  ==========================================================

The model (``stages/models/artefacts``) takes a band image with its inverse-variance weight,
normalised as its card says (arcsinh of the per-pixel S/N, log of the weight relative to the
band's median, a bad-pixel plane), and returns per-class probabilities; the card's per-class
thresholds (chosen on a validation set) make the bits; small unmasked islands that the mask encloses
(where two artefacts cross, neither class may pass its threshold) take the bits of their rim, gaps in
hot and dead lines are bridged, and unmasked pixels sharper than the PSF allows (what the network
missed of cosmic rays and hot pixels) get the cosmic-ray bit. Any tile size is processed in
overlapping patches whose borders (wider than the network's receptive field) are discarded, so
the mask does not depend on the patch size: no seams.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pydantic import Field

from pipeline.bits import Bit, BitRegistry
from pipeline.stage import ImageSet, Stage, StageConfig

from .psf import header_fwhm_pix

ARTEFACT_BITS = BitRegistry("artefacts", [
    Bit("cosmic_ray", 0, "cosmic-ray hit or track: sharp, unconvolved charge deposit"),
    Bit("satellite_trail", 1, "satellite or airplane trail: straight, PSF-wide line across the tile"),
    Bit("hot_column", 2, "hot column or line (also partial): raised level along a readout column/row"),
    Bit("dead_column", 3, "dead column or line (also partial): pixels with little or no response"),
    Bit("hot_pixel", 4, "isolated hot pixel"),
    Bit("saturation", 5, "saturated star core or its bleed trail along the readout direction (columns)"),
    Bit("diffraction_spike", 6, "diffraction spike of a bright star"),
], dtype=np.uint16)

ARTEFACT_CLASSES: tuple[str, ...] = tuple(ARTEFACT_BITS.bits)
MODEL_DIR = Path(__file__).parent / "models" / "artefacts"
STRIDE_DEFAULT = 16


# ------------------------------------------------------------------ normalisation (the card's recipe)
def _good_pixels(img: np.ndarray, w: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
    """Pixels with data: finite image, finite positive weight, not in the input mask (in-place passes,
    no temporaries the size of the plane beyond the result)."""
    good = np.greater(w, 0)                # NaN weights compare False
    good &= np.less(w, np.inf)
    good &= np.isfinite(img)
    if bad is not None:
        np.greater(good, np.asarray(bad, bool), out=good)  # good and not bad
    return good


def weight_median(image: np.ndarray, weight: np.ndarray, bad: np.ndarray | None) -> float | None:
    """The median good weight of a band (channel 1's reference), from a regular subsample of at
    most ~250k good pixels; None when no pixel is good."""
    w = np.asarray(weight, np.float32)
    wg = w[_good_pixels(np.asarray(image, np.float32), w, bad)]
    if not wg.size:
        return None
    return float(np.median(wg[:: max(1, wg.size // 250_000)]))


def normalise(image: np.ndarray, weight: np.ndarray, bad: np.ndarray | None, norm: Mapping[str, Any],
              median_weight: float | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """The network input of one band, ``(3, H, W)`` float32, as the model card's ``normalisation`` says.

    Channel 0: ``asinh(image * sqrt(weight) / asinh_scale)`` (per-pixel S/N, stretched);
    channel 1: ``log(weight / median(weight > 0))`` clipped to ``logw_clip`` (0 where bad; the median
    of a regular subsample of at most ~250k good pixels);
    channel 2: 1 where the pixel is bad (no data: zero weight, NaN, input mask), else 0.
    Unit-free: the same for nJy or image units, for any depth. Every channel is per pixel once the
    median is known, so a window of a band with the band's ``median_weight`` (:func:`weight_median`)
    is exactly that window of the whole band's input (how the stage runs: no whole-band copy).
    Written into ``out`` when given (a ``(3, H, W)`` float32 array or view), in place, one ufunc pass
    at a time: the formula of every good pixel is the plain one, to the bit.
    """
    if norm.get("recipe", "snr_asinh_logw_bad") != "snr_asinh_logw_bad":
        raise ValueError(f"unknown normalisation recipe {norm.get('recipe')!r}")
    img = np.asarray(image, np.float32)
    w = np.asarray(weight, np.float32)
    if out is None:
        out = np.empty((3,) + img.shape, np.float32)
    good = _good_pixels(img, w, bad)
    badm = ~good
    np.copyto(out[2], badm)
    c0, c1 = out[0], out[1]
    if not good.any():
        c0.fill(0.0)
        c1.fill(0.0)
        return out
    med = median_weight
    if med is None:
        wg = w[good]
        med = float(np.median(wg[:: max(1, wg.size // 250_000)]))  # a regular subsample is plenty
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # bad pixels: overwritten below
        np.sqrt(w, out=c1)
        np.multiply(img, c1, out=c1)
        np.divide(c1, np.float32(norm.get("asinh_scale", 1.0)), out=c1)
        np.arcsinh(c1, out=c0)
        np.divide(w, np.float32(med), out=c1)
        np.log(c1, out=c1)
    lo, hi = norm.get("logw_clip", (-5.0, 3.0))
    np.clip(c1, np.float32(lo), np.float32(hi), out=c1)
    np.copyto(c0, np.float32(0), where=badm)
    np.copyto(c1, np.float32(0), where=badm)
    return out


class BandInput:
    """The normalised input of one band, made window by window (:func:`predict_probabilities`):
    the whole ``(3, H, W)`` float32 input and its temporaries (~5x one image plane) are never held."""

    def __init__(self, image: np.ndarray, weight: np.ndarray, bad: np.ndarray | None, norm: Mapping[str, Any]):
        self.image, self.weight, self.bad, self.norm = image, weight, bad, norm
        self.median_weight = weight_median(image, weight, bad)
        self.shape = (3,) + tuple(image.shape)

    def window(self, ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
        """Rows ``ya:yb``, columns ``xa:xb`` of the input, zero beyond the image (the stride padding)."""
        h, w = self.shape[1:]
        y1, x1 = min(yb, h), min(xb, w)
        inside = (y1, x1) == (yb, xb)
        out = (np.empty if inside else np.zeros)((3, yb - ya, xb - xa), np.float32)
        if y1 > ya and x1 > xa:
            sl = (slice(ya, y1), slice(xa, x1))
            normalise(self.image[sl], self.weight[sl], None if self.bad is None else self.bad[sl], self.norm,
                      median_weight=self.median_weight, out=out[:, :y1 - ya, :x1 - xa])
        return out


# ------------------------------------------------------------------ patch-wise inference, seamless
def windows(h: int, w: int, *, core: int, margin: int, stride: int = STRIDE_DEFAULT):
    """Patches of a ``h`` x ``w`` image (already padded to the stride): yields
    ``((ya, yb, xa, xb), (y0, y1, x0, x1))``, the window to run and the core of it to keep.

    Cores of ``core`` px (a multiple of ``stride``) tile the image; each window adds ``margin`` px
    (a multiple of ``stride``) on every side, clipped at the image. A side that fits in one window
    (``<= core + 2 margin``) is not cut."""
    if core % stride or margin % stride:
        raise ValueError(f"core ({core}) and margin ({margin}) must be multiples of the stride {stride}")
    cy = h if h <= core + 2 * margin else core
    cx = w if w <= core + 2 * margin else core
    for y0 in range(0, h, cy):
        for x0 in range(0, w, cx):
            y1, x1 = min(y0 + cy, h), min(x0 + cx, w)
            yield ((max(y0 - margin, 0), min(y1 + margin, h), max(x0 - margin, 0), min(x1 + margin, w)),
                   (y0, y1, x0, x1))


def _padded(x: np.ndarray, stride: int) -> np.ndarray:
    _, h, w = x.shape
    hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
    if (hp, wp) == (h, w):
        return np.ascontiguousarray(x, np.float32)
    xp = np.zeros((x.shape[0], hp, wp), np.float32)
    xp[:, :h, :w] = x
    return xp


def predict_probabilities(fn: Any, x: "np.ndarray | BandInput", *, core: int = 2048, margin: int = 112, stride: int = STRIDE_DEFAULT,
                          sink: Any = None) -> np.ndarray | None:
    """Per-class probabilities ``(C, H, W)`` of ``fn`` (a callable ``(1, 3, h, w) -> (1, C, h, w)``) on
    ``x``, a ``(3, H, W)`` input or a :class:`BandInput` that makes each window's input when it runs.

    The input is zero-padded (bottom, right) to a multiple of ``stride`` (the network's total
    downsampling) and run in the overlapping windows of :func:`windows`; only each window's core
    is kept. With ``margin`` at least the network's dependency radius every kept pixel sees exactly
    what it sees in a whole-image pass, so the result does not depend on ``core``: no seams.
    With ``sink(y0, y1, x0, x1, probs)`` the cores are handed over one by one instead (no full array).
    """
    _, h, w = x.shape
    lazy = isinstance(x, BandInput)
    xp = None if lazy else _padded(x, stride)
    hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
    probs = None
    for (ya, yb, xa, xb), (y0, y1, x0, x1) in windows(hp, wp, core=core, margin=margin, stride=stride):
        y1, x1 = min(y1, h), min(x1, w)
        if y1 <= y0 or x1 <= x0:
            continue
        xin = x.window(ya, yb, xa, xb) if lazy else xp[:, ya:yb, xa:xb]
        res = np.asarray(fn(xin[None]))[0]
        del xin
        part = res[:, y0 - ya:y1 - ya, x0 - xa:x1 - xa]
        if sink is not None:
            sink(y0, y1, x0, x1, part)
            continue
        if probs is None:
            probs = np.empty((res.shape[0], h, w), np.float32)
        probs[:, y0:y1, x0:x1] = part
    return probs


# ------------------------------------------------------------------ mask post-processing
def fill_enclosed_holes(plane: np.ndarray, max_px: int) -> int:
    """Give each unmasked island of at most ``max_px`` pixels that the mask encloses the bits of its rim.

    Where two artefacts cross (a hot column through a satellite trail) each class's probability can
    stay below its threshold on the crossing pixels, leaving a few bright unmasked pixels inside
    the mask that detection takes for a star. An island counts as enclosed when it is an 8-connected
    component of the unmasked pixels that touches no tile edge. Works in place; returns the number
    of islands filled."""
    from scipy import ndimage as ndi

    if not plane.flags.c_contiguous:
        raise ValueError("fill_enclosed_holes works in place on a C-contiguous plane")
    if max_px <= 0 or not plane.any():
        return 0
    lab, n = ndi.label(plane == 0, structure=np.ones((3, 3), bool))
    size = np.bincount(lab.ravel(), minlength=n + 1)
    small = (size <= max_px)
    small[0] = False
    small[np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))] = False  # enclosed only
    if not small.any():
        return 0
    flat, lab_flat = plane.ravel(), lab.ravel()
    idx = np.flatnonzero(small[lab_flat])
    idx = idx[np.argsort(lab_flat[idx], kind="stable")]
    w = plane.shape[1]
    # the OR of each hole pixel's 8 neighbours (holes never touch an edge, so none wraps), then per hole
    bits = np.zeros(idx.size, plane.dtype)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                bits |= flat[idx + dy * w + dx]
    labels = lab_flat[idx]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    flat[idx] = np.repeat(np.bitwise_or.reduceat(bits, starts), np.diff(np.r_[starts, idx.size]))
    return int(starts.size)


_AXES = ((0, 1), (1, 0), (1, 1), (1, -1))   # neighbour pairs (+d, -d) along rows, columns and diagonals


def sharp_pixels(image: np.ndarray, weight: np.ndarray, usable: np.ndarray, fwhm_pix: float,
                 snr_min: float = 8.0, margin: float = 0.5, block: int = 256) -> np.ndarray:
    """Pixels sharper than the PSF allows: above ``snr_min`` sigma, and along some axis ``snr_min`` sigma
    above the mean of their two neighbours (both usable), which hold less than ``margin`` times what a Gaussian
    of the band's FWHM puts at that distance from its peak.

    Light that came through the optics is spread by the PSF, and a seeing-limited PSF (a Moffat
    profile) falls more slowly near its core than a Gaussian of the same FWHM: a star's or a
    galaxy's neighbours hold more. Tests pin stars of FWHM 2-5 px at S/N 5000. A cosmic ray,
    a hot pixel or a charge track holds nearly nothing there (a track fails the test across its
    direction). A classical backstop for what the network misses; on clean mock tiles it finds no
    pixel at all. ``usable``: pixels that may serve as neighbours and be tested (good, not already
    masked). Works in row blocks (no full-plane temporaries)."""
    h, w = image.shape
    out = np.zeros((h, w), bool)
    if snr_min <= 0 or h < 3 or w < 3:
        return out
    step = max(1, (h * w) // 250_000)
    sub_s = (image.ravel()[::step] * np.sqrt(np.maximum(weight.ravel()[::step], 0)))[usable.ravel()[::step]]
    pedestal = np.float32(np.median(sub_s)) if sub_s.size else np.float32(0)
    for y0 in range(1, h - 1, block):
        y1 = min(y0 + block, h - 1)
        ya, yb = y0 - 1, y1 + 1
        ok = usable[ya:yb]
        snr = np.where(ok, image[ya:yb] * np.sqrt(np.maximum(weight[ya:yb], 0)) - pedestal, np.float32(0))
        cand = (snr[1:-1, 1:-1] > snr_min) & ok[1:-1, 1:-1]
        iy, ix = np.nonzero(cand)
        if not iy.size:
            continue
        iy, ix = iy + 1, ix + 1                         # in the block's padded frame
        c = snr[iy, ix]
        hit = np.zeros(iy.size, bool)
        for dy, dx in _AXES:
            # both neighbours must be usable: on a steep wing the outer one alone is far below the pixel
            both = ok[iy + dy, ix + dx] & ok[iy - dy, ix - dx]
            pm = np.where(both, 0.5 * (snr[iy + dy, ix + dx] + snr[iy - dy, ix - dx]), np.inf)
            frac = margin * np.exp(-4 * np.log(2) * (dy * dy + dx * dx) / max(fwhm_pix, 1e-3) ** 2)
            hit |= (c - pm > snr_min) & (pm < frac * c)
        out[iy[hit] + ya, ix[hit]] = True
    return out


LINE_CLASSES: tuple[str, ...] = ("hot_column", "dead_column")


def close_line_gaps(plane: np.ndarray, max_gap: int, min_line: int = 32,
                    classes: tuple[str, ...] = LINE_CLASSES) -> int:
    """Bridge gaps of at most ``max_gap`` pixels in hot and dead lines, along their row or column.

    A hot line at S/N 30 that the network marks with a few single pixels missing leaves those
    pixels to detection, which finds a row of faint "sources" along it. Only rows or columns holding
    at least ``min_line`` pixels of ``classes`` are lines; a gap between two of their pixels in that
    row or column gets the bits of both ends. Works in place; returns the number of pixels set."""
    if max_gap <= 0 or not plane.any():
        return 0
    bits = plane.dtype.type(ARTEFACT_BITS.value(*classes))
    line = (plane & bits) != 0
    added = 0
    for axis in (0, 1):                                   # axis 0: along columns, 1: along rows
        counts = line.sum(axis=axis)
        for k in np.flatnonzero(counts >= min_line):
            vec = plane[:, k] if axis == 0 else plane[k, :]
            on = np.flatnonzero((vec & bits) != 0)
            gap = np.diff(on) - 1
            for j in np.flatnonzero((gap > 0) & (gap <= max_gap)):
                a, b = on[j], on[j + 1]
                fill = (vec[a] | vec[b]) & bits
                added += int(np.count_nonzero((vec[a + 1:b] & fill) != fill))
                vec[a + 1:b] |= fill
    return added


# ------------------------------------------------------------------ the stage
class ArtefactsConfig(StageConfig):
    model_dir: str | None = Field(None, description="model directory (model.onnx + card.json); None = the shipped model")
    patch: int = Field(1024, ge=64, description="core size (pixels, a multiple of the network stride) of the overlapping "
                                               "patches; the margin comes from the card. Does not change the result, "
                                               "only speed (larger: less overlap) and memory (~0.3 GB per MPix of window)")
    thresholds: dict[str, float] = Field(default_factory=dict, description="per-class probability thresholds overriding "
                                                                           "the card's (chosen on the validation set)")
    probabilities: bool = Field(False, description="also store the per-class probability maps "
                                                  "(masks/artefact_probability, uint8 = round(255 p))")
    fill_holes_px: int = Field(16, ge=0, le=1024, description="unmasked islands of at most this many pixels that "
                                                             "a band's mask encloses get the bits of their rim (a hot "
                                                             "column crossing a trail left bright holes); 0 = off")
    line_gap_px: int = Field(16, ge=0, le=2048, description="gaps of at most this many pixels in a hot or dead line "
                                                           "(a row or column with >= 32 such pixels) are bridged "
                                                           "along it; 0 = off")
    sharp_snr: float = Field(8.0, ge=0, le=1e6, description="unmasked pixels sharper than the PSF allows (sharp_pixels: this "
                                                           "many sigma, and as much above the mean of two opposite "
                                                           "neighbours) get the cosmic_ray bit; 0 = off")
    sharp_margin: float = Field(0.5, gt=0, le=1, description="... whose neighbours hold less than this fraction of "
                                                             "what a Gaussian of the band's PSF FWHM puts there")
    saturation_from_header: bool = Field(True, description="also set the saturation bit wherever the image reaches "
                                                          "the header's SATURATE level (exact, cheap)")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="ONNX Runtime device")
    threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads")


@lru_cache(maxsize=8)
def _card_cached(model_dir: str, stamp: tuple[int, ...]) -> Any:
    from pipeline.modelcard import load_card

    return load_card(model_dir)


def _card(model_dir: str) -> Any:
    """The model card (sha256 checked), read once per process and model version."""
    d = Path(model_dir)
    stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (d / "card.json", d / "model.onnx"))
    return _card_cached(model_dir, stamp)


def _close_mask(mask: np.ndarray, tile: Any, band: str, config: ArtefactsConfig) -> None:
    """What the network leaves open, closed in place: gaps in lines, enclosed holes, sharp pixels."""
    close_line_gaps(mask, config.line_gap_px)
    fill_enclosed_holes(mask, config.fill_holes_px)
    if config.sharp_snr > 0:
        usable = _good_pixels(tile.image[band], tile.weight[band], tile.bad[band])
        usable &= mask == 0
        mask[sharp_pixels(tile.image[band], tile.weight[band], usable, header_fwhm_pix(tile, band),
                          config.sharp_snr, config.sharp_margin)] |= np.uint16(ARTEFACT_BITS["cosmic_ray"])


class Artefacts(Stage):
    """Segments artefacts per band with the ONNX U-Net; writes the uint16 bit mask of each band."""

    name = "artefacts"
    version = "3"
    requires = ("exposure",)
    provides = {
        "masks/artefacts": "per-band uint16 artefact bit plane (attrs: bits = {class: bit index})",
        "masks/artefact_probability": "per-band per-class probability maps '<band>_<class>' (uint8, p*255); "
                                      "empty unless config.probabilities",
    }
    Config = ArtefactsConfig

    def _dir(self, config: ArtefactsConfig) -> Path:
        return Path(config.model_dir) if config.model_dir else MODEL_DIR

    def model_files(self, config: ArtefactsConfig) -> list[Path]:
        d = self._dir(config)
        return [d / "model.onnx", d / "card.json"]

    def run(self, inputs: Mapping[str, Any], config: ArtefactsConfig) -> dict[str, Any]:
        from pipeline.onnx import on_cuda, run, run_into, session, shrinking_run_options
        from pipeline.scratch import plane_bytes, plane_file, release, zeros

        tile = inputs["exposure"]
        mdir = self._dir(config)
        card = _card(str(mdir.resolve()))
        if list(card.classes) != list(ARTEFACT_CLASSES):
            raise ValueError(f"model {mdir} classes {card.classes} differ from the registry {list(ARTEFACT_CLASSES)}")
        sess = session(card.onnx_path(mdir), device=config.device, threads=config.threads)
        in_name = sess.get_inputs()[0].name
        thr = {**card.thresholds, **config.thresholds}
        unknown = set(config.thresholds) - set(ARTEFACT_CLASSES)
        if unknown:
            raise ValueError(f"thresholds for unknown classes {sorted(unknown)}")
        geo = card.model_extra.get("inference", {}) if card.model_extra else {}
        stride, margin = int(geo.get("stride", STRIDE_DEFAULT)), int(geo["margin"])
        core = max(stride, (config.patch // stride) * stride)

        on_host = not on_cuda(sess)
        out_buf: dict[tuple[int, ...], np.ndarray] = {}  # one window's output, reused (each is consumed at once)

        def fn(x: np.ndarray) -> np.ndarray:
            if not on_host:
                return run(sess, {in_name: x})[0]  # through an IO binding on CUDA
            shape = (x.shape[0], len(ARTEFACT_CLASSES)) + tuple(x.shape[2:])
            if shape not in out_buf:
                out_buf.clear()
                out_buf[shape] = np.empty(shape, np.float32)
            return run_into(sess, {in_name: x}, out_buf[shape])

        planes, probs = {}, {}
        # the masks (8 MB a band on 2048²) live in a scratch file like the exposure's planes: a band's
        # pages go back once it is done, rather than all bands' staying under every later stage's peak
        store = plane_file(plane_bytes(tile.shape, np.uint16) * len(tile.bands),
                           f"tile {getattr(tile, 'tile_id', '?')}: artefact masks")
        sat_k = ARTEFACT_CLASSES.index("saturation")
        thr_v = np.array([thr[c] for c in ARTEFACT_CLASSES], np.float32)
        bit_v = [np.uint16(ARTEFACT_BITS[c]) for c in ARTEFACT_CLASSES]
        for band in tile.bands:
            x = BandInput(tile.image[band], tile.weight[band], tile.bad[band], card.normalisation)
            shape = x.shape[1:]
            mask = zeros(store, shape, np.uint16)
            pq = np.zeros((len(ARTEFACT_CLASSES),) + shape, np.uint8) if config.probabilities else None

            def sink(y0: int, y1: int, x0: int, x1: int, p: np.ndarray) -> None:
                m = mask[y0:y1, x0:x1]
                for k in range(len(ARTEFACT_CLASSES)):
                    m[p[k] >= thr_v[k]] |= bit_v[k]
                if pq is not None:
                    pq[:, y0:y1, x0:x1] = np.round(p * 255.0).astype(np.uint8)

            predict_probabilities(fn, x, core=core, margin=margin, stride=stride, sink=sink)
            del x
            tile.release_pages(band)  # file-backed planes: only the band in hand stays resident
            release(mask)
            planes[band] = mask
            if pq is not None:
                for k, cls in enumerate(ARTEFACT_CLASSES):
                    probs[f"{band}_{cls}"] = pq[k]
        # one tiny run that hands the arena's chunks back: the patches' activations (~0.3 GB per MPix of
        # window) would otherwise stay reserved while the later stages run (shrinking on every patch
        # instead costs ~20 % in speed); the mask's post-processing below then runs without them
        sess.run(None, {in_name: np.zeros((1, 3, stride, stride), np.float32)}, shrinking_run_options())
        for band, mask in planes.items():
            _close_mask(mask, tile, band, config)
            sat = tile.header.get(band, {}).get("SATURATE_NJY")
            if config.saturation_from_header and sat:
                sat_hit = (tile.image[band] >= np.float32(sat) * np.float32(1 - 1e-5)) & ~tile.bad[band]
                mask[sat_hit] |= bit_v[sat_k]
                if config.probabilities:
                    probs[f"{band}_saturation"][sat_hit] = 255
            tile.release_pages(band)
            release(mask)
        attrs = {"bits": ARTEFACT_BITS.as_attrs(), "descriptions": ARTEFACT_BITS.describe(),
                 "model": card.name, "model_version": card.version, "model_sha256": card.sha256,
                 "thresholds": {c: float(thr[c]) for c in ARTEFACT_CLASSES}}
        prob_attrs = {"classes": list(ARTEFACT_CLASSES), "scale": 1.0 / 255.0, "requested": bool(config.probabilities),
                      "plane_name": "<band>_<class>"}
        return {"masks/artefacts": ImageSet(planes, attrs), "masks/artefact_probability": ImageSet(probs, prob_attrs)}


def decode_mask(mask: np.ndarray, bits: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Boolean plane per class of a stored mask, using its ``bits`` attribute (default: this registry)."""
    bits = dict(bits or ARTEFACT_BITS.as_attrs())
    return {name: (np.asarray(mask) & np.uint16(1 << int(b))) != 0 for name, b in bits.items()}
