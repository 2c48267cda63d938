"""surveypipe science stages: one module per stage, no Dask, Zarr or CLI here."""
from .background import Background
from .detection import Detection
from .photometry import Photometry

CLASSICAL_STAGES = [Background, Detection, Photometry]
DEFAULT_STAGES = [*CLASSICAL_STAGES]

__all__ = ["Background", "Detection", "Photometry", "CLASSICAL_STAGES", "DEFAULT_STAGES"]
