"""analyze, sql and query end to end on the synthetic set with an offline extractor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmindex import metrics
from vlmindex.analyze import load_run
from vlmindex.catalog import parts as store
from vlmindex.catalog.workspace import Workspace
from vlmindex.synth import MODALITIES

N_CLASSES = sum(len(labels) for labels in MODALITIES.values())  # of the synthetic set


@pytest.fixture
def analysed(vlm, synth_ws):
    for model in ("raw-pixels", "color-hist"):
        vlm(synth_ws, "embed", "-m", model, "-d", "demo", "--workers", "0")
    vlm(synth_ws, "analyze", "-m", "raw-pixels,color-hist", "-d", "demo", "-k", "5", "--exclude-group")
    return synth_ws


def test_analyze_stores_what_metrics_computes(analysed):
    ws = Workspace(analysed)
    run = load_run(ws, "raw-pixels", "demo")
    res = metrics.retrieval_metrics(run.vectors, run.labels, ids=run.ids, groups=run.groups, k=5,
                                    exclude_group=True)
    with ws.read() as con:
        rows = con.execute("SELECT image_id, purity_at_k, ap, map_at_r, p_at_1 FROM query_metrics "
                           "WHERE model = 'raw-pixels' ORDER BY image_id").fetchall()
        summ = con.execute("SELECT map_micro, purity_macro, n_queries, provenance FROM summaries "
                           "WHERE model = 'raw-pixels'").fetchone()
        nb = con.execute("SELECT count(*), count(DISTINCT image_id), min(rank), max(rank) FROM neighbors "
                         "WHERE model = 'raw-pixels'").fetchone()
        same_group = con.execute(
            "SELECT count(*) FROM neighbors n JOIN images a ON a.image_id = n.image_id "
            "JOIN images b ON b.image_id = n.neighbor_id WHERE a.group_id = b.group_id").fetchone()[0]
    order = np.argsort(run.ids[res.query_index])
    got = np.array([r[1:] for r in rows], dtype=float)
    np.testing.assert_allclose(got[:, 0], res.purity_at_k[order])
    np.testing.assert_allclose(got[:, 1], res.ap[order])
    np.testing.assert_allclose(got[:, 3], res.p_at_1[order])
    assert summ[0] == pytest.approx(res.summary()["ap_micro"])
    assert summ[2] == 72
    prov = json.loads(summ[3])
    assert prov["k"] == 5 and prov["exclude_group"] is True and "torch" in prov["embed_versions"]
    assert nb == (72 * 5, 72, 1, 5)
    assert same_group == 0, "--exclude-group must keep a lesion's other views out of its neighbours"


def test_reanalysis_replaces_rows(vlm, analysed):
    vlm(analysed, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "5", "--exclude-group")
    out = json.loads(vlm(analysed, "sql", "SELECT count(*) AS n FROM query_metrics WHERE model = 'raw-pixels'",
                         "--format", "json").out)
    assert out == [{"n": 72}]


def test_shipped_analyses_run(vlm, analysed):
    names = vlm(analysed, "sql", "--list", "--format", "json").out
    listed = {r["name"] for r in json.loads(names)}
    assert {"leaderboard", "per_class", "per_modality", "neighbor_confusion", "model_agreement"} <= listed
    board = json.loads(vlm(analysed, "sql", "leaderboard", "--format", "json").out)
    assert {r["model"] for r in board} == {"raw-pixels", "color-hist"}
    assert all(0 <= r["map"] <= 1 for r in board)
    per_class = json.loads(vlm(analysed, "sql", "per_class", "--format", "json").out)
    assert len(per_class) == 2 * N_CLASSES  # two models
    per_mod = json.loads(vlm(analysed, "sql", "per_modality", "--format", "json").out)
    assert {r["modality"] for r in per_mod} == {"dermoscopy", "xray", "ultrasound"}
    conf = json.loads(vlm(analysed, "sql", "neighbor_confusion", "--format", "json").out)
    for model in ("raw-pixels", "color-hist"):
        for label in {r["query_label"] for r in conf}:
            shares = [r["share"] for r in conf if r["model"] == model and r["query_label"] == label]
            assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    agree = json.loads(vlm(analysed, "sql", "model_agreement", "--format", "json").out)
    assert len(agree) == 1 and agree[0]["images"] == 72 and 0 <= agree[0]["jaccard_at_k"] <= 1
    csv_out = vlm(analysed, "sql", "leaderboard", "--format", "csv").out
    assert csv_out.splitlines()[0].startswith("dataset,condition,model")


def test_model_agreement_matches_python(analysed):
    ws = Workspace(analysed)
    with ws.read() as con:
        nb = con.execute("SELECT model, image_id, neighbor_id FROM neighbors").fetchall()
        sql_value = con.execute((__import__("vlmindex.catalog.workspace").catalog.workspace.sql_dir()
                                 / "model_agreement.sql").read_text()).fetchone()[5]
    sets: dict = {}
    for model, qid, nid in nb:
        sets.setdefault((model, qid), set()).add(nid)
    qids = {q for _, q in sets}
    a, b = "raw-pixels", "color-hist"
    jac = [len(sets[a, q] & sets[b, q]) / len(sets[a, q] | sets[b, q]) for q in qids]
    assert sql_value == pytest.approx(np.mean(jac), abs=1e-4)


def test_query_returns_indexed_image_first(vlm, analysed):
    ws = Workspace(analysed)
    vlm(analysed, "index", "build", "-m", "raw-pixels", "-d", "demo")
    with ws.read() as con:
        image_id, path, label = con.execute(
            "SELECT image_id, path, label FROM images ORDER BY image_id LIMIT 1").fetchone()
    rows = json.loads(vlm(analysed, "query", path, "-m", "raw-pixels", "-d", "demo", "-k", "3",
                          "--format", "json").out)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["image_id"] == image_id and rows[0]["label"] == label
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-4)
    table = vlm(analysed, "query", path, "-m", "raw-pixels", "-d", "demo", "-k", "2").out
    assert table.splitlines()[0].split() == ["query", "rank", "image_id", "path", "label", "score"]


def test_bad_inputs_are_one_line_errors(vlm, analysed, tmp_path):
    def one_line(res):
        assert res.code != 0 and res.err.startswith("Error: ") and "Traceback" not in res.err
        assert len(res.err.strip().splitlines()) == 1
        return res.err

    assert "no index" in one_line(vlm(analysed, "query", "x.png", "-m", "color-hist", "-d", "demo", expect=1))
    vlm(analysed, "index", "build", "-m", "raw-pixels", "-d", "demo")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert "broken.png" in one_line(vlm(analysed, "query", broken, "-m", "raw-pixels", "-d", "demo", expect=1))
    assert "unknown dataset" in one_line(vlm(analysed, "analyze", "-m", "raw-pixels", "-d", "zzz", expect=1))
    assert "no embeddings" in one_line(vlm(analysed, "analyze", "-m", "hog", "-d", "demo", expect=1))
    assert "SQL error" in one_line(vlm(analysed, "sql", "SELEC 1", expect=1))
    assert "--write" in one_line(vlm(analysed, "sql", "DELETE FROM images", expect=1))
    # an index of another dimension: import 3-d vectors under the model name of the index
    ws = Workspace(analysed)
    ids, _ = store.read_embeddings(ws.embeddings_dir("raw-pixels", "demo"))
    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(len(ids), 3)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)))
    vlm(analysed, "embeddings", "import", tmp_path / "e.npy", "--ids", tmp_path / "ids.txt", "-m", "hog", "-d", "demo")
    vlm(analysed, "index", "build", "-m", "hog", "-d", "demo")
    with ws.read() as con:
        path = con.execute("SELECT path FROM images LIMIT 1").fetchone()[0]
    assert "3-d" in one_line(vlm(analysed, "query", path, "-m", "hog", "-d", "demo", expect=1))


def test_analyses_with_other_options_are_never_mixed(vlm, analysed):
    # k = 3 next to the fixture's k = 5: two leaderboard rows per model, agreement only like with like
    vlm(analysed, "analyze", "-m", "raw-pixels,color-hist", "-d", "demo", "-k", "3", "--exclude-group")
    board = json.loads(vlm(analysed, "sql", "leaderboard", "--format", "json").out)
    assert sorted((r["model"], r["k"]) for r in board) == [
        ("color-hist", 3), ("color-hist", 5), ("raw-pixels", 3), ("raw-pixels", 5)]
    agree = json.loads(vlm(analysed, "sql", "model_agreement", "--format", "json").out)
    assert sorted(r["options"] for r in agree) == ["k=3 group-excluded", "k=5 group-excluded"]
    per_class = json.loads(vlm(analysed, "sql", "per_class", "--format", "json").out)
    assert len(per_class) == 2 * 2 * N_CLASSES  # two models, two option sets


def test_unscored_queries_have_no_knn_verdict(vlm, analysed):
    # the test split holds one lesion per class: with its group excluded no query has R > 0
    vlm(analysed, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "3", "--exclude-group",
        "--query-split", "test", "--gallery-split", "test")
    rows = json.loads(vlm(analysed, "sql", "SELECT count(*) AS n, count(knn_correct) AS judged, count(ap) AS "
                          "scored FROM query_metrics q JOIN summaries s USING (analysis_id) "
                          "WHERE s.query_split = 'test'", "--format", "json").out)
    assert rows[0]["n"] > 0 and rows[0]["judged"] == rows[0]["scored"] == 0


def test_device_option_same_analysis_on_every_path(vlm, analysed, monkeypatch):
    """--device picks where the ranking runs, never what it computes: same analysis id and numbers."""
    ws = Workspace(analysed)
    with ws.read() as con:
        before = con.execute("SELECT analysis_id, map_micro, knn_acc_macro FROM summaries "
                             "WHERE model = 'raw-pixels'").fetchall()
    vlm(analysed, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "5", "--exclude-group", "--device", "cpu")
    # the torch path (what --device cuda runs), here on the CPU
    monkeypatch.setattr("vlmindex.analyze.ranking_device", lambda device: "cpu")
    vlm(analysed, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "5", "--exclude-group")
    with ws.read() as con:
        after = con.execute("SELECT analysis_id, map_micro, knn_acc_macro, provenance FROM summaries "
                            "WHERE model = 'raw-pixels'").fetchall()
    assert len(after) == 1 and after[0][0] == before[0][0]
    np.testing.assert_allclose(after[0][1:3], before[0][1:], atol=1e-6)
    assert json.loads(after[0][3])["ranking_device"] == "cpu"
    monkeypatch.undo()
    import torch

    if not torch.cuda.is_available():
        res = vlm(analysed, "analyze", "-m", "raw-pixels", "-d", "demo", "--device", "cuda", expect=1)
        assert "sees no CUDA device" in res.err and "Traceback" not in res.err
    for bad in ("tpu", "cuda:abc", "cuda:"):
        res = vlm(analysed, "analyze", "-m", "raw-pixels", "-d", "demo", "--device", bad, expect=1)
        assert f"--device {bad!r} is not cpu, cuda, cuda:N or auto" in res.err and "Traceback" not in res.err
