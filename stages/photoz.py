"""Photometric redshifts: p(z) from the multi-band fluxes with an ONNX mixture-density ensemble.

Inputs per object and band: the fluxes and errors named in the model card's
``normalisation.pipeline_columns`` (``{band}_{kind}Flux`` / ``{band}_{kind}FluxErr``, nJy; a model
may take several kinds per band, its bands then named ``g@psf``, ``g@ap03`` ...). A band
whose column is absent from ``objects`` (a release without that band) or whose flux/error is not
finite or has error <= 0 is *missing*: it enters through a missing-band indicator feature and
neutral values. Faint, zero and negative fluxes (forced photometry of non-detections) are used as
measured: the features are asinh magnitudes, finite for any flux (see
:mod:`workflows.photoz_data`, whose ``features`` the stage shares with training).

Outputs (``photoz`` table, same rows and order as ``objects``): ``photoz_pdf`` -- the density
p(z) on the fixed grid ``attrs["z_grid"]`` (bin centres, step ``attrs["dz"]``; also in the model
card), normalised so that ``sum(pdf) * dz = 1`` -- and summaries from its CDF (linear within a
bin): median, mode, mean, central 68 % and 95 % intervals, and ``odds`` = P(|z - mode| <=
0.06 (1 + mode)).

This module needs only numpy and onnxruntime (no torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import Field

from pipeline.modelcard import CARD_NAME, ModelCard, load_card
from pipeline.stage import Stage, StageConfig
from pipeline.table import Table

SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "photoz"
ODDS_K = 0.06
BATCH = 256  # objects per ONNX Runtime call: the (batch, components, grid) block stays in cache
QUANTILES = {"photoz_l95": 0.025, "photoz_l68": 0.16, "photoz_median": 0.5, "photoz_u68": 0.84, "photoz_u95": 0.975}

COLUMNS = {
    "photoz_median": "median of p(z)",
    "photoz_mode": "mode (peak) of p(z)",
    "photoz_mean": "mean of p(z)",
    "photoz_l68": "16th percentile of p(z) (lower end of the central 68 % interval)",
    "photoz_u68": "84th percentile of p(z) (upper end of the central 68 % interval)",
    "photoz_l95": "2.5th percentile of p(z) (lower end of the central 95 % interval)",
    "photoz_u95": "97.5th percentile of p(z) (upper end of the central 95 % interval)",
    "photoz_odds": "P(|z - mode| <= 0.06 (1 + mode)) under p(z)",
}


class PhotoZConfig(StageConfig):
    model_dir: str | None = Field(None, description="photo-z model directory (model.onnx + card.json); "
                                                    "None: the shipped stages/models/photoz")
    flux_kind: str | None = Field(None, description="use {band}_{kind}Flux columns instead of the card's kind "
                                                    "(only for models trained on that kind)")
    batch: int = Field(BATCH, gt=0, description="objects per ONNX Runtime call (256: fastest per core)")
    device: Literal["cpu", "auto", "cuda"] = Field("cpu", description="ONNX Runtime device; the model is tiny, "
                                                                      "the CPU is the default")


def model_dir_of(config: PhotoZConfig) -> Path:
    return Path(config.model_dir) if config.model_dir else SHIPPED_MODEL


def z_grid_of(card: ModelCard) -> tuple[np.ndarray, float]:
    g = card.z_grid  # type: ignore[attr-defined]
    return np.asarray(g["centres"], np.float64), float(g["dz"])


def summarise(pdf: np.ndarray, z_grid: np.ndarray, dz: float) -> dict[str, np.ndarray]:
    """Point estimates, intervals and odds of densities ``pdf`` (n, G) on bin centres ``z_grid``.

    Quantiles come from the CDF at the bin edges, linear inside a bin (float32: ample for a CDF
    whose bins hold >= 1e-7 of the probability).
    """
    pdf = np.asarray(pdf, np.float32)
    n, G = pdf.shape
    edges = np.concatenate([[z_grid[0] - dz / 2], z_grid + dz / 2])
    mass = np.maximum(pdf, 0.0)
    tot = mass.sum(axis=1, keepdims=True)
    bad = ~(tot[:, 0] > 0)
    if bad.any():  # no probability at all: a flat p(z) rather than NaN
        mass[bad] = 1.0
        tot[bad] = G
    mass /= tot
    cdf = np.empty((n, G + 1), np.float32)
    cdf[:, 0] = 0.0
    np.cumsum(mass, axis=1, out=cdf[:, 1:])
    cdf[:, -1] = 1.0
    out: dict[str, np.ndarray] = {}
    rows = np.arange(n)
    for name, q in QUANTILES.items():
        j = np.clip(np.count_nonzero(cdf < q, axis=1), 1, G)  # first edge with cdf >= q
        c0, c1 = cdf[rows, j - 1].astype(np.float64), cdf[rows, j].astype(np.float64)
        f = np.divide(q - c0, c1 - c0, out=np.full(n, 0.5), where=c1 > c0)
        out[name] = edges[j - 1] + np.clip(f, 0, 1) * dz
    k = np.argmax(mass, axis=1)
    # parabolic refinement of the peak from the neighbouring bins
    km, kp = np.clip(k - 1, 0, G - 1), np.clip(k + 1, 0, G - 1)
    ym, y0, yp = (mass[rows, i].astype(np.float64) for i in (km, k, kp))
    den = ym - 2 * y0 + yp
    off = np.divide(0.5 * (ym - yp), den, out=np.zeros(n), where=(den < 0) & (k > 0) & (k < G - 1))
    mode = z_grid[k] + np.clip(off, -0.5, 0.5) * dz
    out["photoz_mode"] = mode
    out["photoz_mean"] = mass @ z_grid.astype(np.float32)
    out["photoz_odds"] = cdf_at(cdf, edges, mode + ODDS_K * (1 + mode)) - cdf_at(cdf, edges, mode - ODDS_K * (1 + mode))
    return out


def cdf_at(cdf: np.ndarray, edges: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Row-wise CDF (on ``edges``, linear inside a bin) at ``z`` (n,)."""
    dz = edges[1] - edges[0]
    pos = (np.asarray(z, np.float64) - edges[0]) / dz
    j = np.clip(np.floor(pos).astype(np.int64), 0, len(edges) - 2)
    f = np.clip(pos - j, 0.0, 1.0)
    rows = np.arange(len(j))
    val = cdf[rows, j] * (1 - f) + cdf[rows, j + 1] * f
    return np.where(pos <= 0, 0.0, np.where(pos >= len(edges) - 1, 1.0, val))


def flux_arrays(objects: Mapping[str, np.ndarray] | Table, bands: list[str], columns: Mapping[str, Mapping[str, str]],
                n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, B) flux and error in nJy from the named columns; absent bands are NaN (missing)."""
    flux = np.full((n, len(bands)), np.nan)
    err = np.full((n, len(bands)), np.nan)
    for j, b in enumerate(bands):
        fc, ec = columns[b]["flux"], columns[b]["err"]
        if fc in objects and ec in objects:
            flux[:, j] = np.asarray(objects[fc], np.float64)
            err[:, j] = np.asarray(objects[ec], np.float64)
    return flux, err


def predict(model_dir: str | Path, flux: np.ndarray, err: np.ndarray, *, batch: int = BATCH,
            device: str = "cpu", card: ModelCard | None = None) -> dict[str, Any]:
    """Run a photo-z model on (n, B) fluxes/errors (nJy, the card's band order): pdf + summaries."""
    from pipeline.onnx import run_batched, session
    from workflows.photoz_data import features

    card = card or load_card(model_dir)
    z_grid, dz = z_grid_of(card)
    n = len(flux)
    x = features(flux, err, card.normalisation)
    if n:
        sess = session(card.onnx_path(Path(model_dir)), device=device)
        (prob,) = run_batched(sess, {"features": x}, batch=batch, outputs=["prob"])
        pdf = prob / dz
    else:
        pdf = np.zeros((0, len(z_grid)), np.float32)
    out: dict[str, Any] = {"pdf": pdf.astype(np.float32), "z_grid": z_grid, "dz": dz, "card": card}
    out.update(summarise(pdf, z_grid, dz) if n else {k: np.zeros(0) for k in [*QUANTILES, "photoz_mode", "photoz_mean", "photoz_odds"]})
    usable = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    base = [b.partition("@")[0] for b in card.bands]
    groups = list(dict.fromkeys(base))
    out["nbands"] = np.stack([usable[:, [j for j, b in enumerate(base) if b == g]].any(axis=1) for g in groups],
                             axis=1).sum(axis=1).astype(np.uint8) if len(groups) else np.zeros(n, np.uint8)
    return out


def photoz_table(ids: np.ndarray, res: Mapping[str, Any], id_name: str = "objectId") -> Table:
    """The output table: id first, then every photoz_* column, the grid in the attrs."""
    t = Table()
    t.add(id_name, np.asarray(ids), "", "object id" if id_name == "objectId" else f"input {id_name}", "meta.id;meta.main")
    for name, desc in COLUMNS.items():
        t.add(name, np.asarray(res[name], np.float32), "", desc, "src.redshift.phot")
    t.add("photoz_nbands", np.asarray(res["nbands"], np.uint8), "", "bands with a usable flux and error (others missing)", "meta.number")
    t.add("photoz_pdf", np.asarray(res["pdf"], np.float32), "",
          "p(z) density on the grid in attrs z_grid (bin centres); sum(pdf) * dz = 1", "stat.probability;src.redshift.phot")
    card: ModelCard = res["card"]
    t.attrs.update({"z_grid": [round(float(z), 6) for z in res["z_grid"]], "dz": res["dz"],
                    "pdf_normalisation": "sum(photoz_pdf) * dz = 1", "photoz_model": f"{card.name} v{card.version}",
                    "photoz_model_sha256": card.sha256, "odds_k": ODDS_K})
    return t


class PhotoZ(Stage):
    """p(z) and its summaries for every object from the ONNX photo-z ensemble named in the config."""

    name = "photoz"
    version = "1"
    requires = ("objects",)
    provides = {"photoz": "photometric-redshift p(z) on a fixed grid and its summaries, one row per object"}
    Config = PhotoZConfig
    resources: Mapping[str, float] = {}

    def model_files(self, config: PhotoZConfig) -> list[Path]:
        d = model_dir_of(config)
        return [d / "model.onnx", d / CARD_NAME]

    def run(self, inputs: Mapping[str, Any], config: PhotoZConfig) -> dict[str, Any]:
        objects: Table = inputs["objects"]
        d = model_dir_of(config)
        card = load_card(d)
        bands = list(card.bands)
        cols = dict(card.normalisation.get("pipeline_columns") or {})
        if config.flux_kind or not cols:
            kind = config.flux_kind or card.normalisation.get("pipeline_flux_kind", "kron").split(",")[0]
            cols = {}
            for b in bands:  # "g@ap03" (a model with several flux sets per band) keeps its own set
                base, _, fset = b.partition("@")
                k = fset or kind
                cols[b] = {"flux": f"{base}_{k}Flux", "err": f"{base}_{k}FluxErr"}
        n = len(objects)
        flux, err = flux_arrays(objects, bands, cols, n)
        res = predict(d, flux, err, batch=config.batch, device=config.device, card=card)
        ids = objects["objectId"] if "objectId" in objects else np.arange(n, dtype=np.int64)
        t = photoz_table(ids, res)
        t.attrs["photoz_bands_present"] = [b for b in bands if cols[b]["flux"] in objects]
        return {"photoz": t}
