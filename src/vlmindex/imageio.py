"""Reading images the same way everywhere: ingest checks, embedding, queries, overlays, previews."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A truncated file must fail loudly at ingest, never load as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and float greyscale is rescaled by its own min..max (a radiograph's useful range is
    rarely the full 0..65535); alpha is composited on black, as a viewer shows an RGBA scan;
    palette and CMYK go through PIL's conversions.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(path: str | os.PathLike[str] | io.BytesIO) -> Image.Image:
    """Open, fully decode and convert an image file to RGB. Raises on corrupt or truncated files."""
    with Image.open(path) as img:
        img.load()
        # camera JPEGs (some ISIC images) store rotation in EXIF: embed what a viewer shows
        return to_rgb(ImageOps.exif_transpose(img))


class ChangedOnDisk(Exception):
    """The file's content is not the one the catalog recorded at ingest."""


def load_verified(path: str | os.PathLike[str], sha256: str) -> Image.Image:
    """:func:`load_image` of exactly the bytes the catalog knows: the file is read once, hashed,
    and decoded from those bytes, so the pixels embedded are the pixels fingerprinted."""
    with open(path, "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ChangedOnDisk(f"{path} changed since it was ingested; re-ingest the dataset with --replace")
    return load_image(io.BytesIO(data))


def pixels_sha256(rgb: Image.Image) -> str:
    """sha256 of decoded pixels: the shape ``HxWxC`` and then the uint8 array, row-major.

    Give it what :func:`load_image` returns (EXIF rotation applied, 8-bit RGB): two files with
    these equal show the same picture, whatever their container, compression or metadata.
    """
    arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    h = hashlib.sha256("x".join(map(str, arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG atomically with no timestamp chunks, so the same pixels give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG", optimize=False)
    os.replace(tmp, path)
