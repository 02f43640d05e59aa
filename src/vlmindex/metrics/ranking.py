"""Ranking kernels of the exact retrieval metrics: normalisation, block products, rank keys, threads.

The ranking is exact and deterministic: similarities are float32 inner products of L2-normalised
rows (as FAISS computes them), and ties are broken by the smaller id. A BLAS product rounds the
same pair differently (in the last bit) depending on the block shape and the pair's place in it,
so every product is taken on blocks of a fixed shape that depends only on the gallery size
(:func:`block_rows`, :func:`block_products`): results are bitwise independent of ``chunk_size`` and
``n_threads`` (only a change of the query set, which moves a query within its block, can change
the last bit). Bit-identical gallery rows share one computed column (:func:`unique_rows`), so
duplicates tie exactly.

To get the tie rule from a fast, unstable sort, each (query, gallery item) pair becomes one
``uint64`` key (:func:`rank_keys`) whose high word is the similarity mapped to an order-reversing
unsigned integer and whose low word is the item's position in a gallery sorted by id; ascending
key order is then exactly "higher similarity first, smaller id next". Queries are processed in
chunks (:func:`run_chunks`), so memory is bounded by ``n_threads × chunk_size × |gallery|`` and
never by ``|queries| × |gallery|``. The full-ranking path sorts values, not keys, and needs the
keys only for a row with a cross-class tie (:mod:`vlmindex.metrics.merge`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vlmindex.errors import VlmindexError

__all__ = [
    "HI",
    "KEY_BYTES_PER_PAIR",
    "LO",
    "MERGE_BYTES_PER_PAIR",
    "Scratch",
    "MAX_THREADS",
    "block_products",
    "block_rows",
    "l2_normalize",
    "normalized_rows",
    "ragged_ranges",
    "rank_keys",
    "run_chunks",
    "single_threaded_blas",
    "unique_rows",
]

# Word order of a uint64 seen as two uint32 words.
LO, HI = (0, 1) if sys.byteorder == "little" else (1, 0)
# Working memory per (query, gallery item) pair in one block. Key path: float32 similarity, uint64
# key and its temporaries, gathered indices, relevance flags and hit positions. Merge path: the
# similarity and its negated, value-sorted copy.
KEY_BYTES_PER_PAIR = 40
MERGE_BYTES_PER_PAIR = 8
# One block of queries stays under this; a block has a power-of-two row count in [8, 256].
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
    flat = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    if len(first) == len(x):
        return x, None
    return np.ascontiguousarray(x[first]), inverse.reshape(-1)


# --------------------------------------------------------------------------------------------------
# Fixed-shape block products and rank keys


def block_rows(n_gallery: int, bytes_per_pair: int = KEY_BYTES_PER_PAIR) -> int:
    """Rows of one product block: a power of two in [8, 256] keeping a block under ~256 MiB."""
    rows = _BLOCK_BYTES // (bytes_per_pair * max(1, n_gallery))
    return int(min(256, max(8, 2 ** int(math.log2(max(1, rows))))))


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


def rank_keys(sims: np.ndarray, col_words: np.ndarray, out: np.ndarray) -> np.ndarray:
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
    words[:, :, HI] = hi.view(np.uint32)
    words[:, :, LO] = col_words
    return out


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
