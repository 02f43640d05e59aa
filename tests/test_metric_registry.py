"""The metric registry against the SQL users write against: names cannot drift between the layers."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pytest

from vlmindex.metrics import RETRIEVAL_METRICS, distribution_figures, registry, retrieval_metrics

SQL = Path(__file__).resolve().parents[1] / "sql"
# Output columns of sql/leaderboard.sql that say which run a row is, not how good it is.
IDENTITY = {"dataset", "condition", "model", "k", "n_queries", "scope", "current", "modality", "analysis_id",
            "map_ci", "ci"}  # the last two: intervals of sampled analyses (analyze --sample-queries)


@pytest.fixture(scope="module")
def catalog() -> duckdb.DuckDBPyConnection:
    """An empty catalog made from sql/schema.sql, DuckDB being the parser of record."""
    con = duckdb.connect(":memory:")
    con.execute((SQL / "schema.sql").read_text())
    # what every vlmindex connection registers beside the schema (catalog.views.register)
    con.execute("CREATE TEMP TABLE stale_analyses (analysis_id VARCHAR)")
    return con


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    return {name: dtype for name, dtype, *_ in con.execute(f"DESCRIBE {table}").fetchall()}


def test_summaries_columns_are_the_registry(catalog):
    summaries = _columns(catalog, "summaries")
    metric_columns = [c.name for m in registry.METRICS for c in m.columns]
    assert len(metric_columns) == len(set(metric_columns))
    # Every metric column the registry names exists, in the table's order ...
    assert [c for c in summaries if c in metric_columns] == metric_columns
    # ... and every numeric column of the table that is not bookkeeping is a registry metric.
    doubles = {c for c, t in summaries.items() if t == "DOUBLE"} - {"seconds"}
    assert doubles == set(metric_columns)
    assert set(registry.HEADLINE) <= set(metric_columns)


def test_query_metrics_columns_are_the_registry(catalog):
    per_query = _columns(catalog, "query_metrics")
    registry_cols = [m.query_column for m in registry.RETRIEVAL]
    assert set(registry_cols) <= set(per_query)
    assert {c for c, t in per_query.items() if t == "DOUBLE"} | {"knn_correct"} == set(registry_cols)
    assert all(m.query_column is None for m in registry.DISTRIBUTION)


def test_leaderboard_sql_matches_the_registry(catalog):
    from vlmindex.catalog import shipped

    assert "{{leaderboard_metrics}}" in (SQL / "leaderboard.sql").read_text()
    text = shipped.text("leaderboard")
    # Each metric of the leaderboard is `round(<summaries column>, 4) AS <leaderboard column>`.
    pairs = tuple(re.findall(r"round\((\w+),\s*\d+\)\s+AS\s+(\w+)", text))
    assert pairs == registry.leaderboard_columns()
    for summaries_col, leaderboard_col in pairs:
        assert registry.column(summaries_col)[1].leaderboard == leaderboard_col
    # What the file actually returns: identity columns plus exactly the registry's leaderboard names.
    out = [d[0] for d in catalog.execute(text).description]
    assert [c for c in out if c not in IDENTITY] == [lb for _, lb in registry.leaderboard_columns()]
    named = {c.leaderboard for m in registry.METRICS for c in m.columns if c.leaderboard}
    assert named == {lb for _, lb in pairs}, "a leaderboard name outside the headline would never be shown"


def test_derived_lists_are_what_users_saw_before():
    """bias, report and the CLI read their lists from the registry; the values must not change."""
    from vlmindex.bias import DELTA_METRICS
    from vlmindex.cli.index_cmds import HEADLINE
    from vlmindex.report import LEADERBOARD_COLUMNS

    assert DELTA_METRICS == (("purity_at_k", "purity_at_k"), ("map", "ap"), ("map_at_r", "map_at_r"),
                             ("r_precision", "r_precision"), ("p_at_1", "p_at_1"), ("knn_acc", "knn_correct"))
    assert RETRIEVAL_METRICS == ("purity_at_k", "ap", "map_at_r", "r_precision", "p_at_1", "knn_accuracy")
    assert HEADLINE == ["model", "dataset", "condition", "k", "n_queries", "map_micro", "map_macro",
                        "map_at_r_micro", "p_at_1_micro", "purity_micro", "purity_macro", "knn_acc_macro",
                        "silhouette", "fisher_ratio", "probe_balanced_accuracy"]
    assert LEADERBOARD_COLUMNS == (
        ("map_micro", "mAP", True, "mean over queries of AP over the full ranking"),
        ("map_macro", "mAP macro", True, "mean over classes of the class mean AP"),
        ("map_at_r_micro", "MAP@R", True, "mean MAP@R (pytorch-metric-learning definition)"),
        ("p_at_1_micro", "P@1", True, "share of queries whose nearest neighbour has their class"),
        ("purity_micro", "purity@k", True, "mean share of the k nearest neighbours with the query's class"),
        ("purity_macro", "purity@k macro", True, "mean over classes of the class mean purity@k"),
        ("knn_acc_macro", "kNN acc macro", True, "balanced accuracy of the k-nearest-neighbour vote"),
        ("silhouette", "silhouette", True, "cosine silhouette of the classes, in [-1, 1]"),
        ("fisher_ratio", "Fisher ratio", True, "trace of between-class over within-class scatter"),
        ("probe_balanced_accuracy", "probe bal. acc", True, "linear-probe balanced accuracy"),
    )


def test_summary_row_values_come_from_the_computed_names():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 12)
    x = rng.standard_normal((3, 6))[y] + rng.standard_normal((36, 6))
    res = retrieval_metrics(x, y, k=3)
    s = res.summary()
    # The mapping analyze wrote by hand before the registry existed.
    assert registry.summary_columns(res) == registry.summary_columns(s) == {
        "purity_micro": s["purity_at_k_micro"], "purity_macro": s["purity_at_k_macro"],
        "map_micro": s["ap_micro"], "map_macro": s["ap_macro"],
        "map_at_r_micro": s["map_at_r_micro"], "map_at_r_macro": s["map_at_r_macro"],
        "r_precision_micro": s["r_precision_micro"], "r_precision_macro": s["r_precision_macro"],
        "p_at_1_micro": s["p_at_1_micro"], "p_at_1_macro": s["p_at_1_macro"],
        "knn_acc_micro": s["knn_accuracy_micro"], "knn_acc_macro": s["knn_accuracy_macro"],
    }
    for m in registry.RETRIEVAL:
        assert getattr(res, m.query_column) is not None
    assert registry.summary_columns(retrieval_metrics(x, y, k=3, full_ap=False))["map_micro"] is None
    d = distribution_figures(x, y, probe=False)
    assert registry.distribution_columns(d) == {
        "silhouette": d["silhouette_cosine"], "davies_bouldin": d["davies_bouldin"],
        "calinski_harabasz": d["calinski_harabasz"], "fisher_ratio": d["fisher_ratio"],
        "probe_balanced_accuracy": None, "probe_balanced_accuracy_sd": None,
    }
    d = distribution_figures(x, y, probe_seeds=2, cv=3)
    assert registry.distribution_columns(d)["probe_balanced_accuracy"] == d["linear_probe"].balanced_accuracy
    assert registry.distribution_columns(d)["probe_balanced_accuracy_sd"] == d["linear_probe"].sd is not None


def test_lookups():
    assert registry.get("map").query_column == "ap"
    metric, col = registry.column("knn_acc_macro")
    assert metric.name == "knn_acc" and col.aggregate == "macro"
    assert not registry.get("davies_bouldin").higher_is_better
    with pytest.raises(KeyError, match="unknown metric"):
        registry.get("ap_micro")
    with pytest.raises(KeyError, match="not a metric column"):
        registry.column("seconds")
