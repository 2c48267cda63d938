"""The one registry of object flags (SExtractor / Rubin meanings reused where they exist)."""
from __future__ import annotations

from pipeline.bits import Bit, BitRegistry

OBJECT_FLAGS = BitRegistry("object_flags", [
    Bit("blended", 0, "object has neighbours that affect its photometry (SExtractor bit 1)"),
    Bit("deblended_child", 1, "object is a child of a deblended parent (SExtractor bit 2)"),
    Bit("saturated", 2, "at least one pixel of the footprint is saturated (SExtractor bit 4)"),
    Bit("edge", 3, "footprint or aperture touches the tile edge (SExtractor bit 8)"),
    Bit("aperture_truncated", 4, "an aperture extends past the image or into masked pixels"),
    Bit("deblend_overflow", 5, "deblending hit a limit (sep sub-objects: retried with a larger one, else peaks only; or max_children)"),
    Bit("bad_photometry", 6, "a flux could not be measured (no good pixel in the aperture or PSF footprint)"),
    Bit("masked_pixels", 7, "the aperture contains masked (bad) pixels, excluded from the sums"),
    Bit("artefact_cosmic_ray", 8, "aperture touches a cosmic ray"),
    Bit("artefact_satellite_trail", 9, "aperture touches a satellite/airplane trail"),
    Bit("artefact_hot_column", 10, "aperture touches a hot column or line"),
    Bit("artefact_dead_column", 11, "aperture touches a dead column or line"),
    Bit("artefact_hot_pixel", 12, "aperture touches a hot pixel"),
    Bit("artefact_saturation", 13, "aperture touches a saturated core or bleed trail"),
    Bit("artefact_diffraction_spike", 14, "aperture touches a diffraction spike"),
    Bit("pixstack_overflow", 15, "detection hit sep's pixel-buffer limit and was retried with a larger one"),
], dtype="uint32")

# the bits a band's own pixels raise: photometry writes them per band (``<band>_flags``) and their union in ``flags``;
# the other bits describe the object as a whole
BAND_PIXEL_FLAGS: int = OBJECT_FLAGS.value("saturated", "bad_photometry", "masked_pixels",
                                           *[name for name in OBJECT_FLAGS.bits if name.startswith("artefact_")])
