"""The cutout service: fixed-size multi-band stamps around object positions, for image models.

Every image model of the pipeline (morphology, lens finding, later ones) sees its objects the same
way: an ``S x S`` stamp per band centred on the pixel nearest to the object's position (stamp pixel
``(S//2, S//2)`` is image pixel ``(round(y), round(x))``; no resampling, so the noise stays
untouched), with a weight plane (inverse variance) and a mask plane (True where a pixel carries no
data). Pixels beyond the image and masked pixels are set to 0 in the image and weight planes; an
object whose stamp crosses the image edge is flagged. Extraction is one vectorised gather per band
(no Python loop over objects).

A model card says how its stamps are made and normalised (:class:`CutoutSpec`): bands in channel
order, stamp size, pixel scale, the stretch (``arcsinh(image / scale_band)`` with per-band scales in
nJy, optionally clipped) and which planes become input channels. A card that disagrees with its ONNX
file, or a tile that lacks a band or has another pixel scale, is refused with a message that says
what differs. Pure numpy: no astronomy beyond this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .bits import Bit, BitRegistry
from .errors import ConfigError
from .scratch import release

#: flags of one stamp (``Stamps.flags``); stages copy these bits into their own flag columns
STAMP_FLAGS = BitRegistry("stamp_flags", [
    Bit("edge", 0, "the stamp extends beyond the image; those pixels are zero-padded and masked"),
    Bit("masked", 1, "more than the allowed fraction of the stamp's central pixels carry no data"),
], dtype=np.uint8)

STRETCHES = ("arcsinh", "linear")
PLANES = ("image", "mask", "weight")


@dataclass
class Stamps:
    """A batch of ``N`` stamps of ``B`` bands and ``S x S`` pixels.

    ``image`` (nJy) and ``weight`` (inverse variance, nJy⁻²) are 0 wherever ``mask`` is True
    (pixel beyond the image, flagged bad, or without weight).
    """

    bands: tuple[str, ...]
    image: np.ndarray    # (N, B, S, S) float32
    weight: np.ndarray   # (N, B, S, S) float32
    mask: np.ndarray     # (N, B, S, S) bool
    outside: np.ndarray  # (N,) bool: part of the stamp lies beyond the image
    centre: np.ndarray   # (N, 2) int64: image pixel (x, y) at stamp pixel (S//2, S//2)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])

    def masked_fraction(self, radius: float | None = None) -> np.ndarray:
        """Fraction of masked pixels (all bands) within ``radius`` pixels of the stamp centre."""
        if len(self) == 0:
            return np.zeros(0)
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s] - s // 2
        inside = np.ones((s, s), bool) if radius is None else (xx * xx + yy * yy) <= radius * radius
        m = self.mask[:, :, inside]
        return m.mean(axis=(1, 2))

    def flags(self, *, max_masked_fraction: float = 0.1, radius: float | None = None) -> np.ndarray:
        """:data:`STAMP_FLAGS` per stamp (uint8)."""
        f = np.zeros(len(self), np.uint8)
        f[self.outside] |= STAMP_FLAGS["edge"]
        f[self.masked_fraction(radius) > max_masked_fraction] |= STAMP_FLAGS["masked"]
        return f


def extract(images: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, size: int, *,
            bands: Sequence[str] | None = None, weights: Mapping[str, np.ndarray] | None = None,
            bad: Mapping[str, np.ndarray] | None = None) -> Stamps:
    """Cut ``size x size`` stamps of every band around ``(x, y)`` (0-based pixel coordinates).

    Parameters
    ----------
    images
        band -> 2-D image (all bands on one pixel grid).
    x, y
        object positions, any shape that flattens to ``(N,)``.
    size
        stamp side in pixels (>= 1).
    bands
        bands in channel order (default: the order of ``images``).
    weights
        band -> inverse variance; pixels with weight <= 0 or non-finite count as masked.
        Without weights the weight plane is 1 on usable pixels.
    bad
        band -> bool plane, True where a pixel must not be used.
    """
    bands = tuple(bands) if bands is not None else tuple(images)
    if not bands:
        raise ValueError("extract: no bands given")
    missing = [b for b in bands if b not in images]
    if missing:
        raise ValueError(f"extract: no image for band(s) {missing}; have {sorted(images)}")
    size = int(size)
    if size < 1:
        raise ValueError(f"extract: stamp size must be >= 1, got {size}")
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"extract: x and y differ in length ({x.size} vs {y.size})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("extract: positions must be finite")
    h, w = images[bands[0]].shape
    n, nb = x.size, len(bands)
    cx = np.floor(x + 0.5).astype(np.int64)
    cy = np.floor(y + 0.5).astype(np.int64)
    off = np.arange(size, dtype=np.int64) - size // 2
    ix = cx[:, None] + off[None, :]                      # (N, S)
    iy = cy[:, None] + off[None, :]
    okx, oky = (ix >= 0) & (ix < w), (iy >= 0) & (iy < h)
    outside = ~(okx.all(axis=1) & oky.all(axis=1))
    # one flat index per stamp pixel (clipped onto the image), reused for every plane of every band
    flat = (np.clip(iy, 0, h - 1) * w)[:, :, None] + np.clip(ix, 0, w - 1)[:, None, :]   # (N, S, S)
    inside = (oky[:, :, None] & okx[:, None, :]) if outside.any() else None
    image = np.empty((n, nb, size, size), np.float32)
    weight = np.empty((n, nb, size, size), np.float32)
    mask = np.empty((n, nb, size, size), bool)
    for j, b in enumerate(bands):
        img = images[b]
        if img.shape != (h, w):
            raise ValueError(f"extract: band {b} image {img.shape} differs from {bands[0]} {(h, w)}")
        vals = np.take(np.asarray(img, np.float32).ravel(), flat)
        good = np.isfinite(vals)
        if inside is not None:
            good &= inside
        if bad is not None and b in bad:
            good &= ~np.take(np.asarray(bad[b], bool).ravel(), flat)
        if weights is not None and b in weights:
            wt = np.take(np.asarray(weights[b], np.float32).ravel(), flat)
            good &= np.isfinite(wt) & (wt > 0)
            weight[:, j] = np.where(good, wt, np.float32(0))
        else:
            weight[:, j] = good
        image[:, j] = np.where(good, vals, np.float32(0))
        mask[:, j] = ~good
        release(img, weights.get(b) if weights is not None else None, bad.get(b) if bad is not None else None)
    return Stamps(bands, image, weight, mask, outside, np.stack([cx, cy], axis=1))


def stretch(stamps: Stamps, normalisation: Mapping[str, Any]) -> np.ndarray:
    """Model input ``(N, C, S, S)`` float32 from stamps, per a card's ``normalisation``.

    ``{"stretch": "arcsinh" | "linear", "scale_njy": {band: nJy}, "clip": float | None,
    "planes": ["image", "mask", "weight"]}``: image channels are ``arcsinh(image / scale)`` (or
    ``image / scale``) in band order, clipped to ``±clip``; a ``mask`` plane adds one channel per
    band (1 where masked), a ``weight`` plane one channel per band (``sqrt(weight) * scale``,
    i.e. the per-pixel S/N scale).
    """
    norm = _check_normalisation(normalisation, stamps.bands)
    scales = np.array([norm["scale_njy"][b] for b in stamps.bands], np.float32)[None, :, None, None]
    chans = []
    for plane in norm["planes"]:
        if plane == "image":
            v = stamps.image / scales
            if norm["stretch"] == "arcsinh":
                v = np.arcsinh(v)
            clip = norm.get("clip")
            if clip:
                v = np.clip(v, -clip, clip)
            chans.append(v.astype(np.float32, copy=False))
        elif plane == "mask":
            chans.append(stamps.mask.astype(np.float32))
        else:  # weight
            chans.append((np.sqrt(stamps.weight) * scales).astype(np.float32))
    return np.ascontiguousarray(np.concatenate(chans, axis=1))


def _check_normalisation(norm: Mapping[str, Any], bands: Sequence[str]) -> Mapping[str, Any]:
    st = norm.get("stretch")
    if st not in STRETCHES:
        raise ConfigError(f"normalisation stretch {st!r} unknown; use one of {STRETCHES}")
    scales = norm.get("scale_njy") or {}
    missing = [b for b in bands if b not in scales]
    if missing:
        raise ConfigError(f"normalisation has no scale_njy for band(s) {missing}")
    bad = [b for b in bands if not (np.isfinite(scales[b]) and scales[b] > 0)]
    if bad:
        raise ConfigError(f"normalisation scale_njy must be positive for band(s) {bad}")
    planes = list(norm.get("planes", ["image"]))
    if not planes or any(p not in PLANES for p in planes) or len(set(planes)) != len(planes):
        raise ConfigError(f"normalisation planes {planes} invalid; choose distinct entries of {PLANES}")
    return {**norm, "planes": planes}


@dataclass(frozen=True)
class CutoutSpec:
    """How a model wants its stamps, read from its model card (never from constants in code).

    Card fields used: ``bands`` (channel order), ``inputs[input_name]`` with ``shape``
    ``[batch, C, S, S]`` and ``pixel_scale_arcsec``, and ``normalisation`` (see :func:`stretch`).
    """

    name: str
    bands: tuple[str, ...]
    size: int
    channels: int
    normalisation: Mapping[str, Any]
    input_name: str = "input"
    pixel_scale_arcsec: float | None = None

    @classmethod
    def from_card(cls, card: Any, input_name: str = "input") -> "CutoutSpec":
        name = f"model {getattr(card, 'name', '?')!r}"
        bands = tuple(card.bands)
        if not bands:
            raise ConfigError(f"{name}: card lists no bands")
        if len(set(bands)) != len(bands):
            raise ConfigError(f"{name}: card repeats a band in {list(bands)}")
        spec_in = (card.inputs or {}).get(input_name)
        if not spec_in or "shape" not in spec_in:
            raise ConfigError(f"{name}: card has no shape for input {input_name!r}")
        shape = list(spec_in["shape"])
        if len(shape) != 4 or not all(isinstance(v, int) for v in shape[1:]):
            raise ConfigError(f"{name}: input shape {shape} is not [batch, C, S, S]")
        _, c, s1, s2 = shape
        if s1 != s2:
            raise ConfigError(f"{name}: stamps must be square, card says {s1}x{s2}")
        norm = _check_normalisation(card.normalisation, bands)
        if len(norm["planes"]) * len(bands) != c:
            raise ConfigError(f"{name}: card declares {c} input channels but {len(bands)} band(s) x "
                              f"{len(norm['planes'])} plane(s) {norm['planes']} make {len(norm['planes']) * len(bands)}")
        scale = spec_in.get("pixel_scale_arcsec")
        return cls(getattr(card, "name", "?"), bands, int(s1), int(c), norm, input_name,
                   float(scale) if scale is not None else None)

    def check_session(self, sess: Any) -> None:
        """Refuse an ONNX session whose input disagrees with the card (name, channels, stamp size)."""
        ins = {i.name: i for i in sess.get_inputs()}
        if self.input_name not in ins:
            raise ConfigError(f"model {self.name!r}: ONNX file has inputs {sorted(ins)}, card says {self.input_name!r}")
        shape = list(ins[self.input_name].shape)
        want = [None, self.channels, self.size, self.size]
        if len(shape) != 4 or any(isinstance(g, int) and g != w for g, w in zip(shape[1:], want[1:])):
            raise ConfigError(f"model {self.name!r}: ONNX input shape {shape} disagrees with the card "
                              f"({self.channels} channels for bands {list(self.bands)}, stamps {self.size}x{self.size})")

    def check_tile(self, bands: Sequence[str], pixel_scale_arcsec: float | None = None, *, tile: str = "") -> None:
        """Refuse a tile that lacks one of the model's bands or has another pixel scale (> 1 %)."""
        where = f"tile {tile!r}: " if tile else ""
        missing = [b for b in self.bands if b not in bands]
        if missing:
            raise ConfigError(f"{where}model {self.name!r} needs bands {list(self.bands)} but band(s) "
                              f"{missing} are missing (tile has {list(bands)})")
        if self.pixel_scale_arcsec and pixel_scale_arcsec:
            if abs(pixel_scale_arcsec / self.pixel_scale_arcsec - 1) > 0.01:
                raise ConfigError(f"{where}model {self.name!r} was trained on {self.pixel_scale_arcsec:g}\"/pixel "
                                  f"stamps, the tile has {pixel_scale_arcsec:.4g}\"/pixel")

    def stamps(self, images: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, *,
               weights: Mapping[str, np.ndarray] | None = None,
               bad: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, Stamps]:
        """(model input, stamps) for the objects at ``(x, y)``."""
        st = extract(images, x, y, self.size, bands=self.bands, weights=weights, bad=bad)
        return stretch(st, self.normalisation), st

    def batches(self, images: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, chunk: int = 4096,
                weights: Mapping[str, np.ndarray] | None = None,
                bad: Mapping[str, np.ndarray] | None = None) -> Iterator[tuple[slice, np.ndarray, Stamps]]:
        """:meth:`stamps` over chunks of ``chunk`` objects (bounded memory): (rows, input, stamps)."""
        n = len(np.asarray(x).ravel())
        for i in range(0, n, max(1, int(chunk))):
            sl = slice(i, min(n, i + chunk))
            inp, st = self.stamps(images, np.asarray(x).ravel()[sl], np.asarray(y).ravel()[sl], weights=weights, bad=bad)
            yield sl, inp, st
