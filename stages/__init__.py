"""surveypipe science stages: one module per stage, no Dask, Zarr or CLI here."""
from .background import Background
from .deblending import Deblending
from .detection import Detection
from .lenses import Lenses
from .morphology import Morphology
from .photometry import Photometry
from .photoz import PhotoZ

CLASSICAL_STAGES = [Background, Detection, Deblending, Photometry]
# the artefact stage joins (first) once its model is shipped: see issue 4
DEFAULT_STAGES = [*CLASSICAL_STAGES, PhotoZ, Morphology, Lenses]

__all__ = ["Background", "Detection", "Deblending", "Photometry", "PhotoZ", "Morphology", "Lenses", "CLASSICAL_STAGES", "DEFAULT_STAGES"]
