"""Compiled row kernels of the exact ranking: merging two value-sorted runs, and the exact top k.

The full-ranking path (:func:`vlmindex.metrics.retrieval.retrieval_metrics` with ``full_ap=True``)
lays the gallery out by class, so that for a query of class c its relevant items are one
contiguous run of columns and the irrelevant ones the rest. It sorts the similarities of the two
runs separately (:func:`value_sort`: NumPy's SIMD sort or a radix sort, whichever is faster on
the machine), which costs what one sort of the whole row costs, and never sorts a permutation.
The rank of the i-th relevant item (0-based, best first) is then ``i + #{irrelevant items ranked
above it}``, which one linear walk over both runs, from their best ends, gives
(:func:`merge_ranks`). Equal values of a relevant and an irrelevant item are ordered by the id
rule: the walk finds their ids in the row and takes each tied group in id order. The k nearest
neighbours come from the k-th value of the merged order: every column at least that similar is a
candidate, and the candidates are ordered by similarity, then id (:func:`top_k`), so the top k
is exact with no tie left to chance.

Without AP (``full_ap=False``) a row is ranked only to its max(R, k)-th item: a threshold at or
below that item's similarity (:func:`top_thresholds` guesses it from a sample; the caller checks
it and selects exactly where it fails), and :func:`split_top` keeps only the values at least as
large, with their columns, for the same sorts and walk.

The kernels release the GIL, so the chunk threads of ``run_chunks`` run them in parallel.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from numba import njit, types

__all__ = ["RADIX_FROM", "merge_ranks", "radix_sort_bits", "split_runs", "split_top", "top_k", "top_thresholds",
           "value_sort"]

# One signature per kernel, compiled on first import and cached: with lazy typing, processes that
# met differently laid-out arrays numbered their cache entries differently, and two of them
# writing one cache at once left an index pointing at another signature's code (a segfault in
# a later run). C-contiguous arrays only: the callers pass nothing else.
_F2, _F1, _D1 = types.float32[:, ::1], types.float32[::1], types.float64[::1]
_I2, _I1, _U2 = types.int64[:, ::1], types.int64[::1], types.uint32[:, ::1]
_SIGNATURES = {
    "_canonical": types.uint32(types.uint32),
    "_hash": types.int64(types.uint32, types.uint64),
    "split_runs": types.void(_F2, _I1, _I1, _F2),
    "top_thresholds": types.void(_F2, _I1, _F1),
    "split_top": types.void(_F2, _I1, _I1, _F1, _F2, _U2, _I1, _I1),
    "merge_ranks": types.void(_F2, _I1, _I1, _I1, _I1, _I1, types.int64, _F2, _I1, _I1, _I1, _U2, _I1, _D1, _D1,
                              _D1, _F1, _U2, _I1),
    "top_k": types.void(_F2, _F1, _I1, types.int64, _U2, _I1, _U2, _I1, _I2, _F2),
    "radix_sort_bits": types.void(types.uint32[::1], types.uint32[::1]),
}


# Runs at least this long are sorted by radix_sort_bits where it is the faster sort (value_sort):
# below it the radix's fixed cost (three 2048-bucket histograms) outweighs what it saves.
RADIX_FROM = 2048
_DIGIT_BITS = 11
_DIGITS = 1 << _DIGIT_BITS


@njit(_SIGNATURES["radix_sort_bits"], nogil=True, cache=True)
def radix_sort_bits(bits: np.ndarray, tmp: np.ndarray) -> None:  # pragma: no cover - compiled
    """Sort float32 values, given as their bit patterns, ascending in place (``tmp``: as long).

    A least-significant-digit radix sort in three passes of 11 bits over order-preserving keys
    (sign bit set: all bits flipped; else the sign bit set), a pass skipped where every key has
    the same digit. NaN is not expected (similarities of unit rows); -0.0 lands before +0.0,
    which compare equal, so every reader of the sorted values sees what NumPy's sort gives.
    Linear in the length: on a 2-core Zen 4, 5 to 8 ns per value from 2,000 values to 100,000,
    where NumPy's SIMD sort took 11 to 27 ns."""
    n = bits.shape[0]
    if n < 2:
        return
    mask = np.uint32(_DIGITS - 1)
    top = np.uint32(0x80000000)
    hist = np.zeros((3, _DIGITS), dtype=np.int64)
    for i in range(n):
        u = bits[i]
        key = ~u if u & top else u | top
        bits[i] = key
        hist[0, key & mask] += 1
        hist[1, (key >> np.uint32(_DIGIT_BITS)) & mask] += 1
        hist[2, key >> np.uint32(2 * _DIGIT_BITS)] += 1
    src, dst = bits, tmp[:n]
    for p in range(3):
        h = hist[p]
        total = 0
        same = False
        for d in range(_DIGITS):
            c = h[d]
            if c == n:
                same = True
                break
            h[d] = total
            total += c
        if same:
            continue
        shift = np.uint32(p * _DIGIT_BITS)
        for i in range(n):
            key = src[i]
            d = (key >> shift) & mask
            dst[h[d]] = key
            h[d] += 1
        src, dst = dst, src
    for i in range(n):
        key = src[i]
        bits[i] = key & ~top if key & top else ~key


_TIMING = threading.Lock()
_RADIX_FASTER: list[bool] = []  # the answer, once timed


def _radix_is_faster() -> bool:
    """Whether radix_sort_bits beats NumPy's sort on this machine, timed once per process on rows
    of similarities (NumPy's SIMD sort is several times faster on some CPUs than on others).
    The chunk threads ask at once: one of them times it, the others wait for its answer."""
    if not _RADIX_FASTER:
        with _TIMING:
            if not _RADIX_FASTER:
                _RADIX_FASTER.append(_time_the_sorts())
    return _RADIX_FASTER[0]


def _time_the_sorts() -> bool:
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((3, 16 * RADIX_FROM)) * 0.1 + 0.3).astype(np.float32)
    tmp = np.empty(rows.shape[1], dtype=np.uint32)
    best = {"numpy": np.inf, "radix": np.inf}
    for _ in range(3):
        for name in best:
            work = rows.copy()
            start = time.perf_counter()
            for row in work:
                if name == "numpy":
                    row.sort()
                else:
                    radix_sort_bits(row.view(np.uint32), tmp)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["radix"] < best["numpy"]


def value_sort(run: np.ndarray, tmp: np.ndarray) -> None:
    """Sort a C-contiguous float32 run ascending in place, by the faster of NumPy's sort and
    :func:`radix_sort_bits` on this machine (``tmp``: uint32 scratch at least as long as ``run``).
    The sorted values are the same either way; only the time differs."""
    if len(run) >= RADIX_FROM and _radix_is_faster():
        radix_sort_bits(run.view(np.uint32), tmp)
    else:
        run.sort()


@njit(_SIGNATURES["_canonical"], nogil=True, cache=True)
def _canonical(bits: np.uint32) -> np.uint32:  # pragma: no cover - compiled
    """The float32 bit pattern with -0.0 as +0.0, so that the two equal zeros hash alike."""
    return np.uint32(0) if (bits & np.uint32(0x7FFFFFFF)) == 0 else bits


@njit(_SIGNATURES["_hash"], nogil=True, cache=True)
def _hash(bits: np.uint32, shift: np.uint64) -> np.int64:  # pragma: no cover - compiled
    return np.int64((np.uint64(bits) * np.uint64(0x9E3779B97F4A7C15)) >> shift)


@njit(_SIGNATURES["split_runs"], nogil=True, cache=True)
def split_runs(sims: np.ndarray, lo: np.ndarray, hi: np.ndarray, runs: np.ndarray) -> None:  # pragma: no cover
    """Row q of ``runs``: the relevant run ``sims[q, lo[q]:hi[q]]``, then the rest of the row."""
    for q in range(sims.shape[0]):
        a = lo[q]
        w = hi[q] - a
        runs[q, :w] = sims[q, a:hi[q]]
        runs[q, w:w + a] = sims[q, :a]
        runs[q, w + a:] = sims[q, hi[q]:]


@njit(_SIGNATURES["top_thresholds"], nogil=True, cache=True)
def top_thresholds(sims: np.ndarray, depth: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per row q, a value at or below its ``depth[q]``-th largest, most likely: a quantile of an
    evenly spaced sample of 512 of its entries, with four standard errors of margin (+inf where
    ``depth[q]`` is 0). The caller checks it (at least ``depth[q]`` values >= it) and selects
    exactly where the sample was unlucky; the numbers never depend on the guess, only the time."""
    n = sims.shape[1]
    size = min(n, 512)
    sample = np.empty(size, dtype=np.float32)
    for q in range(sims.shape[0]):
        if depth[q] == 0:
            out[q] = np.inf
            continue
        for i in range(size):
            sample[i] = sims[q, (i * n) // size]  # spread over the whole row (it is laid out by class)
        expected = depth[q] * size / n  # sample items above the depth-th largest
        place = int(expected + 4.0 * np.sqrt(expected) + 2.0)
        if place >= size:
            out[q] = -np.inf  # deep rankings: everything is kept
            continue
        out[q] = np.partition(sample, size - 1 - place)[size - 1 - place]


@njit(nogil=True, cache=True, inline="always")
def _keep_from(sims: np.ndarray, q: int, start: int, stop: int, t: np.float32, runs: np.ndarray, cols: np.ndarray,
               at: int) -> int:  # pragma: no cover - compiled
    """Append the values ``>= t`` of ``sims[q, start:stop]`` (and their columns) at ``at``; the new end."""
    for col in range(start, stop):
        v = sims[q, col]
        runs[q, at] = v
        cols[q, at] = col
        at += v >= t
    return at


@njit(_SIGNATURES["split_top"], nogil=True, cache=True)
def split_top(sims: np.ndarray, lo: np.ndarray, hi: np.ndarray, threshold: np.ndarray, runs: np.ndarray,
              cols: np.ndarray, n_rel: np.ndarray, n_irr: np.ndarray) -> None:  # pragma: no cover - compiled
    """Row q of ``runs``: the relevant similarities ``>= threshold[q]`` (``n_rel[q]`` of them), then
    the irrelevant ones (``n_irr[q]``), each in column order, their columns in ``cols[q]``; the
    rest of the row is left as it is.

    Every value equal to the threshold is kept, so a tied group is never cut in two; left-out
    items (-inf) never are, whatever the threshold. Branch-free: each entry is written and the
    write position moves on only when it is kept (a kept share near one half mispredicts every
    other branch)."""
    lowest = np.float32(np.finfo(np.float32).min)
    for q in range(sims.shape[0]):
        t = max(threshold[q], lowest)
        a = _keep_from(sims, q, lo[q], hi[q], t, runs, cols, 0)
        b = _keep_from(sims, q, 0, lo[q], t, runs, cols, a)
        b = _keep_from(sims, q, hi[q], sims.shape[1], t, runs, cols, b)
        n_rel[q] = a
        n_irr[q] = b - a


_STRIDE = 8


@njit(_SIGNATURES["merge_ranks"], nogil=True, cache=True)
def merge_ranks(runs: np.ndarray, rel_width: np.ndarray, irr_end: np.ndarray, n_rel: np.ndarray,
                n_irr: np.ndarray, n_relevant: np.ndarray, k: int, sims: np.ndarray, lo: np.ndarray,
                hi: np.ndarray, id_rank: np.ndarray, scan: np.ndarray, n_scan: np.ndarray, ap: np.ndarray,
                map_at_r: np.ndarray, r_precision: np.ndarray, kth_out: np.ndarray, near: np.ndarray,
                n_near: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per row q: AP, MAP@R and R-precision from the two sorted runs, and the k-th merged value.

    ``runs[q]`` holds two runs sorted ascending: the similarities to relevant items in its first
    ``rel_width[q]`` entries, then those to irrelevant items, ending at entry ``irr_end[q]``; the
    walk takes the last ``n_rel[q]`` and ``n_irr[q]`` entries of each run (the best ones, best
    last). In the full ranking (:func:`split_runs`) these are all the row's candidates (the
    left-out items hold -inf and come first); in the top ranking (:func:`split_top`) they are the
    items at least as similar as the row's L-th largest value, L >= R. ``sims[q]`` is the row
    itself (-inf where left out), its relevant run at columns ``[lo[q], hi[q])``; ``n_relevant[q]``
    is R. With ``pos`` the 0-based rank of the i-th relevant item, P@(pos+1) = (i+1)/(pos+1); AP
    sums it over all relevant items, MAP@R over those with pos < R, and R-precision counts those,
    each divided by R. A relevant item left out of a top ranking has pos >= L >= R, so MAP@R and
    R-precision are exact there; its AP is not (the caller discards it). A row with R = 0 keeps its
    metrics as they are. Tied items are looked for in the columns ``scan[q, :n_scan[q]]`` (the
    kept ones of a top ranking), or in the whole row where ``n_scan[q]`` is -1. That scan also
    collects the row's top-k candidates (columns with similarity >= ``kth_out[q]``) into
    ``near[q, :n_near[q]]``, so that :func:`top_k` need not pass over the row again; ``n_near[q]``
    is -1 where the row had no scan or more candidates than ``near`` holds.

    A value held by a relevant and an irrelevant item at once (float32 similarities tie often at
    scale: a row of 100k has ~10^9 such pairs over ~10^7 float32 values) is ordered by the id
    rule: the walk first places a tied group's relevant items before its irrelevant ones; one scan
    of the row then finds the tied items (through a small hash table of bit patterns), and each
    group's relevant items are moved to their places in ``id_rank`` order. ``kth_out[q]`` is the
    min(k, candidates)-th largest merged similarity (+inf without candidates), for :func:`top_k`.
    """
    n = sims.shape[1]
    sim_bits = sims.view(np.uint32)
    tie_vals = np.empty(n, dtype=np.float32)
    tie_i = np.empty(n, dtype=np.int64)   # a tied group's first relevant index and ...
    tie_j = np.empty(n, dtype=np.int64)   # ... the irrelevant items ranked above the group
    item_key = np.empty(n, dtype=np.int64)
    item_rel = np.empty(n, dtype=np.bool_)
    empty = np.uint32(0xFFFFFFFF)  # a NaN pattern: never a similarity
    # Low 16 bits of the row's tied values, as a bitset: 8 KB stays in L1 while the row streams by
    # (a bool per pattern, 64 KB, does not, and the scan ran 1.6x slower).
    seen = np.zeros(1 << 10, dtype=np.uint64)
    cap = near.shape[1]
    for q in range(runs.shape[0]):
        r = n_rel[q]
        m = n_irr[q]
        big_r = n_relevant[q]
        wr = rel_width[q] - 1  # runs[q, wr - i] is the i-th best relevant item
        wi = irr_end[q]  # runs[q, wi - j] is the j-th best irrelevant item
        rel = runs[q]
        irr = runs[q]
        # The walk, placing a tied group's relevant items before its irrelevant ones for now.
        s_ap = 0.0
        s_map = 0.0
        within = 0
        nt = 0
        j = 0
        for i in range(r):
            v = rel[wr - i]
            # Eight at a time where the irrelevant items ahead are all more similar (the tail of
            # a ranking, where relevant items are sparse), then one at a time.
            while j + _STRIDE < m and irr[wi - j - _STRIDE] > v:
                j += _STRIDE
            while j < m and irr[wi - j] > v:
                j += 1
            if j < m and irr[wi - j] == v and (nt == 0 or tie_vals[nt - 1] != v):
                tie_vals[nt] = v
                tie_i[nt] = i
                tie_j[nt] = j
                nt += 1
            pos = i + j
            prec = (i + 1.0) / (pos + 1.0)
            s_ap += prec
            if pos < big_r:
                s_map += prec
                within += 1
        # The k-th merged value: every column at least as similar is a top-k candidate.
        a = 0
        b = 0
        kth = np.inf
        for _ in range(min(k, r + m)):
            if b >= m or (a < r and rel[wr - a] >= irr[wi - b]):
                kth = rel[wr - a]
                a += 1
            else:
                kth = irr[wi - b]
                b += 1
        kth_out[q] = kth
        n_near[q] = -1
        if nt == 0:
            if big_r > 0:
                ap[q] = s_ap / big_r
                map_at_r[q] = s_map / big_r
                r_precision[q] = within / big_r
            continue
        size = 64
        while size < 4 * nt:
            size *= 2
        table_bits = np.full(size, empty)
        table_idx = np.empty(size, dtype=np.int64)
        shift = np.uint64(64 - int(np.log2(size)))
        for t in range(nt):
            bits = _canonical(np.array([tie_vals[t]], dtype=np.float32).view(np.uint32)[0])
            seen[(bits & 0xFFFF) >> 6] |= np.uint64(1) << np.uint64(bits & 63)
            h = _hash(bits, shift)
            while table_bits[h] != empty:
                h = (h + 1) & (size - 1)
            table_bits[h] = bits
            table_idx[h] = t
        n_items = 0
        whole = n_scan[q] < 0
        m_near = 0
        for at in range(n if whole else n_scan[q]):
            col = at if whole else scan[q, at]
            if sims[q, col] >= kth:
                if m_near < cap:
                    near[q, m_near] = col
                m_near += 1
            # The low 16 bits first (the same for the two zeros): most columns stop here.
            bits = sim_bits[q, col]
            if (seen[(bits & 0xFFFF) >> 6] >> np.uint64(bits & 63)) & np.uint64(1) == 0:
                continue
            bits = _canonical(bits)
            h = _hash(bits, shift)
            while table_bits[h] != empty:
                if table_bits[h] == bits:
                    item_key[n_items] = table_idx[h] * n + id_rank[col]
                    item_rel[n_items] = lo[q] <= col < hi[q]
                    n_items += 1
                    break
                h = (h + 1) & (size - 1)
        if m_near <= cap:
            n_near[q] = m_near
        seen[:] = 0
        order = np.argsort(item_key[:n_items])
        g = 0
        for t in range(nt):
            i = tie_i[t]
            j = tie_j[t]
            while g < n_items and item_key[order[g]] // n == t:
                if item_rel[order[g]]:
                    early = i + tie_j[t]
                    prec_early = (i + 1.0) / (early + 1.0)
                    pos = i + j
                    prec = (i + 1.0) / (pos + 1.0)
                    s_ap += prec - prec_early
                    if early < big_r:
                        s_map -= prec_early
                        within -= 1
                    if pos < big_r:
                        s_map += prec
                        within += 1
                    i += 1
                else:
                    j += 1
                g += 1
        if big_r > 0:
            ap[q] = s_ap / big_r
            map_at_r[q] = s_map / big_r
            r_precision[q] = within / big_r


@njit(_SIGNATURES["top_k"], nogil=True, cache=True)
def top_k(sims: np.ndarray, kth: np.ndarray, id_rank: np.ndarray, k: int, scan: np.ndarray, n_scan: np.ndarray,
          near: np.ndarray, n_near: np.ndarray, cols: np.ndarray,
          scores: np.ndarray) -> None:  # pragma: no cover - compiled
    """The k nearest columns of each row, by descending similarity, then ascending ``id_rank``.

    Candidates are the columns with ``sims >= kth[q]`` (excluded columns hold -inf), looked for
    in ``near[q, :n_near[q]]`` (:func:`merge_ranks` collected them), else in
    ``scan[q, :n_scan[q]]``, else (both -1) in the whole row; fewer than k leave ``cols`` at -1
    and ``scores`` at NaN.
    """
    n = sims.shape[1]
    cand = np.empty(n, dtype=np.int64)
    for q in range(sims.shape[0]):
        thr = kth[q]
        n_cand = 0
        collected = n_near[q] >= 0
        whole = not collected and n_scan[q] < 0
        if np.isfinite(thr):
            for at in range(n if whole else (n_near[q] if collected else n_scan[q])):
                col = at if whole else (near[q, at] if collected else scan[q, at])
                if sims[q, col] >= thr:
                    cand[n_cand] = col
                    n_cand += 1
        picked = cand[:n_cand]
        by_id = picked[np.argsort(id_rank[picked], kind="mergesort")]
        neg = np.empty(n_cand, dtype=np.float32)
        for t in range(n_cand):
            neg[t] = -sims[q, by_id[t]]
        ranked = by_id[np.argsort(neg, kind="mergesort")]  # stable: equal similarity keeps id order
        for t in range(k):
            if t < n_cand:
                cols[q, t] = ranked[t]
                scores[q, t] = sims[q, ranked[t]]
            else:
                cols[q, t] = -1
                scores[q, t] = np.nan
