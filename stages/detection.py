"""Source detection on a multi-band detection image, with sep's multi-threshold deblending.

The detection image is the inverse-variance-weighted sum of the background-subtracted bands,
divided by its own noise, so it is a per-pixel S/N image: it is optimal for sources of flat
spectrum, keeps unit noise everywhere (masked pixels of one band simply drop that band), and a
threshold in sigma means the same thing across the tile.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import sep
from pydantic import Field

from pipeline.ids import object_ids
from pipeline.stage import ImageSet, Stage, StageConfig
from pipeline.table import Table

from .flags import OBJECT_FLAGS


class DetectionConfig(StageConfig):
    thresh: float = Field(1.5, gt=0, description="detection threshold in sigma of the filtered S/N image")
    minarea: int = Field(5, ge=1, description="minimum connected pixels above threshold")
    deblend_nthresh: int = Field(32, ge=1, le=256, description="number of deblending thresholds")
    deblend_cont: float = Field(0.005, ge=0, le=1, description="minimum contrast for a deblended child")
    filter_fwhm_pix: float = Field(4.0, gt=0, description="FWHM (pixels) of the Gaussian matched filter")
    bands: list[str] | None = Field(None, description="bands of the detection image (None = all)")


def gaussian_kernel(fwhm_pix: float) -> np.ndarray:
    sigma = fwhm_pix / 2.3548
    r = int(np.ceil(2.5 * sigma))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    k = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


def detection_image(sky: Any, bands: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel S/N of the inverse-variance-weighted coadd, and the pixels no band covers."""
    num = np.zeros_like(next(iter(sky.image.values())), dtype=np.float32)
    den = np.zeros_like(num)
    for b in bands:
        ivar = np.where(sky.bad[b], 0.0, 1.0 / np.square(sky.sigma[b])).astype(np.float32)
        num += sky.image[b] * ivar
        den += ivar
    nodata = den <= 0
    snr = np.where(nodata, 0.0, num / np.sqrt(np.maximum(den, 1e-30))).astype(np.float32)
    return snr, nodata


class Detection(Stage):
    """Detect and deblend sources; write the object list and the segmentation map."""

    name = "detection"
    version = "1"
    requires = ("exposure", "sky")
    provides = {
        "detections": "detected objects: position, shape, parent/child records",
        "segmentation": "segmentation map (objectId index + 1 per pixel, 0 = sky)",
    }
    Config = DetectionConfig

    def run(self, inputs: Mapping[str, Any], config: DetectionConfig) -> dict[str, Any]:
        tile, sky = inputs["exposure"], inputs["sky"]
        bands = [b for b in (config.bands or tile.bands) if b in tile.bands]
        snr, nodata = detection_image(sky, bands)
        kernel = gaussian_kernel(config.filter_fwhm_pix)
        flags_extra = 0
        for attempt in range(3):
            sep.set_extract_pixstack(300000 * 4 ** attempt)
            sep.set_sub_object_limit(1024 * 4 ** attempt)
            try:
                objs, seg = sep.extract(snr, config.thresh, err=1.0, mask=nodata, minarea=config.minarea,
                                        filter_kernel=kernel, filter_type="matched",
                                        deblend_nthresh=config.deblend_nthresh, deblend_cont=config.deblend_cont,
                                        clean=True, segmentation_map=True)
                break
            except Exception as exc:  # sep raises plain Exception for buffer overflows
                if attempt == 2 or ("overflow" not in str(exc) and "buffer" not in str(exc)):
                    raise
                flags_extra |= OBJECT_FLAGS["pixstack_overflow"]
        n = len(objs)
        t = Table()
        t.add("objectId", object_ids(tile.tile_id, n), "", "unique object id in the release", "meta.id;meta.main")
        t.add("x", objs["x"].astype(np.float64), "pix", "x centroid, 0-based pixel of the tile", "pos.cartesian.x")
        t.add("y", objs["y"].astype(np.float64), "pix", "y centroid, 0-based pixel of the tile", "pos.cartesian.y")
        t.add("a", objs["a"].astype(np.float32), "pix", "semi-major axis (second moments)")
        t.add("b", objs["b"].astype(np.float32), "pix", "semi-minor axis (second moments)")
        t.add("theta", objs["theta"].astype(np.float32), "rad", "position angle from +x towards +y")
        t.add("npix", objs["npix"].astype(np.int32), "pix", "pixels above threshold")
        t.add("detect_peakSnr", objs["peak"].astype(np.float32), "", "peak of the filtered S/N detection image")
        f = np.zeros(n, np.uint32) | np.uint32(flags_extra)
        f[(objs["flag"] & sep.OBJ_MERGED) != 0] |= OBJECT_FLAGS["blended"]
        f[(objs["flag"] & sep.OBJ_TRUNC) != 0] |= OBJECT_FLAGS["edge"]
        t.add("detect_flags", f, "", "detection flags (object_flags registry)")
        return {"detections": t, "segmentation": ImageSet({"detection": seg.astype(np.int32)}, {"value": "row index + 1"})}
