"""Which stored results are computed from which inputs: one declared table drives every cascade.

When a dataset's pixels change (``ingest``/``synth --replace``), a condition is replaced or
removed, or a run's embeddings are removed, everything computed from them is dropped, rows first
(in the caller's transaction) and files after the commit. Dropping is hygiene, not what keeps
numbers right: every derived result also records the fingerprints of its inputs and is never read
as current once they differ, so a file left behind by a crash between the two steps is stale,
never wrong.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from vlmindex.catalog.keys import CLEAN
from vlmindex.catalog.workspace import Workspace, slug


@dataclass(frozen=True)
class Derived:
    """One kind of stored result."""

    name: str                    # a catalog table, or a folder of the workspace
    kind: str                    # "table" or "files"
    made_from: tuple[str, ...]   # "pixels", "labels", or the names of other Derived entries
    reads_clean: bool = False    # an overlay condition's rows are read against the clean run too
    rows: str | None = None      # for tables shared with other stages: which rows are derived


DERIVED: tuple[Derived, ...] = (
    Derived("embeddings", "files", ("pixels",)),
    Derived("runs", "table", ("embeddings",)),
    Derived("skipped", "table", ("pixels",), rows="stage = 'embed'"),  # images an embed could not read
    Derived("text_detections", "table", ("pixels",)),
    Derived("indexes", "files", ("embeddings",)),
    Derived("neighbors", "files", ("embeddings",)),
    Derived("summaries", "table", ("embeddings", "labels")),
    Derived("query_metrics", "table", ("embeddings", "labels")),
    Derived("overlay_effects", "table", ("embeddings", "labels"), reads_clean=True),
    Derived("attack_queries", "table", ("embeddings", "labels"), reads_clean=True),
    Derived("zeroshot_results", "table", ("embeddings", "labels"), reads_clean=True),
    # exact pairs (model and condition NULL) from the images' bytes and pixels; near pairs from one
    # model's embeddings of one condition; both describe the pair by split, group and label
    Derived("duplicates", "table", ("pixels", "labels"), rows="kind <> 'near'"),
    Derived("duplicates", "table", ("embeddings", "labels"), rows="kind = 'near'"),
    Derived("duplicate_searches", "table", ("pixels", "labels"), rows="kind <> 'near'"),
    Derived("duplicate_searches", "table", ("embeddings", "labels"), rows="kind = 'near'"),
)


def affected_by(change: str) -> list[Derived]:
    """Every entry computed, directly or through others, from ``change``."""
    hit: list[Derived] = []
    frontier = {change}
    while frontier:
        new = [d for d in DERIVED if d not in hit and frontier & set(d.made_from)]
        hit += new
        frontier = {d.name for d in new}
    return hit


def drop_rows(con: duckdb.DuckDBPyConnection, ws: Workspace, dataset: str, condition: str | None = None, *,
              model: str | None = None, change: str = "pixels") -> list[Path]:
    """Delete the rows computed from ``change`` of a dataset (one condition, one model); return the
    files to remove once the caller has committed (:func:`remove_files`)."""
    files: list[Path] = []
    for d in affected_by(change):
        if d.kind == "files":
            files += _paths(ws, d.name, dataset, condition, model)
            continue
        where, args = ["dataset = ?"], [dataset]
        if condition is not None and not (d.reads_clean and condition == CLEAN):
            where.append("condition = ?")
            args.append(condition)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if d.rows:
            where.append(d.rows)
        con.execute(f"DELETE FROM {d.name} WHERE {' AND '.join(where)}", args)
    return files


def drop(con: duckdb.DuckDBPyConnection, ws: Workspace, dataset: str, condition: str | None = None, *,
         model: str | None = None, change: str = "pixels") -> None:
    """:func:`drop_rows` and :func:`remove_files` at once, for callers outside a transaction."""
    remove_files(drop_rows(con, ws, dataset, condition, model=model, change=change))


def remove_files(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _paths(ws: Workspace, kind: str, dataset: str, condition: str | None, model: str | None) -> list[Path]:
    root = ws.root / kind
    model_dirs = [root / slug(model)] if model is not None else (
        sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    out: list[Path] = []
    for m in model_dirs:
        d = m / slug(dataset)
        if condition is None:
            out.append(d)
        elif kind == "indexes":
            out += [d / f"{slug(condition)}.faiss", d / f"{slug(condition)}.json"]
        else:
            out.append(d / slug(condition))
    return [p for p in out if p.exists()]
