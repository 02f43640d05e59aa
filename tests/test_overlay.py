"""Overlay-text conditions: recipes, deterministic rendering, the catalog table and the CLI."""

from __future__ import annotations

import json
import pickle
import re
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFilter

from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError
from vlmindex.imageio import file_sha256, save_png
from vlmindex.overlay import (
    VOCABULARY,
    OverlayRecipe,
    add_condition,
    apply_overlay,
    get_condition,
    list_conditions,
    overlay_text_for,
    preview_tiles,
    remove_condition,
)

CLASSES = ["basal cell carcinoma", "melanoma", "nevus"]


def make_image(seed: int, size: int = 224, grey: bool | None = None) -> Image.Image:
    """A noisy background with a few blurred blobs and bars, greyscale or colour."""
    rng = np.random.default_rng(seed)
    grey = seed % 2 == 0 if grey is None else grey
    if grey:
        arr = rng.normal(rng.integers(20, 120), 18, (size, size)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L").convert("RGB")
    else:
        base = rng.integers(80, 200, 3)
        arr = (rng.normal(0, 15, (size, size, 3)) + base).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = (int(v) for v in rng.integers(0, size - size // 5, 2))
        r = int(rng.integers(size // 15, size // 4))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + r, y0 + r), fill=colour)
        else:
            draw.rectangle((x0, y0, x0 + r, y0 + r // 2), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    return img.convert("L") if grey else img


def make_workspace(
    root: Path, dataset: str = "toy", n: int = 6, size: int = 224, labels: list[str | None] | None = None
) -> Workspace:
    """A workspace with ``n`` PNGs of ``dataset`` registered directly in the catalog."""
    ws = Workspace(root / "ws")
    img_dir = root / "img" / dataset
    rows = []
    offset = zlib.crc32(dataset.encode()) % 100_000 * 1000  # distinct ids and pixels per dataset
    for i in range(n):
        path = img_dir / f"{i:03d}.png"
        save_png(make_image(offset + i, size), path)
        label = labels[i] if labels is not None else CLASSES[i % len(CLASSES)]
        rows.append((offset + i * 37, dataset, str(path), label, "train", f"g{i}", "dermoscopy",
                     size, size, file_sha256(path)))  # the file's own: readers check it
    with ws.write() as con:
        con.execute(
            "INSERT INTO datasets (name, format, source, n_images, n_skipped, ingested_at) "
            "VALUES (?, 'test', ?, ?, 0, ?)",
            [dataset, str(img_dir), n, datetime.now()],
        )
        con.executemany(
            "INSERT INTO images (image_id, dataset, path, label, split, group_id, modality, width, "
            "height, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return ws


def changed_mask(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.any(np.asarray(a.convert("RGB"), np.int16) != np.asarray(b.convert("RGB"), np.int16), axis=2)


# -- recipes -----------------------------------------------------------------------------------


def test_recipe_json_round_trip_and_pickle():
    recipe = OverlayRecipe("fixed:L", position="random", size=0.08, color="#ffcc00", opacity=0.7,
                           seed=5, box=True)
    assert OverlayRecipe.from_json(recipe.to_json()) == recipe
    assert json.loads(recipe.to_json())["text"] == "fixed:L"
    assert pickle.loads(pickle.dumps(recipe)) == recipe
    assert OverlayRecipe.from_json('{"text": "label"}') == OverlayRecipe("label")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"text": "lable"}, "text source 'lable'"),
        ({"text": "fixed:"}, "text source"),
        ({"text": "label", "position": "middle"}, "position 'middle'"),
        ({"text": "label", "size": 0}, "size 0"),
        ({"text": "label", "size": 1.5}, "size 1.5"),
        ({"text": "label", "color": "notacolour"}, "colour 'notacolour'"),
        ({"text": "label", "opacity": 0.0}, "opacity 0.0"),
        ({"text": "label", "seed": 1.5}, "seed 1.5"),
    ],
)
def test_validate_rejects_bad_values(kwargs, match):
    with pytest.raises(VlmindexError, match=re.escape(match)):
        OverlayRecipe(**kwargs).validate()


def test_from_json_rejects_unknown_keys_and_garbage():
    with pytest.raises(VlmindexError, match="unknown keys"):
        OverlayRecipe.from_json('{"text": "label", "font": "arial"}')
    with pytest.raises(VlmindexError, match="not valid JSON"):
        OverlayRecipe.from_json("{text")


# -- text sources ------------------------------------------------------------------------------


def test_text_sources():
    label = OverlayRecipe("label")
    assert overlay_text_for(label, image_id=1, label="nevus", class_names=CLASSES) == "nevus"
    fixed = OverlayRecipe("fixed:R side")
    assert overlay_text_for(fixed, image_id=1, label="nevus", class_names=CLASSES) == "R side"
    words = {overlay_text_for(OverlayRecipe("random-word"), image_id=i, label=None, class_names=[])
             for i in range(200)}
    assert words <= set(VOCABULARY) and len(words) > 20
    ids = [overlay_text_for(OverlayRecipe("id"), image_id=i, label=None, class_names=[]) for i in range(50)]
    assert all(re.fullmatch(r"[A-HJ-NP-Z]{2}\d{8}", s) for s in ids)
    assert len(set(ids)) == 50


def test_wrong_label_is_never_the_true_one_and_is_deterministic():
    recipe = OverlayRecipe("wrong-label", seed=3)
    for true in CLASSES:
        picks = [overlay_text_for(recipe, image_id=i, label=true, class_names=CLASSES) for i in range(60)]
        assert true not in picks
        assert set(picks) == set(CLASSES) - {true}  # both other classes get used
        again = [overlay_text_for(recipe, image_id=i, label=true, class_names=CLASSES) for i in range(60)]
        assert picks == again
    other_seed = OverlayRecipe("wrong-label", seed=4)
    a = [overlay_text_for(recipe, image_id=i, label="nevus", class_names=CLASSES) for i in range(60)]
    b = [overlay_text_for(other_seed, image_id=i, label="nevus", class_names=CLASSES) for i in range(60)]
    assert a != b
    with pytest.raises(VlmindexError, match="at least two classes"):
        overlay_text_for(recipe, image_id=1, label="nevus", class_names=["nevus"])
    with pytest.raises(VlmindexError, match="has no label"):
        overlay_text_for(OverlayRecipe("label"), image_id=1, label=None, class_names=CLASSES)


# -- rendering ---------------------------------------------------------------------------------


def test_apply_overlay_is_deterministic_and_leaves_input_alone():
    img = make_image(1, grey=False)
    before = img.tobytes()
    recipe = OverlayRecipe("id", position="random", seed=7)
    a = apply_overlay(img, recipe, image_id=42, label="nevus", class_names=CLASSES)
    b = apply_overlay(img.copy(), recipe, image_id=42, label="nevus", class_names=CLASSES)
    assert img.tobytes() == before
    assert a.mode == "RGB" and a.size == img.size
    assert a.tobytes() == b.tobytes()
    assert changed_mask(img, a).sum() > 100
    c = apply_overlay(img, OverlayRecipe("id", position="random", seed=8), image_id=42, label="nevus",
                      class_names=CLASSES)
    assert c.tobytes() != a.tobytes()


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [("top-left", slice(0, 112), slice(0, 112)), ("bottom-right", slice(112, 224), slice(112, 224)),
     ("top-right", slice(0, 112), slice(112, 224)), ("bottom-left", slice(112, 224), slice(0, 112))],
)
def test_corner_positions_write_only_in_their_corner(position, rows, cols):
    img = make_image(2)  # greyscale input: the output is RGB anyway
    out = apply_overlay(img, OverlayRecipe("fixed:AB", position=position), image_id=1, label=None,
                        class_names=[])
    mask = changed_mask(img, out)
    assert mask[rows, cols].sum() > 50
    assert mask.sum() == mask[rows, cols].sum()


def test_center_position_is_centred():
    img = make_image(3)
    out = apply_overlay(img, OverlayRecipe("fixed:XYZ", position="center"), image_id=1, label=None,
                        class_names=[])
    ys, xs = np.nonzero(changed_mask(img, out))
    assert abs(xs.mean() - 112) < 12 and abs(ys.mean() - 112) < 12


def test_random_position_varies_by_image_and_is_stable():
    img = make_image(4, grey=False)
    recipe = OverlayRecipe("fixed:X", position="random", seed=1)
    centres = set()
    for image_id in range(8):
        a = apply_overlay(img, recipe, image_id=image_id, label=None, class_names=[])
        b = apply_overlay(img, recipe, image_id=image_id, label=None, class_names=[])
        assert a.tobytes() == b.tobytes()
        ys, xs = np.nonzero(changed_mask(img, a))
        centres.add((round(xs.mean() / 20), round(ys.mean() / 20)))
    assert len(centres) >= 6


def test_text_scales_with_image_height():
    heights = {}
    for size in (224, 448):
        img = Image.new("RGB", (size, size), (60, 60, 60))
        out = apply_overlay(img, OverlayRecipe("fixed:HXH", size=0.1), image_id=1, label=None,
                            class_names=[])
        ys, _ = np.nonzero(changed_mask(img, out))
        heights[size] = ys.max() - ys.min() + 1
    assert 1.8 < heights[448] / heights[224] < 2.2
    # font size 0.1 x height: capitals (with the outline) span roughly 0.07-0.1 of the height
    assert 0.06 * 224 <= heights[224] <= 0.11 * 224


def test_long_text_shrinks_to_fit_width():
    img = Image.new("RGB", (224, 224), (40, 40, 40))
    out = apply_overlay(img, OverlayRecipe("fixed:seborrheic keratosis", size=0.2), image_id=1,
                        label=None, class_names=[])
    _, xs = np.nonzero(changed_mask(img, out))
    assert xs.min() > 0 and xs.max() < 223  # not clipped at either edge
    assert xs.max() - xs.min() > 150  # but still spans most of the width


def test_opacity_and_box():
    img = Image.new("RGB", (224, 224), (0, 0, 0))
    full = np.asarray(apply_overlay(img, OverlayRecipe("fixed:W"), image_id=1, label=None,
                                    class_names=[]))
    half = np.asarray(apply_overlay(img, OverlayRecipe("fixed:W", opacity=0.5), image_id=1,
                                    label=None, class_names=[]))
    assert full.max() == 255 and 110 <= half.max() <= 145
    grey = Image.new("RGB", (224, 224), (128, 128, 128))
    boxed = apply_overlay(grey, OverlayRecipe("fixed:W", box=True), image_id=1, label=None,
                          class_names=[])
    plain = apply_overlay(grey, OverlayRecipe("fixed:W"), image_id=1, label=None, class_names=[])
    # The box is a filled rectangle: it changes more pixels than glyph and outline alone.
    assert changed_mask(grey, boxed).sum() > 1.5 * changed_mask(grey, plain).sum()


# -- catalog and CLI ---------------------------------------------------------------------------


def test_conditions_in_catalog(tmp_path):
    ws = make_workspace(tmp_path, n=4)
    recipe = OverlayRecipe("wrong-label", position="top-left", seed=2)
    add_condition(ws, "toy", "wrong", recipe)
    with ws.read() as con:
        assert get_condition(con, "toy", "wrong") == recipe
        assert get_condition(con, "toy", "clean") is None
        with pytest.raises(VlmindexError, match=r"conditions: clean, wrong; add one with `vlmindex overlay"):
            get_condition(con, "toy", "nope")
        with pytest.raises(VlmindexError, match="unknown dataset 'other'"):
            get_condition(con, "other", "nope")
        rows = list_conditions(con)
        assert [(r["dataset"], r["name"], r["text"], r["seed"]) for r in rows] == [
            ("toy", "wrong", "wrong-label", 2)
        ]
    with pytest.raises(VlmindexError, match="already exists"):
        add_condition(ws, "toy", "wrong", OverlayRecipe("label"))
    add_condition(ws, "toy", "wrong", OverlayRecipe("label"), replace=True)
    with ws.read() as con:
        assert get_condition(con, "toy", "wrong") == OverlayRecipe("label")
    with pytest.raises(VlmindexError, match="reserved"):
        add_condition(ws, "toy", "clean", OverlayRecipe("label"))
    with pytest.raises(VlmindexError, match="unknown dataset 'missing'"):
        add_condition(ws, "missing", "x", OverlayRecipe("label"))
    with pytest.raises(VlmindexError, match="condition name"):
        add_condition(ws, "toy", "has space", OverlayRecipe("label"))
    with pytest.raises(VlmindexError, match="position"):
        add_condition(ws, "toy", "bad", OverlayRecipe("label", position="middle"))
    remove_condition(ws, "toy", "wrong")
    with ws.read() as con:
        assert list_conditions(con, "toy") == []
    with pytest.raises(VlmindexError, match="unknown condition 'wrong'"):
        remove_condition(ws, "toy", "wrong")


def test_label_sources_need_labels(tmp_path):
    ws = make_workspace(tmp_path, n=3, labels=["nevus", None, "nevus"])
    with pytest.raises(VlmindexError, match="1 images of 'toy' have none"):
        add_condition(ws, "toy", "lab", OverlayRecipe("label"))
    add_condition(ws, "toy", "ids", OverlayRecipe("id"))  # fine without labels


def test_wrong_label_needs_two_classes(tmp_path):
    ws = make_workspace(tmp_path, n=3, labels=["nevus"] * 3)
    with pytest.raises(VlmindexError, match="at least two classes"):
        add_condition(ws, "toy", "w", OverlayRecipe("wrong-label"))


def test_preview_tiles_pair_clean_and_overlaid(tmp_path):
    ws = make_workspace(tmp_path, n=7)
    add_condition(ws, "toy", "lab", OverlayRecipe("label"))
    tiles = preview_tiles(ws, "toy", "lab", n=4)
    assert len(tiles) == 8
    # round-robin over classes: the first three images are of three different classes
    shown = [caption.split(": ")[1] for _, caption in tiles[1:6:2]]
    assert sorted(shown) == CLASSES
    for (clean, _), (over, caption) in zip(tiles[::2], tiles[1::2], strict=True):
        assert caption.startswith("lab: ")
        assert changed_mask(clean, over).any()
    with pytest.raises(VlmindexError, match="no overlay to preview"):
        preview_tiles(ws, "toy", "clean")


def test_cli_add_list_preview_remove(tmp_path):
    from vlmindex.cli import cli

    ws = make_workspace(tmp_path, n=5)
    runner = CliRunner()
    base = ["-w", str(ws.root), "overlay"]
    res = runner.invoke(cli, [*base, "add", "toy", "ids", "--text", "id", "--position", "centre",
                              "--size", "0.1", "--color", "yellow", "--seed", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*base, "list", "toy", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["name"], r["text"], r["position"], r["size"], r["color"], r["seed"]) for r in rows] == [
        ("ids", "id", "center", 0.1, "yellow", 3)
    ]
    out = tmp_path / "sheet.png"
    res = runner.invoke(cli, [*base, "preview", "toy", "ids", "-n", "3", "--out", str(out),
                              "--tile-size", "100"])
    assert res.exit_code == 0, res.output
    with Image.open(out) as sheet:
        assert sheet.width == 6 * 100  # 3 pairs in one row
    res = runner.invoke(cli, [*base, "remove", "toy", "ids"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*base, "list", "--format", "csv"])
    assert res.output.strip().splitlines()[0].startswith("dataset,name,text")
    assert len(res.output.strip().splitlines()) == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    from vlmindex.cli import main

    ws = make_workspace(tmp_path, n=2)
    with pytest.raises(SystemExit) as exc:
        main(["-w", str(ws.root), "overlay", "add", "toy", "x", "--text", "lable"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: unknown overlay text source 'lable'") and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["-w", str(ws.root), "overlay", "preview", "toy", "nope"])
    err = capsys.readouterr().err.strip()
    assert "unknown condition 'nope'" in err and "vlmindex overlay add toy nope" in err
