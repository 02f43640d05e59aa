"""The full ranking in torch, for a GPU: products, one stable sort per row, metrics from cumulative sums.

:func:`torch_rank` is the ``device=`` path of :func:`vlmindex.metrics.retrieval.retrieval_metrics`.
It ranks exactly as the NumPy path does: similarities are float32 inner products of the same unit
vectors (bit-identical gallery rows share one computed column), left-out items get -inf, and the
gallery is laid out in id order so that a *stable* descending sort puts the smaller id first among
equal similarities (``-0.0`` is turned into ``+0.0`` first: a radix sort on bit patterns would
otherwise split the two equal zeros). With ``rel`` the relevance of each rank and ``hits`` its
running sum, P@(n) = hits/n at every relevant rank n, so AP, MAP@R and R-precision are sums over
the row, computed on the device; only the top k goes back to the host for the kNN vote.

Chunks are sized to the device's free memory (about 48 bytes per query × gallery pair); on the
CPU (the tests' route) a chunk is 256 queries. The numbers equal the NumPy path's to 1e-6
whenever both compute the same similarities; two BLAS libraries may round a product differently in
the last bit, which can only reorder two items whose similarities differ by that bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from vlmindex.metrics.ranking import unique_rows

__all__ = ["chunk_rows", "torch_rank"]

BYTES_PER_PAIR = 48  # float32 similarity and sorted value, int64 index and class, float64 precision, flags
CPU_ROWS = 256


def chunk_rows(device: object, n_gallery: int, n_queries: int) -> int:
    """Queries per chunk: half the device's free memory over the working set of one query row."""
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return max(1, min(CPU_ROWS, n_queries))
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(n_queries, (free // 2) // (BYTES_PER_PAIR * max(1, n_gallery)))))


def torch_rank(device: str, xall: np.ndarray, q_row: np.ndarray, xg: np.ndarray, id_rank: np.ndarray,
               gal_codes: np.ndarray, qry_codes: np.ndarray, n_relevant: np.ndarray, n_candidates: np.ndarray,
               k: int, excluded: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
               ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Yield ``(sel, {ap, map_at_r, r_precision}, top-k columns, top-k scores)`` per chunk of queries.

    Inputs are those of the NumPy path: ``xall`` unit rows (the gallery ``xg`` first, in its class
    layout), ``q_row[i]`` the row of query i, ``id_rank[col]`` the id order of gallery column col,
    ``excluded(sel)`` the (row, column) pairs left out of the chunk ``sel``. Columns given back are
    in the class layout; -1 and NaN pad a top k longer than the query's candidates.
    """
    import torch

    dev = torch.device(device)
    by_rank = np.argsort(id_rank)  # the class-layout column at each id rank
    unique, expand = unique_rows(np.ascontiguousarray(xg[by_rank]))
    gallery = torch.from_numpy(np.ascontiguousarray(unique)).to(dev)
    expand_t = torch.from_numpy(expand).to(dev) if expand is not None else None
    codes = torch.from_numpy(gal_codes[by_rank].astype(np.int64)).to(dev)
    n_gal = len(by_rank)
    n_qry = len(q_row)
    rows = chunk_rows(dev, n_gal, n_qry)
    ranks = torch.arange(1, n_gal + 1, device=dev, dtype=torch.float64)
    # full float32 products whatever the caller's process set: TF32 (a 10-bit mantissa) would
    # reorder neighbours that the CPU path tells apart
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode():
            for start in range(0, n_qry, rows):
                sel = np.arange(start, min(n_qry, start + rows))
                queries = torch.from_numpy(np.ascontiguousarray(xall[q_row[sel]])).to(dev)
                sims = queries @ gallery.T
                if expand_t is not None:
                    sims = sims.index_select(1, expand_t)
                sims.add_(0.0)  # -0.0 -> +0.0
                r_out, c_out = excluded(sel)
                sims[torch.from_numpy(r_out).to(dev), torch.from_numpy(id_rank[c_out]).to(dev)] = float("-inf")
                values, order = torch.sort(sims, dim=1, descending=True, stable=True)
                del sims
                cand = torch.from_numpy(n_candidates[sel]).to(dev)
                r = torch.from_numpy(n_relevant[sel]).to(dev)
                qc = torch.from_numpy(qry_codes[sel].astype(np.int64)).to(dev)
                rel = codes[order] == qc[:, None]
                rel &= ranks[None, :] <= cand[:, None]
                hits = rel.cumsum(dim=1, dtype=torch.int32)
                prec = torch.where(rel, hits / ranks, 0.0)
                del hits
                denom = r.clamp(min=1).to(torch.float64)
                within = ranks[None, :] <= r[:, None]
                out = {
                    "ap": (prec.sum(dim=1) / denom).cpu().numpy(),
                    "map_at_r": ((prec * within).sum(dim=1) / denom).cpu().numpy(),
                    "r_precision": ((rel & within).sum(dim=1) / denom).cpu().numpy(),
                }
                del prec, rel, within
                width = min(k, n_gal)
                cols = np.full((len(sel), k), -1, dtype=np.int64)
                scores = np.full((len(sel), k), np.nan, dtype=np.float32)
                cols[:, :width] = by_rank[order[:, :width].cpu().numpy()]
                scores[:, :width] = values[:, :width].cpu().numpy()
                short = np.arange(k)[None, :] >= n_candidates[sel][:, None]
                cols[short] = -1
                scores[short] = np.nan
                yield sel, out, cols, scores
    finally:
        torch.set_float32_matmul_precision(precision)
