"""The true sky of the mock survey: galaxies and stars with positions, shapes, SEDs and fluxes.

The population is drawn per sky cell (``CELL`` x ``CELL`` pixels of the release's global pixel
grid) from ``SeedSequence(seed, spawn_key=(POPULATION_KEY, cx, cy))``, so every tile that covers
a sky position sees the same objects, and a cell's objects do not depend on how many tiles the
release has.

Model (i band is the reference band):

* Galaxy counts ``dN/dm = 40 * 10**(0.3 (i - 25))`` per arcmin^2 per mag from i = 18 to
  ``m5_i + 1.5`` (beyond the 5 sigma limit, so completeness falls inside the range);
  ~200 galaxies/arcmin^2 at the default depth.
* Redshift: Smail ``p(z|i) ~ z^2 exp(-(z/z0)^1.5)`` with median ``0.35 + 0.13 (i - 21)``
  (>= 0.1), capped at 3.95: fainter galaxies sit at higher z.
* Morphology fractions depend on magnitude: spheroids 35 % -> 12 % and irregulars 5 % -> 30 % from
  i = 18 to 27; 15 % of the remaining disks are edge-on.

  ===========  ===============================================  =====================
  type         light profile (GalSim)                           SED (CWW)
  ===========  ===============================================  =====================
  spheroid     de Vaucouleurs (Sersic n=4, truncated at 5 hlr)   E (E..Sbc mix <= 0.3)
  disk         exponential disk + de Vauc. bulge, B/T 0.05-0.5   disk Sbc..Scd, bulge E
  edgeon       InclinedExponential i = 72-90 deg, h/r 0.08-0.15  disk Sbc..Scd, bulge E
               + bulge B/T 0-0.2 (bulge axis ratio 0.7)
  irregular    exponential + RandomKnots (20-50 % of the light)  Scd..Im
  ===========  ===============================================  =====================

* Size: ``log10(hlr/") ~ N(0.15 - 0.11 (i - 20) - 0.25 log10(1 + z), 0.18)`` (x0.6 spheroids,
  x0.8 irregulars); bulges have 0.2-0.5 of the disk's hlr. Truth ``hlr`` is the circularised
  half-light radius sqrt(a*b) of the intrinsic i-band light (exact for bulge+disk, approximate
  for edge-on disks: face-on hlr x sqrt(q)).
* Ellipticity: ``q`` = b/a (spheroids ~N(0.72, 0.15), disks cos i with cos i in [0.45, 1],
  irregulars U(0.4, 1), edge-on the moment axis ratio sqrt(cos^2 i + 0.274 (h/r)^2 sin^2 i));
  ``beta`` position angle of the major axis in degrees, counter-clockwise from the +x pixel axis.
* Stars: ``dN/dm = 0.25 * 10**(0.15 (i - 22))`` per arcmin^2 per mag from i = 15, blackbody
  colours (Teff: half turn-off stars ~N(5800, 600) K, half K/M dwarfs log-uniform 3000-4500 K);
  plus ``min_bright_stars`` stars of i = 15.5-17 per tile region so that every tile has
  saturated stars.
* Blend groups: friends-of-friends over objects with i < m5_i + 1 linking pairs closer than
  ``blend_link`` (1.5") or whose approximate i-band isophotes (at 1 sigma_sky per pixel) overlap;
  ``blend_group`` = smallest id of the group (= own id when isolated), ``blend_size`` its size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

from .psf import SurveyConfig
from .seeds import make_rng
from .sed import LSST_BANDS, galaxy_mags, mag_to_njy, sed_weights, star_mags

TYPES: tuple[str, ...] = ("star", "spheroid", "disk", "edgeon", "irregular")
STAR, SPHEROID, DISK, EDGEON, IRREGULAR = range(5)

CELL = 512                 # pixels per population cell side
POPULATION_KEY = 1
BRIGHT_STAR_KEY = 5
HLR_EXP = 1.6783469900166605   # hlr / scale radius of an exponential
DEV_TRUNC = 5.0                # de Vaucouleurs truncation radius in units of hlr
GAL_MAG_MIN = 18.0
STAR_MAG_MIN = 15.0
GAL_DNDM_25 = 40.0         # galaxies / arcmin^2 / mag at i = 25
GAL_SLOPE = 0.3
STAR_DNDM_22 = 0.25
STAR_SLOPE = 0.15


@dataclass
class Footprint:
    """The release's global pixel grid: ``width`` x ``height`` pixels and its TAN WCS."""

    width: int
    height: int
    ra0: float = 150.0
    dec0: float = 2.0
    pixel_scale: float = 0.2

    def wcs_header(self, x0: int = 0, y0: int = 0, nx: int | None = None, ny: int | None = None) -> dict:
        """TAN WCS (CD matrix, north up, east left) of the sub-grid whose pixel (0, 0) is (x0, y0)."""
        s = self.pixel_scale / 3600.0
        return {
            "NAXIS": 2, "NAXIS1": int(nx if nx is not None else self.width),
            "NAXIS2": int(ny if ny is not None else self.height),
            "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
            "CRVAL1": float(self.ra0), "CRVAL2": float(self.dec0),
            # FITS pixels are 1-based: global 0-based pixel X sits at FITS X + 1
            "CRPIX1": float(self.width / 2.0 + 0.5 - x0), "CRPIX2": float(self.height / 2.0 + 0.5 - y0),
            "CD1_1": -s, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": s,
            "RADESYS": "ICRS", "EQUINOX": 2000.0,
        }

    def wcs(self, x0: int = 0, y0: int = 0):
        from astropy.wcs import WCS

        return WCS(self.wcs_header(x0, y0))

    @property
    def area_arcmin2(self) -> float:
        return (self.width - 1) * (self.height - 1) * (self.pixel_scale / 60.0) ** 2


class Population:
    """Column store of true objects (numpy arrays of equal length; per-band arrays are (n, 6)
    in ``LSST_BANDS`` order). Global pixel positions ``X``, ``Y``; fluxes in nJy."""

    def __init__(self, cols: dict[str, np.ndarray]):
        self.cols = cols

    def __len__(self) -> int:
        return len(self.cols["id"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def __contains__(self, name: str) -> bool:
        return name in self.cols

    def take(self, idx) -> "Population":
        return Population({k: v[idx] for k, v in self.cols.items()})

    @staticmethod
    def concat(parts: Sequence["Population"]) -> "Population":
        parts = [p for p in parts if p is not None]
        keys = parts[0].cols.keys()
        return Population({k: np.concatenate([p.cols[k] for p in parts]) for k in keys})

    def flux(self, band: str) -> np.ndarray:
        """Total true flux in nJy."""
        return self.cols["flux"][:, LSST_BANDS.index(band)]

    def mag(self, band: str) -> np.ndarray:
        from .sed import njy_to_mag

        return njy_to_mag(self.flux(band))


# ------------------------------------------------------------------ sampling helpers
def _sample_powerlaw_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes with dN/dm ~ 10**(slope m) on [lo, hi] (inverse CDF)."""
    a = slope * np.log(10.0)
    u = rng.random(n)
    return lo + np.log1p(u * np.expm1(a * (hi - lo))) / a


def _n_expected(dndm_ref: float, m_ref: float, slope: float, lo: float, hi: float, area: float) -> float:
    a = slope * np.log(10.0)
    return area * dndm_ref / a * (np.exp(a * (hi - m_ref)) - np.exp(a * (lo - m_ref)))


def median_redshift(mag_i: np.ndarray) -> np.ndarray:
    return np.maximum(0.1, 0.35 + 0.13 * (np.asarray(mag_i) - 21.0))


def sample_redshift(rng: np.random.Generator, mag_i: np.ndarray) -> np.ndarray:
    """Smail p(z|m) ~ z^2 exp(-(z/z0)^1.5); (z/z0)^1.5 ~ Gamma(2, 1), median z = 1.412 z0."""
    z0 = median_redshift(mag_i) / 1.4118
    u = rng.gamma(2.0, 1.0, size=np.shape(mag_i))
    return np.clip(z0 * u ** (2.0 / 3.0), 0.005, 3.95)


@lru_cache(maxsize=1)
def _dev_re_over_hlr() -> float:
    """Untruncated effective radius / hlr of GalSim's DeVaucouleurs(trunc=5 hlr)."""
    from scipy.optimize import brentq
    from scipy.special import gammainc

    b4 = 7.669249443605055

    def f(rho):
        return gammainc(8.0, b4 * (1.0 / rho) ** 0.25) - 0.5 * gammainc(8.0, b4 * (DEV_TRUNC / rho) ** 0.25)

    return float(brentq(f, 0.3, 3.0))


def _enclosed_dev(r: np.ndarray, hlr: np.ndarray) -> np.ndarray:
    from scipy.special import gammainc

    b4 = 7.669249443605055
    re = _dev_re_over_hlr() * hlr
    rr = np.minimum(r, DEV_TRUNC * hlr)
    return gammainc(8.0, b4 * (rr / re) ** 0.25) / gammainc(8.0, b4 * (DEV_TRUNC * hlr / re) ** 0.25)


def _enclosed_exp(r: np.ndarray, hlr: np.ndarray) -> np.ndarray:
    x = r / (hlr / HLR_EXP)
    return 1.0 - (1.0 + x) * np.exp(-x)


def combined_hlr(bt: np.ndarray, hlr_bulge: np.ndarray, hlr_disk: np.ndarray) -> np.ndarray:
    """Half-light radius of bulge (B/T = bt, truncated deV) + exponential disk (same centre/shape)."""
    lo = np.zeros_like(hlr_disk)
    hi = np.maximum(hlr_bulge, hlr_disk) * 1.0001
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        f = bt * _enclosed_dev(mid, hlr_bulge) + (1.0 - bt) * _enclosed_exp(mid, hlr_disk)
        low = f < 0.5
        lo = np.where(low, mid, lo)
        hi = np.where(low, hi, mid)
    return 0.5 * (lo + hi)


def _type_probs(mag_i: np.ndarray) -> np.ndarray:
    t = np.clip((mag_i - 18.0) / 9.0, 0.0, 1.0)
    f_sph = 0.35 - 0.23 * t
    f_irr = 0.05 + 0.25 * t
    rest = 1.0 - f_sph - f_irr
    return np.stack([f_sph, 0.85 * rest, 0.15 * rest, f_irr], axis=1)


def _galaxies(rng: np.random.Generator, n: int, mag_hi: float) -> dict[str, np.ndarray]:
    mag = _sample_powerlaw_mags(rng, n, GAL_MAG_MIN, mag_hi, GAL_SLOPE)
    z = sample_redshift(rng, mag)
    p = _type_probs(mag)
    u = rng.random(n)
    cls = (u[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    gtype = np.array([SPHEROID, DISK, EDGEON, IRREGULAR])[np.minimum(cls, 3)]
    mu = 0.15 - 0.11 * (mag - 20.0) - 0.25 * np.log10(1.0 + z)
    size = 10.0 ** rng.normal(mu, 0.18)
    size = np.where(gtype == SPHEROID, 0.6 * size, np.where(gtype == IRREGULAR, 0.8 * size, size))
    size = np.clip(size, 0.05, 8.0)
    # shapes and components (all drawn for every object so the stream is type-independent)
    r_bt_disk, r_bt_edge = rng.uniform(0.05, 0.5, n), rng.uniform(0.0, 0.2, n)
    r_bsize = rng.uniform(0.2, 0.5, n)
    r_tb_sph, r_td_disk, r_td_irr = rng.uniform(0.0, 0.3, n), rng.uniform(1.0, 2.2, n), rng.uniform(2.4, 3.0, n)
    r_q_sph = np.clip(rng.normal(0.72, 0.15, n), 0.35, 1.0)
    r_cosi = rng.uniform(0.45, 1.0, n)
    r_q_irr = rng.uniform(0.4, 1.0, n)
    r_incl = rng.uniform(72.0, 90.0, n)
    r_hr = rng.uniform(0.08, 0.15, n)
    beta = rng.uniform(0.0, 180.0, n)
    n_knots = rng.integers(10, 31, n)
    knot_frac = rng.uniform(0.2, 0.5, n)
    knot_seed = rng.integers(1, 2**31 - 1, n)

    sph, dsk, edg, irr = (gtype == t for t in (SPHEROID, DISK, EDGEON, IRREGULAR))
    bt = np.select([sph, dsk, edg], [np.ones(n), r_bt_disk, r_bt_edge], 0.0)
    t_bulge = np.where(sph, r_tb_sph, 0.0)
    t_disk = np.select([irr, sph], [r_td_irr, r_tb_sph], r_td_disk)
    hlr_disk = size
    hlr_bulge = np.where(sph, size, r_bsize * size)
    incl = np.where(edg, r_incl, 0.0)
    h_over_r = np.where(edg, r_hr, 0.0)
    q = np.select([sph, dsk, irr], [r_q_sph, r_cosi, r_q_irr], 1.0)
    ci, si = np.cos(np.radians(incl)), np.sin(np.radians(incl))
    q = np.where(edg, np.sqrt(ci**2 + 0.274 * h_over_r**2 * si**2), q)
    hlr = np.where(sph, hlr_bulge, np.where(irr, hlr_disk, combined_hlr(bt, hlr_bulge, hlr_disk)))
    hlr = np.where(edg, hlr * np.sqrt(q), hlr)

    # per-band component fluxes: bulge (E-like SED) and disk (incl. knots) with their own SEDs
    f_i = mag_to_njy(mag)
    rb = 10.0 ** (-0.4 * (galaxy_mags(sed_weights(t_bulge), z, 0.0) ))
    rd = 10.0 ** (-0.4 * (galaxy_mags(sed_weights(t_disk), z, 0.0)))
    flux_bulge = (bt * f_i)[:, None] * rb
    flux_disk = ((1.0 - bt) * f_i)[:, None] * rd
    return dict(
        type=gtype.astype(np.int8), z=z, mag_ref=mag, bulge_frac=bt, sed_bulge=t_bulge, sed_disk=t_disk,
        hlr=hlr, hlr_bulge=hlr_bulge, hlr_disk=hlr_disk, q=q, beta=beta, incl=incl, h_over_r=h_over_r,
        n_knots=np.where(irr, n_knots, 0).astype(np.int16), knot_frac=np.where(irr, knot_frac, 0.0),
        knot_seed=np.where(irr, knot_seed, 0).astype(np.int64), teff=np.zeros(n),
        flux_bulge=flux_bulge, flux_disk=flux_disk,
    )


def _stars(rng: np.random.Generator, n: int, mag_lo: float, mag_hi: float, *, bright: bool = False) -> dict[str, np.ndarray]:
    mag = rng.uniform(mag_lo, mag_hi, n) if bright else _sample_powerlaw_mags(rng, n, mag_lo, mag_hi, STAR_SLOPE)
    hot = rng.random(n) < 0.5
    teff = np.where(hot, np.clip(rng.normal(5800.0, 600.0, n), 4500.0, 7500.0), np.exp(rng.uniform(np.log(3000.0), np.log(4500.0), n)))
    flux = mag_to_njy(star_mags(teff, mag))
    zeros = np.zeros(n)
    return dict(
        type=np.full(n, STAR, np.int8), z=zeros.copy(), mag_ref=mag, bulge_frac=zeros.copy(), sed_bulge=zeros.copy(),
        sed_disk=zeros.copy(), hlr=zeros.copy(), hlr_bulge=zeros.copy(), hlr_disk=zeros.copy(), q=np.ones(n),
        beta=zeros.copy(), incl=zeros.copy(), h_over_r=zeros.copy(), n_knots=np.zeros(n, np.int16),
        knot_frac=zeros.copy(), knot_seed=np.zeros(n, np.int64), teff=teff,
        flux_bulge=np.zeros((n, len(LSST_BANDS))), flux_disk=flux,  # a star's light is its "disk" point source
    )


def _place(cols: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    cols = dict(cols)
    cols["X"], cols["Y"] = x, y
    return cols


def _cell_objects(seed: int, cx: int, cy: int, fp: Footprint, config: SurveyConfig) -> dict[str, np.ndarray] | None:
    rng, rng_pos, rng_gal, rng_star = (make_rng(seed, POPULATION_KEY, cx, cy, k) for k in range(4))
    area = (CELL * fp.pixel_scale / 60.0) ** 2
    mag_hi = config.m5["i"] + 1.5
    n_gal = rng.poisson(_n_expected(GAL_DNDM_25, 25.0, GAL_SLOPE, GAL_MAG_MIN, mag_hi, area))
    n_star = rng.poisson(_n_expected(STAR_DNDM_22, 22.0, STAR_SLOPE, STAR_MAG_MIN, mag_hi, area))
    n = n_gal + n_star
    x = cx * CELL + rng_pos.random(n) * CELL
    y = cy * CELL + rng_pos.random(n) * CELL
    g = _galaxies(rng_gal, n_gal, mag_hi)
    s = _stars(rng_star, n_star, STAR_MAG_MIN, mag_hi)
    cols = {k: np.concatenate([g[k], s[k]]) for k in g}
    cols = _place(cols, x, y)
    keep = (x < fp.width - 1) & (y < fp.height - 1)
    return {k: v[keep] for k, v in cols.items()}


def make_population(footprint: Footprint, seed: int, config: SurveyConfig | None = None, *,
                    bright_star_regions: Iterable[tuple[int, tuple[float, float, float, float]]] = (),
                    min_bright_stars: int = 1, blend_link: float = 1.5) -> Population:
    """Draw every object of the footprint (see the module docstring for the model).

    ``bright_star_regions``: ``(key, (xmin, xmax, ymin, ymax))`` global-pixel boxes (e.g. tile
    inner regions) that each receive ``min_bright_stars`` stars of i = 15.5-17, seeded by ``key``.
    """
    config = config or SurveyConfig()
    parts = []
    ncx, ncy = -(-(footprint.width - 1) // CELL), -(-(footprint.height - 1) // CELL)
    for cy in range(ncy):
        for cx in range(ncx):
            c = _cell_objects(seed, cx, cy, footprint, config)
            if c is not None and len(c["X"]):
                parts.append(c)
    for key, (x0, x1, y0, y1) in bright_star_regions:
        if min_bright_stars <= 0:
            break
        rng = make_rng(seed, BRIGHT_STAR_KEY, int(key))
        # keep clear of the region edge so the core sits well inside
        pad = min(40.0, 0.2 * (x1 - x0), 0.2 * (y1 - y0))
        x = rng.uniform(x0 + pad, x1 - pad, min_bright_stars)
        y = rng.uniform(y0 + pad, y1 - pad, min_bright_stars)
        parts.append(_place(_stars(rng, min_bright_stars, 15.5, 17.0, bright=True), x, y))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = len(cols["X"])
    cols["id"] = np.arange(1, n + 1, dtype=np.int64)
    cols["flux"] = cols["flux_bulge"] + cols["flux_disk"]
    w = footprint.wcs()
    ra, dec = w.all_pix2world(cols["X"], cols["Y"], 0)
    cols["ra"], cols["dec"] = np.asarray(ra, float), np.asarray(dec, float)
    pop = Population(cols)
    grp, size = blend_groups(pop, config, footprint.pixel_scale, link=blend_link)
    pop.cols["blend_group"], pop.cols["blend_size"] = grp, size
    return pop


def isophotal_radius(pop: Population, config: SurveyConfig) -> np.ndarray:
    """Approximate radius (arcsec) of the i-band isophote at 1 sigma_sky per pixel.

    Each object is treated as a round exponential with hlr_eff = sqrt(hlr^2 + (FWHM/2)^2)."""
    b = config.band("i")
    flux = pop.flux("i") / b.njy_per_unit
    h = np.sqrt(pop["hlr"] ** 2 + (0.5 * b.fwhm) ** 2)
    rs = h / HLR_EXP
    i0 = flux / (2 * np.pi * rs**2)
    thr = b.sigma_sky / b.pixel_scale**2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = rs * np.log(np.maximum(i0 / thr, 1.0))
    return np.nan_to_num(r)


def blend_groups(pop: Population, config: SurveyConfig, pixel_scale: float, link: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Friends-of-friends blend groups (see the module docstring)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(pop)
    ids = pop["id"]
    group = ids.copy()
    size = np.ones(n, np.int64)
    det = np.flatnonzero(pop.mag("i") < config.m5["i"] + 1.0)
    if det.size < 2:
        return group, size
    pos = np.stack([pop["X"][det], pop["Y"][det]], axis=1) * pixel_scale  # arcsec
    riso = isophotal_radius(pop.take(det), config)
    tree = cKDTree(pos)
    pairs = [tree.query_pairs(link, output_type="ndarray")]
    big = np.flatnonzero(2 * riso > link)
    for i, nb in zip(big, tree.query_ball_point(pos[big], 2 * riso[big])):
        nb = np.asarray(nb, dtype=np.int64)
        nb = nb[nb != i]
        if nb.size:
            d = np.hypot(*(pos[nb] - pos[i]).T)
            nb = nb[d < riso[i] + riso[nb]]
            pairs.append(np.stack([np.full(nb.size, i), nb], axis=1))
    pr = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    m = det.size
    adj = coo_matrix((np.ones(len(pr)), (pr[:, 0], pr[:, 1])), shape=(m, m))
    _, lab = connected_components(adj, directed=False)
    gid = ids[det]
    first = np.full(lab.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, lab, gid)
    cnt = np.bincount(lab)
    group[det] = first[lab]
    size[det] = cnt[lab]
    return group, size
