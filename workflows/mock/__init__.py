"""The mock survey: a library first (SEDs, population, PSF/noise, rendering), a command second.

Typical uses::

    from workflows.mock import write_release
    manifest = write_release("out/mock", n_tiles=4, size=1024, seed=42)

    from workflows.mock import galaxy_mags, colour_grid       # photo-z templates
    mags = galaxy_mags(sed=1.5, z=0.8, mag_ref=24.0, bands="ugrizy")

    from workflows.mock import Footprint, make_population, SurveyConfig, render_model
    pop = make_population(Footprint(256, 256), seed=1000)       # training-set catalogues / stamps

Modules: :mod:`.seeds` (seed registry), :mod:`.sed` (SEDs -> colours), :mod:`.population`
(true objects), :mod:`.psf` (per-band PSF, sky, depth), :mod:`.render` (GalSim + batched k-space
drawing, noise), :mod:`.release` (tiles, FITS, truth, manifest).
"""
from .population import TYPES, Footprint, Population, make_population
from .psf import SurveyConfig, band_table
from .release import tile_layout, write_release, write_tile
from .render import MASK_BITS, MASK_REGISTRY, add_noise, render_model
from .seeds import SEED_RANGES, check_seed, make_rng, purpose_of
from .sed import LSST_BANDS, SED_TYPES, colour_grid, galaxy_mags, sed_weights, star_mags

__all__ = [
    "TYPES", "Footprint", "Population", "make_population", "SurveyConfig", "band_table", "tile_layout",
    "write_release", "write_tile", "MASK_BITS", "MASK_REGISTRY", "add_noise", "render_model", "SEED_RANGES",
    "check_seed", "make_rng", "purpose_of", "LSST_BANDS", "SED_TYPES", "colour_grid", "galaxy_mags",
    "sed_weights", "star_mags",
]
