"""The failure taxonomy: what went wrong decides whether the engine retries.

Modelled on lsst/pipe_base's ``_status.py``: bad input and algorithm errors are never retried
(the same bytes fail the same way), infrastructure failures are retried with a bound.
"""
from __future__ import annotations


class SurveypipeError(Exception):
    """Base of every error the engine knows how to record."""

    kind = "error"
    retryable = False


class ConfigError(SurveypipeError):
    """A pipeline or stage configuration is invalid; raised before any work starts."""

    kind = "config"


class DagError(SurveypipeError):
    """The stage graph cannot be built: missing producer, cycle, or two producers."""

    kind = "dag"


class ManifestError(SurveypipeError):
    """The release manifest is malformed as a whole (not parseable, no tiles)."""

    kind = "manifest"


class BadInputError(SurveypipeError):
    """Unprocessable input data for one tile: never retried. Names tile, file and reason."""

    kind = "bad_input"

    def __init__(self, tile: str, file: str | None, reason: str) -> None:
        self.tile, self.file, self.reason = tile, file, reason
        where = f"tile {tile!r}" + (f", file {file!r}" if file else "")
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep the fields through pickling to/from Dask workers
        return (type(self), (self.tile, self.file, self.reason))


class AlgorithmError(SurveypipeError):
    """A stage failed on valid input: never retried, recorded with the stage name."""

    kind = "algorithm"


class InfrastructureError(SurveypipeError):
    """A transient failure of the machine (I/O, memory, lost worker): retried with a bound."""

    kind = "infrastructure"
    retryable = True


class NoWorkError(SurveypipeError):
    """Nothing to do for a tile (e.g. every requested product is already complete)."""

    kind = "no_work"
