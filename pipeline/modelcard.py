"""Model cards: what a shipped ONNX model expects and how it was made, checked on load.

Stages read normalisation, band order, stamp size, class names and thresholds from the card,
never from constants in code; a card whose sha256 does not match its ONNX file is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError

CARD_NAME = "card.json"


class ModelCard(BaseModel):
    """Everything needed to use (and to trust) one ONNX model."""

    model_config = ConfigDict(extra="allow")
    name: str
    version: str
    onnx: str = Field("model.onnx", description="ONNX file name, beside the card")
    sha256: str
    inputs: dict[str, Any] = Field(default_factory=dict, description="input names -> shape/dtype/meaning")
    outputs: dict[str, Any] = Field(default_factory=dict)
    bands: list[str] = Field(default_factory=list)
    classes: list[str] = Field(default_factory=list)
    normalisation: dict[str, Any] = Field(default_factory=dict)
    thresholds: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict, description="seed, set size, epochs, time, code")
    metrics: dict[str, Any] = Field(default_factory=dict, description="held-out metrics")
    screen: dict[str, Any] = Field(default_factory=dict, description=(
        "optional cheaper first-pass graph of the same model: {onnx, sha256, threshold, ...}; a stage runs it on "
        "every object and the main graph only where its score reaches the threshold"))

    def onnx_path(self, model_dir: Path) -> Path:
        return Path(model_dir) / self.onnx

    def screen_path(self, model_dir: Path) -> Path | None:
        """The first-pass ONNX file, or None when the card has no screen."""
        return Path(model_dir) / self.screen["onnx"] if self.screen else None


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_card(model_dir: str | Path) -> ModelCard:
    """Read ``card.json`` of a model directory and verify the ONNX file's sha256."""
    model_dir = Path(model_dir)
    card_path = model_dir / CARD_NAME
    if not card_path.exists():
        raise ConfigError(f"model directory {str(model_dir)!r} has no {CARD_NAME}")
    card = ModelCard.model_validate_json(card_path.read_text())
    onnx = card.onnx_path(model_dir)
    if not onnx.exists():
        raise ConfigError(f"model card {str(card_path)!r} names {card.onnx!r}, which does not exist")
    got = sha256_file(onnx)
    if got != card.sha256:
        raise ConfigError(f"model {str(onnx)!r}: sha256 {got[:12]}… does not match its card ({card.sha256[:12]}…)")
    if card.screen:
        missing = [k for k in ("onnx", "sha256", "threshold") if k not in card.screen]
        if missing:
            raise ConfigError(f"model card {str(card_path)!r}: its screen lacks {missing}")
        sp = card.screen_path(model_dir)
        if not sp.exists():
            raise ConfigError(f"model card {str(card_path)!r} names the screen {card.screen['onnx']!r}, which does not exist")
        got = sha256_file(sp)
        if got != card.screen["sha256"]:
            raise ConfigError(f"model {str(sp)!r}: sha256 {got[:12]}… does not match its card's screen "
                              f"({str(card.screen['sha256'])[:12]}…)")
    return card


def write_card(model_dir: str | Path, card: ModelCard, markdown: str | None = None) -> Path:
    """Write ``card.json`` (and an optional human-readable ``README.md``) beside the model."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CARD_NAME
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=1, sort_keys=False) + "\n")
    if markdown:
        (model_dir / "README.md").write_text(markdown)
    return path
