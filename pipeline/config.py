"""Pipeline configuration: which stages, their validated configs, layered defaults < file < CLI.

The whole configuration is validated before any job starts and stored with every tile.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .stage import Stage, StageConfig

DEFAULT_STAGE_LIST = "stages:DEFAULT_STAGES"


class PipelineConfig(BaseModel):
    """What to run and how: stage classes (import paths), per-stage overrides, targets."""

    model_config = ConfigDict(extra="forbid")
    stages: list[str] | str = Field(DEFAULT_STAGE_LIST, description="stage classes 'module:Class' or a 'module:LIST' of them")
    targets: list[str] | None = Field(None, description="products or stages to make; None = everything")
    stage_config: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-stage config overrides")
    retries: int = Field(2, ge=0, le=10, description="retries of a tile after an infrastructure failure")
    memory_escalations: int = Field(2, ge=0, le=5, description="after an out-of-memory failure, retry the tile "
                                    "up to this many times, each on a worker with twice the memory")
    device: str | None = Field(None, pattern="^(auto|cpu|cuda)$",
                               description="ONNX device for every stage that has a 'device' setting")

    def load_stages(self) -> list[Stage]:
        refs = [self.stages] if isinstance(self.stages, str) else list(self.stages)
        out: list[Stage] = []
        for ref in refs:
            obj = _import(ref)
            items = obj if isinstance(obj, (list, tuple)) else [obj]
            for item in items:
                stage = item() if isinstance(item, type) else item
                if not isinstance(stage, Stage):
                    raise ConfigError(f"{ref!r} does not name a Stage (got {type(stage).__name__})")
                out.append(stage)
        return out

    def stage_configs(self, stages: list[Stage]) -> dict[str, StageConfig]:
        names = {s.name for s in stages}
        unknown = sorted(set(self.stage_config) - names)
        if unknown:
            raise ConfigError(f"config for unknown stage(s) {unknown}; stages are {sorted(names)}")
        out: dict[str, StageConfig] = {}
        for s in stages:
            values = dict(self.stage_config.get(s.name, {}))
            if self.device and "device" in s.Config.model_fields:
                values.setdefault("device", self.device)
            try:
                out[s.name] = s.Config.model_validate(values)
            except ValidationError as exc:
                why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ConfigError(f"stage {s.name!r} config invalid: {why}") from exc
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _import(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {ref!r}: {exc}") from exc
    return obj


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    stage, _, key = dotted.partition(".")
    if not key:
        raise ConfigError(f"--set {dotted!r}: use STAGE.FIELD=VALUE")
    d.setdefault("stage_config", {}).setdefault(stage, {})[key] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> PipelineConfig:
    """Defaults < YAML file < ``--set stage.field=value`` overrides < explicit keyword values."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc}") from exc
    for item in overrides or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: use STAGE.FIELD=VALUE")
        _set_dotted(data, k, yaml.safe_load(v))
    data.update({k: v for k, v in top.items() if v is not None})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"pipeline config invalid: {exc}") from exc
