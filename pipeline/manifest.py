"""Data release manifests: which tiles exist, their per-band FITS files and HDUs.

Structural checks happen here (safe ids and band names, known bands, duplicate ids, HDU
references). Checks that need to open files (missing file, bad HDU, grids, pixels) happen in
:mod:`pipeline.tile` on the worker. Either way one bad tile becomes one failed tile, reported
with tile, file and reason, and never stops the rest of the release.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ManifestError

SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_NAME_LENGTH = 100  # a tile id or band name becomes a file name: keep it far below NAME_MAX
HduRef = Union[int, str]


class ManifestWarning(UserWarning):
    """Something in the manifest was ignored (e.g. an unknown top-level key)."""


def check_safe_name(value: str, what: str) -> str:
    """Reject names that could write outside the output directory (``/``, ``..``, odd characters)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} must be a string (quote it in YAML)")
    if not SAFE_ID.match(value) or value in (".", "..") or ".." in value:
        raise ValueError(f"{what} {value!r} is not allowed: it would be used as a path; "
                         "use only [A-Za-z0-9._-] and no '..'")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} {value[:20]!r}... is {len(value)} characters long (at most {MAX_NAME_LENGTH})")
    return value


def _check_hdu(value: HduRef | None, what: str) -> HduRef | None:
    if value is None:
        return None
    if isinstance(value, (bool, float)) or (isinstance(value, int) and value < 0):
        raise ValueError(f"{what} HDU {value!r} is not valid: give a 0-based index >= 0 or an EXTNAME")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{what} HDU is an empty EXTNAME")
    return value


class BandFile(BaseModel):
    """Where one band of one tile lives: a FITS file and the HDUs of image, weight and mask."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1)
    image: HduRef = 0
    weight: HduRef | None = None
    mask: HduRef | None = None
    weight_path: str | None = Field(None, min_length=1, description="separate file for the weight plane")
    mask_path: str | None = Field(None, min_length=1, description="separate file for the mask plane")
    zeropoint: float | None = Field(None, allow_inf_nan=False, description="AB mag of one image unit; overrides MAGZERO")

    @field_validator("image", "weight", "mask", mode="before")
    @classmethod
    def _hdu(cls, v: Any, info) -> Any:
        return _check_hdu(v, info.field_name)


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

    @field_validator("id", mode="before")
    @classmethod
    def _safe_id(cls, v: Any) -> str:
        return check_safe_name(v, "tile id")

    @field_validator("files", mode="before")
    @classmethod
    def _bands(cls, v: Any) -> Any:
        if not isinstance(v, dict) or not v:
            raise ValueError("tile lists no band files (need a mapping band -> {path: ...})")
        for band in v:
            check_safe_name(band, "band name")
        return v


class TileProblem(BaseModel):
    """A tile entry rejected while reading the manifest; it is reported as a failed tile.

    ``tile`` is always a safe name (it keys the failure record on disk); ``label`` is the id
    as written in the manifest, which may be unsafe and is only ever printed.
    """

    tile: str
    label: str | None = None
    file: str | None = None
    reason: str

    def message(self) -> str:
        name = self.tile if self.label is None else self.label
        return f"tile {name!r}" + (f", file {self.file!r}" if self.file else "") + f": {self.reason}"


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


def _raw_id(entry: Any, i: int) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return str(entry["id"])
    return f"#{i}"


def _problem_key(raw: str, i: int) -> str:
    """A safe, unique name for the failure record of an entry whose id may be unsafe."""
    try:
        return check_safe_name(raw, "tile id")
    except ValueError:
        return f"manifest-entry-{i:05d}"


def _entry_files(entry: Any) -> list[str]:
    files = entry.get("files") if isinstance(entry, dict) else None
    if not isinstance(files, dict):
        return []
    return [str(v.get("path")) for v in files.values() if isinstance(v, dict) and v.get("path")]


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; bad tile entries go to ``problems``, good ones to ``tiles``.

    Raises :class:`ManifestError` only when the manifest as a whole is unusable (unreadable,
    not YAML/JSON, no or unsafe ``bands``, no ``tiles``).
    """
    path = Path(path)
    where = f"manifest {str(path)!r}"
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{where}: cannot read ({exc.strerror or exc})") from exc
    try:
        raw = yaml.safe_load(raw_bytes) if path.suffix != ".json" else json.loads(raw_bytes)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where}: not valid YAML/JSON ({exc})") from exc
    if not isinstance(raw, dict) or "tiles" not in raw or "bands" not in raw:
        raise ManifestError(f"{where}: needs the keys 'bands' and 'tiles' (and usually 'name')")
    unknown_keys = sorted(map(str, set(raw) - {"name", "bands", "tiles"}))
    if unknown_keys:
        warnings.warn(f"{where}: ignoring unknown top-level key(s) {unknown_keys} (known: name, bands, tiles)",
                      ManifestWarning, stacklevel=2)
    bands = raw.get("bands") or []
    if not isinstance(bands, list) or not bands:
        raise ManifestError(f"{where}: 'bands' must be a non-empty list")
    for b in bands:
        try:
            check_safe_name(b, "band name")
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
    if len(set(bands)) != len(bands):
        raise ManifestError(f"{where}: 'bands' lists a band twice: {bands}")
    entries = raw.get("tiles")
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{where}: 'tiles' must be a non-empty list of tile entries")

    # an id given to two entries is ambiguous: which one is meant cannot be known, so neither
    # is processed (and the objectIds, derived from the tile id, would collide)
    by_id: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        by_id.setdefault(_raw_id(entry, i), []).append(i)
    duplicated = {tid: idx for tid, idx in by_id.items() if len(idx) > 1 and not tid.startswith("#")}

    good: list[TileSpec] = []
    problems: list[TileProblem] = []
    for tid, idx in duplicated.items():
        files = [f for i in idx for f in _entry_files(entries[i])]
        problems.append(TileProblem(
            tile=_problem_key(tid, idx[0]), label=tid, file=str(path),
            reason=(f"duplicate tile id: entries {[i + 1 for i in idx]} of the manifest share it "
                    f"(their files: {files}); none of them is processed: give each tile its own id")))
    for i, entry in enumerate(entries):
        tid = _raw_id(entry, i)
        if tid in duplicated:
            continue
        key = _problem_key(tid, i)
        if not isinstance(entry, dict):
            problems.append(TileProblem(tile=key, label=tid, file=str(path),
                                        reason=f"tile entry {i + 1} is not a mapping (got {type(entry).__name__})"))
            continue
        try:
            spec = TileSpec.model_validate(entry)
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg'].removeprefix('Value error, ')}"
                                for e in exc.errors())
            problems.append(TileProblem(tile=key, label=tid, file=str(path),
                                        reason=f"invalid tile entry {i + 1} of the manifest ({reasons})"))
            continue
        unknown = [b for b in spec.files if b not in bands]
        if unknown:
            f = spec.files[unknown[0]].path
            f = f if Path(f).is_absolute() else str(path.parent.resolve() / f)
            problems.append(TileProblem(tile=spec.id, label=spec.id, file=f,
                                        reason=f"unknown band(s) {unknown} (release bands: {bands}; fix the "
                                               f"tile's files or the manifest's 'bands')"))
            continue
        good.append(spec)
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
