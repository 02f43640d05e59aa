"""The connection ``vlmindex sql`` runs user SQL on: the catalog, the Parquet views, nothing else.

DuckDB's own settings do the confining, not string filtering: ``enable_external_access = false``
turns off every file and network access a statement could make (``COPY ... TO``, ``read_text``,
``read_parquet``, ``ATTACH``, ``INSTALL``, ``LOAD``, ``EXPORT``), extension auto-install/-load and
Python replacement scans are off, and ``lock_configuration`` stops a statement from turning any of
it back on. The Parquet views still work because their data reaches DuckDB as Arrow streams that
vlmindex opened (``catalog.views``), not as file paths DuckDB would open itself.

Read-only (the default) opens the catalog read-only, so nothing in the workspace can change.
``--write`` opens it read-write under the workspace lock: catalog tables may change, files may not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import duckdb

from vlmindex.catalog import views
from vlmindex.catalog.workspace import CONNECT_WAIT, Workspace, sql_dir
from vlmindex.errors import VlmindexError

SANDBOX_CONFIG = {
    "enable_external_access": "false",
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
    "allow_community_extensions": "false",
    "allow_unsigned_extensions": "false",
    "allow_persistent_secrets": "false",
    "python_enable_replacements": "false",
}


@contextlib.contextmanager
def connect(ws: Workspace, *, write: bool = False, wait: float = CONNECT_WAIT) -> Iterator[duckdb.DuckDBPyConnection]:
    """A sandboxed catalog connection (see the module docstring)."""
    with ws.read(wait=wait, views=False):
        pass  # creates or migrates the schema, with DuckDB's ordinary settings, before sandboxing
    with ws.lock(wait=wait) if write else contextlib.nullcontext():
        con = ws.connect(read_only=not write, wait=wait, config=SANDBOX_CONFIG)
        try:
            views.register(con, ws)
            con.execute("SET lock_configuration = true")
            yield con
        finally:
            con.close()


# Statement kinds user SQL may hold: reads everywhere, row changes (and tables of one's own) with
# --write. Transactions are vlmindex's: the whole string runs in one, or not at all.
_READ = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA,
         duckdb.StatementType.CALL}
_WRITE = _READ | {duckdb.StatementType.INSERT, duckdb.StatementType.UPDATE, duckdb.StatementType.DELETE,
                  duckdb.StatementType.CREATE, duckdb.StatementType.DROP, duckdb.StatementType.ALTER}


def run(ws: Workspace, sql: str, params: dict[str, Any] | None = None, *, write: bool = False
        ) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Run user SQL in the sandbox: ``(columns, rows)`` of the last statement, or None when it
    returns no rows.

    With ``write``, every statement runs in one transaction that is rolled back on any error, and
    also when the statements changed one of vlmindex's own tables, views or functions (its tables
    may gain and lose rows, nothing else), so a mistaken or hostile statement cannot leave the
    catalog half-changed or redefine what vlmindex's own SQL means. Errors become one-line
    :class:`VlmindexError` messages.
    """
    allowed = _WRITE if write else _READ
    with connect(ws, write=write) as con:
        try:
            statements = con.extract_statements(sql)
            bad = [st for st in statements if st.type not in allowed]
            if bad:
                kind = bad[0].type.name.lower()
                # Point to --write only where it would run the statement.
                hint = "; pass --write to change catalog tables" if not write and bad[0].type in _WRITE else ""
                raise VlmindexError(f"SQL error: vlmindex sql does not run {kind} statements "
                                    f"({' '.join(bad[0].query.split())[:80]}){hint}")
            if not statements:
                return None
            if write:
                before = _owned_objects(con)
                con.execute("BEGIN TRANSACTION")
            try:
                for st in statements[:-1]:
                    con.execute(st.query)
                last = statements[-1].query
                cur = con.execute(last, params) if params else con.execute(last)
                result = None
                if cur.description is not None:
                    columns = [d[0] for d in cur.description]
                    result = columns, [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
                if write:
                    changed = _changed_objects(before, _owned_objects(con))
                    if changed:
                        raise VlmindexError(
                            f"SQL error: --write may change the rows of catalog tables, not vlmindex's own "
                            f"{changed}; nothing was changed")
                    con.execute("COMMIT")
            except BaseException:
                if write:
                    con.execute("ROLLBACK")
                raise
            return result
        except duckdb.Error as exc:
            msg = " ".join(str(exc).split())
            if not write and "read-only" in msg.lower():
                msg += " (pass --write to change the catalog)"
            if "disabled by configuration" in msg or "configuration has been locked" in msg:
                msg += " (vlmindex sql reads and writes only the workspace's catalog)"
            raise VlmindexError(f"SQL error: {msg}") from None


def _expected_names() -> set[str]:
    """The tables and views vlmindex's schema creates (schema.sql run on an empty database)."""
    mem = duckdb.connect()
    try:
        mem.execute((sql_dir() / "schema.sql").read_text())
        return {r[0] for r in mem.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        mem.close()


def _owned_objects(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    names = sorted(_expected_names())
    tables = con.execute(
        "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main' "
        "AND table_catalog = current_database() AND table_name IN (SELECT unnest(?))", [names]).fetchall()
    columns = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'main' "
        "AND table_catalog = current_database() AND table_name IN (SELECT unnest(?)) ORDER BY ALL", [names]).fetchall()
    views = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT temporary AND NOT internal "
                        "AND view_name IN (SELECT unnest(?)) ORDER BY view_name", [names]).fetchall()
    functions = con.execute("SELECT function_name FROM duckdb_functions() WHERE NOT internal AND "
                            "database_name = current_database() ORDER BY ALL").fetchall()
    return {"tables": sorted(tables), "columns": columns, "views": views, "functions": functions}


def _changed_objects(before: dict[str, Any], after: dict[str, Any]) -> str:
    return ", ".join(what for what in ("tables", "columns", "views", "functions") if before[what] != after[what])
