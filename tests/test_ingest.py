"""Ingestion: the four dataset formats, bad input, idempotent re-ingest, the busy workspace."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from vlmindex.catalog.workspace import Workspace
from vlmindex.datasets import IngestOptions
from vlmindex.errors import VlmindexError, WorkspaceBusy
from vlmindex.ingest import image_id_for, ingest

SEED = 1234


# -- helpers -------------------------------------------------------------------------------------
def write_image(path: Path, seed: int, size: int = 40, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A small random image; ``mode`` may be L, RGB, RGBA, P, CMYK, LA or I;16."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        if mode == "P":
            img = img.quantize(16)
        elif mode != "RGB":
            img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def images(ws: Workspace, dataset: str) -> dict[str, dict]:
    """Catalog rows of a dataset keyed by the file name of ``path``."""
    with ws.read() as con:
        cur = con.execute("SELECT * FROM images WHERE dataset = ? ORDER BY path", [dataset])
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    out = {Path(r["path"]).name: r for r in rows}
    assert len(out) == len(rows), "file names in these tests are unique"
    return out


def skipped(ws: Workspace, dataset: str) -> dict[str, str]:
    with ws.read() as con:
        rows = con.execute("SELECT path, reason FROM skipped WHERE dataset = ?", [dataset]).fetchall()
    return {Path(p).name: reason for p, reason in rows}


def count(ws: Workspace, sql: str, *params) -> int:
    with ws.read() as con:
        return con.execute(sql, list(params)).fetchone()[0]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


# -- imagefolder ---------------------------------------------------------------------------------
@pytest.fixture
def kermany(tmp_path: Path) -> Path:
    """Kermany-like layout: split folders (train, Testing), class folders, personN_ file names."""
    root = tmp_path / "chest_xray"
    files = [
        "train/NORMAL/IM-0115-0001.jpeg",
        "train/PNEUMONIA/person1_bacteria_1.jpeg",
        "train/PNEUMONIA/person1_virus_7.jpeg",
        "train/PNEUMONIA/person2_bacteria_3.jpeg",
        "Testing/NORMAL/IM-0001-0001.jpeg",
        "Testing/PNEUMONIA/person3_virus_9.jpeg",
    ]
    for i, rel in enumerate(files):
        write_image(root / rel, SEED + i, mode="L", fmt="JPEG")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")            # OS litter: ignored, not "skipped"
    (root / "__MACOSX" / "train").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "._x.jpeg").write_bytes(b"\0\5\26\7")
    return root


def test_imagefolder_labels_splits_groups(ws: Workspace, kermany: Path) -> None:
    opts = IngestOptions(group_regex=r"^(person\d+)_", modality="xray")
    report = ingest(ws, "kermany", kermany, "imagefolder", opts, progress=False)
    assert (report.ingested, report.skipped, report.total) == (6, 0, 6)
    rows = images(ws, "kermany")
    assert rows["person1_bacteria_1.jpeg"]["label"] == "PNEUMONIA"
    assert rows["IM-0115-0001.jpeg"]["label"] == "NORMAL"
    assert rows["person1_bacteria_1.jpeg"]["split"] == "train"
    assert rows["IM-0001-0001.jpeg"]["split"] == "test"          # Testing -> test
    assert rows["person1_bacteria_1.jpeg"]["group_id"] == "person1"
    assert rows["person1_virus_7.jpeg"]["group_id"] == "person1"
    assert rows["person2_bacteria_3.jpeg"]["group_id"] == "person2"
    # No match: the image is its own group (its relative path).
    assert rows["IM-0115-0001.jpeg"]["group_id"] == "train/NORMAL/IM-0115-0001.jpeg"
    assert {r["modality"] for r in rows.values()} == {"xray"}
    r = rows["person1_virus_7.jpeg"]
    assert r["image_id"] == image_id_for("kermany", "train/PNEUMONIA/person1_virus_7.jpeg")
    assert (r["width"], r["height"]) == (40, 40)
    assert r["sha256"] and len(r["sha256"]) == 64
    assert Path(r["path"]).is_absolute() and Path(r["path"]).is_file()
    assert skipped(ws, "kermany") == {}


def test_imagefolder_exclude_masks(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "Dataset_BUSI_with_GT"
    for i, cls in enumerate(["benign", "malignant", "normal"]):
        write_image(root / cls / f"{cls} (1).png", SEED + i, mode="L")
        write_image(root / cls / f"{cls} (1)_mask.png", SEED + 10 + i, mode="L")
        write_image(root / cls / f"{cls} (1)_mask_1.png", SEED + 20 + i, mode="L")
    report = ingest(ws, "busi", root, "imagefolder", IngestOptions(exclude=("*_mask*",)), progress=False)
    rows = images(ws, "busi")
    assert sorted(rows) == ["benign (1).png", "malignant (1).png", "normal (1).png"]
    assert {r["label"] for r in rows.values()} == {"benign", "malignant", "normal"}
    assert {r["split"] for r in rows.values()} == {None}
    assert report.skipped == 0 and skipped(ws, "busi") == {}   # excluded is not skipped


def test_imagefolder_follows_symlinked_folders_once(ws: Workspace, tmp_path: Path) -> None:
    elsewhere = tmp_path / "disk2" / "malignant"
    write_image(elsewhere / "m1.png", SEED)
    root = tmp_path / "set"
    write_image(root / "benign" / "b1.png", SEED + 1)
    (root / "malignant").symlink_to(elsewhere, target_is_directory=True)
    (root / "benign" / "loop").symlink_to(root, target_is_directory=True)   # must not recurse forever
    # disk2 lies outside SOURCE: followed only on request since folder links out of SOURCE are skipped.
    ingest(ws, "s", root, "imagefolder", IngestOptions(follow_symlinks=True), progress=False)
    rows = images(ws, "s")
    assert {n: r["label"] for n, r in rows.items()} == {"b1.png": "benign", "m1.png": "malignant"}


def test_imagefolder_does_not_follow_symlinks_out_of_source_unless_asked(
        ws: Workspace, tmp_path: Path, vlm) -> None:
    elsewhere = tmp_path / "home" / "photos"
    write_image(elsewhere / "cat.png", SEED)
    root = tmp_path / "set"
    write_image(root / "benign" / "b1.png", SEED + 1)
    write_image(root / "shared" / "s1.png", SEED + 2)
    (root / "benign" / "more").symlink_to(root / "shared", target_is_directory=True)   # stays inside
    (root / "malignant").symlink_to(elsewhere, target_is_directory=True)                # leaves SOURCE
    report = ingest(ws, "s", root, "imagefolder", progress=False)
    assert sorted(images(ws, "s")) == ["b1.png", "s1.png"]
    assert report.skipped == 1
    reason = skipped(ws, "s")["malignant"]
    assert reason == (f"directory symlink to {elsewhere.resolve()} leaves SOURCE; not followed "
                      "(pass --follow-symlinks)")

    ingest(ws, "s2", root, "imagefolder", IngestOptions(follow_symlinks=True), progress=False)
    rows = images(ws, "s2")
    assert sorted(rows) == ["b1.png", "cat.png", "s1.png"] and rows["cat.png"]["label"] == "malignant"
    assert skipped(ws, "s2") == {}

    res = vlm(tmp_path / "cli-ws", "ingest", "s3", root, "--format", "imagefolder", "--follow-symlinks")
    assert "ingested 3 images" in res.out and "skipped 0" in res.out


def test_blank_images_are_skipped(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write_image(root / "a" / "noise.png", SEED)
    Image.new("L", (32, 32), 0).save(root / "a" / "black.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "a" / "red.png")
    Image.fromarray(np.full((32, 32), 4000, np.uint16)).save(root / "a" / "flat16.png")
    Image.new("RGBA", (32, 32), (90, 10, 10, 0)).save(root / "a" / "transparent.png")  # black once composited
    near = Image.new("RGB", (32, 32), (200, 30, 30))
    near.putpixel((5, 5), (200, 30, 31))                       # one pixel off in one channel: not blank
    near.save(root / "a" / "near.png")
    report = ingest(ws, "flat", root, "imagefolder", progress=False)
    assert sorted(images(ws, "flat")) == ["near.png", "noise.png"]
    assert report.skipped == 4
    assert skipped(ws, "flat") == {n: "blank image: every pixel has the same value"
                                   for n in ("black.png", "red.png", "flat16.png", "transparent.png")}


def test_reingest_is_idempotent_and_replace_drops_missing(ws: Workspace, kermany: Path) -> None:
    ingest(ws, "k", kermany, "imagefolder", progress=False)
    before = {n: r["image_id"] for n, r in images(ws, "k").items()}
    report = ingest(ws, "k", kermany, "imagefolder", progress=False)
    assert report.total == 6
    assert count(ws, "SELECT count(*) FROM images WHERE dataset = 'k'") == 6
    assert {n: r["image_id"] for n, r in images(ws, "k").items()} == before

    write_image(kermany / "val" / "NORMAL" / "IM-0200-0001.jpeg", SEED + 99, fmt="JPEG")
    (kermany / "train" / "PNEUMONIA" / "person2_bacteria_3.jpeg").unlink()
    report = ingest(ws, "k", kermany, "imagefolder", progress=False)
    assert report.total == 7                 # the new file is added, the vanished one is kept
    after = images(ws, "k")
    assert after["IM-0200-0001.jpeg"]["split"] == "val"
    assert all(after[n]["image_id"] == i for n, i in before.items())

    report = ingest(ws, "k", kermany, "imagefolder", replace=True, progress=False)
    assert report.total == 6
    assert "person2_bacteria_3.jpeg" not in images(ws, "k")
    assert count(ws, "SELECT n_images FROM datasets WHERE name = 'k'") == 6


def test_reingest_under_another_format_needs_replace(ws: Workspace, kermany: Path, tmp_path: Path) -> None:
    ingest(ws, "k", kermany, "imagefolder", progress=False)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nchest_xray/train/NORMAL/IM-0115-0001.jpeg,NORMAL\n")
    with pytest.raises(VlmindexError, match="--replace"):
        ingest(ws, "k", manifest, "csv", progress=False)
    report = ingest(ws, "k", manifest, "csv", replace=True, progress=False)
    assert report.total == 1


def test_bad_input_is_recorded_never_fatal(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "messy"
    good = root / "good"
    write_image(good / "rgb.png", SEED)
    write_image(good / "grey16.png", SEED + 1, mode="I;16")
    write_image(good / "rgba.png", SEED + 2, mode="RGBA")
    write_image(good / "palette.png", SEED + 3, mode="P")
    write_image(good / "cmyk.jpg", SEED + 4, mode="CMYK", fmt="JPEG")
    write_image(good / "la.png", SEED + 5, mode="LA")
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image\n")
    (bad / "fake.jpg").write_text("a text file wearing a .jpg name\n")
    full = write_image(tmp_path / "whole.jpg", SEED + 6, size=64, fmt="JPEG").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    png = write_image(tmp_path / "whole.png", SEED + 7, size=64).read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "corrupt.png").write_bytes(png[:60] + bytes(300) + png[360:])

    report = ingest(ws, "messy", root, "imagefolder", progress=False)
    assert (report.ingested, report.skipped, report.total) == (6, 6, 6)
    rows = images(ws, "messy")
    assert sorted(rows) == ["cmyk.jpg", "grey16.png", "la.png", "palette.png", "rgb.png", "rgba.png"]
    reasons = skipped(ws, "messy")
    assert set(reasons) == {"zero.png", "notes.txt", "fake.jpg", "truncated.jpg", "truncated.png",
                            "corrupt.png"}
    assert reasons["zero.png"] == "zero-byte file"
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["fake.jpg"].startswith("not an image")
    assert reasons["truncated.jpg"].startswith("truncated image")
    assert reasons["truncated.png"].startswith("truncated image")
    assert reasons["corrupt.png"].startswith(("corrupt image", "truncated image"))
    assert count(ws, "SELECT n_skipped FROM datasets WHERE name = 'messy'") == 6
    # A re-ingest replaces the list of skipped files instead of appending to it.
    ingest(ws, "messy", root, "imagefolder", progress=False)
    assert count(ws, "SELECT count(*) FROM skipped WHERE dataset = 'messy'") == 6


def test_imagefolder_needs_a_folder(ws: Workspace, tmp_path: Path) -> None:
    f = write_image(tmp_path / "one.png", SEED)
    with pytest.raises(VlmindexError, match="not a folder"):
        ingest(ws, "x", f, "imagefolder", progress=False)
    with pytest.raises(VlmindexError, match="does not exist"):
        ingest(ws, "x", tmp_path / "nowhere", "imagefolder", progress=False)
    with pytest.raises(VlmindexError, match="unknown dataset format"):
        ingest(ws, "x", tmp_path, "tiff-stack", progress=False)


# -- csv manifests -------------------------------------------------------------------------------
def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_columns_from_flags(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "study"
    for i, name in enumerate(["a.png", "b.png", "c.png", "sub/d.png"]):
        write_image(root / "imgs" / name, SEED + i)
    manifest = write_csv(tmp_path / "meta" / "manifest.csv",
                         ["file", "dx", "fold", "patient", "kind"], [
                             ["imgs/a.png", "nevus", "Training", "p1", "dermoscopy"],
                             ["imgs/b.png", "melanoma", "validation", "p1", "clinical"],
                             ["imgs/c.png", "melanoma", "test", "", ""],
                             ["imgs/sub/d", "nevus", "train", "p2", "dermoscopy"],   # no extension
                             ["imgs/missing.png", "nevus", "train", "p3", "dermoscopy"],
                             ["", "nevus", "train", "p4", "dermoscopy"],
                             ["imgs/a.png", "nevus", "train", "p1", "dermoscopy"],  # listed twice
                         ])
    opts = IngestOptions(path_col="file", label_col="dx", split_col="fold", group_col="patient",
                         modality_col="kind", image_root=root, modality="photo")
    report = ingest(ws, "derm", manifest, "csv", opts, progress=False)
    assert (report.ingested, report.skipped) == (4, 3)
    rows = images(ws, "derm")
    assert rows["a.png"]["label"] == "nevus" and rows["a.png"]["split"] == "train"
    assert rows["b.png"]["split"] == "val" and rows["b.png"]["modality"] == "clinical"
    assert rows["a.png"]["group_id"] == rows["b.png"]["group_id"] == "p1"
    assert rows["c.png"]["group_id"] == "imgs/c.png"          # empty cell: its own group
    assert rows["c.png"]["modality"] == "photo"               # empty cell: --modality
    assert rows["d.png"]["label"] == "nevus"                  # found by trying .png
    assert rows["a.png"]["image_id"] == image_id_for("derm", "imgs/a.png")
    with ws.read() as con:
        reasons = dict(con.execute("SELECT path, reason FROM skipped").fetchall())
    missing = [r for p, r in reasons.items() if p.endswith("missing.png")]
    assert len(missing) == 1 and "row 6" in missing[0] and "file not found" in missing[0]
    assert any("row 7 has no value" in r for r in reasons.values())
    assert any(r.startswith("duplicate entry") for r in reasons.values())


def test_csv_defaults_image_root_to_csv_folder_and_common_names(ws: Workspace, tmp_path: Path) -> None:
    write_image(tmp_path / "x1.png", SEED)
    write_image(tmp_path / "x2.png", SEED + 1)
    manifest = write_csv(tmp_path / "labels.csv", ["filename", "class", "split", "patient_id"],
                         [["x1.png", "a", "train", "7"], ["x2.png", "b", "test", "7"]])
    ingest(ws, "simple", manifest, "csv", progress=False)
    rows = images(ws, "simple")
    assert (rows["x1.png"]["label"], rows["x2.png"]["label"]) == ("a", "b")
    assert (rows["x1.png"]["split"], rows["x2.png"]["split"]) == ("train", "test")
    assert rows["x1.png"]["group_id"] == rows["x2.png"]["group_id"] == "7"


def test_csv_ham10000_layout(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "ham"
    ids = ["ISIC_0027419", "ISIC_0025030", "ISIC_0026769", "ISIC_0025661"]
    for i, image_id in enumerate(ids):
        part = "HAM10000_images_part_1" if i < 2 else "HAM10000_images_part_2"
        write_image(root / part / f"{image_id}.jpg", SEED + i, fmt="JPEG")
    manifest = write_csv(root / "HAM10000_metadata.csv",
                         ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], [
                             ["HAM_0000118", ids[0], "bkl", "histo", "80.0", "male", "scalp"],
                             ["HAM_0000118", ids[1], "bkl", "histo", "80.0", "male", "scalp"],
                             ["HAM_0002730", ids[2], "mel", "histo", "80.0", "male", "scalp"],
                             ["HAM_0001466", ids[3], "nv", "follow_up", "75.0", "male", "ear"],
                             ["HAM_0001467", "ISIC_9999999", "nv", "follow_up", "75.0", "male", "ear"],
                         ])
    report = ingest(ws, "ham", manifest, "csv", progress=False)
    assert (report.ingested, report.skipped) == (4, 1)
    rows = images(ws, "ham")
    assert rows["ISIC_0027419.jpg"]["label"] == "bkl"
    assert rows["ISIC_0027419.jpg"]["group_id"] == rows["ISIC_0025030.jpg"]["group_id"] == "HAM_0000118"
    assert rows["ISIC_0026769.jpg"]["label"] == "mel"
    assert {r["modality"] for r in rows.values()} == {"dermoscopy"}
    assert rows["ISIC_0025661.jpg"]["image_id"] == image_id_for("ham", "ISIC_0025661")
    assert "file not found" in skipped(ws, "ham")["ISIC_9999999"]


def test_csv_isic_one_hot_layout(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "isic2019"
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    hot = {"ISIC_0000000": "NV", "ISIC_0000001": "MEL", "ISIC_0000002": "SCC"}
    rows = []
    for i, (image, label) in enumerate(hot.items()):
        write_image(root / "ISIC_2019_Training_Input" / f"{image}.jpg", SEED + i, fmt="JPEG")
        rows.append([image, *("1.0" if c == label else "0.0" for c in classes)])
    write_image(root / "ISIC_2019_Training_Input" / "ISIC_0000003.jpg", SEED + 5, fmt="JPEG")
    rows.append(["ISIC_0000003", *("0.0" for _ in classes)])           # no class: skipped
    manifest = write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *classes], rows)
    report = ingest(ws, "isic", manifest, "csv", progress=False)
    assert (report.ingested, report.skipped) == (3, 1)
    got = {n: r["label"] for n, r in images(ws, "isic").items()}
    assert got == {f"{k}.jpg": v for k, v in hot.items()}
    assert "no class column holds 1" in skipped(ws, "isic")["ISIC_0000003.jpg"]

    # --ext overrides the layout's .jpg.
    for image in hot:
        Image.open(root / "ISIC_2019_Training_Input" / f"{image}.jpg").save(root / f"{image}.png")
    ingest(ws, "isic-png", manifest, "csv", IngestOptions(extension="png"), progress=False)
    assert sorted(images(ws, "isic-png")) == sorted(f"{k}.png" for k in hot)


def test_csv_two_spellings_of_one_file_are_one_image(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "data"
    a = write_image(root / "x" / "a.png", SEED)
    write_image(root / "x" / "b.png", SEED + 1)
    (root / "alias").symlink_to(root / "x", target_is_directory=True)
    manifest = write_csv(root / "lists" / "m.csv", ["path", "label"], [
        ["x/b.png", "benign"],
        ["lists/../x/a.png", "benign"],
        [str(a), "malignant"],                 # absolute spelling of the same file, other label
        ["alias/b.png", "benign"],             # through a folder symlink, same label
    ])
    report = ingest(ws, "two", manifest, "csv", IngestOptions(image_root=root), progress=False)
    assert (report.ingested, report.skipped, report.total) == (2, 2, 2)
    rows = images(ws, "two")
    assert rows["a.png"]["image_id"] == image_id_for("two", "x/a.png") and rows["a.png"]["label"] == "benign"
    assert rows["b.png"]["image_id"] == image_id_for("two", "x/b.png")
    with ws.read() as con:
        reasons = [r for (r,) in con.execute("SELECT reason FROM skipped").fetchall()]
    assert all(r.startswith("duplicate entry") for r in reasons)
    assert sum("listed twice, as 'benign' and 'malignant'; keep one row" in r for r in reasons) == 1


def test_csv_keys_outside_the_root_are_absolute_and_bare_ids_keep_theirs(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "ham"
    write_image(root / "part_1" / "ISIC_1.jpg", SEED, fmt="JPEG")
    c = write_image(tmp_path / "elsewhere" / "c.png", SEED + 1)
    manifest = write_csv(root / "m.csv", ["image_id", "dx"], [
        ["ISIC_1", "nv"],                      # a bare id, found one subfolder down
        ["part_1/ISIC_1.jpg", "mel"],          # the same file by its path
        ["../elsewhere/c.png", "nv"],          # outside the image root
    ])
    report = ingest(ws, "h", manifest, "csv", progress=False)
    assert (report.ingested, report.skipped) == (2, 1)
    rows = images(ws, "h")
    assert rows["ISIC_1.jpg"]["image_id"] == image_id_for("h", "ISIC_1")
    assert rows["ISIC_1.jpg"]["label"] == "nv"
    assert rows["c.png"]["image_id"] == image_id_for("h", str(c.resolve()))
    assert "as 'nv' and 'mel'" in skipped(ws, "h")["ISIC_1.jpg"]


def test_csv_errors_name_the_columns(ws: Workspace, tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "m.csv", ["a", "b"], [["1", "2"]])
    with pytest.raises(VlmindexError, match="--path-col"):
        ingest(ws, "m", manifest, "csv", progress=False)
    with pytest.raises(VlmindexError, match=r"'nope' \(--label-col\).*columns are: a, b"):
        ingest(ws, "m", manifest, "csv", IngestOptions(path_col="a", label_col="nope"), progress=False)
    with pytest.raises(VlmindexError, match="expects the manifest file"):
        ingest(ws, "m", tmp_path, "csv", progress=False)


# -- medmnist ------------------------------------------------------------------------------------
def write_npz(path: Path, n: dict[str, int], size: int, rgb: bool, n_classes: int, seed: int,
              labels_shape: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays, out = {}, {}
    for split, k in n.items():
        shape = (k, size, size, 3) if rgb else (k, size, size)
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        y = rng.integers(0, n_classes, (k, labels_shape)).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
        out[split] = (x, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return out


@pytest.mark.parametrize(
    ("flavour", "rgb", "n_classes", "modality", "first_names"),
    [
        ("dermamnist", True, 7, "dermoscopy",
         ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma"]),
        ("breastmnist", False, 2, "ultrasound", ["malignant", "normal, benign"]),
        ("pneumoniamnist", False, 2, "xray", ["normal", "pneumonia"]),
        ("bloodmnist", True, 8, "microscopy", ["basophil", "eosinophil"]),
    ],
)
def test_medmnist_flavours(ws: Workspace, tmp_path: Path, flavour: str, rgb: bool, n_classes: int,
                           modality: str, first_names: list[str]) -> None:
    src = tmp_path / f"{flavour}_64.npz"
    data = write_npz(src, {"train": 6, "val": 2, "test": 3}, 64, rgb, n_classes, SEED)
    report = ingest(ws, flavour, src, "medmnist", progress=False)
    assert (report.ingested, report.skipped, report.total) == (11, 0, 11)
    with ws.read() as con:
        rows = con.execute(
            "SELECT split, path, source_path, label, modality, width, height, group_id FROM images "
            "ORDER BY split, path").fetchall()
    assert {r[0] for r in rows} == {"train", "val", "test"}
    assert {r[4] for r in rows} == {modality}
    assert {(r[5], r[6]) for r in rows} == {(64, 64)}
    by_source = {r[2]: r for r in rows}
    x, y = data["train"]
    row = by_source[f"{src.resolve()}#train[1]"]
    assert Path(row[1]).name == "1.png" and Path(row[1]).parent.name == "train"
    pixels = np.asarray(Image.open(row[1]))
    assert np.array_equal(pixels, x[1])                      # lossless, same orientation
    assert row[7] == "train/1"                               # no patient ids: each image alone
    from vlmindex.datasets.medmnist import LABELS

    names = LABELS[flavour]
    assert names[:2] == first_names and len(names) == n_classes
    for i in range(6):
        assert by_source[f"{src.resolve()}#train[{i}]"][3] == names[int(y[i, 0])]


def test_medmnist_reingest_keeps_pngs_and_ids(ws: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "dermamnist_28.npz"
    write_npz(src, {"train": 4, "test": 2}, 28, True, 7, SEED)
    ingest(ws, "d", src, "medmnist", progress=False)
    out = ws.images_dir("d")
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(mtimes) == 6
    with ws.read() as con:
        before = sorted(con.execute("SELECT image_id, path FROM images").fetchall())
    report = ingest(ws, "d", src, "medmnist", progress=False)
    assert report.total == 6
    with ws.read() as con:
        assert sorted(con.execute("SELECT image_id, path FROM images").fetchall()) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    assert not list(out.rglob(".*.tmp"))


def test_medmnist_flavour_flag_unknown_flavour_and_bad_labels(ws: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "cells.npz"
    data = write_npz(src, {"train": 5}, 28, True, 8, SEED)
    ingest(ws, "blood", src, "medmnist", IngestOptions(flavour="BloodMNIST"), progress=False)
    y = data["train"][1][:, 0]
    from vlmindex.datasets.medmnist import LABELS

    with ws.read() as con:
        got = dict(con.execute("SELECT source_path, label FROM images WHERE dataset='blood'").fetchall())
    assert [got[f"{src.resolve()}#train[{i}]"] for i in range(5)] == [LABELS["bloodmnist"][k] for k in y]

    odd = tmp_path / "mystery.npz"
    data = write_npz(odd, {"train": 4}, 28, False, 3, SEED + 1)
    report = ingest(ws, "odd", odd, "medmnist", progress=False)
    assert report.total == 4
    with ws.read() as con:
        labels = {r[0] for r in con.execute("SELECT label FROM images WHERE dataset='odd'").fetchall()}
        opts = json.loads(con.execute("SELECT options FROM datasets WHERE name='odd'").fetchone()[0])
    assert labels == {str(int(v)) for v in data["train"][1][:, 0]}
    assert "cannot tell the MedMNIST flavour from the name 'mystery.npz'" in opts["extra"]["note"]

    bad = tmp_path / "pneumoniamnist.npz"
    np.savez(bad, train_images=np.random.default_rng(SEED).integers(0, 256, (3, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [5]]))
    report = ingest(ws, "pn", bad, "medmnist", progress=False)
    assert (report.ingested, report.skipped) == (2, 1)
    assert "label 5 is not a pneumoniamnist class" in skipped(ws, "pn")["pneumoniamnist.npz#train[2]"]


def test_medmnist_multilabel_is_refused_and_catalog_untouched(ws: Workspace, tmp_path: Path) -> None:
    good = tmp_path / "breastmnist.npz"
    write_npz(good, {"train": 3}, 28, False, 2, SEED)
    ingest(ws, "b", good, "medmnist", progress=False)
    chest = tmp_path / "chestmnist_64.npz"
    write_npz(chest, {"train": 3}, 64, False, 2, SEED, labels_shape=14)
    with pytest.raises(VlmindexError, match="multi-label"):
        ingest(ws, "b", chest, "medmnist", replace=True, progress=False)
    # Same shape under an unknown name: refused by the label array's shape.
    other = tmp_path / "findings.npz"
    shutil.copy(chest, other)
    with pytest.raises(VlmindexError, match="multi-label"):
        ingest(ws, "b", other, "medmnist", replace=True, progress=False)
    # The failed --replace rolled back: the first ingest is intact.
    assert count(ws, "SELECT count(*) FROM images WHERE dataset = 'b'") == 3
    assert count(ws, "SELECT n_images FROM datasets WHERE name = 'b'") == 3
    notmed = tmp_path / "plain.npz"
    np.savez(notmed, x=np.zeros(3))
    with pytest.raises(VlmindexError, match="MedMNIST file"):
        ingest(ws, "p", notmed, "medmnist", progress=False)
    vol = tmp_path / "organmnist3d.npz"
    np.savez(vol, train_images=np.zeros((2, 28, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(VlmindexError, match="3-D"):
        ingest(ws, "v", vol, "medmnist", progress=False)


def _npz(path: Path, **members: np.ndarray | bytes) -> Path:
    """An .npz written member by member, so a test can put a damaged array in it."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in members.items():
            if isinstance(value, bytes):
                zf.writestr(f"{name}.npy", value)
            else:
                buf = io.BytesIO()
                np.save(buf, value)
                zf.writestr(f"{name}.npy", buf.getvalue())
    return path


def _pngs(ws: Workspace, dataset: str) -> list[str]:
    out = ws.images_dir(dataset)
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))


def test_medmnist_inconsistent_split_is_skipped_whole_and_the_rest_ingested(ws: Workspace, tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    src = _npz(tmp_path / "breastmnist.npz",
               train_images=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
               train_labels=np.array([[0], [1], [1], [0]], np.uint8),
               val_images=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
               val_labels=np.array([[0], [1], [0]], np.uint8),                 # 3 labels, 5 images
               test_images=rng.integers(0, 256, (3, 28), dtype=np.uint8),      # no image axes
               test_labels=np.zeros((3, 1), np.uint8))
    report = ingest(ws, "b", src, "medmnist", progress=False)
    assert (report.ingested, report.skipped, report.total) == (4, 2, 4)
    reasons = skipped(ws, "b")
    assert set(reasons) == {"breastmnist.npz#val", "breastmnist.npz#test"}
    assert "3 labels for 5 images" in reasons["breastmnist.npz#val"]
    assert "shape (3, 28)" in reasons["breastmnist.npz#test"]
    assert _pngs(ws, "b") == [f"train/{i}.png" for i in range(4)]   # nothing of the skipped splits


def test_medmnist_unreadable_or_unpaired_member_skips_its_split(ws: Workspace, tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    src = _npz(tmp_path / "pneumoniamnist_28.npz",
               train_images=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
               train_labels=np.array([0, 1, 1], np.uint8),
               val_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
               val_labels=b"this is not a .npy array",
               test_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8))    # no test_labels
    report = ingest(ws, "p", src, "medmnist", progress=False)
    assert (report.ingested, report.skipped) == (3, 2)
    reasons = skipped(ws, "p")
    assert set(reasons) == {"pneumoniamnist_28.npz#val", "pneumoniamnist_28.npz#test"}
    assert "val_labels.npy" in reasons["pneumoniamnist_28.npz#val"]
    assert "test_labels.npy" in reasons["pneumoniamnist_28.npz#test"]
    assert _pngs(ws, "p") == ["train/0.png", "train/1.png", "train/2.png"]


def test_medmnist_bad_label_skips_only_its_row(ws: Workspace, tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    src = _npz(tmp_path / "breastmnist_64.npz",
               train_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
               train_labels=np.array([[1], [0]], np.int64),
               val_images=rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8),
               val_labels=np.array([[0.0], [1.0], [np.nan], [0.5], [7.0]]),
               test_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
               test_labels=np.array([[-1], [1]], np.int8))
    report = ingest(ws, "b", src, "medmnist", progress=False)
    assert (report.ingested, report.skipped) == (5, 4)
    reasons = skipped(ws, "b")
    assert set(reasons) == {"breastmnist_64.npz#val[2]", "breastmnist_64.npz#val[3]",
                            "breastmnist_64.npz#val[4]", "breastmnist_64.npz#test[0]"}
    assert "NaN" in reasons["breastmnist_64.npz#val[2]"]
    assert "not an integer" in reasons["breastmnist_64.npz#val[3]"]
    assert "label 7 is not a breastmnist class" in reasons["breastmnist_64.npz#val[4]"]
    assert "label -1 is not a breastmnist class" in reasons["breastmnist_64.npz#test[0]"]
    assert _pngs(ws, "b") == ["test/1.png", "train/0.png", "train/1.png", "val/0.png", "val/1.png"]
    with ws.read() as con:
        labels = dict(con.execute("SELECT source_path, label FROM images").fetchall())
    assert labels[f"{src.resolve()}#val[1]"] == "normal, benign"

    # Without class names a label must still be a whole number of 0 or more.
    odd = _npz(tmp_path / "mystery.npz", train_images=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
               train_labels=np.array([2.0, np.nan, -3.0]))
    report = ingest(ws, "odd", odd, "medmnist", progress=False)
    assert (report.ingested, report.skipped) == (1, 2)
    assert set(skipped(ws, "odd")) == {"mystery.npz#train[1]", "mystery.npz#train[2]"}


# -- dicom ---------------------------------------------------------------------------------------
def dicom_sample(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)  # files bundled with pydicom: never the network
    assert path is not None, f"pydicom no longer bundles {name}"
    return Path(path)


def _minmax8(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


@pytest.fixture
def dicom_dir(tmp_path: Path) -> Path:
    root = tmp_path / "dicom"
    (root / "train" / "benign").mkdir(parents=True)
    (root / "train" / "malignant").mkdir(parents=True)
    (root / "test" / "benign").mkdir(parents=True)
    shutil.copy(dicom_sample("CT_small.dcm"), root / "train" / "benign" / "ct")          # no extension
    shutil.copy(dicom_sample("MR_small.dcm"), root / "train" / "malignant" / "mr.dcm")
    shutil.copy(dicom_sample("examples_rgb_color.dcm"), root / "train" / "malignant" / "us.dcm")
    shutil.copy(dicom_sample("SC_rgb_rle_2frame.dcm"), root / "test" / "benign" / "two_frames.dcm")
    shutil.copy(dicom_sample("examples_palette.dcm"), root / "test" / "benign" / "palette.dcm")
    shutil.copy(dicom_sample("rtplan.dcm"), root / "test" / "benign" / "plan.dcm")
    shutil.copy(dicom_sample("MR_truncated.dcm"), root / "test" / "benign" / "truncated.dcm")
    (root / "test" / "benign" / "README.txt").write_text("scanner notes\n")
    ds = pydicom.dcmread(dicom_sample("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(root / "test" / "benign" / "mono1.dcm")
    return root


def test_dicom_folder(ws: Workspace, dicom_dir: Path) -> None:
    report = ingest(ws, "dcm", dicom_dir, "dicom", progress=False)
    assert (report.ingested, report.skipped) == (6, 3)
    rows = images(ws, "dcm")
    assert sorted(rows) == ["ct.png", "mono1.dcm.png", "mr.dcm.png", "palette.dcm.png",
                            "two_frames.dcm.png", "us.dcm.png"]
    ct, mr = rows["ct.png"], rows["mr.dcm.png"]
    assert (ct["label"], ct["split"], ct["modality"], ct["group_id"]) == ("benign", "train", "ct", "1CT1")
    assert (mr["label"], mr["split"], mr["modality"], mr["group_id"]) == ("malignant", "train", "mri", "4MR1")
    assert rows["palette.dcm.png"]["split"] == "test"
    assert ct["source_path"] == str((dicom_dir / "train" / "benign" / "ct").resolve())
    assert ct["image_id"] == image_id_for("dcm", "train/benign/ct")
    assert Path(ct["path"]).is_relative_to(ws.images_dir("dcm"))

    reasons = skipped(ws, "dcm")
    assert set(reasons) == {"plan.dcm", "truncated.dcm", "README.txt"}
    assert reasons["plan.dcm"].startswith("DICOM without pixel data")
    assert reasons["README.txt"] == "not a DICOM file"
    assert reasons["truncated.dcm"].startswith("cannot decode DICOM pixel data")

    # CT: 16-bit signed, rescaled to HU, no window -> the slice's own min..max onto 0..255.
    ds = pydicom.dcmread(dicom_sample("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ct_png = np.asarray(Image.open(ct["path"]))
    assert ct_png.dtype == np.uint8 and ct_png.shape == (128, 128)
    assert np.abs(ct_png.astype(int) - _minmax8(hu)).max() <= 1

    # MR: the stored window (LINEAR, PS3.3 C.11.2.1.2.1) decides the grey levels.
    ds = pydicom.dcmread(dicom_sample("MR_small.dcm"))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float64)
    expected = np.rint(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)
    mr_png = np.asarray(Image.open(mr["path"])).astype(int)
    assert np.abs(mr_png - expected).max() <= 1
    assert np.abs(mr_png - _minmax8(x)).max() > 10          # ... not the slice's min..max

    # MONOCHROME1 is displayed inverted.
    mono1 = np.asarray(Image.open(rows["mono1.dcm.png"]["path"])).astype(int)
    assert np.array_equal(mono1, 255 - mr_png)

    # Colour stays colour; a multi-frame file gives its middle frame.
    us = Image.open(rows["us.dcm.png"]["path"])
    assert us.mode == "RGB" and us.size == (320, 240)
    assert np.array_equal(np.asarray(us), pydicom.dcmread(dicom_sample("examples_rgb_color.dcm")).pixel_array)
    frames = pydicom.dcmread(dicom_sample("SC_rgb_rle_2frame.dcm")).pixel_array
    two = np.asarray(Image.open(rows["two_frames.dcm.png"]["path"]))
    assert np.array_equal(two, frames[1]) and not np.array_equal(two, frames[0])
    assert Image.open(rows["palette.dcm.png"]["path"]).mode == "RGB"


def test_dicom_window_16bit_colour_and_no_preamble(ws: Workspace, tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    ds = pydicom.dcmread(dicom_sample("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400                # abdominal window, in HU
    ds.save_as(root / "windowed.dcm")
    shutil.copy(dicom_sample("SC_rgb_rle_16bit.dcm"), root / "rgb16.dcm")
    # Old archives: no 128-byte preamble, no file meta header, no extension.
    bare = pydicom.dcmread(dicom_sample("MR_small.dcm"))
    bare.preamble = None
    bare.file_meta = pydicom.dataset.FileMetaDataset()
    bare.save_as(root / "IM0001", enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert (root / "IM0001").read_bytes()[128:132] != b"DICM"
    ingest(ws, "w", root, "dicom", IngestOptions(modality="ct-test"), progress=False)
    rows = images(ws, "w")
    assert sorted(rows) == ["IM0001.png", "rgb16.dcm.png", "windowed.dcm.png"]
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint(np.clip((hu - 39.5) / 399 + 0.5, 0, 1) * 255)
    got = np.asarray(Image.open(rows["windowed.dcm.png"]["path"])).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert {r["modality"] for r in rows.values()} == {"ct-test"}
    assert {r["label"] for r in rows.values()} == {None}     # files directly in SOURCE: no class
    rgb16 = pydicom.dcmread(dicom_sample("SC_rgb_rle_16bit.dcm")).pixel_array
    got = np.asarray(Image.open(rows["rgb16.dcm.png"]["path"])).astype(int)
    assert np.abs(got - np.rint(rgb16 / 65535 * 255)).max() <= 1


def test_dicom_labels_csv_and_reingest(ws: Workspace, dicom_dir: Path, tmp_path: Path) -> None:
    labels = write_csv(tmp_path / "labels.csv", ["path", "label"], [
        ["train/benign/ct", "tumour"],
        ["mr.dcm", "healthy"],                          # a bare file name matches too
    ])
    opts = IngestOptions(labels_csv=labels, group_regex=r"^(two)_")
    ingest(ws, "dl", dicom_dir, "dicom", opts, progress=False)
    rows = images(ws, "dl")
    assert rows["ct.png"]["label"] == "tumour" and rows["mr.dcm.png"]["label"] == "healthy"
    assert rows["us.dcm.png"]["label"] is None                # not in the labels file
    assert rows["ct.png"]["split"] == "train"                 # split still from the folders
    assert rows["two_frames.dcm.png"]["group_id"] == "two"    # --group-regex beats PatientID

    out = ws.images_dir("dl")
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    ids = {n: r["image_id"] for n, r in rows.items()}
    report = ingest(ws, "dl", dicom_dir, "dicom", opts, progress=False)
    assert report.total == 6 and report.skipped == 3
    assert {n: r["image_id"] for n, r in images(ws, "dl").items()} == ids
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes

    bad = write_csv(tmp_path / "bad.csv", ["file", "class"], [["x", "y"]])
    with pytest.raises(VlmindexError, match="path and label columns"):
        ingest(ws, "dl2", dicom_dir, "dicom", IngestOptions(labels_csv=bad), progress=False)


def test_dicom_does_not_follow_symlinks_out_of_source(ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "scanner_export"
    outside.mkdir()
    shutil.copy(dicom_sample("CT_small.dcm"), outside / "ct.dcm")
    root = tmp_path / "d"
    (root / "benign").mkdir(parents=True)
    shutil.copy(dicom_sample("MR_small.dcm"), root / "benign" / "mr.dcm")
    (root / "malignant").symlink_to(outside, target_is_directory=True)
    report = ingest(ws, "d", root, "dicom", progress=False)
    assert sorted(images(ws, "d")) == ["mr.dcm.png"] and report.skipped == 1
    assert "leaves SOURCE; not followed (pass --follow-symlinks)" in skipped(ws, "d")["malignant"]
    ingest(ws, "d2", root, "dicom", IngestOptions(follow_symlinks=True), progress=False)
    assert sorted(images(ws, "d2")) == ["ct.dcm.png", "mr.dcm.png"]


# -- concurrency ---------------------------------------------------------------------------------
def test_busy_workspace_is_refused_cleanly(ws: Workspace, kermany: Path) -> None:
    ingest(ws, "k", kermany, "imagefolder", progress=False)
    with ws.write() as con, pytest.raises(WorkspaceBusy, match="busy"):
        con.execute("SELECT 1")
        ingest(ws, "k2", kermany, "imagefolder", progress=False)
    assert count(ws, "SELECT count(*) FROM images") == 6
    assert count(ws, "SELECT count(*) FROM datasets WHERE name = 'k2'") == 0
