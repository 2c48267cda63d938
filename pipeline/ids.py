"""Release-unique 64-bit object ids that do not depend on tile order or worker count."""
from __future__ import annotations

import hashlib

import numpy as np

LOCAL_BITS = 23  # up to 8.4 million objects per tile
TILE_BITS = 40


def tile_key(tile_id: str) -> int:
    """A stable 40-bit key of a tile id (collisions are checked at export)."""
    return int.from_bytes(hashlib.blake2b(tile_id.encode(), digest_size=5).digest(), "big")


def object_ids(tile_id: str, n: int) -> np.ndarray:
    """``objectId`` for the ``n`` objects of a tile: tile key in the high bits, row in the low."""
    if n >= 1 << LOCAL_BITS:
        raise ValueError(f"tile {tile_id!r}: {n} objects exceed the {1 << LOCAL_BITS} a tile may hold")
    return (np.int64(tile_key(tile_id)) << np.int64(LOCAL_BITS)) | np.arange(n, dtype=np.int64)


def tile_of(object_id: np.ndarray) -> np.ndarray:
    return np.asarray(object_id, dtype=np.int64) >> np.int64(LOCAL_BITS)
