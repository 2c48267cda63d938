"""surveypipe engine: manifests, tiles, the stage DAG, Dask execution, the Zarr store, the CLI.

Knows no astronomy algorithm: those live in ``stages/``.
"""
__version__ = "0.1.0"
