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
from vlmindex.catalog.workspace import CONNECT_WAIT, Workspace
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


def run(ws: Workspace, sql: str, params: dict[str, Any] | None = None, *, write: bool = False
        ) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Run user SQL in the sandbox: ``(columns, rows)``, or None for a statement without a result.

    Errors become one-line :class:`VlmindexError` messages that say what the sandbox refused.
    """
    with connect(ws, write=write) as con:
        try:
            cur = con.execute(sql, params) if params else con.execute(sql)
        except duckdb.Error as exc:
            msg = " ".join(str(exc).split())
            if not write and "read-only" in msg.lower():
                msg += " (pass --write to change the catalog)"
            if "disabled by configuration" in msg or "configuration has been locked" in msg:
                msg += " (vlmindex sql reads and writes only the workspace's catalog)"
            raise VlmindexError(f"SQL error: {msg}") from None
        if cur.description is None:
            return None
        columns = [d[0] for d in cur.description]
        return columns, [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
