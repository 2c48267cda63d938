"""surveypipe science stages: one module per stage, no Dask, Zarr or CLI here."""
from .background import Background
from .detection import Detection
from .photometry import Photometry

DEFAULT_STAGES = [Background, Detection, Photometry]

__all__ = ["Background", "Detection", "Photometry", "DEFAULT_STAGES"]
