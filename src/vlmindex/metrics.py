"""Discriminability metrics over an embedding matrix: pure NumPy, no I/O, no workspace needed.

Two families, both defined in DESIGN.md "Metric definitions":

* **Retrieval metrics** (:func:`retrieval_metrics`): every query ranks the gallery by cosine
  similarity; purity@k, AP over the full ranking, MAP@R, R-precision, P@1 and kNN accuracy per
  query, summarised micro (mean over queries) and macro (mean over classes of the class means).
* **Distribution figures** (:func:`distribution_figures`): silhouette (cosine), Davies–Bouldin,
  Calinski–Harabasz, Fisher ratio and linear-probe balanced accuracy of the class structure.

The ranking is exact and deterministic: similarities are float32 inner products of L2-normalised
rows (as FAISS computes them), and ties are broken by the smaller id. A BLAS product rounds the
same pair differently (in the last bit) depending on the block shape and the pair's place in it,
so every product is taken on blocks of a fixed shape that depends only on the gallery size:
results are bitwise independent of ``chunk_size`` and ``n_threads`` (only a change of the query
set, which moves a query within its block, can change the last bit). Bit-identical gallery rows
share one computed column, so duplicates tie exactly.

To get the tie rule from a fast, unstable sort, each (query, gallery item) pair becomes one
``uint64`` key whose high word is the similarity mapped to an order-reversing unsigned integer and
whose low word is the item's position in a gallery sorted by id; ascending key order is then
exactly "higher similarity first, smaller id next". Queries are processed in chunks, so memory is
bounded by ``n_threads × chunk_size × |gallery|`` and never by ``|queries| × |gallery|``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmindex.errors import VlmindexError

__all__ = [
    "RetrievalResult",
    "calinski_harabasz",
    "davies_bouldin",
    "distribution_figures",
    "fisher_ratio",
    "linear_probe_balanced_accuracy",
    "project_2d",
    "retrieval_metrics",
    "silhouette_cosine",
]

# Word order of a uint64 seen as two uint32 words.
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)
# High word of an excluded item: above every real similarity key (finite floats map below it).
_EXCLUDED = np.uint32(0xFFFFFFFF)
# Working memory per (query, gallery item) pair in one block: float32 similarity, uint64 key and
# its temporaries, gathered indices, relevance flags and hit positions.
_BYTES_PER_PAIR = 40
# One block of queries stays under this; a block has a power-of-two row count in [8, 256].
_BLOCK_BYTES = 256 * 2**20
_MAX_THREADS = 8

RETRIEVAL_METRICS = ("purity_at_k", "ap", "map_at_r", "r_precision", "p_at_1", "knn_accuracy")


# --------------------------------------------------------------------------------------------------
# Input handling


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def _factorize(values: np.ndarray, what: str, *, allow_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes into sorted unique values; missing values (None/NaN) get fresh codes when allowed."""
    if values.dtype.kind in "biuUS":
        missing = np.zeros(len(values), dtype=bool)
    elif values.dtype.kind == "f":
        missing = np.isnan(values)
    else:
        missing = np.fromiter((_is_missing(v) for v in values), dtype=bool, count=len(values))
    if missing.any() and not allow_missing:
        first = int(np.flatnonzero(missing)[0])
        raise VlmindexError(
            f"{what} of row {first} is missing; give every image a {what} or filter those images out"
        )
    present = values[~missing]
    try:
        uniques, codes_present = np.unique(present, return_inverse=True)
    except TypeError as exc:
        raise VlmindexError(
            f"{what} values mix types that cannot be ordered ({exc}); convert them all to str"
        ) from None
    codes = np.empty(len(values), dtype=np.int64)
    codes[~missing] = codes_present.reshape(-1)
    # Each missing value is its own singleton (e.g. an image with no patient id shares no group).
    codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    return uniques, codes


def _as_mask(mask: np.ndarray | None, n: int, what: str) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (n,):
        raise VlmindexError(f"{what} must be a boolean array of length {n} (got {mask.dtype} {mask.shape})")
    return mask


def _as_embeddings(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise VlmindexError(f"embeddings must be a non-empty 2-D array (got shape {x.shape})")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x


def _normalized_rows(x: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 unit rows ``x[rows] / ||x[rows]||`` (computed in float64); zero or non-finite rows
    are user errors."""
    sub = np.asarray(x[rows], dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", sub, sub))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        row = int(rows[np.flatnonzero(bad)[0]])
        raise VlmindexError(
            f"embedding of id {int(ids[row])} (row {row}) is all zeros or not finite; "
            "re-embed that image or filter it out"
        )
    sub /= norms[:, None]
    return sub.astype(np.float32)


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct rows of ``x`` and the map back (None when all rows are distinct)."""
    if len(x) < 2:
        return x, None
    flat = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    if len(first) == len(x):
        return x, None
    return np.ascontiguousarray(x[first]), inverse.reshape(-1)


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Our threads each run their own matrix product; BLAS threads on top would oversubscribe."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _run_chunks(fn: Callable[[np.ndarray], None], chunks: list[np.ndarray], n_threads: int) -> None:
    # Single-threaded BLAS even without our threads: a multi-threaded product splits the block
    # differently and would change the last bit of some similarities.
    with _single_threaded_blas():
        if n_threads <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                fn(chunk)
            return
        # NumPy releases the GIL in matmul, sort, partition and elementwise loops, so threads scale.
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for future in [pool.submit(fn, chunk) for chunk in chunks]:
                future.result()


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise VlmindexError(
            f"embedding row {int(np.flatnonzero(bad)[0])} is all zeros or not finite; filter it out"
        )
    return x / norms[:, None]


def _ragged_ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    total = int(sizes.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, sizes)


# --------------------------------------------------------------------------------------------------
# Retrieval metrics


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
        ``RETRIEVAL_METRICS`` (``ap_*`` only when AP was computed).
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
    query_mask: np.ndarray | None = None,
    gallery_mask: np.ndarray | None = None,
    full_ap: bool = True,
    chunk_size: int | None = None,
    n_threads: int | None = None,
) -> RetrievalResult:
    r"""Rank the gallery for every query by cosine similarity and score the ranking.

    Parameters
    ----------
    embeddings : (n, d) array
        One row per image; rows are L2-normalised here (zero or non-finite rows are an error).
        Similarities are float32 inner products (see the module notes on determinism).
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
    query_mask, gallery_mask : (n,) bool arrays, optional
        Which rows are queries and which form the gallery (default: all). A query that is also in
        the gallery is removed from its own ranking; one that is not simply ranks the gallery.
    full_ap : bool
        Compute AP over the full ranking (needs a full sort of each row). With False, only the
        top ``max(k, R)`` of each row is sorted (a partial sort) and ``ap`` is None.
    chunk_size : int, optional
        Queries per task, rounded up to a multiple of the fixed product block (8 to 256 rows,
        chosen from the gallery size so that a block needs at most ~256 MiB); default: one block.
        Results do not depend on it.
    n_threads : int, optional
        Tasks processed in parallel (default: CPU count, at most 8), each with single-threaded
        BLAS. Results do not depend on it. Memory is about n_threads × chunk_size × |gallery| × 40 B.

    Notes
    -----
    For query q with label :math:`y_q`, its ranking :math:`g_1, g_2, \dots` of the gallery (minus q
    itself and, with ``exclude_group``, minus its group) is by descending similarity, ties by
    ascending id. With :math:`rel_n = [y_{g_n} = y_q]`, :math:`R = \sum_n rel_n` and
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
    x = _as_embeddings(embeddings)
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
    qmask = _as_mask(query_mask, n, "query_mask")
    gmask = _as_mask(gallery_mask, n, "gallery_mask")
    if not qmask.any():
        raise VlmindexError("the query set is empty; check the query split/filter")
    if not gmask.any():
        raise VlmindexError("the gallery is empty; check the gallery split/filter")

    classes, codes = _factorize(labels_arr, "label", allow_missing=False)
    n_classes = len(classes)

    # Gallery in ascending-id order, so that a gallery position is also the id tie-breaker.
    gal = np.flatnonzero(gmask)
    gal = gal[np.argsort(ids_arr[gal], kind="stable")]
    n_gal = len(gal)
    if n_gal >= 2**32:
        raise VlmindexError(f"gallery of {n_gal} images is too large for one exact ranking; split it")
    gal_ids = ids_arr[gal]
    if n_gal > 1 and (np.diff(gal_ids) == 0).any():
        dup = int(gal_ids[np.flatnonzero(np.diff(gal_ids) == 0)[0]])
        raise VlmindexError(f"id {dup} appears twice in the gallery; ids must be unique")
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
        _, group_codes = _factorize(groups_arr, "group", allow_missing=True)
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
    n_relevant = n_relevant.astype(np.int64)
    n_candidates = n_candidates.astype(np.int64)
    if k > int(n_candidates.max()):
        raise VlmindexError(
            f"k={k} is larger than the gallery ({int(n_candidates.max())} candidates per query); lower k"
        )

    # One normalised copy: the gallery (id order), then the queries that are not in it.
    extra = qry[~in_gallery]
    xall = _normalized_rows(x, np.concatenate([gal, extra]), ids_arr)
    xg = xall[:n_gal]
    q_row = self_col.copy()
    q_row[~in_gallery] = n_gal + np.arange(len(extra))
    # Bit-identical gallery rows (the same image stored twice) get one similarity column, copied,
    # so that they tie exactly and the id rule decides between them.
    xg_unique, expand = _unique_rows(xg)

    if n_threads is None:
        n_threads = min(os.cpu_count() or 1, _MAX_THREADS)
    n_threads = max(1, int(n_threads))
    # The product block shape depends on the gallery alone, never on chunk_size or n_threads.
    block = _block_rows(n_gal)
    if chunk_size is None:
        chunk_size = block
    elif int(chunk_size) < 1:
        raise VlmindexError(f"chunk_size must be positive (got {chunk_size})")
    chunk_size = -(-int(chunk_size) // block) * block

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
    col_words = np.arange(n_gal, dtype=np.uint32)
    # Narrow codes for the big [chunk, width] gather.
    code_type = np.int16 if n_classes < 2**15 else np.int32
    gal_codes_narrow = gal_codes.astype(code_type)

    def score_chunk(sel: np.ndarray) -> None:
        """Rank the gallery for the queries ``sel`` (positions in ``qry``) and write their metrics."""
        c = len(sel)
        sims = _block_products(xall, q_row[sel], xg_unique, block)
        np.add(sims, np.float32(0.0), out=sims)  # -0.0 -> +0.0: the two zeros compare equal
        if expand is not None:
            sims = sims[:, expand]
        keys = _rank_keys(sims, col_words, np.empty((c, n_gal), dtype=np.uint64))
        words = keys.view(np.uint32).reshape(c, n_gal, 2)
        rows = np.arange(c)
        own = in_gallery[sel]
        words[rows[own], self_col[sel][own], _HI] = _EXCLUDED
        if exclude_group:
            g = qry_groups[sel]
            sizes = group_size[g]
            cols = by_group[_ragged_ranges(group_start[g], sizes)]
            words[np.repeat(rows, sizes), cols, _HI] = _EXCLUDED

        cand = n_candidates[sel]
        r = n_relevant[sel]
        width = n_gal if full_ap else min(n_gal, max(k, int(r.max())))
        if width < n_gal:
            keys.partition(width - 1, axis=1)
            ranked = keys[:, :width]
            ranked.sort(axis=1)
        else:
            keys.sort(axis=1)
            ranked = keys
        top_col = ranked.view(np.uint32).reshape(c, width, 2)[:, :, _LO]
        qc = qry_codes[sel]
        rel = gal_codes_narrow[top_col] == qc.astype(code_type)[:, None]
        short = cand < width
        if short.any():
            # Excluded items sort last; past a query's candidates nothing counts.
            rel[short] &= np.arange(width) < cand[short, None]

        # Relevant hits as (row, rank): the j-th hit of a row, at 0-based rank p, has P@(p+1) = j/(p+1).
        hit_row, hit_pos = np.nonzero(rel)
        hits_per_row = np.bincount(hit_row, minlength=c)
        j = np.arange(1, len(hit_row) + 1) - np.repeat(np.cumsum(hits_per_row) - hits_per_row, hits_per_row)
        prec = j / (hit_pos + 1.0)
        scored = r > 0
        denom = np.where(scored, r, 1).astype(np.float64)
        within_r = hit_pos < r[hit_row]
        values = {
            "map_at_r": np.bincount(hit_row[within_r], weights=prec[within_r], minlength=c) / denom,
            "r_precision": np.bincount(hit_row[within_r], minlength=c) / denom,
            "purity_at_k": rel[:, :k].sum(axis=1) / k,
            "p_at_1": rel[:, 0].astype(np.float64),
        }
        if full_ap:
            values["ap"] = np.bincount(hit_row, weights=prec, minlength=c) / denom

        cols_k = top_col[:, :k].astype(np.int64)
        valid_k = np.arange(k) < cand[:, None]
        cols_k[~valid_k] = -1
        scores_k = np.take_along_axis(sims, np.maximum(cols_k, 0), axis=1)
        scores_k[~valid_k] = nan
        nb_col[sel] = cols_k
        nb_score[sel] = scores_k

        # kNN vote, vectorised: bincounts over (row, class) cells give votes and summed similarity.
        cell = (rows[:, None] * n_classes + gal_codes[np.maximum(cols_k, 0)])[valid_k]
        votes = np.bincount(cell, minlength=c * n_classes).reshape(c, n_classes)
        sim_sum = np.bincount(cell, weights=scores_k[valid_k].astype(np.float64), minlength=c * n_classes)
        top_votes = votes.max(axis=1)
        tied = votes == top_votes[:, None]
        best = np.argmax(np.where(tied, sim_sum.reshape(c, n_classes), -np.inf), axis=1)
        pred = np.where(top_votes > 0, best, -1)
        knn_pred[sel] = pred
        values["knn_correct"] = (pred == qc).astype(np.float64)
        for name, v in values.items():
            out[name][sel] = np.where(scored, v, nan)

    # Chunks of queries with similar R: the partial sort then stops near each chunk's own R.
    order = np.argsort(-n_relevant, kind="stable")
    chunks = [order[i : i + chunk_size] for i in range(0, n_qry, chunk_size)]
    _run_chunks(score_chunk, chunks, n_threads)

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


def _block_rows(n_gallery: int) -> int:
    rows = _BLOCK_BYTES // (_BYTES_PER_PAIR * max(1, n_gallery))
    return int(min(256, max(8, 2 ** int(math.log2(max(1, rows))))))


def _block_products(xall: np.ndarray, rows: np.ndarray, gallery: np.ndarray, block: int) -> np.ndarray:
    """``xall[rows] @ gallery.T`` in float32, one BLAS call per ``block`` rows (the last one padded).

    Every call has the same shape, so a similarity depends only on the two vectors and the query's
    place in its block, never on how many blocks a task holds.
    """
    c = len(rows)
    padded = -(-c // block) * block
    queries = np.zeros((padded, xall.shape[1]), dtype=np.float32)
    queries[:c] = xall[rows]
    out = np.empty((padded, gallery.shape[0]), dtype=np.float32)
    for start in range(0, padded, block):
        np.matmul(queries[start : start + block], gallery.T, out=out[start : start + block])
    return out[:c]


def _rank_keys(sims: np.ndarray, col_words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is descending similarity, then ascending gallery column.

    High word: the float32 bit pattern ``b`` mapped to ``b ^ 0x7FFFFFFF`` for b >= 0 and left as is
    for negative floats, which reverses the float order into unsigned-integer order (the usual
    radix-sort trick). Low word: the gallery column. The caller turns -0.0 into +0.0 first, so that
    the two zeros, which compare equal, tie.
    """
    c, g = sims.shape
    bits = sims.view(np.int32)
    hi = np.right_shift(bits, 31)
    np.invert(hi, out=hi)
    np.bitwise_and(hi, 0x7FFFFFFF, out=hi)
    np.bitwise_xor(hi, bits, out=hi)
    words = out.view(np.uint32).reshape(c, g, 2)
    words[:, :, _HI] = hi.view(np.uint32)
    words[:, :, _LO] = col_words
    return out


# --------------------------------------------------------------------------------------------------
# Distribution figures


def _class_codes(labels: Sequence[Any] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise VlmindexError(f"labels must have one entry per embedding row ({n}), got shape {arr.shape}")
    return _factorize(arr, "label", allow_missing=False)


def _degenerate(name: str, reason: str) -> float:
    warnings.warn(f"{name} is undefined: {reason}; returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def _prepare(embeddings: np.ndarray, labels: Any, normalize: bool) -> tuple[np.ndarray, np.ndarray, int]:
    x = _as_embeddings(embeddings)
    _, codes = _class_codes(labels, x.shape[0])
    x = _l2_normalize(x) if normalize else np.asarray(x, dtype=np.float64)
    return x, codes, int(codes.max()) + 1


def _class_sums(x: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Row sums per class code (every code in 0..n_classes-1 occurs, as _factorize guarantees)."""
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(n_classes))
    return np.add.reduceat(x[order], starts, axis=0)


def _scatter_traces(x: np.ndarray, codes: np.ndarray, n_classes: int) -> tuple[float, float, np.ndarray]:
    """Traces of the between-class and within-class scatter matrices, and the class centroids."""
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    sums = _class_sums(x, codes, n_classes)
    centroids = sums / counts[:, None]
    mean = x.mean(axis=0)
    between = float(np.sum(counts * np.sum((centroids - mean) ** 2, axis=1)))
    within = float(np.sum((x - centroids[codes]) ** 2))
    return between, within, centroids


def silhouette_cosine(embeddings: np.ndarray, labels: Any) -> float:
    r"""Mean silhouette coefficient with cosine distance :math:`d(i,j) = 1 - \hat x_i \cdot \hat x_j`.

    :math:`s_i = (b_i - a_i) / \max(a_i, b_i)` with :math:`a_i` the mean distance to the other
    members of i's class and :math:`b_i` the smallest mean distance to another class;
    :math:`s_i = 0` for a class of one (as scikit-learn). Because cosine distance is linear in the
    unit vectors, :math:`\sum_{j \in c} d(i,j) = n_c - \hat x_i \cdot \sum_{j \in c} \hat x_j`, so the
    exact value over *all* samples costs O(n·C·d) time and O(C·d) extra memory: no pairwise
    matrix and no subsampling, whatever n is.
    """
    x, codes, n_classes = _prepare(embeddings, labels, normalize=True)
    n = len(codes)
    if n_classes < 2:
        return _degenerate("silhouette", "only one class")
    if n_classes >= n:
        return _degenerate("silhouette", "every image is its own class")
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    sums = _class_sums(x, codes, n_classes)
    dist_sum = counts[None, :] - x @ sums.T  # [n, C]: Σ_{j∈c} d(i, j), self included (d(i,i) = 0)
    dist_sum = np.maximum(dist_sum, 0.0)
    own = codes
    own_n = counts[own]
    a = np.where(own_n > 1, dist_sum[np.arange(n), own] / np.maximum(own_n - 1, 1), 0.0)
    mean_other = dist_sum / counts[None, :]
    mean_other[np.arange(n), own] = np.inf
    b = mean_other.min(axis=1)
    denom = np.maximum(a, b)
    s = np.where((own_n > 1) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def davies_bouldin(embeddings: np.ndarray, labels: Any, *, normalize: bool = True) -> float:
    r"""Davies–Bouldin index (lower is better), Euclidean, on unit vectors by default.

    :math:`DB = \frac{1}{C}\sum_i \max_{j \ne i} \frac{s_i + s_j}{\lVert \mu_i - \mu_j \rVert}` with
    :math:`s_i` the mean distance of class i's members to its centroid :math:`\mu_i`. Two classes
    with the same centroid give +inf (with a warning) rather than scikit-learn's silent 0.
    """
    x, codes, n_classes = _prepare(embeddings, labels, normalize)
    if n_classes < 2:
        return _degenerate("Davies-Bouldin", "only one class")
    _, _, centroids = _scatter_traces(x, codes, n_classes)
    spread = np.bincount(codes, weights=np.linalg.norm(x - centroids[codes], axis=1), minlength=n_classes)
    spread /= np.bincount(codes, minlength=n_classes)
    sq = np.sum(centroids**2, axis=1)
    centre_dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * centroids @ centroids.T, 0.0))
    np.fill_diagonal(centre_dist, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (spread[:, None] + spread[None, :]) / centre_dist
    if (centre_dist == 0).any():
        warnings.warn("Davies-Bouldin: two classes share a centroid; the index is +inf", RuntimeWarning,
                      stacklevel=2)
        ratio = np.where(centre_dist == 0, np.inf, ratio)
    return float(np.mean(np.max(ratio, axis=1)))


def calinski_harabasz(embeddings: np.ndarray, labels: Any, *, normalize: bool = True) -> float:
    r"""Calinski–Harabasz index (higher is better) on unit vectors by default.

    :math:`CH = \frac{\operatorname{tr}(S_B)/(C-1)}{\operatorname{tr}(S_W)/(n-C)}`, scatter matrices
    as in :func:`fisher_ratio`. Undefined (NaN with a warning) for one class or C = n; +inf with a
    warning when every class is a single point.
    """
    x, codes, n_classes = _prepare(embeddings, labels, normalize)
    n = len(codes)
    if n_classes < 2:
        return _degenerate("Calinski-Harabasz", "only one class")
    if n_classes >= n:
        return _degenerate("Calinski-Harabasz", "every image is its own class")
    between, within, _ = _scatter_traces(x, codes, n_classes)
    if within == 0:
        warnings.warn("Calinski-Harabasz: no within-class spread; the index is +inf", RuntimeWarning,
                      stacklevel=2)
        return float("inf")
    return float(between * (n - n_classes) / (within * (n_classes - 1)))


def fisher_ratio(embeddings: np.ndarray, labels: Any, *, normalize: bool = True) -> float:
    r"""Fisher ratio :math:`\operatorname{tr}(S_B) / \operatorname{tr}(S_W)` (higher is better).

    :math:`S_B = \sum_c n_c (\mu_c - \mu)(\mu_c - \mu)^\top`,
    :math:`S_W = \sum_c \sum_{i \in c} (x_i - \mu_c)(x_i - \mu_c)^\top`, on unit vectors by default;
    the traces are computed directly as sums of squared norms, never forming d×d matrices. Equals
    Calinski–Harabasz × (C − 1)/(n − C).
    """
    x, codes, n_classes = _prepare(embeddings, labels, normalize)
    if n_classes < 2:
        return _degenerate("Fisher ratio", "only one class")
    between, within, _ = _scatter_traces(x, codes, n_classes)
    if within == 0:
        warnings.warn("Fisher ratio: no within-class spread; the ratio is +inf", RuntimeWarning, stacklevel=2)
        return float("inf")
    return float(between / within)


def linear_probe_balanced_accuracy(
    embeddings: np.ndarray,
    labels: Any,
    *,
    train_mask: np.ndarray | None = None,
    cv: int = 5,
    seed: int = 0,
    normalize: bool = True,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Balanced accuracy of a multinomial logistic-regression probe on the (unit) embeddings.

    With ``train_mask``: fit on those rows, score the others (a held-out split). Otherwise
    stratified ``cv``-fold cross-validation (shuffled with ``seed``): every image is predicted once
    by a probe that did not see it, and balanced accuracy (mean per-class recall) is computed over
    those pooled out-of-fold predictions. Features are standardised inside each fit. When the
    smallest class has fewer than ``cv`` images the folds drop to that count (warning); a class
    of one image, or a single class, makes the figure undefined (NaN with a warning).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, codes, n_classes = _prepare(embeddings, labels, normalize)

    def probe() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))

    if train_mask is not None:
        train = _as_mask(train_mask, len(codes), "train_mask")
        test = ~train
        if not test.any():
            return _degenerate("linear probe", "the held-out split is empty")
        if len(np.unique(codes[train])) < 2:
            return _degenerate("linear probe", "the training split has fewer than two classes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # held-out class unseen in training
            model = probe().fit(x[train], codes[train])
            return float(balanced_accuracy_score(codes[test], model.predict(x[test])))

    if n_classes < 2:
        return _degenerate("linear probe", "only one class")
    smallest = int(np.bincount(codes).min())
    if smallest < 2:
        return _degenerate("linear probe", "a class has a single image, so it cannot be cross-validated")
    folds = int(cv)
    if smallest < folds:
        warnings.warn(f"linear probe: smallest class has {smallest} images; using {smallest}-fold CV "
                      f"instead of {folds}", RuntimeWarning, stacklevel=2)
        folds = smallest
    pred = np.empty_like(codes)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train_idx, test_idx in splitter.split(x, codes):
        pred[test_idx] = probe().fit(x[train_idx], codes[train_idx]).predict(x[test_idx])
    return float(balanced_accuracy_score(codes, pred))


def distribution_figures(
    embeddings: np.ndarray,
    labels: Any,
    *,
    train_mask: np.ndarray | None = None,
    cv: int = 5,
    seed: int = 0,
    probe: bool = True,
) -> dict[str, Any]:
    """All distribution figures of one embedding set, as a flat dict (NaN where undefined).

    Keys: ``n``, ``n_classes``, ``silhouette_cosine``, ``davies_bouldin``, ``calinski_harabasz``,
    ``fisher_ratio`` and, unless ``probe=False``, ``linear_probe_balanced_accuracy``. Everything is
    computed on L2-normalised embeddings, the geometry the retrieval metrics use, so models whose
    features differ in scale stay comparable.
    """
    x = _as_embeddings(embeddings)
    _, codes = _class_codes(labels, x.shape[0])
    unit = _l2_normalize(x)
    out: dict[str, Any] = {
        "n": int(len(codes)),
        "n_classes": int(codes.max()) + 1,
        "silhouette_cosine": silhouette_cosine(unit, codes),
        "davies_bouldin": davies_bouldin(unit, codes, normalize=False),
        "calinski_harabasz": calinski_harabasz(unit, codes, normalize=False),
        "fisher_ratio": fisher_ratio(unit, codes, normalize=False),
    }
    if probe:
        out["linear_probe_balanced_accuracy"] = linear_probe_balanced_accuracy(
            unit, codes, train_mask=train_mask, cv=cv, seed=seed, normalize=False
        )
    return out


def project_2d(
    embeddings: np.ndarray,
    *,
    method: str = "pca",
    seed: int = 0,
    max_samples: int = 5000,
    max_iter: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """2-D projection of the unit embeddings for plots: ``(rows, coords)``.

    ``method`` is ``"pca"`` (all rows) or ``"tsne"`` (cosine t-SNE, ``max_iter`` iterations, on at
    most ``max_samples`` rows chosen uniformly at random with ``seed``, because t-SNE is
    quadratic-ish). ``rows`` says which input rows ``coords`` (shape [len(rows), 2]) belong to.
    """
    x = _l2_normalize(_as_embeddings(embeddings))
    n = x.shape[0]
    if method == "pca":
        from sklearn.decomposition import PCA

        return np.arange(n), PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        rows = np.arange(n)
        if n > max_samples:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
        perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
        tsne = TSNE(n_components=2, metric="cosine", init="pca", random_state=seed, perplexity=perplexity,
                    max_iter=max_iter)
        return rows, tsne.fit_transform(x[rows])
    raise VlmindexError(f"unknown projection method {method!r}; choose 'pca' or 'tsne'")
