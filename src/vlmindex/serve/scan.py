"""The scan of a flat index: every vector's inner product with a batch of queries, in one pass.

OpenBLAS's products are made for wide matrices. With 2 to 8 queries against 100,000 × 512
vectors, on 2 cores, one cost 28–30 ms, against 7.2 ms for a single query. That is the cost of
4 to 8 single queries, so batching the service's queries saved little. :func:`scores` reads each
vector once and multiplies it by every query while it is in cache: 9.0 ms for 2 queries, 11.2
for 4 and 19.2 for 8, on the same cores. The rows are split between threads, since the kernel
releases the GIL.

The float32 scores only choose the candidates that ``exact_top_k`` scores again in float64, so
their summation order never shows in a result. The vectorised sums' error stayed below 2e-7 up
to 4096-d (the margin there is 1e-4).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np
from numba import njit, types

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
MIN_SHARE = 4096  # rows: a thread's share below this costs more to hand over than it saves

_F2 = types.float32[:, ::1]
_F2_READONLY = types.Array(types.float32, 2, "C", readonly=True)  # a read-only memory map of the vectors
# One signature per layout, in a fixed order: cache entries numbered alike by every process (see metrics/merge.py).
_SIGNATURES = [types.void(vectors, _F2, types.int64, types.int64, _F2) for vectors in (_F2, _F2_READONLY)]


def _rows_py(vectors, queries, lo, hi, out):  # pragma: no cover - compiled
    b, d = queries.shape
    for i in range(lo, hi):
        for j in range(b):
            acc = np.float32(0.0)
            for t in range(d):
                acc += vectors[i, t] * queries[j, t]
            out[j, i] = acc


def _compile(cache: bool):
    # reassociation lets the sum vectorise (contraction: into FMAs); not the flags under which NaN and inf are undefined
    return njit(_SIGNATURES, nogil=True, cache=cache, fastmath={"reassoc", "contract"})(_rows_py)


try:
    _rows = _compile(cache=True)
except RuntimeError:  # no writable cache location (a read-only install): compiled in each process instead
    _rows = _compile(cache=False)

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()  # a forked child has none of the threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def cores() -> int:
    """The cores this process may run on (a container's or ``taskset``'s share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def team_size() -> int:
    """Threads for one scan: the size of the thread teams where the environment sets it
    (``serve --workers N`` sets it to the cores divided by N), else one per core."""
    for variable in THREAD_VARIABLES:
        value = os.environ.get(variable, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return cores()


def _submit(shares: list[tuple], futures: list[concurrent.futures.Future]) -> None:
    """Each share to a pool of at least ``len(shares)`` threads, shared by every scan of this
    process, its future appended to ``futures`` as soon as it is submitted. Under the lock, so a
    scan that grows the pool never retires a pool that another scan is submitting to."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < len(shares):
            old, _pool, _pool_size = _pool, concurrent.futures.ThreadPoolExecutor(
                len(shares), thread_name_prefix="vlmindex-scan"), len(shares)
            if old is not None:
                old.shutdown(wait=False)  # its queued shares still run; new ones go to the larger pool
        for share in shares:
            futures.append(_pool.submit(_rows, *share))


def scores(vectors: np.ndarray, queries: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``queries @ vectors.T`` in float32, a ``(len(queries), len(vectors))`` array, from one pass
    over ``vectors``. The calling thread scans one share of the rows, and ``threads - 1`` (by
    default :func:`team_size` - 1) helpers scan the others."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if vectors.ndim != 2 or queries.ndim != 2 or vectors.shape[1] != queries.shape[1]:
        raise ValueError(f"queries of shape {queries.shape} cannot be scored against vectors of shape {vectors.shape}")
    if not queries.flags.writeable:
        queries = queries.copy()  # one signature for the (small) queries
    n = len(vectors)
    out = np.empty((len(queries), n), np.float32)
    parts = max(1, min(threads or team_size(), n // MIN_SHARE))
    cuts = [n * p // parts for p in range(parts + 1)]
    futures: list[concurrent.futures.Future] = []
    try:
        if parts > 1:
            _submit([(vectors, queries, cuts[p], cuts[p + 1], out) for p in range(1, parts)], futures)
        _rows(vectors, queries, cuts[0], cuts[1], out)
    finally:
        concurrent.futures.wait(futures)  # the helpers read `vectors` and write `out`: none outlives this call
    for future in futures:
        future.result()
    return out
