"""Deblending: footprints split into children, with explicit parent/child records.

Two passes on the detection coadd:

1. SExtractor's multi-threshold deblending (run by sep in the detection stage, ``deblend_nthresh``
   levels, ``deblend_cont`` contrast) on the matched-filter image. That image is smoothed by the
   PSF twice over (PSF x matched filter), so two sources closer than ~1.2 PSF FWHM show no saddle
   in it and stay merged. Every sep child is kept.
2. A peak pass on a sharper S/N image of the same coadd (smoothed by ``peak_smooth_pix`` only; each
   band's masked pixels filled from that band's neighbours first, ``peak_fill_pix``, so that a column
   masked in one band does not cut a galaxy into two peaks):
   every local maximum inside a footprint is a candidate, compared with the nearest higher surviving
   peak q of its footprint. It becomes a child when, in the band images (Gaussian-weighted local
   means around the points),
   * the light at p in excess of the point mirrored through q (q's light at p, by symmetry) has
     S/N >= ``peak_excess_sigma`` -- a symmetric galaxy (an edge-on disk, a bulge) has no excess;
   * that excess has a colour different from q's (chi^2 p-value <= ``peak_colour_pvalue`` over the
     bands) -- knots and spiral structure of one galaxy share its colours, two galaxies rarely do;
     a peak of the same colour (or with fewer than 3 bands) is kept only behind a valley on the line
     p-q (``peak_dip_nocolour`` sigma) and when most of the light at p (``peak_local_frac_nocolour``)
     is not q's mirrored light, as a faint star on a bright star's wing;
   * it is at least ``min_separation_pix`` from q;
   * its excess S/N is ``peak_excess_sigma`` against *every* higher peak of the footprint (within
     ``peak_excess_all_radius``), not only the nearest: a peak on the wing of a bright galaxy is
     explained by that galaxy's symmetric light even when a fainter object is nearer;
   * against the nearest higher peak of its own sep object (what SExtractor calls one object), where
     there is one: a same-colour peak also needs a valley of ``peak_dip_frac_samesep`` of its own S/N
     (unless that peak is ``peak_wing_ratio`` times higher: a faint star on a bright star's wing), and
     its own light must be ``peak_contrast_samesep`` of the sep object's flux (SExtractor's
     ``DEBLEND_CONT``). The knots of a clumpy (irregular) galaxy carry 1-3 % of its light each,
     share its colours or differ from it only through the approximate PSF matching, and are joined
     by bridges of disk light; they no longer become children.
   Rejections are iterated in vectorised rounds, so a peak is compared with surviving peaks only.

   Candidates are the local maxima of the peak image and (``peak_residual``) the local maxima of the light
   in excess of its mirror image through each bright peak (``mirror_residual_peaks``, the symmetric
   templates of the SDSS deblender turned into a peak finder): a galaxy two or three magnitudes fainter
   than the one it sits on, 0.5-1.5" away, adds a shoulder but no local maximum of its own. Those
   candidates face every test above; a mirror that is only slightly off (bright stars) or not symmetric
   at all (saturated plateaus and bleed trails, excluded) must not make them, hence the residual's
   minimum S/N and fraction of the light at its point, and only a peak that is the highest point of its
   window is a mirror (the mirror of a faint peak on a bright star's wing leaves the star's light). On
   validation seeds 2100-2104 (10 tiles) this raised the close bright pairs (< 1.5", both brighter than
   i = 22.6) found as two objects from 7/50 to 23/50, for 2 more unmatched primaries brighter than i = 24
   (19 against 17; residual S/N 12 or fraction 0.4 gave the same).
   The thresholds were chosen on test-seed tiles (pairs < 1.5" recovered vs unmatched children); the
   three rules above on validation-seed tiles (2001, 2002: unmatched bright children, completeness).

A child alone in its sep object takes that object's barycentre (SExtractor's position) rather than its
peak (``sep_barycentre``): the brightest pixel of a clumpy galaxy is a knot, often > 1" off its centre.

Pixels of a multi-child footprint go to the child whose template ``peak * exp(-d^2 / 2 s^2)``
(``s`` from the size of the sep object holding the peak) is largest at that pixel.

Records follow the Rubin convention: a blend is one parent row (``deblend_nChild`` = number of
children, ``detect_isDeblendedSource`` False, never primary) followed by its children
(``parentObjectId`` = the parent's ``objectId``); an isolated object is one row with
``parentObjectId`` 0 and ``deblend_nChild`` 0. Children and isolated objects are the measured
objects; parents are kept as rows measured on the undeblended footprint.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import Field
from scipy import ndimage as ndi

from pipeline.ids import object_ids
from pipeline.scratch import release, released_after_each
from pipeline.stage import ImageSet, Stage, StageConfig
from pipeline.table import Table

from .detection import coadd_planes, matched_snr
from .psf import FWHM_PER_SIGMA, header_fwhm_pix
from .flags import OBJECT_FLAGS


CANDIDATES_PER_CHILD = 4  # peaks of one footprint tested against each other, per allowed child (max_children)


class DeblendingConfig(StageConfig):
    peaks: bool = Field(True, description="run the peak pass (False = sep's multi-threshold deblending only, as SExtractor)")
    peak_smooth_pix: float = Field(0.5, ge=0, le=10, description="sigma (pixels) of the Gaussian smoothing of the peak image")
    peak_fill_pix: int = Field(2, ge=0, le=16, description=(
        "the peak image fills each band's masked pixels (artefacts, bad pixels) up to this many pixels deep by "
        "interpolating that band's own neighbours (fill_masked_bands); 0 = the plain S/N coadd, whose valley "
        "along a masked column splits one galaxy into two peaks"))
    peak_bands: bool = Field(False, description="also take the local maxima of every band's 3x3 S/N image as candidate peaks")
    peak_min_snr: float = Field(5.0, ge=0, le=1000, description="smallest S/N (peak image) of a candidate peak")
    peak_dip_sigma: float = Field(0.0, ge=0, le=1000, description="required valley depth to the nearest higher peak, in sigma")
    peak_dip_frac: float = Field(0.0, ge=0, le=1, description="required valley depth as a fraction of the peak's own S/N")
    peak_excess_sigma: float = Field(5.0, ge=0, le=1000, description=(
        "required S/N of the light at the peak in excess of the point mirrored through the higher peak"))
    peak_excess_frac: float = Field(0.0, ge=0, le=10, description=(
        "required excess as a fraction of the surface brightness at the higher peak (rejects knots of bright galaxies)"))
    peak_colour_pvalue: float = Field(1e-3, gt=0, le=1, description=(
        "the excess must differ in colour from the higher peak with this significance (chi^2 p-value), "
        "(1 = no colour test)"))
    peak_colour_floor: float = Field(0.0, ge=0, le=1, description=(
        "relative systematic error of each band's value in the colour test (PSF homogenisation is approximate)"))
    peak_dip_nocolour: float = Field(10.0, ge=0, le=1000, description=(
        "a peak of the same colour as its neighbour (or with < 3 bands) needs a valley this deep (sigma) ..."))
    peak_local_frac_nocolour: float = Field(0.8, ge=0, le=1, description=(
        "... and this fraction of its light in excess of the mirrored point (knots of a galaxy have less)"))
    peak_excess_all: bool = Field(True, description=(
        "the excess test against every higher peak of the footprint (within peak_excess_all_radius), not only the nearest"))
    peak_excess_all_radius: float = Field(100.0, gt=0, le=10000, description="pixels: farther higher peaks are not tested")
    peak_wing_ratio: float = Field(10.0, ge=1, le=1e6, description=(
        "no relative-valley test (peak_dip_frac_samesep) for a peak next to one this many times higher"))
    peak_samesep: bool = Field(True, description=(
        "also test every peak against the nearest higher peak of its own sep object (see the next two)"))
    peak_dip_frac_samesep: float = Field(0.6, ge=0, le=1, description=(
        "a same-colour peak in the same sep object as its higher neighbour needs a valley this fraction of its S/N"))
    peak_contrast_samesep: float = Field(0.005, ge=0, le=1, description=(
        "a peak in the same sep object as its higher neighbour needs this fraction of that object's flux "
        "(as SExtractor's DEBLEND_CONT, whose default it takes; 0 = no contrast test)"))
    sep_barycentre: bool = Field(True, description=(
        "a child that is the only one in its sep object takes that object's barycentre as position (as SExtractor)"))
    peak_residual: bool = Field(True, description=(
        "also take as candidate peaks the local maxima of the light in excess of its mirror image through a bright "
        "peak (a fainter object on a bright galaxy's slope shows no local maximum of its own); they face every test"))
    peak_residual_min_snr: float = Field(30.0, ge=0, le=1e6, description="bright peaks (peak image S/N) whose mirror residual is searched")
    peak_residual_radius: int = Field(10, ge=2, le=100, description="pixels around a bright peak searched for residual maxima")
    peak_residual_sigma: float = Field(8.0, ge=0, le=1000, description="smallest S/N of a residual maximum (peak image units)")
    peak_residual_frac: float = Field(0.3, ge=0, le=1, description=(
        "smallest residual as a fraction of the light at its point (a slightly mis-centred mirror of a bright star "
        "leaves residuals of a few per cent of its light; a companion is a good part of the light where it sits)"))
    min_separation_pix: float = Field(2.0, ge=0, le=100, description="peaks closer than this to a higher one are merged into it")
    max_children: int = Field(200, ge=2, le=100000, description="most children per footprint (brightest peaks kept; flag deblend_overflow)")
    rounds: int = Field(3, ge=1, le=10, description="rounds of peak rejection (each compares with the surviving peaks)")


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values; ``group`` must be sorted."""
    n = group.size
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def _group_pairs(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with i after j in the same group; ``group`` must be sorted. Vectorised."""
    n = group.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rank = _rank_in_group(group)
    start_of = np.arange(n) - rank
    total = int(rank.sum())
    i = np.repeat(np.arange(n), rank)
    offs = np.arange(total) - np.repeat(np.cumsum(rank) - rank, rank)
    j = np.repeat(start_of, rank) + offs
    return i, j


def _line_minimum(img: np.ndarray, x0, y0, x1, y1, max_samples: int = 128) -> np.ndarray:
    """Minimum of ``img`` (bilinear) along each straight segment (x0, y0) -> (x1, y1). Vectorised."""
    d = np.hypot(x1 - x0, y1 - y0)
    m = np.clip(np.ceil(d * 2).astype(np.int64) + 1, 2, max_samples)
    total = int(m.sum())
    seg = np.repeat(np.arange(m.size), m)
    k = np.arange(total) - np.repeat(np.cumsum(m) - m, m)
    t = k / np.repeat(m - 1, m)
    xs = x0[seg] + t * (x1 - x0)[seg]
    ys = y0[seg] + t * (y1 - y0)[seg]
    vals = ndi.map_coordinates(img, [ys, xs], order=1, mode="nearest")
    return np.minimum.reduceat(vals, np.r_[0, np.cumsum(m)[:-1]])


def fill_masked_bands(num: np.ndarray, den: np.ndarray, sky: Any, bands: list[str], steps: int,
                      where: np.ndarray | None = None) -> None:
    """Add to the coadd planes (in place) each band's masked pixels, filled from that band's good pixels: each
    step fills the holes that have a good (or already filled) 4-neighbour with their weighted-mean flux at
    their mean weight, so a masked column takes the linear interpolation across it and a hole ``k`` px deep
    is filled in ``k`` steps (``steps`` at most). Saturated pixels are left alone (the coadd already has them
    at the saturation level); only pixels in ``where`` (e.g. the footprints, where peaks are searched) are filled.

    Why: the S/N coadd sum_b w_b I_b / sqrt(sum_b w_b) drops wherever one band is masked (a dead column in the
    brightest band through a red galaxy's core takes a quarter of its S/N along the column), and the two sides
    of such a valley become two peaks, a duplicate child 2-3 px from the real one. Filling with the other
    bands' mean would keep a valley of the missing band's colour, and a smoothing fill (a box mean) raises a
    ridge on a compact source's convex flanks; 4-neighbour interpolation in the band itself does neither."""
    if steps <= 0:
        return
    h, w = num.shape
    nflat, dflat = num.reshape(-1), den.reshape(-1)
    cand = np.flatnonzero(where) if where is not None else None  # pixels that may be filled
    nbrs = ((0, 1), (0, -1), (1, 0), (-1, 0))
    for b in released_after_each(bands, lambda b: (sky.weight[b], sky.image[b])):
        wflat, iflat = sky.weight[b].reshape(-1), sky.image[b].reshape(-1)
        idx = cand[wflat[cand] <= 0] if cand is not None else np.flatnonzero(wflat <= 0)
        sat = sky.saturated.get(b) if hasattr(sky, "saturated") else None
        if sat is not None:
            idx = idx[~np.asarray(sat, bool).reshape(-1)[idx]]
        if idx.size == 0 or idx.size > 0.25 * h * w:  # nothing masked, or mostly masked: no neighbours to trust
            continue
        # the holes' filled weights and weighted fluxes live beside the planes (no copy of a plane): hid maps a
        # pixel to its hole (0: not a hole; zero-filled pages cost nothing until a hole is written)
        hid = np.zeros(h * w, np.int32)
        hid[idx] = np.arange(1, idx.size + 1, dtype=np.int32)
        fw, fwi, done = np.zeros(idx.size, np.float32), np.zeros(idx.size, np.float32), np.zeros(idx.size, bool)
        active = np.arange(idx.size)
        for _ in range(steps):
            hy, hx = np.divmod(idx[active], w)
            sw, swi, ng = (np.zeros(active.size, np.float32) for _ in range(3))
            for dy, dx in nbrs:
                yy, xx = hy + dy, hx + dx
                ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                q = np.where(ok, yy * w + xx, 0)
                k = hid[q] - 1                                        # -1: not a hole
                wv = np.where(k >= 0, np.where(done[k], fw[k], np.float32(0)), wflat[q])
                wiv = np.where(k >= 0, fwi[k], iflat[q] * wflat[q])
                good = ok & (wv > 0)
                sw += np.where(good, wv, np.float32(0))
                swi += np.where(good, wiv, np.float32(0))
                ng += good
            f = ng > 0
            if not f.any():
                break
            j = active[f]
            fw[j] = sw[f] / ng[f]                          # mean weight of the good neighbours
            fwi[j] = swi[f] / ng[f]                        # = mean weight x their weighted-mean flux
            done[j] = True
            nflat[idx[j]] += fwi[j]
            dflat[idx[j]] += fw[j]
            active = active[~f]
            if active.size == 0:
                break


def _subpixel_peak(img: np.ndarray, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic interpolation of a 3x3 maximum; offsets clipped to half a pixel."""
    h, w = img.shape
    xm, xp = np.clip(px - 1, 0, w - 1), np.clip(px + 1, 0, w - 1)
    ym, yp = np.clip(py - 1, 0, h - 1), np.clip(py + 1, 0, h - 1)
    c = img[py, px].astype(np.float64)
    l, r = img[py, xm], img[py, xp]
    d, u = img[ym, px], img[yp, px]
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(2 * c - l - r > 0, 0.5 * (r - l) / (2 * c - l - r), 0.0)
        dy = np.where(2 * c - d - u > 0, 0.5 * (u - d) / (2 * c - d - u), 0.0)
    return px + np.clip(dx, -0.5, 0.5), py + np.clip(dy, -0.5, 0.5)


def label_moments(weights: np.ndarray, labels: np.ndarray, n: int, xs: np.ndarray, ys: np.ndarray):
    """Flux-weighted centroid and second moments per label (1..n) -> x, y, a, b, theta, npix. Vectorised."""
    w = np.maximum(weights, 0).astype(np.float64)
    s0 = np.bincount(labels, w, n + 1)[1:]
    npix = np.bincount(labels, None, n + 1)[1:]
    s0s = np.where(s0 > 0, s0, 1.0)
    mx = np.bincount(labels, w * xs, n + 1)[1:] / s0s
    my = np.bincount(labels, w * ys, n + 1)[1:] / s0s
    dx = xs - mx[labels - 1]
    dy = ys - my[labels - 1]
    cxx = np.bincount(labels, w * dx * dx, n + 1)[1:] / s0s + 1.0 / 12
    cyy = np.bincount(labels, w * dy * dy, n + 1)[1:] / s0s + 1.0 / 12
    cxy = np.bincount(labels, w * dx * dy, n + 1)[1:] / s0s
    tr, det = cxx + cyy, cxx * cyy - cxy * cxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    a = np.sqrt(np.maximum(tr / 2 + disc, 1e-6))
    b = np.sqrt(np.maximum(tr / 2 - disc, 1e-6))
    theta = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
    return mx, my, a, b, theta, npix, s0


def point_matched_snr(num: np.ndarray, den: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    """The matched-filter S/N image of the detection stage, evaluated at integer points only."""
    h, w = num.shape
    r = int(np.ceil(3.5 * sigma))
    g = np.arange(-r, r + 1)
    k = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * sigma * sigma))
    k /= k.sum()
    yy, xx = y[:, None, None] + g[None, :, None], x[:, None, None] + g[None, None, :]
    on = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    idx = np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1)
    fnum = (k * np.where(on, num.ravel()[idx], 0)).sum(axis=(1, 2))
    fden = (k * k * np.where(on, den.ravel()[idx], 0)).sum(axis=(1, 2))
    return np.where(fden > 0, fnum / np.sqrt(np.maximum(fden, 1e-37)), 0.0).astype(np.float32)


def local_maxima(img: np.ndarray, pix: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the pixels of ``pix`` (flat indices) that are >= all 8 neighbours and >= ``floor``."""
    h, w = img.shape
    flat = img.ravel()
    pix = pix[flat[pix] >= floor]
    py, px = np.divmod(pix, w)
    v = flat[pix]
    is_max = np.ones(pix.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_max &= v >= img[np.clip(py + dy, 0, h - 1), np.clip(px + dx, 0, w - 1)]
    return py[is_max], px[is_max]


def box_snr(img: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """S/N of the inverse-variance weighted 3 x 3 box mean of one band (unit noise)."""
    num = ndi.uniform_filter(img * wt, 3, mode="constant")
    den = ndi.uniform_filter(wt, 3, mode="constant")
    out = np.zeros_like(num)
    np.divide(num, np.sqrt(den * (1.0 / 9.0), where=den > 0, out=np.ones_like(den)), out=out, where=den > 0)
    return out


def band_point_values(images: list[np.ndarray], weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
                      sigma: float | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted local mean (and its variance) of every band at integer points (x, y).

    ``sigma``: the Gaussian's width, one for all bands or one per band. Returns (nb, n) arrays;
    points off the image or without data get an infinite variance.
    """
    h, w = images[0].shape
    sig = [float(sigma)] * len(images) if np.isscalar(sigma) else [float(v) for v in sigma]
    vals = np.zeros((len(images), x.size))
    var = np.full((len(images), x.size), np.inf)
    for b, (img, wt) in released_after_each(enumerate(zip(images, weights)), lambda item: item[1]):
        sb = max(sig[b], 0.5)
        r = max(int(np.ceil(2.5 * sb)), 1)
        g = np.arange(-r, r + 1)
        k = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * sb * sb))
        k /= k.sum()
        yy = y[:, None, None] + g[None, :, None]
        xx = x[:, None, None] + g[None, None, :]
        on = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        idx = np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1)
        wv = np.where(on, wt.ravel()[idx], 0.0)
        good = wv > 0
        kk = np.where(good, k, 0.0)
        norm = kk.sum(axis=(1, 2))
        ok = norm > 0.5
        vals[b] = np.where(ok, (kk * img.ravel()[idx]).sum(axis=(1, 2)) / np.where(ok, norm, 1), 0.0)
        var[b] = np.where(ok, (kk * kk / np.where(good, wv, 1)).sum(axis=(1, 2)) / np.where(ok, norm, 1) ** 2, np.inf)
    return vals, var


def excess_and_colour(bands: tuple[list[np.ndarray], list[np.ndarray]], p: tuple, q: tuple, sigma: float | list[float],
                      at_p: tuple | None = None, at_q: tuple | None = None, colour_floor: float = 0.0):
    """Light at p in excess of the point mirrored through q: its S/N, the chi^2 p-value that its colour
    equals the colour at q (small = different colours, i.e. a different object), and its size relative
    to the surface brightness at q and to that at p (all bands summed), the number of bands used, and the
    excess summed over the bands (nJy per pixel, at the common resolution). ``colour_floor``: a relative
    systematic error of every band's value added to the colour test."""
    from scipy.special import chdtrc  # = scipy.stats.chi2.sf, without scipy.stats' 0.45 s import per worker

    images, weights = bands
    px, py = p
    qx, qy = q
    vp, sp = at_p if at_p is not None else band_point_values(images, weights, px, py, sigma)
    vq, sq = at_q if at_q is not None else band_point_values(images, weights, qx, qy, sigma)
    vm, sm = band_point_values(images, weights, 2 * qx - px, 2 * qy - py, sigma)  # p mirrored through q
    e, se = vp - vm, sp + sm            # p's own light: q's light at p removed by symmetry about q
    valid = np.isfinite(se) & np.isfinite(sq)
    iv = np.where(valid, 1.0 / np.where(valid, se, 1.0), 0.0)
    nb = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = (e * iv).sum(axis=0) / np.sqrt(np.maximum(iv.sum(axis=0), 1e-300))
        # colour test: is e = r vq in every band?  (weighted linear fit of r, then chi^2)
        r = (e * vq * iv).sum(axis=0) / np.maximum((vq * vq * iv).sum(axis=0), 1e-300)
        tot = np.where(valid, np.where(valid, se, 0) + r * r * np.where(valid, sq, 0)
                       + (colour_floor * r * vq) ** 2, np.inf)
        c2 = np.where(valid, (e - r * vq) ** 2 / tot, 0.0).sum(axis=0)
    pval = np.where(nb >= 3, chdtrc(np.maximum(nb - 1, 1), c2), 1.0)
    rel = np.where(valid, e, 0).sum(axis=0) / np.maximum(np.where(valid, vq, 0).sum(axis=0), 1e-30)
    local = np.where(valid, e, 0).sum(axis=0) / np.maximum(np.where(valid, vp, 0).sum(axis=0), 1e-30)
    esum = np.where(valid, e, 0).sum(axis=0)
    return snr, pval, rel, nb, local, esum


def _samesep_fail(snr_sharp, sep_seg, px, py, val, ai, aj, gi, bad, bands, peak_vals, config, sep_flux, point_area):
    """The tests of a peak against the nearest higher surviving peak of its own sep (SExtractor) object, where
    there is one (a sep object is what SExtractor calls one object; a peak splitting it must be another):

    * a same-colour peak needs, besides the valley and local fraction of ``alone``, a valley to that peak of
      ``peak_dip_frac_samesep`` of its own S/N (clumps of one irregular galaxy have shallow valleys between them),
      unless that peak is ``peak_wing_ratio`` times higher (a faint star on a bright star's wing: the steep wing,
      not a bridge of light, limits the valley);
    * its own light (a point source of the excess) must be ``peak_contrast_samesep`` of the sep object's flux
      (SExtractor's DEBLEND_CONT: the knots of a clumpy galaxy carry 1-3 % of its light each).

    Returns a bool array over ``gi`` (True = the peak fails)."""
    out = np.zeros(gi.size, bool)
    sp = sep_seg[py[ai], px[ai]]
    k = np.flatnonzero((sp > 0) & (sp == sep_seg[py[aj], px[aj]]))  # pairs already sorted by peak, then distance
    if k.size == 0:
        return out
    k = k[np.r_[True, ai[k][1:] != ai[k][:-1]]]                    # nearest higher peak in the same sep object
    pos = np.full(px.size, -1)
    pos[gi] = np.arange(gi.size)
    k = k[(pos[ai[k]] >= 0) & ~bad[np.maximum(pos[ai[k]], 0)]]
    if k.size == 0:
        return out
    p_, q_ = ai[k], aj[k]
    low = _line_minimum(snr_sharp, px[p_].astype(np.float64), py[p_].astype(np.float64),
                        px[q_].astype(np.float64), py[q_].astype(np.float64))
    dip = val[p_] - low
    exc, pval, rel, nb, local, esum = excess_and_colour(bands[:2], (px[p_], py[p_]), (px[q_], py[q_]), bands[2],
                                                        at_p=(peak_vals[0][:, p_], peak_vals[1][:, p_]),
                                                        at_q=(peak_vals[0][:, q_], peak_vals[1][:, q_]),
                                                        colour_floor=config.peak_colour_floor)
    same = np.where(nb >= 3, pval > config.peak_colour_pvalue, True)
    alone = ((dip >= config.peak_dip_nocolour) & (local >= config.peak_local_frac_nocolour)
             & ((dip >= config.peak_dip_frac_samesep * val[p_]) | (val[q_] >= config.peak_wing_ratio * val[p_])))
    fail = (exc < config.peak_excess_sigma) | (same & ~alone)
    if sep_flux is not None and config.peak_contrast_samesep > 0:
        fail |= esum * point_area < config.peak_contrast_samesep * sep_flux[sp[k] - 1]
    out[pos[p_[fail]]] = True
    return out


def mirror_residual_peaks(img: np.ndarray, foot: np.ndarray, qx: np.ndarray, qy: np.ndarray, radius: int,
                          min_residual: float, min_dist: float, min_frac: float = 0.0,
                          exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the local maxima of ``r(p) = (img(p) - img(2q - p)) / sqrt(2)`` within ``radius`` of each point q
    that is the highest of its window: light a symmetric profile about q does not explain. Kept where p is in
    q's footprint, at least ``min_dist`` from q, ``r >= min_residual`` and ``r >= min_frac * img(p) / sqrt(2)``.
    q is taken at its sub-pixel peak (a mirror through the integer pixel leaves a dipole). ``exclude``: pixels
    (e.g. saturated ones) where no profile is symmetric: no q on them, no residual taken from or mirrored onto
    them. Vectorised over the points q."""
    h, w = img.shape
    if exclude is not None and qx.size:
        keep = ~exclude[qy, qx]
        qx, qy = qx[keep], qy[keep]
    if qx.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cx, cy = _subpixel_peak(img, qx, qy)
    g = np.arange(-radius, radius + 1)
    shape = (qx.size, g.size, g.size)
    yy = np.broadcast_to(qy[:, None, None] + g[None, :, None], shape)
    xx = np.broadcast_to(qx[:, None, None] + g[None, None, :], shape)
    on = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    yc, xc = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
    my = 2 * cy[:, None, None] - yy
    mx = 2 * cx[:, None, None] - xx
    on &= (my >= 0) & (my <= h - 1) & (mx >= 0) & (mx <= w - 1)
    mirrored = ndi.map_coordinates(img, [np.clip(my, 0, h - 1).ravel(), np.clip(mx, 0, w - 1).ravel()], order=1,
                                   mode="nearest").reshape(shape)
    if exclude is not None:
        myi = np.clip(np.rint(my), 0, h - 1).astype(np.int64)
        mxi = np.clip(np.rint(mx), 0, w - 1).astype(np.int64)
        on &= ~exclude[yc, xc] & ~exclude[myi, mxi]
    here = img[yc, xc]
    # q must be the highest point of its window: the mirror of a faint peak on a bright neighbour's wing leaves
    # that neighbour's light as a residual
    on &= (np.where(on, here, -np.inf).max(axis=(1, 2)) <= img[qy, qx])[:, None, None]
    r = (here - mirrored) * np.float32(1 / np.sqrt(2))
    r = np.where(on & (foot[yc, xc] == foot[qy, qx][:, None, None]) & (here - mirrored >= min_frac * here), r, -np.inf)
    is_max = (r >= min_residual) & (r >= ndi.maximum_filter(r, size=(1, 3, 3), mode="constant", cval=-np.inf))
    is_max &= (g[None, :, None] ** 2 + g[None, None, :] ** 2) >= min_dist ** 2
    k, iy, ix = np.nonzero(is_max)
    return qy[k] + g[iy], qx[k] + g[ix]


def find_children(snr_sharp: np.ndarray, foot: np.ndarray, det: Any, sep_seg: np.ndarray, config: DeblendingConfig,
                  bands: tuple[list[np.ndarray], list[np.ndarray], list[float]] | None = None,
                  sep_flux: np.ndarray | None = None, point_area: float = 1.0, saturated: np.ndarray | None = None):
    """Significant peaks of every footprint, plus one forced peak per sep object holding none.

    ``saturated``: pixels saturated in some band (their plateaus and bleed trails are not symmetric: no mirror
    residual peaks on or around them).

    Returns arrays x, y (int pixels), peak value, footprint, forced, and the footprints whose
    peak count hit ``max_children``.
    """
    h, w = snr_sharp.shape
    if config.peaks:
        fp = np.flatnonzero(foot.ravel() > 0)
        py, px = local_maxima(snr_sharp, fp, config.peak_min_snr)
        if config.peak_bands and bands is not None and len(bands[0]) > 1:
            # peaks of each band too: two objects of different colours may show two peaks in some band only
            for img, wt in released_after_each(zip(bands[0], bands[1]), lambda item: item):
                bsnr = box_snr(img, wt)
                by, bx = local_maxima(bsnr, fp, config.peak_min_snr)
                py, px = np.r_[py, by], np.r_[px, bx]
            u = np.unique(py * w + px)
            py, px = np.divmod(u, w)
        if config.peak_residual:
            bright = snr_sharp[py, px] >= config.peak_residual_min_snr
            ry, rx = mirror_residual_peaks(snr_sharp, foot, px[bright], py[bright], config.peak_residual_radius,
                                           config.peak_residual_sigma, max(config.min_separation_pix, 1.0),
                                           config.peak_residual_frac, saturated)
            u = np.unique(np.r_[py * w + px, ry * w + rx])
            py, px = np.divmod(u, w)
    else:
        py = px = np.zeros(0, np.int64)
    val = snr_sharp[py, px].astype(np.float64)
    fid = foot[py, px].astype(np.int64)
    order = np.lexsort((-val, fid))
    px, py, val, fid = px[order], py[order], val[order], fid[order]
    # the peak tests compare every pair of peaks of a footprint: a footprint holding thousands of peaks (a
    # background left under-subtracted joins most of a tile into one) would need O(k^2) memory -- 1.8 GiB at
    # 22 000 peaks. Only the brightest CANDIDATES_PER_CHILD x max_children peaks of a footprint are tested;
    # the footprint is flagged deblend_overflow, as when it has more children than max_children.
    crowded = _rank_in_group(fid) >= CANDIDATES_PER_CHILD * config.max_children
    crowded_fids = np.unique(fid[crowded])
    px, py, val, fid = px[~crowded], py[~crowded], val[~crowded], fid[~crowded]
    alive = np.ones(px.size, bool)
    peak_vals = None
    for _ in range(config.rounds):
        idx = np.flatnonzero(alive)
        i, j = _group_pairs(fid[idx])
        if i.size == 0:
            break
        gi, gj = idx[i], idx[j]
        d = np.hypot(px[gi] - px[gj], py[gi] - py[gj])
        o = np.lexsort((d, gi))  # nearest higher surviving peak of each peak
        ai, aj, ad = gi[o], gj[o], d[o]  # all (peak, higher peak) pairs, grouped by peak
        first = np.r_[True, gi[o][1:] != gi[o][:-1]]
        gi, gj, d = gi[o][first], gj[o][first], d[o][first]
        low = _line_minimum(snr_sharp, px[gi].astype(np.float64), py[gi].astype(np.float64),
                            px[gj].astype(np.float64), py[gj].astype(np.float64))
        dip = val[gi] - low
        bad = (dip < config.peak_dip_sigma) | (dip < config.peak_dip_frac * val[gi]) | (d < config.min_separation_pix)
        if bands is not None:
            t = np.flatnonzero(~bad)
            if peak_vals is None:  # every candidate's band values once; only the mirror points change per round
                peak_vals = band_point_values(bands[0], bands[1], px, py, bands[2])
            exc, pval, rel, nb, local, esum = excess_and_colour(bands[:2], (px[gi[t]], py[gi[t]]), (px[gj[t]], py[gj[t]]), bands[2],
                                                          at_p=(peak_vals[0][:, gi[t]], peak_vals[1][:, gi[t]]),
                                                          at_q=(peak_vals[0][:, gj[t]], peak_vals[1][:, gj[t]]),
                                                          colour_floor=config.peak_colour_floor)
            fail = (exc < config.peak_excess_sigma) | (rel < config.peak_excess_frac)
            same = np.where(nb >= 3, pval > config.peak_colour_pvalue, True)
            # one colour: still a separate object if most of the light at p is not q's (mirrored), behind a
            # valley (a faint star on a bright star's wing; a knot rises less above its galaxy)
            alone = (dip[t] >= config.peak_dip_nocolour) & (local >= config.peak_local_frac_nocolour)
            fail |= same & ~alone
            bad[t[fail]] = True
            if config.peak_samesep and ai.size:
                bad |= _samesep_fail(snr_sharp, sep_seg, px, py, val, ai, aj, gi, bad, bands, peak_vals, config,
                                     sep_flux, point_area)
            if config.peak_excess_all and ai.size > gi.size:
                # the light at p in excess of every higher peak's mirrored light, not only the nearest one's:
                # a peak on the wing of a bright galaxy is explained by that galaxy, whichever peak is nearest
                cand = np.zeros(px.size, bool)
                cand[gi[~bad]] = True
                k = np.flatnonzero(cand[ai] & (ad <= config.peak_excess_all_radius))
                if k.size:
                    exc_all, *_ = excess_and_colour(bands[:2], (px[ai[k]], py[ai[k]]), (px[aj[k]], py[aj[k]]), bands[2],
                                                    at_p=(peak_vals[0][:, ai[k]], peak_vals[1][:, ai[k]]),
                                                    at_q=(peak_vals[0][:, aj[k]], peak_vals[1][:, aj[k]]))
                    weak = np.zeros(px.size, bool)
                    weak[ai[k][exc_all < config.peak_excess_sigma]] = True
                    bad |= weak[gi]
        if not bad.any():
            break
        alive[gi[bad]] = False
    # cap the number of children per footprint (peaks are sorted by S/N within a footprint)
    idx = np.flatnonzero(alive)
    f = fid[idx]
    over = _rank_in_group(f) >= config.max_children
    alive[idx[over]] = False
    overflow_fids = np.union1d(np.unique(f[over]), crowded_fids)
    keep = np.flatnonzero(alive)
    px, py, val, fid = px[keep], py[keep], val[keep], fid[keep]
    # every sep (SExtractor) child without a surviving peak in its pixels keeps its own peak
    nsep = len(det)
    has = np.zeros(nsep + 1, bool)
    has[sep_seg[py, px]] = True
    missing = np.flatnonzero(~has[1:])
    fx = np.asarray(det["xpeak"], np.int64)[missing]
    fy = np.asarray(det["ypeak"], np.int64)[missing]
    ffid = np.asarray(det["footprintId"], np.int64)[missing]
    px, py, fid = np.r_[px, fx], np.r_[py, fy], np.r_[fid, ffid]
    val = snr_sharp[py, px].astype(np.float64)
    forced = np.r_[np.zeros(keep.size, bool), np.ones(missing.size, bool)]
    return px, py, val, fid, forced, overflow_fids


class Deblending(Stage):
    """Split footprints into children (sep multi-threshold + significant peaks); parent/child records."""

    name = "deblending"
    version = "4"
    requires = ("exposure", "sky", "detections", "segmentation")
    provides = {
        "deblended": "objects after deblending: parents (not primary), children and isolated objects, with positions and shapes",
        "deblend_segmentation": "pixel owner map: row number + 1 of the child or isolated object, 0 = sky",
    }
    Config = DeblendingConfig

    def run(self, inputs: Mapping[str, Any], config: DeblendingConfig) -> dict[str, Any]:
        tile, det, sky = inputs["exposure"], inputs["detections"], inputs["sky"]
        foot = inputs["segmentation"].planes["footprint"]
        sep_seg = inputs["segmentation"].planes["sep"]
        bl0 = [b for b in det.attrs.get("bands", tile.bands) if b in tile.bands]
        num, den = coadd_planes(sky, bl0, {b: tile.header.get(b, {}).get("SATURATE_NJY") for b in bl0})
        nfoot = int(foot.max()) if foot.size else 0
        pnum, pden = num, den  # the peak image's planes: filled copies (num and den serve unfilled below)
        if config.peak_fill_pix > 0:
            pnum, pden = num.copy(), den.copy()
            fill_masked_bands(pnum, pden, sky, bl0, config.peak_fill_pix, where=foot > 0)
        sharp, _ = matched_snr(pnum, pden, config.peak_smooth_pix)
        del pnum, pden
        bl = [b for b in det.attrs.get("bands", tile.bands) if b in tile.bands]
        # per-band smoothing that brings every band to the resolution of the widest PSF (Gaussian
        # approximation), so that one object has the same "colour" at every point of its profile
        psf_sig = np.array([header_fwhm_pix(tile, b) for b in bl]) / FWHM_PER_SIGMA
        smooth = list(np.sqrt(0.7 ** 2 + psf_sig.max() ** 2 - psf_sig ** 2))
        bands = ([sky.image[b] for b in bl], [sky.weight[b] for b in bl], smooth)
        sep_flux = None
        if config.peak_samesep and config.peak_contrast_samesep > 0 and len(det):
            # flux of every sep object, summed over the bands (the units of the peaks' excess light)
            on = np.flatnonzero(sep_seg.ravel() > 0)
            lab = sep_seg.ravel()[on] - 1
            sep_flux = np.zeros(len(det))
            for img in bands[0]:
                sep_flux += np.bincount(lab, img.ravel()[on], len(det))
                release(img)
        # a point source's Gaussian-weighted local mean (resolution of the widest PSF + 0.7 px) is flux / area
        point_area = float(2 * np.pi * (psf_sig.max() ** 2 + 0.7 ** 2))
        saturated = None
        if config.peak_residual and hasattr(sky, "saturated"):
            planes = [np.asarray(v, bool) for v in sky.saturated.values() if v is not None and np.any(v)]
            if planes:
                saturated = ndi.binary_dilation(np.logical_or.reduce(planes), iterations=2)
        px, py, pval, pfid, pforced, overflow_fids = find_children(sharp, foot, det, sep_seg, config, bands,
                                                                   sep_flux, point_area, saturated)
        npk = np.bincount(pfid, minlength=nfoot + 1)
        sep_fid = np.asarray(det["footprintId"], np.int64)
        blended_f = npk >= 2  # every sep object holds a peak, so a footprint of 2+ sep objects is blended
        # footprints with a single child are isolated objects: take sep's object (barycentre, moments)
        single = ~blended_f[sep_fid]
        # children: the peaks of blended footprints
        cmask = blended_f[pfid]
        cx, cy, cval, cfid = px[cmask], py[cmask], pval[cmask], pfid[cmask]
        csep = sep_seg[cy, cx].astype(np.int64) - 1  # sep object holding the peak (-1: none)
        in_sep = csep >= 0
        csep = np.where(in_sep, csep, 0)
        sx, sy = _subpixel_peak(sharp, cx, cy)
        if config.sep_barycentre:
            # a child alone in its sep object is that object: SExtractor's barycentre, not the brightest pixel (the
            # peak of a clumpy galaxy is a knot, off its centre); peaks that split a sep object keep their peaks
            per_sep = np.bincount(csep[in_sep], minlength=len(det))
            alone = in_sep & (per_sep[csep] == 1)
            sx = np.where(alone, np.asarray(det["x"], np.float64)[csep], sx)
            sy = np.where(alone, np.asarray(det["y"], np.float64)[csep], sy)

        # ---- rows: for each footprint, isolated object, or parent followed by its children
        iso_rows = np.flatnonzero(single)
        bl_fids = np.flatnonzero(blended_f)
        bl_fids = bl_fids[bl_fids > 0]
        n_iso, n_par, n_ch = iso_rows.size, bl_fids.size, cx.size
        kind = np.r_[np.zeros(n_iso, np.int8), np.ones(n_par, np.int8), np.full(n_ch, 2, np.int8)]
        fid_row = np.r_[sep_fid[iso_rows], bl_fids, cfid]
        # order rows by footprint, parent before children, children by decreasing peak
        sortval = np.r_[np.zeros(n_iso), np.full(n_par, -np.inf), -cval]
        order = np.lexsort((sortval, kind == 2, fid_row))
        n = order.size
        row_of = np.empty(n, np.int64)
        row_of[order] = np.arange(n)
        ids = object_ids(tile.tile_id, n)

        # ---- child segmentation of blended footprints: largest template wins
        h, w = foot.shape
        fo = foot.ravel()
        fp = np.flatnonzero(fo)          # footprint pixels
        ffp = fo[fp]
        iso_of_foot = np.zeros(nfoot + 1, np.int64)
        iso_of_foot[sep_fid[iso_rows]] = row_of[np.arange(n_iso)] + 1
        owner_flat = np.zeros(h * w, np.int32)
        owner_flat[fp] = iso_of_foot[ffp]   # isolated objects own their whole footprint
        inb = blended_f[ffp]
        pix = fp[inb]                        # pixels of blended footprints
        pfo = ffp[inb]
        if pix.size and n_ch:
            # pixels x children of the same footprint
            ch_order = np.argsort(cfid, kind="stable")
            cf_sorted = cfid[ch_order]
            start = np.searchsorted(cf_sorted, pfo, "left")
            cnt = np.searchsorted(cf_sorted, pfo, "right") - start
            rep = np.repeat(np.arange(pix.size), cnt)
            k = ch_order[np.repeat(start, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))]
            yy, xx = np.divmod(pix[rep], w)
            a_sep = np.asarray(det["a"], np.float64)[csep[k]]
            b_sep = np.asarray(det["b"], np.float64)[csep[k]]
            s2 = np.maximum(a_sep * b_sep, 1.0)
            score = np.log(np.maximum(cval[k], 1e-3)) - ((xx - sx[k]) ** 2 + (yy - sy[k]) ** 2) / (2 * s2)
            starts = np.r_[0, np.cumsum(cnt)[:-1]]       # pairs are grouped by pixel: best per group
            best = np.maximum.reduceat(score, starts)
            hit = np.flatnonzero(score >= np.repeat(best, cnt))
            first = hit[np.r_[True, rep[hit][1:] != rep[hit][:-1]]]
            owner_flat[pix[rep[first]]] = row_of[n_iso + n_par + k[first]] + 1
        owner = owner_flat.reshape(foot.shape)

        # ---- positions and shapes
        x = np.zeros(n)
        y = np.zeros(n)
        a = np.zeros(n, np.float32)
        b = np.zeros(n, np.float32)
        th = np.zeros(n, np.float32)
        npix = np.zeros(n, np.int32)
        peak = np.zeros(n, np.float32)
        flags = np.zeros(n, np.uint32)
        det_flags = np.asarray(det["detect_flags"], np.uint32)
        r_iso = row_of[np.arange(n_iso)]
        x[r_iso], y[r_iso] = det["x"][iso_rows], det["y"][iso_rows]
        a[r_iso], b[r_iso], th[r_iso] = det["a"][iso_rows], det["b"][iso_rows], det["theta"][iso_rows]
        npix[r_iso] = det["npix"][iso_rows]
        peak[r_iso] = det["detect_peakSnr"][iso_rows]
        flags[r_iso] = det_flags[iso_rows]
        yy, xx = np.divmod(pix, w)
        sv = sharp.ravel()[pix]  # moment weights: the peak image (children's shapes are refined in photometry)
        mx, my, ma, mb, mth, mnp, _ = label_moments(sv, owner_flat[pix], n, xx.astype(np.float64), yy.astype(np.float64))
        r_ch = row_of[n_iso + n_par + np.arange(n_ch)]
        x[r_ch], y[r_ch] = sx, sy
        a[r_ch], b[r_ch], th[r_ch], npix[r_ch] = ma[r_ch], mb[r_ch], mth[r_ch], mnp[r_ch]
        peak[r_ch] = point_matched_snr(num, den, cx, cy, float(det.attrs.get("filter_fwhm_pix") or 4.0) / FWHM_PER_SIGMA)
        flags[r_ch] = det_flags[csep] | OBJECT_FLAGS["deblended_child"] | OBJECT_FLAGS["blended"]
        # parents: moments of the whole footprint
        r_par = row_of[n_iso + np.arange(n_par)]
        if n_par:
            flab = np.searchsorted(bl_fids, pfo) + 1
            pmx, pmy, pa, pb, pth, pnp, _ = label_moments(sv, flab, n_par, xx.astype(np.float64), yy.astype(np.float64))
            x[r_par], y[r_par], a[r_par], b[r_par], th[r_par], npix[r_par] = pmx, pmy, pa, pb, pth, pnp
            fl_f = np.zeros(nfoot + 1, np.uint32)
            np.bitwise_or.at(fl_f, sep_fid, det_flags)
            flags[r_par] = fl_f[bl_fids] | OBJECT_FLAGS["blended"]
            pk = np.zeros(nfoot + 1, np.float32)
            np.maximum.at(pk, sep_fid, np.asarray(det["detect_peakSnr"], np.float32))
            peak[r_par] = pk[bl_fids]
        if overflow_fids.size:
            flags[np.isin(fid_row[order], overflow_fids)] |= OBJECT_FLAGS["deblend_overflow"]
        parent_row = np.full(n, -1, np.int64)
        par_of_foot = np.full(nfoot + 1, -1, np.int64)
        par_of_foot[bl_fids] = r_par
        parent_row[r_ch] = par_of_foot[cfid]
        parent_id = np.where(parent_row >= 0, ids[np.maximum(parent_row, 0)], 0).astype(np.int64)
        nchild = np.zeros(n, np.int32)
        if n_par:
            nchild[r_par] = np.bincount(cfid, minlength=nfoot + 1)[bl_fids]
        fid_sorted = fid_row[order]
        is_parent = np.zeros(n, bool)
        is_parent[r_par] = True

        t = Table()
        t.add("objectId", ids, "", "unique object id in the release", "meta.id;meta.main")
        t.add("parentObjectId", parent_id, "", "objectId of the parent blend (0 for isolated objects and parents)", "meta.id.parent")
        t.add("deblend_nChild", nchild, "", "number of children of this parent (0 for isolated objects and children)")
        t.add("footprintId", fid_sorted.astype(np.int32), "", "footprint number on this tile (segmentation product)")
        t.add("x", x, "pix", "x centroid, 0-based pixel of the tile", "pos.cartesian.x")
        t.add("y", y, "pix", "y centroid, 0-based pixel of the tile", "pos.cartesian.y")
        t.add("a", a, "pix", "semi-major axis (second moments of the detection image)")
        t.add("b", b, "pix", "semi-minor axis (second moments of the detection image)")
        t.add("theta", th, "rad", "position angle from +x towards +y")
        t.add("npix", npix, "pix", "pixels of the object's footprint (children: their share)")
        t.add("detect_peakSnr", peak, "", "peak of the matched-filter S/N image")
        t.add("detect_isDeblendedSource", ~is_parent, "", "a measured object: isolated or a child (not a blend parent)")
        t.add("detect_flags", flags, "", "detection and deblending flags (stages.flags.OBJECT_FLAGS)", "meta.code")
        t.attrs.update({"n_isolated": int(n_iso), "n_parents": int(n_par), "n_children": int(n_ch),
                        "flag_bits": OBJECT_FLAGS.as_attrs(), "bands": list(det.attrs.get("bands", tile.bands)),
                        "filter_fwhm_pix": det.attrs.get("filter_fwhm_pix")})
        return {"deblended": t,
                "deblend_segmentation": ImageSet({"owner": owner}, {"value": "row of deblended + 1, 0 = sky"})}
