"""Photo-z catalogue I/O: column mapping, non-detection coding, model features, mock catalogues.

Everything the photo-z trainer, the ``surveypipe photoz`` command and the ``photoz`` stage share
about *inputs* lives here, so a model sees exactly the same features in training and in use.

The column mapping (``--mapping MAPPING.yaml`` or CLI flags)::

    id: object_id                 # optional; else the row index is written
    redshift: redshift            # training only
    bands:
      u: {mag: mag_u_lsst, err: mag_err_u_lsst}       # AB magnitude and its 1-sigma error
      g: {flux: g_flux, err: g_flux_err, unit: nJy}   # or a flux (nJy, uJy, mJy, Jy, nanomaggies, maggies)
    nondetection: {mag: 99.0}     # or nan, or {flux_le: 0}, or none

Non-detections and missing bands (explicit, per object and band):

* *measured*: a finite flux (any sign, as forced photometry gives) with a finite error > 0.
* *non-detection* (the catalogue's code: ``mag == value``, NaN, or ``flux <= value``): the flux is
  set to 0 and the error is kept when it is usable; for magnitude catalogues an "error" above 5 mag
  cannot be an error and is read as the 1-sigma limiting magnitude (the usual convention; values
  of 40 and more are sentinels, not limits), so the object enters as ``0 +- sigma_limit``. With
  no usable error the band is treated as missing.
* *missing*: the band is not in the mapping, or its value/error is unusable (NaN or inf, err <= 0)
  and not a coded non-detection. Missing bands get a 0/1 indicator feature and neutral values;
  the trainer drops random bands during training so the network learns to use the indicator.

Bands named like ``u g r i z y`` (or other common filters, :data:`KNOWN_BANDS`) are put in
wavelength order whatever the mapping's order; others keep the mapping's order (colours are
formed between neighbours). Several flux measurements per band (e.g. small and large apertures)
are named ``band@set`` (``g@ap03``, ``g@kron``): colours are then taken within a set, and the
trainer's band dropout removes every set of a band together.

Features (:func:`features`): per band the asinh magnitude (Lupton et al. 1999) with softening
``b`` = the band's median flux error in the training set, so faint, zero and negative fluxes
stay finite and smooth; its error ``log10(sigma_mu)``; the asinh colours of adjacent bands
present in both; and the missing-band indicators. Standardised with the training mean/std (the
model card's ``normalisation``); missing entries are 0 after standardisation.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipeline.errors import ConfigError

NJY_ZEROPOINT = 31.4          # AB magnitude of 1 nJy
POGSON = 2.5 / math.log(10.0)  # 1.0857...
FLUX_UNITS = {"njy": 1.0, "ujy": 1e3, "mjy": 1e6, "jy": 1e9, "nanomaggies": 3631.0, "nanomaggy": 3631.0,
              "maggies": 3631e9, "maggy": 3631e9}
MAG_ERR_MAX = 5.0             # a magnitude "error" above this is a limiting magnitude ...
MAG_LIMIT_MAX = 40.0          # ... if it is below this (99 is another sentinel, not a limit)
MEASURED, NONDETECTED, MISSING = 0, 1, 2


class MappingError(ConfigError):
    """The column mapping does not fit the catalogue (missing or mistyped column, bad YAML)."""

    kind = "mapping"


# ---------------------------------------------------------------------------- the mapping
@dataclass(frozen=True)
class BandColumns:
    """Where one band's photometry lives: ``kind`` 'mag' (AB) or 'flux' (with ``unit``)."""

    band: str
    kind: str
    value: str
    err: str
    unit: str = "nJy"

    def to_dict(self) -> dict[str, str]:
        d = {self.kind: self.value, "err": self.err}
        if self.kind == "flux":
            d["unit"] = self.unit
        return d


@dataclass(frozen=True)
class NonDetection:
    """How non-detections are coded: magnitude sentinels, NaN, and/or flux <= a value."""

    mag: tuple[float, ...] = ()
    nan: bool = False
    flux_le: float | None = None

    def to_yaml(self) -> Any:
        if not self.mag and self.flux_le is None:
            return "nan" if self.nan else "none"
        d: dict[str, Any] = {}
        if self.mag:
            d["mag"] = self.mag[0] if len(self.mag) == 1 else list(self.mag)
        if self.flux_le is not None:
            d["flux_le"] = self.flux_le
        if self.nan:
            d["nan"] = True
        return d


@dataclass(frozen=True)
class ColumnMapping:
    """id / redshift / per-band columns of a catalogue and its non-detection code."""

    bands: dict[str, BandColumns]
    id: str | None = None
    redshift: str | None = None
    nondetection: NonDetection = field(default_factory=NonDetection)
    source: str = "<mapping>"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<mapping>") -> "ColumnMapping":
        if not isinstance(d, Mapping):
            raise MappingError(f"{source}: the mapping must be a YAML mapping with 'bands', got {type(d).__name__}")
        unknown = sorted(set(d) - {"id", "redshift", "bands", "nondetection"})
        if unknown:
            raise MappingError(f"{source}: unknown key(s) {unknown}; allowed: id, redshift, bands, nondetection")
        bands_in = d.get("bands")
        if not isinstance(bands_in, Mapping) or not bands_in:
            raise MappingError(f"{source}: 'bands' must map band names to {{mag|flux: COLUMN, err: COLUMN}}")
        bands: dict[str, BandColumns] = {}
        for band, spec in bands_in.items():
            band = str(band)
            if not isinstance(spec, Mapping):
                raise MappingError(f"{source}: band {band!r}: expected {{mag: COL, err: COL}} or {{flux: COL, err: COL, unit: nJy}}")
            bad = sorted(set(spec) - {"mag", "flux", "err", "unit"})
            if bad:
                raise MappingError(f"{source}: band {band!r}: unknown key(s) {bad}; allowed: mag|flux, err, unit")
            kinds = [k for k in ("mag", "flux") if k in spec]
            if len(kinds) != 1:
                raise MappingError(f"{source}: band {band!r}: give exactly one of 'mag' or 'flux'")
            if "err" not in spec:
                raise MappingError(f"{source}: band {band!r}: 'err' (the error column) is required")
            kind = kinds[0]
            unit = str(spec.get("unit", "nJy"))
            if kind == "flux" and unit.lower() not in FLUX_UNITS:
                raise MappingError(f"{source}: band {band!r}: unknown flux unit {unit!r}; use one of {sorted(FLUX_UNITS)}")
            if kind == "mag" and "unit" in spec and unit.lower() not in ("ab", "mag"):
                raise MappingError(f"{source}: band {band!r}: magnitudes must be AB (unit {unit!r} given)")
            bands[band] = BandColumns(band, kind, str(spec[kind]), str(spec["err"]), unit)
        bands = {b: bands[b] for b in canonical_band_order(list(bands))}
        return cls(bands=bands, id=_opt_str(d.get("id")), redshift=_opt_str(d.get("redshift")),
                   nondetection=parse_nondetection(d.get("nondetection", "nan"), source), source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ColumnMapping":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise MappingError(f"mapping file {str(path)!r}: {exc}") from exc
        return cls.from_dict(data, source=f"mapping file {str(path)!r}")

    @classmethod
    def from_flags(cls, *, id: str | None, redshift: str | None, bands: Sequence[str], nondetection: str | None) -> "ColumnMapping":
        """From CLI flags: ``--band u:mag:COL:ERR`` / ``--band g:flux:COL:ERR[:UNIT]``."""
        d: dict[str, Any] = {"bands": {}}
        for spec in bands:
            parts = spec.split(":")
            if len(parts) not in (4, 5) or parts[1] not in ("mag", "flux"):
                raise MappingError(f"--band {spec!r}: use BAND:mag:COLUMN:ERRCOLUMN or BAND:flux:COLUMN:ERRCOLUMN[:UNIT]")
            b = {parts[1]: parts[2], "err": parts[3]}
            if len(parts) == 5:
                b["unit"] = parts[4]
            d["bands"][parts[0]] = b
        if id:
            d["id"] = id
        if redshift:
            d["redshift"] = redshift
        if nondetection is not None:
            import yaml

            nd = nondetection.strip()
            if "=" in nd and not nd.startswith("{"):
                k, _, v = nd.partition("=")
                nd = f"{{{k.strip()}: {v.strip()}}}"
            d["nondetection"] = yaml.safe_load(nd)
        return cls.from_dict(d, source="command-line mapping")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.id:
            d["id"] = self.id
        if self.redshift:
            d["redshift"] = self.redshift
        d["bands"] = {b: c.to_dict() for b, c in self.bands.items()}
        d["nondetection"] = self.nondetection.to_yaml()
        return d

    def columns(self, need_redshift: bool) -> list[tuple[str, str]]:
        """(role, column) pairs this mapping reads, in a stable order."""
        out = []
        if self.id:
            out.append(("id", self.id))
        if need_redshift:
            if not self.redshift:
                raise MappingError(f"{self.source}: training needs 'redshift: COLUMN'")
            out.append(("redshift", self.redshift))
        for b, c in self.bands.items():
            out.append((f"band {b!r} {c.kind}", c.value))
            out.append((f"band {b!r} err", c.err))
        return out


#: bands in wavelength order; a mapping whose bands are all listed here is put in this order
#: (colours are taken between neighbours), any other mapping keeps its own order
KNOWN_BANDS = ("FUV", "NUV", "u", "U", "g", "B", "V", "r", "R", "i", "I", "z", "y", "Y", "J", "H", "K", "Ks",
               "W1", "W2", "W3", "W4")


def canonical_band_order(bands: list[str]) -> list[str]:
    """Group by flux set (first appearance), then wavelength order if every base band is known."""
    sets = list(dict.fromkeys(split_band(b)[1] for b in bands))
    known = all(split_band(b)[0] in KNOWN_BANDS for b in bands)
    key = (lambda b: (sets.index(split_band(b)[1]), KNOWN_BANDS.index(split_band(b)[0]))) if known else \
          (lambda b: (sets.index(split_band(b)[1]), bands.index(b)))
    return sorted(bands, key=key)


def _opt_str(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def parse_nondetection(v: Any, source: str = "<mapping>") -> NonDetection:
    """``{mag: 99.0}`` | ``{mag: [99, -99]}`` | ``nan`` | ``{flux_le: 0}`` | ``none``; dict keys combine."""
    if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
        return NonDetection()
    if isinstance(v, float) and math.isnan(v):
        return NonDetection(nan=True)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("nan", ".nan"):
            return NonDetection(nan=True)
        if s in ("flux<=0", "flux_le_0", "negative", "flux <= 0"):
            return NonDetection(flux_le=0.0)
        raise MappingError(f"{source}: nondetection {v!r}: use {{mag: 99.0}}, nan, {{flux_le: 0}} or none")
    if isinstance(v, Mapping):
        bad = sorted(set(v) - {"mag", "nan", "flux_le"})
        if bad:
            raise MappingError(f"{source}: nondetection: unknown key(s) {bad}; allowed: mag, nan, flux_le")
        try:
            mags = v.get("mag", ())
            mags = tuple(float(m) for m in (mags if isinstance(mags, (list, tuple)) else [mags]))
            fl = v.get("flux_le")
            fl = None if fl is None else float(fl)
        except (TypeError, ValueError) as exc:
            raise MappingError(f"{source}: nondetection {dict(v)!r}: values must be numbers ({exc})") from exc
        return NonDetection(mag=mags, nan=bool(v.get("nan", False)), flux_le=fl)
    raise MappingError(f"{source}: nondetection {v!r}: use {{mag: 99.0}}, nan, {{flux_le: 0}} or none")


# ---------------------------------------------------------------------------- reading tables
def catalog_format(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith((".fits", ".fit", ".fits.gz", ".fit.gz", ".fts", ".fits.fz")):
        return "fits"
    if name.endswith((".parquet", ".pq", ".parq")):
        return "parquet"
    if name.endswith((".h5", ".hdf5", ".hdf", ".he5")):
        return "hdf5"
    raise MappingError(f"catalogue {str(path)!r}: unknown format (use .fits, .parquet or .h5/.hdf5)")


def catalog_columns(path: str | Path, hdf5_key: str | None = None) -> dict[str, str]:
    """Column name -> numpy dtype string (with shape suffix for non-scalar columns)."""
    fmt = catalog_format(path)
    path = Path(path)
    if not path.exists():
        raise MappingError(f"catalogue {str(path)!r} does not exist")
    if fmt == "fits":
        import fitsio

        with fitsio.FITS(str(path)) as f:
            hdu = _fits_table_hdu(f, path)
            dt = hdu.get_rec_dtype()[0]
        return {n: _dtype_str(dt.fields[n][0]) for n in dt.names}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(str(path))
        return {f.name: str(f.type) for f in schema}
    h5 = _h5py(path)
    with h5.File(str(path), "r") as f:
        obj = _h5_table(f, hdf5_key, path)
        if isinstance(obj, h5.Dataset):
            return {n: _dtype_str(obj.dtype.fields[n][0]) for n in obj.dtype.names}
        return {k: _dtype_str(obj[k].dtype) + ("" if obj[k].ndim == 1 else f"{obj[k].shape[1:]}")
                for k in obj if isinstance(obj[k], h5.Dataset)}


def _dtype_str(dt: np.dtype) -> str:
    return str(dt.base) + (str(dt.shape) if dt.shape else "")


def _fits_table_hdu(f: Any, path: Path) -> Any:
    for hdu in f:
        if hdu.get_exttype() in ("BINARY_TBL", "ASCII_TBL"):
            return hdu
    raise MappingError(f"catalogue {str(path)!r}: no table HDU")


def _h5py(path: Path) -> Any:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is in the dev/train extras
        raise MappingError(f"catalogue {str(path)!r}: reading HDF5 needs h5py (pip install h5py)") from exc
    return h5py


def _h5_table(f: Any, key: str | None, path: Path) -> Any:
    """A group of 1-D datasets (one per column) or a compound dataset; ``key`` picks it."""
    import h5py

    if key:
        if key not in f:
            raise MappingError(f"catalogue {str(path)!r}: no HDF5 group or dataset {key!r}")
        return f[key]
    if any(isinstance(v, h5py.Dataset) and v.dtype.names is None for v in f.values()):
        return f
    for v in f.values():
        if isinstance(v, h5py.Dataset) and v.dtype.names:
            return v
    groups = [k for k, v in f.items() if isinstance(v, h5py.Group)]
    if len(groups) == 1:
        return _h5_table(f[groups[0]], None, path)
    raise MappingError(f"catalogue {str(path)!r}: cannot tell which HDF5 group holds the table; "
                       f"give --hdf5-key (groups: {groups})")


def read_columns(path: str | Path, columns: Iterable[str], hdf5_key: str | None = None) -> dict[str, np.ndarray]:
    """Read the named columns of a FITS / Parquet / HDF5 table (no checks beyond presence)."""
    fmt = catalog_format(path)
    cols = list(dict.fromkeys(columns))
    path = Path(path)
    if fmt == "fits":
        import fitsio

        with fitsio.FITS(str(path)) as f:
            hdu = _fits_table_hdu(f, path)
            data = hdu.read(columns=cols) if cols else None
        out = {c: np.asarray(data[c]) for c in cols}
        return {c: (v.astype(v.dtype.newbyteorder("=")) if v.dtype.byteorder not in ("=", "|") else v) for c, v in out.items()}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        tab = pq.read_table(str(path), columns=cols)
        out = {}
        for c in cols:
            col = tab.column(c)
            try:
                out[c] = col.to_numpy(zero_copy_only=False)
            except Exception:
                out[c] = np.asarray(col.to_pylist(), dtype=object)
        return out
    h5 = _h5py(path)
    with h5.File(str(path), "r") as f:
        obj = _h5_table(f, hdf5_key, path)
        if isinstance(obj, h5.Dataset):
            data = obj[...]
            return {c: np.asarray(data[c]) for c in cols}
        return {c: np.asarray(obj[c][...]) for c in cols}


@dataclass
class Photometry:
    """Fluxes and errors (nJy) per object and band, a status code per entry, ids and redshifts."""

    bands: list[str]
    flux: np.ndarray      # (n, B) float64, nJy; 0 for non-detections, NaN for missing
    err: np.ndarray       # (n, B) float64, nJy; NaN for missing
    status: np.ndarray    # (n, B) uint8: MEASURED, NONDETECTED, MISSING
    ids: np.ndarray       # (n,) the id column, or the row index
    id_name: str = "row"
    z: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> "Photometry":
        return Photometry(self.bands, self.flux[idx], self.err[idx], self.status[idx], self.ids[idx], self.id_name,
                          None if self.z is None else self.z[idx])

    def reorder(self, bands: Sequence[str]) -> "Photometry":
        """Columns in the order ``bands``; bands this catalogue lacks become missing."""
        n = len(self)
        flux = np.full((n, len(bands)), np.nan)
        err = np.full((n, len(bands)), np.nan)
        status = np.full((n, len(bands)), MISSING, np.uint8)
        for j, b in enumerate(bands):
            if b in self.bands:
                i = self.bands.index(b)
                flux[:, j], err[:, j], status[:, j] = self.flux[:, i], self.err[:, i], self.status[:, i]
        return Photometry(list(bands), flux, err, status, self.ids, self.id_name, self.z)


def load_catalog(path: str | Path, mapping: ColumnMapping, *, need_redshift: bool,
                 hdf5_key: str | None = None) -> Photometry:
    """Read a catalogue through ``mapping``; a missing or non-numeric column is refused by name."""
    available = catalog_columns(path, hdf5_key)
    where = f"catalogue {str(path)!r}"
    for role, col in mapping.columns(need_redshift):
        if col not in available:
            near = difflib.get_close_matches(col, list(available), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
            raise MappingError(f"{where}: column {col!r} ({role}, from the {mapping.source}) not found{hint} "
                               f"(the table has {len(available)} columns: {_preview(available)})")
    data = read_columns(path, [c for _, c in mapping.columns(need_redshift)], hdf5_key)
    for role, col in mapping.columns(need_redshift):
        v = data[col]
        if v.ndim != 1:
            raise MappingError(f"{where}: column {col!r} ({role}) has shape {v.shape[1:]} per row; need one number per row")
        numeric = v.dtype.kind in "fiu" or (role == "id" and v.dtype.kind in "iuUSO")
        if not numeric:
            raise MappingError(f"{where}: column {col!r} ({role}) holds {_kind_name(v)}, not numbers")
    return photometry_from_columns(data, mapping, need_redshift=need_redshift, where=where)


def _preview(cols: Mapping[str, str]) -> str:
    names = list(cols)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def _kind_name(v: np.ndarray) -> str:
    return {"U": "strings", "S": "bytes", "O": "objects (e.g. strings)", "b": "booleans", "M": "dates",
            "c": "complex numbers"}.get(v.dtype.kind, f"dtype {v.dtype}")


def photometry_from_columns(data: Mapping[str, np.ndarray], mapping: ColumnMapping, *, need_redshift: bool,
                            where: str = "table") -> Photometry:
    """Apply the mapping's units and non-detection code to already-read columns."""
    n = len(next(iter(data.values()))) if data else 0
    bands = list(mapping.bands)
    flux = np.full((n, len(bands)), np.nan)
    err = np.full((n, len(bands)), np.nan)
    status = np.full((n, len(bands)), MISSING, np.uint8)
    nd = mapping.nondetection
    for j, b in enumerate(bands):
        c = mapping.bands[b]
        v = np.asarray(data[c.value], dtype=np.float64)
        e = np.asarray(data[c.err], dtype=np.float64)
        if c.kind == "mag":
            coded = np.zeros(n, bool)
            for s in nd.mag:
                coded |= np.isclose(v, s, rtol=0, atol=1e-4)
            if nd.nan:
                coded |= np.isnan(v)
            good = ~coded & np.isfinite(v) & np.isfinite(e) & (e > 0) & (e <= MAG_ERR_MAX)
            with np.errstate(over="ignore", invalid="ignore"):
                f = 10.0 ** (-0.4 * (v - NJY_ZEROPOINT))
                fe = f * e / POGSON
                # non-detections: err column above MAG_ERR_MAX = 1-sigma limiting magnitude
                plausible = np.isfinite(e) & (e > MAG_ERR_MAX) & (e < MAG_LIMIT_MAX)
                lim = np.where(plausible, 10.0 ** (-0.4 * (e - NJY_ZEROPOINT)), np.nan)
        else:
            scale = FLUX_UNITS[c.unit.lower()]
            f, fe = v * scale, e * scale
            coded = np.zeros(n, bool)
            if nd.nan:
                coded |= np.isnan(v)
            if nd.flux_le is not None:
                with np.errstate(invalid="ignore"):
                    coded |= v <= nd.flux_le
            good = ~coded & np.isfinite(f) & np.isfinite(fe) & (fe > 0)
            lim = np.where(np.isfinite(fe) & (fe > 0), fe, np.nan)
        ndet = coded & np.isfinite(lim) & (lim > 0)
        flux[good, j], err[good, j], status[good, j] = f[good], fe[good], MEASURED
        flux[ndet, j], err[ndet, j], status[ndet, j] = 0.0, lim[ndet], NONDETECTED
    if mapping.id:
        ids = np.asarray(data[mapping.id])
        id_name = mapping.id
    else:
        ids, id_name = np.arange(n, dtype=np.int64), "row"
    z = None
    if need_redshift:
        z = np.asarray(data[mapping.redshift], dtype=np.float64)
    return Photometry(bands, flux, err, status, ids, id_name, z)


# ---------------------------------------------------------------------------- features
def split_band(name: str) -> tuple[str, str]:
    """``"g@ap03"`` -> ``("g", "ap03")``; a plain band is its own base with set ``""``."""
    base, _, fset = name.partition("@")
    return base, fset


def colour_pairs(bands: Sequence[str]) -> list[tuple[int, int]]:
    """Indices of neighbouring bands of the same flux set (colours are taken between them)."""
    sets = [split_band(b)[1] for b in bands]
    return [(j, j + 1) for j in range(len(bands) - 1) if sets[j] == sets[j + 1]]


def feature_names(bands: Sequence[str]) -> list[str]:
    names = [f"mu_{b}" for b in bands] + [f"logdmu_{b}" for b in bands]
    names += [f"{bands[i]}-{bands[j]}" for i, j in colour_pairs(bands)]
    names += [f"missing_{b}" for b in bands]
    return names


def raw_features(flux: np.ndarray, err: np.ndarray, softening: np.ndarray,
                 bands: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unstandardised features (n, F) and a mask (n, F) of entries that are undefined (missing).

    ``flux``/``err`` in nJy (NaN = missing); ``softening`` (B,) nJy per band; ``bands`` the
    band names (flux sets ``band@set`` take colours within a set only; default: one set).
    """
    flux = np.asarray(flux, np.float64)
    err = np.asarray(err, np.float64)
    s = np.asarray(softening, np.float64)[None, :]
    missing = ~(np.isfinite(flux) & np.isfinite(err) & (err > 0))
    f = np.where(missing, 0.0, flux)
    e = np.where(missing, s, err)
    mu = NJY_ZEROPOINT - POGSON * (np.arcsinh(f / (2.0 * s)) + np.log(s))
    dmu = POGSON * e / np.sqrt(f * f + 4.0 * s * s)
    logdmu = np.log10(np.maximum(dmu, 1e-4))
    pairs = colour_pairs(bands if bands is not None else [str(j) for j in range(flux.shape[1])])
    ii = np.array([i for i, _ in pairs], np.int64)
    jj = np.array([j for _, j in pairs], np.int64)
    col = mu[:, ii] - mu[:, jj]
    col_missing = missing[:, ii] | missing[:, jj]
    x = np.concatenate([mu, logdmu, col, missing.astype(np.float64)], axis=1)
    undefined = np.concatenate([missing, missing, col_missing, np.zeros_like(missing)], axis=1)
    return x, undefined


def features(flux: np.ndarray, err: np.ndarray, norm: Mapping[str, Any]) -> np.ndarray:
    """Standardised float32 features as the model expects them (``norm`` from the model card).

    The values of :func:`raw_features`, standardised with the card's mean/std, undefined entries
    0; computed block by block straight into the float32 output (rows in chunks that stay in
    cache): the stage's feature step, a fraction of a microsecond per object.
    """
    flux = np.asarray(flux)
    err = np.asarray(err)
    n, B = flux.shape
    soft = np.asarray(norm["softening_njy"], np.float64)
    mean = np.asarray(norm["feature_mean"], np.float64)
    std = np.asarray(norm["feature_std"], np.float64)
    pairs = colour_pairs(norm.get("bands") or [str(j) for j in range(B)])
    ii = np.array([i for i, _ in pairs], np.int64)
    jj = np.array([j for _, j in pairs], np.int64)
    C = len(pairs)
    F = 3 * B + C
    if len(mean) != F:
        raise ValueError(f"normalisation has {len(mean)} features, the bands give {F}")
    out = np.empty((n, F), np.float32)
    # mu = ZP - POGSON (asinh(f / 2s) + ln s): standardised = a_mu * asinh(f / 2s) + b_mu
    a_mu = -POGSON / std[:B]
    b_mu = (NJY_ZEROPOINT - POGSON * np.log(soft) - mean[:B]) / std[:B]
    inv2s = 0.5 / soft
    s2x4 = 4.0 * soft * soft
    # log10(max(POGSON e / sqrt(f^2 + 4 s^2), 1e-4)), standardised
    a_d, b_d = 1.0 / std[B:2 * B], -mean[B:2 * B] / std[B:2 * B]
    # colour = mu_i - mu_j, standardised from the *unstandardised* mus
    a_c, b_c = 1.0 / std[2 * B:2 * B + C], -mean[2 * B:2 * B + C] / std[2 * B:2 * B + C]
    step = 2048
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        f = flux[r0:r1].astype(np.float64)
        e = err[r0:r1].astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
        f = np.where(ok, f, 0.0)
        e = np.where(ok, e, soft)
        ash = np.arcsinh(f * inv2s)
        mu = (NJY_ZEROPOINT - POGSON * np.log(soft)) - POGSON * ash
        o = out[r0:r1]
        o[:, :B] = np.where(ok, ash * a_mu + b_mu, 0.0)
        dmu = np.log10(np.maximum(POGSON * e / np.sqrt(f * f + s2x4), 1e-4))
        o[:, B:2 * B] = np.where(ok, dmu * a_d + b_d, 0.0)
        if C:
            o[:, 2 * B:2 * B + C] = np.where(ok[:, ii] & ok[:, jj], (mu[:, ii] - mu[:, jj]) * a_c + b_c, 0.0)
        o[:, 2 * B + C:] = ~ok
    return out


def features_reference(flux: np.ndarray, err: np.ndarray, norm: Mapping[str, Any]) -> np.ndarray:
    """:func:`features` written plainly from :func:`raw_features` (the tests compare the two)."""
    x, undefined = raw_features(flux, err, np.asarray(norm["softening_njy"]), norm.get("bands"))
    mean = np.asarray(norm["feature_mean"], np.float64)
    std = np.asarray(norm["feature_std"], np.float64)
    z = (x - mean) / std
    z[undefined] = 0.0
    return z.astype(np.float32)


def fit_normalisation(flux: np.ndarray, err: np.ndarray, bands: Sequence[str]) -> dict[str, Any]:
    """Softening per band (median measured error) and feature mean/std over defined entries."""
    soft = []
    for j in range(flux.shape[1]):
        ok = np.isfinite(err[:, j]) & (err[:, j] > 0) & np.isfinite(flux[:, j])
        soft.append(float(np.median(err[ok, j])) if ok.any() else 1.0)
    x, undefined = raw_features(flux, err, np.asarray(soft), list(bands))
    mean = np.zeros(x.shape[1])
    std = np.ones(x.shape[1])
    for k in range(x.shape[1]):
        v = x[~undefined[:, k], k]
        if v.size > 1:
            mean[k] = float(np.mean(v))
            std[k] = float(max(np.std(v), 1e-3))
    nb = len(bands)
    mean[-nb:], std[-nb:] = 0.0, 1.0  # indicators stay 0/1
    return {"bands": list(bands), "features": feature_names(bands), "softening_njy": soft,
            "feature_mean": mean.tolist(), "feature_std": std.tolist(),
            "asinh_mag": "mu = 31.4 - 1.0857*(asinh(f/(2b)) + ln b), f and b in nJy, b = softening_njy"}


# ---------------------------------------------------------------------------- writing tables
def write_table(path: str | Path, columns: Mapping[str, np.ndarray], units: Mapping[str, str] | None = None,
                descriptions: Mapping[str, str] | None = None, meta: Mapping[str, Any] | None = None) -> Path:
    """Write columns (2-D allowed) to FITS, Parquet or HDF5 by the file name; metadata as JSON."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = catalog_format(path)
    units = units or {}
    descriptions = descriptions or {}
    meta = dict(meta or {})
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "fits":
        import fitsio

        dt = [(k, v.dtype, v.shape[1:]) if v.ndim > 1 else (k, v.dtype) for k, v in columns.items()]
        n = len(next(iter(columns.values())))
        arr = np.empty(n, dtype=dt)
        for k, v in columns.items():
            arr[k] = v
        with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
            f.write(arr, extname="PHOTOZ", units=[units.get(k, "") for k in columns])
            hdu = f[-1]
            for i, k in enumerate(columns, start=1):
                if descriptions.get(k):
                    hdu.write_key(f"TCOMM{i}", descriptions[k][:68])
            for k, v in meta.items():
                if k == "z_grid":
                    g = np.asarray(v)
                    hdu.write_key("ZGRIDMIN", float(g[0]), "first redshift of photoz_pdf's grid")
                    hdu.write_key("ZGRIDMAX", float(g[-1]), "last redshift of photoz_pdf's grid")
                    hdu.write_key("ZGRIDN", int(g.size), "number of grid points")
                    hdu.write_key("ZGRIDDZ", float(g[1] - g[0]) if g.size > 1 else 0.0, "grid step")
            if "z_grid" in meta:
                f.write(np.asarray(meta["z_grid"], np.float64), extname="ZGRID")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays, fields = [], []
        for k, v in columns.items():
            if v.ndim > 1:
                a = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).reshape(-1)), v.shape[1])
            else:
                a = pa.array(v)
            arrays.append(a)
            fields.append(pa.field(k, a.type, metadata={"unit": units.get(k, ""), "description": descriptions.get(k, "")}))
        schema = pa.schema(fields, metadata={"surveypipe.photoz": json.dumps(meta, default=_json_default)})
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), str(tmp))
    else:
        h5 = _h5py(path)
        with h5.File(str(tmp), "w") as f:
            g = f.create_group("photoz")
            for k, v in columns.items():
                if v.dtype.kind == "U":
                    v = np.char.encode(v, "utf-8")
                ds = g.create_dataset(k, data=v, compression="gzip" if v.ndim > 1 else None)
                ds.attrs["unit"] = units.get(k, "")
                ds.attrs["description"] = descriptions.get(k, "")
            for k, v in meta.items():
                if k == "z_grid":  # beside the table group, not inside it (it is no column)
                    f.create_dataset("z_grid", data=np.asarray(v, np.float64))
                else:
                    g.attrs[k] = json.dumps(v, default=_json_default)
    tmp.replace(path)
    return path


def table_meta(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`write_table` stored in a Parquet file ({} for other files or none)."""
    import json

    if catalog_format(path) != "parquet":
        return {}
    import pyarrow.parquet as pq

    md = pq.read_schema(str(path)).metadata or {}
    raw = md.get(b"surveypipe.photoz")
    return json.loads(raw) if raw else {}


def _json_default(o: Any) -> Any:
    return o.tolist() if hasattr(o, "tolist") else str(o)


# ---------------------------------------------------------------------------- mock catalogues
#: pipeline flux kinds kept in mock catalogues (``{band}_{kind}Flux`` / ``...FluxErr``, nJy)
MOCK_FLUX_KINDS = ("kron", "psf", "model", "ap03", "ap06", "ap09", "ap12")
GALAXY_TYPES = ("spheroid", "disk", "edgeon", "irregular")
MATCH_RADIUS_PIX = 3.0


def mock_mapping(bands: Sequence[str] = "ugrizy", kind: str | Sequence[str] = "kron") -> ColumnMapping:
    """The mapping of a mock catalogue written by :func:`build_mock_catalog` (pipeline columns).

    ``kind``: one flux kind (bands named ``u``, ``g`` ...) or several (``"psf,ap03"`` or a list:
    bands named ``u@psf``, ``u@ap03`` ...)."""
    kinds = [k.strip() for k in kind.split(",")] if isinstance(kind, str) else list(kind)
    base = [split_band(b)[0] for b in bands]
    base = list(dict.fromkeys(base))
    spec = {}
    for k in kinds:
        for b in base:
            spec[b if len(kinds) == 1 else f"{b}@{k}"] = {"flux": f"{b}_{k}Flux", "err": f"{b}_{k}FluxErr", "unit": "nJy"}
    return ColumnMapping.from_dict({"id": "objectId", "redshift": "z_true", "bands": spec, "nondetection": "none"},
                                   source=f"mock mapping ({'+'.join(kinds)} fluxes)")


def mapping_from_pipeline_columns(columns: Mapping[str, Mapping[str, str]], *, id: str | None = "objectId",
                                  redshift: str | None = "z_true") -> ColumnMapping:
    """A mapping from a model card's ``pipeline_columns`` (band -> flux/err columns, nJy)."""
    d: dict[str, Any] = {"bands": {b: {"flux": c["flux"], "err": c["err"], "unit": "nJy"} for b, c in columns.items()},
                         "nondetection": "none"}
    if id:
        d["id"] = id
    if redshift:
        d["redshift"] = redshift
    return ColumnMapping.from_dict(d, source="the model card's pipeline columns")


def match_to_truth(objects: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                   radius_pix: float = MATCH_RADIUS_PIX, ref_band: str = "i") -> tuple[np.ndarray, np.ndarray]:
    """Index into ``truth`` (-1 where none) and distance (pix) for every measured object.

    Candidates are the true objects within ``radius_pix`` of the measured centroid; the one that
    dominates the light there wins: largest ``flux_ref * exp(-d^2 / (2 * (radius/2)^2))``, so a
    faint neighbour that happens to sit closer does not steal the match of a bright galaxy.
    """
    from scipy.spatial import cKDTree

    ox, oy = np.asarray(objects["x"], float), np.asarray(objects["y"], float)
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    idx = np.full(len(ox), -1, np.int64)
    dist = np.full(len(ox), np.inf)
    if not len(ox) or not len(tx):
        return idx, dist
    tree = cKDTree(np.c_[tx, ty])
    fref = np.asarray(truth[f"flux_{ref_band}"], float)
    s2 = 2.0 * (radius_pix / 2.0) ** 2
    for k, cand in enumerate(tree.query_ball_point(np.c_[ox, oy], radius_pix)):
        if not cand:
            continue
        cand = np.asarray(cand)
        d2 = (tx[cand] - ox[k]) ** 2 + (ty[cand] - oy[k]) ** 2
        best = int(np.argmax(fref[cand] * np.exp(-d2 / s2)))
        idx[k], dist[k] = cand[best], float(np.sqrt(d2[best]))
    return idx, dist


def _seed_list(seeds: Iterable[int] | str) -> list[int]:
    if isinstance(seeds, str):
        out: list[int] = []
        for part in seeds.split(","):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        return out
    return [int(s) for s in seeds]


def pipeline_fingerprint() -> str:
    """sha256 (16 hex) of the source of the stages that measure the photo-z inputs (the classical
    stages and their psf/flags helpers): which pipeline measured a mock catalogue."""
    from stages.fingerprint import classical_fingerprint

    return classical_fingerprint()


def pipeline_catalog_for_seed(seed: int, workdir: str | Path, *, size: int = 2048, n_tiles: int = 1,
                              bands: str = "ugrizy", workers: int = 1, keep_images: bool = False,
                              log: Any = print) -> dict[str, np.ndarray]:
    """Simulate one mock release, run the pipeline up to ``objects``, match primaries to truth.

    Cached: the matched table is written to ``workdir/seed{seed}.npz`` and reused.
    """
    import shutil
    import subprocess
    import time

    workdir = Path(workdir)
    cache = workdir / f"seed{seed}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    rel, run = workdir / f"release{seed}", workdir / f"run{seed}"
    t0 = time.perf_counter()
    if not (rel / "manifest.yaml").exists():
        from workflows.mock.release import write_release

        write_release(rel, n_tiles=n_tiles, size=size, bands=bands, seed=seed, progress=False)
    t1 = time.perf_counter()
    from workflows import surveypipe_command

    cmd = surveypipe_command("run", rel / "manifest.yaml", "--out", run, "--workers", workers, "--target", "objects",
                             "--no-progress")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pipeline run for seed {seed} failed ({res.returncode}): {res.stderr[-2000:]}")
    t2 = time.perf_counter()
    from astropy.table import Table as ATable

    from pipeline.store import CatalogStore

    store = CatalogStore(run)
    parts = []
    for tid in store.tile_ids():
        obj = store.read_table(tid, "objects")
        truth = ATable.read(rel / "truth" / f"{tid}.fits")
        tr = {c: np.asarray(truth[c]) for c in ("id", "x", "y", "z", "type", "flux_i", "mag_i", "blend_size")}
        tr["type"] = np.char.strip(tr["type"].astype(str))
        prim = np.asarray(obj["detect_isPrimary"], bool)
        k, d = match_to_truth({"x": obj["x"], "y": obj["y"]}, tr)
        keep = prim & (k >= 0)
        kk = k[keep]
        row: dict[str, np.ndarray] = {
            "objectId": np.asarray(obj["objectId"])[keep].astype(np.int64),
            "seed": np.full(keep.sum(), seed, np.int32),
            "truth_id": tr["id"][kk].astype(np.int64),
            "z_true": tr["z"][kk].astype(np.float64),
            "type": np.array([GALAXY_TYPES.index(t) + 1 if t in GALAXY_TYPES else 0 for t in tr["type"][kk]], np.int8),
            "mag_i_true": tr["mag_i"][kk].astype(np.float64),
            "blend_size": tr["blend_size"][kk].astype(np.int32),
            "match_dist": d[keep].astype(np.float32),
            "flags": np.asarray(obj["flags"])[keep],
        }
        for extra in ("refExtendedness", "psfKronRatio", "kronRadius", "a", "b", "parentObjectId"):
            if extra in obj:
                row[extra] = np.asarray(obj[extra])[keep]
        for b in bands:
            for kind in MOCK_FLUX_KINDS:
                for suf in ("Flux", "FluxErr"):
                    c = f"{b}_{kind}{suf}"
                    if c in obj:
                        row[c] = np.asarray(obj[c])[keep].astype(np.float32)
        parts.append(row)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f".seed{seed}.tmp.npz"
    np.savez(tmp, **out)
    tmp.replace(cache)
    if not keep_images:
        shutil.rmtree(rel, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    n_gal = int(np.sum(out.get("type", np.zeros(0)) > 0))
    log(f"mock seed {seed}: {len(out.get('objectId', []))} matched primaries ({n_gal} galaxies); "
        f"simulate {t1 - t0:.1f} s, pipeline {t2 - t1:.1f} s")
    return out


def build_mock_catalog(seeds: Iterable[int] | str, out_path: str | Path, *, workdir: str | Path | None = None,
                       source: str = "pipeline", size: int = 2048, bands: str = "ugrizy", workers: int = 1,
                       galaxies_only: bool = True, log: Any = print, n_library: int = 20000, jobs: int = 1) -> Path:
    """A photo-z catalogue (Parquet) of the mock survey for the given seeds, cached at ``out_path``.

    ``source="pipeline"``: the pipeline's own measured photometry (every flux kind of
    :data:`MOCK_FLUX_KINDS`) of simulated releases, matched to truth. ``source="library"``: the
    fallback without images -- the mock population's SEDs with the pipeline-like noise model of
    :func:`library_catalog` (``n_library`` galaxies per seed).
    """
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    seeds = _seed_list(seeds)
    workdir = Path(workdir) if workdir else out_path.parent / f"{out_path.stem}_work"
    todo = [sd for sd in seeds if not (workdir / f"seed{sd}.npz").exists()]
    if source == "pipeline" and jobs > 1 and len(todo) > 1:
        # seeds are independent and each is cached on its own: simulate them side by side (same bytes as one
        # at a time), then read them back in seed order below
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(todo))) as ex:
            futs = [ex.submit(pipeline_catalog_for_seed, sd, workdir, size=size, bands=bands, workers=workers,
                              log=print) for sd in todo]
            for f in futs:
                f.result()
    parts = []
    for s in seeds:
        if source == "pipeline":
            parts.append(pipeline_catalog_for_seed(s, workdir, size=size, bands=bands, workers=workers, log=log))
        elif source == "library":
            parts.append(library_catalog(s, n_library, bands=bands))
        else:
            raise ValueError(f"unknown mock source {source!r} (pipeline or library)")
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if galaxies_only:
        keep = cols["type"] > 0
        cols = {k: v[keep] for k, v in cols.items()}
    meta = {"source": source, "seeds": seeds, "bands": bands, "size": size, "galaxies_only": galaxies_only,
            "pipeline_fingerprint": pipeline_fingerprint() if source == "pipeline" else None}
    write_table(out_path, cols, units={c: "nJy" for c in cols if c.endswith(("Flux", "FluxErr"))}, meta=meta)
    log(f"mock catalogue {out_path}: {len(cols['z_true'])} rows from {len(seeds)} seeds ({source})")
    return out_path


def library_catalog(seed: int, n: int, bands: str = "ugrizy", config: Any = None) -> dict[str, np.ndarray]:
    """Fallback mock catalogue without images: mock-population galaxies, pipeline-like Kron noise.

    Galaxies (z, SED mix, i magnitude, size) come from :mod:`workflows.mock.population`; the
    Kron flux is 0.94 of the total, measured in an ellipse of 3.5 sigma of the detection-image
    profile (Gaussian approximation of galaxy x PSF); its error holds the sky noise of those
    pixels and the source's Poisson noise at the band's gain; detection needs S/N > 5 in the
    combined r+i+z Kron fluxes. Rows carry ``{band}_kronFlux``/``Err`` like the pipeline's.
    """
    from workflows.mock.population import _galaxies
    from workflows.mock.psf import SurveyConfig
    from workflows.mock.seeds import make_rng

    config = config or SurveyConfig()
    rng = make_rng(seed, 77, 0)
    rng_noise = make_rng(seed, 77, 1)
    g = _galaxies(rng, int(n * 3), config.m5["i"] + 1.5)
    flux_true = g["flux_bulge"] + g["flux_disk"]
    from workflows.mock.sed import LSST_BANDS

    sg = g["hlr"] / 1.1774
    q = np.clip(g["q"], 0.1, 1.0)
    cols: dict[str, np.ndarray] = {}
    sn2 = np.zeros(len(sg))
    for b in bands:
        bs = config.band(b)
        sp = bs.fwhm / 2.3548
        sa, sb = np.sqrt(sg**2 / q + sp**2), np.sqrt(sg**2 * q + sp**2)
        area = np.pi * 3.5**2 * sa * sb / bs.pixel_scale**2
        sig_pix = bs.sigma_sky * bs.njy_per_unit
        f = 0.94 * flux_true[:, LSST_BANDS.index(b)]
        var = sig_pix**2 * area + np.maximum(f, 0) * bs.njy_per_unit / bs.gain
        err = np.sqrt(var)
        meas = f + rng_noise.normal(0, 1, len(f)) * err
        cols[f"{b}_kronFlux"], cols[f"{b}_kronFluxErr"] = meas.astype(np.float32), np.sqrt(sig_pix**2 * area).astype(np.float32)
        if b in "riz":
            sn2 += (meas / err) ** 2 * np.sign(meas)
    det = np.flatnonzero(np.sqrt(np.maximum(sn2, 0)) > 5.0)[:n]
    out = {k: v[det] for k, v in cols.items()}
    out.update({"objectId": np.arange(len(det), dtype=np.int64) + seed * 10_000_000, "seed": np.full(len(det), seed, np.int32),
                "z_true": g["z"][det], "type": g["type"][det].astype(np.int8), "mag_i_true": g["mag_ref"][det]})
    return out
