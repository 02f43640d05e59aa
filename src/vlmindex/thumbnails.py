"""Small PNG views of catalog images, clean or with a condition's overlay burned in.

One renderer for the report (``data:`` URIs), the explorer table (PNG bytes) and the service
(``/api/images/{image_id}/thumbnail``): a thumbnail shows exactly the pixels a model embedded,
overlay included, shrunk to fit a square.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vlmindex.imageio import load_image, load_verified

THUMBNAIL_PX = 64
MIN_PX, MAX_PX = 16, 512


@dataclass(frozen=True)
class ImageRef:
    """What rendering one catalog image needs: where it is, the bytes it must be, what an overlay writes."""

    image_id: int
    path: str
    sha256: str | None
    label: str | None
    modality: str | None


def shrink(img: Image.Image, size: int) -> bytes:
    """``img`` shrunk (never enlarged) to fit ``size`` × ``size``, as PNG bytes."""
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def render(ref: ImageRef, *, size: int = THUMBNAIL_PX, recipe=None,
           class_names: Sequence[str] = ()) -> bytes:
    """The PNG thumbnail of one catalog image, with ``recipe``'s overlay when one is given.

    The file is checked against the catalog's sha256 (when recorded): a thumbnail never shows
    pixels other than those ingested. Raises on a missing, changed or undecodable file.
    """
    img = load_verified(ref.path, ref.sha256) if ref.sha256 else load_image(ref.path)
    if recipe is not None:
        from vlmindex.overlay import apply_overlay

        img = apply_overlay(img, recipe, image_id=ref.image_id, label=ref.label, class_names=tuple(class_names))
    return shrink(img, size)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def file_uri(path: str | os.PathLike[str], size: int = THUMBNAIL_PX) -> str | None:
    """A PNG ``data:`` URI of the image file at ``path``; None when it cannot be read (a report
    shows a gap rather than failing)."""
    try:
        return data_uri(shrink(load_image(path), size))
    except Exception:  # noqa: BLE001 - any unreadable file is a gap in a picture, not an error
        return None
