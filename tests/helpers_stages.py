"""Stages used only by engine tests (importable by Dask worker processes)."""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from pydantic import Field

from pipeline.stage import Stage, StageConfig
from pipeline.table import Table

CLASSICAL = "stages:CLASSICAL_STAGES"


class SlowConfig(StageConfig):
    seconds: float = Field(0.0, ge=0, description="sleep this long (to be interrupted)")


class Slow(Stage):
    """Copies objectId after sleeping: a stage long enough to kill a worker in the middle of."""

    name = "slow"
    version = "1"
    requires = ("objects",)
    provides = {"slowtable": "objectId copy"}
    Config = SlowConfig

    def run(self, inputs: Mapping[str, Any], config: SlowConfig) -> dict[str, Any]:
        time.sleep(config.seconds)
        t = Table()
        t.add("objectId", np.asarray(inputs["objects"]["objectId"]), "", "id")
        return {"slowtable": t}


class Boom(Stage):
    name = "boom"
    version = "1"
    requires = ("objects",)
    provides = {"boomtable": "never made"}

    def run(self, inputs, config):
        raise ZeroDivisionError("deliberate failure")


def make_stage(name: str, requires: tuple[str, ...], provides: tuple[str, ...]) -> Stage:
    """A no-op stage with the given declarations, for DAG tests."""
    cls = type(f"S_{name}", (Stage,), {"name": name, "version": "1", "requires": requires,
                                      "provides": {p: p for p in provides}})
    return cls()


class GpuCopy(Stage):
    """Asks for a GPU worker; records which worker process ran it."""

    name = "gpucopy"
    version = "1"
    requires = ("objects",)
    provides = {"gputable": "objectId copy + pid of the worker"}
    resources = {"GPU": 1}

    def run(self, inputs, config):
        import os

        t = Table()
        ids = np.asarray(inputs["objects"]["objectId"])
        t.add("objectId", ids, "", "id")
        t.add("pid", np.full(len(ids), os.getpid(), np.int64), "", "worker pid")
        return {"gputable": t}
