"""The explorer table: one row per embedded image, with the analysis's own neighbours and metrics."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmindex.catalog import RunKey, Workspace, results
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog.embeddings import read_run
from vlmindex.errors import VlmindexError
from vlmindex.explore import ExploreOptions, build_table
from vlmindex.index import normalise

KEY = RunKey("hog", "demo", "clean")


@pytest.fixture(scope="module")
def table(served_ws, tmp_path_factory):
    copy = tmp_path_factory.mktemp("explore") / "ws"  # the session's workspace is shared: write to a copy
    shutil.copytree(served_ws, copy, ignore=shutil.ignore_patterns(".lock", "explore"))
    built = build_table(Workspace(copy), KEY, ExploreOptions(seed=3, thumbnail_px=40))
    return built, pq.read_table(built.path)


def test_one_row_per_embedded_image_with_its_catalog_metadata(table, served_ws):
    built, t = table
    ws = Workspace(served_ws)
    run = read_run(ws, KEY)
    assert t.num_rows == built.rows == len(run.ids) == 72
    assert t.column("image_id").to_pylist() == [str(i) for i in run.ids.tolist()]
    with ws.read(views=False) as con:
        meta = {str(r[0]): r[1:] for r in catalog_datasets.images(
            con, "demo", columns=("image_id", "label", "modality", "split", "group_id"))}
    for row in t.select(["image_id", "label", "modality", "split", "group_id"]).to_pylist():
        assert (row["label"], row["modality"], row["split"], row["group_id"]) == meta[row["image_id"]]
    assert set(t.column("model").to_pylist()) == {"hog"} and set(t.column("condition").to_pylist()) == {"clean"}


def test_neighbours_are_the_analysis_own_in_row_indices_with_cosine_distances(table, served_ws):
    built, t = table
    ws = Workspace(served_ws)
    run = read_run(ws, KEY)
    x = normalise(run.vectors)
    stored = results.read_neighbors(ws, KEY, built.analysis_id).to_pylist()
    ids = [int(i) for i in t.column("image_id").to_pylist()]
    for r, nb in enumerate(t.column("neighbors").to_pylist()):
        want = [s["neighbor_id"] for s in stored if s["image_id"] == ids[r]]
        assert [ids[j] for j in nb["ids"]] == want and len(want) == 5
        cos = x[nb["ids"]] @ x[r]
        np.testing.assert_allclose(nb["distances"], 1 - cos, atol=1e-5)
        assert all(a <= b + 1e-6 for a, b in zip(nb["distances"], nb["distances"][1:], strict=False))


def test_per_query_metrics_are_the_stored_ones(table, served_ws):
    built, t = table
    with Workspace(served_ws).read() as con:
        stored = {str(r["image_id"]): r for r in results.query_metric_table(con, built.analysis_id).to_pylist()}
    assert len(stored) == 72
    for row in t.select(["image_id", "purity_at_k", "ap", "knn_pred", "knn_correct"]).to_pylist():
        s = stored[row["image_id"]]
        assert row["purity_at_k"] == s["purity_at_k"] and row["ap"] == s["ap"]
        assert row["knn_pred"] == s["knn_pred"] and row["knn_correct"] == s["knn_correct"]


def test_thumbnails_decode_and_the_map_is_seeded(table, served_ws, tmp_path):
    built, t = table
    for cell in t.column("thumbnail").to_pylist()[:5]:
        img = Image.open(io.BytesIO(cell["bytes"]))
        assert max(img.size) == 40
    xy = np.c_[t.column("x").to_numpy(), t.column("y").to_numpy()]
    assert np.isfinite(xy).all() and xy.std(axis=0).min() > 0
    copy = tmp_path / "ws"
    shutil.copytree(served_ws, copy, ignore=shutil.ignore_patterns(".lock", "explore"))
    again = pq.read_table(build_table(Workspace(copy), KEY, ExploreOptions(seed=3, thumbnail_px=40)).path)
    np.testing.assert_array_equal(again.column("x").to_numpy(), t.column("x").to_numpy())
    other = pq.read_table(build_table(Workspace(copy), KEY, ExploreOptions(seed=4, thumbnail_px=40)).path)
    assert not np.array_equal(other.column("x").to_numpy(), t.column("x").to_numpy())


def test_overlay_condition_thumbnails_show_the_overlay(served_ws, tmp_path, vlm):
    copy = tmp_path / "ws"
    shutil.copytree(served_ws, copy, ignore=shutil.ignore_patterns(".lock", "explore"))
    vlm(copy, "analyze", "-m", "hog", "-d", "demo", "-c", "lbl", "-k", "5", "--no-probe")
    lbl_key = RunKey("hog", "demo", "lbl")
    lbl = pq.read_table(build_table(Workspace(copy), lbl_key, ExploreOptions(thumbnail_px=64)).path)
    clean = pq.read_table(build_table(Workspace(copy), KEY, ExploreOptions(thumbnail_px=64)).path)
    a = np.asarray(Image.open(io.BytesIO(lbl.column("thumbnail")[0].as_py()["bytes"])), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(clean.column("thumbnail")[0].as_py()["bytes"])), dtype=int)
    assert np.abs(a - b).max() > 50


def test_duplicate_clusters_are_filled_after_a_duplicate_search(served_ws, tmp_path, vlm):
    copy = tmp_path / "ws"
    shutil.copytree(served_ws, copy, ignore=shutil.ignore_patterns(".lock", "explore"))
    vlm(copy, "duplicates", "demo", "-m", "hog", "--threshold", "0.9")
    with Workspace(copy).read(views=False) as con:
        from vlmindex.catalog import duplicates as store

        a, b = store.pair_ids(con, "demo", kinds=(*store.EXACT_KINDS, store.NEAR), model="hog", condition="clean")
    t = pq.read_table(build_table(Workspace(copy), KEY).path)
    clusters = dict(zip(t.column("image_id").to_pylist(), t.column("duplicate_cluster").to_pylist(), strict=True))
    assert len(a) > 0
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        assert clusters[str(x)] == clusters[str(y)] is not None
        assert int(clusters[str(x)]) <= min(x, y)


def test_a_run_without_a_current_analysis_is_refused_in_one_line(served_ws, tmp_path, vlm):
    copy = tmp_path / "ws"
    shutil.copytree(served_ws, copy, ignore=shutil.ignore_patterns(".lock", "explore"))
    with pytest.raises(VlmindexError, match="no current analysis over all modalities; run `vlmindex analyze"):
        build_table(Workspace(copy), RunKey("hog", "demo", "lbl"))
    part = sorted(Workspace(copy).embeddings_dir("hog", "demo", "clean").glob("*.parquet"))[0]
    part.unlink()  # the analysis's inputs are gone: it is stale, and must not be shown
    with pytest.raises(VlmindexError, match="no current analysis"):
        build_table(Workspace(copy), KEY)
    res = vlm(copy, "explore", "-m", "hog", "-d", "demo", "--export", tmp_path / "app", expect=1)
    assert res.err.count("\n") == 1 and "vlmindex analyze" in res.err


def test_publish_writes_into_the_workspace_and_bad_options_are_one_line(served_ws, tmp_path, vlm, monkeypatch):
    from vlmindex import explore

    copy = tmp_path / "ws"
    shutil.copytree(served_ws, copy, ignore=shutil.ignore_patterns(".lock", "explore"))
    written = []
    monkeypatch.setattr(explore, "export_app", lambda table, out: written.append((table, out)) or out)
    vlm(copy, "explore", "-m", "hog", "-d", "demo", "--publish")
    assert written and written[0][1] == explore.app_dir(Workspace(copy), KEY).resolve()
    assert written[0][0].parent == explore.table_path(Workspace(copy), KEY, "x").parent
    res = vlm(copy, "explore", "-m", "hog", "-d", "demo", "--publish", "--export", tmp_path / "a", expect=1)
    assert res.err.strip() == "Error: give --export DIR or --publish, not both"
    res = vlm(copy, "explore", "-m", "hog", "-d", "demo", "--thumbnail-size", "4000", expect=1)
    assert "--thumbnail-size 4000" in res.err and res.err.count("\n") == 1
    res = vlm(copy, "explore", "-m", "nope", "-d", "demo", expect=1)
    assert "no current analysis" in res.err
    res = vlm(copy, "serve", "--max-models", "0", expect=1)
    assert res.err.count("\n") == 1 and "--max-models" in res.err
    res = vlm(copy, "serve", "--workers", "0", expect=1)
    assert res.err.count("\n") == 1 and "--workers" in res.err


def test_export_refuses_a_folder_that_is_not_an_explorer(served_ws, tmp_path):
    from vlmindex import explore

    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    with pytest.raises(VlmindexError, match="not an exported explorer"):
        explore.export_app(tmp_path / "t.parquet", out)
    assert (out / "chapter1.tex").read_text() == "precious"
