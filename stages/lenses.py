"""Strong-lens candidates: a CNN lens score for every plausible deflector (ONNX, multi-band stamps).

Plausible deflectors are selected on the measured photometry (all configurable): bright enough
(Kron magnitude in ``mag_band`` at most ``max_mag``), red (Kron colour ``color_bands`` at least
``min_color``) and extended (``refExtendedness`` at least ``min_extendedness`` when the objects
table has that column; without it no extendedness cut is made, and the attrs say so). Their stamps
come from the engine's cutout service with the bands, size and stretch of the model card; the
network was trained on mock lenses (lenstronomy SIE + shear, :mod:`workflows.mock.lenses`)
against ordinary deflector-like galaxies and hard negatives (blends, mergers, rings, spirals,
edge-on disks, red stars).

Per object (same rows and order as ``objects``): ``lens_score`` (probability of the lens class,
mean over the model's fixed Monte-Carlo-dropout samples; a ranking score, not a calibrated
probability for a survey where lenses are ~1e-3 of deflectors), ``lens_scoreErr`` (its standard
deviation over the samples) and ``lens_flags`` (:data:`LENS_FLAGS`); objects that are not
candidates get NaN and the ``not_candidate`` flag.

When the model card has a screen (:mod:`workflows.train.lens_screen`: the same network on one view
of the stamp, about 8x cheaper than the 8 symmetries), every candidate is scored by the screen first
and only those at or above its threshold by the full model; the others keep the screen's score
(far below any candidate's) and the ``screened`` flag. On validation tiles this sends about a fifth
of the candidates to the full model, and every TPR at FPR 1 % and 0.1 % is unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pydantic import Field, field_validator

from pipeline.bits import Bit, BitRegistry
from pipeline.errors import ConfigError
from pipeline.stage import CAVEATS
from pipeline.table import Table

from .morphology import StampModelConfig, StampModelStage, check_tile, copy_stamp_flags, finite_positions, load_stamp_model, score_stamps

SHIPPED_MODEL = Path(__file__).parent / "models" / "lenses"
NJY_ZEROPOINT = 31.4

LENS_FLAGS = BitRegistry("lens_flags", [
    Bit("edge", 0, "the stamp extends beyond the tile (zero-padded there)"),
    Bit("masked", 1, "many of the stamp's central pixels are masked (bad, saturated or artefact)"),
    Bit("not_candidate", 2, "not scored: fails the deflector selection (magnitude, colour, extendedness)"),
    Bit("missing_band", 3, "not scored: the tile lacks a band the model or the selection needs"),
    Bit("screened", 4, "scored by the model card's one-view screen only: its score there was below the screen "
                       "threshold, far below any candidate's (lens_scoreErr: the spread of the dropout samples alone)"),
], dtype=np.uint16)


class LensesConfig(StampModelConfig):
    model_dir: str | None = Field(None, description="model directory (model.onnx + card.json); None: the shipped "
                                                    "stages/models/lenses")
    mag_band: str = Field("i", min_length=1, max_length=1, description="band of the magnitude cut")
    max_mag: float = Field(23.0, description="deflector candidates: Kron AB magnitude in mag_band at most this")
    color_bands: tuple[str, str] = Field(("g", "i"), description="colour (first - second, Kron AB) of the red cut")
    min_color: float | None = Field(1.0, description="deflector candidates: colour at least this (None: no colour cut)")
    min_extendedness: float | None = Field(0.5, ge=0, le=1, description="deflector candidates: refExtendedness at "
                                                                        "least this when the column exists (None: no cut)")
    screen: bool = Field(True, description="when the model card has a screen (the same network on one view of the "
                                           "stamp, ~8x cheaper), run it first and the full model only on candidates "
                                           "scoring at least its threshold there; False: the full model on every candidate")

    @field_validator("color_bands")
    @classmethod
    def _two_bands(cls, v: tuple[str, str]) -> tuple[str, str]:
        if len(v) != 2 or v[0] == v[1]:
            raise ValueError("color_bands must be two different bands")
        return v


def load_screen(card: Any, model_dir: Path, device: str) -> Any | None:
    """ONNX session of the card's screen (checked like the main graph), or None when it has none."""
    from pipeline.onnx import session

    path = card.screen_path(model_dir)
    if path is None:
        return None
    sess = session(path, device=device)
    outs = [o.name for o in sess.get_outputs()]
    if outs[:2] != ["probs", "probs_std"]:
        raise ConfigError(f"model {card.name!r}: screen outputs {outs}, expected ['probs', 'probs_std']")
    return sess


def passes_screen(card: Any, screen_score: np.ndarray) -> np.ndarray:
    """Which candidates the full model scores after the card's screen: screen score at least its threshold."""
    return np.asarray(screen_score) >= float(card.screen["threshold"])


def kron_mag(objects: Any, band: str) -> np.ndarray:
    f = np.asarray(objects[f"{band}_kronFlux"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, NJY_ZEROPOINT - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.inf)


def deflector_candidates(objects: Any, config: LensesConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Boolean mask of plausible deflectors and a record of the cuts applied."""
    n = len(objects)
    need = {config.mag_band, *(config.color_bands if config.min_color is not None else ())}
    missing = [b for b in sorted(need) if f"{b}_kronFlux" not in objects]
    if missing:
        return np.zeros(n, bool), {"missing_bands": missing}
    mag = kron_mag(objects, config.mag_band)
    sel = (mag <= config.max_mag) & finite_positions(objects)
    used: dict[str, Any] = {"max_mag": config.max_mag, "mag_band": config.mag_band}
    if config.min_color is not None:
        b1, b2 = config.color_bands
        with np.errstate(invalid="ignore"):
            color = kron_mag(objects, b1) - kron_mag(objects, b2)
        # a source undetected in the bluer band is as red as it gets
        color = np.where(np.isinf(kron_mag(objects, b1)) & np.isfinite(kron_mag(objects, b2)), np.inf, color)
        sel &= np.nan_to_num(color, nan=-np.inf) >= config.min_color
        used.update({"color": f"{b1}-{b2}", "min_color": config.min_color})
    if config.min_extendedness is not None:
        if "refExtendedness" in objects:
            ext = np.asarray(objects["refExtendedness"], np.float64)
            sel &= np.nan_to_num(ext, nan=1.0) >= config.min_extendedness
            used["min_extendedness"] = config.min_extendedness
        else:
            used["min_extendedness"] = "not applied: objects has no refExtendedness"
    return sel, used


class Lenses(StampModelStage):
    """Lens scores (+ MC-dropout uncertainty) for the plausible deflectors of a tile."""

    name = "lenses"
    version = "1"
    shipped_model = SHIPPED_MODEL
    provides = {"lenses": "strong-lens score per plausible deflector (CNN on multi-band stamps), with uncertainty"}
    Config = LensesConfig

    def model_files(self, config: Any) -> list[Path]:
        files = super().model_files(config)
        if config.screen:
            import json

            from pipeline.modelcard import CARD_NAME

            d = self.model_dir(config)
            try:
                name = (json.loads((d / CARD_NAME).read_text()).get("screen") or {}).get("onnx")
            except (OSError, ValueError):
                name = None  # a missing or broken card is reported when the stage loads it
            if name:
                files.append(d / name)
        return files

    def run(self, inputs: Mapping[str, Any], config: LensesConfig) -> dict[str, Any]:
        tile, objects = inputs["exposure"], inputs["objects"]
        card, spec, sess = load_stamp_model(self.model_dir(config), config.device)
        if "lens" not in card.classes:
            raise ConfigError(f"model {card.name!r}: card classes {card.classes} have no 'lens' class")
        k_lens = list(card.classes).index("lens")
        n = len(objects)
        score = np.full(n, np.nan, np.float32)
        err = np.full(n, np.nan, np.float32)
        flags = np.zeros(n, np.uint16)
        has_bands = check_tile(spec, tile, config.on_missing_band)
        cand, used = deflector_candidates(objects, config)
        if not has_bands or used.get("missing_bands"):
            flags[:] |= np.uint16(LENS_FLAGS["missing_band"])
            cand[:] = False
        flags[~cand] |= np.uint16(LENS_FLAGS["not_candidate"])
        rows = np.flatnonzero(cand)
        screen = load_screen(card, self.model_dir(config), config.device) if config.screen else None
        n_full = rows.size
        if rows.size:
            kw = {"batch": config.batch, "chunk": config.chunk, "max_masked_fraction": config.max_masked_fraction}
            p, s, sf = score_stamps(inputs, spec, screen or sess, rows, **kw)
            score[rows], err[rows] = p[:, k_lens], s[:, k_lens]
            flags[rows] |= copy_stamp_flags(sf, LENS_FLAGS)
            if screen is not None:
                again = passes_screen(card, p[:, k_lens])
                flags[rows[~again]] |= np.uint16(LENS_FLAGS["screened"])
                rows_full = rows[again]
                n_full = rows_full.size
                if rows_full.size:
                    p, s, _ = score_stamps(inputs, spec, sess, rows_full, **kw)
                    score[rows_full], err[rows_full] = p[:, k_lens], s[:, k_lens]
        t = Table()
        ids = objects["objectId"] if "objectId" in objects else np.arange(n, dtype=np.int64)
        t.add("objectId", np.asarray(ids), "", "unique object id in the release", "meta.id;meta.main")
        t.add("lens_score", score, "", "strong-lens score of a plausible deflector (CNN probability of the lens class "
              f"on {''.join(spec.bands)} stamps; NaN: not a candidate)", "stat.probability;src.class")
        t.add("lens_scoreErr", err, "", "standard deviation of lens_score over the model's MC-dropout samples",
              "stat.stdev;stat.probability")
        t.add("lens_flags", flags, "", "lens flags (stages.lenses.LENS_FLAGS, bits in attrs)", "meta.code")
        t.attrs.update({"lens_model": f"{card.name} v{card.version}", "lens_model_sha256": card.sha256,
                        "lens_bands": list(spec.bands), "lens_stamp_size": spec.size, "lens_selection": used,
                        "lens_n_candidates": int(rows.size), "lens_n_full_model": int(n_full),
                        "lens_screen_threshold": float(card.screen["threshold"]) if screen is not None else None,
                        "lens_flag_bits": LENS_FLAGS.as_attrs()})
        out: dict[str, Any] = {"lenses": t}
        if not has_bands or used.get("missing_bands"):
            need = sorted(set(spec.bands) - set(tile.bands)) or used.get("missing_bands")
            out[CAVEATS] = [f"not scored: band(s) {need} missing (lens_flags missing_band)"]
        return out
