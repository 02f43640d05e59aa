"""The one table of metrics: every name a retrieval metric or distribution figure carries on its way.

A metric is computed under one name and stored, summarised and shown under others, and the SQL
names are an interface users write queries against, so they never change. mAP, for instance, is
``ap`` per query (:class:`~vlmindex.metrics.retrieval.RetrievalResult` attribute and
``query_metrics`` column), ``ap_micro`` in :meth:`RetrievalResult.summary`, ``map_micro`` in table
``summaries``, ``map`` in ``sql/leaderboard.sql`` and ``delta_map`` in table ``overlay_effects``.
This module is where that mapping lives; :data:`METRICS` has one row per metric:

* ``name``: canonical name, also the stem of the ``delta_<name>`` overlay-bias figures;
* ``query_column``: per-query ``RetrievalResult`` attribute and ``query_metrics`` column;
* ``result_key``: key (stem) in ``RetrievalResult.summary()`` or ``distribution_figures()``;
* ``columns``: its ``summaries`` columns (micro and macro for a retrieval metric, one for a
  figure, two for the probe: its mean over seeds and their standard deviation), each with its
  ``sql/leaderboard.sql`` output name (None when not shown there), a short header and a one-line
  definition (the report's column tooltip);
* ``higher_is_better`` and a one-line ``definition``.

The formulas are in the docstrings of :mod:`vlmindex.metrics.retrieval` and
:mod:`vlmindex.metrics.distribution`. :data:`HEADLINE` picks the ``summaries`` columns the CLI,
the report and the leaderboard show, in their order. The helpers below derive what ``analyze``,
``vlmindex.bias``, ``vlmindex.report`` and the CLI need, so a name is written down once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vlmindex.metrics.retrieval import RetrievalResult

__all__ = [
    "DISTRIBUTION",
    "HEADLINE",
    "METRICS",
    "RETRIEVAL",
    "Metric",
    "SummaryColumn",
    "column",
    "delta_metrics",
    "distribution_columns",
    "get",
    "headline",
    "headline_columns",
    "leaderboard_columns",
    "summary_columns",
]


@dataclass(frozen=True)
class SummaryColumn:
    """One column of table ``summaries``."""

    name: str  # summaries column
    # None: a distribution figure, one number per set; "sd": its standard deviation over seeds
    aggregate: Literal["micro", "macro", "sd"] | None
    leaderboard: str | None  # output column of sql/leaderboard.sql; None when not there
    header: str  # short label (report table header)
    definition: str  # one line (report tooltip)


@dataclass(frozen=True)
class Metric:
    """One retrieval metric or distribution figure and all its names."""

    name: str
    family: Literal["retrieval", "distribution"]
    query_column: str | None  # RetrievalResult attribute and query_metrics column; None for figures
    result_key: str  # RetrievalResult.summary() key stem, or distribution_figures() key
    columns: tuple[SummaryColumn, ...]
    higher_is_better: bool
    definition: str


def _retrieval(name: str, query_column: str, result_key: str, definition: str,
               micro: tuple[str, str | None, str, str], macro: tuple[str, str | None, str, str]) -> Metric:
    return Metric(name, "retrieval", query_column, result_key,
                  (SummaryColumn(micro[0], "micro", *micro[1:]), SummaryColumn(macro[0], "macro", *macro[1:])),
                  True, definition)


def _figure(name: str, result_key: str, leaderboard: str | None, header: str, higher_is_better: bool,
            definition: str, tooltip: str | None = None) -> Metric:
    return Metric(name, "distribution", None, result_key,
                  (SummaryColumn(name, None, leaderboard, header, tooltip or definition),), higher_is_better,
                  definition)


# In the order of the summaries columns (sql/schema.sql); analyze writes them in this order.
RETRIEVAL: tuple[Metric, ...] = (
    _retrieval("purity_at_k", "purity_at_k", "purity_at_k",
               "share of the k nearest neighbours with the query's class",
               ("purity_micro", "purity_at_k", "purity@k",
                "mean share of the k nearest neighbours with the query's class"),
               ("purity_macro", "purity_at_k_macro", "purity@k macro", "mean over classes of the class mean purity@k")),
    _retrieval("map", "ap", "ap", "average precision over the full ranking (mean: mAP)",
               ("map_micro", "map", "mAP", "mean over queries of AP over the full ranking"),
               ("map_macro", "map_macro", "mAP macro", "mean over classes of the class mean AP")),
    _retrieval("map_at_r", "map_at_r", "map_at_r", "mean precision at the relevant ranks within the top R",
               ("map_at_r_micro", "map_at_r", "MAP@R", "mean MAP@R (pytorch-metric-learning definition)"),
               ("map_at_r_macro", None, "MAP@R macro", "mean over classes of the class mean MAP@R")),
    _retrieval("r_precision", "r_precision", "r_precision", "precision at rank R, R the query's relevant items",
               ("r_precision_micro", None, "R-precision", "mean precision at rank R"),
               ("r_precision_macro", None, "R-precision macro", "mean over classes of the class mean R-precision")),
    _retrieval("p_at_1", "p_at_1", "p_at_1", "whether the nearest neighbour has the query's class",
               ("p_at_1_micro", "p_at_1", "P@1", "share of queries whose nearest neighbour has their class"),
               ("p_at_1_macro", None, "P@1 macro", "mean over classes of the class share with a right P@1")),
    _retrieval("knn_acc", "knn_correct", "knn_accuracy", "whether the k-nearest-neighbour vote is the query's class",
               ("knn_acc_micro", None, "kNN acc", "share of queries whose k-nearest-neighbour vote is their class"),
               ("knn_acc_macro", "knn_acc_macro", "kNN acc macro",
                "balanced accuracy of the k-nearest-neighbour vote")),
)

DISTRIBUTION: tuple[Metric, ...] = (
    _figure("silhouette", "silhouette_cosine", "silhouette", "silhouette", True,
            "cosine silhouette of the classes, in [-1, 1]"),
    _figure("davies_bouldin", "davies_bouldin", None, "Davies–Bouldin", False,
            "mean over classes of the worst (spread i + spread j) / centroid distance"),
    _figure("calinski_harabasz", "calinski_harabasz", None, "Calinski–Harabasz", True,
            "between- over within-class scatter, each per degree of freedom"),
    _figure("fisher_ratio", "fisher_ratio", None, "Fisher ratio", True,
            "trace of between-class over within-class scatter"),
    # The probe's mean over --probe-seeds seeds, and their standard deviation (vlmindex.metrics.probe).
    Metric("probe_balanced_accuracy", "distribution", None, "linear_probe_balanced_accuracy", (
        SummaryColumn("probe_balanced_accuracy", None, "probe_bal_acc", "probe bal. acc",
                      "linear-probe balanced accuracy"),
        SummaryColumn("probe_balanced_accuracy_sd", "sd", None, "probe sd",
                      "standard deviation of the probe's balanced accuracy over its seeds (--probe-seeds)"),
    ), True, "balanced accuracy of a logistic-regression probe on the unit embeddings, C chosen on a validation "
             "split"),
)

METRICS: tuple[Metric, ...] = RETRIEVAL + DISTRIBUTION

# Summaries columns shown by `vlmindex analyze`, the report's leaderboard and (those with a
# leaderboard name) sql/leaderboard.sql, in this order.
HEADLINE: tuple[str, ...] = (
    "map_micro", "map_macro", "map_at_r_micro", "p_at_1_micro", "purity_micro", "purity_macro", "knn_acc_macro",
    "silhouette", "fisher_ratio", "probe_balanced_accuracy",
)

_BY_NAME = {m.name: m for m in METRICS}
_BY_COLUMN = {c.name: (m, c) for m in METRICS for c in m.columns}


def get(name: str) -> Metric:
    """The metric of canonical name ``name``; KeyError names the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(_BY_NAME)}") from None


def column(name: str) -> tuple[Metric, SummaryColumn]:
    """The metric and column behind a ``summaries`` column name."""
    try:
        return _BY_COLUMN[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a metric column of table summaries") from None


def summary_columns(result: RetrievalResult | Mapping[str, Any]) -> dict[str, float | None]:
    """The retrieval-metric values of a ``summaries`` row, keyed by ``summaries`` column name.

    ``result`` is a :class:`~vlmindex.metrics.retrieval.RetrievalResult` or the dict its
    ``summary()`` returned. A metric that was not computed (AP with ``full_ap=False``) is None.
    """
    summary = result if isinstance(result, Mapping) else result.summary()
    return {c.name: summary.get(f"{m.result_key}_{c.aggregate}") for m in RETRIEVAL for c in m.columns}


def distribution_columns(figures: Mapping[str, Any]) -> dict[str, float | None]:
    """The distribution-figure values of a ``summaries`` row from ``distribution_figures()``'s dict
    (None for a figure it did not compute, such as the probe with ``probe=False``). A figure's key is
    its ``result_key``; a column with an aggregate (the probe's ``sd``) reads ``<result_key>_<aggregate>``."""
    return {c.name: figures.get(m.result_key if c.aggregate is None else f"{m.result_key}_{c.aggregate}")
            for m in DISTRIBUTION for c in m.columns}


def delta_metrics() -> tuple[tuple[str, str], ...]:
    """``(figure stem, RetrievalResult attribute)`` of the paired ``delta_<stem>`` overlay figures."""
    return tuple((m.name, m.query_column) for m in RETRIEVAL if m.query_column is not None)


def headline_columns() -> list[str]:
    """The ``summaries`` columns of :data:`HEADLINE`, in order."""
    return list(HEADLINE)


def headline() -> tuple[tuple[str, str, bool, str], ...]:
    """``(summaries column, header, higher is better, definition)`` of each headline column."""
    return tuple((c.name, c.header, m.higher_is_better, c.definition) for m, c in map(column, HEADLINE))


def leaderboard_columns() -> tuple[tuple[str, str], ...]:
    """``(summaries column, sql/leaderboard.sql output column)`` of the headline columns it shows."""
    return tuple((c.name, c.leaderboard) for _, c in map(column, HEADLINE) if c.leaderboard is not None)
