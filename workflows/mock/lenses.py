"""Galaxy-galaxy strong lenses and lens-like impostors for the mock survey (lenstronomy).

The deflector is an ordinary mock galaxy (a :class:`~workflows.mock.population.Population` row,
drawn and rendered by the mock generator like every spheroid), so lenses and non-lenses differ
only by the light this module adds:

* :func:`draw_lenses` -- lens parameters for given deflectors: a singular isothermal ellipsoid
  (SIE) aligned with the deflector light (axis ratio and angle scattered around the light's) plus
  an external shear; Einstein radius uniform in ``theta_e_range`` (0.5-3" by default); a source at
  higher redshift (z_d + 0.3 ... z_d + 2.0, at most 3.5) with a star-forming SED (CWW Scd..Im, so
  bluer than the deflector), either a single elliptical Sersic or a clumpy source (an exponential
  body plus 3-8 compact Gaussian star-forming clumps with an Im SED), placed inside ~0.6 theta_E
  of the optical axis so it is multiply imaged.
* :func:`paint_lensed_source` -- the lensed source in each band: lenstronomy ray-traces a grid
  supersampled ``SUPERSAMPLE`` x per pixel through SIE + shear and evaluates the source light there;
  the supersampled image is binned to pixels (the pixel response) and convolved with the band's
  Moffat PSF (the mock survey's, sampled without the pixel). Units: image units of the band, like the
  mock renderer's noiseless model, so it is simply added before the noise.
* Impostors for hard negatives, painted the same way (same grid, PSF and binning, so a network
  cannot tell lenses from impostors by how they were drawn): :func:`paint_ring` (a knotty,
  slightly off-centre star-forming ring), :func:`paint_spiral_arms` (two logarithmic spiral arms),
  :func:`paint_tidal_tail` (a curved stellar stream from a merger). Close blends, mergers' companions
  and edge-on disks are ordinary mock galaxies placed by the caller.
* :func:`lensed_snr` -- the S/N of the lensed source alone: sqrt(sum over bands and pixels of
  model^2 / sigma_pix^2), the optimal (matched-filter) S/N of its light against the sky noise.

Angles: counter-clockwise from the +x pixel axis, as the mock's ``beta``. Coordinates: arcsec from
the deflector centre, x along pixel columns and y along pixel rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np

from .psf import BandSetup, SurveyConfig
from .sed import galaxy_mags, mag_to_njy

SUPERSAMPLE = 3
PSF_HALF_ARCSEC = 4.0   # PSF kernel half-width (the Moffat beta=3 loses 0.14 % of its light beyond)
THETA_E_RANGE = (0.5, 3.0)
SOURCE_MAG_RANGE = (22.5, 26.0)  # unlensed i-band magnitude of the source
CLUMPY_FRACTION = 0.5

#: truth columns of one lens (see :func:`draw_lenses`)
LENS_COLUMNS = ("theta_e", "q_mass", "phi_mass", "gamma", "phi_gamma", "z_d", "z_s", "src_mag_i", "src_sed",
                "src_kind", "src_re", "src_n", "src_q", "src_phi", "src_x", "src_y", "n_clumps", "clump_frac",
                "clump_seed")


@dataclass
class Lenses:
    """Parameters of ``n`` lenses (numpy columns, see :data:`LENS_COLUMNS`)."""

    cols: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.cols["theta_e"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def row(self, k: int) -> dict[str, float]:
        return {name: float(v[k]) for name, v in self.cols.items()}


def draw_lenses(rng: np.random.Generator, z_d: np.ndarray, q_light: np.ndarray, beta_light: np.ndarray, *,
                theta_e_range: tuple[float, float] = THETA_E_RANGE,
                source_mag_range: tuple[float, float] = SOURCE_MAG_RANGE,
                clumpy_fraction: float = CLUMPY_FRACTION) -> Lenses:
    """Lens and source parameters for deflectors of redshift ``z_d``, light axis ratio and angle (deg)."""
    z_d = np.asarray(z_d, float)
    n = z_d.size
    theta_e = rng.uniform(*theta_e_range, n)
    q_mass = np.clip(np.asarray(q_light, float) + rng.normal(0.0, 0.1, n), 0.4, 1.0)
    phi_mass = np.asarray(beta_light, float) + rng.normal(0.0, 10.0, n)
    gamma = np.minimum(np.abs(rng.normal(0.0, 0.04, n)), 0.15)
    phi_gamma = rng.uniform(0.0, 180.0, n)
    z_s = np.minimum(z_d + rng.uniform(0.3, 2.0, n), 3.5)
    src_mag = rng.uniform(*source_mag_range, n)
    src_sed = rng.uniform(2.2, 3.0, n)
    kind = (rng.random(n) < clumpy_fraction).astype(np.int8)
    re = np.exp(rng.uniform(np.log(0.08), np.log(0.5), n))
    n_s = np.where(kind == 1, 1.0, rng.uniform(0.7, 2.5, n))
    src_q = rng.uniform(0.4, 1.0, n)
    src_phi = rng.uniform(0.0, 180.0, n)
    r = 0.6 * theta_e * np.sqrt(rng.random(n))
    ang = rng.uniform(0.0, 2 * np.pi, n)
    n_clumps = np.where(kind == 1, rng.integers(3, 9, n), 0)
    clump_frac = np.where(kind == 1, rng.uniform(0.25, 0.6, n), 0.0)
    return Lenses(dict(theta_e=theta_e, q_mass=q_mass, phi_mass=phi_mass, gamma=gamma, phi_gamma=phi_gamma,
                       z_d=z_d, z_s=z_s, src_mag_i=src_mag, src_sed=src_sed, src_kind=kind, src_re=re, src_n=n_s,
                       src_q=src_q, src_phi=src_phi, src_x=r * np.cos(ang), src_y=r * np.sin(ang),
                       n_clumps=n_clumps.astype(np.int16), clump_frac=clump_frac,
                       clump_seed=rng.integers(1, 2**31 - 1, n)))


# ---------------------------------------------------------------- the painter
@lru_cache(maxsize=32)
def _psf_kernel(fwhm: float, beta: float, scale: float) -> np.ndarray:
    """The band's Moffat sampled at pixel centres, without the pixel (binning adds it); unit flux."""
    import galsim

    half = int(np.ceil(PSF_HALF_ARCSEC / scale))
    im = galsim.Moffat(beta=beta, fwhm=fwhm).drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=scale, method="no_pixel")
    k = im.array.astype(np.float64)  # surface brightness x pixel area: the truncated wings stay lost
    k.setflags(write=False)
    return k


def _grid(size: int, scale: float, offset: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled coordinates (arcsec) of a ``size`` x ``size`` stamp whose centre pixel
    (size//2) is ``offset`` pixels away from the deflector centre."""
    ss = SUPERSAMPLE
    c = size // 2
    sub = (np.arange(size * ss) + 0.5) / ss - 0.5 - c          # pixel units, pixel centres at integers
    x = (sub + offset[0]) * scale
    y = (sub + offset[1]) * scale
    return np.meshgrid(x, y)


def _finish(sb: np.ndarray, band: BandSetup, size: int) -> np.ndarray:
    """Supersampled surface brightness (flux / arcsec^2) -> pixel image (flux / pixel).

    Binning the supersampled grid integrates over each pixel (the pixel response); the binned image
    is then convolved with the PSF sampled at pixel centres (FWHM ~4 px, so well sampled).
    """
    from scipy.signal import fftconvolve

    ss = SUPERSAMPLE
    binned = sb.reshape(size, ss, size, ss).sum(axis=(1, 3)) * (band.pixel_scale / ss) ** 2
    return fftconvolve(binned, _psf_kernel(band.fwhm, band.beta, band.pixel_scale), mode="same")


def _band_units(bands: Sequence[str], survey: SurveyConfig) -> list[BandSetup]:
    return [survey.band(b) for b in bands]


def _source_components(lens: Mapping[str, float], bx: np.ndarray, by: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-flux surface brightness of the source body and of its clumps (together) at source-plane
    positions (bx, by); the clumps' positions, sizes and relative fluxes follow ``clump_seed``."""
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    e1, e2 = phi_q2_ellipticity(np.radians(lens["src_phi"]), lens["src_q"])
    body = {"amp": 1.0, "R_sersic": lens["src_re"], "n_sersic": lens["src_n"], "e1": e1, "e2": e2,
            "center_x": lens["src_x"], "center_y": lens["src_y"]}
    sersic = LightModel(["SERSIC_ELLIPSE"])
    body_sb = sersic.surface_brightness(bx, by, [body]) / float(sersic.total_flux([body])[0])
    n_cl = int(lens["n_clumps"])
    clumps = np.zeros_like(body_sb)
    if n_cl:
        crng = np.random.default_rng(int(lens["clump_seed"]))
        cpos = crng.normal(0.0, 0.8 * lens["src_re"], (n_cl, 2)) + [lens["src_x"], lens["src_y"]]
        csig = crng.uniform(0.04, 0.1, n_cl)
        cw = crng.dirichlet(np.ones(n_cl))
        for w, sg, (px, py) in zip(cw, csig, cpos):
            clumps += w / (2 * np.pi * sg * sg) * np.exp(-0.5 * ((bx - px) ** 2 + (by - py) ** 2) / (sg * sg))
    return body_sb, clumps


@lru_cache(maxsize=1)
def _lens_model():
    from lenstronomy.LensModel.lens_model import LensModel

    return LensModel(["SIE", "SHEAR"])


def paint_lensed_source(lens: Mapping[str, float], bands: Sequence[str], survey: SurveyConfig, size: int,
                        offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, float]:
    """Noiseless lensed source ``(len(bands), size, size)`` in image units, and its magnification.

    ``offset``: position (pixels) of the stamp's centre pixel relative to the deflector centre,
    i.e. ``(round(X) - X, round(Y) - Y)`` for a deflector at global pixel (X, Y). The body has the
    source SED (``src_sed``), the clumps (``clump_frac`` of the light) an Im SED. The magnification
    is that of the light inside the stamp.
    """
    from lenstronomy.Util.param_util import phi_q2_ellipticity, shear_polar2cartesian

    scale = survey.pixel_scale
    x, y = _grid(size, scale, offset)
    e1, e2 = phi_q2_ellipticity(np.radians(lens["phi_mass"]), lens["q_mass"])
    g1, g2 = shear_polar2cartesian(np.radians(lens["phi_gamma"]), lens["gamma"])
    kw_lens = [{"theta_E": lens["theta_e"], "e1": e1, "e2": e2, "center_x": 0.0, "center_y": 0.0},
               {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0}]
    bx, by = _lens_model().ray_shooting(x.ravel(), y.ravel(), kw_lens)
    body, clumps = (c.reshape(x.shape) for c in _source_components(lens, bx, by))
    fc = float(lens["clump_frac"])
    f_body = _band_fluxes(lens["src_sed"], lens["z_s"], lens["src_mag_i"], bands, survey) * (1.0 - fc)
    f_clump = _band_fluxes(3.0, lens["z_s"], lens["src_mag_i"], bands, survey) * fc
    sub_area = (scale / SUPERSAMPLE) ** 2
    mu = float((body.sum() * (1.0 - fc) + clumps.sum() * fc) * sub_area)
    out = np.empty((len(bands), size, size))
    for j, b in enumerate(_band_units(bands, survey)):
        out[j] = _finish(f_body[j] * body + f_clump[j] * clumps, b, size)
    return out, mu


def _band_fluxes(sed: float, z: float, mag_i: float, bands: Sequence[str], survey: SurveyConfig) -> np.ndarray:
    mags = galaxy_mags(sed, z, mag_i, "".join(bands))[0]
    return np.array([mag_to_njy(m) / b.njy_per_unit for m, b in zip(mags, _band_units(bands, survey))])


def _paint_sb(unit_sb: np.ndarray, fluxes: np.ndarray, bands: Sequence[str], survey: SurveyConfig, size: int) -> np.ndarray:
    """Scale a unit-flux supersampled surface brightness to each band's flux and finish it."""
    out = np.empty((len(bands), size, size))
    for j, b in enumerate(_band_units(bands, survey)):
        out[j] = _finish(unit_sb * fluxes[j], b, size)
    return out


def _normalised(sb: np.ndarray, scale: float) -> np.ndarray:
    tot = sb.sum() * (scale / SUPERSAMPLE) ** 2
    return sb / tot if tot > 0 else sb


def paint_ring(rng: np.random.Generator, z: float, mag_i: float, bands: Sequence[str], survey: SurveyConfig,
               size: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, dict[str, float]]:
    """A star-forming ring around the galaxy (not lensed): knotty, slightly off-centre, elliptical."""
    scale = survey.pixel_scale
    x, y = _grid(size, scale, offset)
    radius = rng.uniform(0.8, 2.6)
    width = rng.uniform(0.08, 0.25)
    q = rng.uniform(0.55, 1.0)
    phi = rng.uniform(0, np.pi)
    cx, cy = rng.normal(0.0, 0.15, 2)
    c, s = np.cos(phi), np.sin(phi)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    r = np.sqrt(u * u + (v / q) ** 2)
    ring = np.exp(-0.5 * ((r - radius) / width) ** 2)
    n_knots = int(rng.integers(4, 12))
    t = rng.uniform(0, 2 * np.pi, n_knots)
    kx, ky = radius * np.cos(t), q * radius * np.sin(t)
    knots = np.zeros_like(ring)
    for a, b, w in zip(kx * c - ky * s + cx, kx * s + ky * c + cy, rng.dirichlet(np.ones(n_knots))):
        sig = rng.uniform(0.05, 0.12)
        knots += w / (2 * np.pi * sig**2) * np.exp(-0.5 * ((x - a) ** 2 + (y - b) ** 2) / sig**2)
    kf = rng.uniform(0.2, 0.6)
    sb = (1 - kf) * _normalised(ring, scale) + kf * _normalised(knots, scale)
    sed = rng.uniform(2.0, 3.0)
    img = _paint_sb(sb, _band_fluxes(sed, z, mag_i, bands, survey), bands, survey, size)
    return img, {"radius": radius, "width": width, "q": q, "sed": sed}


def paint_spiral_arms(rng: np.random.Generator, z: float, mag_i: float, q: float, beta_deg: float,
                      hlr: float, bands: Sequence[str], survey: SurveyConfig, size: int,
                      offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, dict[str, float]]:
    """Two logarithmic spiral arms (star-forming) in the disk plane of a galaxy (axis ratio q, angle beta)."""
    scale = survey.pixel_scale
    x, y = _grid(size, scale, offset)
    phi = np.radians(beta_deg)
    c, s = np.cos(phi), np.sin(phi)
    u = x * c + y * s
    v = (-x * s + y * c) / max(q, 0.2)
    r = np.sqrt(u * u + v * v) + 1e-6
    th = np.arctan2(v, u)
    pitch = np.radians(rng.uniform(12.0, 30.0))
    h = max(hlr, 0.3) / 1.678 * rng.uniform(1.0, 1.8)
    r0 = rng.uniform(0.2, 0.5)
    sharp = rng.uniform(2.0, 5.0)
    arm = (0.5 + 0.5 * np.cos(2 * (th - np.log(r / r0) / np.tan(pitch)) + rng.uniform(0, 2 * np.pi))) ** sharp
    sb = arm * np.exp(-r / h) * (1 - np.exp(-(r / (0.8 * r0)) ** 2))
    sed = rng.uniform(2.0, 3.0)
    img = _paint_sb(_normalised(sb, scale), _band_fluxes(sed, z, mag_i, bands, survey), bands, survey, size)
    return img, {"pitch_deg": float(np.degrees(pitch)), "scale_arcsec": h, "sed": sed}


def paint_tidal_tail(rng: np.random.Generator, z: float, mag_i: float, start: tuple[float, float],
                     bands: Sequence[str], survey: SurveyConfig, size: int,
                     offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, dict[str, float]]:
    """A curved, fading stellar stream starting at ``start`` (arcsec from the stamp's deflector)."""
    scale = survey.pixel_scale
    x, y = _grid(size, scale, offset)
    curv_r = rng.uniform(1.5, 4.0)
    length = rng.uniform(0.6, 1.6)                 # radians along the circle
    a0 = rng.uniform(0, 2 * np.pi)
    sign = rng.choice([-1.0, 1.0])
    cx = start[0] - curv_r * np.cos(a0)
    cy = start[1] - curv_r * np.sin(a0)
    width = rng.uniform(0.15, 0.35)
    r = np.hypot(x - cx, y - cy)
    ang = np.mod(sign * (np.arctan2(y - cy, x - cx) - a0), 2 * np.pi)
    along = np.where(ang < length, np.exp(-ang / (0.5 * length)), 0.0)
    sb = np.exp(-0.5 * ((r - curv_r) / width) ** 2) * along
    sed = rng.uniform(0.8, 2.2)
    img = _paint_sb(_normalised(sb, scale), _band_fluxes(sed, z, mag_i, bands, survey), bands, survey, size)
    return img, {"curvature_arcsec": curv_r, "length_rad": length, "sed": sed}


def lensed_snr(model: np.ndarray, bands: Sequence[str], survey: SurveyConfig) -> float:
    """Optimal S/N of a noiseless image (B, S, S) in image units against the sky noise of each band."""
    s2 = 0.0
    for j, b in enumerate(_band_units(bands, survey)):
        s2 += float(np.sum(model[j] ** 2)) / b.sigma_sky**2
    return float(np.sqrt(s2))
