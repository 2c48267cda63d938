"""Training, validation and benchmark stamps of the image models, simulated with the mock survey.

Both sets are made of the mock survey's own objects, PSF, noise and pixel scale
(:mod:`workflows.mock`), and cut by the engine's cutout service (:mod:`pipeline.cutouts`) from
background-subtracted images made by the pipeline's own background stage, so a stamp looks exactly
like what a stage sees on a tile.

**Morphology** (:func:`morphology_set`): whole mock tiles written by
:func:`workflows.mock.release.write_release` are read with the engine's tile loader and run through
the classical stages in process (the code the pipeline runs); detections are matched to the truth
(the brightest true object within ``MATCH_RADIUS`` pixels) and cut at their *detected* positions.
Class priors are the population's: nothing is re-balanced, so the probabilities can be calibrated.

**Lenses** (:func:`lens_sets`): "mosaics". A 2048 x 2048 field of an ordinary mock population
(the neighbours) is rendered once per band; on top of it, one candidate per 64 x 64 cell is placed
at a random offset of the cell grid: ordinary plausible deflectors (negatives), mock spheroids with
a lenstronomy-lensed source painted around them (positives, :mod:`workflows.mock.lenses`) and hard
negatives (close blends, mergers with a tidal tail, star-forming rings, spiral arms, edge-on
disks, red stars). Candidates come from a second, independent mock population, so they are drawn
exactly like the survey's galaxies. Noise (the mock's ``add_noise``), the pipeline's background
subtraction and the cutout follow; the grid is shifted and re-filled ``SHIFTS`` times per field
(new candidates, new noise) to spread the cost of rendering the field. Everything is rendered with
the mock's batched k-space renderer (agrees with its GalSim path to ~1e-4 of the flux per pixel).

Seeds (``workflows.mock.seeds``): every set names its purpose, and its seed must lie in that
purpose's range (training 1000-1999, validation 2000-2999, benchmark 9000-9999).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.cutouts import CutoutSpec, Stamps
from stages.morphology import object_snr, sky_planes

log = logging.getLogger("surveypipe.train.stamps")

BANDS = "gri"
MATCH_RADIUS = 2.0           # pixels: detection -> truth matching
FIELD = 2048                 # lens mosaics: field side (pixels)
CELL = 64                    # lens mosaics: one candidate per CELL x CELL pixels
SHIFTS = 8                   # lens mosaics: candidate grids per rendered field
CENTROID_JITTER = 0.3        # pixels (rms): detection centroid error of bright candidates
MORPH_CLASSES = ("star", "spheroid", "disk", "edgeon", "irregular")
LENS_KINDS = ("lens", "ordinary", "blend", "merger", "ring", "spiral", "edgeon", "star")
HARD_KINDS = ("blend", "merger", "ring", "spiral", "edgeon", "star")

#: base seeds per model and purpose (all inside the purpose's registered range)
SEEDS = {
    "morphology": {"training": 1000, "validation": 2000, "benchmark": 9000},
    "lenses": {"training": 1100, "validation": 2100, "benchmark": 9100},
}


def survey_config():
    """The mock survey's observing conditions (the defaults every mock release uses)."""
    from workflows.mock.psf import SurveyConfig

    return SurveyConfig()


def default_normalisation(bands: str = BANDS, survey=None, *, planes: Sequence[str] = ("image",)) -> dict[str, Any]:
    """arcsinh stretch with the sky noise per pixel (nJy) of each band as its scale."""
    survey = survey or survey_config()
    scales = {b: round(float(survey.band(b).sigma_sky * survey.band(b).njy_per_unit), 4) for b in bands}
    return {"stretch": "arcsinh", "scale_njy": scales, "clip": 20.0, "planes": list(planes),
            "doc": "input = clip(arcsinh(image_nJy / scale_njy[band]), -clip, clip); scale = sky sigma per pixel"}


def make_spec(name: str, size: int, bands: str = BANDS, survey=None) -> CutoutSpec:
    """The cutout spec a new model is trained with (and that its card will state)."""
    survey = survey or survey_config()
    norm = default_normalisation(bands, survey)
    return CutoutSpec(name, tuple(bands), int(size), len(bands) * len(norm["planes"]), norm,
                      pixel_scale_arcsec=float(survey.pixel_scale))


def start_training(args: Any, name: str) -> tuple[Any, CutoutSpec]:
    """Common start of a stamp-model training run: one thread count for OpenMP and torch, the
    seeds checked against their purposes (ValueError otherwise), the survey and the stamp spec."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    check_purpose(args.seed, "training")
    check_purpose(args.val_seed, "validation")
    survey = survey_config()
    return survey, make_spec(name, args.stamp, args.bands, survey)


def check_purpose(seed: int, purpose: str) -> int:
    from workflows.mock.seeds import check_seed

    return check_seed(seed, purpose)


# ---------------------------------------------------------------- the classical stages, in process
def classical_products(tile: Any, targets: Sequence[str] = ("objects", "sky")) -> dict[str, Any]:
    """Run the pipeline's classical stages on an in-memory tile (what the engine would run)."""
    import stages
    from pipeline.dag import Dag

    dag = Dag([s() for s in stages.CLASSICAL_STAGES])
    prods: dict[str, Any] = {"exposure": tile}
    for s in dag.needed_for(list(targets)):
        prods.update(s.run({r: prods[r] for r in dag.inputs(s)}, s.Config()))
    return prods


def tile_from_arrays(tile_id: str, images: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                     masks: dict[str, np.ndarray], survey, wcs_header: dict[str, Any]) -> Any:
    """A :class:`pipeline.tile.TileData` from mock image-unit planes, calibrated to nJy as the loader does."""
    from pipeline.tile import TileData

    img, wt, bad, hdr = {}, {}, {}, {}
    for b in images:
        bs = survey.band(b)
        scale = np.float32(bs.njy_per_unit)
        badpix = (masks[b] != 0) | ~np.isfinite(images[b]) | (weights[b] <= 0)
        img[b] = (np.where(badpix, np.float32(0), images[b]) * scale).astype(np.float32)
        wt[b] = (np.where(badpix, np.float32(0), weights[b]) / (scale * scale)).astype(np.float32)
        bad[b] = badpix
        hdr[b] = {"PSF_FWHM": bs.fwhm, "SATURATE": bs.saturate, "FLUXSCALE": float(scale),
                  "SATURATE_NJY": float(bs.saturate * scale)}
    return TileData(tile_id, list(images), img, wt, bad, hdr, dict(wcs_header), None)


# ---------------------------------------------------------------- morphology: tiles -> pipeline -> stamps
@dataclass
class MorphSet:
    """Stamps of detected objects with their matched truth (one row per stamp)."""

    x: np.ndarray            # (N, C, S, S) float16 model input
    label: np.ndarray        # (N,) int8 index into MORPH_CLASSES
    mag_i: np.ndarray        # true i magnitude of the matched object
    snr: np.ndarray          # measured S/N (kron, combined over the bands)
    kron_mag_i: np.ndarray   # measured i magnitude (kron)
    extendedness: np.ndarray  # the classical refExtendedness (NaN where the objects table has none)
    flags: np.ndarray        # stamp flags (pipeline.cutouts.STAMP_FLAGS)
    tile: np.ndarray         # tile index within the set
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.label)

    def save(self, path: Path) -> None:
        np.savez(path, **{k: getattr(self, k) for k in ("x", "label", "mag_i", "snr", "kron_mag_i", "extendedness",
                                                       "flags", "tile")}, meta=json.dumps(self.meta))

    @classmethod
    def load(cls, path: Path) -> "MorphSet":
        d = np.load(path)
        return cls(**{k: d[k] for k in ("x", "label", "mag_i", "snr", "kron_mag_i", "extendedness", "flags", "tile")},
                   meta=json.loads(str(d["meta"])))

    @staticmethod
    def concat(sets: Sequence["MorphSet"]) -> "MorphSet":
        keys = ("x", "label", "mag_i", "snr", "kron_mag_i", "extendedness", "flags", "tile")
        return MorphSet(**{k: np.concatenate([getattr(s, k) for s in sets]) for k in keys}, meta=dict(sets[0].meta))


def _source_hash(cls: type) -> str:
    """sha256 of the source of the module defining ``cls`` (a stage edited without a version bump
    still invalidates the cached stamps)."""
    import hashlib
    import inspect
    import sys

    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return "?"
    return hashlib.sha256(src.encode()).hexdigest()[:12]


def simulate_release(workdir: Path, seed: int, n_tiles: int, size: int, bands: str = BANDS) -> Path:
    """A mock release in ``workdir`` (re-used when one with the same arguments is already there)."""
    from workflows.mock.release import write_release

    workdir = Path(workdir)
    stamp = workdir / "release.json"
    args = {"seed": int(seed), "n_tiles": int(n_tiles), "size": int(size), "bands": bands}
    if stamp.exists() and json.loads(stamp.read_text()) == args and (workdir / "manifest.yaml").exists():
        return workdir / "manifest.yaml"
    path = write_release(workdir, n_tiles=n_tiles, size=size, bands=bands, seed=seed, progress=False)
    stamp.write_text(json.dumps(args))
    return path


def match_truth(x: np.ndarray, y: np.ndarray, tx: np.ndarray, ty: np.ndarray, tflux: np.ndarray,
                radius: float = MATCH_RADIUS) -> np.ndarray:
    """Index of the brightest true object within ``radius`` pixels of each detection (-1: none)."""
    from scipy.spatial import cKDTree

    out = np.full(len(x), -1, np.int64)
    if len(x) == 0 or len(tx) == 0:
        return out
    tree = cKDTree(np.stack([tx, ty], axis=1))
    for k, nb in enumerate(tree.query_ball_point(np.stack([x, y], axis=1), radius)):
        if nb:
            nb = np.asarray(nb)
            out[k] = nb[np.argmax(tflux[nb])]
    return out


def truth_types(truth: Any) -> np.ndarray:
    """The truth table's ``type`` column as plain strings (FITS gives bytes)."""
    return np.array([(v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)).strip() for v in truth["type"]])


def tile_records(manifest_path: Path) -> Iterator[tuple[int, Any, dict[str, Any], Any]]:
    """(tile index, TileData, classical products, truth table) for every tile of a mock release."""
    from astropy.table import Table

    from pipeline.manifest import load_manifest
    from pipeline.tile import load_tile

    manifest = load_manifest(manifest_path)
    root = Path(manifest_path).parent
    for k, spec in enumerate(manifest.tiles):
        tile = load_tile(manifest, spec)
        prods = classical_products(tile)
        truth = Table.read(root / "truth" / f"{spec.id}.fits")
        yield k, tile, prods, truth


def morphology_set(workdir: Path, seed: int, purpose: str, *, n_tiles: int, spec: CutoutSpec,
                   min_snr: float, tile_size: int = 2048, progress: bool = True) -> MorphSet:
    """Stamps of every matched, primary detection above ``min_snr`` in ``n_tiles`` mock tiles."""
    check_purpose(seed, purpose)
    import stages

    key = json.dumps({"seed": int(seed), "n_tiles": int(n_tiles), "tile_size": int(tile_size), "size": spec.size,
                      "bands": list(spec.bands), "norm": dict(spec.normalisation), "min_snr": float(min_snr),
                      "stages": [[s.name, s.version, _source_hash(type(s) if not isinstance(s, type) else s)]
                                 for s in stages.CLASSICAL_STAGES]}, sort_keys=True)
    import hashlib

    cache = Path(workdir) / f"stamps-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if cache.exists():
        out = MorphSet.load(cache)
        if progress:
            print(f"  morphology {purpose}: {len(out)} stamps from {cache}", flush=True)
        return out
    t0 = time.perf_counter()
    manifest = simulate_release(Path(workdir), seed, n_tiles, tile_size, "".join(spec.bands))
    t_sim = time.perf_counter() - t0
    parts = []
    for k, tile, prods, truth in tile_records(manifest):
        obj, sky = prods["objects"], prods["sky"]
        snr = object_snr(obj, spec.bands)
        images, weights, bad = sky_planes({"exposure": tile, "sky": sky})
        keep = np.asarray(obj["detect_isPrimary"], bool) & (snr >= min_snr)
        idx = match_truth(np.asarray(obj["x"]), np.asarray(obj["y"]), np.asarray(truth["x"]), np.asarray(truth["y"]),
                          np.asarray(truth["flux_i"]))
        keep &= idx >= 0
        rows = np.flatnonzero(keep)
        tt = truth[idx[rows]]
        types = np.array([MORPH_CLASSES.index(t) for t in truth_types(tt)], np.int8)
        inp, st = spec.stamps(images, np.asarray(obj["x"])[rows], np.asarray(obj["y"])[rows], weights=weights, bad=bad)
        with np.errstate(divide="ignore", invalid="ignore"):
            kmag = 31.4 - 2.5 * np.log10(np.asarray(obj["i_kronFlux"], np.float64)[rows]) if "i" in spec.bands else np.full(rows.size, np.nan)
        ext = np.asarray(obj["refExtendedness"], np.float32)[rows] if "refExtendedness" in obj else np.full(rows.size, np.nan, np.float32)
        parts.append(MorphSet(inp.astype(np.float16), types, np.asarray(tt["mag_i"], np.float32), snr[rows].astype(np.float32),
                              kmag.astype(np.float32), ext, st.flags(radius=spec.size / 4), np.full(rows.size, k, np.int16)))
        if progress:
            print(f"  morphology {purpose} tile {k + 1}/{n_tiles}: {rows.size} stamps "
                  f"({len(obj)} detections, {np.sum(idx >= 0)} matched)", flush=True)
    out = MorphSet.concat(parts)
    out.meta = {"seed": int(seed), "purpose": purpose, "n_tiles": int(n_tiles), "tile_size": int(tile_size),
                "min_snr": float(min_snr), "n": len(out), "simulate_seconds": round(t_sim, 1),
                "seconds": round(time.perf_counter() - t0, 1),
                "class_counts": {c: int(np.sum(out.label == i)) for i, c in enumerate(MORPH_CLASSES)}}
    out.save(cache)
    return out


# ---------------------------------------------------------------- lenses: mosaics
@dataclass
class LensSet:
    """Stamps of lens candidates: positives (``kind == 0``) and negatives of each kind."""

    x: np.ndarray           # (N, C, S, S) float16 model input
    label: np.ndarray       # (N,) int8: 1 = lens
    kind: np.ndarray        # (N,) int8 index into LENS_KINDS
    theta_e: np.ndarray     # Einstein radius (arcsec; NaN for non-lenses)
    snr: np.ndarray         # S/N of the lensed source alone (NaN for non-lenses)
    mu: np.ndarray          # magnification of the source (NaN for non-lenses)
    mag_i: np.ndarray       # true i magnitude of the central object
    gi: np.ndarray          # true g - i of the central object
    z_d: np.ndarray         # redshift of the central object
    flags: np.ndarray       # stamp flags
    meta: dict[str, Any] = field(default_factory=dict)

    KEYS = ("x", "label", "kind", "theta_e", "snr", "mu", "mag_i", "gi", "z_d", "flags")

    def __len__(self) -> int:
        return len(self.label)

    def save(self, path: Path) -> None:
        np.savez(path, **{k: getattr(self, k) for k in self.KEYS}, meta=json.dumps(self.meta))

    @classmethod
    def load(cls, path: Path) -> "LensSet":
        d = np.load(path)
        return cls(**{k: d[k] for k in cls.KEYS}, meta=json.loads(str(d["meta"])))

    def select(self, keep: np.ndarray) -> "LensSet":
        """The stamps ``keep`` selects (a boolean mask or indices)."""
        return LensSet(**{k: getattr(self, k)[keep] for k in self.KEYS}, meta=dict(self.meta))

    @staticmethod
    def concat(sets: Sequence["LensSet"]) -> "LensSet":
        return LensSet(**{k: np.concatenate([getattr(s, k) for s in sets]) for k in LensSet.KEYS}, meta=dict(sets[0].meta))


@dataclass(frozen=True)
class CandidateCut:
    """Truth-level selection of plausible deflectors (the stage selects on measured fluxes)."""

    max_mag_i: float = 23.3
    min_gi: float = 0.8

    def mask(self, pop: Any) -> np.ndarray:
        from workflows.mock.population import STAR

        mi = pop.mag("i")
        gi = pop.mag("g") - mi
        return (pop["type"] != STAR) & (mi < self.max_mag_i) & (gi > self.min_gi)


class CandidatePools:
    """Objects of an independent mock population, sorted into the pools the mosaics draw from."""

    def __init__(self, seed: int, cut: CandidateCut, survey, size_px: int = 8192, bright_mag: float = 20.5) -> None:
        from workflows.mock.population import DISK, EDGEON, SPHEROID, STAR, Footprint, make_population

        pop = make_population(Footprint(size_px, size_px), seed, survey, min_bright_stars=0)
        self.pop = pop
        self._order: dict[str, np.ndarray] = {}
        self._next: dict[str, int] = {}
        mi = pop.mag("i")
        gi = pop.mag("g") - mi
        typ = pop["type"]
        cand = cut.mask(pop)
        self.pools = {
            "ordinary": np.flatnonzero(cand),
            "deflector": np.flatnonzero(cand & (typ == SPHEROID)),
            "spiral": np.flatnonzero((typ == DISK) & (mi < cut.max_mag_i) & (pop["hlr"] > 0.4)),
            "edgeon": np.flatnonzero((typ == EDGEON) & (mi < cut.max_mag_i)),
            "star": np.flatnonzero((typ == STAR) & (mi < cut.max_mag_i) & (mi > 17.5) & (gi > cut.min_gi)),
            "companion": np.flatnonzero((typ != STAR) & (mi > 20.0) & (mi < 25.0)),
            "blue": np.flatnonzero((typ != STAR) & (typ != SPHEROID) & (mi > 21.0) & (mi < 25.0) & (gi < 1.2)),
        }
        for name, idx in self.pools.items():
            if idx.size == 0:
                raise RuntimeError(f"candidate pool {name!r} is empty: use a larger population")
        # optional pools of the brightest candidates (training sets that over-represent them); may be empty
        self.pools["deflector_bright"] = np.flatnonzero(cand & (typ == SPHEROID) & (mi < bright_mag))
        self.pools["ordinary_bright"] = np.flatnonzero(cand & (mi < bright_mag))

    def draw(self, rng: np.random.Generator, pool: str, n: int) -> np.ndarray:
        """``n`` objects of ``pool``: every object once (in a random order) before any repeats."""
        out = []
        for _ in range(n):
            k = self._next.get(pool, 0)
            if pool not in self._order or k >= self._order[pool].size:
                self._order[pool] = rng.permutation(self.pools[pool])
                k = 0
            out.append(self._order[pool][k])
            self._next[pool] = k + 1
        return np.asarray(out, np.int64)

    @staticmethod
    def size_for(counts: dict[str, int]) -> int:
        """Population side (pixels) whose ordinary pool (~12 per arcmin^2 for i < 23, g - i > 1) holds
        every ordinary negative once and whose spheroid pool (~4 per arcmin^2) deflects each lens at
        most ~4 times."""
        need = max(counts.get("ordinary", 0) / 12.0, counts.get("lens", 0) / 16.0, 750.0)  # arcmin^2
        side = int(np.ceil(np.sqrt(need) * 300.0 / 512.0)) * 512
        return int(min(max(side, 8192), 32768))


def _fields(seed: int, survey, n_fields: int, field_px: int = FIELD) -> Iterator[Any]:
    """``n_fields`` neighbour fields of ``field_px``^2 pixels cut from one mock population of ``seed``."""
    FIELD = field_px  # noqa: N806
    from workflows.mock.population import Footprint, make_population

    per_side = max(1, int(np.ceil(np.sqrt(n_fields))))
    side = per_side * FIELD
    pop = make_population(Footprint(side, side), seed, survey, min_bright_stars=0)
    margin = 128
    for k in range(n_fields):
        x0, y0 = (k % per_side) * FIELD, (k // per_side) * FIELD
        sel = np.flatnonzero((pop["X"] >= x0 - margin) & (pop["X"] < x0 + FIELD + margin)
                             & (pop["Y"] >= y0 - margin) & (pop["Y"] < y0 + FIELD + margin))
        sub = pop.take(sel)
        sub.cols["X"] = sub["X"] - x0
        sub.cols["Y"] = sub["Y"] - y0
        yield sub


def _with_positions(pop: Any, idx: np.ndarray, x: np.ndarray, y: np.ndarray) -> Any:
    sub = pop.take(idx)
    sub.cols["X"] = np.asarray(x, float)
    sub.cols["Y"] = np.asarray(y, float)
    return sub


@dataclass
class _Cell:
    kind: int
    x: float
    y: float
    obj: int                          # central object (row of the pool population)
    extra: list[tuple[int, float, float]] = field(default_factory=list)   # (row, x, y) companions
    paint: np.ndarray | None = None   # (B, CELL, CELL) image units, centred on round(x), round(y)
    theta_e: float = np.nan
    snr: float = np.nan
    mu: float = np.nan


def _plan_cells(rng: np.random.Generator, pools: CandidatePools, kinds: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                bands: str, survey, min_lens_snr: float, bright_frac: float = 0.0) -> list[_Cell]:
    """Decide the content of each cell (and paint lenses and impostors) for one mosaic.

    ``bright_frac``: that fraction of deflectors and of ordinary-pool negatives is drawn from the
    brightest candidates instead (as many bright lenses as bright impostors, so brightness alone
    tells nothing); 0 draws as the population does and leaves the random stream untouched."""

    def pick(pool: str) -> str:
        """``pool``, or its bright counterpart where one exists (deflector, ordinary)."""
        bright = f"{pool}_bright"
        if bright_frac > 0 and pools.pools.get(bright, np.empty(0)).size and rng.random() < bright_frac:
            return bright
        return pool

    from workflows.mock import lenses as L

    pop = pools.pop
    mi_all = pop.mag("i")
    cells: list[_Cell] = []
    scale = survey.pixel_scale
    for kind, x, y in zip(kinds, xs, ys):
        name = LENS_KINDS[kind]
        off = (float(np.round(x) - x), float(np.round(y) - y))
        if name == "lens":
            for _attempt in range(20):
                o = int(pools.draw(rng, pick("deflector"), 1)[0])
                lp = L.draw_lenses(rng, pop["z"][o:o + 1], pop["q"][o:o + 1], pop["beta"][o:o + 1])
                img, mu = L.paint_lensed_source(lp.row(0), bands, survey, CELL, off)
                snr = L.lensed_snr(img, bands, survey)
                if snr >= min_lens_snr:
                    break
            cells.append(_Cell(kind, x, y, o, paint=img, theta_e=float(lp["theta_e"][0]), snr=snr, mu=mu))
            continue
        pool = {"ordinary": "ordinary", "blend": "ordinary", "merger": "ordinary", "ring": "ordinary",
                "spiral": "spiral", "edgeon": "edgeon", "star": "star"}[name]
        o = int(pools.draw(rng, pick(pool), 1)[0])
        cell = _Cell(kind, x, y, o)
        if name == "blend":
            for _ in range(int(rng.integers(1, 3))):
                c = int(pools.draw(rng, "blue", 1)[0])
                r, a = rng.uniform(0.6, 3.0) / scale, rng.uniform(0, 2 * np.pi)
                cell.extra.append((c, x + r * np.cos(a), y + r * np.sin(a)))
        elif name == "merger":
            c = int(pools.draw(rng, "companion", 1)[0])
            r, a = rng.uniform(0.4, 1.5) / scale, rng.uniform(0, 2 * np.pi)
            cx, cy = x + r * np.cos(a), y + r * np.sin(a)
            cell.extra.append((c, cx, cy))
            start = ((cx - x) * scale, (cy - y) * scale)
            cell.paint, _ = L.paint_tidal_tail(rng, float(pop["z"][o]), float(mi_all[o] + rng.uniform(1.0, 3.0)), start,
                                               bands, survey, CELL, off)
        elif name == "ring":
            cell.paint, _ = L.paint_ring(rng, float(pop["z"][o]), float(mi_all[o] + rng.uniform(0.5, 3.0)), bands, survey,
                                         CELL, off)
        elif name == "spiral":
            cell.paint, _ = L.paint_spiral_arms(rng, float(pop["z"][o]), float(mi_all[o] + rng.uniform(0.5, 2.5)),
                                                float(pop["q"][o]), float(pop["beta"][o]), float(pop["hlr"][o]),
                                                bands, survey, CELL, off)
        cells.append(cell)
    return cells


def _mosaic(rng: np.random.Generator, bg_models: dict[str, np.ndarray], pools: CandidatePools, cells: list[_Cell],
            bands: str, survey, spec: CutoutSpec, tile_id: str) -> tuple[np.ndarray, Stamps]:
    """Add the cells to the field, noise it, subtract the background like the pipeline, cut the stamps."""
    FIELD = next(iter(bg_models.values())).shape[0]  # noqa: N806
    from pipeline.tile import TileData  # noqa: F401  (documented type of the tile below)
    from workflows.mock.population import Footprint, Population
    from workflows.mock.render import add_noise, render_model

    pop = pools.pop
    rows = [c.obj for c in cells] + [e[0] for c in cells for e in c.extra]
    xs = [c.x for c in cells] + [e[1] for c in cells for e in c.extra]
    ys = [c.y for c in cells] + [e[2] for c in cells for e in c.extra]
    inserts: Population = _with_positions(pop, np.asarray(rows), np.asarray(xs), np.asarray(ys))
    images, weights, masks = {}, {}, {}
    half = CELL // 2
    for bi, b in enumerate(bands):
        bs = survey.band(b)
        model, _ = render_model(inserts, bs, (FIELD, FIELD), (0, 0), engine="fast")
        model += bg_models[b]
        for c in cells:
            if c.paint is not None:
                cx, cy = int(np.round(c.x)), int(np.round(c.y))
                model[cy - half:cy + half, cx - half:cx + half] += c.paint[bi]
        nr = add_noise(model, bs, rng, bkg_sigma=survey.bkg_residual_sigma)
        images[b], weights[b], masks[b] = nr.image, nr.weight, nr.mask
    tile = tile_from_arrays(tile_id, images, weights, masks, survey, Footprint(FIELD, FIELD).wcs_header())
    sky = classical_products(tile, ("sky",))["sky"]
    jx = np.array([c.x for c in cells]) + rng.normal(0.0, CENTROID_JITTER, len(cells))
    jy = np.array([c.y for c in cells]) + rng.normal(0.0, CENTROID_JITTER, len(cells))
    images, weights, bad = sky_planes({"exposure": tile, "sky": sky})
    inp, st = spec.stamps(images, jx, jy, weights=weights, bad=bad)
    return inp, st


def lens_sets(seed: int, purpose: str, *, counts: dict[str, int], spec: CutoutSpec, cut: CandidateCut | None = None,
              min_lens_snr: float = 0.0, shifts: int = SHIFTS, field_px: int = FIELD, pool_px: int | None = None,
              progress: bool = True, bright_frac: float = 0.0) -> Iterator[LensSet]:
    """Yield one :class:`LensSet` per mosaic until ``counts`` ({kind: number}) are all made.

    Kinds are mixed at random over the cells of every mosaic. ``min_lens_snr``: lenses whose lensed
    source has a lower S/N are redrawn (training); 0 keeps every drawn lens (benchmarks).
    ``bright_frac``: the fraction of deflectors and ordinary negatives drawn from the candidates with
    i < 20.5 (:func:`_plan_cells`; training sets only).
    """
    check_purpose(seed, purpose)
    survey = survey_config()
    cut = cut or CandidateCut()
    bands = "".join(spec.bands)
    unknown = set(counts) - set(LENS_KINDS)
    if unknown:
        raise ValueError(f"unknown lens-set kinds {sorted(unknown)}; known {LENS_KINDS}")
    todo = np.concatenate([np.full(int(n), LENS_KINDS.index(k), np.int8) for k, n in counts.items()])
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    rng.shuffle(todo)
    t0 = time.perf_counter()
    pools = CandidatePools(seed, cut, survey, pool_px or CandidatePools.size_for(counts))
    FIELD = int(field_px)  # noqa: N806
    if (FIELD // CELL - 1) < 1:
        raise ValueError(f"field_px {FIELD} holds no {CELL}-pixel cell")
    if progress:
        print(f"  lenses {purpose}: candidate pools from seed {seed}: "
              + ", ".join(f"{k} {v.size}" for k, v in pools.pools.items()) + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    per = (FIELD // CELL - 1) ** 2
    n_mosaics = int(np.ceil(todo.size / per))
    n_fields = int(np.ceil(n_mosaics / shifts))
    from workflows.mock.render import render_model

    done = 0
    m = 0
    for f, bg in enumerate(_fields(seed + 1, survey, n_fields, FIELD)):
        bg_models = {b: render_model(bg, survey.band(b), (FIELD, FIELD), (0, 0), engine="fast")[0] for b in bands}
        for s in range(shifts):
            if done >= todo.size:
                break
            t1 = time.perf_counter()
            kinds = todo[done:done + per]
            ox, oy = rng.uniform(0, CELL, 2)
            g = np.arange(FIELD // CELL - 1)
            gx, gy = np.meshgrid(ox + half_cell() + CELL * g, oy + half_cell() + CELL * g)
            order = rng.permutation(per)[:kinds.size]
            xs = gx.ravel()[order] + rng.uniform(-0.5, 0.5, kinds.size)
            ys = gy.ravel()[order] + rng.uniform(-0.5, 0.5, kinds.size)
            cells = _plan_cells(rng, pools, kinds, xs, ys, bands, survey, min_lens_snr, bright_frac)
            inp, st = _mosaic(rng, bg_models, pools, cells, bands, survey, spec, f"mosaic{m:04d}")
            pop = pools.pop
            obj = np.array([c.obj for c in cells])
            mi = pop.mag("i")[obj]
            out = LensSet(inp.astype(np.float16), (kinds == 0).astype(np.int8), kinds.copy(),
                          np.array([c.theta_e for c in cells], np.float32), np.array([c.snr for c in cells], np.float32),
                          np.array([c.mu for c in cells], np.float32), mi.astype(np.float32),
                          (pop.mag("g")[obj] - mi).astype(np.float32), pop["z"][obj].astype(np.float32),
                          st.flags(radius=spec.size / 4), meta={"seed": int(seed), "purpose": purpose})
            done += kinds.size
            m += 1
            if progress:
                print(f"  lenses {purpose}: mosaic {m}/{n_mosaics} (field {f + 1}/{n_fields}): {kinds.size} stamps, "
                      f"{int(out.label.sum())} lenses, {time.perf_counter() - t1:.1f} s", flush=True)
            yield out


def half_cell() -> float:
    return CELL / 2.0


def collect_lens_set(seed: int, purpose: str, *, counts: dict[str, int], spec: CutoutSpec, min_lens_snr: float = 0.0,
                     progress: bool = True, **kw: Any) -> LensSet:
    """All of :func:`lens_sets` in one :class:`LensSet` (for training and validation sizes)."""
    t0 = time.perf_counter()
    out = LensSet.concat(list(lens_sets(seed, purpose, counts=counts, spec=spec, min_lens_snr=min_lens_snr,
                                        progress=progress, **kw)))
    out.meta = {"seed": int(seed), "purpose": purpose, "counts": {k: int(v) for k, v in counts.items()},
                "min_lens_snr": float(min_lens_snr), "n": len(out), "seconds": round(time.perf_counter() - t0, 1)}
    return out


# ---------------------------------------------------------------- the network shared by both models
def stamp_net(in_ch: int, n_classes: int, *, widths: Sequence[int] = (16, 32, 64, 64), hidden: int = 64,
              p_drop: float = 0.3, mc_samples: int = 16, mask_seed: int = 0, tta: int = 1,
              colour_residual: Sequence[Sequence[int]] | None = None, residual_box: int = 8,
              mirror_residual: bool = False):
    """A small CNN for stamps with a Monte-Carlo-dropout head whose masks are fixed at export.

    Convolution blocks (3x3 conv, batch norm, ReLU; 2x2 max-pool between blocks), global average
    and max pooling, then dropout -> dense -> ReLU -> dropout -> dense. Training uses ordinary
    random dropout. In eval mode (and in the exported ONNX graph) the head runs ``mc_samples``
    times with fixed dropout masks drawn once from ``mask_seed`` (MC dropout, Gal & Ghahramani
    2016, made deterministic so a stage stays a pure function of its inputs); outputs are the
    mean class probabilities ``probs`` and their standard deviation over the samples ``probs_std``.
    Logits are divided by a calibration temperature and shifted by a per-class bias (both buffers,
    set after training) before the softmax. ``tta`` > 1 also averages over that many symmetries of
    the stamp (4: the rotations by 90 degrees, 8: with their mirror images) in eval mode; the
    standard deviation is then over all (symmetry, mask) samples.

    ``colour_residual`` (lens model; off by default, so the morphology model is unchanged): pairs
    ``(a, b)`` of input channels; for each, an extra input plane ``arcsinh(F_a - k F_b)`` is computed
    inside the network, where ``F = sinh(input)`` undoes the arcsinh stretch (flux in units of the
    band's sky sigma) and ``k = sum F_a / sum F_b`` over the central ``residual_box``^2 pixels (the
    deflector's colour, clamped to [0, 2]). With ``(g, i)`` and ``(r, i)`` this subtracts the red
    deflector's light and leaves the bluer lensed arcs (the colour subtraction of ring finders; on
    bright deflectors the arcsinh stretch turns an arc into a small relative change on the
    deflector's profile). The exported graph still takes the normal ``in_ch``-channel stamps.
    Tried for the lens model (16 epochs, same sets): no gain on validation (ROC AUC 0.9675 vs
    0.9729 without); nor when added to the shipped model and trained 8 more epochs (restricted TPR
    at FPR 0.1 % 0.9009 vs 0.9078 on the extended validation set), so no shipped model uses it.

    ``mirror_residual`` (lens model; off by default): one extra plane per input channel, the stretched
    stamp minus itself rotated by 180 degrees about the stamp centre. A deflector (an elliptical centred
    on the stamp) is point-symmetric and cancels; arcs and counter-images of a lensed source, which
    are not, remain: the mirror subtraction the deblender uses for a companion on a bright galaxy's
    slope, here for a faint arc on a bright deflector. Tried for the lens model (2026-12-07): from
    scratch with one mining round, 30 epochs, restricted TPR at FPR 0.1 % 0.8736 on the extended
    validation set (shipped 0.9078); added to the shipped model (zero-initialised planes) with 12
    epochs on newly mined negatives, 0.9026 against 0.9001 for the same run without it: no gain
    shown, so no shipped model uses it.
    """
    if tta not in (1, 2, 4, 8):
        raise ValueError("tta must be 1, 2, 4 or 8")
    import torch
    from torch import nn

    class StampNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            self.resid = [(int(a), int(b)) for a, b in (colour_residual or [])]
            for a, b in self.resid:
                if not (0 <= a < in_ch and 0 <= b < in_ch and a != b):
                    raise ValueError(f"colour_residual pair {(a, b)} outside the {in_ch} input channels")
            self.box = int(residual_box)
            self.mirror = bool(mirror_residual)
            c = in_ch + len(self.resid) + (in_ch if self.mirror else 0)
            for k, w in enumerate(widths):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                if k < len(widths) - 1:
                    layers.append(nn.MaxPool2d(2))
                c = w
            self.features = nn.Sequential(*layers)
            self.fc1 = nn.Linear(2 * c, hidden)
            self.fc2 = nn.Linear(hidden, n_classes)
            self.p = float(p_drop)
            g = torch.Generator().manual_seed(int(mask_seed))
            keep = 1.0 - self.p
            self.register_buffer("mask1", (torch.rand(mc_samples, 2 * c, generator=g) < keep).float() / keep)
            self.register_buffer("mask2", (torch.rand(mc_samples, hidden, generator=g) < keep).float() / keep)
            self.register_buffer("temperature", torch.ones(()))
            self.register_buffer("logit_bias", torch.zeros(n_classes))

        def with_residuals(self, x):
            """The input planes, one colour-residual plane per ``colour_residual`` pair, then the mirror residuals."""
            mirror = []
            if self.mirror:  # about the object's pixel (S//2, S//2): index i <-> S - i, the first row and column 0
                core = x[:, :, 1:, 1:]
                mirror = [nn.functional.pad(core - torch.flip(core, dims=(2, 3)), (1, 0, 1, 0))]
            if not self.resid:
                return torch.cat([x, *mirror], dim=1) if mirror else x
            # sinh / asinh written out: the ONNX exporter has no symbolic for aten::sinh
            f = 0.5 * (torch.exp(x) - torch.exp(-x))
            h, w = x.shape[-2], x.shape[-1]
            y0, x0 = (h - self.box) // 2, (w - self.box) // 2
            fc = f[:, :, y0:y0 + self.box, x0:x0 + self.box].sum(dim=(2, 3))      # (N, C)
            planes = [x]
            for a, b in self.resid:
                k = (fc[:, a] / fc[:, b].clamp(min=1.0)).clamp(0.0, 2.0)
                r = f[:, a] - k[:, None, None] * f[:, b]
                planes.append((torch.sign(r) * torch.log(r.abs() + torch.sqrt(r * r + 1.0)))[:, None])
            return torch.cat(planes + mirror, dim=1)

        def embed(self, planes):
            """Pooled features of the input planes (``with_residuals`` of a stamp)."""
            f = self.features(planes)
            return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)

        def logits_planes(self, planes):
            """Training-mode logits with random dropout (one sample) of the input planes. The planes
            are made before any rotation of the stamp (``fit`` augments them), so the mirror residual
            is always taken about the object's own pixel."""
            f = nn.functional.dropout(self.embed(planes), self.p, self.training)
            h = nn.functional.dropout(torch.relu(self.fc1(f)), self.p, self.training)
            return self.fc2(h)

        def logits(self, x):
            """Training-mode logits with random dropout (one sample) of a stamp."""
            return self.logits_planes(self.with_residuals(x))

        def sample_logits(self, x):
            """Eval-mode logits of every (symmetry, dropout mask) sample, before the temperature: (N, V*T, C)."""
            n = x.shape[0]
            x = self.with_residuals(x)  # before the symmetries: the mirror is about the object's pixel
            if tta > 1:
                xt = x.transpose(2, 3)
                views = [x, xt.flip(2), x.flip(2).flip(3), xt.flip(3)][:min(tta, 4)]  # rot90 by k = 0..3
                if tta == 2:
                    views = [x, torch.flip(x, dims=(3,))]
                elif tta == 8:
                    views += [torch.flip(v, dims=(3,)) for v in views]
                x = torch.cat(views, dim=0)
            f = self.embed(x)                                          # (V*N, F)
            f = f.reshape(tta, n, -1).transpose(0, 1).reshape(n, tta, 1, -1)
            h = torch.relu(self.fc1(f * self.mask1[None, None]))       # (N, V, T, H)
            z = self.fc2(h * self.mask2[None, None])                   # (N, V, T, C)
            return z.reshape(n, -1, z.shape[-1])

        def forward(self, x):
            if self.training:
                return self.logits(x)
            z = self.sample_logits(x) / self.temperature + self.logit_bias
            p = torch.softmax(z, dim=-1)                               # (N, V*T, C)
            return p.mean(dim=1), p.std(dim=1, unbiased=False)

    return StampNet()


NET_KWARGS = {"widths": [16, 32, 64, 64], "hidden": 64, "p_drop": 0.3, "mc_samples": 16, "mask_seed": 0, "tta": 1}


def load_torch_model(model_dir: str | Path):
    """The torch twin of a shipped stamp model (``model.pt`` + the card's ``training.net``), or None."""
    from pipeline.modelcard import load_card

    model_dir = Path(model_dir)
    card = load_card(model_dir)
    pt = model_dir / "model.pt"
    net = card.training.get("net")
    if not pt.exists() or not net:
        return None
    import torch

    model = stamp_net(len(card.bands) * len(card.normalisation.get("planes", ["image"])), len(card.classes), **net)
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    model.eval()
    return model


def augment(xb, rng: np.random.Generator):
    """A random symmetry of the square (rot90 x flip) per batch: the sky has no preferred direction."""
    import torch

    k = int(rng.integers(0, 4))
    xb = torch.rot90(xb, k, dims=(2, 3))
    if rng.random() < 0.5:
        xb = torch.flip(xb, dims=(3,))
    return xb


def fit(model, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int = 128, lr: float = 2e-3, seed: int = 0,
        weight_decay: float = 1e-4, x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
        max_steps: int | None = None, progress: bool = True, val_max: int = 1000) -> dict[str, Any]:
    """Train with AdamW + one-cycle schedule and cross-entropy; returns a small log (losses, seconds).

    The per-epoch validation loss is measured on at most ``val_max`` validation stamps (a fixed
    random subset), to keep its cost small next to the training steps.
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if x_val is not None and y_val is not None and len(y_val) > val_max:
        keep = np.sort(np.random.default_rng(seed + 1).choice(len(y_val), val_max, replace=False))
        x_val, y_val = x_val[keep], y_val[keep]
    n = len(y)
    steps_per_epoch = max(1, n // batch)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    log: dict[str, Any] = {"epochs": [], "steps": 0}
    t0 = time.perf_counter()
    step = 0
    for ep in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        tot, cnt = 0.0, 0
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * batch:(i + 1) * batch]
            xb = augment(model.with_residuals(xt[idx].float()), rng)
            loss = torch.nn.functional.cross_entropy(model.logits_planes(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
            step += 1
        entry = {"epoch": ep + 1, "train_loss": round(tot / max(cnt, 1), 4), "seconds": round(time.perf_counter() - t0, 1)}
        if x_val is not None and y_val is not None and len(y_val):
            p, _ = predict_torch(model, x_val)
            entry["val_loss"] = round(float(-np.mean(np.log(np.clip(p[np.arange(len(y_val)), y_val], 1e-7, 1)))), 4)
            entry["val_acc"] = round(float(np.mean(np.argmax(p, 1) == y_val)), 4)
        log["epochs"].append(entry)
        if progress:
            print("    " + ", ".join(f"{k} {v}" for k, v in entry.items()), flush=True)
        if step >= total:
            break
    log["steps"] = step
    log["seconds"] = round(time.perf_counter() - t0, 1)
    model.eval()
    return log


def predict_torch(model, x: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(probs, probs_std) of the eval-mode model (fixed MC-dropout masks)."""
    import torch

    model.eval()
    ps, ss = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            p, s = model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).float())
            ps.append(p.numpy())
            ss.append(s.numpy())
    c = model.fc2.out_features
    return (np.concatenate(ps) if ps else np.zeros((0, c), np.float32)), (np.concatenate(ss) if ss else np.zeros((0, c), np.float32))


def fit_temperature(model, x: np.ndarray, y: np.ndarray, grid: Sequence[float] | None = None, batch: int = 512) -> float:
    """Set the model's temperature to the value minimising the NLL of the mean probabilities on (x, y)."""
    import torch

    grid = np.exp(np.linspace(np.log(0.5), np.log(3.0), 61)) if grid is None else np.asarray(grid)
    model.eval()
    with torch.no_grad():
        z = np.concatenate([model.sample_logits(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).float()).numpy()
                            for i in range(0, len(x), batch)]).astype(np.float64)
    bias = model.logit_bias.numpy().astype(np.float64)
    best, best_t = np.inf, 1.0
    for t in grid:
        zz = z / t + bias
        zz -= zz.max(axis=-1, keepdims=True)
        p = np.exp(zz)
        p = (p / p.sum(axis=-1, keepdims=True)).mean(axis=1)
        nll = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1)))
        if nll < best:
            best, best_t = nll, float(t)
    model.temperature.fill_(best_t)
    return best_t


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    from scipy.stats import rankdata

    score, label = np.asarray(score, float), np.asarray(label).astype(bool)
    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[label].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def expected_calibration_error(p: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence (equal-width bins, weighted by counts)."""
    if len(y) == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def export_stamp_model(model, out_dir: Path, spec: CutoutSpec, *, n_check: int = 64, seed: int = 0) -> tuple[Path, float]:
    """ONNX export (dynamic batch axis) + max |ORT - torch| on fresh random stamps-like inputs."""
    import torch

    from workflows.train.onnx_export import export_onnx, max_abs_diff_onnx_torch

    out_dir = Path(out_dir)
    path = out_dir / "model.onnx"
    model.eval()
    example = torch.zeros(2, spec.channels, spec.size, spec.size)
    export_onnx(model, [example], path, input_names=[spec.input_name], output_names=["probs", "probs_std"],
                dynamic_axes={spec.input_name: {0: "batch"}, "probs": {0: "batch"}, "probs_std": {0: "batch"}})
    rng = np.random.default_rng(seed)
    fresh = np.arcsinh(rng.normal(0.0, 1.0, (n_check, spec.channels, spec.size, spec.size))
                       * rng.lognormal(0.0, 2.0, (n_check, 1, 1, 1))).astype(np.float32)
    diff = max_abs_diff_onnx_torch(model, path, {spec.input_name: fresh})
    torch.save(model.state_dict(), out_dir / "model.pt")
    return path, diff
