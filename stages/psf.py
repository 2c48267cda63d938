"""PSF models per band for the classical stages: a circular Moffat approximated by a mixture of Gaussians.

The tile headers give each band's PSF FWHM (``PSF_FWHM``, arcsec). The profile is a Moffat of that
FWHM, integrated over the pixel, with a slope ``beta`` that is either given or -- with the FWHM --
fitted to bright, isolated, unsaturated point sources of the tile (:func:`fit_moffat_bands`). A Moffat is a better
description of seeing-limited PSFs than a Gaussian because of its wings, which matter for aperture
corrections and for subtracting bright neighbours.

For speed the pixelised profile is approximated by a non-negative sum of concentric Gaussians
(fitted once per (FWHM, beta) and cached): convolving it with a Gaussian galaxy model stays
analytic, a PSF stamp at any sub-pixel position is a separable outer product, and overlaps of two
models are closed-form. The mixture is normalised to unit total flux, so a flux fitted with it is
a total flux.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class PsfModel:
    """A circular PSF in pixel units: ``sum_k amp[k] N(0, sigma[k]^2 I)`` (pixel-convolved, unit total flux)."""

    fwhm_pix: float
    beta: float
    amp: np.ndarray      # (K,) component fluxes, sum 1
    sigma: np.ndarray    # (K,) component widths (pixels)
    source: str = "header"

    @property
    def sigma_eff(self) -> float:
        """Sigma of the Gaussian with the same FWHM (the matched-filter kernel)."""
        return self.fwhm_pix / FWHM_PER_SIGMA

    @property
    def var(self) -> np.ndarray:
        return self.sigma.astype(np.float64) ** 2

    def value(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """PSF surface brightness (per pixel, unit total flux) at offsets ``dx, dy`` (pixels)."""
        r2 = np.asarray(dx, np.float32) ** 2 + np.asarray(dy, np.float32) ** 2
        out = np.zeros(r2.shape, np.float32)
        for a, s in zip(self.amp, self.sigma):
            out += np.float32(a / (2 * np.pi * s * s)) * np.exp(r2 * np.float32(-0.5 / (s * s)))
        return out

    def stamps(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """PSF stamps from 1-D offsets: ``dx`` (N, S) along x, ``dy`` (N, S) along y -> (N, S, S) [y, x]."""
        dx = np.asarray(dx, np.float32)
        dy = np.asarray(dy, np.float32)
        out = np.zeros((dx.shape[0], dy.shape[1], dx.shape[1]), np.float32)
        for a, s in zip(self.amp, self.sigma):
            ex = np.exp(dx * dx * np.float32(-0.5 / (s * s)))
            ey = np.exp(dy * dy * np.float32(-0.5 / (s * s))) * np.float32(a / (2 * np.pi * s * s))
            out += ey[:, :, None] * ex[:, None, :]
        return out

    def encircled(self, r: np.ndarray | float) -> np.ndarray:
        """Fraction of the flux inside radius ``r`` (pixels), continuous profile."""
        r2 = np.asarray(r, np.float64) ** 2
        return np.sum(self.amp[:, None] * (1 - np.exp(-r2.reshape(1, -1) / (2 * self.var[:, None]))), axis=0).reshape(np.shape(r))

    def as_attrs(self) -> dict[str, Any]:
        return {"fwhm_pix": round(float(self.fwhm_pix), 5), "beta": round(float(self.beta), 4), "source": self.source,
                "amp": [round(float(a), 6) for a in self.amp], "sigma_pix": [round(float(s), 5) for s in self.sigma]}


def moffat_pixelised(fwhm_pix: float, beta: float, half: int, *, offset: tuple[float, float] = (0.0, 0.0),
                     oversample: int = 5) -> np.ndarray:
    """A Moffat of the given FWHM integrated over square pixels, on a (2 half + 1)^2 grid, unit total flux.

    The normalisation is analytic (the flux beyond the grid is not in the stamp), so the stamp sums
    to the fraction of light that falls on it.
    """
    alpha = fwhm_pix / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    n = 2 * half + 1
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    g = np.arange(-half, half + 1, dtype=np.float64)
    xs = (g[:, None] + sub[None, :]).ravel() - offset[0]
    ys = (g[:, None] + sub[None, :]).ravel() - offset[1]
    r2 = ys[:, None] ** 2 + xs[None, :] ** 2
    prof = (beta - 1.0) / (np.pi * alpha * alpha) * (1.0 + r2 / (alpha * alpha)) ** (-beta)
    img = prof.reshape(n, oversample, n, oversample).mean(axis=(1, 3))
    return img


@lru_cache(maxsize=64)
def _unit_widths(beta: float, ncomp: int) -> tuple[float, ...]:
    """Mixture widths per unit FWHM for a Moffat slope (pixel variance removed), fitted once at FWHM 4 px."""
    from scipy.optimize import minimize, nnls

    fwhm = 4.0
    half = 32
    img = moffat_pixelised(fwhm, beta, half)
    g = np.arange(-half, half + 1, dtype=np.float64)
    r2 = (g[:, None] ** 2 + g[None, :] ** 2).ravel()
    wt = 1.0 / np.sqrt(img.ravel() + 1e-4 * img.max())
    target = img.ravel() * wt

    def resid(logsig: np.ndarray) -> float:
        sig = np.exp(logsig)
        cols = np.exp(-r2[:, None] / (2 * sig[None, :] ** 2)) / (2 * np.pi * sig[None, :] ** 2)
        return nnls(cols * wt[:, None], target, maxiter=2000)[1]

    x0 = np.log(fwhm / FWHM_PER_SIGMA * np.geomspace(0.6, 4.0, ncomp))
    opt = minimize(resid, x0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-12, "maxiter": 4000})
    sig2 = np.sort(np.exp(opt.x)) ** 2
    return tuple(float(v) for v in np.sqrt(np.maximum(sig2 - 1.0 / 12.0, 1e-4)) / fwhm)


@lru_cache(maxsize=512)
def moffat_mixture(fwhm_pix: float, beta: float, ncomp: int = 4, source: str = "header") -> PsfModel:
    """A non-negative mixture of ``ncomp`` concentric Gaussians fitted to the pixelised Moffat (cached).

    The widths scale with the FWHM (fitted once per slope, :func:`_unit_widths`, plus the pixel's
    variance 1/12); the fluxes are solved by NNLS for each FWHM, with pixels weighted by
    1/sqrt(value) so the wings, which hold a good part of the flux, count.
    """
    from scipy.optimize import nnls

    half = int(np.ceil(max(8.0 * fwhm_pix, 24.0)))
    img = moffat_pixelised(fwhm_pix, beta, half)
    g = np.arange(-half, half + 1, dtype=np.float64)
    r2 = (g[:, None] ** 2 + g[None, :] ** 2).ravel()
    wt = 1.0 / np.sqrt(img.ravel() + 1e-4 * img.max())
    # widths of the nearest slope on a 0.05 grid (cached across tiles); the fluxes are fitted at this slope
    sig = np.sqrt((np.asarray(_unit_widths(round(float(beta) * 20) / 20, ncomp)) * fwhm_pix) ** 2 + 1.0 / 12.0)
    cols = np.exp(-r2[:, None] / (2 * sig[None, :] ** 2)) / (2 * np.pi * sig[None, :] ** 2)
    amp, _ = nnls(cols * wt[:, None], img.ravel() * wt, maxiter=2000)
    amp = amp / amp.sum()  # the analytic total is 1: the flux beyond the fit grid goes with the mixture
    return PsfModel(float(fwhm_pix), float(beta), amp.astype(np.float64), sig.astype(np.float64), source)


def header_fwhm_pix(tile: Any, band: str, default_arcsec: float = 0.8) -> float:
    """PSF FWHM of ``band`` in pixels from the tile header (``PSF_FWHM`` or ``SEEING``, arcsec)."""
    hdr = tile.header.get(band, {})
    fwhm = hdr.get("PSF_FWHM", hdr.get("SEEING", default_arcsec))
    return float(fwhm) / float(tile.pixel_scale_arcsec)


def band_psfs(tile: Any, bands: list[str], beta: float | dict[str, float] = 3.0) -> dict[str, PsfModel]:
    """The header PSF of every band (Moffat of the header FWHM, slope ``beta``) as a Gaussian mixture."""
    out = {}
    for b in bands:
        be = beta[b] if isinstance(beta, dict) else beta
        out[b] = moffat_mixture(round(header_fwhm_pix(tile, b), 4), round(float(be), 3))
    return out


def moffat_stamps(fwhm_pix: float, beta: float, dx: np.ndarray, dy: np.ndarray, oversample: int = 3) -> np.ndarray:
    """Pixel-integrated Moffat values (unit total flux) at offsets ``dx`` (n, S) columns, ``dy`` (n, S) rows -> (n, S, S)."""
    alpha = fwhm_pix / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    sub = ((np.arange(oversample) + 0.5) / oversample - 0.5).astype(np.float32)
    xs = (dx[:, :, None] + sub[None, None, :]).astype(np.float32)      # (n, S, o)
    ys = (dy[:, :, None] + sub[None, None, :]).astype(np.float32)
    r2 = ys[:, :, None, :, None] ** 2 + xs[:, None, :, None, :] ** 2   # (n, S, S, o, o)
    prof = (beta - 1.0) / (np.pi * alpha * alpha) * (1.0 + r2 / np.float32(alpha * alpha)) ** np.float32(-beta)
    return prof.mean(axis=(3, 4))


BETA_GRID = (2.0, 2.5, 3.0, 3.5, 4.5, 6.0)
SCALE_GRID = (0.94, 0.97, 1.0, 1.03, 1.06)


def moffat_chi2_grid(stamps: np.ndarray, weights: np.ndarray, dx: np.ndarray, dy: np.ndarray, fwhm_pix: float,
                     betas: tuple[float, ...] = BETA_GRID, scales: tuple[float, ...] = SCALE_GRID) -> np.ndarray:
    """chi^2 of Moffat profiles (FWHM = scale x ``fwhm_pix``, slope beta) fitted to point-source stamps.

    ``stamps`` (n, S, S) background-subtracted cut-outs, ``weights`` their inverse variances (0 =
    masked), ``dx``/``dy`` (n, S) the column/row offsets from each star's centre. Each star's flux is
    solved linearly for every trial profile, so only the shape is fitted; vectorised over stars.
    Returns the (n_scales, n_betas) grid.
    """
    d = stamps.astype(np.float64)
    w = weights.astype(np.float64)
    grid = np.full((len(scales), len(betas)), np.inf)
    for i, sc in enumerate(scales):
        for j, be in enumerate(betas):
            m = moffat_stamps(fwhm_pix * sc, be, dx, dy).astype(np.float64)
            f = np.sum(m * d * w, axis=(1, 2)) / np.maximum(np.sum(m * m * w, axis=(1, 2)), 1e-300)
            grid[i, j] = float(np.sum(w * (d - f[:, None, None] * m) ** 2))
    return grid


def parabola_min(xs: np.ndarray, ys: np.ndarray) -> float:
    """Abscissa of the minimum of ``ys``, refined by a parabola through it and its neighbours."""
    k = int(np.argmin(ys))
    if 0 < k < len(xs) - 1:
        x0, x1, x2 = xs[k - 1], xs[k], xs[k + 1]
        y0, y1, y2 = ys[k - 1], ys[k], ys[k + 1]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        A = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        B = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
        if A > 0:
            return float(np.clip(-B / (2 * A), x0, x2))
    return float(xs[k])


def fit_moffat_bands(grids: dict[str, np.ndarray], fwhm_pix: dict[str, float], betas: tuple[float, ...] = BETA_GRID,
                     scales: tuple[float, ...] = SCALE_GRID) -> tuple[dict[str, float], float]:
    """One Moffat slope for all bands (the atmosphere's; the bands' chi^2 summed) and a FWHM per band.

    ``grids``: per band, :func:`moffat_chi2_grid`. Returns ({band: fwhm_pix}, beta).
    """
    b_arr, s_arr = np.asarray(betas), np.asarray(scales)
    total = sum(g.min(axis=0) for g in grids.values())     # profile over each band's FWHM
    beta = parabola_min(b_arr, total)
    j = int(np.argmin(np.abs(b_arr - beta)))
    fwhm = {b: fwhm_pix[b] * parabola_min(s_arr, g[:, j]) for b, g in grids.items()}
    return fwhm, beta
