"""Ranking kernels of the exact retrieval metrics: normalisation, block products, buffers, threads.

The ranking is exact and deterministic: similarities are float32 inner products of L2-normalised
rows (as FAISS computes them), and ties are broken by the smaller id. A BLAS product rounds the
same pair differently (in the last bit) depending on the block shape and the pair's place in it,
so every product is taken on blocks of a fixed shape that depends only on the gallery size
(:func:`block_rows`, :func:`block_products`): results are bitwise independent of ``chunk_size`` and
``n_threads`` (only a change of the query set, which moves a query within its block, can change
the last bit). Bit-identical gallery rows share one computed column (:func:`unique_rows`), so
duplicates tie exactly.

Queries are processed in chunks (:func:`run_chunks`), each thread reusing its own buffers
(:class:`Scratch`), so memory is bounded by ``n_threads × chunk_size × |gallery| × 4 B`` (the
similarities; the sorted copies are :data:`CACHED_ROWS` rows at a time) and never by
``|queries| × |gallery|``; the value sorts and the tie rule are in :mod:`vlmindex.metrics.merge`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vlmindex.errors import VlmindexError

__all__ = [
    "Scratch",
    "BYTES_PER_PAIR",
    "CACHED_ROWS",
    "MAX_THREADS",
    "block_products",
    "block_rows",
    "l2_normalize",
    "normalized_rows",
    "ragged_ranges",
    "run_chunks",
    "single_threaded_blas",
    "unique_rows",
]

# Working memory per (query, gallery item) pair in one block: the similarity. (The sorted copies
# are CACHED_ROWS rows at a time.)
BYTES_PER_PAIR = 4
# Rows sorted, walked and scanned together: their copies stay in the cache (8 x 100,000 x 4 B is
# 3 MB), where a whole block's copy went out to memory and was read back twice.
CACHED_ROWS = 8
# One block of queries stays under this (block_rows).
_BLOCK_BYTES = 256 * 2**20
MAX_THREADS = 8


# --------------------------------------------------------------------------------------------------
# Normalisation


def normalized_rows(x: np.ndarray, rows: np.ndarray, ids: np.ndarray, *, block: int = 8192) -> np.ndarray:
    """float32 unit rows ``x[rows] / ||x[rows]||`` (computed in float64, ``block`` rows at a time,
    so no float64 copy of the whole set); zero or non-finite rows are user errors, named by ``ids``."""
    out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), block):
        sel = rows[start:start + block]
        sub = np.asarray(x[sel], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", sub, sub))
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            row = int(sel[np.flatnonzero(bad)[0]])
            raise VlmindexError(
                f"embedding of id {int(ids[row])} (row {row}) is all zeros or not finite; "
                "re-embed that image or filter it out"
            )
        sub /= norms[:, None]
        out[start:start + len(sel)] = sub
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """float64 unit rows ``x / ||x||``; zero or non-finite rows are user errors."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise VlmindexError(
            f"embedding row {int(np.flatnonzero(bad)[0])} is all zeros or not finite; filter it out"
        )
    return x / norms[:, None]


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct rows of ``x`` and the map back (None when all rows are distinct)."""
    if len(x) < 2:
        return x, None
    # Equal rows hash alike, so distinct hashes settle "all distinct" without sorting the rows.
    bits = np.ascontiguousarray(x).view(np.uint32 if x.dtype.itemsize == 4 else np.uint8).reshape(len(x), -1)
    weights = np.random.default_rng(0).integers(1, 2**63, size=bits.shape[1], dtype=np.uint64) | np.uint64(1)
    hashes = np.empty(len(x), dtype=np.uint64)
    for start in range(0, len(x), 4096):
        hashes[start:start + 4096] = (bits[start:start + 4096].astype(np.uint64) * weights).sum(axis=1)
    if len(np.unique(hashes)) == len(x):
        return x, None
    flat = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    if len(first) == len(x):
        return x, None
    return np.ascontiguousarray(x[first]), inverse.reshape(-1)


# --------------------------------------------------------------------------------------------------
# Fixed-shape block products and rank keys


def block_rows(n_gallery: int) -> int:
    """Rows of one product block: as many as keep a block under 256 MiB, within [8, 1024].

    Taller blocks run BLAS faster (on 2 AVX2 cores: 71 GFLOPS at 256 rows, 87 at 1024), so the
    memory budget sets the height, which binds from 65,536 gallery images up.
    """
    return int(min(1024, max(8, _BLOCK_BYTES // (BYTES_PER_PAIR * max(1, n_gallery)))))


def block_products(xall: np.ndarray, rows: np.ndarray, gallery: np.ndarray, block: int,
                   scratch: Scratch | None = None) -> np.ndarray:
    """``xall[rows] @ gallery.T`` in float32, one BLAS call per ``block`` rows (the last one padded).

    Every call has the same shape, so a similarity depends only on the two vectors and the query's
    place in its block, never on how many blocks a task holds. With ``scratch``, the output lives
    in the calling thread's reused buffer (valid until its next call).
    """
    c = len(rows)
    padded = -(-c // block) * block
    queries = np.zeros((padded, xall.shape[1]), dtype=np.float32)
    queries[:c] = xall[rows]
    shape = (padded, gallery.shape[0])
    out = scratch.array("products", shape, np.float32) if scratch is not None else np.empty(shape, np.float32)
    for start in range(0, padded, block):
        np.matmul(queries[start : start + block], gallery.T, out=out[start : start + block])
    return out[:c]


class Scratch(threading.local):
    """Per-thread working arrays reused from chunk to chunk of one computation.

    A fresh 100 MB array costs ~25,000 page faults on first touch (large allocations are mmapped
    and given back on free), several percent of a chunk's time at 100k images; one Scratch per
    call keeps them, per thread, until the call returns.
    """

    def array(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        buf = self.__dict__.get(name)
        if buf is None or buf.shape != shape or buf.dtype != np.dtype(dtype):
            buf = np.empty(shape, dtype=dtype)
            self.__dict__[name] = buf
        return buf


def ragged_ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    total = int(sizes.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, sizes)


# --------------------------------------------------------------------------------------------------
# Threads


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Our threads each run their own matrix product; BLAS threads on top would oversubscribe."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def run_chunks(fn: Callable[[np.ndarray], None], chunks: list[np.ndarray], n_threads: int) -> None:
    """Call ``fn`` on every chunk, on up to ``n_threads`` threads, with single-threaded BLAS."""
    # Single-threaded BLAS even without our threads: a multi-threaded product splits the block
    # differently and would change the last bit of some similarities.
    with single_threaded_blas():
        if n_threads <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                fn(chunk)
            return
        # NumPy releases the GIL in matmul, sort, partition and elementwise loops, so threads scale.
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for future in [pool.submit(fn, chunk) for chunk in chunks]:
                future.result()
