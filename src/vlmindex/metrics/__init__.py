"""Discriminability metrics over an embedding matrix: pure NumPy, no I/O, no workspace needed.

Modules:

* :mod:`~vlmindex.metrics.retrieval`: :func:`retrieval_metrics` ranks the gallery for every query
  by cosine similarity and scores purity@k, AP over the full ranking, MAP@R, R-precision, P@1 and
  kNN accuracy per query, summarised micro (mean over queries) and macro (mean over classes of
  the class means); its docstring states the definitions.
* :mod:`~vlmindex.metrics.distribution`: :func:`distribution_figures`, the silhouette (cosine),
  Davies–Bouldin, Calinski–Harabasz, Fisher ratio and linear-probe balanced accuracy of the class
  structure, and :func:`project_2d` for plots.
* :mod:`~vlmindex.metrics.probe`: the linear probe, :func:`linear_probe`, with its regularisation
  chosen on a validation split (or group CV) and repeated over seeds.
* :mod:`~vlmindex.metrics.ranking`: the exact, deterministic ranking kernels (fixed-shape block
  products, uint64 rank keys, chunk runner).
* :mod:`~vlmindex.metrics.statistics`: the percentile bootstrap over resampling units, the paired
  Wilcoxon comparison and Holm's correction.
* :mod:`~vlmindex.metrics.registry`: one row per metric with every name it carries (per-query
  column, summaries columns, leaderboard column, overlay-figure stem).
* :mod:`~vlmindex.metrics.inputs`: input checks shared by the above.

Everything public is importable from ``vlmindex.metrics`` directly.
"""

from __future__ import annotations

from vlmindex.metrics import registry
from vlmindex.metrics.distribution import (
    calinski_harabasz,
    davies_bouldin,
    distribution_figures,
    fisher_ratio,
    project_2d,
    silhouette_cosine,
)
from vlmindex.metrics.probe import C_GRID, ProbeResult, linear_probe, linear_probe_balanced_accuracy
from vlmindex.metrics.registry import (
    METRICS,
    RETRIEVAL,
    Metric,
    SummaryColumn,
    distribution_columns,
    summary_columns,
)
from vlmindex.metrics.retrieval import RETRIEVAL_METRICS, RetrievalResult, retrieval_metrics
from vlmindex.metrics.statistics import (
    PairedResult,
    bootstrap_ci,
    bootstrap_class_mean_ci,
    bootstrap_mean_ci,
    holm,
    paired_comparison,
    stratified_sample,
    wilcoxon_p,
)

__all__ = [
    "C_GRID",
    "METRICS",
    "RETRIEVAL",
    "RETRIEVAL_METRICS",
    "Metric",
    "PairedResult",
    "ProbeResult",
    "RetrievalResult",
    "SummaryColumn",
    "bootstrap_ci",
    "bootstrap_class_mean_ci",
    "bootstrap_mean_ci",
    "calinski_harabasz",
    "davies_bouldin",
    "distribution_columns",
    "distribution_figures",
    "fisher_ratio",
    "holm",
    "linear_probe",
    "linear_probe_balanced_accuracy",
    "paired_comparison",
    "project_2d",
    "registry",
    "retrieval_metrics",
    "silhouette_cosine",
    "stratified_sample",
    "summary_columns",
    "wilcoxon_p",
]
