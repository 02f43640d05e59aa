"""Find burned-in text (labels, IDs, side markers) in images with an offline OCR model.

The OCR engine is RapidOCR (``rapidocr-onnxruntime``), whose PP-OCRv4 detection and recognition
ONNX models ship inside the PyPI wheel, so nothing is downloaded. Results go to the catalog table
``text_detections`` (one row per dataset, condition and image) so a dataset can be sliced by
detected text in SQL, e.g.::

    SELECT i.label, avg(t.has_text::INT) FROM images i JOIN text_detections t USING (image_id)
    WHERE t.dataset = 'isic' AND t.condition = 'clean' GROUP BY ALL;

Runs resume: images that already have a row for the (dataset, condition) made from their current
pixels are skipped (a row of replaced pixels is redone), and rows are committed every
``batch_size`` images, so a killed run keeps what it finished.

What counts as text (RapidOCR's recogniser reads shapes as characters on clean images: round blobs
as "O" or "8", bars and squares as "一", "二", "口"):

- a string of two or more characters needs a letter or digit and confidence >= ``min_score``;
- a single character must be an ASCII letter or digit (side markers such as L and R are) with
  confidence >= ``single_char_score``;
- the box may be at most ``max_char_aspect`` times as long per character as it is high, since a
  glyph's box is about as wide as tall and a blob read as "8" spans a wide box.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog import results
from vlmindex.errors import VlmindexError
from vlmindex.imageio import ChangedOnDisk, load_verified
from vlmindex.overlay import apply_overlay, get_condition

if TYPE_CHECKING:
    from vlmindex.catalog import Workspace

OCR_INSTALL_HINT = "pip install 'vlmindex[ocr]'"


@dataclass(frozen=True)
class OcrSettings:
    """OCR options that change what is found; recorded with every result (``engine`` column)."""

    # Images whose shorter side is below det_size are upscaled to it for detection (larger ones are
    # used as they are, up to 2000 px on the long side). 448 is 2x for 224-px images: it finds
    # single side-marker letters that 320 misses, at ~1/3 of the time of RapidOCR's own 736.
    det_size: int = 448
    min_score: float = 0.6
    single_char_score: float = 0.8
    max_char_aspect: float = 1.35
    threads: int = 0  # onnxruntime intra-op threads; 0 = its default (all cores)

    def validate(self) -> OcrSettings:
        if not 32 <= self.det_size <= 4000:
            raise VlmindexError(f"--det-size {self.det_size} must be between 32 and 4000 pixels")
        for name in ("min_score", "single_char_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise VlmindexError(f"{name} {value} must be in [0, 1]")
        if self.max_char_aspect <= 0:
            raise VlmindexError(f"max_char_aspect {self.max_char_aspect} must be positive")
        if self.threads < 0:
            raise VlmindexError(f"--threads {self.threads} must be >= 0 (0 = all cores)")
        return self


@dataclass(frozen=True)
class TextDetection:
    """What OCR found in one image."""

    has_text: bool
    text: str  # recognised strings in reading order joined by ' '; '' when none
    area_fraction: float  # union of the kept text boxes / image area
    n_boxes: int
    score: float | None  # lowest confidence among kept boxes; None when none
    boxes: list[list[float]]  # each [x0, y0, x1, y1, x2, y2, x3, y3] in image pixels


def _import_rapidocr() -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise VlmindexError(
            f"detect-text needs the OCR extra: {OCR_INSTALL_HINT} (rapidocr-onnxruntime could not "
            f"be imported: {exc})"
        ) from None
    return RapidOCR


def _counts_as_text(
    text: str, score: float, box: Sequence[Sequence[float]], settings: OcrSettings
) -> bool:
    chars = "".join(text.split())
    if len(chars) == 1:
        if not (chars.isascii() and chars.isalnum()) or score < settings.single_char_score:
            return False
    elif not any(ch.isalnum() for ch in chars) or score < settings.min_score:
        return False
    # RapidOCR's box corners run top-left, top-right, bottom-right, bottom-left; it reads crops
    # 1.5x taller than wide as vertical text.
    p = np.asarray(box, dtype=np.float64)
    width, height = float(np.linalg.norm(p[1] - p[0])), float(np.linalg.norm(p[3] - p[0]))
    along, across = (height, width) if len(chars) > 1 and height >= 1.5 * width else (width, height)
    return across > 0 and along / len(chars) / across <= settings.max_char_aspect


def text_area_fraction(boxes: Sequence[Sequence[Sequence[float]]], width: int, height: int) -> float:
    """Fraction of the image covered by the union of quadrilateral ``boxes`` (overlaps once)."""
    if not boxes or width <= 0 or height <= 0:
        return 0.0
    mask = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.polygon([(float(x), float(y)) for x, y in box], fill=1)
    return float(np.count_nonzero(np.asarray(mask))) / (width * height)


class TextDetector:
    """A loaded OCR engine. Construct once per process; ``detect`` one PIL image at a time.

    RapidOCR's API takes one image per call (its detector resizes each to its own shape), so
    there is no batching to gain here; onnxruntime uses all cores within a call.
    """

    def __init__(self, settings: OcrSettings | None = None) -> None:
        self.settings = (settings or OcrSettings()).validate()
        rapid_ocr = _import_rapidocr()
        kwargs: dict[str, Any] = {
            "det_limit_side_len": self.settings.det_size,
            "det_limit_type": "min",
            # our own filter decides; let RapidOCR hand over everything we might keep
            "text_score": min(self.settings.min_score, self.settings.single_char_score),
        }
        if self.settings.threads:
            kwargs["intra_op_num_threads"] = self.settings.threads
        self._ocr = rapid_ocr(**kwargs)
        try:
            version = metadata.version("rapidocr-onnxruntime")
        except metadata.PackageNotFoundError:
            version = "unknown"
        s = self.settings
        self.engine = (
            f"rapidocr-onnxruntime {version} det_size={s.det_size} min_score={s.min_score} "
            f"single_char_score={s.single_char_score} max_char_aspect={s.max_char_aspect}"
        )

    def detect(self, img: Image.Image) -> TextDetection:
        img = img.convert("RGB") if img.mode != "RGB" else img
        result, _ = self._ocr(img)
        kept = [
            (box, str(text), float(score))
            for box, text, score in (result or [])
            if _counts_as_text(str(text), float(score), box, self.settings)
        ]
        boxes = [[(float(x), float(y)) for x, y in box] for box, _, _ in kept]
        return TextDetection(
            has_text=bool(kept),
            text=" ".join(text.strip() for _, text, _ in kept),
            area_fraction=text_area_fraction(boxes, img.width, img.height),
            n_boxes=len(kept),
            score=min(score for _, _, score in kept) if kept else None,
            boxes=[[round(v, 1) for xy in box for v in xy] for box in boxes],
        )


def _flush(ws: Workspace, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        results.store_detections(ws, rows, wait=120)
        rows.clear()


def detect_text(
    ws: Workspace,
    dataset: str,
    *,
    condition: str = "clean",
    settings: OcrSettings | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    redo: bool = False,
    progress: bool = True,
    detector: TextDetector | None = None,
) -> dict[str, Any]:
    """OCR every image of ``dataset`` under ``condition`` and store one ``text_detections`` row each.

    Images that already have a row for (dataset, condition) are skipped unless ``redo``. At most
    ``limit`` new images are processed. Rows are committed every ``batch_size`` images and on
    interruption. An image that cannot be read gets a row with ``has_text`` NULL and the reason
    in ``error``. Returns a summary of this run and of everything stored for (dataset, condition).
    """
    if batch_size < 1:
        raise VlmindexError(f"--batch-size {batch_size} must be at least 1")
    if limit is not None and limit < 0:
        raise VlmindexError(f"--limit {limit} must be >= 0")
    settings = (settings or OcrSettings()).validate()
    with ws.read(views=False) as con:
        catalog_datasets.require_dataset(con, dataset)
        recipe = get_condition(con, dataset, condition)
        pools = catalog_datasets.class_pools(con, dataset)
        n_images, todo = results.detections_todo(con, dataset, condition, redo=redo)
    if n_images == 0:
        raise VlmindexError(f"dataset {dataset!r} has no images; ingest some first")
    already = n_images - len(todo)
    if limit is not None:
        todo = todo[:limit]

    processed = with_text = errors = 0
    changed: list[str] = []
    started = time.perf_counter()
    if todo:
        from tqdm import tqdm

        detector = detector or TextDetector(settings)
        buffer: list[tuple[Any, ...]] = []
        bar = tqdm(
            total=len(todo), desc=f"detect-text {dataset}/{condition}", unit="img",
            disable=not progress, dynamic_ncols=True,
        )
        try:
            for image_id, path, label, modality, pixels, sha256 in todo:
                try:
                    img = load_verified(path, sha256)
                except ChangedOnDisk as exc:
                    # Pixels the catalog never saw: an error row without a pixel fingerprint, so it
                    # is never taken for a result of the catalog's pixels and is redone next time.
                    errors += 1
                    changed.append(str(exc))
                    buffer.append(
                        (dataset, condition, image_id, None, None, None, None, None, None,
                         detector.engine, f"cannot read {path} as ingested: {exc}", datetime.now(), None)
                    )
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    errors += 1
                    buffer.append(
                        (dataset, condition, image_id, None, None, None, None, None, None,
                         detector.engine, f"cannot read {path}: {exc}", datetime.now(), pixels)
                    )
                else:
                    if recipe is not None:
                        img = apply_overlay(img, recipe, image_id=image_id, label=label,
                                            class_names=pools.get(modality, []))
                    found = detector.detect(img)
                    with_text += found.has_text
                    buffer.append(
                        (dataset, condition, image_id, found.has_text, found.text, found.area_fraction,
                         found.n_boxes, found.score, json.dumps(found.boxes), detector.engine, None,
                         datetime.now(), pixels)
                    )
                processed += 1
                bar.update(1)
                if len(buffer) >= batch_size:
                    _flush(ws, buffer)
        finally:
            bar.close()
            _flush(ws, buffer)  # also on Ctrl-C: keep the images already read
    seconds = time.perf_counter() - started

    with ws.read(views=False) as con:
        stored, stored_text, mean_area = results.detection_counts(con, dataset, condition)
    return {
        "dataset": dataset,
        "condition": condition,
        "images": n_images,
        "already_done": already,
        "processed": processed,
        "with_text": with_text,
        "errors": errors,
        "changed_since_ingest": len(changed),   # not stored: re-ingest the dataset with --replace
        "seconds": round(seconds, 2),
        "s_per_image": round(seconds / processed, 4) if processed else None,
        "stored": stored,
        "stored_with_text": stored_text,
        "mean_text_area": mean_area,
    }

