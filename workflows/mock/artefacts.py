"""Instrumental and environmental artefacts for the mock survey, with exact per-pixel truth.

``inject_artefacts`` is the ``artefact_injector`` of :func:`workflows.mock.release.write_release`
(``surveypipe simulate --artefacts``): called per tile and band after the noise, it edits the
image (image units, sky subtracted) and sometimes the weight in place and returns the uint16 truth
plane, one bit per class of :data:`stages.artefacts.ARTEFACT_BITS`. Every band draws its own
artefacts (its own ``rng``); only the stars are shared.

What is injected (rates and ranges in :class:`ArtefactRates`; sigma = the pixel's noise
``1/sqrt(weight)``, sigma_sky its median over the image):

* ``cosmic_ray``: hits (0.3-2 px) and tracks (2-50 px, log-uniform) at a random angle, drawn on a
  5x supersampled grid with gamma-distributed energy loss along the path and a charge-diffusion
  Gaussian of 0.3-0.6 px, binned to pixels -- never PSF-convolved. Peak pixel 8-3000 sigma;
  every deposit spans at least two pixels above a quarter of its peak (hot pixels span one).
* ``satellite_trail``: straight lines across the tile (20 % start or end inside it), Gaussian
  cross-section of FWHM 0.8-2 x the PSF FWHM, peak 0.8-300 sigma_sky (log-uniform; the faint end
  is barely above the noise) with a slow brightness modulation along the trail.
* ``hot_column`` / ``dead_column``: columns (75 %) or lines, 1 px wide (15 %: 2 px), the full
  tile length, a segment running to an edge, or an interior segment (>= 16 px). Hot: +1.5-200
  sigma_sky with 10 % jitter. Dead: a pixel of response r (0-0.9) reads r x (sky + signal), so
  the sky-subtracted value is ``r * image - (1 - r) * sky`` with a sky level of 30-200 sigma_sky
  (log-uniform; a sky-limited exposure); in 30 % of them the weight is 0 as well (image 0).
* ``hot_pixel``: single pixels, 8-3000 x their sigma, 20-300 per megapixel.
* ``saturation``: every pixel already clipped at SATURATE, plus bleed trails: for each
  saturated core the charge above SATURATE of the unclipped Moffat star (peak from the star
  table's noiseless ``peak``) times a bleed factor 2-6 runs up and down its columns (the
  readout direction), filling pixels to SATURATE; the last pixel takes the remainder.
* ``diffraction_spike``: in 75 % of the band images (the others have none, so that a model must
  see a spike, not guess it from a bright star), four arms (two lines) per star at one orientation per band image,
  surface brightness ``s0 * peak * alpha^2 / (r^2 + alpha^2)`` (s0 = 0.0025-0.025 log-uniform, alpha
  the Moffat core radius) with a Gaussian cross-section of the PSF's sigma. The four arms carry
  about 4.3 s0 of the star's flux, 1-10 % (a spider's vanes diffract about the 1-2 % of the pupil
  they cover; the upper half of the range keeps brighter optics inside what the model has seen);
  the spider takes that light out of the core, so the same flux is taken out of the star's
  unsaturated pixels: an unsaturated star's total stays its truth flux (a saturated one keeps the
  part its clipped core cannot give up).

Cosmic rays and hot pixels are scaled (not clipped) to stay below 0.9 SATURATE; other additive
artefacts are capped at 0.95 SATURATE, so no artefact saturates by itself.

Truth (exact, from the injected signal itself): a pixel carries an additive class's bit when that
artefact added at least ``min(TRUTH_FRAC * its own peak, TRUTH_NSIGMA * sigma)`` to it -- every
pixel changed by a noise sigma or more, and for faint artefacts the core of their profile.
Spikes also need to exceed ``SPIKE_VS_STAR`` (half) of the star's own light at that pixel (near the
core the star dominates: that part is the star, not a spike, and no model could tell). Columns
mark every pixel of the segment. Pixels that end saturated carry only ``saturation`` (their
additive contributions were clipped away); pixels of dead columns carry only ``dead_column``.
Additive artefacts are capped at 0.95 SATURATE so they never saturate themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stages.artefacts import ARTEFACT_BITS

INJECTOR_VERSION = 6  # bump when what is injected changes (cached training sets are then re-simulated)
TRUTH_FRAC = 0.25
TRUTH_NSIGMA = 1.0
SPIKE_VS_STAR = 0.5
MOFFAT_BETA = 3.0
SS = 5  # supersampling of cosmic-ray deposits

B = {name: np.uint16(ARTEFACT_BITS[name]) for name in ARTEFACT_BITS.bits}


@dataclass(frozen=True)
class ArtefactRates:
    """How many artefacts of each class, and how strong (ranges are drawn per band image/instance)."""

    cosmic_rays_per_mpix: tuple[float, float] = (50.0, 400.0)   # log-uniform per band image
    cr_hit_fraction: float = 0.5
    cr_peak_snr: tuple[float, float] = (8.0, 3000.0)
    trails_per_kpix: float = 1.0          # Poisson mean per 1000 px of tile side
    trail_peak_snr: tuple[float, float] = (0.8, 300.0)
    trail_width_psf: tuple[float, float] = (0.8, 2.0)
    hot_columns_per_kpix: float = 1.0     # Poisson mean per 1000 columns
    hot_column_snr: tuple[float, float] = (1.5, 200.0)
    dead_columns_per_kpix: float = 0.8
    dead_weight_zero: float = 0.3
    dead_response: tuple[float, float] = (0.0, 0.9)
    dead_sky_snr: tuple[float, float] = (30.0, 200.0)   # sky level per pixel / sigma_sky (sky-limited)
    hot_pixels_per_mpix: tuple[float, float] = (20.0, 300.0)
    hot_pixel_snr: tuple[float, float] = (8.0, 3000.0)
    bleed_factor: tuple[float, float] = (2.0, 6.0)
    spike_strength: tuple[float, float] = (0.0025, 0.025)
    spike_probability: float = 0.75       # per band image (25 %: a spider-free optic, no spikes at all)
    spikes: bool = True

    def scaled(self, factor: float, hot_pixel_factor: float | None = None) -> "ArtefactRates":
        """The same artefacts, ``factor`` times as many (training sets use a denser mix);
        hot pixels ``hot_pixel_factor`` times as many (default: ``factor``)."""
        hp = factor if hot_pixel_factor is None else hot_pixel_factor
        return replace(self, cosmic_rays_per_mpix=tuple(factor * v for v in self.cosmic_rays_per_mpix),
                       trails_per_kpix=factor * self.trails_per_kpix, hot_columns_per_kpix=factor * self.hot_columns_per_kpix,
                       dead_columns_per_kpix=factor * self.dead_columns_per_kpix,
                       hot_pixels_per_mpix=tuple(hp * v for v in self.hot_pixels_per_mpix))


DEFAULT_RATES = ArtefactRates()
CLASSES_ALL = tuple(ARTEFACT_BITS.bits)


def _logu(rng: np.random.Generator, lo_hi: tuple[float, float], size: Any = None) -> Any:
    lo, hi = lo_hi
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


def moffat_alpha(fwhm_pix: float, beta: float = MOFFAT_BETA) -> float:
    return fwhm_pix / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


@dataclass
class _Ctx:
    image: np.ndarray
    weight: np.ndarray
    truth: np.ndarray
    sigma: np.ndarray
    sigma_sky: float
    saturate: float
    fwhm: float
    rng: np.random.Generator
    added: dict[str, int] = field(default_factory=dict)

    def add(self, cls: str, y0: int, x0: int, contrib: np.ndarray, peak: float | np.ndarray,
            keep: np.ndarray | None = None) -> float:
        """Add ``contrib`` at (y0, x0) (clipped to the image), capped below saturation; set truth bits
        where it added ``min(TRUTH_FRAC * peak, TRUTH_NSIGMA * sigma)`` or more (and ``keep`` is True).
        Returns the flux actually added."""
        ny, nx = self.image.shape
        h, w = contrib.shape
        ya, yb, xa, xb = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
        if ya >= yb or xa >= xb:
            return 0.0
        c = contrib[ya - y0:yb - y0, xa - x0:xb - x0]
        if np.ndim(peak):
            peak = np.asarray(peak)[ya - y0:yb - y0, xa - x0:xb - x0]
        img = self.image[ya:yb, xa:xb]
        room = np.maximum(np.float32(0.95 * self.saturate) - img, 0.0)
        c = np.minimum(c, room).astype(np.float32)
        img += c
        thr = np.minimum(TRUTH_FRAC * np.asarray(peak, np.float32), TRUTH_NSIGMA * self.sigma[ya:yb, xa:xb])
        hit = (c >= thr) & (c > 0)
        if keep is not None:
            hit &= keep[ya - y0:yb - y0, xa - x0:xb - x0]
        self.truth[ya:yb, xa:xb][hit] |= B[cls]
        self.added[cls] = self.added.get(cls, 0) + 1
        return float(c.sum(dtype=np.float64))


# ------------------------------------------------------------------ cosmic rays and hot pixels
def _cr_stamp(rng: np.random.Generator, length: float, angle: float, diffusion: float) -> tuple[np.ndarray, float, float]:
    """Deposit (sum 1) of one track on a pixel stamp; returns (stamp, x offset, y offset) of its corner."""
    from scipy.ndimage import gaussian_filter

    half = int(np.ceil(length / 2 + 4 * diffusion + 2))
    n = 2 * half + 1
    cx, cy = rng.uniform(-0.5, 0.5, 2)
    npts = max(int(np.ceil(length * SS * 2)), 1)
    t = (np.arange(npts) + 0.5) / npts - 0.5
    xs = half + cx + t * length * np.cos(angle)
    ys = half + cy + t * length * np.sin(angle)
    e = rng.gamma(4.0, 1.0, npts)
    g = np.zeros((n * SS, n * SS))
    ix = np.clip(((xs + 0.5) * SS).astype(int), 0, n * SS - 1)
    iy = np.clip(((ys + 0.5) * SS).astype(int), 0, n * SS - 1)
    np.add.at(g, (iy, ix), e)
    g = gaussian_filter(g, diffusion * SS, mode="constant", truncate=4.0)
    st = g.reshape(n, SS, n, SS).sum(axis=(1, 3))
    st /= st.sum()
    return st, cx, cy


def add_cosmic_rays(ctx: _Ctx, rates: ArtefactRates, n: int | None = None) -> None:
    ny, nx = ctx.image.shape
    rng = ctx.rng
    if n is None:
        n = rng.poisson(_logu(rng, rates.cosmic_rays_per_mpix) * ny * nx / 1e6)
    for _ in range(int(n)):
        hit = rng.random() < rates.cr_hit_fraction
        for _try in range(8):
            length = rng.uniform(0.3, 2.0) if hit else float(_logu(rng, (2.0, 50.0)))
            st, _, _ = _cr_stamp(rng, length, rng.uniform(0, np.pi), rng.uniform(0.3, 0.6))
            if np.count_nonzero(st >= TRUTH_FRAC * st.max()) >= 2:
                break
        h = st.shape[0] // 2
        yc, xc = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        py, px = np.unravel_index(np.argmax(st), st.shape)
        sy, sx = min(max(yc - h + py, 0), ny - 1), min(max(xc - h + px, 0), nx - 1)
        amp = float(_logu(rng, rates.cr_peak_snr)) * float(ctx.sigma[sy, sx])
        amp = min(amp, 0.9 * (ctx.saturate - float(ctx.image[sy, sx])))  # never saturates: scale, do not clip
        if amp <= 0:
            continue
        contrib = (st * (amp / st.max())).astype(np.float32)
        ctx.add("cosmic_ray", yc - h, xc - h, contrib, amp)


def add_hot_pixels(ctx: _Ctx, rates: ArtefactRates, n: int | None = None) -> None:
    ny, nx = ctx.image.shape
    rng = ctx.rng
    if n is None:
        n = rng.poisson(_logu(rng, rates.hot_pixels_per_mpix) * ny * nx / 1e6)
    for _ in range(int(n)):
        y, x = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        amp = float(_logu(rng, rates.hot_pixel_snr)) * float(ctx.sigma[y, x])
        amp = min(amp, 0.9 * (ctx.saturate - float(ctx.image[y, x])))
        if amp <= 0:
            continue
        ctx.add("hot_pixel", y, x, np.array([[amp]], np.float32), amp)


# ------------------------------------------------------------------ trails
def add_trails(ctx: _Ctx, rates: ArtefactRates, n: int | None = None, peak_snr: float | None = None) -> None:
    ny, nx = ctx.image.shape
    rng = ctx.rng
    if n is None:
        n = rng.poisson(rates.trails_per_kpix * max(ny, nx) / 1000.0)
    for _ in range(int(n)):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        th = rng.uniform(0, np.pi)
        c, s = np.cos(th), np.sin(th)
        sig = ctx.fwhm * rng.uniform(*rates.trail_width_psf) / 2.3548
        amp = (peak_snr if peak_snr is not None else float(_logu(rng, rates.trail_peak_snr))) * ctx.sigma_sky
        mod_a, mod_p, mod_ph = rng.uniform(0, 0.3), rng.uniform(50, 500), rng.uniform(0, 2 * np.pi)
        diag = float(np.hypot(nx, ny))
        s_lo, s_hi = -diag, diag
        if rng.random() < 0.2:  # starts or ends inside the tile
            if rng.random() < 0.5:
                s_lo = rng.uniform(-0.5 * min(nx, ny), 0.3 * min(nx, ny))
            else:
                s_hi = rng.uniform(-0.3 * min(nx, ny), 0.5 * min(nx, ny))
        half = 5.0 * sig
        xs = np.arange(nx, dtype=np.float32) - np.float32(x0)
        for ya in range(0, ny, 256):
            yb = min(ya + 256, ny)
            yy = (np.arange(ya, yb, dtype=np.float32) - np.float32(y0))[:, None]
            d = -xs[None, :] * np.float32(s) + yy * np.float32(c)          # perpendicular distance
            near = np.abs(d) < half
            if not near.any():
                continue
            along = xs[None, :] * np.float32(c) + yy * np.float32(s)
            prof = np.exp(-0.5 * (d / sig) ** 2) * (along >= s_lo) * (along <= s_hi)
            peak = amp * (1.0 + mod_a * np.sin(2 * np.pi * along / mod_p + mod_ph))
            contrib = np.where(near, prof * peak, 0.0).astype(np.float32)
            ctx.add("satellite_trail", ya, 0, contrib, peak.astype(np.float32))


# ------------------------------------------------------------------ columns and lines
def _segment(rng: np.random.Generator, length: int) -> tuple[int, int]:
    u = rng.random()
    if u < 0.5 or length < 32:
        return 0, length
    if u < 0.8:
        cut = int(rng.integers(16, length - 16))
        return (cut, length) if rng.random() < 0.5 else (0, cut)
    a = int(rng.integers(0, length - 16))
    b = int(rng.integers(a + 16, length + 1))
    return a, b


def _column_geometry(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[tuple[slice, slice], bool]:
    ny, nx = shape
    vertical = rng.random() < 0.75
    width = 2 if rng.random() < 0.15 else 1
    if vertical:
        x = int(rng.integers(0, nx - width + 1))
        a, b = _segment(rng, ny)
        return (slice(a, b), slice(x, x + width)), vertical
    y = int(rng.integers(0, ny - width + 1))
    a, b = _segment(rng, nx)
    return (slice(y, y + width), slice(a, b)), vertical


def add_hot_columns(ctx: _Ctx, rates: ArtefactRates, n: int | None = None, snr: float | None = None) -> None:
    rng = ctx.rng
    if n is None:
        n = rng.poisson(rates.hot_columns_per_kpix * max(ctx.image.shape) / 1000.0)
    for _ in range(int(n)):
        sl, _ = _column_geometry(rng, ctx.image.shape)
        level = (snr if snr is not None else float(_logu(rng, rates.hot_column_snr))) * ctx.sigma_sky
        shp = ctx.image[sl].shape
        contrib = (level * (1.0 + 0.1 * rng.standard_normal(shp))).clip(0.5 * level).astype(np.float32)
        ctx.add("hot_column", sl[0].start, sl[1].start, contrib, np.float32(0.0))  # every pixel: threshold 0


def add_dead_columns(ctx: _Ctx, rates: ArtefactRates, n: int | None = None) -> list[tuple[slice, slice]]:
    rng = ctx.rng
    if n is None:
        n = rng.poisson(rates.dead_columns_per_kpix * max(ctx.image.shape) / 1000.0)
    out = []
    for _ in range(int(n)):
        sl, _ = _column_geometry(rng, ctx.image.shape)
        if rng.random() < rates.dead_weight_zero:
            ctx.image[sl] = 0.0
            ctx.weight[sl] = 0.0
        else:  # a pixel of response r reads r (sky + signal): sky-subtracted, r * image - (1 - r) * sky
            r = rng.uniform(*rates.dead_response)
            sky = float(_logu(rng, rates.dead_sky_snr)) * ctx.sigma_sky
            ctx.image[sl] = (r * ctx.image[sl] - (1.0 - r) * sky).astype(np.float32)
        ctx.truth[sl] = B["dead_column"]
        ctx.added["dead_column"] = ctx.added.get("dead_column", 0) + 1
        out.append(sl)
    return out


# ------------------------------------------------------------------ bright stars: spikes and bleeds
def _star_peaks(stars: Any, image: np.ndarray, saturate: float, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, unclipped noiseless peak) of the stars; the peak from the table, else from the image."""
    if stars is None or len(stars) == 0:
        z = np.zeros(0)
        return z, z, z
    x = np.asarray(stars["x"], float)
    y = np.asarray(stars["y"], float)
    names = stars.colnames if hasattr(stars, "colnames") else list(stars.dtype.names)
    if "peak" in names:
        peak = np.asarray(stars["peak"], float)
    else:  # estimate: image maximum, or the Moffat peak that saturates the clipped area
        ny, nx = image.shape
        peak = np.zeros(len(x))
        for k, (xx, yy) in enumerate(zip(x, y)):
            ix, iy = int(round(xx)), int(round(yy))
            cut = image[max(iy - 6, 0):iy + 7, max(ix - 6, 0):ix + 7]
            if cut.size == 0:
                continue
            nsat = int(np.count_nonzero(cut >= saturate * (1 - 1e-6)))
            peak[k] = saturate * (1 + nsat / (np.pi * alpha**2)) ** MOFFAT_BETA if nsat else float(cut.max())
    return x, y, peak


def add_spikes(ctx: _Ctx, rates: ArtefactRates, xs: np.ndarray, ys: np.ndarray, peaks: np.ndarray,
               theta: float | None = None, strength: float | None = None) -> None:
    rng = ctx.rng
    ny, nx = ctx.image.shape
    theta = rng.uniform(0, np.pi / 2) if theta is None else theta
    s0 = float(_logu(rng, rates.spike_strength)) if strength is None else strength
    if strength is None and rng.random() >= rates.spike_probability:
        return
    alpha = moffat_alpha(ctx.fwhm)
    sig = ctx.fwhm / 2.3548
    for xc, yc, pk in zip(xs, ys, peaks):
        amp = s0 * pk
        if amp < 2.0 * ctx.sigma_sky:
            continue
        R = min(alpha * np.sqrt(amp / (0.5 * ctx.sigma_sky)), 1.5 * max(nx, ny))
        xa, xb = int(max(np.floor(xc - R), 0)), int(min(np.ceil(xc + R) + 1, nx))
        ya, yb = int(max(np.floor(yc - R), 0)), int(min(np.ceil(yc + R) + 1, ny))
        if xa >= xb or ya >= yb:
            continue
        dx = (np.arange(xa, xb) - xc)[None, :]
        dy = (np.arange(ya, yb) - yc)[:, None]
        r2 = dx * dx + dy * dy
        star = pk * (1.0 + r2 / alpha**2) ** (-MOFFAT_BETA)
        tot = np.zeros(r2.shape)
        for phi in (theta, theta + np.pi / 2):
            u = dx * np.cos(phi) + dy * np.sin(phi)
            v = -dx * np.sin(phi) + dy * np.cos(phi)
            tot += amp * alpha**2 / (u * u + alpha**2) * np.exp(-0.5 * (v / sig) ** 2)
        tot *= r2 <= R * R
        contrib = tot.astype(np.float32)
        # visible part only: above a noise sigma (the Ctx rule) and above half the star's own light
        added = ctx.add("diffraction_spike", ya, xa, contrib, np.float32(np.inf), keep=tot >= SPIKE_VS_STAR * star)
        _take_from_star(ctx, ya, xa, star, added / (pk * np.pi * alpha**2 / (MOFFAT_BETA - 1.0)))


def _take_from_star(ctx: _Ctx, ya: int, xa: int, star: np.ndarray, frac: float) -> None:
    """Dim the star's profile by ``frac`` (the light its spikes carry), where it is not saturated:
    a spider diffracts light out of the core, it does not add any."""
    img = ctx.image[ya:ya + star.shape[0], xa:xa + star.shape[1]]
    unsat = img < np.float32(ctx.saturate) * np.float32(1 - 1e-6)
    img[unsat] -= (frac * star[unsat]).astype(np.float32)


def add_bleeds(ctx: _Ctx, rates: ArtefactRates, xs: np.ndarray, ys: np.ndarray, peaks: np.ndarray,
               factor: float | None = None) -> np.ndarray:
    """Bleed trails of every saturated core; returns the boolean map of bleed pixels."""
    from scipy import ndimage

    rng = ctx.rng
    ny, nx = ctx.image.shape
    sat = ctx.saturate
    bleed = np.zeros((ny, nx), bool)
    core = ctx.image >= np.float32(sat) * np.float32(1 - 1e-6)
    if not core.any():
        return bleed
    kappa = float(rng.uniform(*rates.bleed_factor)) if factor is None else factor
    alpha = moffat_alpha(ctx.fwhm)
    lab, nlab = ndimage.label(core)
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[sl] == k
        cy, cx = ndimage.center_of_mass(comp)
        cy += sl[0].start
        cx += sl[1].start
        i0 = sat * (1 + comp.sum() / (np.pi * alpha**2)) ** MOFFAT_BETA  # from the clipped area
        if len(xs):
            d = np.hypot(xs - cx, ys - cy)
            j = int(np.argmin(d))
            if d[j] < 3.0 and peaks[j] > sat:
                i0, cx, cy = float(peaks[j]), float(xs[j]), float(ys[j])
        up_frac = rng.uniform(0.3, 0.7)
        for x in range(sl[1].start, sl[1].stop):
            rows = np.flatnonzero(comp[:, x - sl[1].start]) + sl[0].start
            if rows.size == 0:
                continue
            yy = np.arange(ny)
            prof = i0 * (1 + ((x - cx) ** 2 + (yy - cy) ** 2) / alpha**2) ** (-MOFFAT_BETA)
            excess = float(np.sum(np.maximum(prof - sat, 0.0))) / sat * kappa
            if excess < 0.5:
                continue
            for direction, share in ((1, up_frac), (-1, 1 - up_frac)):
                charge = excess * share
                y = rows.max() + 1 if direction > 0 else rows.min() - 1
                while charge > 0 and 0 <= y < ny:
                    fill = min(charge, 1.0)
                    if ctx.image[y, x] >= sat * (1 - 1e-6):
                        y += direction  # already full: charge flows on
                        continue
                    new = sat if fill >= 1.0 else min(ctx.image[y, x] + fill * sat, sat)  # full well
                    added = new - ctx.image[y, x]
                    ctx.image[y, x] = np.float32(new)
                    if added >= min(TRUTH_FRAC * sat, TRUTH_NSIGMA * ctx.sigma[y, x]):
                        bleed[y, x] = True
                    charge -= fill
                    y += direction
    return bleed


# ------------------------------------------------------------------ the injector
def inject_artefacts(image: np.ndarray, weight: np.ndarray, *, band: str, rng: np.random.Generator, stars: Any = None,
                     saturate: float, psf_fwhm_pix: float, rates: ArtefactRates | None = None,
                     classes: tuple[str, ...] | None = None) -> np.ndarray:
    """Inject artefacts into ``image``/``weight`` (in place); return the uint16 truth bit plane.

    ``classes`` limits the injection to those classes (all by default; ``saturation`` then means
    bleed trails plus the pixels already clipped, ``diffraction_spike`` the spikes of the stars).
    """
    rates = rates or DEFAULT_RATES
    classes = CLASSES_ALL if classes is None else tuple(classes)
    unknown = set(classes) - set(CLASSES_ALL)
    if unknown:
        raise ValueError(f"unknown artefact classes {sorted(unknown)}")
    if image.shape != weight.shape or image.ndim != 2:
        raise ValueError("image and weight must be 2-D arrays of one shape")
    good = weight > 0
    sigma = np.empty(image.shape, np.float32)
    sigma_sky = float(np.median(1.0 / np.sqrt(weight[good]))) if good.any() else float(np.std(image))
    sigma[good] = 1.0 / np.sqrt(weight[good])
    sigma[~good] = sigma_sky
    truth = np.zeros(image.shape, np.uint16)
    # the streams of each class are independent of which other classes are injected
    streams = {c: np.random.Generator(np.random.PCG64(rng.integers(0, 2**63))) for c in CLASSES_ALL}
    ctx = _Ctx(image, weight, truth, sigma, sigma_sky, float(saturate), float(psf_fwhm_pix), rng)
    alpha = moffat_alpha(psf_fwhm_pix)
    xs, ys, peaks = _star_peaks(stars, image, saturate, alpha)
    pre_sat = image >= np.float32(saturate) * np.float32(1 - 1e-6)

    def run(cls: str, fn, *args) -> Any:
        if cls in classes:
            ctx.rng = streams[cls]
            return fn(ctx, rates, *args)
        return None

    if rates.spikes:
        run("diffraction_spike", add_spikes, xs, ys, peaks)
    run("satellite_trail", add_trails)
    run("hot_column", add_hot_columns)
    run("cosmic_ray", add_cosmic_rays)
    run("hot_pixel", add_hot_pixels)
    bleed = run("saturation", add_bleeds, xs, ys, peaks)
    saturated = pre_sat | (image >= np.float32(saturate) * np.float32(1 - 1e-6))
    if bleed is not None:
        saturated |= bleed
    if "saturation" in classes:
        truth[saturated] = B["saturation"]
    else:
        truth[saturated] = 0
    run("dead_column", add_dead_columns)
    return truth


def truth_summary(truth: np.ndarray) -> dict[str, int]:
    """Pixels per class of a truth plane."""
    return {name: int(np.count_nonzero(truth & ARTEFACT_BITS[name])) for name in ARTEFACT_BITS.bits}
