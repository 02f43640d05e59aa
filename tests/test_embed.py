"""The embedding pipeline: cached, resumable after SIGKILL, shardable, import/export round trip."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmindex.catalog import parts as store
from vlmindex.catalog.workspace import Workspace
from vlmindex.embed import EmbedOptions, embed, parse_shard
from vlmindex.errors import VlmindexError

OFFLINE = ["raw-pixels", "color-hist", "hog", "untrained-vit-tiny"]


def almost_flat(size: tuple[int, int], colour: tuple[int, int, int]):
    """A flat colour with one odd pixel: ingest skips wholly uniform images as blank."""
    from PIL import Image

    img = Image.new("RGB", size, colour)
    img.putpixel((0, 0), tuple(255 - c for c in colour))
    return img


def catalog_ids(ws: Workspace, dataset: str = "demo") -> np.ndarray:
    with ws.read() as con:
        return np.array(sorted(r[0] for r in con.execute(
            "SELECT image_id FROM images WHERE dataset = ?", [dataset]).fetchall()), dtype=np.int64)


@pytest.mark.parametrize("model", OFFLINE)
def test_every_offline_extractor_end_to_end_from_cli(vlm, synth_ws, model):
    first = vlm(synth_ws, "embed", "--model", model, "--dataset", "demo", "--workers", "1")
    assert "embedded 72 images" in first.out
    second = vlm(synth_ws, "embed", "--model", model, "--dataset", "demo")
    assert "already embedded (72 images); nothing to do" in second.out
    ws = Workspace(synth_ws)
    ids, vectors = store.read_embeddings(ws.embeddings_dir(model, "demo"))
    assert np.array_equal(ids, catalog_ids(ws))
    assert np.isfinite(vectors).all() and vectors.shape[1] > 1
    with ws.read() as con:
        runs = con.execute("SELECT n, total, dim, preprocessing, versions FROM runs WHERE model = ?",
                           [model]).fetchall()
    assert len(runs) == 1 and runs[0][0] == 72 and runs[0][2] == vectors.shape[1]
    assert json.loads(runs[0][4])["torch"]


def test_embeddings_view_and_float16(synth_ws, vlm):
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--dtype", "float16", "--workers", "0")
    out = vlm(synth_ws, "sql", "SELECT model, count(*) AS n, max(len(embedding)) AS dim FROM embeddings "
              "GROUP BY model", "--format", "json").out
    assert json.loads(out) == [{"model": "raw-pixels", "n": 72, "dim": json.loads(out)[0]["dim"]}]
    part = store.part_paths(Workspace(synth_ws).embeddings_dir("raw-pixels", "demo"))[0]
    assert pq.read_schema(part).field("embedding").type.value_type == pa.float16()


def test_new_images_are_the_only_ones_embedded_next_time(synth_ws):
    ws = Workspace(synth_ws)
    embed(ws, "raw-pixels", "demo", options=EmbedOptions(split="train", num_workers=0, progress=False))
    report = embed(ws, "raw-pixels", "demo", options=EmbedOptions(num_workers=0, progress=False))
    with ws.read() as con:
        n_test = con.execute("SELECT count(*) FROM images WHERE split = 'test'").fetchone()[0]
    assert report.embedded == n_test and report.total == 72


def test_two_shards_equal_one_run(synth_ws, tmp_path):
    ws = Workspace(synth_ws)
    opts = dict(num_workers=0, progress=False)
    r0 = embed(ws, "hog", "demo", "clean", EmbedOptions(shard=(0, 2), **opts))
    r1 = embed(ws, "hog", "demo", "clean", EmbedOptions(shard=(1, 2), **opts))
    assert r0.embedded > 0 and r1.embedded > 0 and r0.embedded + r1.embedded == 72
    sharded_ids, sharded = store.read_embeddings(ws.embeddings_dir("hog", "demo"))

    other = tmp_path / "single"
    other.mkdir()
    (other / "catalog.duckdb").write_bytes((synth_ws / "catalog.duckdb").read_bytes())
    embed(Workspace(other), "hog", "demo", "clean", EmbedOptions(**opts))
    single_ids, single = store.read_embeddings(Workspace(other).embeddings_dir("hog", "demo"))
    assert np.array_equal(sharded_ids, single_ids)
    np.testing.assert_array_equal(sharded, single)
    assert embed(ws, "hog", "demo", "clean", EmbedOptions(**opts)).cached


def test_parse_shard_rejects_bad_values():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "a/b", "3"):
        with pytest.raises(VlmindexError):
            parse_shard(bad)


def test_sigkill_midway_then_resume_gives_one_embedding_per_image(synth_ws):
    """Kill -9 a running embed after its first part lands; the restart finishes the rest exactly once."""
    ws = Workspace(synth_ws)
    # ViT-B/16 on the CPU takes seconds for the 24 test images: time enough to land a kill between parts.
    model = "untrained-vit-b16"
    out_dir = ws.embeddings_dir(model, "demo")
    cmd = [sys.executable, "-m", "vlmindex", "-w", str(synth_ws), "embed", "-m", model,
           "-d", "demo", "--split", "test", "--batch-size", "2", "--part-size", "2", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(store.part_paths(out_dir)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(store.stored_ids(out_dir))
    with ws.read() as con:
        test_ids = np.array(sorted(r[0] for r in con.execute(
            "SELECT image_id FROM images WHERE split = 'test'").fetchall()))
    assert 0 < done_before < len(test_ids), "the kill should land midway"

    report = embed(ws, model, "demo", options=EmbedOptions(split="test", num_workers=0, progress=False))
    assert report.embedded == len(test_ids) - done_before
    ids = np.concatenate([pq.read_table(p, columns=["image_id"])["image_id"].to_numpy()
                          for p in store.part_paths(out_dir)])
    assert len(ids) == len(test_ids) and len(np.unique(ids)) == len(ids)
    assert np.array_equal(np.sort(ids), test_ids)
    assert not list(out_dir.glob(".*.tmp"))


def test_unknown_model_and_dataset_are_one_line_errors(vlm, synth_ws):
    bad = vlm(synth_ws, "embed", "-m", "no-such-model", "-d", "demo", expect=1)
    assert bad.err.startswith("Error: ") and "no-such-model" in bad.err and "Traceback" not in bad.err
    bad = vlm(synth_ws, "embed", "-m", "hog", "-d", "nope", expect=1)
    assert "unknown dataset 'nope'" in bad.err and len(bad.err.strip().splitlines()) == 1


def test_import_export_round_trip(vlm, synth_ws, tmp_path):
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    ws = Workspace(synth_ws)
    ids, vectors = store.read_embeddings(ws.embeddings_dir("raw-pixels", "demo"))
    out = tmp_path / "feats.parquet"
    vlm(synth_ws, "embeddings", "export", str(out), "-m", "raw-pixels", "-d", "demo")
    assert pq.read_table(out).column_names == ["image_id", "path", "label", "embedding"]

    # by path, through Parquet
    table = pq.read_table(out).drop(["image_id"])
    by_path = tmp_path / "by_path.parquet"
    pq.write_table(table, by_path)
    vlm(synth_ws, "embeddings", "import", str(by_path), "-m", "elsewhere", "-d", "demo")
    got_ids, got = store.read_embeddings(ws.embeddings_dir("elsewhere", "demo"))
    assert np.array_equal(got_ids, ids)
    np.testing.assert_allclose(got, vectors, rtol=0, atol=0)

    # NPY + id file
    npy = tmp_path / "feats.npy"
    vlm(synth_ws, "embeddings", "export", str(npy), "-m", "raw-pixels", "-d", "demo")
    vlm(synth_ws, "embeddings", "import", str(npy), "--ids", f"{npy}.ids.txt", "-m", "npy-model", "-d", "demo")
    got_ids, got = store.read_embeddings(ws.embeddings_dir("npy-model", "demo"))
    assert np.array_equal(got_ids, ids) and np.array_equal(got, vectors)

    # bad inputs: one line, non-zero
    bad = vlm(synth_ws, "embeddings", "import", str(npy), "-m", "x", "-d", "demo", expect=1)
    assert "--ids" in bad.err
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image_id": [1, 2], "embedding": [[0.0, 1.0], [1.0, 0.0]]}), wrong)
    bad = vlm(synth_ws, "embeddings", "import", str(wrong), "-m", "x", "-d", "demo", expect=1)
    assert "not in dataset 'demo'" in bad.err


def test_replacing_or_removing_a_condition_drops_what_was_computed_from_it(vlm, synth_ws):
    vlm(synth_ws, "overlay", "add", "demo", "lbl", "--text", "label")
    for cond in ("clean", "lbl"):
        vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "-c", cond, "--workers", "0")
        vlm(synth_ws, "analyze", "-m", "raw-pixels", "-d", "demo", "-c", cond, "--no-probe")
    ws = Workspace(synth_ws)
    vlm(synth_ws, "overlay", "add", "demo", "lbl", "--text", "wrong-label", "--replace")
    assert not store.part_paths(ws.embeddings_dir("raw-pixels", "demo", "lbl"))
    assert len(store.stored_ids(ws.embeddings_dir("raw-pixels", "demo", "clean"))) == 72
    with ws.read() as con:
        assert con.execute("SELECT DISTINCT condition FROM summaries").fetchall() == [("clean",)]
    again = vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "-c", "lbl", "--workers", "0")
    assert "embedded 72 images" in again.out
    vlm(synth_ws, "overlay", "remove", "demo", "lbl")
    assert not store.part_paths(ws.embeddings_dir("raw-pixels", "demo", "lbl"))


def test_changed_files_need_replace_which_drops_old_embeddings(vlm, tmp_path):

    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            almost_flat((16, 16), (40 * i, 100 if cls == "a" else 200, 0)).save(src / cls / f"{i}.png")
    ws_dir = tmp_path / "ws"
    vlm(ws_dir, "ingest", "f", src, "--format", "imagefolder")
    vlm(ws_dir, "embed", "-m", "raw-pixels", "-d", "f", "--workers", "0")
    almost_flat((16, 16), (255, 255, 255)).save(src / "a" / "0.png")
    res = vlm(ws_dir, "ingest", "f", src, "--format", "imagefolder", expect=1)
    assert "changed since it was ingested" in res.err and "--replace" in res.err
    other = tmp_path / "other"
    other.mkdir()
    assert "pass --replace" in vlm(ws_dir, "ingest", "f", other, "--format", "imagefolder", expect=1).err
    vlm(ws_dir, "ingest", "f", src, "--format", "imagefolder", "--replace")
    assert not store.part_paths(Workspace(ws_dir).embeddings_dir("raw-pixels", "f"))
    assert "embedded 6 images" in vlm(ws_dir, "embed", "-m", "raw-pixels", "-d", "f", "--workers", "0").out


def test_newest_copy_of_an_image_wins(tmp_path):
    d = tmp_path / "e"
    ids = np.array([1, 2, 3])
    store.write_part(d, model="m", dataset="d", condition="clean", image_ids=ids, embeddings=np.zeros((3, 2)))
    store.write_part(d, model="m", dataset="d", condition="clean", image_ids=ids[:2], embeddings=np.ones((2, 2)))
    got_ids, got = store.read_embeddings(d)
    assert got_ids.tolist() == [1, 2, 3] and got[:, 0].tolist() == [1.0, 1.0, 0.0]


def test_import_by_bare_file_name_refuses_ambiguous_names(vlm, tmp_path):

    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        almost_flat((8, 8), (100, 0, 0) if cls == "a" else (0, 100, 0)).save(src / cls / "0.png")
    ws_dir = tmp_path / "ws"
    vlm(ws_dir, "ingest", "f", src, "--format", "imagefolder")
    feats = tmp_path / "f.parquet"
    pq.write_table(pa.table({"path": ["0.png"], "embedding": [[1.0, 0.0]]}), feats)
    res = vlm(ws_dir, "embeddings", "import", feats, "-m", "x", "-d", "f", expect=1)
    assert "matches 2 images" in res.err
    pq.write_table(pa.table({"path": [str(src / "b" / "0.png")], "embedding": [[1.0, 0.0]]}), feats)
    vlm(ws_dir, "embeddings", "import", feats, "-m", "x", "-d", "f")


def test_resuming_with_other_weights_is_refused(vlm, synth_ws):
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--split", "train", "--workers", "0")
    vlm(synth_ws, "sql", "--write", "UPDATE runs SET weights_sha256 = 'f00d' WHERE model = 'raw-pixels'")
    res = vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0", expect=1)
    assert "embedded with other weights" in res.err and len(res.err.strip().splitlines()) == 1
