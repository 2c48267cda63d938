"""surveypipe science stages: one module per stage, no Dask, Zarr or CLI here."""
from .background import Background
from .deblending import Deblending
from .detection import Detection
from .photometry import Photometry

CLASSICAL_STAGES = [Background, Detection, Deblending, Photometry]
DEFAULT_STAGES = [*CLASSICAL_STAGES]

__all__ = ["Background", "Detection", "Deblending", "Photometry", "CLASSICAL_STAGES", "DEFAULT_STAGES"]
