"""Which classical pipeline measured a catalogue: the measuring stages' versions and default configs.

A photo-z model learns the error properties of the photometry it was trained on; its card
records this fingerprint, and the photo-z stage compares it with the running stages.

The fingerprint follows the engine's own contract for outputs (``pipeline.stage.cache_key``): a
stage's ``version`` is bumped whenever its outputs change, so a speed-only refactor keeps the
fingerprint (and the shipped model valid) while any change of the measurements moves it. An
earlier scheme hashed the stages' source files, which flagged every shipped model as stale
after edits that did not change a single output.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any


def fingerprint_payload() -> dict[str, Any]:
    """{stage name: {version, default config}} of the classical stages, in pipeline order."""
    import stages
    from pipeline.stage import output_config

    return {c.name: {"version": c.version, "config": output_config(c.Config())}
            for c in getattr(stages, "CLASSICAL_STAGES", [])}


@lru_cache(maxsize=1)
def classical_fingerprint() -> str:
    """sha256 (16 hex) of :func:`fingerprint_payload`."""
    blob = json.dumps(fingerprint_payload(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
