"""The Stage protocol: a stage declares what it needs and makes; the engine does the rest.

A stage's ``run`` is a pure function of its inputs, its validated config and its model files,
so the engine can cache, checkpoint and rerun it from declarations alone. Stages never touch
Dask, Zarr or the CLI. One exception, for memory: a stage may reuse the pixel buffers of an input
the engine made for this one task (the exposure it reads per tile) when its config says so, and
marks that input consumed (see ``stages.background``).

Config fields marked ``json_schema_extra={"output_neutral": True}`` change how a stage runs,
never what it outputs (memory, devices, batch sizes): they stay out of cache keys and config hashes,
so flipping one reuses cached products and keeps a model's fingerprint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

Products = dict[str, Any]


class StageConfig(BaseModel):
    """Base of every stage config: typed, documented, frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ImageSet:
    """Per-band 2-D planes of one product (e.g. the artefact mask), stored chunked and compressed."""

    planes: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


CAVEATS = "_caveats"  # reserved output key of Stage.run: list of caveat sentences


class Stage:
    """Base class of every science stage.

    Subclasses set the class attributes below and implement :meth:`run`.
    ``provides`` maps each product to a one-line description; products listed in
    ``transient`` are passed downstream but not written to the store. ``optional`` inputs are
    wired when a stage of the graph provides them (e.g. the artefact mask), else absent.

    A stage that succeeds with a reservation (a band it needed is missing, a limit it had to
    work around) returns a list of short sentences under the key :data:`CAVEATS`; the tile is
    then a *partial success*: committed, but with ``caveats`` in its provenance and status.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()  # used when some stage in the graph provides them
    provides: ClassVar[Mapping[str, str]] = {}
    transient: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[StageConfig]] = StageConfig
    resources: ClassVar[Mapping[str, float]] = {}

    def model_files(self, config: StageConfig) -> list[Path]:
        """Files whose bytes decide the output (ONNX models, cards): hashed into the cache key."""
        return []

    def run(self, inputs: Mapping[str, Any], config: StageConfig) -> Products:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Stage {self.name} v{self.version}>"


def output_config(config: BaseModel) -> dict[str, Any]:
    """The config's fields that can change outputs (all but those marked ``output_neutral``), as JSON."""
    neutral = {name for name, f in type(config).model_fields.items()
               if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("output_neutral")}
    return config.model_dump(mode="json", exclude=neutral or None)


def config_hash(config: BaseModel) -> str:
    return hashlib.sha256(json.dumps(output_config(config), sort_keys=True).encode()).hexdigest()[:16]


_model_hash_cache: dict[tuple[str, float, int], str] = {}


def model_sha256(path: Path) -> str:
    """sha256 of a model file, cached by (path, mtime, size) so it is read once per process."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _model_hash_cache:
        _model_hash_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _model_hash_cache[key]


def cache_key(stage: Stage, config: StageConfig, input_keys: Mapping[str, str]) -> str:
    """Hash of (stage version, config, model sha256s, input keys): equal keys -> equal outputs."""
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "config": output_config(config),
        "models": {p.name: model_sha256(p) for p in stage.model_files(config)},
        "inputs": dict(sorted(input_keys.items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
