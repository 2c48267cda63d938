"""surveypipe science stages: one module per stage, no Dask, Zarr or CLI here."""
from .artefacts import Artefacts
from .background import Background
from .deblending import Deblending
from .detection import Detection
from .lenses import Lenses
from .morphology import Morphology
from .photometry import Photometry
from .photoz import PhotoZ

CLASSICAL_STAGES = [Background, Detection, Deblending, Photometry]
# artefact segmentation first: background, detection and photometry take its mask when it is there
DEFAULT_STAGES = [Artefacts, *CLASSICAL_STAGES, PhotoZ, Morphology, Lenses]

__all__ = ["Artefacts", "Background", "Detection", "Deblending", "Photometry", "PhotoZ", "Morphology", "Lenses", "CLASSICAL_STAGES", "DEFAULT_STAGES"]
