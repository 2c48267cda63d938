"""Survey conditions per band: PSF, sky, depth, gain, saturation.

Default: an LSST-like coadd about 1.5 mag shallower than the 10-year LSST (the 10-year m5 of
Ivezic et al. 2019 minus 1.5 mag), i.e. r ~ 26.0:

====  =========  ==========  =============  =========================
band  m5 (5 sig)  PSF FWHM    sky (AB/as^2)  saturation: point source
====  =========  ==========  =============  =========================
u     24.6       0.95"       22.96          ~17.5 mag
g     25.9       0.88"       22.26          ~17.5 mag
r     26.0       0.82"       21.20          ~17.5 mag
i     25.3       0.78"       20.48          ~17.5 mag
z     24.6       0.74"       19.60          ~17.5 mag
y     23.4       0.70"       18.61          ~17.5 mag
====  =========  ==========  =============  =========================

* m5 is the 5 sigma depth of an isolated point source measured with optimal (PSF-weighted)
  photometry in the sky-limited regime: ``F5 = 5 * sigma_pix * sqrt(NEA)`` with
  ``NEA = 1 / sum(p_i^2)`` of the pixelised, normalised PSF.
* PSF: Moffat (beta = 3) with the FWHM above; pixel scale 0.2"/px (LSST).
* Sky: LSST dark-sky brightness (SMTN-002). The effective gain (electrons per image unit) is the
  one that makes ``sky/gain + read_noise^2 = sigma_pix^2`` give m5, with read-noise variance set to
  ``read_noise_frac`` (5 %) of the sky variance -- a coadd is sky limited.
* Image units: ``MAGZERO`` (default 27.0, as in HSC coadds) is the AB magnitude of one image unit,
  so 1 unit = 10**(0.4 * (31.4 - 27.0)) = 57.5 nJy.
* SATURATE: the peak pixel (image units, sky subtracted) of a point source of ``sat_mag`` centred
  on a pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

import numpy as np

from .sed import LSST_BANDS, NJY_ZEROPOINT

PIXEL_SCALE = 0.2  # arcsec / pixel

DEFAULT_M5 = {"u": 24.6, "g": 25.9, "r": 26.0, "i": 25.3, "z": 24.6, "y": 23.4}
DEFAULT_FWHM = {"u": 0.95, "g": 0.88, "r": 0.82, "i": 0.78, "z": 0.74, "y": 0.70}
DEFAULT_SKY = {"u": 22.96, "g": 22.26, "r": 21.20, "i": 20.48, "z": 19.60, "y": 18.61}


@dataclass(frozen=True)
class SurveyConfig:
    """Observing conditions of the mock survey (all bands), see the module docstring."""

    m5: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_M5))
    fwhm: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FWHM))
    sky_mag: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SKY))
    pixel_scale: float = PIXEL_SCALE
    psf_beta: float = 3.0
    magzero: float = 27.0
    read_noise_frac: float = 0.05
    sat_mag: float = 17.5
    bkg_residual_sigma: float = 0.3  # amplitude of the residual background plane, in sky sigmas

    @staticmethod
    def with_depth(depth: float | Mapping[str, float] | None, **kw) -> "SurveyConfig":
        """``depth`` None: defaults; a number: the r-band m5 (other bands shifted alike);
        a mapping: m5 per band (missing bands keep their defaults)."""
        m5 = dict(DEFAULT_M5)
        if depth is None:
            pass
        elif isinstance(depth, Mapping):
            unknown = set(depth) - set(m5)
            if unknown:
                raise ValueError(f"depth for unknown band(s) {sorted(unknown)}")
            m5.update({k: float(v) for k, v in depth.items()})
        else:
            off = float(depth) - DEFAULT_M5["r"]
            m5 = {b: v + off for b, v in m5.items()}
        return SurveyConfig(m5=m5, **kw)

    def key(self) -> tuple:
        return (tuple(sorted(self.m5.items())), tuple(sorted(self.fwhm.items())),
                tuple(sorted(self.sky_mag.items())), self.pixel_scale, self.psf_beta, self.magzero,
                self.read_noise_frac, self.sat_mag, self.bkg_residual_sigma)

    def band(self, band: str) -> "BandSetup":
        return _band_setup(self.key(), band)

    @property
    def njy_per_unit(self) -> float:
        """nJy of one image unit."""
        return 10.0 ** (-0.4 * (self.magzero - NJY_ZEROPOINT))


@dataclass(frozen=True)
class BandSetup:
    """Derived per-band quantities (image units unless stated)."""

    band: str
    fwhm: float            # arcsec
    beta: float
    pixel_scale: float     # arcsec / px
    m5: float
    magzero: float
    njy_per_unit: float
    sky: float             # sky level per pixel (image units) that is subtracted
    sigma_sky: float       # sky + read noise per pixel (image units)
    gain: float            # electrons per image unit
    read_noise_e: float    # electrons per pixel
    nea: float             # noise-equivalent area of the pixelised PSF (pixels)
    peak_frac: float       # peak pixel / total flux of a pixel-centred point source
    saturate: float        # SATURATE (image units)

    @property
    def fwhm_pix(self) -> float:
        return self.fwhm / self.pixel_scale

    def psf(self, gsparams=None):
        """The GalSim PSF profile (arcsec units)."""
        import galsim

        return galsim.Moffat(beta=self.beta, fwhm=self.fwhm, gsparams=gsparams)

    def psf_image(self, size: int = 41, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """The pixelised PSF (sum 1) on a ``size`` x ``size`` stamp, centred on the middle pixel."""
        return _psf_image(self.fwhm, self.beta, self.pixel_scale, size, offset).copy()

    def psf_radial_k(self) -> tuple[np.ndarray, np.ndarray]:
        """Table (k in rad/pixel, PSF Fourier amplitude) of the round PSF, for the k-space renderer."""
        return _psf_k_table(self.fwhm, self.beta, self.pixel_scale)

    def header_cards(self) -> dict[str, tuple[object, str]]:
        return {
            "FILTER": (self.band, "LSST-like filter"),
            "MAGZERO": (self.magzero, "AB magnitude of one image unit"),
            "BUNIT": ("image units", "1 unit = 10**(-0.4*(MAGZERO-31.4)) nJy"),
            "PSF_FWHM": (round(self.fwhm, 6), "[arcsec] PSF FWHM (Moffat)"),
            "PSF_TYPE": ("MOFFAT", "PSF profile"),
            "PSF_BETA": (self.beta, "Moffat beta"),
            "PIXSCALE": (self.pixel_scale, "[arcsec/pixel]"),
            "SATURATE": (float(np.float32(self.saturate)), "saturation level (image units, sky subtracted)"),
            "GAIN": (float(np.float32(self.gain)), "[e-/image unit] effective gain used for the noise"),
            "RDNOISE": (float(np.float32(self.read_noise_e)), "[e-] read noise per pixel"),
            "SKYLEVEL": (float(np.float32(self.sky)), "sky level subtracted (image units)"),
            "SKYSIG": (float(np.float32(self.sigma_sky)), "sky + read noise sigma per pixel (image units)"),
            "M5": (self.m5, "5-sigma point-source depth (AB, PSF-weighted)"),
        }


@lru_cache(maxsize=64)
def _psf_image(fwhm: float, beta: float, scale: float, size: int, offset: tuple[float, float]) -> np.ndarray:
    import galsim

    im = galsim.Moffat(beta=beta, fwhm=fwhm).drawImage(nx=size, ny=size, scale=scale, offset=offset)
    a = im.array.astype(np.float64)
    a /= a.sum()
    a.setflags(write=False)
    return a


@lru_cache(maxsize=16)
def _psf_k_table(fwhm: float, beta: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    import galsim

    psf = galsim.Moffat(beta=beta, fwhm=fwhm)
    k_pix = np.linspace(0.0, np.pi * np.sqrt(2.0) * 1.01, 1200)  # up to the grid corner
    vals = np.array([psf.kValue(galsim.PositionD(k / scale, 0.0)).real for k in k_pix])
    k_pix.setflags(write=False)
    vals.setflags(write=False)
    return k_pix, vals


@lru_cache(maxsize=64)
def _band_setup(key: tuple, band: str) -> BandSetup:
    m5s, fwhms, skys, scale, beta, magzero, rn_frac, sat_mag, _ = key
    m5, fwhm, skymag = dict(m5s)[band], dict(fwhms)[band], dict(skys)[band]
    unit = 10.0 ** (-0.4 * (magzero - NJY_ZEROPOINT))  # nJy per image unit
    psf = _psf_image(fwhm, beta, scale, 151, (0.0, 0.0))
    nea = 1.0 / float(np.sum(psf**2))
    f5 = 10.0 ** (-0.4 * (m5 - magzero))           # image units
    sigma = f5 / (5.0 * np.sqrt(nea))
    sky = 10.0 ** (-0.4 * (skymag - magzero)) * scale**2
    # sigma^2 = sky/g + rn^2/g^2 with rn^2 = rn_frac * sky * g  ->  g = (1 + rn_frac) sky / sigma^2
    gain = (1.0 + rn_frac) * sky / sigma**2
    rn_e = np.sqrt(rn_frac * sky * gain)
    peak = float(psf.max())
    sat = peak * 10.0 ** (-0.4 * (sat_mag - magzero))
    return BandSetup(band=band, fwhm=fwhm, beta=beta, pixel_scale=scale, m5=m5, magzero=magzero,
                     njy_per_unit=unit, sky=sky, sigma_sky=sigma, gain=gain, read_noise_e=rn_e,
                     nea=nea, peak_frac=peak, saturate=sat)


def band_table(config: SurveyConfig | None = None, bands: str = LSST_BANDS) -> str:
    """A printable summary of the per-band setup."""
    config = config or SurveyConfig()
    rows = ["band  m5     FWHM   sky/px(units)  sigma_pix  gain(e-/u)  NEA(px)  SATURATE"]
    for b in bands:
        s = config.band(b)
        rows.append(f"{b:4s}  {s.m5:5.2f}  {s.fwhm:4.2f}\"  {s.sky:12.3f}  {s.sigma_sky:9.4f}  "
                    f"{s.gain:10.2f}  {s.nea:7.1f}  {s.saturate:9.1f}")
    return "\n".join(rows)
