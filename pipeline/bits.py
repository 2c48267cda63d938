"""Bit-flag registries: bits defined once, with names and descriptions, and a decoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class Bit:
    name: str
    index: int
    description: str


class BitRegistry:
    """An ordered set of named bits; producers, readers, exports and docs all use this one object."""

    def __init__(self, name: str, bits: Iterable[Bit], dtype: type = np.uint32) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)
        self.bits = {b.name: b for b in bits}
        idx = [b.index for b in self.bits.values()]
        if len(set(idx)) != len(idx) or max(idx, default=0) >= self.dtype.itemsize * 8:
            raise ValueError(f"{name}: bit indices must be unique and fit in {self.dtype}")

    def value(self, *names: str) -> int:
        return int(sum(1 << self.bits[n].index for n in names))

    def __getitem__(self, name: str) -> int:
        return 1 << self.bits[name].index

    def decode(self, value: int) -> list[str]:
        return [b.name for b in self.bits.values() if int(value) & (1 << b.index)]

    def as_attrs(self) -> dict[str, int]:
        """``{name: bit index}``, stored with masks and tables so readers can decode them."""
        return {b.name: b.index for b in self.bits.values()}

    def describe(self) -> dict[str, str]:
        return {b.name: b.description for b in self.bits.values()}
