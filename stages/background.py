"""Background and noise per band (sep's mesh background), the first classical stage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import sep
from pydantic import Field

from pipeline.stage import Stage, StageConfig


@dataclass
class Sky:
    """Background-subtracted images (nJy), per-pixel sigma (nJy; inf where unusable) and bad masks."""

    image: dict[str, np.ndarray]
    sigma: dict[str, np.ndarray]
    bad: dict[str, np.ndarray]
    level: dict[str, float]


class BackgroundConfig(StageConfig):
    mesh: int = Field(64, ge=8, le=1024, description="background mesh size (pixels)")
    filter_size: int = Field(3, ge=1, le=11, description="median filter of the mesh (meshes)")


class Background(Stage):
    """Subtracts a smooth sky per band; RMS from the weight map where it exists."""

    name = "background"
    version = "1"
    requires = ("exposure",)
    provides = {"sky": "background-subtracted images (nJy) and per-pixel sigma per band"}
    transient = ("sky",)
    Config = BackgroundConfig

    def run(self, inputs: Mapping[str, Any], config: BackgroundConfig) -> dict[str, Any]:
        tile = inputs["exposure"]
        images, sigma, level = {}, {}, {}
        for band in tile.bands:
            img, bad = tile.image[band], tile.bad[band]
            bkg = sep.Background(img, mask=bad, bw=config.mesh, bh=config.mesh,
                                 fw=config.filter_size, fh=config.filter_size)
            sub = img - bkg.back()
            sub[bad] = 0.0
            w = tile.weight[band]
            sig = np.where(w > 0, 1.0 / np.sqrt(np.maximum(w, 1e-30)), np.inf).astype(np.float32)
            images[band] = sub.astype(np.float32, copy=False)
            sigma[band] = sig
            level[band] = float(bkg.globalback)
        return {"sky": Sky(images, sigma, dict(tile.bad), level)}
