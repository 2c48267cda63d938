"""The artefact injector of the mock survey: every class, exact per-pixel truth, per band."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from stages.artefacts import ARTEFACT_BITS, ARTEFACT_CLASSES
from workflows.mock.artefacts import (SPIKE_VS_STAR, TRUTH_NSIGMA, ArtefactRates, inject_artefacts, moffat_alpha,
                                      truth_summary)

SAT = 1000.0
SIG = 1.0
FWHM = 4.0


def _sky(size: int = 192, seed: int = 140, star_peak: float | None = None):
    """Unit-noise sky; optionally one Moffat star (clipped at SAT), like the generator's output."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, SIG, (size, size)).astype(np.float32)
    w = np.full((size, size), 1 / SIG**2, np.float32)
    stars = Table({"x": np.zeros(0), "y": np.zeros(0), "peak": np.zeros(0)})
    if star_peak:
        a = moffat_alpha(FWHM)
        yy, xx = np.mgrid[0:size, 0:size]
        c = size / 2
        model = star_peak * (1 + ((xx - c) ** 2 + (yy - c) ** 2) / a**2) ** -3.0
        img += model.astype(np.float32)
        np.minimum(img, np.float32(SAT), out=img)
        w = (1.0 / (SIG**2 + model / 50.0)).astype(np.float32)
        stars = Table({"x": [c], "y": [c], "peak": [star_peak]})
    return img, w, stars


DENSE = ArtefactRates(cosmic_rays_per_mpix=(800.0, 800.0), trails_per_kpix=30.0, hot_columns_per_kpix=15.0,
                      dead_columns_per_kpix=15.0, hot_pixels_per_mpix=(800.0, 800.0), spike_probability=1.0)


@pytest.mark.parametrize("cls", ARTEFACT_CLASSES)
def test_each_class_alone_marks_only_its_bit(cls):
    img, w, stars = _sky(star_peak=20 * SAT if cls in ("saturation", "diffraction_spike") else None)
    before = img.copy()
    truth = inject_artefacts(img, w, band="r", rng=np.random.default_rng(1), stars=stars, saturate=SAT,
                             psf_fwhm_pix=FWHM, rates=DENSE, classes=(cls,))
    assert truth.dtype == np.uint16 and truth.shape == img.shape
    counts = truth_summary(truth)
    assert counts[cls] > 0, counts
    assert all(v == 0 for c, v in counts.items() if c != cls), counts
    changed = img != before
    on = (truth & ARTEFACT_BITS[cls]) != 0
    if cls not in ("saturation",):
        assert not np.any(on & ~changed), "a truth pixel the artefact did not touch"


@pytest.mark.parametrize("cls", ["cosmic_ray", "satellite_trail", "hot_pixel", "hot_column", "diffraction_spike"])
def test_additive_truth_is_every_pixel_changed_by_a_sigma(cls):
    img, w, stars = _sky(star_peak=20 * SAT if cls == "diffraction_spike" else None)
    before = img.copy()
    truth = inject_artefacts(img, w, band="g", rng=np.random.default_rng(2), stars=stars, saturate=SAT,
                             psf_fwhm_pix=FWHM, rates=DENSE, classes=(cls,))
    on = (truth & ARTEFACT_BITS[cls]) != 0
    big = (img - before) >= TRUTH_NSIGMA / np.sqrt(w) * 1.0001  # the pixel's own sigma (source noise included)
    if cls == "diffraction_spike":  # spikes also need to stand out of the star's own light (SPIKE_VS_STAR of it)
        r2 = np.sum((np.mgrid[0:img.shape[0], 0:img.shape[1]] - img.shape[0] / 2) ** 2, axis=0)
        star = 20 * SAT * (1 + r2 / moffat_alpha(FWHM) ** 2) ** -3.0
        big &= (img - before) >= SPIKE_VS_STAR * star * 1.001
    assert np.all(on[big]), f"{np.count_nonzero(big & ~on)} pixels changed by > 1 sigma without the bit"


def test_bands_differ_and_same_rng_repeats():
    out = []
    for seed in (5, 5, 6):
        img, w, stars = _sky()
        out.append((inject_artefacts(img, w, band="r", rng=np.random.default_rng(seed), stars=stars, saturate=SAT,
                                     psf_fwhm_pix=FWHM, rates=DENSE), img))
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])
    assert not np.array_equal(out[0][0], out[2][0])


def test_spikes_take_their_light_from_the_star_not_add_it():
    """A spider diffracts light out of the core: with spikes the star's total flux stays, its core dims."""
    size, peak = 384, 0.5 * SAT  # unsaturated, so every pixel of the core can give up light
    a = moffat_alpha(FWHM)
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2
    model = (peak * (1 + ((xx - c) ** 2 + (yy - c) ** 2) / a**2) ** -3.0).astype(np.float32)
    img = model.copy()
    w = np.full(img.shape, 1 / (0.05 * SIG) ** 2, np.float32)  # a deep exposure: the arms stand out far from the core
    stars = Table({"x": [c], "y": [c], "peak": [peak]})
    truth = inject_artefacts(img, w, band="r", rng=np.random.default_rng(3), stars=stars, saturate=SAT,
                             psf_fwhm_pix=FWHM, rates=ArtefactRates(spike_strength=(0.0125, 0.0125), spike_probability=1.0),
                             classes=("diffraction_spike",))
    assert np.count_nonzero(truth & ARTEFACT_BITS["diffraction_spike"]) > 0
    assert abs(img.sum() / model.sum() - 1.0) < 2e-3                            # no light is added
    ring = np.abs(np.hypot(xx - c, yy - c) - 2 * a) < 0.5
    ratio = img[ring] / model[ring]
    assert 0.93 < ratio.min() < 0.97                  # between the arms the star gave up ~4.3 s0 = 5 % ...
    assert ratio.max() > 1.05                         # ... which the arms carry


def test_bleed_trails_run_along_columns_from_the_core():
    img, w, stars = _sky(star_peak=30 * SAT)
    core = img >= SAT
    truth = inject_artefacts(img, w, band="i", rng=np.random.default_rng(3), stars=stars, saturate=SAT,
                             psf_fwhm_pix=FWHM, classes=("saturation",))
    sat = (truth & ARTEFACT_BITS["saturation"]) != 0
    bleed = sat & ~core
    assert bleed.sum() > 10
    cols_core = set(np.flatnonzero(core.any(axis=0)))
    assert set(np.flatnonzero(bleed.any(axis=0))) <= cols_core
    partial = sat & (img < SAT * 0.999)  # only the last pixel of a bleed run may be partly filled
    assert partial.sum() <= 2 * len(set(np.flatnonzero(bleed.any(axis=0))))


def test_dead_columns_own_their_pixels_and_some_zero_the_weight():
    img, w, stars = _sky(size=256)
    before = img.copy()
    truth = inject_artefacts(img, w, band="z", rng=np.random.default_rng(4), stars=stars, saturate=SAT,
                             psf_fwhm_pix=FWHM, rates=ArtefactRates(dead_columns_per_kpix=40.0, dead_weight_zero=0.5),
                             classes=("dead_column",))
    dead = (truth & ARTEFACT_BITS["dead_column"]) != 0
    assert dead.sum() >= 256
    # response r <= 0.9 of (sky + signal), sky-subtracted: at least 0.1 x 30 sigma below 0.9 x the old value
    assert np.all(img[dead] <= 0.9 * np.maximum(before[dead], 0) - 2.9 * SIG * (w[dead] > 0))
    assert np.all(truth[dead] == ARTEFACT_BITS["dead_column"])
    assert np.any(w[dead] == 0) and np.all(w[~dead] > 0)


def test_generator_writes_truth_per_band(tmp_path):
    import fitsio

    from workflows.mock.release import write_release

    m = write_release(tmp_path / "rel", n_tiles=1, size=128, bands="gr", seed=141, overlap=0,
                      artefact_injector=inject_artefacts, progress=False)
    planes = [fitsio.read(str(m.parent / "truth" / f"t0000_{b}_artefacts.fits")) for b in "gr"]
    assert all(p.shape == (128, 128) for p in planes)
    assert not np.array_equal(planes[0], planes[1])  # each band draws its own artefacts
