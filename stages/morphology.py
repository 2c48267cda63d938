"""Morphology: class probabilities of every object from a small CNN on multi-band stamps (ONNX).

The model card names the classes (the mock survey's truth types: star, spheroid, disk, edge-on
disk, irregular), the bands in channel order, the stamp size, the pixel scale and the stretch;
the stage takes all of them from the card (never from constants here) and refuses an ONNX file
whose input disagrees with its card, or a tile of another pixel scale. Stamps come from the
engine's cutout service (:mod:`pipeline.cutouts`) at the detected positions; inference is batched
through :func:`pipeline.onnx.run_batched` with one fixed stamp shape.

Per object (same rows and order as ``objects``): ``morph_p_<class>`` (mean over the model's fixed
Monte-Carlo-dropout samples; they sum to 1), ``morph_p_<class>Err`` (their standard deviation:
the model's epistemic uncertainty), ``morph_class`` (index of the most probable class; names in
the table attrs and the card), ``morph_entropy`` (entropy of the mean probabilities, total
uncertainty, nats), ``morph_extendedness`` (1 - p(star): a star/galaxy probability like
``refExtendedness``) and ``morph_flags`` (:data:`MORPH_FLAGS`). Only objects whose combined Kron
S/N over the model's bands reaches ``min_snr`` are scored; the others get NaN (class -1) and the
``low_snr`` flag.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from pipeline.bits import Bit, BitRegistry
from pipeline.cutouts import STAMP_FLAGS, CutoutSpec
from pipeline.errors import BadInputError, ConfigError
from pipeline.modelcard import CARD_NAME, ModelCard, load_card
from pipeline.stage import CAVEATS, Stage, StageConfig
from pipeline.table import Table

log = logging.getLogger("surveypipe.stages.image_models")
SHIPPED_MODEL = Path(__file__).parent / "models" / "morphology"

MORPH_FLAGS = BitRegistry("morph_flags", [
    Bit("edge", 0, "the stamp extends beyond the tile (zero-padded there)"),
    Bit("masked", 1, "many of the stamp's central pixels are masked (bad, saturated or artefact)"),
    Bit("low_snr", 2, "not scored: combined Kron S/N below min_snr (or no usable flux)"),
    Bit("missing_band", 3, "not scored: the tile lacks a band the model needs"),
], dtype=np.uint16)


class StampModelConfig(StageConfig):
    """Settings every cutout-CNN stage shares (how stamps are cut, flagged and run)."""

    max_masked_fraction: float = Field(0.1, ge=0, le=1, description="flag 'masked' when more than this fraction of "
                                                                   "the pixels within S/4 of the stamp centre are masked")
    on_missing_band: Literal["nan", "error"] = Field("nan", description="a tile without one of the model's bands: "
                                                                         "NaN + missing_band flag, or a bad-input error")
    batch: int = Field(32, gt=0, le=65536, description="stamps per ONNX Runtime call (32: as fast per stamp as 64 "
                                                          "or 256 on a CPU core, with 35-90 MB less activation memory "
                                                          "than 64)")
    chunk: int = Field(1024, gt=0, json_schema_extra={"output_neutral": True}, description=(
        "objects whose stamps are cut at once (bounds memory: 4096 held ~200 MB more at the stage's peak on a "
        "2048^2 tile for no speed gain)"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime device")


class MorphologyConfig(StampModelConfig):
    model_dir: str | None = Field(None, description="model directory (model.onnx + card.json); None: the shipped "
                                                    "stages/models/morphology")
    min_snr: float = Field(10.0, ge=0, description="score objects whose combined Kron S/N over the model's bands "
                                                   "is at least this; the others get NaN and the low_snr flag")


# ---------------------------------------------------------------- shared with the lens stage
_cards: dict[tuple[str, float, int], tuple[ModelCard, CutoutSpec]] = {}
_lock = threading.Lock()


def load_stamp_model(model_dir: str | Path, device: str = "auto") -> tuple[ModelCard, CutoutSpec, Any]:
    """(card, cutout spec, ONNX session) of a stamp model; the card is checked against the ONNX file.

    Raises :class:`~pipeline.errors.ConfigError` with what differs when the card's bands, planes
    or stamp size disagree with the ONNX input, or the card lists no classes.
    """
    from pipeline.onnx import session

    model_dir = Path(model_dir)
    card_path = model_dir / CARD_NAME
    try:
        st = card_path.stat()
    except OSError as exc:
        raise ConfigError(f"model directory {str(model_dir)!r} has no {CARD_NAME}") from exc
    key = (str(card_path.resolve()), st.st_mtime, st.st_size)
    with _lock:
        hit = _cards.get(key)
    if hit is None:
        card = load_card(model_dir)
        spec = CutoutSpec.from_card(card)
        if not card.classes:
            raise ConfigError(f"model {card.name!r}: card lists no classes")
        hit = (card, spec)
        with _lock:
            _cards[key] = hit
    card, spec = hit
    sess = session(card.onnx_path(model_dir), device=device)
    spec.check_session(sess)
    outs = [o.name for o in sess.get_outputs()]
    if outs[:2] != ["probs", "probs_std"]:
        raise ConfigError(f"model {card.name!r}: ONNX outputs {outs}, expected ['probs', 'probs_std']")
    ncls = sess.get_outputs()[0].shape[-1]
    if isinstance(ncls, int) and ncls != len(card.classes):
        raise ConfigError(f"model {card.name!r}: ONNX gives {ncls} class probabilities, card lists "
                          f"{len(card.classes)} classes {card.classes}")
    return card, spec, sess


def object_snr(objects: Any, bands: Sequence[str]) -> np.ndarray:
    """Combined S/N of the Kron fluxes over ``bands``: sqrt(sum of (F/σ)^2 over bands with F > 0)."""
    s2 = np.zeros(len(objects))
    for b in bands:
        fk, ek = f"{b}_kronFlux", f"{b}_kronFluxErr"
        if fk not in objects or ek not in objects:
            continue
        f = np.asarray(objects[fk], np.float64)
        e = np.asarray(objects[ek], np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where((e > 0) & np.isfinite(f) & np.isfinite(e), f / e, 0.0)
        s2 += np.where(r > 0, r * r, 0.0)
    return np.sqrt(s2)


def sky_planes(inputs: Mapping[str, Any]) -> tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], Mapping[str, np.ndarray]]:
    """(background-subtracted images, inverse variance, bad) per band from the sky product."""
    tile, sky = inputs["exposure"], inputs["sky"]
    weights = getattr(sky, "weight", None) or tile.weight
    return sky.image, weights, sky.bad


def check_tile(spec: CutoutSpec, tile: Any, on_missing: str) -> bool:
    """True when the tile has every band of the model; a pixel-scale mismatch is always refused."""
    try:
        spec.check_tile(tile.bands, None, tile=tile.tile_id)
        ok = True
    except ConfigError as exc:
        if on_missing == "error":
            raise BadInputError(tile.tile_id, None, str(exc)) from exc
        log.warning("%s", exc)
        ok = False
    try:
        spec.check_tile(spec.bands, tile.pixel_scale_arcsec, tile=tile.tile_id)
    except ConfigError as exc:
        raise BadInputError(tile.tile_id, None, str(exc)) from exc
    return ok


def score_stamps(inputs: Mapping[str, Any], spec: CutoutSpec, sess: Any, rows: np.ndarray, *, batch: int, chunk: int,
                 max_masked_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs, probs_std, stamp flags) for the objects ``rows`` of ``objects``, cut and run in chunks."""
    from pipeline.onnx import run_batched

    objects = inputs["objects"]
    images, weights, bad = sky_planes(inputs)
    x = np.asarray(objects["x"], np.float64)[rows]
    y = np.asarray(objects["y"], np.float64)[rows]
    ps, ss, fs = [], [], []
    for _, inp, st in spec.batches(images, x, y, weights=weights, bad=bad, chunk=chunk):
        p, s = run_batched(sess, {spec.input_name: inp}, batch=batch, outputs=["probs", "probs_std"])
        ps.append(p)
        ss.append(s)
        fs.append(st.flags(max_masked_fraction=max_masked_fraction, radius=spec.size / 4))
    if not ps:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.uint8)
    return np.concatenate(ps), np.concatenate(ss), np.concatenate(fs)


def copy_stamp_flags(stamp_flags: np.ndarray, registry: BitRegistry) -> np.ndarray:
    out = np.zeros(len(stamp_flags), registry.dtype)
    for name in ("edge", "masked"):
        out[(stamp_flags & STAMP_FLAGS[name]) != 0] |= registry.dtype.type(registry[name])
    return out


def finite_positions(objects: Any) -> np.ndarray:
    return np.isfinite(np.asarray(objects["x"], np.float64)) & np.isfinite(np.asarray(objects["y"], np.float64))


# ---------------------------------------------------------------- the stages
class StampModelStage(Stage):
    """A stage that runs a cutout CNN (model.onnx + card) on the objects of a tile: where its model
    lives (``config.model_dir``, else the shipped one) and which files decide its output."""

    shipped_model: Path = SHIPPED_MODEL
    requires = ("exposure", "sky", "objects")
    resources: Mapping[str, float] = {}

    def model_dir(self, config: Any) -> Path:
        return Path(config.model_dir) if config.model_dir else self.shipped_model

    def model_files(self, config: Any) -> list[Path]:
        d = self.model_dir(config)
        return [d / "model.onnx", d / CARD_NAME]


class Morphology(StampModelStage):
    """Morphological class probabilities (+ MC-dropout uncertainty) for objects above an S/N cut."""

    name = "morphology"
    version = "1"
    provides = {"morphology": "morphological class probabilities per object (CNN on multi-band stamps), "
                              "with uncertainties and a star/galaxy probability"}
    Config = MorphologyConfig

    def run(self, inputs: Mapping[str, Any], config: MorphologyConfig) -> dict[str, Any]:
        tile, objects = inputs["exposure"], inputs["objects"]
        card, spec, sess = load_stamp_model(self.model_dir(config), config.device)
        classes = list(card.classes)
        n, c = len(objects), len(classes)
        has_bands = check_tile(spec, tile, config.on_missing_band)
        flags = np.zeros(n, np.uint16)
        probs = np.full((n, c), np.nan, np.float32)
        std = np.full((n, c), np.nan, np.float32)
        if has_bands:
            snr = object_snr(objects, spec.bands)
            sel = (snr >= config.min_snr) & finite_positions(objects)
            flags[~sel] |= np.uint16(MORPH_FLAGS["low_snr"])
            rows = np.flatnonzero(sel)
            if rows.size:
                p, s, sf = score_stamps(inputs, spec, sess, rows, batch=config.batch, chunk=config.chunk,
                                        max_masked_fraction=config.max_masked_fraction)
                probs[rows], std[rows] = p, s
                flags[rows] |= copy_stamp_flags(sf, MORPH_FLAGS)
        else:
            flags[:] |= np.uint16(MORPH_FLAGS["missing_band"])
        scored = np.all(np.isfinite(probs), axis=1)
        t = Table()
        ids = objects["objectId"] if "objectId" in objects else np.arange(n, dtype=np.int64)
        t.add("objectId", np.asarray(ids), "", "unique object id in the release", "meta.id;meta.main")
        for j, name in enumerate(classes):
            t.add(f"morph_p_{name}", probs[:, j], "", f"probability that the object is a {name} (CNN on "
                  f"{''.join(spec.bands)} stamps; mean over MC-dropout samples)", "stat.probability;src.morph.type")
        for j, name in enumerate(classes):
            t.add(f"morph_p_{name}Err", std[:, j], "", f"standard deviation of morph_p_{name} over the model's "
                  "MC-dropout samples (epistemic uncertainty)", "stat.stdev;stat.probability")
        cls = np.where(scored, np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1), -1).astype(np.int16)
        t.add("morph_class", cls, "", "index of the most probable class (names in attrs morph_classes); -1: not scored",
              "src.morph.type")
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
        t.add("morph_entropy", np.where(scored, ent, np.nan).astype(np.float32), "",
              "entropy of the class probabilities (nats): total predictive uncertainty", "stat.uncertainty")
        if "star" in classes:
            ext = 1.0 - probs[:, classes.index("star")]
            t.add("morph_extendedness", ext.astype(np.float32), "",
                  "probability that the object is extended (1 - morph_p_star): a refExtendedness-like star/galaxy "
                  "classifier", "stat.probability;src.class.starGalaxy")
        t.add("morph_flags", flags, "", "morphology flags (stages.morphology.MORPH_FLAGS, bits in attrs)", "meta.code")
        t.attrs.update({"morph_classes": classes, "morph_model": f"{card.name} v{card.version}",
                        "morph_model_sha256": card.sha256, "morph_bands": list(spec.bands),
                        "morph_stamp_size": spec.size, "morph_min_snr": config.min_snr,
                        "morph_flag_bits": MORPH_FLAGS.as_attrs()})
        out: dict[str, Any] = {"morphology": t}
        if not has_bands:
            out[CAVEATS] = [f"not scored: band(s) {sorted(set(spec.bands) - set(tile.bands))} missing "
                            "(morph_flags missing_band)"]
        return out
