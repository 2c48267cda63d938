"""Stages used only by engine tests (importable by Dask worker processes)."""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from pydantic import Field

from pipeline.stage import Stage, StageConfig
from pipeline.table import Table

CLASSICAL = "stages:CLASSICAL_STAGES"


def object_ids(inputs: Mapping[str, Any]) -> Table:
    """A table with the tile's objectId column: what each of these test stages returns, at least."""
    t = Table()
    t.add("objectId", np.asarray(inputs["objects"]["objectId"]), "", "id")
    return t


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
        return {"slowtable": object_ids(inputs)}


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

        t = object_ids(inputs)
        t.add("pid", np.full(len(t), os.getpid(), np.int64), "", "worker pid")
        return {"gputable": t}


class WarnConfig(StageConfig):
    caveat: str = Field("objects near the edge were not measured", description="the caveat to report")


class Warn(Stage):
    """Copies objectId and reports a caveat: a partial success."""

    name = "warn"
    version = "1"
    requires = ("objects",)
    provides = {"warntable": "objectId copy"}
    Config = WarnConfig

    def run(self, inputs, config):
        from pipeline.stage import CAVEATS

        t = object_ids(inputs)
        return {"warntable": t, CAVEATS: [config.caveat]}


class HogConfig(StageConfig):
    need_mb: float = Field(600.0, gt=0, description="memory the stage needs (MB)")
    allocate: bool = Field(False, description="really allocate and touch it (the nanny kills the worker) "
                                              "instead of raising MemoryError on a smaller worker")
    only_tile: str | None = Field(None, description="only this tile needs the memory")


class Hog(Stage):
    """Needs ``need_mb`` of worker memory: raises MemoryError (or really allocates) on a smaller worker."""

    name = "hog"
    version = "1"
    requires = ("exposure", "objects")
    provides = {"hogtable": "objectId copy + the memory limit of the worker that made it"}
    Config = HogConfig

    def run(self, inputs, config):
        from distributed import get_worker

        limit = float(get_worker().memory_manager.memory_limit or 0)
        need = config.need_mb * 1e6 if config.only_tile in (None, inputs["exposure"].tile_id) else 0.0
        if config.allocate:
            block = np.ones(int(need // 8), np.float64)  # touched: resident
            time.sleep(1.5)  # long enough for the nanny's memory monitor to see it
            del block
        elif need and limit and limit < need:
            raise MemoryError(f"needs {need / 1e6:.0f} MB, the worker has {limit / 1e6:.0f} MB")
        t = object_ids(inputs)
        t.add("worker_limit", np.full(len(t), limit, np.float64), "B", "memory limit of the worker")
        return {"hogtable": t}


class TouchConfig(StageConfig):
    mb: int = Field(200, ge=0, description="megabytes to allocate and touch")


class Touch(Stage):
    """Touches ``mb`` megabytes for the length of its run: a stage with a known memory peak."""

    name = "touch"
    version = "1"
    requires = ("objects",)
    provides = {"touchtable": "objectId copy"}
    Config = TouchConfig

    def run(self, inputs: Mapping[str, Any], config: TouchConfig) -> dict[str, Any]:
        block = np.ones(config.mb * 2**20, np.uint8)  # np.ones writes every page: resident
        assert int(block[:: 4096].sum()) == block[:: 4096].size
        del block
        return {"touchtable": object_ids(inputs)}


EXPOSURES: list = []      # weak references to the tiles the runner loaded (set by the test)
EXPOSURE_ALIVE: list = []  # what ExposureProbe saw


class ExposureProbe(Stage):
    """Records whether the tile's exposure is still in memory when it runs (after photometry)."""

    name = "exposure_probe"
    version = "1"
    requires = ("objects",)
    provides = {"probetable": "objectId copy"}

    def run(self, inputs: Mapping[str, Any], config: StageConfig) -> dict[str, Any]:
        import gc

        gc.collect()
        EXPOSURE_ALIVE.extend(ref() is not None for ref in EXPOSURES)
        return {"probetable": object_ids(inputs)}
