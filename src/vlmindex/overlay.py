"""Overlay-text conditions: a named, deterministic recipe that burns a string into every image.

A condition is stored as a JSON recipe in the catalog's ``conditions`` table and applied while
images load (inside DataLoader workers), so no copy of a dataset is ever written. Everything that
varies per image (the wrong label chosen, the random word, the ID string, a random position) is a
pure function of ``(recipe.seed, image_id)``: the same recipe gives the same pixels in any process.

Text sources:

- ``label``: the image's true class name;
- ``wrong-label``: another class's name (never the true one), chosen per image;
- ``random-label``: a class name of the image's modality drawn uniformly per image, the true one
  included, so the written text is independent of the truth (the control for ``wrong-label``);
- ``random-word``: a word from a fixed vocabulary of neutral, non-medical words;
- ``fixed:TEXT``: the string ``TEXT`` on every image;
- ``id``: an accession-number-like string such as ``KX48213907``.

Rendering: Pillow's bundled scalable font (``ImageFont.load_default(size=...)``, no download),
font size ``size × image height`` pixels, shrunk only when the string would not fit the image
width; a thin outline in the contrasting colour (or an opaque ``box``) keeps it legible on bright
and dark backgrounds alike, for models and OCR.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageColor, ImageDraw, ImageFont

from vlmindex.catalog import conditions
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog.keys import CLEAN
from vlmindex.catalog.workspace import write_wait
from vlmindex.errors import VlmindexError
from vlmindex.imageio import to_rgb

if TYPE_CHECKING:
    import duckdb

    from vlmindex.catalog import Workspace

TEXT_SOURCES = ("label", "wrong-label", "random-label", "random-word", "fixed:TEXT", "id")
#: Sources that write a class name: the only ones a kNN vote or a zero-shot prediction can follow.
CLASS_NAME_SOURCES = ("label", "wrong-label", "random-label")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center", "random")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Neutral words with no medical meaning, so a "random word" carries no class signal. Changing this
# list changes the pixels of every random-word condition: append only.
VOCABULARY = (
    "apple", "river", "garden", "window", "pencil", "candle", "marble", "rocket",
    "violin", "ladder", "basket", "harbor", "meadow", "copper", "lantern", "orbit",
    "pepper", "saddle", "timber", "velvet", "walnut", "falcon", "island", "jacket",
    "kettle", "lemon", "mirror", "needle", "ocean", "parrot", "quartz", "ribbon",
    "silver", "tunnel", "umbrella", "valley", "wagon", "yellow", "zebra", "anchor",
    "bridge", "castle", "dragon", "engine", "forest", "guitar", "hammer", "igloo",
)
# Letters an accession number might use; I and O are left out as most hospital systems do.
_ID_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


@dataclass(frozen=True)
class OverlayRecipe:
    """How to burn text into an image. Frozen and picklable: it travels to DataLoader workers."""

    text: str  # one of TEXT_SOURCES
    position: str = "bottom-right"  # top-left, top-right, bottom-left, bottom-right, center, random
    size: float = 0.12  # font size (em height) as a fraction of image height
    color: str = "white"  # any PIL colour name or #rrggbb
    opacity: float = 1.0
    seed: int = 0
    box: bool = False  # draw an opaque contrasting box behind the text instead of an outline only

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str | bytes | dict[str, Any]) -> OverlayRecipe:
        """Parse a stored recipe; unknown keys or bad values raise VlmindexError."""
        try:
            data = s if isinstance(s, dict) else json.loads(s)
        except (TypeError, ValueError) as exc:
            raise VlmindexError(f"overlay recipe is not valid JSON ({exc}): {s!r}") from None
        if not isinstance(data, dict):
            raise VlmindexError(f"overlay recipe must be a JSON object, got {s!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VlmindexError(
                f"overlay recipe has unknown keys {unknown}; known keys are {sorted(known)}"
            )
        if "text" not in data:
            raise VlmindexError(f"overlay recipe has no 'text' key: {s!r}")
        recipe = cls(**data)
        recipe.validate()
        return recipe

    def validate(self) -> OverlayRecipe:
        """Check every field; raise VlmindexError naming the bad value. Returns self for chaining."""
        if not isinstance(self.text, str) or not (
            self.text in ("label", "wrong-label", "random-label", "random-word", "id")
            or (self.text.startswith("fixed:") and self.text[len("fixed:") :].strip())
        ):
            raise VlmindexError(
                f"unknown overlay text source {self.text!r}; use one of "
                "label, wrong-label, random-label, random-word, id, fixed:TEXT (e.g. fixed:L)"
            )
        if self.position not in POSITIONS:
            raise VlmindexError(
                f"unknown overlay position {self.position!r}; use one of {', '.join(POSITIONS)}"
            )
        if isinstance(self.size, bool) or not isinstance(self.size, (int, float)) or not (
            0.01 <= self.size <= 1.0
        ):
            raise VlmindexError(
                f"overlay size {self.size!r} must be a fraction of image height in [0.01, 1] "
                "(0.12 is a typical burned-in label)"
            )
        try:
            ImageColor.getrgb(self.color)
        except (ValueError, AttributeError, TypeError):
            raise VlmindexError(
                f"unknown overlay colour {self.color!r}; use a colour name (white, yellow) or #rrggbb"
            ) from None
        if isinstance(self.opacity, bool) or not isinstance(self.opacity, (int, float)) or not (
            0.0 < self.opacity <= 1.0
        ):
            raise VlmindexError(f"overlay opacity {self.opacity!r} must be in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise VlmindexError(f"overlay seed {self.seed!r} must be an integer")
        if not isinstance(self.box, bool):
            raise VlmindexError(f"overlay box {self.box!r} must be true or false")
        return self

    @property
    def needs_labels(self) -> bool:
        return self.text in CLASS_NAME_SOURCES


def _rng(seed: int, image_id: int, purpose: str) -> random.Random:
    # random.Random(int) is stable across processes and Python versions, unlike hash(); the
    # purpose keeps the text choice and the position choice independent of each other.
    digest = hashlib.blake2b(f"{seed}:{image_id}:{purpose}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def overlay_text_for(
    recipe: OverlayRecipe, *, image_id: int, label: str | None, class_names: Sequence[str]
) -> str:
    """The string this recipe writes on image ``image_id``; a pure function of (seed, image_id).

    ``class_names`` is the pool ``wrong-label`` draws from: the classes of the image's modality.
    """
    src = recipe.text
    if src.startswith("fixed:"):
        return src[len("fixed:") :]
    if src == "label":
        if label is None:
            raise VlmindexError(
                f"image {image_id} has no label, so overlay text 'label' cannot be drawn; "
                "use another --text source for unlabelled datasets"
            )
        return str(label)
    rng = _rng(recipe.seed, image_id, "text")
    if src == "wrong-label":
        if label is None:
            raise VlmindexError(
                f"image {image_id} has no label, so overlay text 'wrong-label' cannot be drawn; "
                "use another --text source for unlabelled datasets"
            )
        others = sorted({str(c) for c in class_names} - {str(label)})
        if not others:
            raise VlmindexError(
                f"overlay text 'wrong-label' needs at least two classes; image {image_id} has "
                f"label {label!r} and the classes are {list(class_names)}"
            )
        return rng.choice(others)
    if src == "random-label":
        pool = sorted({str(c) for c in class_names})
        if not pool:
            raise VlmindexError(
                f"overlay text 'random-label' needs the class names of image {image_id}'s modality; it has none"
            )
        return rng.choice(pool)
    if src == "random-word":
        return rng.choice(VOCABULARY)
    if src == "id":
        letters = "".join(rng.choice(_ID_LETTERS) for _ in range(2))
        return f"{letters}{rng.randrange(10**8):08d}"
    raise VlmindexError(f"unknown overlay text source {src!r}")  # validate() normally catches it


@functools.lru_cache(maxsize=128)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


@functools.lru_cache(maxsize=64)
def _colours(color: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    rgb = ImageColor.getrgb(color)[:3]
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    contrast = (0, 0, 0) if luminance >= 128 else (255, 255, 255)
    return rgb, contrast


def _fit_font(text: str, px: int, max_width: int) -> tuple[Any, int, tuple[int, int, int, int]]:
    """The largest font <= ``px`` whose rendering of ``text`` (with outline) fits ``max_width``."""
    while True:
        stroke = max(1, round(px / 14))
        font = _font(px)
        bbox = font.getbbox(text, stroke_width=stroke)
        width = bbox[2] - bbox[0]
        if width <= max_width or px <= 6:
            return font, stroke, bbox
        px = max(6, min(px - 1, int(px * max_width / width)))


def apply_overlay(
    img: Image.Image,
    recipe: OverlayRecipe,
    *,
    image_id: int,
    label: str | None,
    class_names: Sequence[str],
) -> Image.Image:
    """Return an RGB copy of ``img`` with the recipe's text burned in; ``img`` is not modified.

    Deterministic: the same (recipe, image_id, label, class_names) and pixels give the same output.
    Only the text's bounding region is composited, so the cost hardly grows with image size.
    """
    text = overlay_text_for(recipe, image_id=image_id, label=label, class_names=class_names)
    out = to_rgb(img)
    out = out.copy() if out is img else out
    w, h = out.size
    margin = max(1, round(0.04 * min(w, h)))
    px = max(6, round(recipe.size * h))
    font, stroke, bbox = _fit_font(text, px, max(1, w - 2 * margin))
    pad = max(1, round(px * 0.15)) if recipe.box else 0
    bw = bbox[2] - bbox[0] + 2 * pad
    bh = bbox[3] - bbox[1] + 2 * pad
    fill, contrast = _colours(recipe.color)

    span_x, span_y = max(0, w - bw - 2 * margin), max(0, h - bh - 2 * margin)
    pos = recipe.position
    if pos == "random":
        rng = _rng(recipe.seed, image_id, "position")
        x, y = margin + rng.randint(0, span_x), margin + rng.randint(0, span_y)
    else:
        x = {"left": margin, "right": margin + span_x}.get(pos.split("-")[-1], margin + span_x // 2)
        y = {"top": margin, "bottom": margin + span_y}.get(pos.split("-")[0], margin + span_y // 2)
    # Clip to the image for text wider than the image even at the smallest font.
    x, y = max(0, min(x, w - 1)), max(0, min(y, h - 1))

    layer = Image.new("RGBA", (bw, bh), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if recipe.box:
        draw.rectangle((0, 0, bw - 1, bh - 1), fill=(*contrast, 255))
    draw.text(
        (pad - bbox[0], pad - bbox[1]),
        text,
        font=font,
        fill=(*fill, 255),
        stroke_width=stroke,
        stroke_fill=(*contrast, 255),
    )
    if recipe.opacity < 1.0:
        alpha = layer.getchannel("A").point(lambda a: round(a * recipe.opacity))
        layer.putalpha(alpha)
    region = (x, y, min(w, x + bw), min(h, y + bh))
    layer = layer.crop((0, 0, region[2] - x, region[3] - y))
    patch = Image.alpha_composite(out.crop(region).convert("RGBA"), layer).convert("RGB")
    out.paste(patch, region[:2])
    return out


# -- catalog -----------------------------------------------------------------------------------


def get_condition(con: duckdb.DuckDBPyConnection, dataset: str, name: str) -> OverlayRecipe | None:
    """The recipe of condition ``name`` on ``dataset``; ``None`` for ``clean`` (no overlay)."""
    if name == CLEAN:
        return None
    stored = conditions.recipe_json(con, dataset, name)
    if stored is None:
        catalog_datasets.require_dataset(con, dataset)
        raise VlmindexError(
            f"unknown condition {name!r} for dataset {dataset!r}; its conditions: "
            f"{', '.join(conditions.names(con, dataset))}; add one with "
            f"`vlmindex overlay add {dataset} {name} --text label`"
        )
    return OverlayRecipe.from_json(stored)


def add_condition(
    ws: Workspace, dataset: str, name: str, recipe: OverlayRecipe, *, replace: bool = False
) -> None:
    """Register ``recipe`` as condition ``name`` of ``dataset`` in the catalog (no images written).

    Replacing a condition drops everything computed from its old pixels (embeddings, indexes,
    analyses, overlay figures, text detections).
    """
    recipe.validate()
    if name == CLEAN:
        raise VlmindexError("condition name 'clean' is reserved for the images without overlay")
    if not _NAME_RE.fullmatch(name):
        raise VlmindexError(
            f"condition name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    with ws.write(wait=write_wait()) as con:
        catalog_datasets.require_dataset(con, dataset)
        if recipe.needs_labels:
            n_unlabelled, n_classes = catalog_datasets.label_counts(con, dataset)
            if n_unlabelled:
                raise VlmindexError(
                    f"--text {recipe.text} needs labels, but {n_unlabelled} images of {dataset!r} "
                    "have none; use random-word, id or fixed:TEXT"
                )
            if recipe.text == "wrong-label" and n_classes < 2:
                raise VlmindexError(
                    f"--text wrong-label needs at least two classes; {dataset!r} has {n_classes}"
                )
        exists = conditions.exists(con, dataset, name)
        if exists and not replace:
            raise VlmindexError(
                f"condition {name!r} already exists for {dataset!r}; pass --replace to overwrite "
                f"it or `vlmindex overlay remove {dataset} {name}` first"
            )
        conditions.put(con, ws, dataset, name, recipe.to_json(), replace=exists)


def remove_condition(ws: Workspace, dataset: str, name: str) -> None:
    """Delete a condition with its text detections, embeddings, indexes and results."""
    if name == CLEAN:
        raise VlmindexError("condition 'clean' is built in and cannot be removed")
    with ws.write(wait=write_wait()) as con:
        get_condition(con, dataset, name)  # raises with the list of conditions when unknown
        conditions.remove(con, ws, dataset, name)


def list_conditions(con: duckdb.DuckDBPyConnection, dataset: str | None = None) -> list[dict]:
    """Registered conditions (``clean`` is implicit and not listed), recipe fields flattened."""
    if dataset is not None:
        catalog_datasets.require_dataset(con, dataset)
    rows = []
    for ds, name, recipe_json, created_at in conditions.rows(con, dataset):
        recipe = OverlayRecipe.from_json(recipe_json)
        rows.append(
            {"dataset": ds, "name": name, **dataclasses.asdict(recipe), "created_at": created_at,
             "recipe": recipe.to_json()}
        )
    return rows


def preview_tiles(
    ws: Workspace, dataset: str, name: str, *, n: int = 16
) -> list[tuple[Image.Image, str]]:
    """``2n`` contact-sheet tiles: each sampled image clean, then overlaid, captioned.

    Images are taken round-robin over classes (smallest ``image_id`` first in each), so a preview
    shows several classes rather than the first ``n`` files of one.
    """
    from vlmindex.imageio import load_image

    if n < 1:
        raise VlmindexError(f"-n {n}: preview at least one image")
    with ws.read(views=False) as con:
        recipe = get_condition(con, dataset, name)
        if recipe is None:
            raise VlmindexError(
                "condition 'clean' has no overlay to preview; name a condition from "
                f"`vlmindex overlay list {dataset}`"
            )
        pools = catalog_datasets.class_pools(con, dataset)
        rows = catalog_datasets.preview_rows(con, dataset, n)
    if not rows:
        raise VlmindexError(f"dataset {dataset!r} has no images to preview")
    tiles = []
    for image_id, path, label, modality in rows:
        names = pools.get(modality, [])
        try:
            img = load_image(path)
        except (OSError, ValueError) as exc:
            raise VlmindexError(f"cannot read image {path} (image_id {image_id}): {exc}") from None
        text = overlay_text_for(recipe, image_id=image_id, label=label, class_names=names)
        tiles.append((img, f"{label if label is not None else image_id} (clean)"))
        tiles.append(
            (apply_overlay(img, recipe, image_id=image_id, label=label, class_names=names),
             f"{name}: {text}")
        )
    return tiles
