"""A synthetic multi-modality lesion dataset on which discriminability means something.

Three modalities, each drawn to look like its real counterpart, with classes that differ the way
real lesions do; two modalities have three classes, so a ``wrong-label`` overlay there writes one
of two other class names and the written word no longer names the class by elimination (it still
correlates with it: two images of one class share it with probability 1/2, of two classes 1/4;
``random-label`` is the overlay independent of the class):

- ``dermoscopy`` (colour): ``naevus`` (round, regular border, one or two even browns, regular
  pigment network), ``seborrhoeic-keratosis`` (waxy, "stuck on": sharply demarcated, light to dark
  or yellowish brown, a cerebriform surface of gyri and dark sulci, milia-like cysts as small
  white dots and comedo-like openings as dark plugs, no pigment network) and ``melanoma``
  (asymmetric, irregular notched border, several colours including black, blue-grey, red and
  white, atypical network, peripheral dots).
- ``xray`` (greyscale chest radiograph): ``benign-nodule`` (small, smooth, round, homogeneous,
  sometimes calcified) vs ``malignant-mass`` (larger, lobulated, spiculated, uneven density). Two
  classes: a third radiographic class with a real counterpart would be a chest without a nodule,
  and that would need a name other than ultrasound's ``normal``; one two-class modality also
  keeps the demo showing the regime where every changed vote goes to the written class.
- ``ultrasound`` (greyscale B-mode fan with speckle; named as BUSI labels them): ``normal`` (no
  mass: skin, subcutaneous fat with Cooper's ligaments, glandular tissue with fat lobules,
  pectoralis), ``benign`` (a fibroadenoma: oval, circumscribed, wider than tall, thin capsule,
  posterior enhancement) and ``malignant`` (a carcinoma: irregular/angular, taller than wide,
  echogenic halo, posterior acoustic shadowing).

Every lesion draws a latent *atypia* in [0, 1] (benign ~ Beta(2, 5), malignant ~ Beta(5, 2)) that
drives all its malignancy cues at once, plus class-dependent size and shape priors that overlap,
and class-independent position, contrast, colour and background variation. P(atypia > 0.5) is
about 0.11 for a benign lesion and P(atypia < 0.5) the same for a malignant one, so about one
lesion in ten looks like the other class: no extractor can be perfect, while a person can tell
most lesions apart. A seborrhoeic keratosis also draws a latent *keratosis* ~ Beta(5, 2) that
drives its keratotic cues together; the flat ones (about one in ten) pass for a naevus, and the
irritated ones (high atypia: darker, a black or blue-grey patch) for a melanoma. About one
``normal`` breast in seven has a fat lobule large and oval enough to pass for a small benign mass.

Radiographs are collimated views of a chest around the lesion (zoom 1.7–2.3 of the full chest),
so a nodule is a few percent to a fifth of the field; ultrasound is rendered in beam (depth ×
angle) coordinates, with speckle, depth attenuation and posterior shadowing/enhancement computed
along each beam, then scan-converted into the fan.

Each lesion is rendered once into a canonical scene larger than the field of view; its views are
resampled from that scene with their own rotation, shift, scale, brightness and noise, and share a
``group_id``. The train/test split is drawn by lesion, so a group never straddles splits.

Randomness: one :class:`numpy.random.SeedSequence` per (seed, modality, class, lesion) for the
lesion and one per (..., view) for the view, keyed on CRC-32 of the names, so any subset, order or
count of images reproduces the same pixels. Files are written with :func:`vlmindex.imageio.save_png`
(no timestamps), so the same seed gives byte-identical PNGs.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.special import expit

from vlmindex.errors import VlmindexError
from vlmindex.imageio import load_image, save_png
from vlmindex.sheet import contact_sheet

#: modality -> class names (normal or benign first, malignant last). Names are unique across modalities.
MODALITIES: dict[str, tuple[str, ...]] = {
    "dermoscopy": ("naevus", "seborrhoeic-keratosis", "melanoma"),
    "xray": ("benign-nodule", "malignant-mass"),
    "ultrasound": ("normal", "benign", "malignant"),
}

DEFAULT_LESIONS_PER_CLASS = 15
DEFAULT_VIEWS_PER_LESION = 3
DEFAULT_SIZE = 224

_SPLIT_KEY = 0xFFFF_FFFF  # spawn key (modality, class, _SPLIT_KEY) for the split draw; images use 4-part keys


@dataclass
class SynthImage:
    """One generated image: ``relpath`` is relative to the ``out_dir`` given to :func:`generate`."""

    relpath: str
    label: str
    split: str
    group_id: str
    modality: str


Base = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Shared drawing helpers (all vectorised over pixels)


def _name_key(name: str) -> int:
    # CRC-32, not hash(): Python salts str hashes per process, which would break reproducibility.
    return zlib.crc32(name.encode("utf-8"))


def _rng(seed: int, modality: str, label: str, *tail: int) -> np.random.Generator:
    ss = np.random.SeedSequence(seed, spawn_key=(_name_key(modality), _name_key(label), *tail))
    return np.random.default_rng(ss)


def _grid(n: int, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """x (columns, rightwards) and y (rows, downwards) covering [-extent, extent] at pixel centres."""
    t = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0) * extent
    return np.meshgrid(t, t)


def _smooth_noise(rng: np.random.Generator, n: int, cells: float) -> np.ndarray:
    """An n×n smooth random field with about ``cells`` blobs across, zero mean, unit std."""
    k = max(2, int(round(cells))) + 3
    low = rng.standard_normal((k, k)).astype(np.float32)
    field = np.asarray(Image.fromarray(low, "F").resize((n, n), Image.Resampling.BICUBIC))
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def _smooth_noise_2d(rng: np.random.Generator, n: int, cells_x: float, cells_y: float) -> np.ndarray:
    """As :func:`_smooth_noise` with blobs of their own size along each axis (flattened when
    ``cells_y > cells_x``)."""
    kx, ky = (max(2, int(round(c))) + 3 for c in (cells_x, cells_y))
    low = rng.standard_normal((ky, kx)).astype(np.float32)
    field = np.asarray(Image.fromarray(low, "F").resize((n, n), Image.Resampling.BICUBIC))
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def _smooth_noise_1d(rng: np.random.Generator, n: int, cells: float) -> np.ndarray:
    k = max(2, int(round(cells))) + 3
    low = rng.standard_normal(k)
    field = np.interp(np.linspace(0, k - 1, n), np.arange(k), low)
    field = ndimage.gaussian_filter1d(field, n / k / 2)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


@dataclass
class _Shape:
    """A star-shaped lesion outline: r(θ) = r0·(1 + Σ a_k cos(kθ + φ_k)) + Σ spikes, in a frame
    rotated by ``angle`` and stretched by ``aspect`` (height / width)."""

    cx: float
    cy: float
    r0: float
    aspect: float
    angle: float
    amps: np.ndarray  # a_k for k = 1..K
    phases: np.ndarray
    spike_angles: np.ndarray
    spike_lengths: np.ndarray  # in units of r0
    spike_width: float  # radians at the base

    def extent(self) -> float:
        reach = 1 + np.abs(self.amps).sum() + (self.spike_lengths.max(initial=0.0))
        return float(self.r0 * reach * max(1.0, self.aspect))

    def polar(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """rho (distance in the lesion frame), theta, and the outline radius r(theta)."""
        dx, dy = x - self.cx, y - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = c * dx + s * dy
        v = (-s * dx + c * dy) / self.aspect
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        r = np.ones_like(rho)
        for k, (a, p) in enumerate(zip(self.amps, self.phases, strict=True), start=1):
            if a != 0:
                r += a * np.cos(k * theta + p)
        r = np.maximum(r, 0.35)
        for ang, length in zip(self.spike_angles, self.spike_lengths, strict=True):
            d = np.abs(_wrap(theta - ang)) / self.spike_width
            r += length * np.clip(1 - d, 0, None) ** 2
        return rho, theta, r * self.r0


def _window(shape: _Shape, x: np.ndarray, y: np.ndarray, margin: float) -> tuple[slice, slice]:
    """Rows/cols of an axis-aligned grid that the lesion can touch, so trig runs only there."""
    xs, ys = x[0, :], y[:, 0]
    reach = shape.extent() + margin
    c0, c1 = np.searchsorted(xs, [shape.cx - reach, shape.cx + reach])
    r0, r1 = np.searchsorted(ys, [shape.cy - reach, shape.cy + reach])
    return slice(int(r0), int(r1)), slice(int(c0), int(c1))


def _lesion_fields(
    shape: _Shape, x: np.ndarray, y: np.ndarray, margin: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    win = _window(shape, x, y, margin)
    rho, theta, r = shape.polar(x[win], y[win])
    return win, rho, theta, r


def _random_shape(
    rng: np.random.Generator,
    *,
    cx: float,
    cy: float,
    r0: float,
    aspect: float,
    angle: float,
    low_irregularity: float,
    high_irregularity: float,
    n_harmonics: int = 14,
    n_spikes: int = 0,
    spike_length: float = 0.0,
    spike_width: float = 0.08,
) -> _Shape:
    k = np.arange(1, n_harmonics + 1)
    scale = np.where(k <= 3, low_irregularity, high_irregularity / np.maximum(k - 2, 1) ** 0.7)
    amps = rng.standard_normal(n_harmonics) * scale
    phases = rng.uniform(0, 2 * np.pi, n_harmonics)
    spike_angles = rng.uniform(-np.pi, np.pi, n_spikes)
    spike_lengths = spike_length * rng.uniform(0.4, 1.0, n_spikes)
    return _Shape(cx, cy, r0, aspect, angle, amps, phases, spike_angles, spike_lengths, spike_width)


def _atypia(rng: np.random.Generator, malignant: bool) -> float:
    return float(rng.beta(5, 2) if malignant else rng.beta(2, 5))


@dataclass
class _View:
    angle: float
    scale: float
    shift: tuple[float, float]
    flip: bool = False


def _view_coords(out_x: np.ndarray, out_y: np.ndarray, view: _View, extent: float, n: int) -> np.ndarray:
    """Base-raster (row, col) coordinates of output points seen through a view transform."""
    x = -out_x if view.flip else out_x
    c, s = math.cos(view.angle), math.sin(view.angle)
    tx = (c * x - s * out_y) / view.scale + view.shift[0]
    ty = (s * x + c * out_y) / view.scale + view.shift[1]
    col = (tx / extent + 1) * 0.5 * n - 0.5
    row = (ty / extent + 1) * 0.5 * n - 0.5
    return np.stack([row, col])


@dataclass
class _Raster:
    """A square float raster spanning [-extent, extent]², padded once so views can reach past it
    (seeing reflected or edge-continued content rather than black)."""

    image: Image.Image  # PIL 'F', padded
    n: int
    pad: int
    extent: float

    @classmethod
    def of(cls, arr: np.ndarray, extent: float, pad_mode: str) -> _Raster:
        n = arr.shape[0]
        pad = n // 4
        padded = np.pad(arr.astype(np.float32, copy=False), pad, mode=pad_mode)
        return cls(Image.fromarray(padded, "F"), n, pad, extent)

    def view(self, view: _View, size: int) -> np.ndarray:
        """The same mapping as :func:`_view_coords`, by PIL's bilinear affine transform (several
        times faster than ``map_coordinates``)."""
        n, pad = self.n, self.pad
        k = n / (2 * self.extent)
        c, s = math.cos(view.angle), math.sin(view.angle)
        f = -1.0 if view.flip else 1.0
        g = 2 / (size * view.scale)
        # PIL maps output pixel centres (x + 0.5, y + 0.5) to continuous input coordinates.
        coeffs = (
            k * g * c * f,
            -k * g * s,
            k * ((s - c * f) / view.scale + view.shift[0]) + n / 2 + pad,
            k * g * s * f,
            k * g * c,
            k * ((-s * f - c) / view.scale + view.shift[1]) + n / 2 + pad,
        )
        out = self.image.transform(
            (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
        )
        return np.asarray(out, dtype=np.float32)


def _resample(base: np.ndarray, coords: np.ndarray, mode: str = "mirror") -> np.ndarray:
    return ndimage.map_coordinates(base, coords, order=1, mode=mode).astype(np.float32)


def _to_u8(a: np.ndarray) -> np.ndarray:
    return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Dermoscopy


_SKIN_TONES = (
    np.array([[238, 206, 186], [226, 184, 158], [208, 160, 128], [182, 132, 98]], dtype=np.float32) / 255
)
_BROWNS = np.array([[181, 128, 86], [138, 86, 55], [96, 58, 40]], dtype=np.float32) / 255
_ATYPICAL = {
    "black": np.array([42, 32, 34], dtype=np.float32) / 255,
    "blue-grey": np.array([104, 116, 142], dtype=np.float32) / 255,
    "red": np.array([196, 96, 102], dtype=np.float32) / 255,
    "white": np.array([226, 214, 214], dtype=np.float32) / 255,
}
_SK_WAX = np.array([200, 170, 118], dtype=np.float32) / 255  # the yellowish tan of a waxy keratotic surface
_SK_SHEEN = np.array([226, 204, 160], dtype=np.float32) / 255  # light on the crests of its gyri
_CYST = np.array([240, 234, 214], dtype=np.float32) / 255  # milia-like cysts
_PLUG = np.array([50, 36, 30], dtype=np.float32) / 255  # comedo-like openings
_DERM_EXTENT = 1.45


def _draw_hairs(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """Hair alpha mask: a few dark Bezier curves, drawn with PIL (vector drawing, no pixel loops)."""
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    t = np.linspace(0, 1, 40)[:, None]
    for _ in range(count):
        p0, p1, p2 = rng.uniform(-0.1, 1.1, (3, 2)) * n
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        width = max(1, round(n / 220 * rng.uniform(0.8, 1.7)))
        draw.line([tuple(p) for p in pts.tolist()], fill=int(rng.uniform(170, 245)), width=width)
    return ndimage.gaussian_filter(np.asarray(canvas, dtype=np.float32) / 255, 0.5)


def _derm_skin(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skin around a lesion: a tone, slow blotches (erythema), a crossing furrow texture and fine
    grain. Returns the n×n×3 skin and its tone."""
    n = x.shape[0]
    w = rng.uniform(0, len(_SKIN_TONES) - 1)
    i = min(int(w), len(_SKIN_TONES) - 2)
    tone = _SKIN_TONES[i] * (1 - (w - i)) + _SKIN_TONES[i + 1] * (w - i)
    skin = np.broadcast_to(tone, (n, n, 3)).copy()
    skin *= 1 + 0.035 * _smooth_noise(rng, n, 4)[..., None]
    red = np.clip(_smooth_noise(rng, n, 3), 0, None) * rng.uniform(0.0, 0.03)
    skin[..., 0] += red
    skin[..., 1:] -= 0.6 * red[..., None]
    warp = _smooth_noise(rng, n, 5) * 0.05
    period = rng.uniform(0.05, 0.09)
    furrows = 0.0
    for phi in rng.uniform(0, np.pi, 2):
        a = (x * math.cos(phi) + y * math.sin(phi) + warp) / period
        furrows = furrows + np.exp(-((np.sin(np.pi * a) / 0.25) ** 2))
    skin *= 1 - rng.uniform(0.02, 0.05) * furrows[..., None]
    skin *= 1 + 0.02 * _smooth_noise(rng, n, n / 3)[..., None]
    return skin, tone


def _spots(rng: np.random.Generator, where: np.ndarray, count: int, sigma: float) -> np.ndarray:
    """``count`` round spots of about ``sigma`` pixels at random pixels where ``where`` holds,
    scaled so an isolated spot peaks near 1."""
    spots = np.zeros(where.shape, np.float32)
    candidates = np.flatnonzero(where)
    if count and candidates.size:
        picked = rng.choice(candidates, size=count)
        np.add.at(spots.ravel(), picked, 1.0)
        spots = ndimage.gaussian_filter(spots, sigma) * (2 * np.pi * sigma**2)
    return np.clip(spots, 0, 1)


def _melanocytic(
    rng: np.random.Generator, malignant: bool, x: np.ndarray, y: np.ndarray, tone: np.ndarray, atypia: float
) -> tuple[np.ndarray, np.ndarray]:
    """A naevus or a melanoma: its mask (soft, 0–1) and its n×n×3 pigment."""
    ext, n = _DERM_EXTENT, x.shape[0]
    px = 2 * ext / n
    # Outline: naevi near-round; melanomas asymmetric (low harmonics) and notched (high ones).
    r0 = rng.uniform(0.22, 0.46) if not malignant else rng.uniform(0.34, 0.66)
    shape = _random_shape(
        rng,
        cx=rng.normal(0, 0.07),
        cy=rng.normal(0, 0.07),
        r0=r0,
        aspect=1 / (1 + abs(rng.normal(0, 0.15))),
        angle=rng.uniform(0, np.pi),
        low_irregularity=0.02 + 0.16 * atypia**1.5,
        high_irregularity=0.005 + 0.06 * atypia**2,
    )
    win, rho, theta, r = _lesion_fields(shape, x, y, 0.1)
    edge_dir = rng.uniform(-np.pi, np.pi)
    edge = px * rng.uniform(0.4, 1.2) + (0.002 + 0.04 * atypia) * (0.5 + 0.5 * np.cos(theta - edge_dir))
    mask = np.zeros((n, n), np.float32)
    mask[win] = expit((r - rho) / edge)
    t = np.full((n, n), 5.0, np.float32)  # normalised radius: 0 at centre, 1 on the border
    t[win] = rho / r
    cells = max(2.0, 2.5 / r0)
    gx, gy = math.cos(edge_dir + 1.0), math.sin(edge_dir + 1.0)
    asym = ((x - shape.cx) * gx + (y - shape.cy) * gy) / r0  # a gradient across the lesion

    # Browns: a naevus is one shade, sometimes darker centrally; a melanoma has darker patches
    # pushed to one side. Shade runs from light (0) to dark (2) brown; melanomas tend darker.
    w = rng.uniform(0, 1.6) if not malignant else rng.uniform(0.5, 2)
    i = min(int(w), 1)
    main = _BROWNS[i] * (1 - (w - i)) + _BROWNS[i + 1] * (w - i)
    darker = main * rng.uniform(0.5, 0.72)
    sharp = 1.5 + 3.0 * atypia
    if not malignant:
        central = rng.uniform(0.3, 0.9) if rng.random() < 0.35 + 0.4 * atypia else 0.0
        w_dark = central * expit((0.55 - t) / 0.15)
        w_dark += atypia * 0.8 * expit(sharp * (_smooth_noise(rng, n, cells) - 0.5))
    else:
        w_dark = expit(sharp * (_smooth_noise(rng, n, cells) + 1.5 * atypia * asym - 0.2))
    w_dark = np.clip(w_dark, 0, 1)[..., None]
    pigment = main * (1 - w_dark) + darker * w_dark
    # Naevi fade towards the skin at the rim; melanomas stop abruptly.
    fade = np.clip(t - 0.7, 0, 1) * rng.uniform(0.3, 1.0) * (1 - atypia)
    pigment += (tone - pigment) * fade[..., None]

    # Pigment network: three plane waves at 120° peak on a triangular lattice, and the troughs
    # between the peaks form a honeycomb of lines. Fine, even and regular in naevi; coarse, thick,
    # distorted and patchy in melanomas.
    period = rng.uniform(0.04, 0.055) * (1 + 0.6 * atypia)
    distortion = 0.02 + 0.05 * atypia
    wx = x + distortion * _smooth_noise(rng, n, 10)
    wy = y + distortion * _smooth_noise(rng, n, 10)
    phi = rng.uniform(0, np.pi)
    waves = sum(
        np.cos(2 * np.pi / period * (wx * math.cos(phi + a) + wy * math.sin(phi + a)))
        for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)
    )
    thickness = 0.5 + 0.8 * atypia * expit(2 * _smooth_noise(rng, n, 6))
    network = expit((-0.7 - waves) / thickness)
    presence = expit(3 * (_smooth_noise(rng, n, 5) + 1.0 - 2.5 * atypia)) * rng.uniform(0.08, 0.25)
    pigment *= (1 - presence * network * expit((0.95 - t) / 0.1))[..., None]

    # Melanoma colours beyond brown, as soft patches: black blotches, blue-grey veil, red, white
    # regression. A few atypical naevi get a faint one too.
    if malignant:
        n_extra = int(np.clip(round(atypia * 3.2 + rng.normal(0, 0.7)), 0, 4))
    else:
        n_extra = int(rng.random() < 0.5 * atypia**2)
    for name in list(rng.permutation(list(_ATYPICAL)))[:n_extra]:
        field = _smooth_noise(rng, n, cells * rng.uniform(0.8, 1.6))
        threshold = rng.uniform(0.2, 1.0) - (0.6 * asym if name in ("black", "blue-grey") else 0)
        strength = rng.uniform(0.45, 0.8) * (1 if malignant else 0.5)
        patch = (expit(6.0 * (field - threshold)) * strength * expit((0.95 - t) / 0.08))[..., None]
        pigment = pigment * (1 - patch) + _ATYPICAL[name] * patch

    # Structureless areas are not flat: a fine mottling, coarser in melanomas.
    pigment *= 1 + (0.04 + 0.06 * atypia) * _smooth_noise(rng, n, n / 6)[..., None]

    # Dots and globules: scattered at the periphery of melanomas, few and central in naevi.
    n_dots = int(rng.poisson(3 + 25 * atypia if malignant else 4 * atypia))
    dots = np.zeros((n, n), np.float32)
    if n_dots:
        ang = rng.uniform(-np.pi, np.pi, n_dots)
        rad = rng.uniform(0.55, 1.1, n_dots) if malignant else rng.uniform(0.0, 0.7, n_dots)
        rr = rad * r0 * (1 + 0.2 * rng.standard_normal(n_dots))
        dxs = shape.cx + rr * np.cos(ang)
        dys = shape.cy + rr * np.sin(ang)
        cols = np.clip(((dxs / ext + 1) * 0.5 * n).astype(int), 0, n - 1)
        rows = np.clip(((dys / ext + 1) * 0.5 * n).astype(int), 0, n - 1)
        np.add.at(dots, (rows, cols), 1.0)
        dots = ndimage.gaussian_filter(dots, max(0.8, n / 250))
        dots = np.clip(dots / (dots.max() + 1e-6) * 1.5, 0, 1)
    dark = np.array([60, 38, 30], np.float32) / 255
    pigment = pigment + (dark - pigment) * (dots * 0.85)[..., None]
    return mask, pigment


def _keratosis(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, tone: np.ndarray, atypia: float
) -> tuple[np.ndarray, np.ndarray]:
    """A seborrhoeic keratosis: its mask and pigment.

    A latent *keratosis* k ~ Beta(5, 2) sets the relief s = clip((k − 0.25) / 0.6, 0.05, 1), which
    drives the keratotic cues together: the cerebriform surface (dark sulci along the zero set of a
    smooth field, between lighter gyri with a waxy sheen), the waxy yellowish tint, milia-like
    cysts (small bright spots, Poisson(0.5 + 16s) + Poisson(4s)) and comedo-like openings (dark
    plugs in the sulci, Poisson(0.5 + 12s)). A flat SK (P(k < 0.5) ≈ 0.11, so s < 0.42) passes for
    a lentigo or a naevus. The border is sharp (stuck on) and there is no pigment network.
    ``atypia`` (the benign Beta(2, 5)) darkens an irritated SK, roughens its border and may add a
    black or blue-grey patch, so a few pass for melanoma.
    """
    ext, n = _DERM_EXTENT, x.shape[0]
    px = 2 * ext / n
    keratosis = float(rng.beta(5, 2))
    relief = float(np.clip((keratosis - 0.25) / 0.6, 0.05, 1.0))  # ≈ 0 for a flat SK, 1 for a warty one
    r0 = rng.uniform(0.28, 0.6)
    shape = _random_shape(
        rng,
        cx=rng.normal(0, 0.07),
        cy=rng.normal(0, 0.07),
        r0=r0,
        aspect=1 / (1 + abs(rng.normal(0, 0.25))),
        angle=rng.uniform(0, np.pi),
        low_irregularity=0.03 + 0.08 * atypia,
        high_irregularity=0.006 + 0.02 * relief + 0.04 * atypia**2,
    )
    win, rho, _theta, r = _lesion_fields(shape, x, y, 0.1)
    mask = np.zeros((n, n), np.float32)
    mask[win] = expit((r - rho) / (px * rng.uniform(0.4, 0.9)))
    t = np.full((n, n), 5.0, np.float32)
    t[win] = rho / r
    inside = expit((0.97 - t) / 0.04)

    # Colour: light to dark brown, drawn towards a waxy yellowish tan the more keratotic it is;
    # irritated SKs run darker.
    w = float(np.clip(rng.uniform(0, 2) + 0.8 * atypia, 0, 2))
    i = min(int(w), 1)
    main = _BROWNS[i] * (1 - (w - i)) + _BROWNS[i + 1] * (w - i)
    wax = rng.uniform(0.1, 0.45) * relief * (1 - 0.35 * w)
    main = main * (1 - wax) + _SK_WAX * wax
    pigment = np.broadcast_to(main, (n, n, 3)).copy()
    # Uneven, blotchy browns (no network): lighter and darker lobules.
    pigment *= (1 + rng.uniform(0.08, 0.2) * _smooth_noise(rng, n, 2.2 * ext / r0))[..., None]

    # Cerebriform surface: gyri (several across the lesion) and the fissures between them.
    gyri = rng.uniform(4.5, 7.5)
    f = _smooth_noise(rng, n, gyri * ext / r0)
    fissure = expit((rng.uniform(0.2, 0.35) - np.abs(f)) / 0.07)
    crest = np.clip(np.abs(f) - 0.6, 0, 1)
    pigment *= (1 - rng.uniform(0.35, 0.55) * relief * fissure * inside)[..., None]
    pigment += (_SK_SHEEN - pigment) * (0.45 * relief * crest * inside)[..., None]
    # Verrucous grain on the gyri.
    pigment *= (1 + 0.08 * relief * _smooth_noise(rng, n, n / 5) * inside)[..., None]

    # Irritated SK: a dark or blue-grey patch.
    if rng.random() < 1.5 * atypia**2:
        name = ("black", "blue-grey")[int(rng.integers(0, 2))]
        field = _smooth_noise(rng, n, 2.0 * ext / r0)
        patch = (expit(6.0 * (field - rng.uniform(0.3, 1.0))) * rng.uniform(0.4, 0.7) * inside)[..., None]
        pigment = pigment * (1 - patch) + _ATYPICAL[name] * patch

    # Milia-like cysts (bright, some in clusters) and comedo-like openings (dark plugs, larger).
    where = t < 0.85
    cysts = _spots(rng, where, int(rng.poisson(0.5 + 16 * relief)), max(0.6, n / 330))
    cysts = np.maximum(cysts, _spots(rng, where, int(rng.poisson(4 * relief)), max(0.9, n / 200)))
    plugs = _spots(rng, where & (fissure > 0.3), int(rng.poisson(0.5 + 12 * relief)), max(0.9, n / 160))
    pigment = pigment + (_PLUG - pigment) * (0.85 * plugs)[..., None]
    pigment = pigment + (_CYST - pigment) * (0.9 * cysts)[..., None]
    return mask, pigment


def _derm_base(rng: np.random.Generator, label: str, size: int) -> Base:
    ext = _DERM_EXTENT
    n = int(round(size * ext))
    x, y = _grid(n, ext)
    atypia = _atypia(rng, label == "melanoma")
    skin, tone = _derm_skin(rng, x, y)
    if label == "seborrhoeic-keratosis":
        mask, pigment = _keratosis(rng, x, y, tone, atypia)
        opacity = rng.uniform(0.92, 1.0)  # a thick keratotic plate hides the skin beneath
    else:
        mask, pigment = _melanocytic(rng, label == "melanoma", x, y, tone, atypia)
        opacity = rng.uniform(0.8, 0.97)
    alpha = (mask * opacity)[..., None]
    img = skin * (1 - alpha) + pigment * alpha

    if rng.random() < 0.55:
        hair = _draw_hairs(rng, n, int(rng.integers(1, 7)))
        hair_col = np.array([40, 30, 26], np.float32) / 255 * rng.uniform(0.6, 1.4)
        img = img + (hair_col - img) * (hair * 0.9)[..., None]

    return {
        "channels": [_Raster.of(np.clip(img[..., ch], 0, 1), ext, "reflect") for ch in range(3)],
        "field": rng.uniform(1.05, 1.6),  # dermatoscope field radius; corners go black below √2
        "vignette": rng.uniform(0.1, 0.35),
        "atypia": atypia,
    }


def _derm_view(base: Base, rng: np.random.Generator, size: int) -> Image.Image:
    ox, oy = _grid(size, 1.0)
    view = _View(
        angle=rng.uniform(0, 2 * np.pi),
        scale=rng.uniform(0.88, 1.12),
        shift=tuple(rng.normal(0, 0.06, 2)),
        flip=bool(rng.random() < 0.5),
    )
    img = np.stack([channel.view(view, size) for channel in base["channels"]], axis=-1)
    if (blur := rng.uniform(0, 0.7)) > 0.2:
        img = ndimage.gaussian_filter(img, (blur, blur, 0))
    img *= rng.uniform(0.88, 1.1) * rng.uniform(0.96, 1.04, 3)
    img = img ** rng.uniform(0.9, 1.1)
    r2 = ox**2 + oy**2
    img *= (1 - base["vignette"] * r2 / 2)[..., None]
    field = base["field"] * rng.uniform(0.98, 1.02)
    img *= expit((field - np.sqrt(r2)) / 0.02)[..., None]
    img += rng.normal(0, rng.uniform(0.005, 0.015), img.shape).astype(np.float32)
    return Image.fromarray(_to_u8(img), "RGB")


# --------------------------------------------------------------------------------------------------
# Chest radiograph

_XRAY_EXTENT = 1.2


def _superellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: Any, ay: Any, p: float, soft: float
) -> np.ndarray:
    d = (np.abs(x - cx) / ax) ** p + (np.abs(y - cy) / ay) ** p
    return expit((1 - d) / soft)


def _band(d: np.ndarray, half: float, soft: float) -> np.ndarray:
    """A bone-like band around d = 0: filled shaft plus a brighter cortex at its edges."""
    inside = expit((half - np.abs(d)) / soft)
    cortex = np.exp(-(((np.abs(d) - half * 0.8) / (half * 0.3)) ** 2))
    return 0.55 * inside + 0.45 * cortex


def _xray_base(rng: np.random.Generator, label: str, size: int) -> Base:
    """A chest radiograph, collimated to the region around the lesion (as a nodule work-up view).

    Anatomy is analytic in chest coordinates (the whole chest spans about [-1, 1]²), so only the
    window the views can see is rasterised: ``zoom`` chest units per view unit, centred near the
    lesion.
    """
    ext = _XRAY_EXTENT
    n = int(round(size * ext))
    malignant = label == "malignant-mass"
    atypia = _atypia(rng, malignant)

    # Patient: body habitus, slight rotation, lung and heart size.
    sx, sy = rng.uniform(0.9, 1.04), rng.uniform(0.92, 1.05)
    tilt = rng.normal(0, 0.03)
    lungs_spec = []
    for side in (-1, 1):
        apex = rng.uniform(-0.82, -0.72)
        base = rng.uniform(0.42, 0.56) + (0.05 if side > 0 else 0.0)
        lungs_spec.append((side, apex, base, rng.uniform(0.8, 0.9), rng.uniform(0.08, 0.16)))
    hx = 0.1 + rng.normal(0, 0.02)
    heart_w = rng.uniform(0.27, 0.36)
    spacing = rng.uniform(0.115, 0.135)
    top = rng.uniform(-0.84, -0.78)
    rib_jitter = rng.normal(0, 0.008, 10)
    rib_half = 0.022 + 0.002 * np.arange(10) + rng.normal(0, 0.002, 10)
    vert_period = rng.uniform(0.11, 0.13)

    # Lesion: inside a lung field, lateral enough to clear the heart and mediastinum.
    side, apex, base, reach, _dome = lungs_spec[int(rng.integers(0, 2))]
    pos_y = rng.uniform(apex + 0.3, base - 0.2)
    st = (pos_y - apex) / (base - apex)
    inner = 0.42 if (side > 0 and pos_y > -0.1) else 0.22
    pos_x = side * rng.uniform(inner, max(inner + 0.05, 0.32 + (reach - 0.32) * st**0.45 - 0.12))
    # Window: zoomed so the lesion is a few percent to a fifth of the field, centred off the lesion.
    zoom = rng.uniform(1.7, 2.3)
    fx = pos_x + rng.uniform(-0.3, 0.3) / zoom - 0.15 * side / zoom
    fy = pos_y + rng.uniform(-0.3, 0.3) / zoom

    gx, gy = _grid(n, ext)
    gx = fx + gx / zoom  # chest coordinates (before the patient's own rotation and habitus)
    gy = fy + gy / zoom
    px = 2 * ext / n / zoom
    c, s = math.cos(tilt), math.sin(tilt)
    x = (c * gx - s * gy) / sx
    y = (s * gx + c * gy) / sy

    def noise(cells_across_chest: float) -> np.ndarray:
        return _smooth_noise(rng, n, cells_across_chest * ext / zoom)

    soft = 0.02
    body = _superellipse(x, y, 0.0, 0.3, 1.02, 1.32, 3.5, 0.03)
    neck = expit((0.3 - np.abs(x)) / 0.03) * expit((-0.6 - y) / 0.05)
    soft_tissue = np.maximum(body, neck)
    dens = 0.5 * soft_tissue
    # Lateral soft tissue (arms, breasts) is thicker towards the edges and the bottom.
    dens += 0.08 * soft_tissue * np.clip(np.abs(x) - 0.75, 0, None) * 4
    dens += 0.04 * soft_tissue * expit((y - 0.35) / 0.1) * np.clip(np.abs(x) - 0.3, 0, None)

    # Lungs: narrow rounded apex, widening to a sharp costophrenic angle, domed diaphragm.
    lungs = np.zeros_like(x)
    for side_, apex_, base_, reach_, dome_ in lungs_spec:
        xs = side_ * x  # lateral is positive on both sides
        st = np.clip((y - apex_) / (base_ - apex_), 0, 1)
        lateral = 0.32 + (reach_ - 0.32) * st**0.45
        medial = 0.3 - 0.2 * st**0.35
        dome = base_ - dome_ * (1 - ((xs - 0.45) / 0.45) ** 2)
        lung = (
            expit((xs - medial) / soft)
            * expit((lateral - xs) / soft)
            * expit((dome - y) / soft)
            * expit((y - apex_) / (2 * soft))
        )
        lungs = np.maximum(lungs, lung)
    heart = _superellipse(x, y, hx, 0.3, heart_w, 0.3, 2.2, 0.04)
    # The heart sits on the diaphragm: below its widest point it hides the lung bases entirely.
    heart = np.maximum(heart, expit((y - 0.3) / 0.04) * expit((heart_w - np.abs(x - hx)) / 0.04))
    mediastinum = expit((0.12 - np.abs(x - 0.02)) / 0.02) * expit((0.5 - y) / 0.05)
    central = np.maximum(heart, mediastinum)
    # Air thickness: thin at the lung edges, full in the middle, hidden behind the heart.
    thickness = ndimage.gaussian_filter(lungs, 0.06 / px, mode="nearest") * lungs
    air = np.clip(thickness, 0, 1) ** 0.6 * (1 - central)
    dens -= rng.uniform(0.28, 0.34) * air

    # Vessels: ridged noise (thin bright lines), denser and thicker towards the hila.
    ridged = (1 - np.clip(np.abs(noise(12)), 0, 1)) ** 6
    hila = np.exp(-(((np.abs(x) - 0.2) / 0.22) ** 2 + ((y + 0.02) / 0.3) ** 2))
    dens += lungs * (1 - central) * (0.04 * ridged * (0.35 + 0.9 * hila) + 0.07 * hila)

    trachea = expit((0.03 - np.abs(x - 0.01)) / 0.01) * expit((-0.25 - y) / 0.05)
    dens -= 0.08 * trachea
    spine = expit((0.07 - np.abs(x)) / 0.01)
    vertebrae = 0.7 + 0.3 * np.cos(2 * np.pi * y / vert_period) ** 2
    dens += 0.07 * spine * vertebrae * soft_tissue

    # Ribs: posterior arcs falling laterally, fainter anterior ones running down medially, clavicles.
    # Each family is a set of equally spaced copies of one curve, so the nearest copy is found by
    # rounding and the whole family is drawn in one pass over the pixels.
    xs = np.abs(x)
    on_side = expit((xs - 0.07) / 0.02) * expit((0.95 - xs) / 0.04)
    d = y - (top - 0.05 * xs + 0.55 * xs**2)
    i = np.clip(np.round(d / spacing), 0, 9).astype(np.intp)
    ribs = _band(d - i * spacing - rib_jitter[i], rib_half[i], 1.5 * px) * on_side
    d = y - (top + 0.5 + 0.45 * (0.92 - xs))
    i = np.clip(np.round(d / spacing), 0, 9)
    ribs += 0.3 * _band(d - i * spacing, 0.03, px) * on_side * expit((xs - 0.3) / 0.05)
    clav = -0.7 - 0.22 * (xs - 0.08) + 0.22 * (xs - 0.08) ** 2
    ribs += 1.4 * _band(y - clav, 0.03, px) * expit((xs - 0.06) / 0.02) * expit((0.75 - xs) / 0.03)
    # Bone shows best against air: ribs fade over the heart and the abdomen.
    dens += rng.uniform(0.05, 0.08) * ribs * soft_tissue * (0.35 + 0.65 * np.clip(air * 1.5, 0, 1))
    dens += 0.015 * soft_tissue * noise(10)  # uneven soft-tissue thickness

    # The lesion itself, drawn in the (unrotated) chest frame of gx, gy.
    lx, ly = pos_x * sx, pos_y * sy
    r0 = rng.uniform(0.065, 0.14) if malignant else rng.uniform(0.025, 0.065)
    shape = _random_shape(
        rng,
        cx=c * lx + s * ly,
        cy=-s * lx + c * ly,
        r0=r0,
        aspect=1 / (1 + abs(rng.normal(0, 0.08 + 0.15 * atypia))),
        angle=rng.uniform(0, np.pi),
        low_irregularity=0.02 + 0.12 * atypia,
        high_irregularity=0.01 + 0.1 * atypia**1.5,
        n_spikes=int(rng.poisson(18 * atypia**2)),
        spike_length=0.2 + 0.6 * atypia,
        spike_width=0.04 + 0.03 * rng.random(),
    )
    win, rho, _theta, r = _lesion_fields(shape, gx, gy, 4 * px)
    tt = rho / r
    edge = px * (0.6 + 2.5 * atypia * rng.random())
    solid = expit((r - rho) / edge)
    sphere = np.sqrt(np.clip(1 - tt**2, 0, 1))  # projected thickness of a ball
    profile = 0.45 * solid + 0.55 * sphere
    contrast = rng.uniform(0.1, 0.2) * (1 + 0.6 * r0 / 0.1)
    lesion = np.zeros_like(x)
    lesion[win] = profile * contrast
    if malignant or atypia > 0.4:
        lesion *= 1 + 0.25 * atypia * _smooth_noise(rng, n, 2.0 / r0 * ext / zoom)
    if not malignant and rng.random() < 0.4 * (1 - atypia):
        # Benign calcification: a dense central or laminated core.
        core = np.zeros_like(x)
        core[win] = expit((0.45 - tt) / 0.05)
        lesion += core * rng.uniform(0.1, 0.25)
    dens += lesion

    return {
        "density": _Raster.of(ndimage.gaussian_filter(dens.astype(np.float32), 0.5 * n / 256), ext, "edge"),
        "level": rng.uniform(0.08, 0.14),
        "width": rng.uniform(0.5, 0.65),
        "atypia": atypia,
    }


def _xray_view(base: Base, rng: np.random.Generator, size: int) -> Image.Image:
    view = _View(
        angle=rng.normal(0, 0.05),
        scale=rng.uniform(0.94, 1.08),
        shift=tuple(rng.normal(0, 0.03, 2)),
    )
    d = base["density"].view(view, size)
    level = base["level"] + rng.normal(0, 0.015)
    width = base["width"] * rng.uniform(0.92, 1.08)
    img = np.clip((d - level) / width, 0, 1) ** rng.uniform(0.85, 1.15)
    # Quantum mottle: dense (bright) regions received fewer photons, so they are noisier.
    sigma = rng.uniform(0.01, 0.025)
    grain = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 0.6) * 1.8
    img = img + sigma * grain * (0.3 + img)
    return Image.fromarray(_to_u8(img), "L")


# --------------------------------------------------------------------------------------------------
# Breast ultrasound (curvilinear probe)

_US_EXTENT = 1.35
_US_APEX_Y = -1.6
_US_R0, _US_R1 = 0.66, 2.56
_US_HALF_ANGLE = 0.52


def _us_base(rng: np.random.Generator, label: str, size: int) -> Base:
    ext = _US_EXTENT
    n = int(round(size * ext))
    x, y = _grid(n, ext)
    px = 2 * ext / n
    malignant = label == "malignant"
    atypia = _atypia(rng, malignant) if label != "normal" else 0.0

    def boundary(depth: float, wobble: float, cells: float) -> np.ndarray:
        return depth + wobble * _smooth_noise_1d(rng, n, cells)[None, :]

    skin = boundary(-0.88, 0.01, 3)
    fat_end = boundary(rng.uniform(-0.7, -0.45), 0.06, 4)
    gland_end = boundary(rng.uniform(0.25, 0.4), 0.07, 4)
    muscle_start = gland_end + rng.uniform(0.05, 0.12)
    muscle_end = muscle_start + rng.uniform(0.22, 0.3)

    def below(b: np.ndarray) -> np.ndarray:
        return expit((y - b) / 0.012)

    echo = np.full((n, n), 0.03, np.float32)
    skin_line = np.exp(-(((y - skin) / 0.012) ** 2))
    fat = below(skin) * (1 - below(fat_end))
    gland = below(fat_end) * (1 - below(gland_end))
    retro = below(gland_end) * (1 - below(muscle_start))
    muscle = below(muscle_start) * (1 - below(muscle_end))
    deep = below(muscle_end)
    # Cooper's ligaments: thin bright curves, the zero set of a smooth field tilted with depth,
    # bounding the fat lobules; they also run up into the gland.
    ligaments = (1 - np.clip(np.abs(_smooth_noise(rng, n, 7) + 0.3 * y), 0, 1)) ** 10
    texture = np.clip(1 + 0.35 * _smooth_noise(rng, n, 10), 0.2, None)
    striation = 0.6 + 0.4 * np.cos(2 * np.pi * (y + 0.15 * x + 0.02 * _smooth_noise(rng, n, 5)) / 0.045) ** 8
    echo += (
        0.9 * skin_line
        + fat * (0.07 + 0.6 * ligaments)
        + gland * rng.uniform(0.45, 0.8) * texture
        + retro * 0.08
        + muscle * 0.25 * striation
        + deep * 0.06
    )
    # Fat lobules interleave with the gland: hypoechoic islands among its bright tissue.
    lobules = gland * expit((_smooth_noise_2d(rng, n, 9, 16) - rng.uniform(1.2, 1.9)) / 0.1)
    echo = echo * (1 - lobules) + lobules * (0.2 + 0.4 * ligaments)
    echo = np.clip(echo, 0, 1)

    if label == "normal":
        # No mass. In about one breast in seven a fat lobule is large and oval enough to pass for
        # a small benign mass, as fat lobules do on real scans.
        att = np.zeros((n, n), np.float32)
        if rng.random() < 0.15:
            shape = _random_shape(
                rng,
                cx=rng.uniform(-0.3, 0.3),
                cy=rng.uniform(-0.3, 0.0),
                r0=rng.uniform(0.1, 0.2),
                aspect=rng.uniform(0.4, 0.7),
                angle=rng.normal(0, 0.15),
                low_irregularity=0.05,
                high_irregularity=0.02,
            )
            win, rho, _theta, r = _lesion_fields(shape, x, y, 0.1)
            lobule = np.zeros((n, n), np.float32)
            lobule[win] = expit((r - rho) / (px * rng.uniform(2.0, 4.0)))
            echo = echo * (1 - lobule) + lobule * rng.uniform(0.06, 0.12)
        return {"echo": echo.astype(np.float32), "attenuation": att, "gain": rng.uniform(-16, -10),
                "atypia": atypia}

    # A mass in the glandular layer: benign (fibroadenoma) oval and parallel; malignant taller
    # than wide.
    if malignant:
        width = rng.uniform(0.13, 0.26)
        aspect = 0.95 + 0.6 * atypia + rng.normal(0, 0.12)
        angle = rng.normal(0, 0.3)
    else:
        width = rng.uniform(0.14, 0.3)
        aspect = 0.45 + 0.45 * atypia + rng.normal(0, 0.08)
        angle = rng.normal(0, 0.15)
    aspect = float(np.clip(aspect, 0.35, 1.8))
    shape = _random_shape(
        rng,
        cx=rng.uniform(-0.3, 0.3),
        cy=rng.uniform(-0.3, 0.0),
        r0=width,
        aspect=aspect,
        angle=angle,
        low_irregularity=0.02 + 0.08 * atypia,
        high_irregularity=0.005 + 0.12 * atypia**1.5,
        n_spikes=int(rng.poisson(12 * atypia**2)) if malignant else 0,
        spike_length=0.15 + 0.35 * atypia,
        spike_width=0.12,
    )
    win, rho, _theta, r = _lesion_fields(shape, x, y, 0.25)
    tt = rho / r
    mask = np.zeros((n, n), np.float32)
    mask[win] = expit((r - rho) / (px * (0.8 + 3 * atypia * rng.random())))
    inner = rng.uniform(0.008, 0.04) if malignant else rng.uniform(0.015, 0.07)
    inner_tex = np.clip(1 + (0.15 + 0.5 * atypia) * _smooth_noise(rng, n, 2.5 / width), 0.1, None)
    echo = echo * (1 - mask) + mask * inner * inner_tex
    ring = np.zeros((n, n), np.float32)
    if malignant:
        # Echogenic halo: a thick, ill-defined bright rim outside the margin.
        ring[win] = np.exp(-(((tt - 1.2) / 0.18) ** 2)) * (0.5 * atypia + 0.1 * rng.random())
    else:
        ring[win] = np.exp(-(((tt - 1.02) / 0.05) ** 2)) * rng.uniform(0.0, 0.4)
    echo = np.clip(echo + ring, 0, 1.2)

    # Attenuation per unit depth inside the lesion: > 0 shadows, < 0 enhances what lies below.
    if malignant:
        att = (rng.uniform(2.0, 7.0) * atypia) if rng.random() < 0.25 + 0.7 * atypia else 0.0
    else:
        att = -rng.uniform(0.5, 2.5) if rng.random() < 0.7 else rng.uniform(0.0, 2.0) * atypia
    return {
        "echo": echo.astype(np.float32),
        "attenuation": (mask * att).astype(np.float32),
        "gain": rng.uniform(-16, -10),
        "atypia": atypia,
    }


@functools.lru_cache(maxsize=8)
def _us_geometry(size: int) -> tuple[np.ndarray, ...]:
    """Beam geometry for a size×size image: the polar sample grid (rows = depth, columns = beam
    angle) in image coordinates, and each output pixel's (depth, angle) position in that grid."""
    theta = np.linspace(-_US_HALF_ANGLE, _US_HALF_ANGLE, size, dtype=np.float32)
    radius = np.linspace(_US_R0, _US_R1, size, dtype=np.float32)
    th, rr = np.meshgrid(theta, radius)
    px_x = rr * np.sin(th)
    px_y = _US_APEX_Y + rr * np.cos(th)
    ox, oy = _grid(size, 1.0)
    dy = oy - _US_APEX_Y
    pr = np.hypot(ox, dy)
    pt = np.arctan2(ox, dy)
    rows = (pr - _US_R0) / (_US_R1 - _US_R0) * (size - 1)
    cols = (pt + _US_HALF_ANGLE) / (2 * _US_HALF_ANGLE) * (size - 1)
    inside = (pr >= _US_R0) & (pr <= _US_R1) & (np.abs(pt) <= _US_HALF_ANGLE)
    for a in (rr, px_x, px_y, rows, cols, inside):
        a.flags.writeable = False  # shared between calls through the cache
    return rr, px_x, px_y, np.stack([rows, cols]), inside


def _us_view(base: Base, rng: np.random.Generator, size: int) -> Image.Image:
    n = base["echo"].shape[0]
    n_theta, n_r = size, size
    rr, px_x, px_y, scan_coords, inside = _us_geometry(size)
    view = _View(
        angle=rng.normal(0, 0.08),
        scale=rng.uniform(0.92, 1.1),
        shift=(float(rng.normal(0, 0.08)), float(rng.normal(0, 0.04))),
    )
    coords = _view_coords(px_x, px_y, view, _US_EXTENT, n)
    echo = _resample(base["echo"], coords, mode="nearest")
    att = _resample(base["attenuation"], coords, mode="constant")
    dr = (_US_R1 - _US_R0) / (n_r - 1)
    # Shadowing/enhancement: what lies behind a lesion along the beam sees its cumulative loss.
    behind = np.exp(-np.cumsum(att, axis=0) * dr / view.scale)
    depth_gain = np.exp(-0.25 * (rr - _US_R0)) * (1 + 0.1 * np.sin(rr * 3 + rng.uniform(0, 6)))
    # Speckle: complex Gaussian scatterers blurred by a PSF longer laterally than axially.
    sig = (0.7 * n_r / 224, 1.6 * n_theta / 224)
    re = ndimage.gaussian_filter(rng.standard_normal((n_r, n_theta)).astype(np.float32), sig)
    im = ndimage.gaussian_filter(rng.standard_normal((n_r, n_theta)).astype(np.float32), sig)
    env = np.hypot(re, im)
    env /= np.sqrt((env**2).mean())
    amp = np.sqrt(np.clip(echo, 1e-4, None)) * behind * depth_gain * env
    db = 20 * np.log10(amp + 1e-4) + base["gain"] + rng.normal(0, 1)
    dyn = rng.uniform(40, 50)
    polar = np.clip((db + dyn - 3) / dyn, 0, 1) ** 1.3
    # Scan conversion: each output pixel looks up its (depth, angle) in the polar image.
    img = ndimage.map_coordinates(polar, scan_coords, order=1, mode="constant", cval=0.0)
    img = np.where(inside, img, 0.0)
    return Image.fromarray(_to_u8(img), "L")


# --------------------------------------------------------------------------------------------------
# Dataset


_RENDERERS: dict[str, tuple[Callable[..., Base], Callable[..., Image.Image]]] = {
    "dermoscopy": (_derm_base, _derm_view),
    "xray": (_xray_base, _xray_view),
    "ultrasound": (_us_base, _us_view),
}


def _check_args(
    seed: int, lesions_per_class: int, views_per_lesion: int, size: int, test_fraction: float
) -> None:
    for name, value, low in (
        ("seed", seed, 0),
        ("lesions_per_class", lesions_per_class, 1),
        ("views_per_lesion", views_per_lesion, 1),
        ("size", size, 32),
    ):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
            raise VlmindexError(f"{name}={value!r} is not valid: give an integer >= {low}.")
    if not 0.0 <= test_fraction < 1.0:
        raise VlmindexError(f"test_fraction={test_fraction!r} is not valid: give a number in [0, 1).")


def _select_modalities(modalities: Sequence[str] | None) -> list[str]:
    if modalities is None:
        return list(MODALITIES)
    if isinstance(modalities, str):
        modalities = [modalities]
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise VlmindexError(f"Unknown modality {unknown[0]!r}: choose from {', '.join(MODALITIES)}.")
    if not modalities:
        raise VlmindexError(f"No modality selected: choose from {', '.join(MODALITIES)}.")
    # Canonical order, so the manifest does not depend on how the caller listed them.
    return [m for m in MODALITIES if m in set(modalities)]


def _test_lesions(seed: int, modality: str, label: str, n: int, test_fraction: float) -> set[int]:
    """Lesions of one class held out for test: round(f·n) of them, at least one and at most n − 1."""
    if test_fraction <= 0 or n < 2:
        return set()
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    order = _rng(seed, modality, label, _SPLIT_KEY).permutation(n)
    return {int(i) for i in order[:n_test]}


def generate(
    out_dir: Path,
    *,
    seed: int = 0,
    lesions_per_class: int = DEFAULT_LESIONS_PER_CLASS,
    views_per_lesion: int = DEFAULT_VIEWS_PER_LESION,
    size: int = DEFAULT_SIZE,
    modalities: Sequence[str] | None = None,
    test_fraction: float = 0.25,
    progress: bool = False,
) -> list[SynthImage]:
    """Write the synthetic dataset as PNGs under ``out_dir`` and return its manifest.

    Files go to ``out_dir/<modality>/<label>/<group_id>_v<k>.png``; ``group_id`` is
    ``<modality>-<label>-<lesion:03d>``. The defaults (8 classes over 3 modalities × 15 lesions ×
    3 views = 360 images of 224×224, about 18 MB) take about 9 s of CPU on one core, a quarter of
    it PNG encoding. Dermoscopy images are RGB; radiographs and ultrasound are 8-bit greyscale
    PNGs. Files already under ``out_dir`` that the manifest does not name are left alone.

    The manifest is ordered by modality (as in :data:`MODALITIES`), class, lesion and view.
    Within each class, ``round(test_fraction · lesions_per_class)`` lesions (at least one when
    there are two or more lesions and ``test_fraction > 0``) and all their views are ``test``.

    Example::

        manifest = generate(Path("synth"), seed=0, lesions_per_class=5, size=128)
    """
    _check_args(seed, lesions_per_class, views_per_lesion, size, test_fraction)
    chosen = _select_modalities(modalities)
    out_dir = Path(out_dir)
    jobs = [
        (modality, label, lesion)
        for modality in chosen
        for label in MODALITIES[modality]
        for lesion in range(lesions_per_class)
    ]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs) * views_per_lesion, unit="img", desc="synth")
    manifest: list[SynthImage] = []
    test_sets = {
        (m, label): _test_lesions(seed, m, label, lesions_per_class, test_fraction)
        for m in chosen
        for label in MODALITIES[m]
    }
    try:
        for modality, label, lesion in jobs:
            make_base, make_view = _RENDERERS[modality]
            base = make_base(_rng(seed, modality, label, lesion, 0), label, size)
            group = f"{modality}-{label}-{lesion:03d}"
            split = "test" if lesion in test_sets[(modality, label)] else "train"
            for k in range(views_per_lesion):
                img = make_view(base, _rng(seed, modality, label, lesion, k + 1), size)
                relpath = f"{modality}/{label}/{group}_v{k}.png"
                save_png(img, out_dir / relpath)
                manifest.append(SynthImage(relpath, label, split, group, modality))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return manifest


def contact_sheet_for(
    manifest: Sequence[SynthImage], out_dir: Path, *, per_class: int = 6, tile_size: int = 160
) -> Image.Image:
    """One row per (modality, class), every class of the manifest shown: first views of distinct
    lesions, captioned with the class name (unique across modalities; the modality shows).

    Rows follow :data:`MODALITIES` (modality, then its classes in order), whatever order the
    manifest is in; classes it does not know come after, in the order first seen. If a class has
    fewer lesions than ``per_class``, further views fill the row.
    """
    if per_class < 1:
        raise VlmindexError(f"per_class={per_class!r} is not valid: give an integer >= 1.")
    rows: dict[tuple[str, str], list[SynthImage]] = {}
    for item in manifest:
        rows.setdefault((item.modality, item.label), []).append(item)
    canonical = [(m, label) for m, labels in MODALITIES.items() for label in labels]
    order = {key: i for i, key in enumerate(canonical)}
    tiles: list[tuple[Image.Image, str]] = []
    for key in sorted(rows, key=lambda k: order.get(k, len(order))):  # stable: unknown keys keep their order
        items = rows[key]
        first_of_group: dict[str, SynthImage] = {}
        for item in items:
            first_of_group.setdefault(item.group_id, item)
        picked = list(first_of_group.values())[:per_class]
        picked += [i for i in items if i not in picked][: per_class - len(picked)]
        tiles += [(load_image(Path(out_dir) / i.relpath), key[1]) for i in picked]
    return contact_sheet(tiles, columns=max(1, per_class), tile_size=tile_size)
