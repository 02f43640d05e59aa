"""What a hostile user (or two processes at once) did to the workspace before issue 9, each
reproduced: concurrent embeds, an embed or an analysis overtaken by --replace, damaged indexes,
a deleted part, a failed final catalog write, zero embeddings, and stale text detections."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmindex.catalog import RunKey, parts
from vlmindex.catalog.embeddings import read_run
from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError


def _count(ws: Path, sql: str) -> list[tuple]:
    with Workspace(ws).read() as con:
        return con.execute(sql).fetchall()


def _raw_rows(ws: Path, model: str, dataset: str = "demo", condition: str = "clean") -> np.ndarray:
    """Every image_id row in the run's Parquet parts, current or not."""
    paths = parts.part_paths(Workspace(ws).embeddings_dir(model, dataset, condition))
    if not paths:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([pq.read_table(p, columns=["image_id"])["image_id"].to_numpy() for p in paths])


def _start_embed(ws: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlmindex", "-w", str(ws), "embed", "-d", "demo", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(ws: Path, model: str, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    out_dir = Workspace(ws).embeddings_dir(model, "demo")
    while time.monotonic() < deadline and len(parts.part_paths(out_dir)) < n and proc.poll() is None:
        time.sleep(0.05)


# -- concurrent writers ------------------------------------------------------------------------


def test_two_concurrent_embeds_of_one_model_store_each_image_once(synth_ws, vlm):
    """Two `embed` of one model at once used to leave 576 rows for 288 images in `embeddings`."""
    model = "untrained-vit-b16"  # slow enough on the CPU that the runs overlap
    # the test split only (a quarter of the images): the same race, in a quarter of the time
    slow = ("-m", model, "--split", "test", "--batch-size", "2", "--part-size", "2", "--workers", "0")
    first = _start_embed(synth_ws, *slow)
    _wait_for_parts(synth_ws, model, 1, first)
    second = _start_embed(synth_ws, *slow)
    out2, err2 = second.communicate(timeout=300)
    # an overlapping selection (one shard of the same run) is not locked out: its commits dedupe
    shard = _start_embed(synth_ws, *slow, "--shard", "0/2")
    out1, err1 = first.communicate(timeout=600)
    out3, err3 = shard.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert second.returncode == 1 and "already being embedded by pid" in err2 and "Traceback" not in err2
    assert shard.returncode == 0, err3
    n_images = _count(synth_ws, "SELECT count(*) FROM images WHERE split = 'test'")[0][0]
    assert _count(synth_ws, f"SELECT count(*), count(DISTINCT image_id) FROM embeddings WHERE model = '{model}'") \
        == [(n_images, n_images)]
    raw = _raw_rows(synth_ws, model)
    assert len(raw) == n_images == len(np.unique(raw)), "a Parquet part holds a second copy of an image"


def _make_folder(root: Path, seed: int, n: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("benign", "malignant"):
        for i in range(n):
            p = root / cls / f"{cls}_{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(p)
    return root


def test_embed_overtaken_by_ingest_replace_stores_no_vector_of_the_old_pixels(tmp_path):
    """`embed` during `ingest NAME SRC --replace` used to keep vectors of the old pixels, silently."""
    from vlmindex.embed import EmbedOptions, embed
    from vlmindex.ingest import ingest
    from vlmindex.models import load_model

    src = _make_folder(tmp_path / "src", seed=1)
    ws = Workspace(tmp_path / "ws")
    ingest(ws, "demo", src, "imagefolder", progress=False)
    extractor = load_model("raw-pixels")
    encode = extractor.encode_image
    calls = []

    def encode_then_replace(batch):
        out = encode(batch)
        if not calls:  # the pixels change under the running embed, once, after its first batch
            _make_folder(src, seed=2)
            ingest(ws, "demo", src, "imagefolder", replace=True, progress=False)
        calls.append(1)
        return out

    extractor.encode_image = encode_then_replace
    opts = EmbedOptions(batch_size=2, part_size=2, num_workers=0, progress=False)
    report = embed(ws, "raw-pixels", "demo", options=opts, extractor=extractor)
    extractor.encode_image = encode
    embed(ws, "raw-pixels", "demo", options=opts, extractor=extractor)  # finishes what was dropped

    fresh = Workspace(tmp_path / "fresh")
    ingest(fresh, "demo", src, "imagefolder", progress=False)
    embed(fresh, "raw-pixels", "demo", options=opts)
    got, want = read_run(ws, RunKey("raw-pixels", "demo")), read_run(fresh, RunKey("raw-pixels", "demo"))
    assert np.array_equal(got.ids, want.ids)
    assert np.array_equal(got.vectors, want.vectors), "a stored vector is of the replaced pixels"
    assert report.changed > 0, "the overtaken embed says that the pixels changed under it"
    with ws.read() as con:
        assert con.execute("SELECT count(*) FROM embeddings").fetchall() == [(8,)]
        # no "changed since it was ingested" row is left for images that are fine now
        assert con.execute("SELECT count(*) FROM skipped WHERE stage = 'embed'").fetchall() == [(0,)]


def test_analyze_overtaken_by_synth_replace_stores_nothing(synth_ws, monkeypatch):
    """`analyze` during `synth NAME --replace` used to store metrics of dropped embeddings."""
    from conftest import SMALL_SYNTH

    from vlmindex import metrics
    from vlmindex.analyze import AnalyzeOptions, analyze
    from vlmindex.embed import EmbedOptions, embed
    from vlmindex.ingest import ingest_synthetic

    ws = Workspace(synth_ws)
    embed(ws, "raw-pixels", "demo", options=EmbedOptions(num_workers=0, progress=False))
    original = metrics.retrieval_metrics

    def retrieval_then_replace(*args, **kwargs):
        out = original(*args, **kwargs)
        ingest_synthetic(ws, "demo", seed=0, replace=True, progress=False, **SMALL_SYNTH)
        return out

    monkeypatch.setattr(metrics, "retrieval_metrics", retrieval_then_replace)
    with pytest.raises(VlmindexError, match="changed while it was computed"):
        analyze(ws, "raw-pixels", "demo", options=AnalyzeOptions(k=5, probe=False))
    for table in ("summaries", "query_metrics", "neighbors", "embeddings"):
        assert _count(synth_ws, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert not list(ws.neighbors_dir("raw-pixels", "demo").glob("*.parquet"))


# -- integrity ---------------------------------------------------------------------------------


@pytest.fixture
def indexed(synth_ws, vlm) -> Path:
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    vlm(synth_ws, "index", "build", "-m", "raw-pixels", "-d", "demo")
    return synth_ws


def _query_image(ws: Path) -> tuple[int, str]:
    return _count(ws, "SELECT image_id, path FROM images ORDER BY image_id LIMIT 1")[0]


@pytest.mark.parametrize("damage", ["overwrite 64 bytes", "garbage", "truncated"])
def test_damaged_index_is_detected_by_query_and_rebuilt_by_build(indexed, vlm, damage):
    """A .faiss with 64 bytes overwritten used to answer with wrong neighbours; a garbage one
    was reported 'up to date' by `index build`."""
    path = Workspace(indexed).index_path("raw-pixels", "demo")
    data = bytearray(path.read_bytes())
    if damage == "overwrite 64 bytes":
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(64)
    elif damage == "garbage":
        data = bytearray(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    else:
        data = data[: len(data) // 3]
    path.write_bytes(bytes(data))
    image_id, image = _query_image(indexed)
    bad = vlm(indexed, "query", image, "-m", "raw-pixels", "-d", "demo", "-k", "3", expect=1)
    assert "damaged" in bad.err and "vlmindex index build" in bad.err and "--force" in bad.err
    assert len(bad.err.strip().splitlines()) == 1
    rebuilt = json.loads(vlm(indexed, "index", "build", "-m", "raw-pixels", "-d", "demo", "--format", "json").out)
    assert rebuilt[0]["status"] == "built"
    rows = json.loads(vlm(indexed, "query", image, "-m", "raw-pixels", "-d", "demo", "-k", "3", "--format",
                          "json").out)
    assert rows[0]["image_id"] == image_id and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_deleted_part_stops_analyze_unless_partial_is_allowed(synth_ws, vlm):
    """A Parquet part deleted by hand used to make `analyze` score fewer images and say nothing."""
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0", "--part-size", "32")
    gone = parts.part_paths(Workspace(synth_ws).embeddings_dir("raw-pixels", "demo"))[1]
    n_gone = pq.ParquetFile(gone).metadata.num_rows
    gone.unlink()
    bad = vlm(synth_ws, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "5", "--no-probe", expect=1)
    assert f"{n_gone} of 72 labelled images" in bad.err and "--allow-partial" in bad.err
    assert "vlmindex embed --model raw-pixels --dataset demo" in bad.err
    assert _count(synth_ws, "SELECT count(*) FROM summaries") == [(0,)]
    vlm(synth_ws, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "5", "--no-probe", "--allow-partial")
    board = json.loads(vlm(synth_ws, "sql", "leaderboard", "--format", "json").out)
    assert board[0]["n_queries"] == 72 - n_gone
    assert f"partial({n_gone} images without embedding)" in board[0]["scope"]


def test_failed_final_write_of_embed_is_recorded_from_the_parts_next_time(synth_ws, vlm, monkeypatch):
    """When the catalog refused embed's last write (the `runs` row), the rerun said 'already
    embedded' and the provenance of those vectors never appeared."""
    from vlmindex.catalog import embeddings

    def refuse(*_args, **_kwargs):
        raise duckdb.IOException("IO Error: Cannot open file catalog.duckdb: Operation not permitted")

    monkeypatch.setattr(embeddings, "record_run", refuse)
    with pytest.warns(UserWarning, match="could not be recorded in `runs`"):
        vlm(synth_ws, "embed", "-m", "hog", "-d", "demo", "--workers", "0", "--part-size", "40")
    assert _count(synth_ws, "SELECT count(*) FROM runs") == [(0,)]
    monkeypatch.undo()
    again = vlm(synth_ws, "embed", "-m", "hog", "-d", "demo", "--workers", "0")
    assert "already embedded (72 images)" in again.out
    rows = _count(synth_ws, "SELECT n, dim, weights_sha256 IS NULL, preprocessing IS NOT NULL, recorded_from "
                            "FROM runs WHERE model = 'hog'")
    assert len(rows) == 1 and rows[0][0] == 72 and rows[0][1] > 0 and rows[0][3] and rows[0][4] == "parts"
    vlm(synth_ws, "embed", "-m", "hog", "-d", "demo", "--workers", "0")
    assert _count(synth_ws, "SELECT count(*) FROM runs") == [(1,)], "recorded once, not on every run"


def test_zero_embedding_is_skipped_with_its_reason_not_a_reason_to_refuse_the_run(synth_ws, vlm):
    """One image embedded as an all-zero vector used to make analyze and overlay effect refuse
    the whole run."""
    from vlmindex.embed import EmbedOptions, embed
    from vlmindex.models import load_model

    ws = Workspace(synth_ws)
    victim = _count(synth_ws, "SELECT image_id FROM images ORDER BY image_id LIMIT 1")[0][0]
    vlm(synth_ws, "overlay", "add", "demo", "lbl", "--text", "label")
    for condition in ("clean", "lbl"):
        extractor = load_model("raw-pixels")
        encode = extractor.encode_image
        state = {"done": 0}

        def zero_first(batch, encode=encode, state=state):
            out = encode(batch)
            if state["done"] == 0:
                out[0] = 0  # the first image of the first batch is the smallest id: `victim`
            state["done"] += len(out)
            return out

        extractor.encode_image = zero_first
        embed(ws, "raw-pixels", "demo", condition, EmbedOptions(num_workers=0, progress=False), extractor=extractor)
    vlm(synth_ws, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "5", "--no-probe")
    n = _count(synth_ws, "SELECT n_queries FROM summaries")[0][0]
    assert n == 71
    skipped = _count(synth_ws, "SELECT count(*), min(reason) FROM skipped WHERE stage = 'embed'")
    assert skipped[0][0] == 2 and "all zeros" in skipped[0][1]
    assert _count(synth_ws, f"SELECT count(*) FROM query_metrics WHERE image_id = {victim}") == [(0,)]
    effect = json.loads(vlm(synth_ws, "overlay", "effect", "-m", "raw-pixels", "-d", "demo", "-c", "lbl",
                            "--n-boot", "10", "--format", "json").out)
    assert {r["n"] for r in effect if r["figure"] == "shift_cosine_mean"} == {71}
    # a rerun does not embed it again, and keeps its reason
    again = vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    assert "already embedded" in again.out
    assert _count(synth_ws, "SELECT count(*) FROM skipped WHERE stage = 'embed' AND condition = 'clean'") == [(1,)]


def test_text_detections_of_replaced_pixels_do_not_survive(tmp_path):
    """`ingest --replace` used to leave the text detections of the old pixels behind."""
    from test_detect_text import FakeDetector

    from vlmindex.detect_text import detect_text
    from vlmindex.ingest import ingest

    src = _make_folder(tmp_path / "src", seed=1, n=2)
    ws = Workspace(tmp_path / "ws")
    ingest(ws, "demo", src, "imagefolder", progress=False)
    assert detect_text(ws, "demo", progress=False, detector=FakeDetector(ws))["stored"] == 4
    _make_folder(src, seed=2, n=2)
    ingest(ws, "demo", src, "imagefolder", replace=True, progress=False)
    assert _count(ws.root, "SELECT count(*) FROM text_detections") == [(0,)]
    fake = FakeDetector(ws)
    assert detect_text(ws, "demo", progress=False, detector=fake)["processed"] == 4 and fake.calls == 4


def test_text_detection_of_changed_overlay_pixels_is_redone(tmp_path):
    """A detection row records the pixels it read: relabelling an image changes what a label
    overlay writes on it, and its detection is redone instead of kept."""
    from test_detect_text import FakeDetector

    from vlmindex.detect_text import detect_text
    from vlmindex.ingest import ingest
    from vlmindex.overlay import OverlayRecipe, add_condition

    src = _make_folder(tmp_path / "src", seed=1, n=2)
    ws = Workspace(tmp_path / "ws")
    ingest(ws, "demo", src, "imagefolder", progress=False)
    add_condition(ws, "demo", "lbl", OverlayRecipe(text="label"))
    detect_text(ws, "demo", condition="lbl", progress=False, detector=FakeDetector(ws))
    with ws.write() as con:  # to the other existing class: only this image's written text changes
        con.execute("UPDATE images SET label = CASE label WHEN 'benign' THEN 'malignant' ELSE 'benign' END "
                    "WHERE image_id = (SELECT min(image_id) FROM images)")
    fake = FakeDetector(ws)
    assert detect_text(ws, "demo", condition="lbl", progress=False, detector=fake)["processed"] == 1


def test_report_projects_the_vectors_analyze_scored(synth_ws, vlm):
    """An image embedded twice: analyze kept the newest copy but the report's own reader kept the
    oldest, so it could plot vectors the analysis never scored."""
    from vlmindex.report import collect
    from vlmindex.report.options import ReportOptions

    ws = Workspace(synth_ws)
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    ids, vecs = parts.read_embeddings(ws.embeddings_dir("raw-pixels", "demo"))
    # A newer part with different vectors for every image: newest wins everywhere.
    parts.write_part(ws.embeddings_dir("raw-pixels", "demo"), model="raw-pixels", dataset="demo",
                     condition="clean", image_ids=ids, embeddings=np.ascontiguousarray(vecs[::-1]))
    vlm(synth_ws, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "5", "--no-probe")
    data = collect(ws, ReportOptions(projection="pca"))
    (panel,) = data.projections
    scored = read_run(ws, RunKey("raw-pixels", "demo"))
    pos = np.searchsorted(scored.ids, panel.image_ids)
    assert np.array_equal(panel.vectors, scored.vectors[pos])
    assert not np.array_equal(panel.vectors, vecs[np.searchsorted(ids, panel.image_ids)])


def test_sigkill_between_embed_parts_leaves_one_row_per_image_with_provenance(synth_ws):
    """Killed after some parts: the rerun finishes, records the killed run from its parts, and
    no image is stored twice."""
    ws = Workspace(synth_ws)
    model = "untrained-vit-b16"
    proc = _start_embed(synth_ws, "-m", model, "--split", "test", "--batch-size", "2", "--part-size", "2",
                        "--workers", "1")
    _wait_for_parts(synth_ws, model, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    vlm_rc = subprocess.run([sys.executable, "-m", "vlmindex", "-w", str(synth_ws), "embed", "-m", model, "-d",
                             "demo", "--split", "test", "--workers", "0"], capture_output=True, text=True)
    assert vlm_rc.returncode == 0, vlm_rc.stderr
    raw = _raw_rows(synth_ws, model)
    n_test = _count(synth_ws, "SELECT count(*) FROM images WHERE split = 'test'")[0][0]
    assert len(raw) == len(np.unique(raw)) == n_test
    sources = {r[0] for r in _count(synth_ws, f"SELECT recorded_from FROM runs WHERE model = '{model}'")}
    assert sources == {"parts", "embed"}
    shutil.rmtree(ws.root / ".locks", ignore_errors=True)


def test_blank_image_in_a_dataset_is_skipped_and_hog_analyses_run(tmp_path, vlm):
    """One uniform image used to be embedded by HOG as a zero vector, after which `analyze` and
    `overlay effect` refused the whole run."""
    src = _make_folder(tmp_path / "src", seed=3, n=4)
    Image.new("RGB", (24, 24), (120, 120, 120)).save(src / "benign" / "blank.png")
    ws = tmp_path / "ws"
    out = vlm(ws, "ingest", "demo", src, "--format", "imagefolder").out
    assert "ingested 8 images" in out and "skipped 1" in out
    reason = _count(ws, "SELECT reason FROM skipped WHERE path LIKE '%blank.png'")
    assert reason == [("blank image: every pixel has the same value",)]
    vlm(ws, "overlay", "add", "demo", "lbl", "--text", "label")
    for condition in ("clean", "lbl"):
        vlm(ws, "embed", "-m", "hog", "-d", "demo", "-c", condition, "--workers", "0")
        vlm(ws, "analyze", "-m", "hog", "-d", "demo", "-c", condition, "-k", "3", "--no-probe")
    vlm(ws, "overlay", "effect", "-m", "hog", "-d", "demo", "-c", "lbl", "-k", "3", "--n-boot", "10")
    assert _count(ws, "SELECT DISTINCT n_queries FROM summaries") == [(8,)]


def test_embed_overtaken_by_a_replaced_condition_stores_no_vector_of_the_old_recipe(synth_ws):
    """The recipe and the pixel fingerprints of an embed are read in one snapshot: a condition
    replaced while the run works makes its rows stale at commit, never current."""
    from vlmindex.embed import EmbedOptions, embed
    from vlmindex.models import load_model
    from vlmindex.overlay import OverlayRecipe, add_condition

    ws = Workspace(synth_ws)
    add_condition(ws, "demo", "txt", OverlayRecipe(text="fixed:OLD", size=0.3, box=True))
    extractor = load_model("color-hist")
    encode = extractor.encode_image
    calls = []

    def encode_then_replace(batch):
        if not calls:
            add_condition(ws, "demo", "txt", OverlayRecipe(text="fixed:NEW", size=0.3, box=True,
                                                           position="center"), replace=True)
        calls.append(1)
        return encode(batch)

    extractor.encode_image = encode_then_replace
    opts = EmbedOptions(batch_size=8, part_size=8, num_workers=0, progress=False)
    embed(ws, "color-hist", "demo", "txt", opts, extractor=extractor)
    extractor.encode_image = encode
    embed(ws, "color-hist", "demo", "txt", opts, extractor=extractor)

    fresh = synth_ws.parent / "fresh"
    shutil.copytree(synth_ws, fresh, ignore=shutil.ignore_patterns("embeddings", ".locks", ".lock"))
    got = read_run(ws, RunKey("color-hist", "demo", "txt"))
    want_ws = Workspace(fresh)
    embed(want_ws, "color-hist", "demo", "txt", opts)
    want = read_run(want_ws, RunKey("color-hist", "demo", "txt"))
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.vectors, want.vectors)


def test_detect_text_reads_only_the_pixels_the_catalog_knows(tmp_path):
    """A file changed on disk after ingest was OCR'd and stored as the catalog's pixels."""
    from test_detect_text import FakeDetector

    from vlmindex.detect_text import detect_text
    from vlmindex.ingest import ingest

    src = _make_folder(tmp_path / "src", seed=1, n=2)
    ws = Workspace(tmp_path / "ws")
    ingest(ws, "demo", src, "imagefolder", progress=False)
    path = _count(ws.root, "SELECT path FROM images ORDER BY image_id LIMIT 1")[0][0]
    Image.new("RGB", (24, 24), (1, 2, 3)).save(path)  # not the pixels that were ingested
    summary = detect_text(ws, "demo", progress=False, detector=FakeDetector(ws))
    assert summary["changed_since_ingest"] == 1 and summary["stored"] == 3
    row = _count(ws.root, f"SELECT has_text, pixels, error FROM text_detections WHERE image_id = "
                          f"(SELECT image_id FROM images WHERE path = '{path}')")
    assert row[0][0] is None and row[0][1] is None and "changed since it was ingested" in row[0][2]


def test_overlay_effect_of_partial_runs_stops_unless_allowed(synth_ws, vlm):
    """With both runs embedded on one split only, overlay figures were stored over the subset
    without a word, while analyze refused the same runs."""
    vlm(synth_ws, "overlay", "add", "demo", "lbl", "--text", "label")
    for cond in ("clean", "lbl"):
        vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "-c", cond, "--split", "test", "--workers", "0")
    bad = vlm(synth_ws, "overlay", "effect", "-m", "raw-pixels", "-d", "demo", "-c", "lbl", "-k", "3", expect=1)
    assert "--allow-partial" in bad.err and "no clean one" in bad.err and len(bad.err.strip().splitlines()) == 1
    rows = json.loads(vlm(synth_ws, "overlay", "effect", "-m", "raw-pixels", "-d", "demo", "-c", "lbl", "-k", "3",
                          "--n-boot", "10", "--allow-partial", "--format", "json").out)
    n_test = _count(synth_ws, "SELECT count(*) FROM images WHERE split = 'test'")[0][0]
    assert {r["n"] for r in rows if r["figure"] == "shift_cosine_mean"} == {n_test}
    assert all("partial: " in r["note"] for r in rows)


def test_embed_refuses_to_mix_into_an_imported_run_or_another_vector_size(synth_ws, vlm, tmp_path):
    """An embed used to append hog vectors to a run of imported 10-d vectors, after which every
    reader of the run failed."""
    import pyarrow as pa

    with Workspace(synth_ws).read() as con:
        ids = [r[0] for r in con.execute("SELECT image_id FROM images WHERE split = 'train'").fetchall()]
    f = tmp_path / "ten.parquet"
    vecs = np.random.default_rng(0).normal(size=(len(ids), 10)).astype(np.float32)
    pq.write_table(pa.table({"image_id": pa.array(ids), "embedding": pa.array(list(vecs), pa.list_(pa.float32()))}), f)
    vlm(synth_ws, "embeddings", "import", f, "-m", "hog", "-d", "demo")
    bad = vlm(synth_ws, "embed", "-m", "hog", "-d", "demo", "--workers", "0", expect=1)
    assert "holds 10-d embeddings" in bad.err and "embeddings remove" in bad.err
    assert _count(synth_ws, "SELECT count(*), count(DISTINCT image_id) FROM embeddings") == [(len(ids), len(ids))]
    vlm(synth_ws, "embeddings", "remove", "-m", "hog", "-d", "demo")
    vlm(synth_ws, "embed", "-m", "hog", "-d", "demo", "--workers", "0")
    vlm(synth_ws, "analyze", "-m", "hog", "-d", "demo", "-k", "3", "--no-probe")


def test_import_overtaken_by_replace_stores_nothing(synth_ws, monkeypatch, tmp_path):
    """Imported vectors resolved against the old images used to be stamped with the new pixels."""
    import pyarrow as pa
    from conftest import SMALL_SYNTH

    from vlmindex.catalog import embeddings as store
    from vlmindex.ingest import ingest_synthetic
    from vlmindex.transfer import import_embeddings

    ws = Workspace(synth_ws)
    with ws.read() as con:
        ids = [r[0] for r in con.execute("SELECT image_id FROM images").fetchall()]
    f = tmp_path / "v.parquet"
    vecs = np.random.default_rng(0).normal(size=(len(ids), 4)).astype(np.float32)
    pq.write_table(pa.table({"image_id": pa.array(ids), "embedding": pa.array(list(vecs), pa.list_(pa.float32()))}), f)
    original = store.import_run

    def replace_then_import(*args, **kwargs):
        ingest_synthetic(ws, "demo", seed=1, replace=True, progress=False, **SMALL_SYNTH)
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "import_run", replace_then_import)
    with pytest.raises(VlmindexError, match="changed while the embeddings were read"):
        import_embeddings(ws, "ext", "demo", f)
    assert _count(synth_ws, "SELECT count(*) FROM embeddings") == [(0,)]


def test_embed_that_reads_no_image_exits_non_zero(tmp_path, vlm):
    """Every image unreadable (a moved dataset folder) used to end with exit code 0."""
    src = _make_folder(tmp_path / "src", seed=4, n=2)
    ws = tmp_path / "ws"
    vlm(ws, "ingest", "demo", src, "--format", "imagefolder")
    src.rename(tmp_path / "moved")
    res = vlm(ws, "embed", "-m", "hog", "-d", "demo", "--workers", "0", expect=1)
    assert "none of the 4 images could be read" in res.err and "No such file" in res.err


def test_pixel_fingerprints_change_only_with_what_decides_the_pixels(synth_ws, vlm):
    """A new class used to re-embed every image of a fixed-text condition, whose pixels it leaves
    alone; it must re-embed a wrong-label condition, whose text it can change."""
    vlm(synth_ws, "overlay", "add", "demo", "fixed", "--text", "fixed:XYZ")
    vlm(synth_ws, "overlay", "add", "demo", "wrong", "--text", "wrong-label")

    def fingerprints() -> dict:
        return dict(((c, i), p) for c, i, p in _count(synth_ws, "SELECT condition, image_id, pixels FROM image_pixels"))

    before = fingerprints()
    with Workspace(synth_ws).write() as con:  # one naevus becomes a new class of dermoscopy
        con.execute("UPDATE images SET label = 'dysplastic' WHERE image_id = (SELECT min(image_id) FROM images "
                    "WHERE modality = 'dermoscopy')")
    after = fingerprints()
    changed = {c for (c, i), p in after.items() if before[(c, i)] != p}
    moved = {(c, i) for (c, i), p in after.items() if before[(c, i)] != p}
    assert "fixed" not in changed and "clean" not in changed
    n_derm = _count(synth_ws, "SELECT count(*) FROM images WHERE modality = 'dermoscopy'")[0][0]
    assert sum(c == "wrong" for c, _ in moved) == n_derm  # the pool of that modality changed


def test_leaderboard_says_which_analyses_are_no_longer_current(synth_ws, vlm, tmp_path):
    """After new images were embedded, the leaderboard showed the old analysis with nothing to say
    its inputs had changed."""
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    vlm(synth_ws, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "3", "--no-probe")
    board = json.loads(vlm(synth_ws, "sql", "leaderboard", "--format", "json").out)
    assert [r["current"] for r in board] == [True]
    ids, vecs = parts.read_embeddings(Workspace(synth_ws).embeddings_dir("raw-pixels", "demo"))
    parts.write_part(Workspace(synth_ws).embeddings_dir("raw-pixels", "demo"), model="raw-pixels", dataset="demo",
                     condition="clean", image_ids=ids[:1], embeddings=vecs[1:2])  # a newer copy of one image
    board = json.loads(vlm(synth_ws, "sql", "leaderboard", "--format", "json").out)
    assert [r["current"] for r in board] == [False]
    vlm(synth_ws, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "3", "--no-probe")
    assert [r["current"] for r in json.loads(vlm(synth_ws, "sql", "leaderboard", "--format", "json").out)] == [True]


def test_refused_medmnist_reingest_leaves_the_workspace_pngs_alone(tmp_path, vlm):
    """A re-ingest refused for a changed image used to overwrite the workspace's PNG anyway, so the
    catalog's checksum no longer described the file every stage reads."""
    from vlmindex.imageio import file_sha256

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 2, (6, 1)).astype(np.uint8)
    src = tmp_path / "breastmnist.npz"
    np.savez(src, train_images=x, train_labels=y)
    ws = tmp_path / "ws"
    vlm(ws, "ingest", "b", src, "--format", "medmnist")
    x[2] = 255 - x[2]
    np.savez(src, train_images=x, train_labels=y)
    bad = vlm(ws, "ingest", "b", src, "--format", "medmnist", expect=1)
    assert "changed since it was ingested" in bad.err
    for path, sha in _count(ws, "SELECT path, sha256 FROM images"):
        assert file_sha256(path) == sha, path
    vlm(ws, "ingest", "b", src, "--format", "medmnist", "--replace")
    for path, sha in _count(ws, "SELECT path, sha256 FROM images"):
        assert file_sha256(path) == sha, path
    assert not list(Workspace(ws).root.glob("images/.*"))  # no staging folder left behind


def test_synth_replace_changes_pixels_only_under_the_lock_and_only_when_accepted(synth_ws, monkeypatch):
    """`synth --replace` used to regenerate the images before taking any lock: a refused or failed
    run left new pixels under the old checksums."""
    from conftest import SMALL_SYNTH

    from vlmindex import synth
    from vlmindex.catalog import datasets as catalog_datasets
    from vlmindex.errors import WorkspaceBusy
    from vlmindex.imageio import file_sha256
    from vlmindex.ingest import ingest_synthetic

    ws = Workspace(synth_ws)
    before = {p: s for p, s in _count(synth_ws, "SELECT path, sha256 FROM images")}
    generate = synth.generate
    held = []

    def generate_checking_the_lock(*args, **kwargs):
        try:
            with ws.lock(wait=0):
                held.append(False)
        except WorkspaceBusy:
            held.append(True)
        return generate(*args, **kwargs)

    def refuse(*_args, **_kwargs):
        raise VlmindexError("refused for the test")

    monkeypatch.setattr(synth, "generate", generate_checking_the_lock)
    monkeypatch.setattr(catalog_datasets, "insert_images", refuse)
    with pytest.raises(VlmindexError, match="refused for the test"):
        ingest_synthetic(ws, "demo", seed=5, replace=True, progress=False, **SMALL_SYNTH)
    assert held == [True]
    assert {p: file_sha256(p) for p in before} == before, "the failed replace changed the images"
    monkeypatch.undo()
    ingest_synthetic(ws, "demo", seed=5, replace=True, progress=False, **SMALL_SYNTH)
    after = {p: s for p, s in _count(synth_ws, "SELECT path, sha256 FROM images")}
    assert after != before and all(file_sha256(p) == s for p, s in after.items())
