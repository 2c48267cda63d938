"""Forced multi-band photometry of the deblended objects: apertures, Kron, PSF; neighbours subtracted.

Every band is measured at the same positions with the same apertures (Kron ellipse from the
detection coadd), so colours are consistent. All measurements are vectorised over objects on
stamps (one array of cut-outs per size class), never a Python loop per object.

Order of work (per tile):

1. Model shapes: each measured object's intrinsic Gaussian, from Gaussian-windowed second moments
   of the inverse-variance coadd (neighbours' pixels masked), deconvolved from window and PSF; bright
   resolved objects get wings, Gaussians of 4x and 16x that covariance, their shares fitted on the coadd
   (:func:`fit_wing_fractions`), so that their neighbours' models do not take their wing light.
2. Centroids: every measured object's windowed centroid (SExtractor's XWIN, iterated) on the coadd
   with all *other* objects' models subtracted -- a deblended child's peak is pulled towards its
   neighbour; this is not. Objects below ``centroid_min_snr`` (detection peak S/N) keep the detection's
   footprint barycentre: at S/N ~5 the windowed step follows the noise (validation: most faint
   objects that only SExtractor matched were ours, 1.0-1.2" off, just beyond the match radius).
3. PSF: per band a Moffat (one slope for all bands, a FWHM per band) fitted to the tile's bright,
   isolated, compact, unsaturated objects; the header FWHM and ``psf_default_beta`` when there are
   too few (:mod:`stages.psf`, a Gaussian mixture for analytic convolutions and overlaps).
4. Kron radius (SExtractor's definition) on the coadd with the other objects' models subtracted.
5. Per band: every measured object's model (intrinsic Gaussian x band PSF) with amplitudes fitted
   simultaneously (one sparse linear least-squares solve, exact overlaps of the Gaussian mixtures);
   each object's fluxes are measured on ``image - sum of the *other* objects' models``: its own
   light stays data, only the neighbours' light is removed, so the model only has to be good
   enough to remove neighbours. Masked pixels inside an aperture are filled with the object's own
   model (and flagged), so a masked column or a saturated core does not bias the sum; their
   variance is not counted. Parents (blends) are measured on the unsubtracted image.

Fluxes (nJy): ``{b}_apNNFlux`` (circular aperture of radius NN pixels, pixel weights clipped at the
edge: ``clip(r - d + 1/2, 0, 1)``), ``{b}_kronFlux`` (2.5 Kron radii, at least 3.5 a and b, as
SExtractor's MAG_AUTO; divided by the PSF's encircled fraction in that ellipse when
``kron_apcorr``, so a point source gets its total flux), ``{b}_psfFlux`` (PSF-weighted linear fit
of the PSF model, scaled on the tile's stars to the largest aperture's total flux -- Rubin's
aperture correction -- so a small PSF-model error does not bias it), ``{b}_modelFlux`` (the amplitude of
the object's model in the joint fit of step 5: its intrinsic profile, the same in every band, convolved
with the band's PSF; colours free of each band's seeing, as SDSS's model magnitudes, since a PSF fit
or a fixed aperture takes a seeing-dependent share of an extended galaxy's light; its total rests on a
Gaussian profile fitted to noisy moments, so Kron is the total flux to use; a blend parent's is the
sum of its children's; 0 with an infinite error where no model was fitted, e.g. without
``neighbour_models``; scaled by
the PSF flux's aperture correction, residual sky removed, extra variance scaled from the PSF fit's by the
ratio of their weight-map variances). Errors come from the weight
map, plus the empty-aperture term below. The aperture correction to total flux of every circular aperture (for point sources) goes to
the table attrs (``apcorr``), computed with the same pixel weights on the PSF model for the largest
aperture and, for the smaller ones, from the tile's stars relative to it (``empirical_apcorr``: the
PSF model's core is the least certain part of it); the PSF flux's in ``psf_apcorr``, the PSF models
in ``psf``.

Errors beyond the weight map (``empty_apertures``): the weight map holds the pixel noise (sky, read
noise and the sources' own Poisson noise), but not the error of the background subtraction, the light
of undetected sources, nor the residuals of the neighbours' models. Every band's apertures and PSF fit
are also measured at random empty positions (no footprint within the aperture radius + 1 pixel) on the
same neighbour-subtracted image: the half-width holding 68.27 % of those fluxes beyond the weight map's
prediction is added in quadrature to every error (the Kron ellipse's by its area), and their median
per pixel -- the background stage's residual level -- is subtracted from every flux (``residual_sky``).
Both go to the attrs (``empty_apertures``).

``refExtendedness``: 1 when the summed-over-bands ``psfFlux / kronFlux`` is below
``extendedness_cut`` (a point source gives ~1 since both are total fluxes), else 0.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import sep
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import Field, field_validator
from scipy import sparse
from scipy.sparse.linalg import spsolve
from scipy.spatial import cKDTree

from pipeline.rss import release_free_heap
from pipeline.scratch import release, released_after_each
from pipeline.stage import Stage, StageConfig
from pipeline.table import Table

from .detection import coadd_planes
from .flags import OBJECT_FLAGS
from .psf import BETA_GRID, FWHM_PER_SIGMA, PsfModel, band_psfs, fit_moffat_bands, moffat_chi2_grid, moffat_mixture

STAMP_HALVES = (13, 20, 27, 40, 63)   # half sizes of the measurement stamps (by Kron ellipse)
MODEL_HALVES = (8, 13, 27, 63)         # half sizes of the model stamps (by where the model falls below 0.1 sigma)
WING_VARIANCE_SCALES = (4.0, 16.0)     # a profile's wing Gaussians: these many times the core's covariance (2x, 4x its sigma)
BLOCK_PIXELS = 1 << 20                 # stamp pixels per block of the band loop's measurements (4 MiB per float32 plane)
APERTURE_HALF = 13                     # circular apertures and PSF fits use the central 27 x 27 pixels


class PhotometryConfig(StageConfig):
    apertures_pix: list[float] = Field([3.0, 6.0, 9.0, 12.0], min_length=1, description="circular aperture radii (pixels, <= 12)")
    kron_factor: float = Field(2.5, gt=0, le=10, description="Kron aperture = factor x Kron radius (SExtractor PHOT_AUTOPARAMS[0])")
    min_kron_radius: float = Field(3.5, gt=0, le=50, description="smallest Kron aperture, in units of a and b (SExtractor PHOT_AUTOPARAMS[1])")
    kron_rmax: float = Field(6.0, gt=0, le=20, description="ellipse (in units of a, b) over which the Kron radius is computed")
    kron_apcorr: bool = Field(True, description="divide kronFlux by the PSF's encircled fraction in the Kron ellipse")
    neighbour_models: bool = Field(True, description="subtract the neighbours' fitted models before measuring an object")
    psf_beta: float | None = Field(None, gt=1.1, le=20, description=(
        "Moffat slope of the PSF model; None = fit slope and FWHM to the tile's bright isolated point sources per band"))
    psf_default_beta: float = Field(3.0, gt=1.1, le=20, description="slope used when too few stars (FWHM from the header)")
    psf_min_stars: int = Field(5, ge=1, le=1000, description="fewest stars for a PSF fit in a band")
    moment_window: float = Field(1.5, gt=0.3, le=10, description="sigma of the moment window, in units of the PSF sigma")
    centroid_iterations: int = Field(4, ge=0, le=20, description=(
        "iterations of the windowed centroid on the neighbour-subtracted coadd (0 = keep the detection positions)"))
    centroid_min_snr: float = Field(8.0, ge=0, description=(
        "objects whose detection peak S/N is below this keep their detection (footprint barycentre) positions: "
        "at S/N ~5 the windowed centroid follows the noise as often as the object (0 = refine every object)"))
    empty_apertures: int = Field(2000, ge=0, le=100000, description=(
        "random sky positions (no footprint within the largest aperture) whose aperture and PSF fluxes calibrate "
        "the errors: the scatter beyond the weight map's (background-subtraction error, undetected sources, "
        "neighbour-model residuals) is added in quadrature; 0 = weight-map errors only"))
    empirical_apcorr: bool = Field(True, description=(
        "aperture corrections (apcorr) of the smaller apertures from the tile's stars, relative to the largest one's "
        "model correction (else all from the PSF model)"))
    profile_wings: bool = Field(True, description=(
        "give the models of bright resolved objects wings: Gaussians of 4x and 16x the core's covariance, their shares "
        "fitted on the coadd (a single Gaussian lacks an exponential or de Vaucouleurs profile's wing light, which "
        "the neighbours' models then absorb, biasing the bright object's flux faint)"))
    wing_min_snr: float = Field(20.0, gt=0, description="peak S/N from which an object's model gets a fitted wing")
    residual_sky: bool = Field(True, description=(
        "subtract the median empty-aperture flux (per pixel, per band) from every flux: the background stage's residual level"))
    extendedness_cut: float = Field(0.95, gt=0, le=2, description="refExtendedness = 1 when psfFlux/kronFlux is below this")

    @field_validator("apertures_pix")
    @classmethod
    def _radii(cls, v: list[float]) -> list[float]:
        if any(r <= 0 or r > APERTURE_HALF - 1 for r in v):
            raise ValueError(f"aperture radii must lie in (0, {APERTURE_HALF - 1}] pixels")
        if len({int(round(r)) for r in v}) != len(v):
            raise ValueError("aperture radii must differ after rounding (they name the columns apNN)")
        return v


@dataclass
class Stamps:
    """Cut-outs of one size class, centred on the nearest pixel: ``rows`` of the table and offsets.

    Interior stamps are read through a sliding-window view (a strided copy, ~5x faster than fancy
    indexing); the few stamps that cross the image edge through clipped indices, zero outside.
    """

    rows: np.ndarray
    half: int
    ox: np.ndarray        # (n,) x of the stamp's first column (may be < 0 at the edge)
    oy: np.ndarray
    interior: np.ndarray  # (n,) stamp entirely on the image
    inside: np.ndarray    # (n_edge, S, S) pixel of an edge stamp lies on the image
    dx: np.ndarray        # (n, S) x offset of each column from the object centre
    dy: np.ndarray        # (n, S) y offset of each row
    shape: tuple[int, int]  # of the image the stamps are cut from

    @property
    def size(self) -> int:
        return 2 * self.half + 1

    @classmethod
    def make(cls, rows: np.ndarray, x: np.ndarray, y: np.ndarray, half: int, shape: tuple[int, int]) -> "Stamps":
        h, w = shape
        g = np.arange(-half, half + 1)
        cx, cy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        ix, iy = cx[:, None] + g[None, :], cy[:, None] + g[None, :]
        okx, oky = (ix >= 0) & (ix < w), (iy >= 0) & (iy < h)
        interior = okx.all(axis=1) & oky.all(axis=1)
        e = ~interior
        inside = oky[e][:, :, None] & okx[e][:, None, :]
        return cls(rows, half, cx - half, cy - half, interior, inside,
                   (ix - x[:, None]).astype(np.float32), (iy - y[:, None]).astype(np.float32), (h, w))

    def index(self, k: np.ndarray | None = None) -> np.ndarray:
        """(len(k), S, S) flat indices into the image of stamps ``k`` (all: None), clipped onto it.

        Made when needed, not kept: only edge stamps and the scatter of models use them, and a
        kept index of every stamp cost ~50 MB per 2048^2 tile while photometry was at its peak."""
        h, w = self.shape
        oy, ox = (self.oy, self.ox) if k is None else (self.oy[k], self.ox[k])
        g = np.arange(self.size)
        it = np.int32 if h * w < 2**31 else np.int64
        iy = np.clip(oy[:, None] + g[None, :], 0, h - 1).astype(it)
        ix = np.clip(ox[:, None] + g[None, :], 0, w - 1).astype(it)
        return iy[:, :, None] * it(w) + ix[:, None, :]

    def gather(self, img: np.ndarray) -> np.ndarray:
        """(n, S, S) cut-outs of ``img``; zero off the image."""
        S = self.size
        inn = self.interior
        edge = np.flatnonzero(~inn)
        if inn.any():
            # every stamp through the window view at a position clipped onto the image (one fancy-index
            # copy: ~6x faster than assigning the interior ones through a boolean mask), then the few
            # edge stamps overwritten with their zero-padded cut-outs
            h, w = img.shape
            win = sliding_window_view(img, (S, S))
            out = win[np.clip(self.oy, 0, h - S), np.clip(self.ox, 0, w - S)]
        else:
            out = np.empty((self.rows.size, S, S), img.dtype)
        if edge.size:
            out[edge] = np.where(self.inside, img.ravel()[self.index(edge)], np.zeros((), img.dtype))
        return out

    def scatter_add(self, flat: np.ndarray, vals: np.ndarray) -> None:
        """Add ``vals`` (n, S, S) into the flat image (values off the image are dropped)."""
        e = ~self.interior
        if e.any():
            vals = vals.copy()
            vals[e] *= self.inside
        np.add.at(flat, self.index().ravel(), vals.ravel())

    def radius(self) -> np.ndarray:
        return np.sqrt(self.dy[:, :, None] ** 2 + self.dx[:, None, :] ** 2)

    def subset(self, k: np.ndarray) -> "Stamps":
        """The stamps of positions ``k`` (indices into this set)."""
        e = np.cumsum(~self.interior) - 1  # row of each edge stamp in ``inside``
        ek = k[~self.interior[k]]
        return Stamps(self.rows[k], self.half, self.ox[k], self.oy[k], self.interior[k],
                      self.inside[e[ek]], self.dx[k], self.dy[k], self.shape)


def stamp_blocks(sets: list[Stamps], pixels: int = BLOCK_PIXELS) -> Iterator[tuple[int, Stamps, slice]]:
    """(set index, stamps, their rows in the set) in blocks of at most ~``pixels`` stamp pixels.

    The per-band measurement makes ~10 temporaries the size of a set's stamps; a set of large stamps
    (the 127^2 ones of bright galaxies) is ~10 MB per float32 plane, so blocks keep those small.
    Every measurement is per stamp, so blocks give the numbers of whole sets (to float32 rounding:
    numpy's reductions may sum a lone stamp in another order); make run's catalogue is identical."""
    for k, st in enumerate(sets):
        step = max(1, pixels // (st.size * st.size))
        if st.rows.size <= step:
            yield k, st, slice(None)
            continue
        for a in range(0, st.rows.size, step):
            b = min(a + step, st.rows.size)
            yield k, st.subset(np.arange(a, b)), slice(a, b)


def stamps_touching(st: Stamps, yx: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Indices of the stamps of ``st`` that contain at least one of the pixels ``yx`` (few pixels)."""
    if yx[0].size == 0 or st.rows.size == 0:
        return np.zeros(0, np.int64)
    hit = np.zeros(st.rows.size, bool)
    S = st.size
    for y0 in range(0, yx[0].size, 4096):  # blocks of pixels x stamps, bounded memory
        py, px = yx[0][y0:y0 + 4096], yx[1][y0:y0 + 4096]
        hit |= ((py[None, :] >= st.oy[:, None]) & (py[None, :] < st.oy[:, None] + S)
                & (px[None, :] >= st.ox[:, None]) & (px[None, :] < st.ox[:, None] + S)).any(axis=1)
    return np.flatnonzero(hit)


def circular_weights(r_pix: np.ndarray, radius: float) -> np.ndarray:
    """Pixel weights of a circular aperture: 1 inside, 0 outside, linear over the edge pixel."""
    return np.clip(np.float32(radius + 0.5) - r_pix, 0.0, 1.0).astype(np.float32)


def elliptical_weights(st: Stamps, A: np.ndarray, B: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Pixel weights of ellipses with semi-axes A, B (pixels), edge softened over one pixel."""
    c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    dx = st.dx[:, None, :]
    dy = st.dy[:, :, None]
    u = dx * c[:, None, None] + dy * s[:, None, None]
    v = -dx * s[:, None, None] + dy * c[:, None, None]
    rho = np.sqrt((u / A[:, None, None].astype(np.float32)) ** 2 + (v / B[:, None, None].astype(np.float32)) ** 2)
    scale = np.sqrt(A * B).astype(np.float32)[:, None, None]
    return np.clip((np.float32(1) - rho) * scale + np.float32(0.5), 0.0, 1.0)


def profile_components(cov: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(weight, cxx, cyy, cxy) of the intrinsic Gaussians that make each object's profile.

    ``cov`` holds cxx, cyy, cxy and, optionally, the wing fractions f_k: the profile is (1 - sum f_k) of the
    core Gaussian plus f_k of a wing Gaussian of ``WING_VARIANCE_SCALES[k]`` times its covariance."""
    cxx, cyy, cxy = (np.asarray(c, np.float64) for c in cov[:3])
    fs = [np.asarray(f, np.float64) for f in cov[3:]]
    comps = [(1.0 - sum(fs, np.zeros_like(cxx)), cxx, cyy, cxy)]
    for f, s in zip(fs, WING_VARIANCE_SCALES):
        if np.any(f > 0):
            comps.append((f, s * cxx, s * cyy, s * cxy))
    return comps


def render_models(psf: PsfModel, st: Stamps, cov: np.ndarray) -> np.ndarray:
    """Unit-flux models (n, S, S): intrinsic profiles (:func:`profile_components`) convolved with the PSF mixture.

    Nearly round components are drawn as separable outer products (no 2-D exponentials).
    """
    out = np.zeros((st.rows.size, st.size, st.size), np.float32)
    for c, (wgt, cxx, cyy, cxy) in enumerate(profile_components(cov)):
        live = wgt > 0
        cbar = 0.5 * (cxx + cyy)
        anis = np.hypot(0.5 * (cxx - cyy), cxy)
        round_ = anis <= 0.1 * (cbar + psf.sigma_eff ** 2)  # anisotropy < 10 % of the convolved size
        for is_round in (True, False):
            sel = live & (round_ == is_round)
            if not sel.any():
                continue
            dx, dy, ws = st.dx[sel], st.dy[sel], wgt[sel]
            block = np.zeros((int(sel.sum()), st.size, st.size), np.float32)
            for amp, v in zip(psf.amp, psf.var):
                if is_round:
                    var = (cbar[sel] + v).astype(np.float32)[:, None]
                    ex = np.exp(dx * dx / (-2 * var))
                    ey = np.exp(dy * dy / (-2 * var)) * (amp / (2 * np.pi * var)) * ws.astype(np.float32)[:, None]
                    block += ey[:, :, None] * ex[:, None, :]
                else:
                    sxx, syy, sxy = cxx[sel] + v, cyy[sel] + v, cxy[sel]
                    det = sxx * syy - sxy * sxy
                    ixx = (-0.5 * syy / det).astype(np.float32)[:, None, None]
                    iyy = (-0.5 * sxx / det).astype(np.float32)[:, None, None]
                    ixy = (sxy / det).astype(np.float32)[:, None, None]
                    ddx, ddy = dx[:, None, :], dy[:, :, None]
                    norm = (amp * ws / (2 * np.pi * np.sqrt(det))).astype(np.float32)[:, None, None]
                    block += norm * np.exp(ixx * (ddx * ddx) + iyy * (ddy * ddy) + ixy * (ddx * ddy))
            if sel.all():
                out += block
            else:
                out[sel] += block
    return out


def psf_factors(psf: PsfModel, st: Stamps) -> tuple[np.ndarray, np.ndarray]:
    """Separable factors of the PSF at each object: P = sum_k ey[:, k] (x) ex[:, k], each (n, K, S)."""
    var = psf.var.astype(np.float32)[None, :, None]
    ey = np.exp(st.dy[:, None, :] ** 2 / (-2 * var)) * (psf.amp / (2 * np.pi * psf.var)).astype(np.float32)[None, :, None]
    ex = np.exp(st.dx[:, None, :] ** 2 / (-2 * var))
    return ey.astype(np.float32), ex.astype(np.float32)


def separable_dot(ey: np.ndarray, m: np.ndarray, ex: np.ndarray) -> np.ndarray:
    """sum over pixels of P * m for P = sum_k ey_k (x) ex_k: (n, K, S), (n, S, S), (n, K, S) -> (n,)."""
    return np.einsum("nks,nks->n", np.matmul(ey, m), ex)


def model_overlaps(psf: PsfModel, d: np.ndarray, ci: tuple, cj: tuple) -> np.ndarray:
    """Integral of the product of two unit models separated by ``d`` (n, 2); ``ci``, ``cj``: their profiles
    (cxx, cyy, cxy[, wing fraction]) as in :func:`profile_components`."""
    out = np.zeros(d.shape[0])
    for m, (wi, cxi, cyi, cxyi) in enumerate(profile_components(ci)):
        for k, (wj, cxj, cyj, cxyj) in enumerate(profile_components(cj)):
            sxx0, syy0, sxy = cxi + cxj, cyi + cyj, cxyi + cxyj
            wij = wi * wj
            for a1, v1 in zip(psf.amp, psf.var):
                for a2, v2 in zip(psf.amp, psf.var):
                    sxx, syy = sxx0 + v1 + v2, syy0 + v1 + v2
                    det = sxx * syy - sxy * sxy
                    q = (syy * d[:, 0] ** 2 + sxx * d[:, 1] ** 2 - 2 * sxy * d[:, 0] * d[:, 1]) / det
                    out += wij * a1 * a2 * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(det))
    return out


def coadd_psf(psfs: dict[str, PsfModel], weights: dict[str, float], beta: float) -> PsfModel:
    """The PSF of the inverse-variance coadd, approximated as a Moffat of the weighted mean FWHM."""
    tot = sum(weights.values()) or 1.0
    fwhm = sum(psfs[b].fwhm_pix * weights[b] for b in psfs) / tot
    return moffat_mixture(round(float(fwhm), 2), round(float(beta), 2))


def windowed_shapes(st: Stamps, img: np.ndarray, good: np.ndarray, psf: PsfModel, window: float) -> tuple[np.ndarray, ...]:
    """Intrinsic Gaussian covariance from Gaussian-windowed second moments, deconvolved from window and PSF.

    For a Gaussian object of covariance C seen through a Gaussian window W, the weighted moments are
    M = (C^-1 + W^-1)^-1, so C = (M^-1 - W^-1)^-1; the PSF's equivalent covariance (measured the same
    way on the PSF model) is subtracted and the result clipped to be positive semi-definite.
    """
    sw2 = np.float32(window * window)
    dx = st.dx[:, None, :]
    dy = st.dy[:, :, None]
    wgt = np.exp(-(dx * dx + dy * dy) / (2 * sw2)) * np.where(good, img, 0).astype(np.float32)
    s0 = wgt.sum(axis=(1, 2))
    ok = s0 > 0
    s0 = np.where(ok, s0, 1.0)
    mx = (wgt * dx).sum(axis=(1, 2)) / s0
    my = (wgt * dy).sum(axis=(1, 2)) / s0
    mxx = (wgt * dx * dx).sum(axis=(1, 2)) / s0 - mx * mx
    myy = (wgt * dy * dy).sum(axis=(1, 2)) / s0 - my * my
    mxy = (wgt * dx * dy).sum(axis=(1, 2)) / s0 - mx * my
    # PSF equivalent: weighted moment of the PSF model through the same window (isotropic)
    g = np.arange(-25, 26, dtype=np.float64)
    rr = g[None, :] ** 2 + g[:, None] ** 2
    pv = psf.value(g[None, :], g[:, None]) * np.exp(-rr / (2 * window * window))
    mp = float((pv * g[None, :] ** 2).sum() / pv.sum())
    cp = 1.0 / (1.0 / mp - 1.0 / (window * window))

    def inv(xx, yy, xy):
        det = xx * yy - xy * xy
        det = np.where(np.abs(det) > 1e-12, det, 1e-12)
        return yy / det, xx / det, -xy / det

    ixx, iyy, ixy = inv(mxx, myy, mxy)
    ixx, iyy = ixx - 1.0 / (window * window), iyy - 1.0 / (window * window)
    # deconvolve the window; where moments are not consistent with a positive C, the object is small
    det = ixx * iyy - ixy * ixy
    posdef = (ixx > 0) & (iyy > 0) & (det > 0) & ok
    cxx, cyy, cxy = inv(ixx, iyy, ixy)
    cxx, cyy, cxy = np.where(posdef, cxx, 0.0), np.where(posdef, cyy, 0.0), np.where(posdef, cxy, 0.0)
    cxx, cyy = cxx - cp, cyy - cp
    # clip to positive semi-definite (eigenvalues >= 0), cap at a generous size
    tr, dt = cxx + cyy, cxx * cyy - cxy * cxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - dt, 0))
    l1, l2 = np.clip(tr / 2 + disc, 0, 400.0), np.clip(tr / 2 - disc, 0, 400.0)
    ang = 0.5 * np.arctan2(2 * cxy, cxx - cyy)
    c, s = np.cos(ang), np.sin(ang)
    return (l1 * c * c + l2 * s * s, l1 * s * s + l2 * c * c, (l1 - l2) * c * s, mx, my)


class Photometry(Stage):
    """Forced photometry in every band on neighbour-subtracted stamps; positions, shapes, flags."""

    name = "photometry"
    version = "6"  # 6: {band}_modelFlux columns; objects below centroid_min_snr keep their detection positions
    requires = ("exposure", "sky", "deblended", "deblend_segmentation", "segmentation")
    optional = ("masks/artefacts",)
    provides = {"objects": "per-object multi-band photometry (nJy), positions, shapes, parent/child records and flags"}
    Config = PhotometryConfig

    def run(self, inputs: Mapping[str, Any], config: PhotometryConfig) -> dict[str, Any]:
        tile, sky, det = inputs["exposure"], inputs["sky"], inputs["deblended"]
        owner = inputs["deblend_segmentation"].planes["owner"]
        foot = inputs["segmentation"].planes["footprint"]
        artefacts = inputs.get("masks/artefacts")
        n = len(det)
        shape = tile.shape
        bands = list(tile.bands)
        x = np.asarray(det["x"], np.float64)
        y = np.asarray(det["y"], np.float64)
        a = np.maximum(np.asarray(det["a"], np.float64), 0.5)
        b = np.maximum(np.asarray(det["b"], np.float64), 0.5)
        th = np.asarray(det["theta"], np.float64)
        measured = np.asarray(det["detect_isDeblendedSource"], bool)
        flags = np.asarray(det["detect_flags"], np.uint32).copy()

        t = Table()
        for col in ("objectId", "parentObjectId", "deblend_nChild", "x", "y"):
            t.add(col, det[col], det.info[col].unit, det.info[col].description, det.info[col].ucd)
        ra, dec = tile.wcs().all_pix2world(x, y, 0) if n else (np.zeros(0), np.zeros(0))
        t.add("coord_ra", np.asarray(ra, np.float64), "deg", "right ascension (ICRS)", "pos.eq.ra;meta.main")
        t.add("coord_dec", np.asarray(dec, np.float64), "deg", "declination (ICRS)", "pos.eq.dec;meta.main")
        inner = np.asarray(tile.inner.contains(x, y) if tile.inner else np.ones(n, bool), bool)
        t.add("detect_isTileInner", inner, "", "centroid inside the tile's inner region")
        t.add("detect_isDeblendedSource", measured, "", "isolated object or deblended child (not a blend parent)")
        t.add("detect_isPrimary", inner & measured, "", "inner and not a blend parent: counts exactly once in the release")

        # ---- band-independent set-up: PSFs, Kron apertures, stamps, aperture weights, model shapes
        psfs = band_psfs(tile, bands, config.psf_beta if config.psf_beta is not None else config.psf_default_beta)
        wsky = {}
        for bnd in released_after_each(bands, lambda bb: (sky.weight[bb],)):  # sparse reads fault in whole planes
            wv = sky.weight[bnd][:: 16, :: 16]
            wv = wv[wv > 0]
            wsky[bnd] = float(np.median(wv)) if wv.size else 0.0
        cpsf = coadd_psf(psfs, wsky, config.psf_beta if config.psf_beta is not None else config.psf_default_beta)
        dbands = [bb for bb in det.attrs.get("bands", bands) if bb in bands]
        num, den = coadd_planes(sky, dbands, {bb: tile.header.get(bb, {}).get("SATURATE_NJY") for bb in dbands})
        nodata = den <= 0
        coadd = np.zeros(shape, np.float32)
        np.divide(num, den, out=coadd, where=~nodata)
        mrows = np.flatnonzero(measured)
        peak = np.asarray(det["detect_peakSnr"], np.float64)
        star_rows = np.zeros(0, np.int64)
        # model shapes: windowed moments of the coadd (neighbours' pixels masked)
        cov = np.zeros((3, n))
        shp = Stamps.make(mrows, x[mrows], y[mrows], 10, shape)
        if mrows.size:
            own = shp.gather(owner)
            good = ~shp.gather(nodata) & ((own == 0) | (own == (mrows + 1)[:, None, None]))
            cxx, cyy, cxy, _, _ = windowed_shapes(shp, shp.gather(coadd), good, cpsf, config.moment_window * cpsf.sigma_eff)
            cov[:, mrows] = cxx, cyy, cxy
        # children's Kron ellipses: the larger (by area) of two shapes, each of which errs small in its own way --
        # the second moments of the child's share of the footprint (which a neighbour cuts) and the windowed
        # moments above (as the detection image would show the child alone; the small window sees a big
        # galaxy's core, not its wings: bright deblended galaxies came out 0.05-0.09 mag faint with these alone)
        child = measured & (np.asarray(det["parentObjectId"]) != 0)
        child_rows = np.flatnonzero(child)   # (one level: a child's parent is a blend, never another child)
        ids = np.asarray(det["objectId"], np.int64)
        by_id = np.argsort(ids)
        parent_row = by_id[np.searchsorted(ids, np.asarray(det["parentObjectId"], np.int64)[child_rows], sorter=by_id)]
        if child.any():
            s2 = cpsf.sigma_eff ** 2 + (float(det.attrs.get("filter_fwhm_pix") or cpsf.fwhm_pix) / FWHM_PER_SIGMA) ** 2
            cxx, cyy, cxy = cov[0, child] + s2, cov[1, child] + s2, cov[2, child]
            tr, dt = cxx + cyy, cxx * cyy - cxy * cxy
            disc = np.sqrt(np.maximum(tr * tr / 4 - dt, 0))
            aw, bw = np.sqrt(tr / 2 + disc), np.sqrt(np.maximum(tr / 2 - disc, 0.25))
            win = aw * bw >= a[child] * b[child]
            a[child], b[child] = np.where(win, aw, a[child]), np.where(win, bw, b[child])
            th[child] = np.where(win, 0.5 * np.arctan2(2 * cxy, cxx - cyy), th[child])
        # faint objects: their moments are mostly noise -> round models of the mean size
        faint = peak < 10.0
        cbar = 0.5 * (cov[0] + cov[1])
        cov[0, faint], cov[1, faint], cov[2, faint] = cbar[faint], cbar[faint], 0.0
        cov = np.vstack([cov, np.zeros((len(WING_VARIANCE_SCALES), n))])  # + wing fractions (profile_components)
        if config.profile_wings and mrows.size:
            wr = mrows[(peak[mrows] >= config.wing_min_snr) & (cbar[mrows] >= 0.25 * cpsf.sigma_eff ** 2)]
            cov[3:, wr] = fit_wing_fractions(coadd, den, owner, wr, x, y, cov, cpsf, shape)
        # model stamps: as large as the model stays above ~0.1 sigma per pixel (Moffat wings, or Gaussian size)
        alpha = cpsf.fwhm_pix / (2.0 * np.sqrt(2.0 ** (1.0 / cpsf.beta) - 1.0))
        snr = np.maximum(peak, 1.0)
        reach_psf = alpha * np.sqrt(np.maximum((3.0 * snr) ** (1.0 / cpsf.beta) - 1.0, 0.0))
        tr, dt = cov[0] + cov[1], cov[0] * cov[1] - cov[2] ** 2
        s_tot = np.sqrt(0.5 * tr + np.sqrt(np.maximum(0.25 * tr * tr - dt, 0.0)) + cpsf.sigma_eff ** 2)
        reach_gal = s_tot * np.sqrt(2.0 * np.log(np.maximum(10.0 * snr / (np.sqrt(np.pi) * s_tot), 1.0)))
        reach = np.maximum(reach_psf, reach_gal)
        for f, scale in zip(cov[3:], WING_VARIANCE_SCALES):  # a wing reaches further, at its share of the peak
            s_w = np.sqrt(scale * (s_tot ** 2 - cpsf.sigma_eff ** 2) + cpsf.sigma_eff ** 2)
            snr_w = np.maximum(snr * f * (s_tot / s_w) ** 2, 1.0)
            reach_w = s_w * np.sqrt(2.0 * np.log(np.maximum(10.0 * snr_w / (np.sqrt(np.pi) * s_w), 1.0)))
            reach = np.where(f > 0, np.maximum(reach, reach_w), reach)
        mcls = np.minimum(np.searchsorted(np.asarray(MODEL_HALVES), reach), len(MODEL_HALVES) - 1)

        def model_sets():
            ms_ = [Stamps.make(mrows[mcls[mrows] == c], x[mrows[mcls[mrows] == c]], y[mrows[mcls[mrows] == c]], hh, shape)
                   for c, hh in enumerate(MODEL_HALVES) if np.any(mcls[mrows] == c)]
            # neighbour pairs among measured objects whose model stamps overlap
            mhalf = np.zeros(n)
            for ms in ms_:
                mhalf[ms.rows] = ms.half
            prs = np.zeros((0, 2), np.int64)
            if config.neighbour_models and mrows.size > 1:
                pr = cKDTree(np.c_[x[mrows], y[mrows]]).query_pairs(2.0 * mhalf.max() + 1, output_type="ndarray")
                if pr.size:
                    pr = mrows[pr]
                    dd = np.hypot(x[pr[:, 0]] - x[pr[:, 1]], y[pr[:, 0]] - y[pr[:, 1]])
                    prs = pr[dd < mhalf[pr[:, 0]] + mhalf[pr[:, 1]] + 1]
            return ms_, prs

        msets, pairs = model_sets()
        own_c, msets_c, x_c, y_c = None, msets, x, y  # coadd models, their stamps and centres (Kron radius)
        resid_c = None  # the coadd minus all of own_c
        if config.neighbour_models and mrows.size and config.centroid_iterations:
            # centroids: windowed first moments (SExtractor's XWIN) of the coadd with the other objects' models
            # removed (a child's peak is pulled towards its neighbour), then the models re-centred
            _, own_c = coadd_models(coadd, den, cpsf, msets, cov, measured, pairs, x, y, shape)
            refine = measured & (peak >= config.centroid_min_snr)
            resid_c = model_residual(coadd, den, own_c, msets, shape)
            dxy = refine_centroids(resid_c, own_c, msets, refine, x, y, cpsf.sigma_eff, shape, config.centroid_iterations)
            x, y = x + dxy[0], y + dxy[1]
            msets, pairs = model_sets()  # per-band models at the refined centres
            ra, dec = tile.wcs().all_pix2world(x, y, 0)
            inner = np.asarray(tile.inner.contains(x, y) if tile.inner else np.ones(n, bool), bool)
            t.add("x", x, "pix", "x centroid, 0-based pixel: windowed centroid of the coadd, neighbours' models removed", "pos.cartesian.x")
            t.add("y", y, "pix", "y centroid, 0-based pixel (as x)", "pos.cartesian.y")
            t.add("coord_ra", np.asarray(ra, np.float64), "deg", "right ascension (ICRS)", "pos.eq.ra;meta.main")
            t.add("coord_dec", np.asarray(dec, np.float64), "deg", "declination (ICRS)", "pos.eq.dec;meta.main")
            t.add("detect_isTileInner", inner, "", "centroid inside the tile's inner region")
            t.add("detect_isPrimary", inner & measured, "", "inner and not a blend parent: counts exactly once in the release")

        if config.psf_beta is None and mrows.size:  # per-band PSF from the tile's stars, at the refined centroids
            psfs, star_rows = fit_band_psfs(tile, sky, psfs, det, cov, x, y, config)
            cpsf = coadd_psf(psfs, wsky, float(np.average([p.beta for p in psfs.values()],
                                                          weights=[max(wsky[b], 1e-30) for b in bands])))
        # Kron radius of measured objects on the coadd with every other object's model subtracted
        if config.neighbour_models and own_c is None and mrows.size:
            _, own_c = coadd_models(coadd, den, cpsf, msets, cov, measured, pairs, x, y, shape)
            msets_c = msets
        kr = np.zeros(n)
        if n:
            segid = np.where(measured, np.arange(n) + 1, np.asarray(det["footprintId"], np.int64)).astype(np.int32)
            sel_sep = ~measured if own_c is not None else np.ones(n, bool)
            for sel, segmap in ((sel_sep & measured, owner), (sel_sep & ~measured, foot)):
                if sel.any():
                    k, _ = sep.kron_radius(coadd, x[sel], y[sel], a[sel], b[sel], th[sel], config.kron_rmax,
                                           mask=nodata, segmap=np.ascontiguousarray(segmap, np.int32), seg_id=segid[sel])
                    kr[sel] = k
            if own_c is not None and mrows.size:
                if resid_c is None:
                    resid_c = model_residual(coadd, den, own_c, msets_c, shape)
                kr[mrows] = deblended_kron_radius(resid_c, own_c, msets_c, mrows, x_c, y_c, a, b, th, config.kron_rmax,
                                                  shape, shift=(x - x_c, y - y_c))
        del num, den, coadd, own_c, msets_c, shp, resid_c  # the coadd's work is done: its memory goes to the band loop
        kr = np.where(np.isfinite(kr) & (kr > 0), kr, 0.0)
        kscale = np.maximum(config.kron_factor * kr, config.min_kron_radius)
        kA, kB = kscale * a, kscale * b
        need = np.maximum(kA + 1.0, APERTURE_HALF)
        cls = np.searchsorted(np.asarray(STAMP_HALVES), need)
        big = cls >= len(STAMP_HALVES)
        cls = np.minimum(cls, len(STAMP_HALVES) - 1)
        kA = np.minimum(kA, STAMP_HALVES[-1] - 1.0)
        kB = np.minimum(kB, kA)
        flags[big] |= OBJECT_FLAGS["aperture_truncated"]
        sets = [Stamps.make(np.flatnonzero(cls == c), x[cls == c], y[cls == c], hh, shape)
                for c, hh in enumerate(STAMP_HALVES) if np.any(cls == c)]
        t.add("a", a.astype(np.float32), "pix", "semi-major axis: second moments of the detection image (children: of their share of it, or windowed moments of the coadd where larger)")
        t.add("b", b.astype(np.float32), "pix", "semi-minor axis (as a)")
        t.add("theta", th.astype(np.float32), "rad", "position angle of the major axis, from +x towards +y")
        t.add("kronRadius", (kscale * np.sqrt(a * b)).astype(np.float32), "pix",
              "Kron aperture radius sqrt(A B) (factor x Kron radius, at least the minimum), the same in every band")

        napt = len(config.apertures_pix)
        big_ap = int(np.argmax(config.apertures_pix))
        ch = APERTURE_HALF
        # band-independent aperture weights: central window (circular) and whole stamp (Kron)
        wc, kw, unions = [], [], []
        for st in sets:
            lo, hi = st.half - ch, st.half + ch + 1
            r = np.sqrt(st.dy[:, lo:hi, None] ** 2 + st.dx[:, None, lo:hi] ** 2)
            ws = np.stack([circular_weights(r, ap).reshape(len(st.rows), -1) for ap in config.apertures_pix], axis=1)
            wc.append(ws)
            kk = elliptical_weights(st, kA[st.rows], kB[st.rows], th[st.rows])
            kw.append(kk)
            u = kk > 0
            u[:, lo:hi, lo:hi] |= (ws[:, big_ap] > 0).reshape(-1, 2 * ch + 1, 2 * ch + 1)
            unions.append(u)
            if (~st.interior).any():  # largest aperture or Kron ellipse reaching off the image
                e = np.flatnonzero(~st.interior)
                hit = e[(u[e] & ~st.inside).any(axis=(1, 2))]
                flags[st.rows[hit]] |= OBJECT_FLAGS["edge"] | OBJECT_FLAGS["aperture_truncated"]
        mw = []  # the same apertures on the model stamps (for the own-model part of each flux)
        for ms in msets:
            r = ms.radius()
            wsm = np.empty((ms.rows.size, napt + 1, ms.size * ms.size), np.float32)
            for j, ap in enumerate(config.apertures_pix):
                wsm[:, j] = circular_weights(r, ap).reshape(ms.rows.size, -1)
            wsm[:, napt] = elliptical_weights(ms, kA[ms.rows], kB[ms.rows], th[ms.rows]).reshape(ms.rows.size, -1)
            mw.append(wsm)
        # band-independent areas of the apertures (sum of the pixel weights), for the residual-sky and extra-noise terms
        area = np.zeros((n, napt + 1))
        for k, st in enumerate(sets):
            area[st.rows, :napt] = wc[k].sum(axis=2)
            area[st.rows, napt] = kw[k].sum(axis=(1, 2))
        # empty positions: each aperture uses those with no footprint within its radius + 1 pixel (as close to
        # the detected objects as a measured object's aperture reaches; their model residuals are in its sky too)
        est, clear = empty_positions((foot > 0) | nodata, config.empty_apertures, min(config.apertures_pix) + 1.0)
        if est.rows.size:
            r_e = est.radius()[0]
            w_e = np.stack([circular_weights(r_e, ap).ravel() for ap in config.apertures_pix])
            psf_clear = 1.5 * max(p.fwhm_pix for p in psfs.values())
            use_e = clear[:, None] >= np.r_[np.asarray(config.apertures_pix) + 1.0, psf_clear][None, :]
        empty_info: dict[str, dict[str, Any]] = {}
        band_flags = np.zeros(n, np.uint32)
        apcorr: dict[str, dict[str, float]] = {}
        psf_apcorr: dict[str, float] = {}
        psf_sum = np.zeros(n)
        kron_sum = np.zeros(n)
        h, w = shape
        use_models = config.neighbour_models and mrows.size > 0
        release_free_heap()
        for band in bands:
            psf = psfs[band]
            img, wt = sky.image[band], sky.weight[band]
            sat = sky.saturated.get(band) if hasattr(sky, "saturated") else None
            sat = sat if sat is not None and sat.any() else None
            sat_yx = np.nonzero(sat) if sat is not None else None
            art_plane = getattr(artefacts, "planes", {}).get(band) if artefacts is not None else None
            art = np.asarray(art_plane) if art_plane is not None and np.any(art_plane) else None
            own_ap = np.zeros((n, napt + 1))   # aperture sums of each object's own model
            flags_b = np.zeros(n, np.uint32)   # this band's pixel flags (masked, saturated, artefacts)
            own_psf = np.zeros(n)              # sum of P w (own model)
            mtot = None
            # model flux, its variance, sky factor: 0 +- inf where no model was fitted (as the PSF flux)
            f_m, var_m, sky_m = np.zeros(n), np.full(n, np.inf), np.zeros(n)
            if use_models:
                # --- neighbour models: simultaneous linear fit of amplitudes on the model stamps
                diag, rhs, g2 = np.zeros(n), np.zeros(n), np.zeros(n)
                models, mwts = [], []
                for ms in msets:
                    g = render_models(psf, ms, cov[:, ms.rows])
                    wm = ms.gather(wt)
                    gw = g * wm
                    diag[ms.rows] = np.einsum("nij,nij->n", gw, g)
                    rhs[ms.rows] = np.einsum("nij,nij->n", gw, ms.gather(img))
                    g2[ms.rows] = np.einsum("nij,nij->n", g, g)
                    models.append(g)
                    lo, hi = max(ms.half - ch, 0), ms.half + min(ch, ms.half) + 1
                    mwts.append(np.ascontiguousarray(wm[:, lo:hi, lo:hi]))  # the PSF fit's window is all it needs
                amp = solve_amplitudes(psf, diag, rhs, g2, measured, pairs, x, y, cov)
                fit = measured & (diag > 0)
                # a residual sky level L per pixel adds L sum(g w) / sum(g^2 w) to the amplitude: 1 / sum(g^2) for a
                # unit-flux model under locally even weights (no extra pass over the stamps)
                f_m[fit], var_m[fit], sky_m[fit] = amp[fit], 1.0 / diag[fit], 1.0 / g2[fit]
                mtot = np.zeros(h * w, np.float32)
                for k, ms in enumerate(msets):
                    g = models[k]
                    g *= amp[ms.rows].astype(np.float32)[:, None, None]  # now the object's own model
                    ms.scatter_add(mtot, g)
                    nn = ms.rows.size
                    own_ap[ms.rows] = np.matmul(mw[k], g.reshape(nn, -1, 1))[:, :, 0]
                    lo, hi = max(ms.half - ch, 0), ms.half + min(ch, ms.half) + 1
                    sub = Stamps(ms.rows, min(ch, ms.half), ms.ox, ms.oy, ms.interior, ms.inside,
                                 ms.dx[:, lo:hi], ms.dy[:, lo:hi], ms.shape)
                    ey, ex = psf_factors(psf, sub)
                    own_psf[ms.rows] = separable_dot(ey, mwts[k] * g[:, lo:hi, lo:hi], ex)
                    models[k] = mwts[k] = None  # done with this set: the memory goes to the next one
                mtot = mtot.reshape(shape)
                del g, wm, gw  # the measurement stamps below need the memory
            # --- measurements on the measurement stamps
            fl = np.zeros((n, napt + 1))
            var = np.zeros((n, napt + 1))
            f_p, e_p, ee_k, pw = np.zeros(n), np.full(n, np.inf), np.ones(n), np.zeros(n)
            # parents (data, masked pixels filled with the total model): the models at their stamps' masked
            # pixels, kept before the models' plane turns into the residual (a few pixels, not whole stamps)
            # the measurement stamps in blocks, and each block's parents (their rows in the block and their stamps)
            blocks = list(stamp_blocks(sets))
            block_parents = []
            for _, st, _ in blocks:
                parents = np.flatnonzero(~measured[st.rows])
                block_parents.append((parents, st.subset(parents)) if parents.size else None)
            parent_fill = []
            for bp in block_parents if mtot is not None else ():
                pos = np.flatnonzero(~(bp[1].gather(wt) > 0)) if bp is not None else None
                parent_fill.append((pos, bp[1].gather(mtot).ravel()[pos]) if bp is not None else None)
            # measured objects: data minus all models (own model added back through own_ap), masked pixels 0; as a
            # plane, once per band and in the models' own memory (cheaper than per stamp: the stamps overlap)
            resid = np.subtract(img, mtot, out=mtot) if mtot is not None else np.array(img, np.float32)
            for r0 in range(0, h, 256):  # in strips: no plane-sized mask
                resid[r0:r0 + 256] *= wt[r0:r0 + 256] > 0
            mtot = None
            for (k, st, blk), bp, fill in zip(blocks, block_parents, parent_fill or itertools.repeat(None)):
                nn, S = st.rows.size, st.size
                X, wk = st.gather(resid), st.gather(wt)
                good = wk > 0
                if fill is not None:
                    (parents, sub), (pos, vals) = bp, fill
                    Xp = sub.gather(img)
                    Xp.ravel()[pos] += vals
                    X[parents] = Xp
                invw = np.zeros_like(wk)
                np.divide(np.float32(1), wk, out=invw, where=good)
                kk, wck = kw[k][blk], wc[k][blk]
                fl[st.rows, napt] = np.einsum("nij,nij->n", kk, X)
                var[st.rows, napt] = np.einsum("nij,nij->n", kk * kk, invw)
                lo, hi = st.half - ch, st.half + ch + 1
                Xc = np.ascontiguousarray(X[:, lo:hi, lo:hi]).reshape(nn, -1, 1)
                ivc = np.ascontiguousarray(invw[:, lo:hi, lo:hi]).reshape(nn, -1, 1)
                wcc = np.ascontiguousarray(wk[:, lo:hi, lo:hi])
                fl[st.rows, :napt] = np.matmul(wck, Xc)[:, :, 0]
                var[st.rows, :napt] = np.matmul(wck * wck, ivc)[:, :, 0]
                sub = Stamps(st.rows, ch, st.ox, st.oy, st.interior, st.inside, st.dx[:, lo:hi], st.dy[:, lo:hi], st.shape)
                ey, ex = psf_factors(psf, sub)
                K = ey.shape[1]
                ey2 = (ey[:, :, None, :] * ey[:, None, :, :]).reshape(nn, K * K, -1)
                ex2 = (ex[:, :, None, :] * ex[:, None, :, :]).reshape(nn, K * K, -1)
                den_p = separable_dot(ey2, wcc, ex2)
                num_p = separable_dot(ey, wcc * Xc.reshape(nn, 2 * ch + 1, -1), ex)
                okp = den_p > 0
                f_p[st.rows] = np.where(okp, num_p / np.where(okp, den_p, 1), 0)
                pw[st.rows] = np.where(okp, separable_dot(ey, wcc, ex) / np.where(okp, den_p, 1), 0)
                e_p[st.rows] = np.where(okp, 1.0 / np.sqrt(np.where(okp, den_p, 1)), np.inf)
                ee_k[st.rows] = separable_dot(ey, np.ascontiguousarray(kk[:, lo:hi, lo:hi]), ex)
                fb = np.zeros(nn, np.uint32)
                fb[~okp] |= OBJECT_FLAGS["bad_photometry"]
                u = unions[k][blk]
                badst = ~good
                if (~st.interior).any():
                    badst[~st.interior] &= st.inside
                fb[(badst & u).any(axis=(1, 2))] |= OBJECT_FLAGS["masked_pixels"]
                if sat is not None:
                    near = stamps_touching(st, sat_yx)
                    if near.size:
                        sub = st.subset(near)
                        fb[near[(sub.gather(sat) & u[near]).any(axis=(1, 2))]] |= OBJECT_FLAGS["saturated"]
                if art is not None:
                    av = np.where(u, st.gather(art), 0).reshape(nn, -1)
                    fb |= artefact_flags(np.bitwise_or.reduce(av, axis=1), artefacts)
                flags_b[st.rows] |= fb
            # empty apertures on the same image (neighbour models removed): residual sky level and the scatter
            # beyond the weight map's, per aperture; the Kron ellipse's by its area (linear beyond the largest)
            extra_p = 0.0
            if est.rows.size >= 50:  # masked pixels do not count there, so the residual plane serves
                lev, extra, n_e = empty_aperture_stats(est, est.gather(resid), est.gather(wt), w_e, psf, use_e)
                if (n_e > 0).all():
                    a_c = w_e.sum(axis=1)
                    order_a = np.argsort(a_c)
                    a_s, x_s, l_s = a_c[order_a], extra[:napt][order_a], lev[:napt][order_a]
                    kr_extra = np.where(area[:, napt] > a_s[-1], x_s[-1] * area[:, napt] / a_s[-1],
                                        np.interp(area[:, napt], np.r_[0.0, a_s], np.r_[0.0, x_s]))
                    level_k = l_s[-1]
                    if config.residual_sky:
                        fl[:, :napt] -= lev[None, :napt] * area[:, :napt]
                        fl[:, napt] -= level_k * area[:, napt]
                        f_p = f_p - lev[napt] * pw
                        f_m = f_m - lev[napt] * sky_m
                    var[:, :napt] += extra[None, :napt]
                    var[:, napt] += kr_extra
                    extra_p = float(extra[napt])
                    # the model flux's extra variance: the PSF fit's, scaled as the two estimators' weight-map
                    # variances (their noise-equivalent areas)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        var_m = var_m + extra_p * np.where(np.isfinite(e_p), var_m / (e_p * e_p), 0.0)
                    empty_info[band] = {"n": [int(v) for v in n_e], "sky_level_per_pix": [round(float(v), 6) for v in lev],
                                        "extra_sigma": [round(float(np.sqrt(v)), 4) for v in extra],
                                        "apertures": [f"ap{int(round(a)):02d}" for a in config.apertures_pix] + ["psf"]}
            # own models back in (zero for parents and without neighbour models)
            fl += own_ap
            with np.errstate(divide="ignore", invalid="ignore"):
                f_p = f_p + np.where(np.isfinite(e_p), own_psf * e_p * e_p, 0.0)
            if extra_p > 0:  # the PSF flux's extra variance (after the own model, which uses e_p = den^-1/2)
                e_p = np.sqrt(e_p * e_p + extra_p)
            if parent_row.size:  # a blend's model flux: the sum of its children's
                f_m[~measured], var_m[~measured] = 0.0, 0.0
                np.add.at(f_m, parent_row, f_m[child_rows])
                np.add.at(var_m, parent_row, var_m[child_rows])
            f_k, e_k = fl[:, napt], np.sqrt(var[:, napt])
            if config.kron_apcorr:
                ee = np.clip(ee_k, 0.2, 1.0)
                f_k, e_k = f_k / ee, e_k / ee
            apcorr[band] = aperture_corrections(psf, config.apertures_pix)
            # aperture correction of the PSF flux (as Rubin's): scaled to the largest aperture's total flux
            # on the tile's stars, so that a small error of the PSF model does not bias it
            big_tag = f"ap{int(round(config.apertures_pix[big_ap])):02d}"
            s_ok = star_rows[(f_p[star_rows] > 0) & np.isfinite(e_p[star_rows]) & (f_p[star_rows] > 50 * e_p[star_rows])]
            if s_ok.size >= config.psf_min_stars:
                corr_p = float(np.median(fl[s_ok, big_ap] * apcorr[band][big_tag] / f_p[s_ok]))
                if 0.9 < corr_p < 1.1:
                    f_p, e_p = f_p * corr_p, e_p * corr_p
                    f_m, var_m = f_m * corr_p, var_m * corr_p * corr_p  # the same PSF model makes both
                    psf_apcorr[band] = round(corr_p, 6)
            if config.empirical_apcorr and s_ok.size >= config.psf_min_stars:
                # the smaller apertures' corrections the same way (an empirical curve of growth on the tile's
                # stars, tied to the model's correction of the largest aperture, which is ~1 and least sensitive
                # to the PSF model's core)
                for j, ap in enumerate(config.apertures_pix):
                    tag = f"ap{int(round(ap)):02d}"
                    okj = s_ok[fl[s_ok, j] > 0]
                    if j == big_ap or okj.size < config.psf_min_stars:
                        continue
                    c = float(np.median(fl[okj, big_ap] * apcorr[band][big_tag] / fl[okj, j]))
                    if abs(c / apcorr[band][tag] - 1) < 0.05:
                        apcorr[band][tag] = round(c, 6)
            for j, ap in enumerate(config.apertures_pix):
                tag = f"ap{int(round(ap)):02d}"
                t.add(f"{band}_{tag}Flux", fl[:, j].astype(np.float32), "nJy", f"flux in a {ap:g}-pixel-radius circular aperture, {band} band", "phot.flux")
                t.add(f"{band}_{tag}FluxErr", np.sqrt(var[:, j]).astype(np.float32), "nJy", f"error of {band}_{tag}Flux", "stat.error;phot.flux")
            t.add(f"{band}_kronFlux", f_k.astype(np.float32), "nJy", f"Kron flux ({config.kron_factor:g} Kron radii"
                  + (", divided by the PSF's encircled fraction" if config.kron_apcorr else "") + f"), {band} band", "phot.flux")
            t.add(f"{band}_kronFluxErr", e_k.astype(np.float32), "nJy", f"error of {band}_kronFlux", "stat.error;phot.flux")
            t.add(f"{band}_psfFlux", f_p.astype(np.float32), "nJy", f"PSF-model flux, aperture-corrected on the tile's stars (total for a point source), {band} band", "phot.flux")
            t.add(f"{band}_psfFluxErr", e_p.astype(np.float32), "nJy", f"error of {band}_psfFlux", "stat.error;phot.flux")
            t.add(f"{band}_modelFlux", f_m.astype(np.float32), "nJy", f"total flux of the object's model (its intrinsic "
                  f"profile, the same in every band, convolved with this band's PSF) fitted jointly with its neighbours: "
                  f"colours free of the bands' different seeing; a blend's is its children's sum; 0 +- inf where no model "
                  f"was fitted, {band} band", "phot.flux")
            t.add(f"{band}_modelFluxErr", np.sqrt(var_m).astype(np.float32), "nJy", f"error of {band}_modelFlux",
                  "stat.error;phot.flux")
            t.add(f"{band}_flags", flags_b, "", f"the flags this band's pixels raise (masked, saturated, artefact classes, "
                  f"bad photometry; stages.flags.OBJECT_FLAGS), {band} band; flags holds them for all bands", "meta.code")
            band_flags |= flags_b
            psf_sum += f_p
            kron_sum += f_k
            # file-backed planes (pipeline.scratch): done with this band
            del resid, parent_fill, blocks, block_parents
            release(img, wt, getattr(sky, "bad", {}).get(band), art_plane)
            release_free_heap()  # and the band's freed stamps: the heap would keep them, fragmented, under the next band's
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(kron_sum > 0, psf_sum / kron_sum, 1.0)
        t.add("refExtendedness", (ratio < config.extendedness_cut).astype(np.float32), "",
              "1 = extended, 0 = point-like (sum over bands of psfFlux / kronFlux below extendedness_cut)")
        t.add("psfKronRatio", ratio.astype(np.float32), "", "sum over bands of psfFlux / kronFlux (about 1 for point sources)")
        flags |= band_flags
        t.add("flags", flags, "", "object flags (stages.flags.OBJECT_FLAGS)", "meta.code")
        t.attrs["flag_bits"] = OBJECT_FLAGS.as_attrs()
        t.attrs["apcorr"] = apcorr
        t.attrs["psf_apcorr"] = psf_apcorr
        t.attrs["empty_apertures"] = empty_info
        t.attrs["psf"] = {bnd: psfs[bnd].as_attrs() for bnd in bands}
        return {"objects": t}


def fit_band_psfs(tile: Any, sky: Any, psfs: dict[str, PsfModel], det: Any, cov: np.ndarray, x: np.ndarray,
                  y: np.ndarray, config: PhotometryConfig) -> tuple[dict[str, PsfModel], np.ndarray]:
    """A Moffat per band fitted to the tile's bright, isolated, compact, unsaturated objects: one slope for all
    bands (the atmosphere's, better constrained by all stars together), a FWHM per band.

    Stars: isolated (no parent, no child, nothing else within 12 pixels), peak S/N >= 50 on the
    detection image, intrinsic size ~0 (deconvolved windowed moments), no masked pixel within 4 pixels
    of the centre. Bands with fewer than ``psf_min_stars`` keep the header FWHM and the default slope.
    Returns the models and the rows of the stars.
    """
    n = x.size
    iso = (np.asarray(det["parentObjectId"]) == 0) & (np.asarray(det["deblend_nChild"]) == 0)
    cand = iso & (np.asarray(det["detect_peakSnr"]) >= 50) & (0.5 * (cov[0] + cov[1]) < 0.15)
    cand &= (x > 12) & (y > 12) & (x < tile.shape[1] - 13) & (y < tile.shape[0] - 13)
    if cand.sum() < config.psf_min_stars:
        return psfs, np.zeros(0, np.int64)
    d, _ = cKDTree(np.c_[x, y]).query(np.c_[x[cand], y[cand]], k=2)
    rows = np.flatnonzero(cand)[d[:, 1] > 12]
    rows = rows[np.argsort(-np.asarray(det["detect_peakSnr"])[rows])][:60]
    st = Stamps.make(rows, x[rows], y[rows], 9, tile.shape)
    core = st.radius() < 4
    data = {}
    for band in released_after_each(tile.bands, lambda bb: (sky.image[bb], sky.weight[bb])):
        img, wt = st.gather(sky.image[band]), st.gather(sky.weight[band])
        bad = (wt <= 0) & core
        if sky.saturated.get(band) is not None:
            bad |= st.gather(sky.saturated[band])
        ok = ~bad.any(axis=(1, 2))
        if ok.sum() >= config.psf_min_stars:
            data[band] = (img[ok], wt[ok], st.dx[ok], st.dy[ok], psfs[band].fwhm_pix)
    if not data:
        return psfs, rows
    # coarse slope at the header FWHMs, then a fine grid of slope and FWHM around it (a parabola through a
    # coarse grid is biased: the chi^2 is not parabolic in beta over a 0.5 step)
    coarse = {b: moffat_chi2_grid(*v, scales=(1.0,)) for b, v in data.items()}
    b0 = float(np.asarray(BETA_GRID)[int(np.argmin(sum(g[0] for g in coarse.values())))])
    fine = tuple(max(b0 + d, 1.3) for d in (-0.3, -0.15, 0.0, 0.15, 0.3))
    grids = {b: moffat_chi2_grid(*v, betas=fine) for b, v in data.items()}
    fwhm, beta = fit_moffat_bands(grids, {b: v[4] for b, v in data.items()}, betas=fine)
    out = dict(psfs)
    for band in grids:
        out[band] = moffat_mixture(round(float(fwhm[band]), 2), round(float(beta), 2), 4, f"stars({rows.size})")
    return out, rows


def embed(src: list[np.ndarray], src_sets: list["Stamps"], dst: "Stamps") -> np.ndarray:
    """Copy per-object stamps (``src`` on ``src_sets``) onto the grid of ``dst`` (same centres), zero-padded or cropped."""
    out = np.zeros((dst.rows.size, dst.size, dst.size), np.float32)
    if dst.rows.size == 0:
        return out
    order = np.argsort(dst.rows)
    for arr, ss in zip(src, src_sets):
        k = np.clip(np.searchsorted(dst.rows[order], ss.rows), 0, dst.rows.size - 1)
        ok = dst.rows[order][k] == ss.rows
        if not ok.any():
            continue
        di, si = order[k[ok]], np.flatnonzero(ok)
        hs, hd = ss.half, dst.half
        if hs <= hd:
            out[di, hd - hs:hd + hs + 1, hd - hs:hd + hs + 1] = arr[si]
        else:
            out[di] = arr[si][:, hs - hd:hs + hd + 1, hs - hd:hs + hd + 1]
    return out


def fit_wing_fractions(coadd: np.ndarray, den: np.ndarray, owner: np.ndarray, rows: np.ndarray, x: np.ndarray,
                       y: np.ndarray, cov: np.ndarray, psf: PsfModel, shape: tuple[int, int]) -> np.ndarray:
    """(len(WING_VARIANCE_SCALES), n) each object's share of light in each wing Gaussian (``WING_VARIANCE_SCALES``
    x its core covariance), from a weighted non-negative least-squares fit of the core and wing templates (all
    PSF-convolved) on the coadd, other objects' pixels masked.

    Why: the core Gaussian comes from windowed moments and matches the centre of an exponential or de
    Vaucouleurs profile, not its wings. A faint neighbour sitting on a bright galaxy's wing then takes that
    light into its own amplitude, and subtracting the neighbour's model takes it out of the galaxy's
    aperture."""
    from scipy.optimize import nnls

    nw = len(WING_VARIANCE_SCALES)
    out = np.zeros((nw, rows.size))
    if rows.size == 0:
        return out
    cbar = 0.5 * (cov[0, rows] + cov[1, rows])
    s_w = np.sqrt(WING_VARIANCE_SCALES[-1] * cbar + psf.sigma_eff ** 2)
    halves = np.asarray(STAMP_HALVES)
    cls = np.minimum(np.searchsorted(halves, 2.5 * s_w), halves.size - 1)
    nodata = den <= 0
    unit = np.eye(nw)[:, :, None]  # wing k alone: cov rows (cxx, cyy, cxy, f_1 .. f_nw) with f_k = 1
    for c in np.unique(cls):
        k = np.flatnonzero(cls == c)
        r = rows[k]
        st = Stamps.make(r, x[r], y[r], int(halves[c]), shape)
        own = st.gather(owner)
        sw = np.sqrt(st.gather(den) * (((own == 0) | (own == (r + 1)[:, None, None])) & ~st.gather(nodata)))
        c3 = cov[:3, r]
        tmpl = [render_models(psf, st, c3)] + [render_models(psf, st, np.vstack([c3, np.repeat(u, r.size, axis=1)]))
                                               for u in unit]
        A = np.stack([(t * sw).reshape(r.size, -1) for t in tmpl], axis=2)   # (n, pixels, 1 + nw)
        bvec = (st.gather(coadd) * sw).reshape(r.size, -1)
        AtA = np.matmul(A.transpose(0, 2, 1), A)
        Atb = np.matmul(A.transpose(0, 2, 1), bvec[:, :, None])[:, :, 0]
        for m in range(r.size):  # a few hundred bright resolved objects per tile: small NNLS problems
            try:
                L = np.linalg.cholesky(AtA[m] + 1e-9 * np.trace(AtA[m]) * np.eye(nw + 1))
            except np.linalg.LinAlgError:
                continue
            coef, _ = nnls(L.T, np.linalg.solve(L, Atb[m]))
            tot = coef.sum()
            if tot > 0:
                out[:, k[m]] = coef[1:] / tot
    return out


def coadd_models(coadd: np.ndarray, den: np.ndarray, psf: PsfModel, msets: list["Stamps"], cov: np.ndarray,
                 measured: np.ndarray, pairs: np.ndarray, x: np.ndarray, y: np.ndarray, shape: tuple[int, int]):
    """Neighbour models on the inverse-variance coadd: amplitudes, and each object's own model per model set."""
    n = x.size
    diag, rhs, g2 = np.zeros(n), np.zeros(n), np.zeros(n)
    models = []
    for ms in msets:
        g = render_models(psf, ms, cov[:, ms.rows])
        wm = ms.gather(den)
        gw = g * wm
        diag[ms.rows] = np.einsum("nij,nij->n", gw, g)
        rhs[ms.rows] = np.einsum("nij,nij->n", gw, ms.gather(coadd))
        g2[ms.rows] = np.einsum("nij,nij->n", g, g)
        models.append(g)
    amp = solve_amplitudes(psf, diag, rhs, g2, measured, pairs, x, y, cov)
    for g, ms in zip(models, msets):
        g *= amp[ms.rows].astype(np.float32)[:, None, None]
    return amp, models


def model_residual(coadd: np.ndarray, den: np.ndarray, own: list[np.ndarray], msets: list["Stamps"],
                   shape: tuple[int, int]) -> np.ndarray:
    """The coadd minus every object's own model (``own``, on the stamps ``msets``), zero where it has no data.

    Made once for the centroids and the Kron radii, which add each object's own model back on its stamps."""
    h, w = shape
    resid = np.zeros(h * w, np.float32)
    for g, ms in zip(own, msets):
        ms.scatter_add(resid, g)
    resid = resid.reshape(shape)
    np.subtract(coadd, resid, out=resid)
    resid *= den > 0
    return resid


def refine_centroids(resid: np.ndarray, own: list[np.ndarray], msets: list["Stamps"], which: np.ndarray,
                     x: np.ndarray, y: np.ndarray, sigma: float, shape: tuple[int, int], iterations: int) -> np.ndarray:
    """Shifts (2, n) to the windowed centroid (SExtractor's XWIN: Gaussian window of ``sigma``, iterated)
    of the objects in ``which``, on the coadd with every other object's model subtracted (``resid``:
    :func:`model_residual`, with the object's own model added back here)."""
    out = np.zeros((2, x.size))
    s2 = np.float32(-0.5 / (sigma * sigma))
    for g, ms in zip(own, msets):
        sel = which[ms.rows]
        if not sel.any():
            continue
        rows = ms.rows[sel]
        sub = Stamps.make(rows, x[rows], y[rows], ms.half, shape)
        img = sub.gather(resid) + g[sel]
        cx = np.zeros(rows.size, np.float32)
        cy = np.zeros(rows.size, np.float32)
        for _ in range(iterations):
            ex = sub.dx - cx[:, None]
            ey = sub.dy - cy[:, None]
            wgt = (np.exp(ey * ey * s2)[:, :, None] * np.exp(ex * ex * s2)[:, None, :]) * img
            s0 = wgt.sum(axis=(1, 2))
            ok = s0 > 0
            mx = np.einsum("nij,nj->n", wgt, ex) / np.where(ok, s0, 1)
            my = np.einsum("nij,ni->n", wgt, ey) / np.where(ok, s0, 1)
            cx = np.where(ok, np.clip(cx + 2 * mx, -1.5, 1.5), cx)
            cy = np.where(ok, np.clip(cy + 2 * my, -1.5, 1.5), cy)
        out[0, rows], out[1, rows] = cx, cy
    return out


def deblended_kron_radius(resid: np.ndarray, own: list[np.ndarray], msets: list["Stamps"],
                          rows: np.ndarray, x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray,
                          th: np.ndarray, rmax: float, shape: tuple[int, int],
                          shift: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """SExtractor's Kron radius (first moment of the light within ``rmax`` (a, b), in units of a, b),
    measured on the coadd minus every *other* object's model (``resid``: :func:`model_residual`, with
    the object's own model added back here), vectorised on stamps.

    ``x, y`` are the centres the models were drawn at; ``shift`` moves the ellipse's centre from there."""
    need = np.ceil(rmax * a[rows] + 1)
    halves = np.asarray(STAMP_HALVES)
    cls = np.minimum(np.searchsorted(halves, need), halves.size - 1)
    out = np.zeros(rows.size)
    for c in np.unique(cls):
        sel = cls == c
        r = rows[sel]
        st = Stamps.make(r, x[r], y[r], int(halves[c]), shape)
        img = st.gather(resid) + embed(own, msets, st)
        ct, sn = np.cos(th[r]).astype(np.float32), np.sin(th[r]).astype(np.float32)
        dx, dy = st.dx[:, None, :], st.dy[:, :, None]
        if shift is not None:
            dx = dx - shift[0][r].astype(np.float32)[:, None, None]
            dy = dy - shift[1][r].astype(np.float32)[:, None, None]
        u = (dx * ct[:, None, None] + dy * sn[:, None, None]) / a[r].astype(np.float32)[:, None, None]
        v = (-dx * sn[:, None, None] + dy * ct[:, None, None]) / b[r].astype(np.float32)[:, None, None]
        rho = np.sqrt(u * u + v * v)
        inside = rho <= rmax
        wsum = np.where(inside, img, 0).sum(axis=(1, 2))
        rsum = np.where(inside, img * rho, 0).sum(axis=(1, 2))
        out[sel] = np.where(wsum > 0, rsum / np.where(wsum > 0, wsum, 1), 0.0)
    return out


def solve_amplitudes(psf: PsfModel, diag: np.ndarray, rhs: np.ndarray, g2: np.ndarray, measured: np.ndarray,
                     pairs: np.ndarray, x: np.ndarray, y: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Model amplitudes of all measured objects at once: sparse normal equations, exact diagonal,
    analytic off-diagonal overlaps scaled by the pair's effective inverse variance."""
    n = diag.size
    amp = np.zeros(n)
    use = measured & (diag > 0)
    ui = np.flatnonzero(use)
    if ui.size == 0:
        return amp
    wbar = diag / np.maximum(g2, 1e-30)
    ii, jj = (pairs[:, 0], pairs[:, 1]) if pairs.size else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    keep = use[ii] & use[jj]
    ii, jj = ii[keep], jj[keep]
    off = model_overlaps(psf, np.c_[x[ii] - x[jj], y[ii] - y[jj]], tuple(cov[:, ii]), tuple(cov[:, jj]))
    off *= np.sqrt(wbar[ii] * wbar[jj])
    sig = off > 1e-6 * np.sqrt(diag[ii] * diag[jj])
    ii, jj, off = ii[sig], jj[sig], off[sig]
    if ii.size == 0:
        amp[ui] = rhs[ui] / diag[ui]
        return amp
    pos = np.full(n, -1)
    pos[ui] = np.arange(ui.size)
    m = sparse.coo_matrix((np.r_[diag[ui] * (1 + 1e-6), off, off],
                           (np.r_[pos[ui], pos[ii], pos[jj]], np.r_[pos[ui], pos[jj], pos[ii]])),
                          shape=(ui.size, ui.size)).tocsc()
    sol = spsolve(m, rhs[ui])
    amp[ui] = np.where(np.isfinite(sol), sol, rhs[ui] / diag[ui])
    return amp


def aperture_corrections(psf: PsfModel, radii: list[float]) -> dict[str, float]:
    """Total / aperture flux of a point source for each circular aperture, with the stage's pixel weights.

    Averaged over sub-pixel centre positions, as objects fall anywhere in a pixel.
    """
    offs = np.linspace(-0.375, 0.375, 4)
    ox, oy = (v.ravel() for v in np.meshgrid(offs, offs))
    half = int(np.ceil(max(radii))) + 2
    g = np.arange(-half, half + 1, dtype=np.float32)
    dx = (g[None, :] - ox[:, None]).astype(np.float32)
    dy = (g[None, :] - oy[:, None]).astype(np.float32)
    p = psf.value(dx[:, None, :], dy[:, :, None])
    r = np.sqrt(dx[:, None, :] ** 2 + dy[:, :, None] ** 2)
    return {f"ap{int(round(ap)):02d}": round(float(1.0 / np.einsum("nij,nij->n", circular_weights(r, ap), p).mean()), 6)
            for ap in radii}


def empty_positions(busy_map: np.ndarray, n: int, min_clear: float, seed: int = 0):
    """Up to ``n`` random pixel centres (fixed seed: reproducible) with no ``busy_map`` pixel (footprints, missing
    data) within ``min_clear`` pixels. Returns their stamps (half size ``APERTURE_HALF``, ``rows`` = 0..k-1) and
    each one's clearance: the distance to the nearest busy pixel (capped at the stamp's half size)."""
    h, w = busy_map.shape
    half = APERTURE_HALF
    none = (Stamps.make(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), half, busy_map.shape), np.zeros(0))
    if n <= 0 or h <= 2 * half + 2 or w <= 2 * half + 2:
        return none
    rng = np.random.default_rng(seed)
    nx, ny = w - 2 * half, h - 2 * half
    pick = rng.choice(nx * ny, size=min(2 * n, nx * ny), replace=False)
    cy, cx = (v.astype(np.float64) + half for v in np.divmod(pick, nx))
    st = Stamps.make(np.arange(cx.size), cx, cy, half, busy_map.shape)
    busy = st.gather(busy_map)
    clear = np.where(busy, st.radius()[0][None], np.float32(half)).min(axis=(1, 2))
    k = np.flatnonzero(clear >= min_clear)[:n]
    return Stamps.make(np.arange(k.size), cx[k], cy[k], half, busy_map.shape), clear[k]


def empty_aperture_stats(st: "Stamps", X: np.ndarray, wk: np.ndarray, weights: np.ndarray, psf: PsfModel,
                         use: np.ndarray, min_n: int = 50):
    """Fluxes at empty positions ``st`` (apertures ``weights`` (napt, S*S) and a PSF fit) on the stamps ``X`` of
    the image (neighbour models subtracted) with inverse variance ``wk`` (stamps), each aperture (the PSF fit
    last) over the positions ``use`` (n, napt + 1) allows: the median flux per unit of weight (a residual sky
    level), the variance beyond the weight map's (the square of the half-width holding 68.27 % of the fluxes
    around that level: undetected sources give the distribution a tail that a Gaussian fit to the core would
    miss), and the number of positions used; zeros for an aperture with fewer than ``min_n`` positions."""
    n = st.rows.size
    napt = weights.shape[0]
    level, extra, count = np.zeros(napt + 1), np.zeros(napt + 1), np.zeros(napt + 1, np.int64)
    if n < min_n:
        return level, extra, count
    good = wk > 0
    xs = np.where(good, X, 0).astype(np.float32)
    invw = np.zeros_like(wk)
    np.divide(np.float32(1), wk, out=invw, where=good)
    f = xs.reshape(n, -1) @ weights.T                      # (n, napt)
    v = invw.reshape(n, -1) @ (weights * weights).T
    area = weights.sum(axis=1)[None, :] * np.ones((n, 1))
    ey, ex = psf_factors(psf, st)
    K = ey.shape[1]
    ey2 = (ey[:, :, None, :] * ey[:, None, :, :]).reshape(n, K * K, -1)
    ex2 = (ex[:, :, None, :] * ex[:, None, :, :]).reshape(n, K * K, -1)
    den_p = separable_dot(ey2, wk, ex2)
    ok = den_p > 0
    den_p = np.where(ok, den_p, 1.0)
    f = np.c_[f, separable_dot(ey, wk * xs, ex) / den_p]
    v = np.c_[v, 1.0 / den_p]
    area = np.c_[area, separable_dot(ey, wk, ex) / den_p]  # last: PSF flux of a unit constant level
    for j in range(napt + 1):
        sel = use[:, j] & ok
        count[j] = int(sel.sum())
        if count[j] < min_n:
            continue
        lv = float(np.median(f[sel, j] / area[sel, j]))    # residual sky per pixel (robust)
        r = f[sel, j] - lv * area[sel, j]
        sig2 = float(np.percentile(np.abs(r - np.median(r)), 68.27)) ** 2  # the 1-sigma half-width, tails included
        level[j], extra[j] = lv, max(sig2 - float(np.median(v[sel, j])), 0.0)
    return level, extra, count


def artefact_flags(touched: np.ndarray, artefacts: Any) -> np.ndarray:
    """Object flag bits for the artefact classes (mask bits ``attrs['bits']``) an aperture touches."""
    bits = (getattr(artefacts, "attrs", {}) or {}).get("bits") or {}
    out = np.zeros(touched.shape, np.uint32)
    for name, bit in bits.items():
        key = f"artefact_{name}"
        if key in OBJECT_FLAGS.bits:
            out[(touched.astype(np.int64) & (1 << int(bit))) != 0] |= np.uint32(OBJECT_FLAGS[key])
    return out
