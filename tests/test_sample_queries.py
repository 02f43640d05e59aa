"""`analyze --sample-queries N`: N queries drawn by class, scored exactly against the whole gallery,
with bootstrap intervals, a scope that says so, and never ranked with full analyses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vlmindex.analyze import AnalyzeOptions
from vlmindex.catalog import Workspace, results
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.metrics import bootstrap_class_mean_ci, bootstrap_mean_ci, stratified_sample
from vlmindex.metrics.statistics import resample_blocks


def _reference_allocation(labels, n):
    """The allocation rule written out: floor of the share, then the largest remainders."""
    classes = sorted(set(labels))
    m = len(labels)
    share = {c: n * labels.count(c) / m for c in classes}
    take = {c: int(share[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (-(share[c] - take[c]), c))[: n - sum(take.values())]:
        take[c] += 1
    return take


@pytest.mark.parametrize("n", [1, 7, 20, 99])
def test_stratified_sample_keeps_each_class_share_and_is_seeded(n):
    rng = np.random.default_rng(3)
    labels = list(rng.choice(["naevus", "melanoma", "sk", "rare"], p=[0.6, 0.25, 0.13, 0.02], size=100))
    pick = stratified_sample(np.array(labels), n, seed=5)
    assert len(pick) == n and len(set(pick.tolist())) == n and np.all(np.diff(pick) > 0)
    got = {c: sum(labels[i] == c for i in pick) for c in set(labels)}
    want = _reference_allocation(labels, n)
    assert {c: got.get(c, 0) for c in want} == want
    assert stratified_sample(np.array(labels), n, seed=5).tolist() == pick.tolist()
    if 1 < n < 99:
        assert stratified_sample(np.array(labels), n, seed=6).tolist() != pick.tolist()
    with pytest.raises(ValueError):
        stratified_sample(np.array(labels), 100, seed=0)


def test_a_class_sample_does_not_move_when_another_class_changes():
    # "a" (drawn first, in name order) gains images; "b" keeps its allocation and must keep its draw
    labels = np.array(["b"] * 40 + ["a"] * 40)
    grown = np.array(["b"] * 40 + ["a"] * 45)
    b_before = [i for i in stratified_sample(labels, 20, seed=1) if labels[i] == "b"]
    b_after = [i for i in stratified_sample(grown, 21, seed=1) if grown[i] == "b"]
    assert len(b_before) == len(b_after) == 10 and b_before == b_after


def test_class_mean_interval_matches_a_plain_loop_over_the_same_draws():
    rng = np.random.default_rng(0)
    values = rng.random(60)
    classes = rng.choice(["a", "b", "c"], size=60)
    groups = rng.integers(0, 25, size=60).astype(str)
    lo, hi = bootstrap_class_mean_ci(values, classes, groups, n_boot=300, seed=4)
    units = sorted(set(groups.tolist()))
    reps = []
    for block in resample_blocks(len(units), 300, 4):
        for draw in block:
            chosen = [i for u in draw for i in range(60) if groups[i] == units[u]]
            per_class = {}
            for i in chosen:
                per_class.setdefault(classes[i], []).append(values[i])
            reps.append(sum(np.mean(v) for v in per_class.values()) / len(per_class))
    want = np.quantile(reps, [0.025, 0.975])
    assert lo == pytest.approx(want[0], abs=1e-12) and hi == pytest.approx(want[1], abs=1e-12)


@pytest.fixture
def sampled_ws(served_ws, tmp_path, vlm):
    root = tmp_path / "ws"
    shutil.copytree(served_ws, root, ignore=shutil.ignore_patterns(".lock", "explore"))
    vlm(root, "analyze", "-m", "hog", "-d", "demo", "-k", "5", "--exclude-group", "--no-probe",
        "--sample-queries", "20", "--seed", "2")
    return root


def test_sampled_queries_are_scored_exactly_against_the_whole_gallery(sampled_ws):
    ws = Workspace(sampled_ws)
    with ws.read() as con:
        rows = {s["scope"]: s for s in results.latest_summaries(con, "demo") if s["model"] == "hog"}
        full = rows["k=5 group-excluded no-probe"]
        sampled = rows["k=5 group-excluded no-probe sampled 20 of 72 queries (seed 2)"]
        f_rows = {r["image_id"]: r for r in results.query_metric_table(con, full["analysis_id"]).to_pylist()}
        s_rows = results.query_metric_table(con, sampled["analysis_id"]).to_pylist()
        labels = {r[0]: r[1] for r in catalog_datasets.images(con, "demo", columns=("image_id", "label"))}
    # the full analysis keeps its id: the new option changes nothing for analyses without it
    assert full["analysis_id"] == AnalyzeOptions(k=5, exclude_group=True, probe=False).analysis_id(
        "hog", "demo", "clean")
    assert len(s_rows) == 20 and sampled["n_queries"] == 20 and sampled["n_gallery"] == full["n_gallery"] == 72
    for r in s_rows:  # each sampled query's numbers are its numbers in the full analysis
        assert r == f_rows[r["image_id"]]
    counts = {}
    for r in s_rows:
        counts[labels[r["image_id"]]] = counts.get(labels[r["image_id"]], 0) + 1
    assert sorted(counts.values()) == [2, 2, 2, 2, 3, 3, 3, 3]  # 8 classes of 9: 20 = 8 x 2 + 4


def test_sampled_analysis_intervals_are_the_bootstrap_of_its_stored_queries(sampled_ws):
    ws = Workspace(sampled_ws)
    with ws.read() as con:
        s = next(s for s in results.latest_summaries(con, "demo") if s["sampled_queries"] == 20)
        q = results.query_metric_table(con, s["analysis_id"]).to_pylist()
        groups = {r[0]: r[1] for r in catalog_datasets.images(con, "demo", columns=("image_id", "group_id"))}
    ci = json.loads(s["ci"])
    assert {"map_micro", "map_macro", "purity_micro", "knn_acc_macro", "p_at_1_micro"} <= set(ci)
    ap = np.array([r["ap"] for r in q])
    # the units are the probe's: one per group (merged_groups names them by their first row)
    from vlmindex.analyze import load, merged_groups
    from vlmindex.catalog import RunKey

    run = load(ws, RunKey("hog", "demo", "clean"))
    unit = dict(zip(run.ids.tolist(), merged_groups(run.groups, None), strict=True))
    assert len({unit[r["image_id"]] for r in q}) == len({groups[r["image_id"]] for r in q})
    lo, hi = bootstrap_mean_ci(ap, [unit[r["image_id"]] for r in q], n_boot=2000, seed=2)
    assert ci["map_micro"] == pytest.approx([lo, hi], abs=1e-12)
    assert ci["map_micro"][0] <= s["map_micro"] <= ci["map_micro"][1] and ci["map_micro"][0] < ci["map_micro"][1]
    assert s["query_pool"] == 72


def test_leaderboard_ranks_sampled_analyses_apart(sampled_ws, vlm):
    out = json.loads(vlm(sampled_ws, "sql", "leaderboard", "--format", "json").out)
    scopes = [r["scope"] for r in out]
    sampled = [i for i, sc in enumerate(scopes) if "sampled" in sc]
    assert sampled and min(sampled) > max(i for i, sc in enumerate(scopes) if "sampled" not in sc)
    row = out[sampled[0]]
    assert row["map_ci"] is not None and "sampled 20 of 72 queries (seed 2)" in row["scope"]


def test_too_many_sampled_queries_is_a_one_line_error(served_ws, tmp_path, vlm):
    root = tmp_path / "ws"
    shutil.copytree(served_ws, root, ignore=shutil.ignore_patterns(".lock", "explore"))
    res = vlm(root, "analyze", "-m", "hog", "-d", "demo", "--sample-queries", "72", "--no-probe", expect=1)
    assert res.err.count("\n") == 1 and "not fewer than the 72 queries" in res.err


def test_a_v3_catalog_gains_the_sample_columns(tmp_path):
    from vlmindex.catalog import workspace as wsmod

    ws = Workspace(tmp_path / "ws")
    with ws.write() as con:
        for col in ("sampled_queries", "query_pool", "ci"):
            con.execute("DROP VIEW IF EXISTS latest_summaries")
            con.execute(f"ALTER TABLE summaries DROP COLUMN {col}")
        con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    with ws.write() as con:
        cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'summaries'").fetchall()}
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert {"sampled_queries", "query_pool", "ci"} <= cols and int(version) == wsmod.SCHEMA_VERSION >= 4


def test_the_report_puts_sampled_analyses_in_a_block_of_their_own(sampled_ws):
    from vlmindex.report import ReportOptions, build_report

    html, _ = build_report(Workspace(sampled_ws), ReportOptions(max_points=0, n_boot=50))
    assert "demo / clean (sampled 20 of 72 queries, seed 2)" in html
    from vlmindex.report.data import blocks

    with Workspace(sampled_ws).read() as con:
        rows = results.latest_summaries(con, "demo")
    for (_, _, cond), block in blocks(rows).items():
        assert len({s.get("sampled_queries") for s in block}) == 1, cond


def test_another_seed_is_another_sample_and_another_analysis(sampled_ws, vlm):
    vlm(sampled_ws, "analyze", "-m", "hog", "-d", "demo", "-k", "5", "--exclude-group", "--no-probe",
        "--sample-queries", "20", "--seed", "3")
    ws = Workspace(sampled_ws)
    with ws.read() as con:
        rows = [s for s in results.latest_summaries(con, "demo") if s["sampled_queries"] == 20]
        samples = {s["provenance"]["seed"]: {r["image_id"] for r in
                                             results.query_metric_table(con, s["analysis_id"]).to_pylist()}
                   for s in rows}
    assert len({s["analysis_id"] for s in rows}) == 2 and set(samples) == {2, 3}
    assert samples[2] != samples[3]
    from vlmindex.report.data import blocks

    assert len([k for k in blocks(rows)]) == 2  # two samples are two rankings, not one


def test_explore_takes_the_full_analysis_over_a_newer_sampled_one(sampled_ws):
    from vlmindex.catalog import RunKey
    from vlmindex.explore import build_table

    table = build_table(Workspace(sampled_ws), RunKey("hog", "demo", "clean"))
    assert table.scope == "k=5 group-excluded no-probe" and table.rows == 72


def test_per_modality_sampling_refuses_before_storing_anything(served_ws, tmp_path, vlm):
    root = tmp_path / "ws"
    shutil.copytree(served_ws, root, ignore=shutil.ignore_patterns(".lock", "explore"))
    res = vlm(root, "analyze", "-m", "hog", "-d", "demo", "--per-modality", "--no-probe", "--sample-queries", "20",
              expect=1)
    assert "is per modality" in res.err and "xray (18)" in res.err
    with Workspace(root).read() as con:
        assert not [s for s in results.latest_summaries(con, "demo") if s["sampled_queries"]]
