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
from pipeline.stage import CAVEATS, Stage, StageConfig
from pipeline.table import Table

from .fingerprint import classical_fingerprint

SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "photoz"
ODDS_K = 0.06
BATCH = 128  # objects per ONNX Runtime call: the (batch, components, grid + 1) erf block stays in cache
SUMMARY_ROWS = 1024  # rows per summary block (numpy's per-call overhead amortised, the block in cache)
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
    batch: int = Field(BATCH, gt=0, description="objects per ONNX Runtime call (the default: fastest per core)")
    device: Literal["cpu", "auto", "cuda"] = Field("cpu", description="ONNX Runtime device; the model is tiny, "
                                                                      "the CPU is the default")


def model_dir_of(config: PhotoZConfig) -> Path:
    return Path(config.model_dir) if config.model_dir else SHIPPED_MODEL


def z_grid_of(card: ModelCard) -> tuple[np.ndarray, float]:
    g = card.z_grid  # type: ignore[attr-defined]
    return np.asarray(g["centres"], np.float64), float(g["dz"])


SUMMARY_KEYS = [*QUANTILES, "photoz_mode", "photoz_mean", "photoz_odds"]


def summarise(pdf: np.ndarray, z_grid: np.ndarray, dz: float) -> dict[str, np.ndarray]:
    """Point estimates, intervals and odds of densities ``pdf`` (n, G) on bin centres ``z_grid``.

    Quantiles come from the CDF at the bin edges, linear inside a bin (the CDF is a float64
    cumulative sum here; the stage gets it from the model, see :func:`summarise_cdf`).
    """
    mass = np.maximum(np.asarray(pdf, np.float64), 0.0)
    n, G = mass.shape
    tot = mass.sum(axis=1, keepdims=True)
    bad = ~(tot[:, 0] > 0)
    if bad.any():  # no probability at all: a flat p(z) rather than NaN
        mass[bad] = 1.0
        tot[bad] = G
    cdf = np.empty((n, G + 1), np.float64)
    cdf[:, 0] = 0.0
    np.cumsum(mass / tot, axis=1, out=cdf[:, 1:])
    cdf[:, -1] = 1.0
    return summarise_cdf(cdf, z_grid, dz)[1]


def summarise_cdf(cdf: np.ndarray, z_grid: np.ndarray, dz: float, pdf_out: np.ndarray | None = None,
                  out: dict[str, np.ndarray] | None = None, at: slice = slice(None)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """p(z) density and summaries from CDFs ``cdf`` (n, G+1) at the bin edges (0 ... 1, as the
    model's ``cdf`` output): ``(pdf, summaries)``.

    Every quantile is a vectorised binary search (8 steps for 200 bins) rather than a pass over the
    grid; the density is ``diff(cdf) / dz`` (clipped at 0), written into ``pdf_out`` when given,
    and the summaries into ``out[key][at]`` when ``out`` is given (the stage fills its output
    columns batch by batch, each batch's block still in cache).
    """
    n, G1 = cdf.shape
    G = G1 - 1
    z_grid = np.asarray(z_grid, np.float64)
    edges = np.concatenate([[z_grid[0] - dz / 2], z_grid + dz / 2])
    last = cdf[:, -1]
    bad = ~(last > 0.5)  # no probability inside the grid at all: a flat p(z) rather than NaN
    if bad.any():
        cdf = np.array(cdf, copy=True)
        cdf[bad] = np.linspace(0.0, 1.0, G1)
    pdf = pdf_out if pdf_out is not None else np.empty((n, G), np.float32)
    np.subtract(cdf[:, 1:], cdf[:, :-1], out=pdf, casting="unsafe")
    np.maximum(pdf, 0.0, out=pdf)
    if bad.any():
        pdf[bad] = 1.0 / G
    if out is None:
        out = {k: np.empty(n) for k in SUMMARY_KEYS}
        at = slice(None)
    flat = cdf.ravel()
    base = np.arange(n) * G1
    qs = np.array(list(QUANTILES.values()))
    # smallest edge index j in [1, G] with cdf[j] >= q (cdf[0] = 0 < q <= 1 = cdf[G]): a branch-free
    # binary search, all rows and quantiles at once (j = the last index with cdf < q, plus 1)
    b2 = base[:, None]
    j = np.zeros((n, len(qs)), np.int64)
    step = 1 << int(np.ceil(np.log2(G1)) - 1)
    while step:
        cand = j + step
        np.minimum(cand, G, out=cand)
        j = np.where(flat[b2 + cand] < qs, cand, j)
        step >>= 1
    hi = np.clip(j + 1, 1, G)
    c0 = flat[b2 + hi - 1].astype(np.float64)
    c1 = flat[b2 + hi].astype(np.float64)
    d = c1 - c0
    f = np.divide(qs - c0, d, out=np.full(d.shape, 0.5), where=d > 0)
    zq = edges[hi - 1] + np.clip(f, 0.0, 1.0) * dz
    for c, name in enumerate(QUANTILES):
        out[name][at] = zq[:, c]
    k = np.argmax(pdf, axis=1)
    # parabolic refinement of the peak from the neighbouring bins
    pf = pdf.ravel()
    kb = np.arange(n) * G + k
    ym = pf[np.maximum(kb - 1, 0)].astype(np.float64)
    y0 = pf[kb].astype(np.float64)
    yp = pf[np.minimum(kb + 1, n * G - 1)].astype(np.float64)
    den = ym - 2 * y0 + yp
    off = np.divide(0.5 * (ym - yp), den, out=np.zeros(n), where=(den < 0) & (k > 0) & (k < G - 1))
    mode = z_grid[k] + np.clip(off, -0.5, 0.5) * dz
    out["photoz_mode"][at] = mode
    out["photoz_mean"][at] = pdf @ z_grid.astype(np.float32)
    out["photoz_odds"][at] = cdf_at(cdf, edges, mode + ODDS_K * (1 + mode)) - cdf_at(cdf, edges, mode - ODDS_K * (1 + mode))
    pdf *= np.float32(1.0 / dz)
    return pdf, out


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
    """Run a photo-z model on (n, B) fluxes/errors (nJy, the card's band order): pdf + summaries.

    Models with a ``cdf`` output (the CDF at the grid's bin edges) are read through it: ONNX
    Runtime batch by batch into a block of ``SUMMARY_ROWS`` rows, then that block's density and
    summaries (:func:`summarise_cdf`) while it is in cache; older models through ``prob``.
    """
    from pipeline.onnx import run_batched, session
    from workflows.photoz_data import features

    card = card or load_card(model_dir)
    z_grid, dz = z_grid_of(card)
    n, G = len(flux), len(z_grid)
    x = features(flux, err, card.normalisation)
    pdf = np.empty((n, G), np.float32)
    summ: dict[str, np.ndarray] = {k: np.empty(n) for k in SUMMARY_KEYS}
    if n:
        sess = session(card.onnx_path(Path(model_dir)), device=device)
        if "cdf" in {o.name for o in sess.get_outputs()}:
            rows = max(batch, SUMMARY_ROWS)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                (cdf,) = run_batched(sess, {"features": x[r0:r1]}, batch=batch, outputs=["cdf"], release=False)
                summarise_cdf(cdf, z_grid, dz, pdf_out=pdf[r0:r1], out=summ, at=slice(r0, r1))
        else:  # a model exported before the cdf output
            (prob,) = run_batched(sess, {"features": x}, batch=batch, outputs=["prob"])
            np.multiply(prob, np.float32(1.0 / dz), out=pdf)
            summ = summarise(pdf, z_grid, dz)
    out: dict[str, Any] = {"pdf": pdf, "z_grid": z_grid, "dz": dz, "card": card, **summ}
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
        out: dict[str, Any] = {"photoz": t}
        trained = (card.training or {}).get("pipeline_fingerprint") if isinstance(card.training, dict) else None
        if trained:  # a mock-trained model knows which photometry (errors, apertures) it learnt
            now = classical_fingerprint()
            t.attrs.update({"photoz_trained_on_pipeline": trained, "photoz_pipeline": now})
            if trained != now and not config.flux_kind:
                out[CAVEATS] = [f"photo-z model trained on photometry of classical stages {trained}, these are {now}: "
                                "its p(z) calibration may be off; retrain it (make models)"]
        return out
