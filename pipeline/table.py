"""Column tables that carry units and descriptions with every column.

Stages return catalogue products as :class:`Table` so the store and the exports can write
units and descriptions (Zarr attributes, FITS TUNIT/TCOMM, Parquet metadata) without
knowing any astronomy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np


@dataclass(frozen=True)
class ColumnInfo:
    """Metadata of one column: physical unit (astropy string, '' if none) and a description."""

    unit: str = ""
    description: str = ""
    ucd: str = ""


@dataclass
class Table:
    """An ordered set of equal-length 1-D (or 2-D, row-major) numpy columns with metadata."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, ColumnInfo] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_lengths()

    def _check_lengths(self) -> None:
        lengths = {name: len(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"table columns differ in length: {lengths}")

    def __len__(self) -> int:
        for col in self.columns.values():
            return len(col)
        return 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def add(self, name: str, values: np.ndarray, unit: str = "", description: str = "", ucd: str = "") -> None:
        """Add or replace a column, keeping its unit and description."""
        values = np.asarray(values)
        if self.columns and len(values) != len(self):
            raise ValueError(f"column {name!r} has {len(values)} rows, table has {len(self)}")
        self.columns[name] = values
        self.info[name] = ColumnInfo(unit=unit, description=description, ucd=ucd)

    def select(self, rows: np.ndarray) -> "Table":
        """Rows picked by a boolean mask or an index array, metadata kept."""
        return Table({k: v[rows] for k, v in self.columns.items()}, dict(self.info), dict(self.attrs))

    def merged(self, other: "Table") -> "Table":
        """Columns of both tables side by side (same rows); other's columns win on a clash."""
        if self.columns and other.columns and len(self) != len(other):
            raise ValueError(f"cannot merge tables of {len(self)} and {len(other)} rows")
        return Table({**self.columns, **other.columns}, {**self.info, **other.info}, {**self.attrs, **other.attrs})

    @staticmethod
    def concatenate(tables: list["Table"]) -> "Table":
        """Rows of several tables with the same columns, one after the other."""
        tables = [t for t in tables if t.columns]
        if not tables:
            return Table()
        names = list(tables[0].columns)
        for t in tables[1:]:
            if list(t.columns) != names:
                raise ValueError("cannot concatenate tables with different columns")
        return Table({n: np.concatenate([t.columns[n] for t in tables]) for n in names}, dict(tables[0].info))

    def info_dict(self) -> Mapping[str, dict[str, str]]:
        return {k: {"unit": v.unit, "description": v.description, "ucd": v.ucd} for k, v in self.info.items()}
