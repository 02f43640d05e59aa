"""One self-contained HTML report of a workspace's analyses (``vlmindex report``).

Two steps, one module each:

- :mod:`~vlmindex.report.data`: :func:`collect` reads the catalog and computes every number, interval,
  test and projection the page shows into a typed :class:`~vlmindex.report.data.ReportData`;
- :mod:`~vlmindex.report.sections`: :func:`render` builds the page from that data alone;

with :mod:`~vlmindex.report.options` (what is asked, what writing gave), :mod:`~vlmindex.report.plots`
(the inline SVG charts) and ``style.css`` (the page's stylesheet, a package data file).

The statistics are those of :mod:`vlmindex.metrics.statistics`, re-exported here because callers
and tests import them from this package.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vlmindex.catalog import Workspace
from vlmindex.catalog.workspace import atomic_write_bytes
from vlmindex.errors import VlmindexError
from vlmindex.metrics.statistics import PairedResult, bootstrap_mean_ci, holm, paired_comparison, wilcoxon_p
from vlmindex.report.data import LEADERBOARD_COLUMNS, ReportData, collect, latest_summaries
from vlmindex.report.options import ReportOptions, ReportResult
from vlmindex.report.sections import SECTIONS, render

__all__ = [
    "LEADERBOARD_COLUMNS", "SECTIONS", "PairedResult", "ReportData", "ReportOptions", "ReportResult",
    "bootstrap_mean_ci", "build_report", "collect", "holm", "latest_summaries", "paired_comparison", "render",
    "wilcoxon_p", "write_report",
]


def build_report(ws: Workspace, options: ReportOptions | None = None,
                 notes: list[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The report's HTML and the summary rows it shows; raises when nothing has been analysed.

    Notes for the command line (a model with too few points to project, ...) are appended to ``notes``.
    """
    opts = options or ReportOptions()
    data = collect(ws, opts)
    if notes is not None:
        notes.extend(data.notes)
    return render(data, opts), data.summaries


def write_report(ws: Workspace, out: str | Path, options: ReportOptions | None = None) -> ReportResult:
    """Build the report and write it atomically to ``out``."""
    t0 = time.perf_counter()
    notes: list[str] = []
    page, summaries = build_report(ws, options, notes)
    path = Path(out).expanduser().resolve()
    if path.is_dir():
        raise VlmindexError(f"--out {out} is a directory; give a file name such as {path / 'report.html'}")
    data = page.encode("utf-8")
    atomic_write_bytes(path, data)
    return ReportResult(path=path, n_analyses=len(summaries),
                        datasets=sorted({s["dataset"] for s in summaries}), bytes=len(data),
                        seconds=time.perf_counter() - t0, notes=notes)
