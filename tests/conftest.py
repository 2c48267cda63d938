"""Shared fixtures: a tiny hand-made FITS release with known sources (no GalSim, fast)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import write_manifest

PIXSCALE = 0.2 / 3600.0


def wcs_header(crval=(150.0, 2.0), crpix=(64.5, 64.5)) -> dict:
    return {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": crval[0], "CRVAL2": crval[1],
            "CRPIX1": crpix[0], "CRPIX2": crpix[1], "CD1_1": -PIXSCALE, "CD1_2": 0.0,
            "CD2_1": 0.0, "CD2_2": PIXSCALE, "CUNIT1": "deg", "CUNIT2": "deg"}


def gaussian_sources(size: int, xs, ys, fluxes, sigma_pix: float = 1.5) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    for x, y, f in zip(xs, ys, fluxes):
        img += f / (2 * np.pi * sigma_pix**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma_pix**2))
    return img


def write_band(path: Path, image: np.ndarray, weight: np.ndarray, mask: np.ndarray | None, header: dict,
               magzero: float = 31.4) -> None:
    import fitsio

    hdr = dict(header, MAGZERO=magzero, PSF_FWHM=0.7)
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(image.astype(np.float32), header=[{"name": k, "value": v} for k, v in hdr.items()])
        f.write(weight.astype(np.float32), extname="WEIGHT")
        if mask is not None:
            f.write(mask.astype(np.int16), extname="MASK")


def separated_positions(rng, n: int, size: int, margin: float, min_sep: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random positions at least ``min_sep`` pixels apart (isolated sources)."""
    pts: list[tuple[float, float]] = []
    while len(pts) < n:
        p = rng.uniform(margin, size - margin, 2)
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) >= min_sep for q in pts):
            pts.append((float(p[0]), float(p[1])))
    a = np.array(pts)
    return a[:, 0], a[:, 1]


def make_release(root: Path, *, n_tiles: int = 2, size: int = 128, bands=("g", "r"), seed: int = 101,
                 n_src: int = 12, noise: float = 5.0) -> tuple[Path, dict]:
    """Write ``n_tiles`` tiles with ``n_src`` Gaussian sources each; return (manifest, truth)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tiles, truth = [], {}
    for t in range(n_tiles):
        tid = f"t{t:04d}"
        xs, ys = separated_positions(rng, n_src, size, margin=12, min_sep=10.0)
        fl = rng.uniform(3000, 20000, n_src)
        truth[tid] = {"x": xs, "y": ys, "flux": fl}
        files = {}
        for b in bands:
            img = gaussian_sources(size, xs, ys, fl) + rng.normal(0, noise, (size, size)).astype(np.float32)
            w = np.full((size, size), 1.0 / noise**2, np.float32)
            write_band(root / f"{tid}_{b}.fits", img, w, np.zeros((size, size), np.int16),
                       wcs_header(crval=(150.0 + t * size * PIXSCALE, 2.0), crpix=(size / 2 + 0.5, size / 2 + 0.5)))
            files[b] = {"path": f"{tid}_{b}.fits", "image": 0, "weight": 1, "mask": 2}
        tiles.append({"id": tid, "files": files})
    manifest = {"name": "tiny", "bands": list(bands), "tiles": tiles}
    path = root / "manifest.yaml"
    write_manifest(manifest, path)
    return path, truth


@pytest.fixture
def tiny_release(tmp_path: Path):
    return make_release(tmp_path / "release")
