"""Data release manifests: which tiles exist, their per-band FITS files and HDUs.

Structural checks happen here (safe ids, known bands, duplicates). Checks that need to open
files (missing file, bad HDU, grids) happen in :mod:`pipeline.tile` on the worker, so one bad
tile becomes one failed tile and never stops the release.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ManifestError

SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
HduRef = Union[int, str]


def check_safe_name(value: str, what: str) -> str:
    """Reject names that could write outside the output directory (``/``, ``..``, odd characters)."""
    if not SAFE_ID.match(value) or value in (".", "..") or ".." in value:
        raise ValueError(f"{what} {value!r} is not allowed: use only [A-Za-z0-9._-] and no '..'")
    return value


class BandFile(BaseModel):
    """Where one band of one tile lives: a FITS file and the HDUs of image, weight and mask."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    image: HduRef = 0
    weight: HduRef | None = None
    mask: HduRef | None = None
    weight_path: str | None = Field(None, description="separate file for the weight plane")
    mask_path: str | None = Field(None, description="separate file for the mask plane")
    zeropoint: float | None = Field(None, description="AB mag of one image unit; overrides MAGZERO")


class InnerRegion(BaseModel):
    """Pixels a tile owns (half-open ranges, 0-based); objects outside are not primary."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    xmin: int
    xmax: int
    ymin: int
    ymax: int

    @model_validator(mode="after")
    def _ordered(self) -> "InnerRegion":
        if self.xmax <= self.xmin or self.ymax <= self.ymin:
            raise ValueError(f"inner region is empty: {self.model_dump()}")
        return self

    def contains(self, x: Any, y: Any) -> Any:
        return (x >= self.xmin) & (x < self.xmax) & (y >= self.ymin) & (y < self.ymax)


class TileSpec(BaseModel):
    """One tile: an id, a band -> file map and an optional inner region."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    files: dict[str, BandFile]
    inner: InnerRegion | None = None

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        return check_safe_name(v, "tile id")

    @field_validator("files")
    @classmethod
    def _bands(cls, v: dict[str, BandFile]) -> dict[str, BandFile]:
        if not v:
            raise ValueError("tile lists no band files")
        for band in v:
            check_safe_name(band, "band name")
        return v


class TileProblem(BaseModel):
    """A tile entry rejected while reading the manifest; it is reported as a failed tile."""

    tile: str
    file: str | None = None
    reason: str

    def message(self) -> str:
        return f"tile {self.tile!r}" + (f", file {self.file!r}" if self.file else "") + f": {self.reason}"


class Manifest(BaseModel):
    """A data release: name, band order and the tiles (paths relative to the manifest)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    bands: list[str]
    tiles: list[TileSpec]
    root: str = Field("", description="directory the tile paths are relative to (set on load)")
    problems: list[TileProblem] = Field(default_factory=list)
    sha256: str = ""

    def tile(self, tile_id: str) -> TileSpec:
        for t in self.tiles:
            if t.id == tile_id:
                return t
        raise KeyError(f"tile {tile_id!r} is not in manifest {self.name!r}")

    def resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else Path(self.root) / p


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; bad tile entries go to ``problems``, good ones to ``tiles``."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"manifest {str(path)!r}: cannot read ({exc.strerror or exc})") from exc
    try:
        raw = yaml.safe_load(raw_bytes) if path.suffix != ".json" else json.loads(raw_bytes)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {str(path)!r}: not valid YAML/JSON ({exc})") from exc
    if not isinstance(raw, dict) or "tiles" not in raw or "bands" not in raw:
        raise ManifestError(f"manifest {str(path)!r}: needs the keys 'name', 'bands' and 'tiles'")
    bands = raw.get("bands") or []
    if not isinstance(bands, list) or not bands:
        raise ManifestError(f"manifest {str(path)!r}: 'bands' must be a non-empty list")
    for b in bands:
        try:
            check_safe_name(str(b), "band name")
        except ValueError as exc:
            raise ManifestError(f"manifest {str(path)!r}: {exc}") from exc
    good: list[TileSpec] = []
    problems: list[TileProblem] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw.get("tiles") or []):
        tid = str(entry.get("id", f"#{i}")) if isinstance(entry, dict) else f"#{i}"
        try:
            spec = TileSpec.model_validate(entry)
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            problems.append(TileProblem(tile=tid, reason=f"invalid tile entry ({reasons})"))
            continue
        unknown = [b for b in spec.files if b not in bands]
        if unknown:
            f = spec.files[unknown[0]].path
            problems.append(TileProblem(tile=spec.id, file=f, reason=f"unknown band {unknown[0]!r} (release bands: {bands})"))
            continue
        if spec.id in seen:
            problems.append(TileProblem(tile=spec.id, reason="duplicate tile id: the first entry is processed, this one is not"))
            continue
        seen.add(spec.id)
        good.append(spec)
    if not good and not problems:
        raise ManifestError(f"manifest {str(path)!r}: lists no tiles")
    return Manifest(
        name=str(raw.get("name", path.stem)),
        bands=[str(b) for b in bands],
        tiles=good,
        root=str(path.parent.resolve()),
        problems=problems,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )


def write_manifest(manifest: dict[str, Any], path: str | Path) -> None:
    """Write a manifest dict as YAML (used by the mock survey and by tests)."""
    Path(path).write_text(yaml.safe_dump(manifest, sort_keys=False))
