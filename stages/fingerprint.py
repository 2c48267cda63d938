"""Which classical pipeline measured a catalogue: a hash of the measuring stages' source.

A photo-z model learns the error properties of the photometry it was trained on; its card
records this fingerprint, and the photo-z stage compares it with the running code.
"""
from __future__ import annotations

import hashlib
import inspect
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def classical_fingerprint() -> str:
    """sha256 (16 hex) of the source of the classical stages and their psf/flags helpers."""
    import stages

    files = {Path(inspect.getsourcefile(c)) for c in getattr(stages, "CLASSICAL_STAGES", [])}
    files |= {p for p in Path(stages.__file__).parent.glob("*.py") if p.stem in ("psf", "flags")}
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]
