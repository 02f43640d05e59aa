"""Tables of derived results: ``summaries``, ``query_metrics``, ``overlay_effects``,
``zeroshot_results`` and ``text_detections``, and the neighbour files beside them.

Writers are called inside :func:`vlmindex.catalog.fingerprints.committing` (after the check that
their inputs did not change); each replaces its own earlier rows in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from vlmindex.catalog import parts
from vlmindex.catalog.keys import RunKey
from vlmindex.catalog.workspace import Workspace, transaction
from vlmindex.errors import VlmindexError

# Tables whose rows carry an ``inputs_fingerprint``.
FINGERPRINTED = ("summaries", "overlay_effects", "zeroshot_results")


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    return " AND ".join(f"{c} = ?" for c in filters), list(filters.values())


def stored_fingerprints(con: duckdb.DuckDBPyConnection, table: str, filters: dict[str, Any]) -> set[str | None]:
    """The distinct ``inputs_fingerprint`` values of the rows of ``table`` matching ``filters``."""
    if table not in FINGERPRINTED:
        raise ValueError(f"{table} stores no fingerprints")
    where, args = _where(filters)
    return {r[0] for r in con.execute(f"SELECT DISTINCT inputs_fingerprint FROM {table} WHERE {where}",
                                      args).fetchall()}


# -- analyses ------------------------------------------------------------------------------------


def store_analysis(con: duckdb.DuckDBPyConnection, ws: Workspace, key: RunKey, summary: dict[str, Any],
                   per_query: pa.Table, neighbors: pa.Table) -> None:
    """Replace analysis ``summary['analysis_id']``: its summary row, per-query rows and neighbour file."""
    analysis_id = summary["analysis_id"]
    path = ws.neighbors_dir(key.model, key.dataset, key.condition) / f"{analysis_id}.parquet"
    with transaction(con):
        con.execute("DELETE FROM query_metrics WHERE analysis_id = ?", [analysis_id])
        con.execute("DELETE FROM summaries WHERE analysis_id = ?", [analysis_id])
        con.register("_vlm_per_query", per_query)
        con.execute("INSERT INTO query_metrics BY NAME SELECT * FROM _vlm_per_query")
        con.unregister("_vlm_per_query")
        cols = ", ".join(summary)
        con.execute(f"INSERT INTO summaries ({cols}) VALUES ({', '.join('?' * len(summary))})",
                    list(summary.values()))
        # The file goes in last; one left by a crash before COMMIT carries a fingerprint that no
        # summaries row has, and the neighbors view leaves it out.
        parts.write_table_atomic(neighbors.cast(parts.NEIGHBOR_SCHEMA), path)


def summary_fingerprint(con: duckdb.DuckDBPyConnection, analysis_id: str) -> str | None:
    rows = con.execute("SELECT inputs_fingerprint FROM summaries WHERE analysis_id = ?", [analysis_id]).fetchall()
    return rows[0][0] if rows else None


def latest_summaries(con: duckdb.DuckDBPyConnection, dataset: str | None = None,
                     analysis_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ``latest_summaries`` view (provenance parsed), in blocks of dataset, modality (all
    modalities first) and condition (clean first); best mAP first within a block."""
    where, args = [], []
    if dataset:
        where.append("dataset = ?")
        args.append(dataset)
    if analysis_ids is not None:
        where.append("analysis_id IN (SELECT unnest(?))")
        args.append(list(analysis_ids))
    sql = ("SELECT * FROM latest_summaries" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY dataset, modality NULLS FIRST, condition <> 'clean', condition, sampled_queries NULLS FIRST,"
           " map_micro DESC NULLS LAST, model")
    rows = _dicts(con.execute(sql, args))
    for r in rows:
        try:
            r["provenance"] = json.loads(r["provenance"]) if r.get("provenance") else {}
        except ValueError:
            r["provenance"] = {"unparsed": str(r["provenance"])}
    return rows


def analysed_datasets(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute("SELECT DISTINCT dataset FROM summaries ORDER BY 1").fetchall()]


def per_query(con: duckdb.DuckDBPyConnection, analysis_ids: list[str]) -> pa.Table:
    """``analysis_id, image_id, ap, purity_at_k, knn_correct, label, unit`` of the given analyses, as Arrow.

    ``unit`` is the statistical unit of a query: its group, or the image itself when it has none.
    """
    return con.sql(
        "SELECT q.analysis_id, q.image_id, q.ap, q.purity_at_k, q.knn_correct, q.label, "
        "coalesce(i.group_id, 'image:' || q.image_id::VARCHAR) AS unit "
        "FROM query_metrics q LEFT JOIN images i ON i.image_id = q.image_id "
        "WHERE list_contains(?, q.analysis_id) ORDER BY q.analysis_id, q.image_id",
        params=[analysis_ids]).to_arrow_table()


# -- overlay effects -----------------------------------------------------------------------------

OVERLAY_COLUMNS = ["model", "dataset", "condition", "k", "exclude_group", "figure", "value", "ci_low", "ci_high",
                   "n", "baseline", "n_boot", "seed", "note", "created_at", "inputs_fingerprint"]


def store_overlay_effects(con: duckdb.DuckDBPyConnection, key: RunKey, *, k: int, exclude_group: bool,
                          rows: list[dict[str, Any]], attack: pa.Table | None = None) -> None:
    """Replace the figures of ``key`` (an overlay condition against clean) for one (k, exclude_group),
    and with ``attack`` (the :data:`ATTACK_QUERY_COLUMNS` the figures are means of) its per-query rows."""
    where = "model = ? AND dataset = ? AND condition = ? AND k = ? AND exclude_group = ?"
    args = [key.model, key.dataset, key.condition, k, exclude_group]
    with transaction(con):
        con.execute(f"DELETE FROM overlay_effects WHERE {where}", args)
        con.executemany(f"INSERT INTO overlay_effects ({', '.join(OVERLAY_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(OVERLAY_COLUMNS))})",
                        [[r.get(c) for c in OVERLAY_COLUMNS] for r in rows])
        con.execute(f"DELETE FROM attack_queries WHERE {where}", args)
        if attack is not None and attack.num_rows:
            con.register("_vlm_attack", attack.select(ATTACK_QUERY_COLUMNS))
            con.execute(f"INSERT INTO attack_queries ({', '.join(ATTACK_QUERY_COLUMNS)}) "
                        f"SELECT {', '.join(ATTACK_QUERY_COLUMNS)} FROM _vlm_attack")
            con.unregister("_vlm_attack")


ATTACK_QUERY_COLUMNS = ["model", "dataset", "condition", "k", "exclude_group", "image_id", "label", "modality",
                        "written", "ap_clean", "ap_attack", "knn_correct_clean", "knn_correct_attack",
                        "attack_success", "created_at", "inputs_fingerprint"]


def attack_query_rows(con: duckdb.DuckDBPyConnection, dataset: str) -> pa.Table:
    """The ``attack_queries`` rows of ``dataset`` whose overlay figures are still stored, with each
    query's statistical ``unit`` (its group, or the image itself), as Arrow."""
    return con.sql(
        "SELECT a.*, coalesce(i.group_id, 'image:' || a.image_id::VARCHAR) AS unit FROM attack_queries a "
        "LEFT JOIN images i ON i.image_id = a.image_id WHERE a.dataset = ? AND EXISTS (SELECT 1 FROM "
        "overlay_effects o WHERE o.model = a.model AND o.dataset = a.dataset AND o.condition = a.condition "
        "AND o.k = a.k AND o.exclude_group = a.exclude_group AND o.inputs_fingerprint = a.inputs_fingerprint) "
        "ORDER BY a.condition, a.k, a.exclude_group, a.model, a.image_id", params=[dataset]).to_arrow_table()


def attacked_datasets(con: duckdb.DuckDBPyConnection, dataset: str | None = None) -> list[str]:
    """Datasets with stored per-query attack rows (of ``dataset`` only, when given)."""
    return [r[0] for r in con.execute("SELECT DISTINCT dataset FROM attack_queries WHERE ? IS NULL OR dataset = ? "
                                      "ORDER BY 1", [dataset, dataset]).fetchall()]


def attack_effects(con: duckdb.DuckDBPyConnection, dataset: str) -> list[dict[str, Any]]:
    """The stored overlay effects of ``dataset`` that have per-query attack rows: what
    ``bias.is_current`` needs to tell whether each is still current."""
    return _dicts(con.execute(
        "SELECT DISTINCT o.model, o.condition, o.k, o.exclude_group, o.n_boot, o.seed, o.inputs_fingerprint "
        "FROM overlay_effects o WHERE o.dataset = ? AND EXISTS (SELECT 1 FROM attack_queries a WHERE "
        "a.inputs_fingerprint = o.inputs_fingerprint AND a.model = o.model AND a.dataset = o.dataset) "
        "ORDER BY 1, 2, 3, 4", [dataset]))


# -- findings ------------------------------------------------------------------------------------

FINDING_COLUMNS = ["dataset", "modality", "condition", "scope", "finding", "claim", "finding_verdict",
                   "finding_reason", "comparison", "a", "b", "metric", "value_a", "value_b", "delta", "ci_low",
                   "ci_high", "expected", "p_value", "p_holm", "verdict", "n_queries", "n_units", "analysis_ids",
                   "effect_fingerprints", "n_boot", "seed", "alpha", "created_at"]


def store_findings(con: duckdb.DuckDBPyConnection, datasets: Sequence[str], rows: list[dict[str, Any]], *,
                   condition: str | None = None) -> None:
    """Replace the ``findings`` rows of ``datasets`` (of one ``condition``, when given) with ``rows``."""
    with transaction(con):
        con.execute("DELETE FROM findings WHERE dataset IN (SELECT unnest(?)) AND (? IS NULL OR condition = ?)",
                    [list(datasets), condition, condition])
        con.executemany(f"INSERT INTO findings ({', '.join(FINDING_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(FINDING_COLUMNS))})",
                        [[r.get(c) for c in FINDING_COLUMNS] for r in rows])


def overlay_effect_rows(con: duckdb.DuckDBPyConnection, dataset: str | None = None) -> list[dict[str, Any]]:
    sql, args = "SELECT * FROM overlay_effects", []
    if dataset:
        sql += " WHERE dataset = ?"
        args.append(dataset)
    return _dicts(con.execute(sql + " ORDER BY dataset, condition, model, figure, k, exclude_group", args))


# -- zero-shot -----------------------------------------------------------------------------------

ZEROSHOT_COLUMNS = ["model", "dataset", "condition", "modality", "n", "n_classes", "accuracy", "balanced_accuracy",
                    "written_share", "written_share_clean", "flip_rate", "n_prompts", "prompts_sha256", "created_at",
                    "inputs_fingerprint"]


def store_zeroshot(con: duckdb.DuckDBPyConnection, model: str, dataset: str, conditions: Sequence[str],
                   rows: list[dict[str, Any]]) -> None:
    """Replace the zero-shot rows of ``model`` on ``dataset`` under ``conditions``."""
    with transaction(con):
        for c in conditions:
            con.execute("DELETE FROM zeroshot_results WHERE model = ? AND dataset = ? AND condition = ?",
                        [model, dataset, c])
        con.executemany(f"INSERT INTO zeroshot_results ({', '.join(ZEROSHOT_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(ZEROSHOT_COLUMNS))})",
                        [[r.get(k) for k in ZEROSHOT_COLUMNS] for r in rows])


# -- text detections -----------------------------------------------------------------------------

DETECTION_COLUMNS = ("dataset", "condition", "image_id", "has_text", "text", "area_fraction", "n_boxes", "score",
                     "boxes", "engine", "error", "detected_at", "pixels")


def detections_todo(con: duckdb.DuckDBPyConnection, dataset: str, condition: str, *,
                    redo: bool) -> tuple[int, list[tuple[Any, ...]]]:
    """(images of the dataset, ``(image_id, path, label, modality, pixels, sha256)`` of those without
    a current detection: none stored, or one made from other pixels). ``redo`` lists every image."""
    n = con.execute("SELECT count(*) FROM images WHERE dataset = ?", [dataset]).fetchall()[0][0]
    todo = con.execute(
        """
        SELECT i.image_id, i.path, i.label, i.modality, x.pixels, i.sha256
        FROM images i JOIN image_pixels x ON x.image_id = i.image_id AND x.dataset = i.dataset AND x.condition = ?
        LEFT JOIN text_detections t ON t.dataset = i.dataset AND t.condition = x.condition AND t.image_id = i.image_id
        WHERE i.dataset = ? AND (? OR t.image_id IS NULL OR t.pixels IS DISTINCT FROM x.pixels)
        ORDER BY i.image_id
        """, [condition, dataset, redo]).fetchall()
    return int(n), todo


def store_detections(ws: Workspace, rows: list[tuple[Any, ...]], *, wait: float) -> None:
    """Insert or replace detection rows (tuples in :data:`DETECTION_COLUMNS` order), keeping only
    those whose pixels are still the image's (a row read from replaced pixels is not stored) and
    error rows without pixels (never current: redone by the next run)."""
    if not rows:
        return
    batch = pa.Table.from_pylist([dict(zip(DETECTION_COLUMNS, r, strict=True)) for r in rows])
    cols = ", ".join(DETECTION_COLUMNS)
    with ws.write(wait=wait) as con, transaction(con):
        con.register("_vlm_detections", batch)
        con.execute(f"INSERT OR REPLACE INTO text_detections ({cols}) "
                    f"SELECT {', '.join('b.' + c for c in DETECTION_COLUMNS)} FROM _vlm_detections b "
                    "JOIN image_pixels x ON x.dataset = b.dataset AND x.condition = b.condition "
                    "AND x.image_id = b.image_id AND (b.pixels IS NULL OR x.pixels = b.pixels)")
        con.unregister("_vlm_detections")


def detection_counts(con: duckdb.DuckDBPyConnection, dataset: str, condition: str) -> tuple[int, int, float | None]:
    """(current rows, rows with text, mean text area among them) of a dataset under a condition."""
    row = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE has_text), avg(area_fraction) FILTER (WHERE has_text) "
        "FROM text_detections t JOIN image_pixels x ON x.dataset = t.dataset AND x.condition = t.condition "
        "AND x.image_id = t.image_id AND x.pixels IS NOT DISTINCT FROM t.pixels "
        "WHERE t.dataset = ? AND t.condition = ?", [dataset, condition]).fetchall()[0]
    return int(row[0]), int(row[1]), row[2]


def neighbor_table(key: RunKey, analysis_id: str, fingerprint: str, query_ids: np.ndarray,
                   neighbor_id: np.ndarray, neighbor_score: np.ndarray) -> pa.Table:
    """The neighbour file of one analysis: one row per query and rank (unfilled ranks dropped)."""
    nq, k = neighbor_id.shape
    valid = neighbor_id.reshape(-1) >= 0
    n = nq * k
    return pa.table({
        "model": pa.array([key.model] * n, pa.string()).dictionary_encode(),
        "dataset": pa.array([key.dataset] * n, pa.string()).dictionary_encode(),
        "condition": pa.array([key.condition] * n, pa.string()).dictionary_encode(),
        "analysis_id": pa.array([analysis_id] * n, pa.string()).dictionary_encode(),
        "image_id": pa.array(np.repeat(query_ids, k)),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), nq)),
        "neighbor_id": pa.array(neighbor_id.reshape(-1).astype(np.int64)),
        "score": pa.array(neighbor_score.reshape(-1).astype(np.float32)),
        "inputs_fingerprint": pa.array([fingerprint] * n, pa.string()).dictionary_encode(),
    }).filter(pa.array(valid))


def neighbors_path(ws: Workspace, key: RunKey, analysis_id: str) -> Path:
    return ws.neighbors_dir(key.model, key.dataset, key.condition) / f"{analysis_id}.parquet"


def read_neighbors(ws: Workspace, key: RunKey, analysis_id: str) -> pa.Table:
    """``image_id, rank, neighbor_id, score`` of one analysis's neighbour file, by query then rank."""
    import pyarrow.parquet as pq

    path = neighbors_path(ws, key, analysis_id)
    if not path.exists():
        raise VlmindexError(f"analysis {analysis_id} has no neighbour file ({path}); rerun `vlmindex analyze "
                            f"{key.cli_args()}`")
    table = pq.read_table(path, columns=["image_id", "rank", "neighbor_id", "score"])
    return table.sort_by([("image_id", "ascending"), ("rank", "ascending")])


def query_metric_table(con: duckdb.DuckDBPyConnection, analysis_id: str) -> pa.Table:
    """``image_id, purity_at_k, ap, knn_pred, knn_correct`` of one analysis's queries, as Arrow."""
    return con.sql("SELECT image_id, purity_at_k, ap, knn_pred, knn_correct FROM query_metrics "
                   "WHERE analysis_id = ? ORDER BY image_id", params=[analysis_id]).to_arrow_table()


def detected_text(con: duckdb.DuckDBPyConnection, dataset: str, condition: str) -> dict[int, str | None]:
    """``image_id -> recognised text`` of the current OCR rows (empty string: read, no text found)."""
    rows = con.execute(
        "SELECT t.image_id, CASE WHEN t.has_text THEN t.text ELSE '' END FROM text_detections t "
        "JOIN image_pixels x ON x.dataset = t.dataset AND x.condition = t.condition "
        "AND x.image_id = t.image_id AND x.pixels IS NOT DISTINCT FROM t.pixels "
        "WHERE t.dataset = ? AND t.condition = ? AND t.error IS NULL", [dataset, condition]).fetchall()
    return {int(r[0]): r[1] for r in rows}
