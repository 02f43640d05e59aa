"""Table ``conditions``: the overlay recipes of each dataset, stored as JSON (``clean`` is implicit)."""

from __future__ import annotations

from datetime import datetime

import duckdb

from vlmindex.catalog import dependencies
from vlmindex.catalog.keys import CLEAN
from vlmindex.catalog.workspace import Workspace, transaction


def recipe_json(con: duckdb.DuckDBPyConnection, dataset: str, name: str) -> str | None:
    """The stored recipe of condition ``name`` of ``dataset``; None when there is none."""
    rows = con.execute("SELECT recipe FROM conditions WHERE dataset = ? AND name = ?", [dataset, name]).fetchall()
    return str(rows[0][0]) if rows else None


def names(con: duckdb.DuckDBPyConnection, dataset: str) -> list[str]:
    """``clean`` and the dataset's registered conditions, sorted."""
    rows = con.execute("SELECT name FROM conditions WHERE dataset = ? ORDER BY name", [dataset]).fetchall()
    return [CLEAN] + [r[0] for r in rows]


def rows(con: duckdb.DuckDBPyConnection, dataset: str | None = None) -> list[tuple[str, str, str, datetime]]:
    """``(dataset, name, recipe JSON, created_at)`` of every registered condition (of ``dataset``)."""
    sql, args = "SELECT dataset, name, recipe, created_at FROM conditions", []
    if dataset is not None:
        sql += " WHERE dataset = ?"
        args.append(dataset)
    return con.execute(sql + " ORDER BY dataset, name", args).fetchall()


def put(con: duckdb.DuckDBPyConnection, ws: Workspace, dataset: str, name: str, recipe: str, *,
        replace: bool) -> None:
    """Register (or, with ``replace``, re-register) a condition in one transaction. Replacing it
    drops everything computed from the old pixels (``dependencies.drop``)."""
    stale: list = []
    with transaction(con):
        if replace:
            stale = dependencies.drop_rows(con, ws, dataset, name)
        con.execute("DELETE FROM conditions WHERE dataset = ? AND name = ?", [dataset, name])
        con.execute("INSERT INTO conditions (dataset, name, recipe, created_at) VALUES (?, ?, ?, ?)",
                    [dataset, name, recipe, datetime.now()])
    dependencies.remove_files(stale)


def remove(con: duckdb.DuckDBPyConnection, ws: Workspace, dataset: str, name: str) -> None:
    """Delete a condition with everything computed from its pixels."""
    with transaction(con):
        stale = dependencies.drop_rows(con, ws, dataset, name)
        con.execute("DELETE FROM conditions WHERE dataset = ? AND name = ?", [dataset, name])
    dependencies.remove_files(stale)


def exists(con: duckdb.DuckDBPyConnection, dataset: str, name: str) -> bool:
    return bool(con.execute("SELECT 1 FROM conditions WHERE dataset = ? AND name = ?", [dataset, name]).fetchall())

