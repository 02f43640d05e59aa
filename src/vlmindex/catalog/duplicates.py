"""Tables ``duplicates`` and ``duplicate_searches``, and the pixel hashes of ``images`` they start from.

Writers are called inside :func:`vlmindex.catalog.fingerprints.committing` (after the check that
their inputs did not change); each replaces the rows of its own search (a dataset's exact pairs, or
one model and condition's near pairs) in one transaction, so a rerun never leaves two copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from vlmindex.catalog.workspace import transaction

EXACT_KINDS = ("exact-bytes", "exact-pixels")
NEAR = "near"
EXACT = "exact"  # duplicate_searches.kind of a search that finds both exact kinds

PAIR_COLUMNS = ("dataset", "image_id_a", "image_id_b", "kind", "score", "model", "condition", "threshold",
                "same_split", "same_group", "same_label", "created_at", "inputs_fingerprint")
SEARCH_COLUMNS = ("dataset", "kind", "model", "condition", "threshold", "n_images", "n_pairs", "seconds",
                  "created_at", "inputs_fingerprint")


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


# -- pixel hashes --------------------------------------------------------------------------------


def pixel_hash_todo(con: duckdb.DuckDBPyConnection, dataset: str) -> list[tuple[int, str, str]]:
    """``(image_id, path, sha256)`` of the dataset's images without a pixel hash (ingested by a
    vlmindex before the column existed)."""
    return con.execute("SELECT image_id, path, sha256 FROM images WHERE dataset = ? AND pixel_sha256 IS NULL "
                       "ORDER BY image_id", [dataset]).fetchall()


def set_pixel_hashes(con: duckdb.DuckDBPyConnection, rows: Sequence[tuple[int, str, str]]) -> int:
    """Record ``(image_id, sha256, pixel_sha256)`` rows; a row whose image now has other file bytes
    (re-ingested meanwhile) is not recorded. Returns how many were."""
    if not rows:
        return 0
    batch = pa.table({"image_id": pa.array([r[0] for r in rows], pa.int64()),
                      "sha256": pa.array([r[1] for r in rows], pa.string()),
                      "pixel_sha256": pa.array([r[2] for r in rows], pa.string())})
    with transaction(con):
        con.register("_vlm_pixel_hashes", batch)
        try:
            n = con.execute("SELECT count(*) FROM images i JOIN _vlm_pixel_hashes b USING (image_id) "
                            "WHERE i.sha256 = b.sha256 AND i.pixel_sha256 IS NULL").fetchall()[0][0]
            con.execute("UPDATE images SET pixel_sha256 = b.pixel_sha256 FROM _vlm_pixel_hashes b "
                        "WHERE images.image_id = b.image_id AND images.sha256 = b.sha256 "
                        "AND images.pixel_sha256 IS NULL")
        finally:
            con.unregister("_vlm_pixel_hashes")
    return int(n)


# -- what a search reads ---------------------------------------------------------------------------


def image_hashes(con: duckdb.DuckDBPyConnection, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image_id`` (int64), file ``sha256`` and ``pixel_sha256`` (object; None where unknown) of a
    dataset's images, by image id."""
    t = con.sql("SELECT image_id, sha256, pixel_sha256 FROM images WHERE dataset = ? ORDER BY image_id",
                params=[dataset]).to_arrow_table()
    return (t["image_id"].to_numpy().astype(np.int64), np.array(t["sha256"].to_pylist(), dtype=object),
            np.array(t["pixel_sha256"].to_pylist(), dtype=object))


def images_fingerprint(con: duckdb.DuckDBPyConnection, dataset: str) -> str:
    """sha256 over the dataset's image rows as an exact search reads them: id, file and pixel
    hashes, and the label, split and group its pairs are described by."""
    row = con.execute(
        """
        SELECT sha256(coalesce(string_agg(concat_ws(chr(31), image_id::VARCHAR, coalesce(sha256, chr(0)),
                                                    coalesce(pixel_sha256, chr(0)), coalesce(label, chr(0)),
                                                    coalesce(split, chr(0)), coalesce(group_id, chr(0))),
                                          chr(30) ORDER BY image_id), ''))
        FROM images WHERE dataset = ?
        """, [dataset]).fetchall()
    return str(row[0][0])


# -- writing a search ------------------------------------------------------------------------------


def store_search(con: duckdb.DuckDBPyConnection, *, dataset: str, kind: str, model: str | None,
                 condition: str | None, threshold: float | None, pairs: dict[str, np.ndarray], n_images: int,
                 seconds: float, fingerprint: str) -> int:
    """Replace one search: the dataset's exact pairs (``kind='exact'``), or the near pairs of one
    model and condition. ``pairs`` holds arrays ``a``, ``b`` (image ids, a < b), ``kind`` and
    ``score``; same_split/group/label are read from ``images``. Returns the pairs stored."""
    now = datetime.now()
    n = len(pairs["a"])
    batch = pa.table({
        "image_id_a": pa.array(np.asarray(pairs["a"], dtype=np.int64)),
        "image_id_b": pa.array(np.asarray(pairs["b"], dtype=np.int64)),
        "kind": pa.array([str(k) for k in pairs["kind"]], pa.string()),
        "score": pa.array(np.asarray(pairs["score"], dtype=np.float64)),
    })
    with transaction(con):
        if kind == EXACT:
            con.execute("DELETE FROM duplicates WHERE dataset = ? AND kind IN (SELECT unnest(?))",
                        [dataset, list(EXACT_KINDS)])
            con.execute("DELETE FROM duplicate_searches WHERE dataset = ? AND kind = ?", [dataset, EXACT])
        else:
            con.execute("DELETE FROM duplicates WHERE dataset = ? AND kind = ? AND model = ? AND condition = ?",
                        [dataset, NEAR, model, condition])
            con.execute("DELETE FROM duplicate_searches WHERE dataset = ? AND kind = ? AND model = ? "
                        "AND condition = ?", [dataset, NEAR, model, condition])
        con.register("_vlm_pairs", batch)
        try:
            con.execute(
                f"""
                INSERT INTO duplicates ({', '.join(PAIR_COLUMNS)})
                SELECT ?, p.image_id_a, p.image_id_b, p.kind, p.score, ?, ?, ?,
                       ia.split IS NOT DISTINCT FROM ib.split, ia.group_id IS NOT DISTINCT FROM ib.group_id,
                       ia.label IS NOT DISTINCT FROM ib.label, ?, ?
                FROM _vlm_pairs p JOIN images ia ON ia.image_id = p.image_id_a
                JOIN images ib ON ib.image_id = p.image_id_b
                """, [dataset, model, condition, threshold, now, fingerprint])
        finally:
            con.unregister("_vlm_pairs")
        con.execute(f"INSERT INTO duplicate_searches ({', '.join(SEARCH_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(SEARCH_COLUMNS))})",
                    [dataset, kind, model, condition, threshold, n_images, n, seconds, now, fingerprint])
    return n


# -- reading pairs ---------------------------------------------------------------------------------


def searches(con: duckdb.DuckDBPyConnection, dataset: str) -> list[dict[str, Any]]:
    """The stored searches of a dataset: exact first, then near ones by model and condition."""
    return _dicts(con.execute("SELECT * FROM duplicate_searches WHERE dataset = ? "
                              "ORDER BY kind <> 'exact', model, condition", [dataset]))


def pair_rows(con: duckdb.DuckDBPyConnection, dataset: str, *, kinds: Sequence[str] | None = None,
              model: str | None = None, condition: str | None = None, limit: int | None = None,
              one_per_pair: bool = False) -> list[dict[str, Any]]:
    """Stored pairs with both images' label, split and path: cross-split first, then by score.

    ``model``/``condition`` select near pairs of that search (exact pairs are always kept when
    ``kinds`` includes them). ``one_per_pair``: a pair found by several searches comes once, as its
    exact kind when it has one, and ``kinds`` lists every kind it was found as.
    """
    where, args = ["d.dataset = ?"], [dataset]
    if kinds is not None:
        where.append("d.kind IN (SELECT unnest(?))")
        args.append(list(kinds))
    if model is not None:
        where.append("(d.kind <> 'near' OR (d.model = ? AND d.condition = ?))")
        args += [model, condition]
    pair = "PARTITION BY d.image_id_a, d.image_id_b"
    once = (f"QUALIFY row_number() OVER ({pair} ORDER BY d.kind = 'near', d.score DESC, d.model, d.condition) = 1"
            if one_per_pair else "")
    sql = f"""
        SELECT d.kind, d.score, d.image_id_a, d.image_id_b, ia.label AS label_a, ib.label AS label_b,
               ia.split AS split_a, ib.split AS split_b, d.same_split, d.same_group, d.same_label,
               d.model, d.condition, d.threshold, ia.path AS path_a, ib.path AS path_b,
               array_to_string(list_sort(list(DISTINCT d.kind) OVER ({pair})), ', ') AS kinds
        FROM duplicates d JOIN images ia ON ia.image_id = d.image_id_a JOIN images ib ON ib.image_id = d.image_id_b
        WHERE {' AND '.join(where)}
        {once}
        ORDER BY d.same_split, d.score DESC, d.kind, d.model NULLS FIRST, d.condition, d.image_id_a, d.image_id_b
        """
    if limit is not None:
        sql += " LIMIT ?"
        args.append(int(limit))
    return _dicts(con.execute(sql, args))


def pair_ids(con: duckdb.DuckDBPyConnection, dataset: str, *, kinds: Sequence[str],
             model: str | None = None, condition: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image_id_a, image_id_b)`` of the stored pairs of some kinds (near ones of one model and
    condition), sorted."""
    where, args = ["dataset = ?", "kind IN (SELECT unnest(?))"], [dataset, list(kinds)]
    if model is not None:
        where.append("(kind <> 'near' OR (model = ? AND condition = ?))")
        args += [model, condition]
    rows = con.execute(f"SELECT DISTINCT image_id_a, image_id_b FROM duplicates WHERE {' AND '.join(where)} "
                       "ORDER BY 1, 2", args).fetchall()
    a = np.array([r[0] for r in rows], dtype=np.int64)
    b = np.array([r[1] for r in rows], dtype=np.int64)
    return a, b


def datasets_with_pairs(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute("SELECT DISTINCT dataset FROM duplicates ORDER BY 1").fetchall()]


def pair_counts(con: duckdb.DuckDBPyConnection, dataset: str) -> list[dict[str, Any]]:
    """Per kind (and model, condition for near pairs): pairs, cross-split pairs, pairs whose
    labels differ."""
    return _dicts(con.execute(
        "SELECT kind, model, condition, threshold, count(*) AS pairs, count(*) FILTER (WHERE NOT same_split) "
        "AS cross_split, count(*) FILTER (WHERE NOT same_label) AS label_mismatch FROM duplicates "
        "WHERE dataset = ? GROUP BY ALL ORDER BY kind, model NULLS FIRST, condition", [dataset]))
