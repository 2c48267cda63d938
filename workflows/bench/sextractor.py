"""Running Debian's ``source-extractor`` (SExtractor 2.25) as the reference for the science benchmark.

SExtractor runs in dual-image mode, once per band: detection on the *same* detection image the
pipeline uses (the matched-filter S/N coadd, unit noise, so ``FILTER N`` and an absolute threshold
equal to ours in sigma), measurement on the band image with its own mesh background (same mesh and
filter sizes as ours) and the weight map as ``MAP_WEIGHT``. Threshold, minimum area, deblending
thresholds and contrast, cleaning, apertures and Kron parameters are the pipeline's. The catalogue is
parsed from FITS_LDAC; pixel positions are converted to 0-based.

Install: ``apt-get install -y source-extractor``.
"""
from __future__ import annotations

import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

PARAMS = ("NUMBER", "X_IMAGE", "Y_IMAGE", "FLUX_AUTO", "FLUXERR_AUTO", "KRON_RADIUS", "A_IMAGE", "B_IMAGE",
          "FLUX_APER", "FLUXERR_APER", "FLAGS")


def executable() -> str | None:
    """Path of SExtractor (``source-extractor`` on Debian, ``sex`` elsewhere), or None."""
    return shutil.which("source-extractor") or shutil.which("sex")


def version() -> str:
    exe = executable()
    if not exe:
        return "not installed"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


@dataclass(frozen=True)
class Settings:
    """SExtractor settings matched to the pipeline's detection / photometry configuration."""

    thresh: float = 4.0
    minarea: int = 5
    deblend_nthresh: int = 32
    deblend_cont: float = 0.005
    clean: bool = True
    clean_param: float = 1.0
    apertures_pix: tuple[float, ...] = (3.0, 6.0, 9.0, 12.0)  # radii
    kron_factor: float = 2.5
    min_kron_radius: float = 3.5
    back_size: int = 64
    back_filtersize: int = 3


def matched_settings(detection: Any, photometry: Any, background: Any) -> Settings:
    """The SExtractor settings equal to the pipeline's stage configs (thresholds, deblending, cleaning,
    apertures, Kron parameters, background mesh): both benchmarks compare like with like."""
    return Settings(thresh=detection.thresh, minarea=detection.minarea, deblend_nthresh=detection.deblend_nthresh,
                    deblend_cont=detection.deblend_cont, clean=detection.clean, clean_param=detection.clean_param,
                    apertures_pix=tuple(photometry.apertures_pix), kron_factor=photometry.kron_factor,
                    min_kron_radius=photometry.min_kron_radius, back_size=background.mesh,
                    back_filtersize=background.filter_size)


def masked_weights(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights with every pixel that a band's artefact mask flags set to zero: SExtractor with the
    pipeline's artefact mask, as a user would run it next to a MaxiMask-like mask."""
    return {b: np.where(masks[b] != 0, np.float32(0), w) if b in masks else w for b, w in weights.items()}


@dataclass
class Result:
    """One SExtractor catalogue (same rows in every band) and the time it took."""

    x: np.ndarray
    y: np.ndarray
    flags: np.ndarray
    xwin: np.ndarray | None = None   # windowed centroids (XWIN_IMAGE), from :func:`windowed_positions`
    ywin: np.ndarray | None = None
    flux: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # band -> {"auto", "auto_err", "apNN", ...}
    wall_s: float = 0.0
    cpu_s: float = 0.0
    runs: int = 0


def _write(path: Path, arr: np.ndarray) -> None:
    import fitsio

    fitsio.write(str(path), np.ascontiguousarray(arr), clobber=True)


def _config(work: Path, s: Settings, params_list: tuple[str, ...] = PARAMS, name: str = "surveypipe") -> Path:
    params = work / f"{name}.param"
    lines = []
    for p in params_list:
        lines.append(f"{p}({len(s.apertures_pix)})" if p in ("FLUX_APER", "FLUXERR_APER") else p)
    params.write_text("\n".join(lines) + "\n")
    cfg = work / f"{name}.sex"
    diam = ",".join(f"{2 * r:g}" for r in s.apertures_pix)
    cfg.write_text(f"""CATALOG_TYPE     FITS_LDAC
PARAMETERS_NAME  {params}
DETECT_TYPE      CCD
DETECT_MINAREA   {s.minarea}
THRESH_TYPE      ABSOLUTE,ABSOLUTE
DETECT_THRESH    {s.thresh}
ANALYSIS_THRESH  {s.thresh}
FILTER           N
DEBLEND_NTHRESH  {s.deblend_nthresh}
DEBLEND_MINCONT  {s.deblend_cont}
CLEAN            {"Y" if s.clean else "N"}
CLEAN_PARAM      {s.clean_param}
MASK_TYPE        CORRECT
WEIGHT_TYPE      MAP_WEIGHT,MAP_WEIGHT
RESCALE_WEIGHTS  N
WEIGHT_GAIN      N
PHOT_APERTURES   {diam}
PHOT_AUTOPARAMS  {s.kron_factor},{s.min_kron_radius}
SATUR_LEVEL      1e29
MAG_ZEROPOINT    31.4
GAIN             0.0
PIXEL_SCALE      0
BACK_TYPE        MANUAL,AUTO
BACK_VALUE       0.0,0.0
BACK_SIZE        {s.back_size}
BACK_FILTERSIZE  {s.back_filtersize}
BACKPHOTO_TYPE   GLOBAL
MEMORY_OBJSTACK  60000
MEMORY_PIXSTACK  6000000
MEMORY_BUFSIZE   4096
INTERP_TYPE      NONE
VERBOSE_TYPE     QUIET
NTHREADS         1
""")
    return cfg


def _dual_command(exe: str, work: Path, band: str, cfg: Path, cat: Path) -> list[str]:
    """SExtractor in dual-image mode on the detection and ``band`` files that :func:`run_dual` writes in ``work``."""
    return [exe, f"{work / 'det.fits'},{work / f'{band}.fits'}", "-c", str(cfg), "-CATALOG_NAME", str(cat),
            "-WEIGHT_IMAGE", f"{work / 'det_w.fits'},{work / f'{band}_w.fits'}"]


def run_dual(detection: np.ndarray, detection_weight: np.ndarray, images: Mapping[str, np.ndarray],
             weights: Mapping[str, np.ndarray], settings: Settings, work: str | Path) -> Result:
    """Run SExtractor once per band (dual-image mode) and parse the catalogues.

    ``detection`` is the S/N detection image (unit noise), ``detection_weight`` 1 where it has data
    and 0 elsewhere; ``images`` the band images (nJy, background *not* subtracted: SExtractor
    subtracts its own) and ``weights`` their inverse variances. Only the SExtractor processes are
    timed (CPU from the children's rusage, wall from their start to their end), not the FITS writes.
    """
    import fitsio

    exe = executable()
    if exe is None:
        raise FileNotFoundError("source-extractor not found: apt-get install -y source-extractor")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = _config(work, settings)
    _write(work / "det.fits", detection.astype(np.float32))
    _write(work / "det_w.fits", detection_weight.astype(np.float32))
    res: Result | None = None
    wall = cpu = 0.0
    for band, img in images.items():
        _write(work / f"{band}.fits", img.astype(np.float32))
        _write(work / f"{band}_w.fits", weights[band].astype(np.float32))
        cat = work / f"{band}.cat"
        if cat.exists():
            cat.unlink()
        cmd = _dual_command(exe, work, band, cfg, cat)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall += time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        if proc.returncode != 0 or not cat.exists():
            raise RuntimeError(f"source-extractor failed on band {band}: {proc.stderr[-2000:]}")
        d = fitsio.read(str(cat), ext=2)
        if res is None:
            res = Result(x=d["X_IMAGE"].astype(np.float64) - 1.0, y=d["Y_IMAGE"].astype(np.float64) - 1.0,
                         flags=d["FLAGS"].astype(np.int32))
        elif len(d) != len(res.x):
            raise RuntimeError(f"SExtractor detected {len(d)} objects in band {band} but {len(res.x)} before")
        fl = {"auto": d["FLUX_AUTO"].astype(np.float64), "auto_err": d["FLUXERR_AUTO"].astype(np.float64),
              "kron_radius": d["KRON_RADIUS"].astype(np.float64)}
        ap = np.atleast_2d(d["FLUX_APER"].T).T if d["FLUX_APER"].ndim == 1 else d["FLUX_APER"]
        ape = np.atleast_2d(d["FLUXERR_APER"].T).T if d["FLUXERR_APER"].ndim == 1 else d["FLUXERR_APER"]
        for j, r in enumerate(settings.apertures_pix):
            fl[f"ap{int(round(r)):02d}"] = ap[:, j].astype(np.float64)
            fl[f"ap{int(round(r)):02d}_err"] = ape[:, j].astype(np.float64)
        res.flux[band] = fl
    assert res is not None
    res.wall_s, res.cpu_s, res.runs = wall, cpu, len(images)
    return res


def windowed_positions(res: Result, work: str | Path, band: str, settings: Settings) -> None:
    """Add SExtractor's windowed centroids (XWIN_IMAGE / YWIN_IMAGE, its precise positions) of the
    ``band`` image to ``res``, from one more dual-image run on the files :func:`run_dual` left in
    ``work``. Not timed and not part of the timed runs: asking for XWIN there would slow SExtractor."""
    import fitsio

    exe = executable()
    work = Path(work)
    cfg = _config(work, settings, ("NUMBER", "XWIN_IMAGE", "YWIN_IMAGE"), name="positions")
    cat = work / "positions.cat"
    proc = subprocess.run(_dual_command(exe, work, band, cfg, cat), capture_output=True, text=True)
    if proc.returncode != 0 or not cat.exists():
        raise RuntimeError(f"source-extractor (windowed positions) failed on band {band}: {proc.stderr[-2000:]}")
    d = fitsio.read(str(cat), ext=2)
    if len(d) != len(res.x):
        raise RuntimeError(f"SExtractor detected {len(d)} objects in the positions run but {len(res.x)} before")
    res.xwin = d["XWIN_IMAGE"].astype(np.float64) - 1.0
    res.ywin = d["YWIN_IMAGE"].astype(np.float64) - 1.0
