"""analyze --per-modality and --probe-seeds on the synthetic set: one stored analysis per modality,
the same as --modality M, the same as the metric functions on the subset; leaderboard and report
blocks per (dataset, modality, condition)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from conftest import SMALL_SYNTH

from vlmindex import metrics, synth
from vlmindex.analyze import AnalyzeOptions, load_run
from vlmindex.catalog.workspace import Workspace
from vlmindex.metrics import registry

MODELS = ("raw-pixels", "color-hist")
MODALITIES = ("dermoscopy", "ultrasound", "xray")
ARGS = ("-d", "demo", "-k", "5", "--exclude-group", "--probe-seeds", "3")
METRIC_COLUMNS = [c.name for m in registry.METRICS for c in m.columns]
SAME = [*METRIC_COLUMNS, "analysis_id", "model", "dataset", "condition", "k", "exclude_group", "modality",
        "n_queries", "n_skipped_queries", "n_gallery", "n_classes", "dim", "probe_protocol", "inputs_fingerprint"]


@pytest.fixture
def embedded(vlm, synth_ws):
    vlm(synth_ws, "embed", "-m", ",".join(MODELS), "-d", "demo", "--workers", "0")
    return synth_ws


def _stored(ws) -> dict[str, dict]:
    """Every analysis: its summary row (provenance parsed) and its per-query rows."""
    with Workspace(ws).read() as con:
        cur = con.execute("SELECT * FROM summaries")
        cols = [d[0] for d in cur.description]
        out = {}
        for r in cur.fetchall():
            row = dict(zip(cols, r, strict=True))
            row["provenance"] = json.loads(row["provenance"])
            row["queries"] = con.execute(
                "SELECT image_id, purity_at_k, ap, map_at_r, r_precision, p_at_1, knn_pred FROM query_metrics "
                "WHERE analysis_id = ? ORDER BY image_id", [row["analysis_id"]]).fetchall()
            out[row["analysis_id"]] = row
    return out


def _equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_per_modality_is_modality_m_for_each_m_and_the_metrics_on_the_subset(vlm, embedded):
    res = vlm(embedded, "analyze", "-m", ",".join(MODELS), *ARGS, "--per-modality", "--format", "json")
    rows = json.loads(res.out)
    assert [(r["model"], r["modality"]) for r in rows] == [(m, mod) for m in MODELS for mod in MODALITIES]
    first = _stored(embedded)
    assert len(first) == 6 and {r["analysis_id"] for r in rows} == set(first)

    # The same as one `--modality M` analysis per modality: same ids, fingerprints and numbers.
    for model in MODELS:
        for mod in MODALITIES:
            vlm(embedded, "analyze", "-m", model, *ARGS, "--modality", mod)
    second = _stored(embedded)
    assert second.keys() == first.keys()
    for aid, row in first.items():
        for col in SAME:
            assert _equal(row[col], second[aid][col]), (row["model"], row["modality"], col)
        assert row["queries"] == second[aid]["queries"]
        assert row["provenance"]["linear_probe"] == second[aid]["provenance"]["linear_probe"]

    # The same as the metric functions on the modality's rows of the whole run.
    ws = Workspace(embedded)
    for model in MODELS:
        run = load_run(ws, model, "demo")
        for mod in MODALITIES:
            m = run.modalities == mod
            row = next(r for r in first.values() if r["model"] == model and r["modality"] == mod)
            ret = metrics.retrieval_metrics(run.vectors[m], run.labels[m], ids=run.ids[m], groups=run.groups[m],
                                            k=5, exclude_group=True)
            fig = metrics.distribution_figures(run.vectors[m], run.labels[m], probe=False)
            loop = [metrics.linear_probe(run.vectors[m], run.labels[m], splits=run.splits[m], groups=run.groups[m],
                                         seeds=(s,)).balanced_accuracy for s in range(3)]
            expected = {**registry.summary_columns(ret), **registry.distribution_columns(fig),
                        "probe_balanced_accuracy": float(np.mean(loop)),
                        "probe_balanced_accuracy_sd": float(np.std(loop, ddof=1))}
            for col, value in expected.items():
                assert row[col] == pytest.approx(value, rel=1e-9, abs=1e-12), (model, mod, col)
            assert row["n_queries"] == m.sum() == SMALL_SYNTH["lesions_per_class"] * SMALL_SYNTH[
                "views_per_lesion"] * len(synth.MODALITIES[mod])
            assert [q[0] for q in row["queries"]] == sorted(run.ids[m].tolist())
            assert row["provenance"]["linear_probe"]["seeds"] == [0, 1, 2]
            assert row["provenance"]["linear_probe"]["balanced_accuracy_per_seed"] == loop
            assert row["provenance"]["probe_seeds"] == 3 and "3 seeds" in row["probe_protocol"]


def test_cli_prints_one_row_per_model_and_modality_and_warns_about_images_without_one(vlm, embedded):
    ws = Workspace(embedded)
    with ws.write() as con:
        con.execute("UPDATE images SET modality = NULL WHERE image_id IN "
                    "(SELECT image_id FROM images WHERE modality = 'xray' ORDER BY image_id LIMIT 3)")
    res = vlm(embedded, "analyze", "-m", ",".join(MODELS), "-d", "demo", "-k", "3", "--no-probe", "--per-modality")
    lines = res.out.splitlines()
    assert lines[0].split()[:5] == ["model", "dataset", "condition", "modality", "k"]
    assert [line.split()[0] + " " + line.split()[3] for line in lines[2:]] == [
        f"{m} {mod}" for m in MODELS for mod in MODALITIES]
    assert "Warning: 3 labelled image(s) of demo have no modality and are in no per-modality analysis" in res.err
    assert res.err.count("no modality") == 1  # once, not once per model
    stored = _stored(embedded)
    xray = [r for r in stored.values() if r["modality"] == "xray"]
    n_xray = SMALL_SYNTH["lesions_per_class"] * SMALL_SYNTH["views_per_lesion"] * len(synth.MODALITIES["xray"])
    assert [r["n_queries"] for r in xray] == [n_xray - 3] * 2  # the three images are in no block

    def one_line(r):
        assert r.code == 1 and r.err.startswith("Error: ") and len(r.err.strip().splitlines()) == 1
        return r.err

    assert "leave out --modality" in one_line(vlm(embedded, "analyze", "-m", "raw-pixels", "-d", "demo",
                                                  "--per-modality", "--modality", "xray", expect=1))
    with ws.write() as con:
        con.execute("UPDATE images SET modality = NULL")
    assert "records no modality" in one_line(vlm(embedded, "analyze", "-m", "raw-pixels", "-d", "demo",
                                                 "--per-modality", expect=1))


def test_leaderboard_and_report_have_one_block_per_dataset_modality_and_condition(vlm, embedded):
    from vlmindex.report import ReportOptions, collect
    from vlmindex.report.sections import render

    vlm(embedded, "overlay", "add", "demo", "lbl", "--text", "label")
    vlm(embedded, "embed", "-m", ",".join(MODELS), "-d", "demo", "-c", "lbl", "--workers", "0")
    for cond in ("lbl", "clean"):
        vlm(embedded, "analyze", "-m", ",".join(MODELS), "-d", "demo", "-c", cond, "-k", "5", "--probe-seeds", "2")
        vlm(embedded, "analyze", "-m", ",".join(MODELS), "-d", "demo", "-c", cond, "-k", "5", "--probe-seeds", "2",
            "--per-modality")
    board = json.loads(vlm(embedded, "sql", "leaderboard", "--format", "json").out)
    blocks = list(dict.fromkeys((r["dataset"], r["modality"], r["condition"]) for r in board))
    assert blocks == [("demo", mod, cond) for mod in (None, *MODALITIES) for cond in ("clean", "lbl")]
    assert len(board) == len(blocks) * 2
    for r in board:
        assert (f"modality={r['modality']}" in r["scope"]) == (r["modality"] is not None)
    for (ds, mod, cond) in blocks:  # best mAP first within a block
        maps = [r["map"] for r in board if (r["dataset"], r["modality"], r["condition"]) == (ds, mod, cond)]
        assert maps == sorted(maps, reverse=True)

    opts = ReportOptions(max_points=40, projection="pca", n_boot=50)
    data = collect(Workspace(embedded), opts)
    assert [(b.dataset, b.modality, b.condition) for b in data.leaderboard] == blocks
    assert [(t.dataset, t.modality, t.condition) for t in data.per_class] == blocks
    for b in data.leaderboard:
        assert {r.summary["modality"] for r in b.rows} == {b.modality} and len(b.rows) == 2
    assert data.stale == [] and data.unchecked == []  # options (modality, probe seeds) rebuilt from the rows
    # projections from the all-modality analyses; ΔAP pairs each overlay analysis with its own modality's clean
    assert sorted(p.model for p in data.projections) == sorted(MODELS)
    assert all(p.modality is None for p in data.projections)
    assert len(data.ap_deltas) == 8 and data.ap_delta_skipped == []
    for d in data.ap_deltas:
        assert d.overlay["modality"] == d.clean["modality"]
    assert len(data.comparisons) == 8  # one pair per block
    html = render(data, opts)
    for mod in MODALITIES:
        assert f"<h3>demo · {mod} / clean " in html and f"data-modality='{mod}'" in html
    assert html.index("<h3>demo / lbl ") < html.index("<h3>demo · dermoscopy / clean ")


def test_existing_analysis_ids_stay_and_probe_seeds_names_a_new_one():
    """The id formula before --probe-seeds existed, written out: the default options keep it."""
    old_fields = {"k": 10, "exclude_group": False, "query_split": None, "gallery_split": None, "modality": None,
                  "probe": True, "seed": 0}
    key = json.dumps({"model": "hog", "dataset": "demo", "condition": "clean", **old_fields}, sort_keys=True)
    assert AnalyzeOptions().analysis_id("hog", "demo", "clean") == hashlib.sha1(key.encode()).hexdigest()[:16]
    assert "probe_seeds" not in AnalyzeOptions().numbers()
    three = AnalyzeOptions(probe_seeds=3)
    assert three.numbers()["probe_seeds"] == 3
    assert three.analysis_id("hog", "demo", "clean") != AnalyzeOptions().analysis_id("hog", "demo", "clean")
