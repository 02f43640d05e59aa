"""The scan of a flat index: every vector's inner product with a batch of queries, in one pass.

OpenBLAS's products are made for wide matrices. With 2 to 8 queries against 100,000 × 512
vectors, on 2 cores, one cost 28–30 ms, against 7.2 ms for a single query. That is the cost of
4 to 8 single queries, so batching the service's queries saved little. :func:`scores` reads each
vector once and multiplies it by every query while it is in cache: 9.0 ms for 2 queries, 11.2
for 4 and 19.2 for 8, on the same cores. The rows are split between threads, since the kernel
releases the GIL.

The float32 scores only choose the candidates that ``exact_top_k`` scores again in float64, so
their summation order never shows in a result.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, types

_F2 = types.float32[:, ::1]
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@njit(types.void(_F2, _F2, types.int64, types.int64, _F2), nogil=True, cache=True, fastmath=True)
def _rows(vectors, queries, lo, hi, out):  # pragma: no cover - compiled
    b, d = queries.shape
    for i in range(lo, hi):
        for j in range(b):
            acc = np.float32(0.0)
            for t in range(d):
                acc += vectors[i, t] * queries[j, t]
            out[j, i] = acc


def team_size() -> int:
    """Threads for one scan: the size of the BLAS thread team where the environment sets it
    (``serve --workers N`` sets it to the cores divided by N), else one per core."""
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _helpers(n: int) -> ThreadPoolExecutor | None:
    global _pool
    if n < 1:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(n, thread_name_prefix="vlmindex-scan")
        return _pool


def scores(vectors: np.ndarray, queries: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``queries @ vectors.T`` in float32, a ``(len(queries), len(vectors))`` array, from one pass
    over ``vectors``. The calling thread scans one share of the rows, and ``threads - 1``
    helpers scan the others."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(vectors)
    out = np.empty((len(queries), n), np.float32)
    parts = max(1, min(threads or team_size(), n // 4096 or 1))  # a share under 4096 rows isn't worth a thread
    cuts = [n * p // parts for p in range(parts + 1)]
    pool = _helpers(parts - 1)
    futures = [pool.submit(_rows, vectors, queries, cuts[p], cuts[p + 1], out) for p in range(1, parts)] if pool else []
    try:
        _rows(vectors, queries, cuts[0], cuts[1], out)
    finally:
        for future in futures:
            future.result()  # the helpers write into `out`: none may outlive this call
    return out
