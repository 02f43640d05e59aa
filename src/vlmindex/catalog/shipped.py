"""The shipped SQL analyses (``sql/*.sql``), found and expanded here, run like any user SQL.

Each file starts with a ``--`` line that says what it shows. A file may hold ``{{name}}``
placeholders that vlmindex fills from its own tables, so a list that must match the metric
registry (``vlmindex.metrics.registry``) is written once: ``{{leaderboard_metrics}}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from vlmindex.catalog.workspace import sql_dir
from vlmindex.errors import VlmindexError


def queries() -> dict[str, Path]:
    """Shipped analyses by name (the schema is not one)."""
    return {p.stem: p for p in sorted(sql_dir().glob("*.sql")) if p.stem != "schema"}


def description(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("--"):
            return line.lstrip("- ").strip()
    return ""


def _placeholders() -> dict[str, str]:
    """``{{leaderboard_metrics}}``: ``round(<summaries column>, 4) AS <leaderboard column>`` for each
    headline column the leaderboard shows, from the metric registry's names."""
    from vlmindex.metrics.registry import leaderboard_columns

    metrics = ",\n       ".join(f"round({col}, 4) AS {name}" for col, name in leaderboard_columns())
    return {"leaderboard_metrics": metrics}


def text(name: str) -> str:
    """The SQL of shipped analysis ``name`` with its placeholders filled."""
    found = queries()
    if name not in found:
        raise VlmindexError(f"no shipped analysis {name!r}; see `vlmindex sql --list`")
    sql = found[name].read_text()
    if "{{" not in sql:
        return sql
    fills = _placeholders()

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in fills:
            raise VlmindexError(f"{found[name]}: unknown placeholder {{{{{m.group(1)}}}}}")
        return fills[m.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", fill, sql)


def run(con: duckdb.DuckDBPyConnection, name: str, *, analysis_ids: Sequence[str] | None = None,
        exclude: Sequence[str] = (), only: dict[str, Sequence[Any]] | None = None,
        columns: Sequence[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of a shipped analysis, optionally only rows of some ``analysis_id``s (or whose
    ``only`` columns hold one of the given values), and only some ``columns`` or all but ``exclude``."""
    sql = text(name).rstrip().rstrip(";")
    filters = dict(only or {})
    if analysis_ids is not None:
        filters["analysis_id"] = analysis_ids
    if filters or exclude or columns:
        pick = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        drop = f" EXCLUDE ({', '.join(exclude)})" if exclude else ""
        where = " AND ".join(f'"{c}" IN (SELECT unnest(?))' for c in filters)
        sql = f"SELECT {pick}{drop} FROM ({sql})" + (f" WHERE {where}" if where else "")
    cur = con.execute(sql, [list(v) for v in filters.values()])
    cols = [c[0] for c in cur.description]
    return cols, [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
