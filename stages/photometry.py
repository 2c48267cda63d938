"""Forced multi-band photometry on the detection footprints: apertures, Kron, PSF-weighted.

Every band is measured with the same apertures (centred on the detection centroid, Kron radius
from the detection image), so colours are consistent. Masked pixels are excluded from the sums
and flagged; errors come from the weight map.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import sep
from pydantic import Field

from pipeline.stage import Stage, StageConfig
from pipeline.table import Table

from .detection import detection_image
from .flags import OBJECT_FLAGS


class PhotometryConfig(StageConfig):
    apertures_pix: list[float] = Field([3.0, 6.0, 9.0, 12.0], description="circular aperture radii (pixels)")
    kron_factor: float = Field(2.5, gt=0, description="Kron aperture = factor × Kron radius")
    min_kron_radius: float = Field(3.5, gt=0, description="smallest Kron aperture, in units of the object's a and b (SExtractor: 3.5)")


class Photometry(Stage):
    """Forced photometry in every band, sky positions from the WCS, isPrimary from the inner region."""

    name = "photometry"
    version = "1"
    requires = ("exposure", "sky", "detections")
    provides = {"objects": "per-object multi-band photometry (nJy), positions and flags"}
    Config = PhotometryConfig

    def run(self, inputs: Mapping[str, Any], config: PhotometryConfig) -> dict[str, Any]:
        tile, sky, det = inputs["exposure"], inputs["sky"], inputs["detections"]
        t = Table()
        for col in ("objectId", "x", "y", "a", "b", "theta"):
            t.add(col, det[col], det.info[col].unit, det.info[col].description, det.info[col].ucd)
        n = len(det)
        x, y = det["x"], det["y"]
        a, b, th = det["a"].astype(np.float64), det["b"].astype(np.float64), det["theta"].astype(np.float64)
        ra, dec = tile.wcs().all_pix2world(x, y, 0) if n else (np.zeros(0), np.zeros(0))
        t.add("coord_ra", np.asarray(ra, np.float64), "deg", "right ascension (ICRS)", "pos.eq.ra;meta.main")
        t.add("coord_dec", np.asarray(dec, np.float64), "deg", "declination (ICRS)", "pos.eq.dec;meta.main")
        primary = tile.inner.contains(x, y) if tile.inner else np.ones(n, bool)
        t.add("detect_isPrimary", np.asarray(primary, bool), "", "inside the tile's inner region: counts once in the release")
        snr, nodata = detection_image(sky, tile.bands)
        flags = det["detect_flags"].astype(np.uint32).copy()
        if n:
            kr, kflag = sep.kron_radius(snr, x, y, a, b, th, 6.0, mask=nodata)
            kr = np.where(np.isfinite(kr) & (kr > 0), kr, config.min_kron_radius / config.kron_factor)
            kr = np.maximum(kr, config.min_kron_radius / config.kron_factor)  # SExtractor's PHOT_AUTOPARAMS
        else:
            kr = np.zeros(0)
        t.add("kronRadius", (config.kron_factor * kr * np.sqrt(a * b)).astype(np.float32) if n else np.zeros(0, np.float32),
              "pix", "Kron aperture radius (geometric mean of the axes) used in every band")
        h, w = tile.shape
        for band in tile.bands:
            img, sig, bad = sky.image[band], sky.sigma[band], sky.bad[band]
            err = np.where(bad, 0.0, sig).astype(np.float32)
            for r in config.apertures_pix:
                if n:
                    f, fe, fl = sep.sum_circle(img, x, y, r, err=err, mask=bad, subpix=5)
                else:
                    f = fe = np.zeros(0)
                    fl = np.zeros(0, np.int16)
                tag = f"ap{int(round(r)):02d}"
                t.add(f"{band}_{tag}Flux", f.astype(np.float32), "nJy", f"flux in a {r:g}-pixel-radius circular aperture, {band} band", "phot.flux")
                t.add(f"{band}_{tag}FluxErr", fe.astype(np.float32), "nJy", f"error of {band}_{tag}Flux", "stat.error;phot.flux")
                if n:
                    flags[(fl & sep.APER_TRUNC) != 0] |= OBJECT_FLAGS["aperture_truncated"]
                    flags[(fl & sep.APER_HASMASKED) != 0] |= OBJECT_FLAGS["masked_pixels"]
            if n:
                f, fe, fl = sep.sum_ellipse(img, x, y, a, b, th, config.kron_factor * kr, err=err, mask=bad, subpix=1)
            else:
                f = fe = np.zeros(0)
            t.add(f"{band}_kronFlux", f.astype(np.float32), "nJy", f"Kron flux ({config.kron_factor:g} Kron radii), {band} band", "phot.flux")
            t.add(f"{band}_kronFluxErr", fe.astype(np.float32), "nJy", f"error of {band}_kronFlux", "stat.error;phot.flux")
        edge = (x < 3) | (y < 3) | (x > w - 4) | (y > h - 4)
        flags[edge] |= OBJECT_FLAGS["edge"]
        t.add("flags", flags, "", "object flags (see stages.flags.OBJECT_FLAGS)", "meta.code")
        t.attrs["flag_bits"] = OBJECT_FLAGS.as_attrs()
        return {"objects": t}
