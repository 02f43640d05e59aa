"""Tables ``datasets``, ``images`` and ``skipped``: what was ingested, and what could not be."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa

from vlmindex.errors import VlmindexError

IMAGE_COLUMNS = ["image_id", "dataset", "path", "source_path", "label", "split", "group_id", "modality",
                 "width", "height", "sha256", "ingested_at", "pixel_sha256"]


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


# -- datasets ------------------------------------------------------------------------------------


def dataset_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute("SELECT name FROM datasets ORDER BY name").fetchall()]


def require_dataset(con: duckdb.DuckDBPyConnection, name: str) -> None:
    if con.execute("SELECT 1 FROM datasets WHERE name = ?", [name]).fetchall():
        return
    known = dataset_names(con)
    hint = f"known datasets: {', '.join(known)}" if known else "the workspace has none yet"
    raise VlmindexError(
        f"unknown dataset {name!r} ({hint}); add it with `vlmindex ingest` or `vlmindex synth`"
    )


def dataset_record(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, Any] | None:
    """The ``datasets`` row of ``name`` (options parsed), or None."""
    rows = _dicts(con.execute("SELECT * FROM datasets WHERE name = ?", [name]))
    if not rows:
        return None
    row = rows[0]
    row["options"] = json.loads(row["options"] or "{}")
    return row


def upsert_dataset(con: duckdb.DuckDBPyConnection, *, name: str, fmt: str, source: str, options: dict[str, Any],
                   n_skipped: int, now: datetime) -> int:
    """Write the ``datasets`` row of ``name`` after an ingest; returns its image count."""
    total = con.execute("SELECT count(*) FROM images WHERE dataset = ?", [name]).fetchall()[0][0]
    con.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
                [name, fmt, source, json.dumps(options), total, n_skipped, now])
    return int(total)


def clear_dataset(con: duckdb.DuckDBPyConnection, name: str, *, images: bool) -> None:
    """Forget a dataset's skipped files (and its images, for ``--replace``) before an ingest."""
    if images:
        con.execute("DELETE FROM images WHERE dataset = ?", [name])
    con.execute("DELETE FROM skipped WHERE dataset = ?", [name])


def dataset_summaries(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """One row per dataset: format, modalities, classes, and image counts per split."""
    out = _dicts(con.execute(
        """
        SELECT d.name, d.format,
               string_agg(DISTINCT i.modality, ', ' ORDER BY i.modality) AS modality,
               count(DISTINCT i.label) AS n_classes,
               string_agg(DISTINCT i.label, ', ' ORDER BY i.label) AS classes,
               count(i.image_id) AS images,
               count(DISTINCT i.group_id) AS groups,
               d.n_skipped AS skipped,
               d.source
        FROM datasets d LEFT JOIN images i ON i.dataset = d.name
        GROUP BY ALL ORDER BY d.name
        """
    ))
    per: dict[str, dict[str, int]] = {}
    for ds, split, n in con.execute(
        "SELECT dataset, coalesce(split, '(none)'), count(*) FROM images GROUP BY ALL ORDER BY ALL"
    ).fetchall():
        per.setdefault(ds, {})[split] = n
    by_modality: dict[str, dict] = {}
    for ds, modality, label, n in con.execute(
        "SELECT dataset, coalesce(modality, '(none)'), coalesce(label, '(none)'), count(*) FROM images "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall():
        by_modality.setdefault(ds, {}).setdefault(modality, {})[label] = n
    group_sizes = {ds: {"min": lo, "max": hi, "mean": round(mean, 2)} for ds, lo, hi, mean in con.execute(
        "SELECT dataset, min(n), max(n), avg(n) FROM "
        "(SELECT dataset, group_id, count(*) AS n FROM images GROUP BY ALL) GROUP BY dataset"
    ).fetchall()}
    for row in out:
        row["splits"] = per.get(row["name"], {})
        row["modalities"] = by_modality.get(row["name"], {})
        row["images_per_group"] = group_sizes.get(row["name"])
    return out


# -- images --------------------------------------------------------------------------------------


def insert_images(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    """Insert or refresh image rows; refuse a known image whose file content changed."""
    if not rows:
        return
    batch = pa.Table.from_pylist(rows).select(IMAGE_COLUMNS)
    con.register("_vlm_image_batch", batch)
    try:
        changed = con.execute(
            "SELECT i.path FROM images i JOIN _vlm_image_batch b USING (image_id) WHERE i.sha256 <> b.sha256 LIMIT 1"
        ).fetchall()
        if changed:
            # Embeddings are keyed by image_id: new pixels under an old id would silently keep old vectors.
            raise VlmindexError(
                f"{changed[0][0]} changed since it was ingested; re-ingest with --replace, which also drops "
                "the dataset's embeddings and results"
            )
        cols = ", ".join(IMAGE_COLUMNS)
        con.execute(f"INSERT OR REPLACE INTO images ({cols}) SELECT {cols} FROM _vlm_image_batch")
    finally:
        con.unregister("_vlm_image_batch")


def images(con: duckdb.DuckDBPyConnection, dataset: str, *, columns: Sequence[str] = IMAGE_COLUMNS,
           labelled: bool = False, modality: str | None = None, split: str | None = None,
           ids: Iterable[int] | None = None, order: str = "image_id") -> list[tuple[Any, ...]]:
    """Rows of ``images`` of a dataset (optionally labelled only, one modality, one split, some ids)."""
    bad = [c for c in (*columns, order) if c not in IMAGE_COLUMNS]
    if bad:
        raise ValueError(f"not an images column: {bad}")
    sql, args = f"SELECT {', '.join(columns)} FROM images WHERE dataset = ?", [dataset]
    if labelled:
        sql += " AND label IS NOT NULL"
    if modality is not None:
        sql += " AND modality = ?"
        args.append(modality)
    if split is not None:
        sql += " AND split = ?"
        args.append(split)
    if ids is not None:
        sql += " AND image_id IN (SELECT unnest(?))"
        args.append([int(i) for i in ids])
    return con.execute(f"{sql} ORDER BY {order}", args).fetchall()


def images_by_id(con: duckdb.DuckDBPyConnection, ids: Iterable[int],
                 columns: Sequence[str] = ("path", "label")) -> dict[int, tuple[Any, ...]]:
    """``image_id -> (columns...)`` for the given ids, whatever their dataset."""
    bad = [c for c in columns if c not in IMAGE_COLUMNS]
    if bad:
        raise ValueError(f"not an images column: {bad}")
    rows = con.execute(f"SELECT image_id, {', '.join(columns)} FROM images WHERE image_id IN (SELECT unnest(?))",
                       [[int(i) for i in ids]]).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def class_names(con: duckdb.DuckDBPyConnection, dataset: str) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT DISTINCT label FROM images WHERE dataset = ? AND label IS NOT NULL ORDER BY label",
        [dataset],
    ).fetchall()]


def class_pools(con: duckdb.DuckDBPyConnection, dataset: str) -> dict[str | None, list[str]]:
    """Sorted class names per modality of a dataset.

    A ``wrong-label`` overlay draws from the image's own modality, so a chest X-ray is never
    labelled "melanoma": that would test a model's reading, not its pull toward a plausible class.
    """
    pools: dict[str | None, list[str]] = {}
    for modality, label in con.execute(
        "SELECT DISTINCT modality, label FROM images WHERE dataset = ? AND label IS NOT NULL "
        "ORDER BY modality, label", [dataset],
    ).fetchall():
        pools.setdefault(modality, []).append(label)
    return pools


def modalities(con: duckdb.DuckDBPyConnection, dataset: str) -> tuple[list[str], int]:
    """(sorted modalities of a dataset's labelled images, labelled images with no modality)."""
    rows = con.execute("SELECT modality, count(*) FROM images WHERE dataset = ? AND label IS NOT NULL "
                       "GROUP BY modality ORDER BY modality NULLS LAST", [dataset]).fetchall()
    return [m for m, _ in rows if m is not None], int(sum(n for m, n in rows if m is None))


def query_counts(con: duckdb.DuckDBPyConnection, dataset: str, *, split: str | None = None) -> dict[str, int]:
    """``modality -> labelled images`` of a dataset (of one split when given)."""
    sql, args = "SELECT modality, count(*) FROM images WHERE dataset = ? AND label IS NOT NULL", [dataset]
    if split is not None:
        sql += " AND split = ?"
        args.append(split)
    return {r[0]: int(r[1]) for r in con.execute(sql + " GROUP BY modality", args).fetchall() if r[0] is not None}


def label_counts(con: duckdb.DuckDBPyConnection, dataset: str) -> tuple[int, int]:
    """(images without a label, distinct labels) of a dataset."""
    row = con.execute("SELECT count(*) FILTER (WHERE label IS NULL), count(DISTINCT label) FROM images "
                      "WHERE dataset = ?", [dataset]).fetchall()[0]
    return int(row[0]), int(row[1])


def preview_rows(con: duckdb.DuckDBPyConnection, dataset: str, n: int) -> list[tuple[Any, ...]]:
    """``(image_id, path, label, modality)`` of ``n`` images taken round-robin over classes."""
    return con.execute(
        """
        SELECT image_id, path, label, modality FROM (
            SELECT image_id, path, label, modality,
                   row_number() OVER (PARTITION BY label ORDER BY image_id) AS k
            FROM images WHERE dataset = ?)
        ORDER BY k, label NULLS LAST, image_id
        LIMIT ?
        """,
        [dataset, n],
    ).fetchall()


# -- skipped -------------------------------------------------------------------------------------


def record_skips(con: duckdb.DuckDBPyConnection, dataset: str, skips: Sequence[tuple[str, str]], *,
                 stage: str, model: str | None = None, condition: str | None = None,
                 now: datetime | None = None) -> None:
    """Rows in ``skipped`` for files a stage could not use, with the reason."""
    if not skips:
        return
    now = now or datetime.now()
    con.executemany(
        "INSERT INTO skipped (dataset, path, reason, skipped_at, stage, model, condition) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(dataset, path, reason, now, stage, model, condition) for path, reason in skips],
    )
