r"""Retrieval metrics: every query ranks the gallery by cosine similarity and the ranking is scored.

:func:`retrieval_metrics` returns a :class:`RetrievalResult` with one value per query of each metric
below (the columns of table ``query_metrics``) and summarises them with
:meth:`RetrievalResult.summary`. Pure NumPy, no I/O; the exact, deterministic ranking kernels are in
:mod:`vlmindex.metrics.ranking`, the names each metric carries in the catalog in
:mod:`vlmindex.metrics.registry`.

Metric definitions
------------------
Ranking. For query q with label :math:`y_q`, its ranking :math:`g_1, g_2, \dots` of the gallery
(minus q itself, with ``exclude_group`` minus every image of q's group, and with ``clusters`` minus
every image of q's cluster, e.g. its duplicates) is by descending cosine similarity (float32
inner product of unit vectors), ties by ascending id. With :math:`rel_n = [y_{g_n} = y_q]`,
:math:`R = \sum_n rel_n` (the relevant gallery items) and
:math:`P@n = \frac{1}{n}\sum_{i \le n} rel_i`:

* purity@k :math:`= \frac{1}{k}\sum_{n \le k} rel_n` (a query with fewer than k candidates
  counts the missing places as misses);
* AP :math:`= \frac{1}{R}\sum_{n: rel_n} P@n` over the full ranking (its mean is mAP);
* MAP@R :math:`= \frac{1}{R}\sum_{n \le R} P@n \cdot rel_n` (pytorch-metric-learning's);
* R-precision :math:`= P@R`; P@1 :math:`= rel_1`;
* kNN: the label with most votes among the top k; ties go to the larger summed similarity,
  then to the smaller label (in sorted label order); kNN accuracy is 1 when that label is
  :math:`y_q`, else 0.

Queries with R = 0 (their class has no other image among the candidates) get NaN for every metric
and are left out of every summary. Summaries: *micro* = mean over the scored queries; *macro* =
mean over classes (of the scored queries) of the per-class means, which weighs a rare lesion class
as much as a common one (macro kNN accuracy is the balanced accuracy of the vote).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmindex.errors import VlmindexError
from vlmindex.metrics import registry
from vlmindex.metrics.inputs import as_embeddings, as_mask, factorize
from vlmindex.metrics.ranking import (
    CACHED_ROWS,
    MAX_THREADS,
    Scratch,
    block_products,
    block_rows,
    normalized_rows,
    ragged_ranges,
    run_chunks,
    unique_rows,
)

__all__ = ["RETRIEVAL_METRICS", "RetrievalResult", "retrieval_metrics"]

# Names of the per-query metrics as RetrievalResult.metric() and summary() know them.
RETRIEVAL_METRICS = tuple(m.result_key for m in registry.RETRIEVAL)


@dataclass(frozen=True)
class RetrievalResult:
    """Per-query retrieval metrics of one (query set, gallery) pair; see :func:`retrieval_metrics`.

    Per-query arrays are aligned with ``query_index`` (rows of the embedding matrix, ascending).
    Metrics are NaN for queries with ``n_relevant == 0`` (skipped: their class has no other image in
    the gallery, so no ranking metric is defined). ``ap`` is None when ``full_ap=False``.
    """

    k: int
    exclude_group: bool
    n_gallery: int
    classes: np.ndarray
    query_index: np.ndarray
    query_id: np.ndarray
    query_label_code: np.ndarray
    n_relevant: np.ndarray
    n_candidates: np.ndarray
    purity_at_k: np.ndarray
    ap: np.ndarray | None
    map_at_r: np.ndarray
    r_precision: np.ndarray
    p_at_1: np.ndarray
    knn_pred_code: np.ndarray
    knn_correct: np.ndarray
    neighbor_index: np.ndarray
    neighbor_id: np.ndarray
    neighbor_score: np.ndarray

    @property
    def n_queries(self) -> int:
        return len(self.query_index)

    @property
    def skipped(self) -> np.ndarray:
        """Boolean mask of queries with R = 0, left out of every summary."""
        return self.n_relevant == 0

    @property
    def n_skipped(self) -> int:
        return int(self.skipped.sum())

    @property
    def query_label(self) -> np.ndarray:
        return self.classes[self.query_label_code]

    @property
    def knn_pred(self) -> np.ndarray:
        """Predicted label of each query (None where the query had no neighbour at all)."""
        none = self.knn_pred_code < 0
        if not none.any():
            return self.classes[self.knn_pred_code]
        out = self.classes.astype(object)[np.where(none, 0, self.knn_pred_code)]
        out[none] = None
        return out

    @property
    def knn_accuracy(self) -> np.ndarray:
        return self.knn_correct

    def metric(self, name: str) -> np.ndarray | None:
        """Per-query values of one metric by name (``knn_accuracy`` is ``knn_correct``)."""
        if name not in RETRIEVAL_METRICS:
            raise VlmindexError(f"unknown metric {name!r}; choose one of {', '.join(RETRIEVAL_METRICS)}")
        return getattr(self, name)

    def summary(self) -> dict[str, Any]:
        """Micro and macro means of every metric, plus counts.

        micro = mean over scored queries; macro = mean over classes (of the scored queries) of the
        per-class means, which weighs a rare lesion class as much as a common one. Queries with
        R = 0 are excluded from both and counted in ``n_skipped``.

        Keys: ``k``, ``exclude_group``, ``n_queries``, ``n_gallery``, ``n_scored``, ``n_skipped``,
        ``n_classes`` and ``<metric>_micro`` / ``<metric>_macro`` for each name in
        ``RETRIEVAL_METRICS`` (``ap_*`` only when AP was computed). Table ``summaries`` stores these
        under its own column names: :func:`vlmindex.metrics.registry.summary_columns`.
        """
        scored = ~self.skipped
        codes = self.query_label_code[scored]
        present = np.unique(codes)
        out: dict[str, Any] = {
            "k": self.k,
            "exclude_group": self.exclude_group,
            "n_queries": self.n_queries,
            "n_gallery": self.n_gallery,
            "n_scored": int(scored.sum()),
            "n_skipped": self.n_skipped,
            "n_classes": int(len(present)),
        }
        for name in RETRIEVAL_METRICS:
            values = self.metric(name)
            if values is None:
                continue
            v = values[scored]
            if len(v) == 0:
                out[f"{name}_micro"] = float("nan")
                out[f"{name}_macro"] = float("nan")
                continue
            sums = np.bincount(codes, weights=v, minlength=len(self.classes))[present]
            counts = np.bincount(codes, minlength=len(self.classes))[present]
            out[f"{name}_micro"] = float(v.mean())
            out[f"{name}_macro"] = float(np.mean(sums / counts))
        return out

    def per_class(self) -> list[dict[str, Any]]:
        """One row per query class: label, query count, skipped count and the mean of each metric."""
        rows = []
        for code in np.unique(self.query_label_code):
            sel = self.query_label_code == code
            scored = sel & ~self.skipped
            label = self.classes[code]
            row: dict[str, Any] = {
                "label": label.item() if isinstance(label, np.generic) else label,
                "n_queries": int(sel.sum()),
                "n_skipped": int((sel & self.skipped).sum()),
            }
            for name in RETRIEVAL_METRICS:
                values = self.metric(name)
                if values is None:
                    continue
                row[name] = float(values[scored].mean()) if scored.any() else float("nan")
            rows.append(row)
        return rows


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    ids: np.ndarray | None = None,
    groups: Sequence[Any] | np.ndarray | None = None,
    k: int = 10,
    exclude_group: bool = False,
    clusters: Sequence[Any] | np.ndarray | None = None,
    query_mask: np.ndarray | None = None,
    gallery_mask: np.ndarray | None = None,
    full_ap: bool = True,
    chunk_size: int | None = None,
    n_threads: int | None = None,
    device: str | None = None,
) -> RetrievalResult:
    r"""Rank the gallery for every query by cosine similarity and score the ranking.

    Parameters
    ----------
    embeddings : (n, d) array
        One row per image; rows are L2-normalised here (zero or non-finite rows are an error).
        Similarities are float32 inner products (see :mod:`vlmindex.metrics.ranking` on determinism).
    labels : (n,) array-like
        Class of each image (any orderable type; missing labels are an error).
    ids : (n,) int array, optional
        Unique image ids (``image_id``) used for the tie rule; default: row positions.
    groups : (n,) array-like, optional
        Group (patient / lesion) of each image; None/NaN means "no group" (shares with no one).
    k : int
        Neighbours for purity@k and the kNN vote.
    exclude_group : bool
        Also remove from each query's ranking every image sharing its group (stops leakage).
    clusters : (n,) array-like, optional
        A second exclusion key (a duplicate cluster per image; None/NaN: in no cluster): every
        image sharing the query's cluster is removed from its ranking too. With ``exclude_group``
        the union of the query's group and cluster is removed.
    query_mask, gallery_mask : (n,) bool arrays, optional
        Which rows are queries and which form the gallery (default: all). A query that is also in
        the gallery is removed from its own ranking; one that is not simply ranks the gallery.
    full_ap : bool
        Report AP over the full ranking (default). With False, ``ap`` is None and each row is
        ranked only down to its max(R, k)-th item (a selection, then sorts of what lies above it),
        which is all the other metrics read: they are the same numbers either way.
    chunk_size : int, optional
        Queries per task, rounded up to a multiple of the fixed product block (8 to 1024 rows,
        chosen from the gallery size so that a block needs at most ~256 MiB); default: one block.
        Results do not depend on it.
    n_threads : int, optional
        Tasks processed in parallel (default: CPU count, at most 8), each with single-threaded
        BLAS. Results do not depend on it. Memory is about n_threads × chunk_size × |gallery| × 4 B.
    device : str, optional
        None (default): the NumPy kernels on the CPU. A torch device (``"cuda"``, ``"cuda:1"``,
        ``"cpu"``): products and sorts in torch on that device (:mod:`vlmindex.metrics.torch_ranking`),
        in chunks sized to its free memory; same numbers to 1e-6, same tie rule.

    Notes
    -----
    For query q with label :math:`y_q`, its ranking :math:`g_1, g_2, \dots` of the gallery (minus q
    itself and, with ``exclude_group``, minus its group) is by descending similarity, ties by
    ascending id (the query's cluster, when ``clusters`` is given, is removed as well). With
    :math:`rel_n = [y_{g_n} = y_q]`, :math:`R = \sum_n rel_n` and
    :math:`P@n = \frac{1}{n}\sum_{i \le n} rel_i`:

    * purity@k :math:`= \frac{1}{k}\sum_{n \le k} rel_n` (a query with fewer than k candidates
      counts the missing places as misses);
    * AP :math:`= \frac{1}{R}\sum_{n: rel_n} P@n` over the full ranking;
    * MAP@R :math:`= \frac{1}{R}\sum_{n \le R} P@n \cdot rel_n` (pytorch-metric-learning's);
    * R-precision :math:`= P@R`; P@1 :math:`= rel_1`;
    * kNN: the label with most votes among the top k; ties go to the larger summed similarity,
      then to the smaller label (in sorted label order).

    Queries with R = 0 get NaN for every metric and are counted by ``RetrievalResult.n_skipped``.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> res = retrieval_metrics(x, ["a", "a", "b", "b"], k=1)
    >>> float(res.summary()["map_at_r_micro"]), res.neighbor_index[:, 0].tolist()
    (1.0, [1, 0, 3, 2])
    """
    x = as_embeddings(embeddings)
    n = x.shape[0]
    labels_arr = np.asarray(labels)
    if labels_arr.shape != (n,):
        raise VlmindexError(f"labels must have one entry per embedding row ({n}), got {labels_arr.shape}")
    if ids is None:
        ids_arr = np.arange(n, dtype=np.int64)
    else:
        ids_arr = np.asarray(ids)
        if ids_arr.shape != (n,) or ids_arr.dtype.kind not in "iu":
            raise VlmindexError(f"ids must be integers, one per row ({n}); got {ids_arr.dtype}")
        ids_arr = ids_arr.astype(np.int64)
    if not isinstance(k, int | np.integer) or k < 1:
        raise VlmindexError(f"k must be a positive integer (got {k!r})")
    k = int(k)
    if exclude_group and groups is None:
        raise VlmindexError("exclude_group=True needs groups (a patient/lesion id per image)")
    qmask = as_mask(query_mask, n, "query_mask")
    gmask = as_mask(gallery_mask, n, "gallery_mask")
    if not qmask.any():
        raise VlmindexError("the query set is empty; check the query split/filter")
    if not gmask.any():
        raise VlmindexError("the gallery is empty; check the gallery split/filter")

    classes, codes = factorize(labels_arr, "label", allow_missing=False)
    n_classes = len(classes)

    # Gallery by class, then id: the relevant items of a query are one run of columns, the layout
    # of the merge kernels (vlmindex.metrics.merge); id_rank[col] is the column's place in id
    # order, the tie-breaker of every path.
    gal = np.flatnonzero(gmask)
    gal = gal[np.argsort(ids_arr[gal], kind="stable")]
    n_gal = len(gal)
    if n_gal >= 2**32:
        raise VlmindexError(f"gallery of {n_gal} images is too large for one exact ranking; split it")
    if n_gal > 1 and (np.diff(ids_arr[gal]) == 0).any():
        dup = int(ids_arr[gal][np.flatnonzero(np.diff(ids_arr[gal]) == 0)[0]])
        raise VlmindexError(f"id {dup} appears twice in the gallery; ids must be unique")
    gal = gal[np.argsort(codes[gal], kind="stable")]  # stable: id order within a class
    gal_ids = ids_arr[gal]
    id_rank = np.empty(n_gal, dtype=np.int64)
    id_rank[np.argsort(gal_ids, kind="stable")] = np.arange(n_gal)
    qry = np.flatnonzero(qmask)
    n_qry = len(qry)

    gal_codes = codes[gal]
    qry_codes = codes[qry]
    col_of_row = np.full(n, -1, dtype=np.int64)
    col_of_row[gal] = np.arange(n_gal)
    self_col = col_of_row[qry]
    in_gallery = self_col >= 0

    # R(q) and the number of candidates, from counts (no ranking needed).
    class_count = np.bincount(gal_codes, minlength=n_classes)
    if exclude_group:
        groups_arr = np.asarray(groups)
        if groups_arr.shape != (n,):
            raise VlmindexError(f"groups must have one entry per embedding row ({n}), got {groups_arr.shape}")
        _, group_codes = factorize(groups_arr, "group", allow_missing=True)
        gal_groups = group_codes[gal]
        qry_groups = group_codes[qry]
        n_group_codes = int(group_codes.max()) + 1
        group_size = np.bincount(gal_groups, minlength=n_group_codes)
        pair = gal_groups * n_classes + gal_codes
        pair_u, pair_n = np.unique(pair, return_counts=True)
        qpair = qry_groups * n_classes + qry_codes
        at = np.clip(np.searchsorted(pair_u, qpair), 0, len(pair_u) - 1)
        same_pair = np.where(pair_u[at] == qpair, pair_n[at], 0)
        n_relevant = class_count[qry_codes] - same_pair
        n_candidates = n_gal - group_size[qry_groups]
        # Gallery columns grouped by group code (CSR), to exclude a query's group in one scatter.
        by_group = np.argsort(gal_groups, kind="stable")
        group_start = np.concatenate([[0], np.cumsum(group_size)[:-1]])
    else:
        n_relevant = class_count[qry_codes] - in_gallery
        n_candidates = n_gal - in_gallery
    # With clusters, what a query loses is the union of its cluster and (with exclude_group) its
    # group: counted by inclusion-exclusion, and removed in the ranking by one scatter per key.
    scatters: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    if clusters is not None:
        clusters_arr = np.asarray(clusters, dtype=object)
        if clusters_arr.shape != (n,):
            raise VlmindexError(f"clusters must have one entry per embedding row ({n}), got {clusters_arr.shape}")
        _, cluster_codes = factorize(clusters_arr, "cluster", allow_missing=True)
        keys = [cluster_codes] + ([group_codes] if exclude_group else [])
        n_out, n_out_relevant = _union_counts(keys, gal, qry, codes, n_classes)
        n_relevant = class_count[qry_codes] - n_out_relevant
        n_candidates = n_gal - n_out
        for key in keys:
            size = np.bincount(key[gal], minlength=int(key.max()) + 1)
            scatters.append((np.argsort(key[gal], kind="stable"), np.concatenate([[0], np.cumsum(size)[:-1]]),
                             size, key[qry]))
    n_relevant = n_relevant.astype(np.int64)
    n_candidates = n_candidates.astype(np.int64)
    if k > int(n_candidates.max()):
        raise VlmindexError(
            f"k={k} is larger than the gallery ({int(n_candidates.max())} candidates per query); lower k"
        )

    # One normalised copy: the gallery (by class, then id), then the queries that are not in it.
    extra = qry[~in_gallery]
    xall = normalized_rows(x, np.concatenate([gal, extra]), ids_arr)
    xg = xall[:n_gal]
    q_row = self_col.copy()
    q_row[~in_gallery] = n_gal + np.arange(len(extra))
    # Bit-identical gallery rows (the same image stored twice) get one similarity column, copied,
    # so that they tie exactly and the id rule decides between them.
    xg_unique, expand = unique_rows(xg)

    def excluded(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in the chunk, gallery column) of every item left out of the rankings of ``sel``."""
        rows = np.arange(len(sel))
        own = in_gallery[sel]
        parts = [(rows[own], self_col[sel][own])]
        if exclude_group and not scatters:
            g = qry_groups[sel]
            sizes = group_size[g]
            parts.append((np.repeat(rows, sizes), by_group[ragged_ranges(group_start[g], sizes)]))
        for by_key, key_start, key_size, qry_key in scatters:
            g = qry_key[sel]
            sizes = key_size[g]
            parts.append((np.repeat(rows, sizes), by_key[ragged_ranges(key_start[g], sizes)]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    nan = np.nan
    out = {
        "purity_at_k": np.full(n_qry, nan),
        "ap": np.full(n_qry, nan),
        "map_at_r": np.full(n_qry, nan),
        "r_precision": np.full(n_qry, nan),
        "p_at_1": np.full(n_qry, nan),
        "knn_correct": np.full(n_qry, nan),
    }
    knn_pred = np.full(n_qry, -1, dtype=np.int64)
    nb_col = np.full((n_qry, k), -1, dtype=np.int64)
    nb_score = np.full((n_qry, k), nan, dtype=np.float32)
    scored_all = n_relevant > 0

    def write(sel: np.ndarray, values: dict[str, np.ndarray], cols_k: np.ndarray, scores_k: np.ndarray) -> None:
        """Store the chunk's metrics (NaN where R = 0) and its top k, with the kNN vote and the
        purity@k and P@1 of that top k."""
        valid_k = cols_k >= 0
        rel_k = (gal_codes[np.maximum(cols_k, 0)] == qry_codes[sel][:, None]) & valid_k
        values = dict(values, purity_at_k=rel_k.sum(axis=1) / k, p_at_1=rel_k[:, 0].astype(np.float64))
        pred = _knn_vote(cols_k, scores_k, valid_k, gal_codes, n_classes)
        knn_pred[sel] = pred
        values["knn_correct"] = (pred == qry_codes[sel]).astype(np.float64)
        scored = scored_all[sel]
        for name, v in values.items():
            out[name][sel] = np.where(scored, v, nan)
        nb_col[sel] = cols_k
        nb_score[sel] = scores_k

    def _numpy_rank() -> None:
        """The NumPy kernels on the CPU, in chunk threads."""
        nonlocal n_threads, chunk_size
        if n_threads is None:
            n_threads = min(os.cpu_count() or 1, MAX_THREADS)
        n_threads = max(1, int(n_threads))
        # The product block shape depends on the gallery alone, never on chunk_size or n_threads.
        block = block_rows(n_gal)
        if chunk_size is None:
            chunk_size = block
        elif int(chunk_size) < 1:
            raise VlmindexError(f"chunk_size must be positive (got {chunk_size})")
        chunk_size = -(-int(chunk_size) // block) * block
        class_start = np.searchsorted(gal_codes, np.arange(n_classes)).astype(np.int64)
        class_end = np.searchsorted(gal_codes, np.arange(n_classes), side="right").astype(np.int64)
        scratch = Scratch()

        def similarities(sel: np.ndarray) -> np.ndarray:
            """The chunk's similarities to every gallery column, -inf where an item is left out."""
            sims = block_products(xall, q_row[sel], xg_unique, block, scratch)
            if expand is not None:
                sims = np.ascontiguousarray(sims[:, expand])  # the kernels take C-ordered rows only
            sims[excluded(sel)] = -np.inf
            return sims

        def merge_chunk(sel: np.ndarray) -> None:
            """Value sorts of each query's relevant and irrelevant runs, the merge walk, the top k.

            Rows go through these steps a few at a time (:data:`CACHED_ROWS`), so that a row's
            sorted copy and its second reading (the tie scan) are served from the cache, not from
            memory. Without full AP only the top L = max(R, k) of a row is ranked: the values at
            least as large as a threshold at or below the L-th largest are sorted (MAP@R,
            R-precision, P@1, purity@k and the vote never look further down)."""
            from vlmindex.metrics.merge import (
                merge_ranks,
                split_runs,
                split_top,
                top_k,
                top_thresholds,
                value_sort,
            )

            c = len(sel)
            code = qry_codes[sel]
            lo, hi = class_start[code], class_end[code]
            sims = similarities(sel)
            r = n_relevant[sel]
            rows = min(c, CACHED_ROWS)
            runs = scratch.array("runs", (rows, n_gal), np.float32)
            sort_tmp = scratch.array("sort_tmp", (n_gal,), np.uint32)
            if full_ap:
                rel_width, irr_end = hi - lo, np.full(c, n_gal - 1, dtype=np.int64)
                n_rel, n_irr = r, n_candidates[sel] - r
                scan, n_scan = np.empty((rows, 1), dtype=np.uint32), np.full(c, -1, dtype=np.int64)
            else:
                # Any threshold at or below the depth-th largest value keeps what the metrics read
                # (every value >= it, ties whole): a sampled guess, checked, exact where it fails.
                depth = np.minimum(np.maximum(r, k), n_candidates[sel])
                threshold = np.empty(c, dtype=np.float32)
                top_thresholds(sims, depth, threshold)
                n_rel, n_irr = np.empty(c, dtype=np.int64), np.empty(c, dtype=np.int64)
                scan = scratch.array("kept_columns", (rows, n_gal), np.uint32)
                rel_width, irr_end, n_scan = n_rel, np.empty(c, dtype=np.int64), np.empty(c, dtype=np.int64)
            values = {name: np.full(c, nan) for name in ("ap", "map_at_r", "r_precision")}
            kth = np.empty(c, dtype=np.float32)
            near = scratch.array("near", (rows, min(n_gal, 2 * k + 64)), np.uint32)
            n_near = np.empty(c, dtype=np.int64)
            cols_k = np.empty((c, k), dtype=np.int64)
            scores_k = np.empty((c, k), dtype=np.float32)
            for b0 in range(0, c, rows):
                b = slice(b0, min(c, b0 + rows))
                m = b.stop - b0
                if full_ap:
                    split_runs(sims[b], lo[b], hi[b], runs)
                else:
                    split_top(sims[b], lo[b], hi[b], threshold[b], runs, scan, n_rel[b], n_irr[b])
                    for q in np.flatnonzero(n_rel[b] + n_irr[b] < depth[b]):  # q: in the batch; g: in the chunk
                        g, one = b0 + q, slice(b0 + q, b0 + q + 1)
                        threshold[g] = np.partition(sims[g], n_gal - depth[g])[n_gal - depth[g]]
                        split_top(sims[one], lo[one], hi[one], threshold[one], runs[q:q + 1], scan[q:q + 1],
                                  n_rel[one], n_irr[one])
                    n_scan[b] = n_rel[b] + n_irr[b]
                    irr_end[b] = n_scan[b] - 1
                for q in range(m):  # the relevant run, then the rest; both sorts let go of the GIL
                    g = b0 + q
                    value_sort(runs[q, :rel_width[g]], sort_tmp)
                    value_sort(runs[q, rel_width[g]:irr_end[g] + 1], sort_tmp)
                merge_ranks(runs[:m], rel_width[b], irr_end[b], n_rel[b], n_irr[b], r[b], k, sims[b], lo[b], hi[b],
                            id_rank, scan[:m], n_scan[b], values["ap"][b], values["map_at_r"][b],
                            values["r_precision"][b], kth[b], near[:m], n_near[b])
                top_k(sims[b], kth[b], id_rank, k, scan[:m], n_scan[b], near[:m], n_near[b], cols_k[b], scores_k[b])
            if not full_ap:
                del values["ap"]  # of the top L only
            write(sel, values, cols_k, scores_k)

        chunks = [np.arange(i, min(n_qry, i + chunk_size)) for i in range(0, n_qry, chunk_size)]
        run_chunks(merge_chunk, chunks, n_threads)

    if device is not None:
        from vlmindex.metrics.torch_ranking import torch_rank

        for sel, values, cols_k, scores_k in torch_rank(
                device, xall, q_row, xg, id_rank, gal_codes, qry_codes, n_relevant, n_candidates, k, excluded):
            write(sel, values, cols_k, scores_k)
    else:
        _numpy_rank()

    nb_index = np.where(nb_col >= 0, gal[np.maximum(nb_col, 0)], -1)
    nb_id = np.where(nb_col >= 0, gal_ids[np.maximum(nb_col, 0)], -1)
    return RetrievalResult(
        k=k,
        exclude_group=bool(exclude_group),
        n_gallery=n_gal,
        classes=classes,
        query_index=qry.astype(np.int64),
        query_id=ids_arr[qry],
        query_label_code=qry_codes,
        n_relevant=n_relevant,
        n_candidates=n_candidates,
        purity_at_k=out["purity_at_k"],
        ap=out["ap"] if full_ap else None,
        map_at_r=out["map_at_r"],
        r_precision=out["r_precision"],
        p_at_1=out["p_at_1"],
        knn_pred_code=knn_pred,
        knn_correct=out["knn_correct"],
        neighbor_index=nb_index,
        neighbor_id=nb_id,
        neighbor_score=nb_score,
    )


def _knn_vote(cols_k: np.ndarray, scores_k: np.ndarray, valid_k: np.ndarray, gal_codes: np.ndarray,
              n_classes: int) -> np.ndarray:
    """The kNN vote of each row: most votes among its top k, ties to the larger summed similarity,
    then to the smaller class code; -1 for a row with no neighbour. Vectorised: bincounts over
    (row, class) cells give votes and summed similarity."""
    c = len(cols_k)
    rows = np.arange(c)
    cell = (rows[:, None] * n_classes + gal_codes[np.maximum(cols_k, 0)])[valid_k]
    votes = np.bincount(cell, minlength=c * n_classes).reshape(c, n_classes)
    sim_sum = np.bincount(cell, weights=scores_k[valid_k].astype(np.float64), minlength=c * n_classes)
    top_votes = votes.max(axis=1)
    tied = votes == top_votes[:, None]
    best = np.argmax(np.where(tied, sim_sum.reshape(c, n_classes), -np.inf), axis=1)
    return np.where(top_votes > 0, best, -1)


def _union_counts(keys: list[np.ndarray], gal: np.ndarray, qry: np.ndarray, codes: np.ndarray,
                  n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: gallery items sharing at least one of ``keys`` with it, and those of them in its
    class, by inclusion-exclusion, |A ∪ B| = |A| + |B| − |A ∩ B| (and so on for more keys).

    ``keys`` are integer codes over all rows; the query itself, when in the gallery, shares every key.
    """
    out = np.zeros(len(qry), dtype=np.int64)
    out_rel = np.zeros(len(qry), dtype=np.int64)
    rows = np.concatenate([gal, qry])
    for r in range(1, len(keys) + 1):
        for subset in itertools.combinations(keys, r):
            # one code per distinct combination of the subset's keys, shared by gallery and queries
            _, combo = np.unique(np.stack([k[rows] for k in subset], axis=1), axis=0, return_inverse=True)
            combo = combo.reshape(-1)
            shared = _matches(combo[: len(gal)], combo[len(gal):])
            with_class = _matches(combo[: len(gal)] * n_classes + codes[gal], combo[len(gal):] * n_classes
                                  + codes[qry])
            sign = 1 if r % 2 else -1
            out += sign * shared
            out_rel += sign * with_class
    return out, out_rel


def _matches(gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """How many entries of ``gallery`` equal each entry of ``queries``."""
    u, counts = np.unique(gallery, return_counts=True)
    if len(u) == 0:
        return np.zeros(len(queries), dtype=np.int64)
    at = np.clip(np.searchsorted(u, queries), 0, len(u) - 1)
    return np.where(u[at] == queries, counts[at], 0).astype(np.int64)
