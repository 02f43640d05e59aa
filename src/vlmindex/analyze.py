"""Analysis: exact neighbours and discriminability metrics of one (model, dataset, condition) run.

Neighbours are computed exactly by ``vlmindex.metrics`` (brute-force cosine with the tie rule stated
in ``vlmindex.metrics.retrieval``), never by an approximate index, so the numbers are the same
whatever index was built.
Per-query rows go to ``query_metrics``, neighbours to Parquet (the ``neighbors`` view), and one
summary row with the provenance of every number to ``summaries``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from vlmindex import metrics, store
from vlmindex.catalog import require_dataset
from vlmindex.errors import VlmindexError
from vlmindex.workspace import Workspace


@dataclass(frozen=True)
class AnalyzeOptions:
    k: int = 10
    exclude_group: bool = False
    query_split: str | None = None
    gallery_split: str | None = None
    modality: str | None = None
    probe: bool = True
    seed: int = 0

    def analysis_id(self, model: str, dataset: str, condition: str) -> str:
        key = json.dumps({"model": model, "dataset": dataset, "condition": condition, **asdict(self)},
                         sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:16]


@dataclass
class RunData:
    """A run's embeddings aligned with their catalog rows (only images with a label)."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    splits: np.ndarray
    modalities: np.ndarray
    missing: int  # catalog images of the selection without an embedding


def load_run(ws: Workspace, model: str, dataset: str, condition: str = "clean",
             modality: str | None = None) -> RunData:
    """Embeddings of a run joined to the catalog; raises when there are none."""
    ids, vectors = store.read_embeddings(ws.embeddings_dir(model, dataset, condition))
    with ws.read() as con:
        require_dataset(con, dataset)
        sql = ("SELECT image_id, label, group_id, split, modality FROM images "
               "WHERE dataset = ? AND label IS NOT NULL")
        args: list[Any] = [dataset]
        if modality:
            sql += " AND modality = ?"
            args.append(modality)
        rows = con.execute(sql + " ORDER BY image_id", args).fetchall()
    if len(ids) == 0:
        raise VlmindexError(
            f"no embeddings for model {model!r} on {dataset}/{condition}; run "
            f"`vlmindex embed --model {model} --dataset {dataset} --condition {condition}` first"
        )
    if not rows:
        raise VlmindexError(f"dataset {dataset!r} has no labelled images" +
                            (f" of modality {modality!r}" if modality else ""))
    cat_ids = np.array([r[0] for r in rows], dtype=np.int64)
    pos = np.searchsorted(ids, cat_ids)
    pos = np.clip(pos, 0, len(ids) - 1)
    present = ids[pos] == cat_ids
    sel = np.flatnonzero(present)
    col = list(zip(*rows, strict=True))
    return RunData(
        ids=cat_ids[sel],
        vectors=vectors[pos[sel]],
        labels=np.array(col[1], dtype=object)[sel],
        groups=np.array(col[2], dtype=object)[sel],
        splits=np.array(col[3], dtype=object)[sel],
        modalities=np.array(col[4], dtype=object)[sel],
        missing=int((~present).sum()),
    )


def _split_mask(splits: np.ndarray, split: str | None, what: str) -> np.ndarray | None:
    if split is None:
        return None
    mask = splits == split
    if not mask.any():
        have = sorted({str(s) for s in splits})
        raise VlmindexError(f"--{what}-split {split!r} matches no image (splits here: {', '.join(have)})")
    return mask


def provenance(ws: Workspace, model: str, dataset: str, condition: str) -> dict[str, Any]:
    """What produced a run's embeddings: preprocessing, weights checksum, versions, index kind."""
    from vlmindex.index import IndexInfo
    from vlmindex.versions import library_versions

    with ws.read() as con:
        row = con.execute(
            "SELECT preprocessing, weights_sha256, versions, dtype, device FROM runs "
            "WHERE model = ? AND dataset = ? AND condition = ? ORDER BY finished_at DESC LIMIT 1",
            [model, dataset, condition],
        ).fetchone()
    out: dict[str, Any] = {"analysis_versions": library_versions()}
    if row:
        out.update(preprocessing=json.loads(row[0]) if row[0] else None, weights_sha256=row[1],
                   embed_versions=json.loads(row[2]) if row[2] else None, dtype=row[3], device=row[4])
    sidecar = ws.index_path(model, dataset, condition).with_suffix(".json")
    if sidecar.exists():
        info = IndexInfo.load(sidecar)
        out["index"] = {"kind": info.kind, "params": info.params, "built_at": info.built_at}
    out["neighbours"] = "exact brute-force cosine (vlmindex.metrics), ties by smaller image_id"
    return out


def results_current(ws: Workspace, table: str, filters: dict[str, Any],
                    runs: list[tuple[str, str, str]]) -> bool:
    """Whether ``table`` has rows matching ``filters`` that are newer than every embedding part of
    ``runs`` (model, dataset, condition): the test the study runner uses to skip finished steps."""
    parts = [p for run in runs for p in store.part_paths(ws.embeddings_dir(*run))]
    if not parts:
        return False
    newest_part = max(p.stat().st_mtime for p in parts)
    where = " AND ".join(f"{col} = ?" for col in filters)
    with ws.read() as con:
        row = con.execute(f"SELECT min(created_at) FROM {table} WHERE {where}", list(filters.values())).fetchone()
    # created_at is a naive local timestamp (datetime.now()); .timestamp() reads it as local time
    return row[0] is not None and row[0].timestamp() >= newest_part


def is_current(ws: Workspace, model: str, dataset: str, condition: str = "clean",
               options: AnalyzeOptions | None = None) -> bool:
    """Whether an analysis with these options exists and is newer than the run's embeddings."""
    opts = options or AnalyzeOptions()
    return results_current(ws, "summaries", {"analysis_id": opts.analysis_id(model, dataset, condition)},
                           [(model, dataset, condition)])


def analyze(ws: Workspace, model: str, dataset: str, condition: str = "clean",
            options: AnalyzeOptions | None = None) -> dict[str, Any]:
    """Compute and store the metrics of one run; returns the summary row."""
    opts = options or AnalyzeOptions()
    if opts.k < 1:
        raise VlmindexError(f"-k must be at least 1, got {opts.k}")
    t0 = time.perf_counter()
    run = load_run(ws, model, dataset, condition, opts.modality)
    query_mask = _split_mask(run.splits, opts.query_split, "query")
    gallery_mask = _split_mask(run.splits, opts.gallery_split, "gallery")
    res = metrics.retrieval_metrics(
        run.vectors, run.labels, ids=run.ids, groups=run.groups, k=opts.k,
        exclude_group=opts.exclude_group, query_mask=query_mask, gallery_mask=gallery_mask,
    )
    summary = res.summary()
    train_mask = None
    if opts.probe:
        has_train = (run.splits == "train").any()
        held_out = np.isin(run.splits, ["test", "val"]).any()
        train_mask = (run.splits == "train") if has_train and held_out else None
    gallery = gallery_mask if gallery_mask is not None else np.ones(len(run.ids), dtype=bool)
    dist = metrics.distribution_figures(
        run.vectors, run.labels, train_mask=train_mask, probe=opts.probe, seed=opts.seed,
    ) if gallery_mask is None else metrics.distribution_figures(
        run.vectors[gallery], run.labels[gallery], probe=opts.probe, seed=opts.seed)
    analysis_id = opts.analysis_id(model, dataset, condition)
    seconds = time.perf_counter() - t0
    prov = provenance(ws, model, dataset, condition)
    prov.update(k=opts.k, exclude_group=opts.exclude_group, modality=opts.modality,
                images_without_embedding=run.missing)
    row = {
        "analysis_id": analysis_id, "model": model, "dataset": dataset, "condition": condition,
        "k": opts.k, "exclude_group": opts.exclude_group, "query_split": opts.query_split,
        "gallery_split": opts.gallery_split, "modality": opts.modality, "n_queries": summary["n_queries"],
        "n_skipped_queries": summary["n_skipped"], "n_gallery": summary["n_gallery"],
        "n_classes": summary["n_classes"], "dim": int(run.vectors.shape[1]),
        # summary() and distribution_figures() keys -> summaries columns: vlmindex.metrics.registry
        **metrics.summary_columns(summary), **metrics.distribution_columns(dist),
        "probe_protocol": None if not opts.probe else ("train→test/val split" if train_mask is not None
                                                         else "stratified 5-fold CV"),
        "seconds": seconds, "provenance": json.dumps(prov, default=str), "created_at": datetime.now(),
    }
    qi = res.query_index
    per_query = pa.table({
        "analysis_id": pa.array([analysis_id] * len(qi), pa.string()),
        "model": pa.array([model] * len(qi), pa.string()),
        "dataset": pa.array([dataset] * len(qi), pa.string()),
        "condition": pa.array([condition] * len(qi), pa.string()),
        "image_id": pa.array(run.ids[qi]),
        "label": pa.array([str(x) for x in run.labels[qi]], pa.string()),
        "modality": pa.array(list(run.modalities[qi]), pa.string()),
        "split": pa.array(list(run.splits[qi]), pa.string()),
        "k": pa.array(np.full(len(qi), opts.k, dtype=np.int32)),
        "exclude_group": pa.array(np.full(len(qi), opts.exclude_group)),
        "n_relevant": pa.array(res.n_relevant.astype(np.int64)),
        "purity_at_k": pa.array(res.purity_at_k, from_pandas=True),
        "ap": pa.array(res.ap, from_pandas=True),
        "map_at_r": pa.array(res.map_at_r, from_pandas=True),
        "r_precision": pa.array(res.r_precision, from_pandas=True),
        "p_at_1": pa.array(res.p_at_1, from_pandas=True),
        "knn_pred": pa.array([None if p is None else str(p) for p in res.knn_pred], pa.string()),
        # NaN (unscored query, R = 0) must stay NULL, not become a wrong vote
        "knn_correct": pa.array(np.asarray(res.knn_correct, dtype=float) > 0.5,
                                mask=np.isnan(np.asarray(res.knn_correct, dtype=float))),
    })
    _write_neighbors(ws, model, dataset, condition, analysis_id, run.ids[qi], res)
    with ws.write(wait=120) as con:
        con.execute("DELETE FROM query_metrics WHERE analysis_id = ?", [analysis_id])
        con.execute("DELETE FROM summaries WHERE analysis_id = ?", [analysis_id])
        con.register("per_query", per_query)
        con.execute("INSERT INTO query_metrics BY NAME SELECT * FROM per_query")
        con.unregister("per_query")
        cols = ", ".join(row)
        con.execute(f"INSERT INTO summaries ({cols}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()))
    return row


def _write_neighbors(ws: Workspace, model: str, dataset: str, condition: str, analysis_id: str,
                     query_ids: np.ndarray, res: metrics.RetrievalResult) -> None:
    nq, k = res.neighbor_id.shape
    valid = res.neighbor_id.reshape(-1) >= 0
    table = pa.table({
        "model": pa.array([model] * (nq * k), pa.string()).dictionary_encode(),
        "dataset": pa.array([dataset] * (nq * k), pa.string()).dictionary_encode(),
        "condition": pa.array([condition] * (nq * k), pa.string()).dictionary_encode(),
        "analysis_id": pa.array([analysis_id] * (nq * k), pa.string()).dictionary_encode(),
        "image_id": pa.array(np.repeat(query_ids, k)),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), nq)),
        "neighbor_id": pa.array(res.neighbor_id.reshape(-1).astype(np.int64)),
        "score": pa.array(res.neighbor_score.reshape(-1).astype(np.float32)),
    }).filter(pa.array(valid))
    store.write_table_atomic(table, ws.neighbors_dir(model, dataset, condition) / f"{analysis_id}.parquet")
