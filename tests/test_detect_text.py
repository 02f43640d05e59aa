"""OCR text detection: the acceptance check (finds overlay text, spares clean images), resume,
batch commits, error rows, and the optional-import message."""

from __future__ import annotations

import re
import sys
import time

import pytest
from test_overlay import CLASSES, make_workspace

from vlmindex.detect_text import (
    OcrSettings,
    TextDetection,
    TextDetector,
    _counts_as_text,
    detect_text,
    text_area_fraction,
)
from vlmindex.errors import VlmindexError
from vlmindex.overlay import OverlayRecipe, add_condition, overlay_text_for


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s).lower()


def test_area_fraction_counts_overlaps_once():
    a = [(0, 0), (10, 0), (10, 10), (0, 10)]
    b = [(5, 0), (15, 0), (15, 10), (5, 10)]
    assert text_area_fraction([a], 100, 100) == pytest.approx(0.01, rel=0.25)
    assert text_area_fraction([a, a], 100, 100) == text_area_fraction([a], 100, 100)
    union = text_area_fraction([a, b], 100, 100)
    assert 0.014 < union < 0.019  # 15 x 10 px, not 20 x 10
    assert text_area_fraction([], 100, 100) == 0.0


def _box(w, h):
    return [(10, 10), (10 + w, 10), (10 + w, 10 + h), (10, 10 + h)]


def test_what_counts_as_text():
    s = OcrSettings()
    assert _counts_as_text("melanoma", 0.7, _box(80, 20), s)
    assert not _counts_as_text("melanoma", 0.5, _box(80, 20), s)
    assert _counts_as_text("L", 0.95, _box(20, 26), s)
    assert not _counts_as_text("O", 0.6, _box(30, 31), s)  # a round blob read as a letter
    assert not _counts_as_text("8", 0.96, _box(141, 85), s)  # two blobs: far too wide for one glyph
    assert not _counts_as_text("口", 0.99, _box(30, 30), s)  # a lone non-Latin glyph: a square
    assert not _counts_as_text("·", 0.99, _box(10, 10), s)
    assert not _counts_as_text("- .", 0.99, _box(30, 10), s)
    assert _counts_as_text("AB12", 0.9, _box(20, 90), s)  # vertical text reads along the height
    assert _counts_as_text("右侧", 0.9, _box(40, 20), s)  # multi-character text in any script


def test_missing_ocr_package_is_one_line_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # makes the import fail
    with pytest.raises(VlmindexError, match=re.escape("pip install 'vlmindex[ocr]'")) as exc:
        TextDetector()
    assert "\n" not in str(exc.value)


class FakeDetector:
    """Stands in for OCR: records what the catalog held at each call, can stop the run."""

    engine = "fake"

    def __init__(self, ws, stop_after: int | None = None) -> None:
        self.ws, self.stop_after, self.calls, self.stored_seen = ws, stop_after, 0, []

    def detect(self, img):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt
        with self.ws.read() as con:
            self.stored_seen.append(con.execute("SELECT count(*) FROM text_detections").fetchone()[0])
        self.calls += 1
        return TextDetection(True, "x", 0.01, 1, 0.9, [[0, 0, 1, 0, 1, 1, 0, 1]])


def test_batches_commit_and_a_stopped_run_resumes(tmp_path):
    ws = make_workspace(tmp_path, n=8, size=64)
    fake = FakeDetector(ws, stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        detect_text(ws, "toy", batch_size=2, progress=False, detector=fake)
    assert fake.stored_seen == [0, 0, 2, 2, 4]  # committed every 2 images while running
    with ws.read() as con:
        assert con.execute("SELECT count(*) FROM text_detections").fetchone()[0] == 5  # flushed on stop
    fake2 = FakeDetector(ws)
    summary = detect_text(ws, "toy", batch_size=2, progress=False, detector=fake2)
    assert fake2.calls == 3 and summary["already_done"] == 5 and summary["stored"] == 8
    summary = detect_text(ws, "toy", progress=False, detector=FakeDetector(ws, stop_after=0))
    assert summary["processed"] == 0  # nothing left: the detector is never called
    summary = detect_text(ws, "toy", redo=True, limit=2, progress=False, detector=FakeDetector(ws))
    assert summary["processed"] == 2


def test_unreadable_image_gets_an_error_row(tmp_path):
    ws = make_workspace(tmp_path, n=3, size=64)
    with ws.read() as con:
        path = con.execute("SELECT path FROM images ORDER BY image_id LIMIT 1").fetchone()[0]
    with open(path, "wb") as fh:
        fh.write(b"not a png")
    summary = detect_text(ws, "toy", progress=False, detector=FakeDetector(ws))
    assert summary["errors"] == 1 and summary["processed"] == 3
    with ws.read() as con:
        row = con.execute("SELECT has_text, error FROM text_detections WHERE error IS NOT NULL").fetchone()
    assert row[0] is None and "cannot read" in row[1]


def test_unknown_condition_or_dataset(tmp_path):
    ws = make_workspace(tmp_path, n=2, size=64)
    with pytest.raises(VlmindexError, match="unknown condition 'nope'"):
        detect_text(ws, "toy", condition="nope", progress=False, detector=FakeDetector(ws))
    with pytest.raises(VlmindexError, match="unknown dataset 'zzz'"):
        detect_text(ws, "zzz", progress=False, detector=FakeDetector(ws))


def test_ocr_finds_overlay_text_and_spares_clean_images(tmp_path):
    """Acceptance: text found on >= 90% of overlaid images and read correctly; <= 5% of clean flagged.

    Two datasets of ten 224-px images (half greyscale), one with the default recipe (true label,
    bottom-right), one with random words at random positions: 20 overlaid + 20 clean OCR calls.
    """
    pytest.importorskip("rapidocr_onnxruntime")
    ws = make_workspace(tmp_path, dataset="derm", n=10)
    labels_b = [CLASSES[(i + 1) % 3] for i in range(10)]
    make_workspace(tmp_path, dataset="skin", n=10, labels=labels_b)
    conditions = {"derm": ("lab", OverlayRecipe("label")),
                  "skin": ("word", OverlayRecipe("random-word", position="random", seed=1))}
    for ds, (name, recipe) in conditions.items():
        add_condition(ws, ds, name, recipe)

    # One thread: results are the same, and a shared 2-core test machine is not oversubscribed.
    detector = TextDetector(OcrSettings(threads=1))
    started = time.perf_counter()
    found, flagged, n_over, n_clean = 0, 0, 0, 0
    for ds, (name, recipe) in conditions.items():
        detect_text(ws, ds, condition=name, progress=False, detector=detector)
        detect_text(ws, ds, condition="clean", progress=False, detector=detector)
        with ws.read() as con:
            rows = con.execute(
                "SELECT i.image_id, i.label, t.has_text, t.text, t.area_fraction FROM images i "
                "JOIN text_detections t ON t.image_id = i.image_id AND t.dataset = i.dataset "
                "WHERE i.dataset = ? AND t.condition = ?", [ds, name]).fetchall()
            clean = con.execute(
                "SELECT has_text FROM text_detections WHERE dataset = ? AND condition = 'clean'", [ds]
            ).fetchall()
        for image_id, label, has_text, text, area in rows:
            written = overlay_text_for(recipe, image_id=image_id, label=label, class_names=CLASSES)
            if has_text and _norm(written) in _norm(text):
                found += 1
                assert 0.003 < area < 0.25
        n_over += len(rows)
        flagged += sum(bool(r[0]) for r in clean)
        n_clean += len(clean)
    per_image = (time.perf_counter() - started) / (n_over + n_clean)
    print(f"OCR: {found}/{n_over} overlaid found, {flagged}/{n_clean} clean flagged, {per_image:.3f} s/image")
    assert n_over == 20 and n_clean == 20
    assert found >= 0.9 * n_over
    assert flagged <= 0.05 * n_clean
