"""``surveypipe photoz``: apply a photo-z model to any catalogue table, outside image processing.

    surveypipe photoz --model MODEL_DIR --catalog FILE --out FILE [--mapping MAPPING.yaml | flags]

Reads FITS / Parquet / HDF5, maps columns with the same mapping as training (no redshift needed),
writes the input id (or ``row``, the row index) and every ``photoz_*`` column of the pipeline
stage, ``photoz_pdf`` included, to FITS / Parquet / HDF5 (by the output name); the redshift grid is
stored once per file (FITS: a ZGRID HDU and ZGRID* keys; Parquet: schema metadata; HDF5: a
``z_grid`` dataset). Without a mapping, the model's own: the one it was trained with (card
``training.mapping``) or, for pipeline-trained models, the pipeline columns on the card
(``{band}_kronFlux`` ... as written by ``surveypipe export``), id ``objectId``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from workflows import photoz_data as pzd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surveypipe photoz", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped stages/models/photoz)")
    p.add_argument("--catalog", required=True, help="input table: FITS, Parquet or HDF5")
    p.add_argument("--out", required=True, help="output table: .fits, .parquet or .h5 (by the name)")
    p.add_argument("--mapping", help="column mapping YAML (id, bands, nondetection; redshift ignored)")
    p.add_argument("--id", dest="id_col", help="id column (instead of --mapping)")
    p.add_argument("--band", action="append", default=[], metavar="B:mag|flux:COL:ERR[:UNIT]",
                   help="one band's columns (repeat; instead of --mapping)")
    p.add_argument("--nondetection", default=None, help="'mag=99', 'nan', 'flux_le=0' or 'none'")
    p.add_argument("--hdf5-key", default=None, help="HDF5 group/dataset holding the table")
    p.add_argument("--batch", type=int, default=None, help="objects per ONNX Runtime call (default: the stage's)")
    p.add_argument("--no-pdf", action="store_true", help="leave photoz_pdf out (summaries only)")
    return p


def default_mapping(card: Any, catalog: str | Path, hdf5_key: str | None) -> pzd.ColumnMapping:
    """The card's training mapping, else its pipeline columns (id objectId when the table has it)."""
    train_map = (card.training or {}).get("mapping")
    if train_map:
        d = dict(train_map)
        d.pop("redshift", None)
        return pzd.ColumnMapping.from_dict(d, source=f"training mapping of model {card.name}")
    have = pzd.catalog_columns(catalog, hdf5_key)
    return pzd.mapping_from_pipeline_columns(card.normalisation.get("pipeline_columns") or {},
                                             id="objectId" if "objectId" in have else None, redshift=None)


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import ConfigError
    from pipeline.modelcard import load_card
    from stages.photoz import COLUMNS, SHIPPED_MODEL, photoz_table, predict

    a = _parser().parse_args(argv)
    model_dir = Path(a.model) if a.model else SHIPPED_MODEL
    try:
        card = load_card(model_dir)
        if a.mapping or a.band:
            if a.mapping and a.band:
                raise pzd.MappingError("give either --mapping or --band flags, not both")
            mapping = (pzd.ColumnMapping.from_yaml(a.mapping) if a.mapping else
                       pzd.ColumnMapping.from_flags(id=a.id_col, redshift=None, bands=a.band, nondetection=a.nondetection))
        else:
            mapping = default_mapping(card, a.catalog, a.hdf5_key)
        phot = pzd.load_catalog(a.catalog, mapping, need_redshift=False, hdf5_key=a.hdf5_key)
    except (pzd.MappingError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = [b for b in phot.bands if b not in card.bands]
    absent = [b for b in card.bands if b not in phot.bands]
    if extra:
        print(f"note: band(s) {extra} are not inputs of model {card.name}; ignored", file=sys.stderr)
    if absent:
        print(f"note: band(s) {absent} of the model are not in the mapping; treated as missing for every object",
              file=sys.stderr)
    ph = phot.reorder(list(card.bands))
    t0 = time.perf_counter()
    from stages.photoz import BATCH

    res = predict(model_dir, ph.flux, ph.err, batch=a.batch or BATCH, device="cpu", card=card)
    dt = time.perf_counter() - t0
    t = photoz_table(ph.ids, res, id_name=phot.id_name)
    cols = {k: v for k, v in t.columns.items() if not (a.no_pdf and k == "photoz_pdf")}
    meta = {**t.attrs, "model_dir": str(model_dir), "catalog": str(a.catalog), "mapping": mapping.to_dict()}
    pzd.write_table(a.out, cols, units={k: t.info[k].unit for k in cols},
                    descriptions={k: t.info[k].description for k in cols}, meta=meta)
    n_base = len({b.partition("@")[0] for b in card.bands})
    n_missing = int(np.sum(res["nbands"] < n_base))
    print(f"wrote {len(t)} rows to {a.out} ({', '.join(c for c in cols if c.startswith('photoz_'))}); "
          f"{n_missing} with missing bands; {len(t) / max(dt, 1e-9):.0f} objects/s")
    assert set(COLUMNS) <= set(t.columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
