"""The top-L ranking of ``full_ap=False``: each row ranked only down to its max(R, k)-th item.

MAP@R, R-precision, P@1, purity@k, the kNN vote and the neighbours must be the numbers of the full
ranking, bit for bit, also where the L-th value is tied with many others (the selection keeps
every value equal to it), where k > R, where R = 0, with clusters and several product blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_metrics import assert_matches_reference, make_data, reference, tie_heavy_data

from vlmindex.metrics import ranking, retrieval_metrics

SAME = ("purity_at_k", "map_at_r", "r_precision", "p_at_1", "knn_correct", "knn_pred_code", "neighbor_id",
        "neighbor_score")


def assert_same(part, full):
    assert part.ap is None
    for name in SAME:
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name), err_msg=name)


@pytest.mark.parametrize("k", [1, 7, 60])
@pytest.mark.parametrize("exclude", [False, True])
def test_top_ranking_equals_the_full_one_under_heavy_ties(k, exclude):
    # every similarity a multiple of 1/16: the L-th value of each row is shared by many columns
    x, y, ids, groups = tie_heavy_data()
    for qmask in (None, np.arange(len(y)) % 3 != 0):
        kwargs = dict(ids=ids, groups=groups, k=k, exclude_group=exclude, query_mask=qmask)
        part = retrieval_metrics(x, y, full_ap=False, **kwargs)
        assert_same(part, retrieval_metrics(x, y, full_ap=True, **kwargs))
        assert_matches_reference(part, reference(x, y, **kwargs))


def test_k_above_every_r_and_rows_without_relevant_items():
    x, y = make_data(n=120, d=8, sizes=(0.6, 0.3, 0.1), seed=5)
    y = y.copy()
    y[7] = 9  # a class of one: R = 0 for that query
    k = int(np.bincount(y).max()) + 5  # deeper than any class
    part = retrieval_metrics(x, y, k=k, full_ap=False)
    full = retrieval_metrics(x, y, k=k, full_ap=True)
    assert_same(part, full)
    assert np.isnan(part.map_at_r[np.flatnonzero(part.query_index == 7)[0]])


def test_clusters_and_several_blocks(monkeypatch):
    n = 203
    monkeypatch.setattr(ranking, "_BLOCK_BYTES", ranking.BYTES_PER_PAIR * n * 16)  # 13 blocks of 16 rows
    x, y = make_data(n=n, d=6, seed=8)
    x = (np.round(x * 4) / 4).astype(np.float32)  # coarse: ties within and across classes
    x[np.linalg.norm(x, axis=1) == 0, 0] = 1.0
    groups = np.arange(n) // 4
    clusters = np.where(np.arange(n) % 10 < 2, np.arange(n) // 10, None)
    for kwargs in (dict(k=5), dict(k=5, groups=groups, exclude_group=True, clusters=clusters)):
        assert_same(retrieval_metrics(x, y, full_ap=False, **kwargs), retrieval_metrics(x, y, full_ap=True, **kwargs))


@pytest.mark.parametrize("guess", ["too high", "keep all", "random"])
def test_the_numbers_never_depend_on_the_threshold_guess(monkeypatch, guess):
    """The sampled threshold is only a guess: one above the depth-th value must be caught and
    replaced by the exact selection, one far below it only costs time."""
    from vlmindex.metrics import merge

    x, y, ids, groups = tie_heavy_data(n=150, seed=3)
    groups = groups.copy()
    groups[:146] = -1  # one group of 146: its queries have 3 candidates, fewer than k
    kwargs = dict(ids=ids, groups=groups, k=6, exclude_group=True)
    full = retrieval_metrics(x, y, full_ap=True, **kwargs)
    rng = np.random.default_rng(0)

    def fake(sims, depth, out):
        out[:] = {"too high": np.float32(2.0), "keep all": -np.inf}.get(
            guess, rng.choice(np.array([2.0, -np.inf, 0.25, 0.0], dtype=np.float32), size=len(out)))

    monkeypatch.setattr(merge, "top_thresholds", fake)
    assert_same(retrieval_metrics(x, y, full_ap=False, **kwargs), full)


def test_the_sampled_threshold_lies_below_the_depth_th_value_on_real_rows():
    from vlmindex.metrics.merge import top_thresholds

    rng = np.random.default_rng(4)
    sims = rng.normal(size=(200, 5000)).astype(np.float32)
    depth = rng.integers(1, 3000, size=200)
    out = np.empty(200, dtype=np.float32)
    top_thresholds(sims, depth, out)
    kth = np.array([np.sort(row)[-d] for row, d in zip(sims, depth, strict=True)])
    assert (out <= kth).mean() >= 0.99  # a miss is allowed (it is caught), not the rule
    kept = (sims >= out[:, None]).sum(axis=1)
    assert np.median(kept / depth) < 1.6, "the guess keeps the sorts short"


def test_each_ranking_kernel_compiles_one_signature_only():
    """Found by bench_metrics (a segfault): lazily typed kernels compiled one cache entry per array
    layout they met, processes numbered those entries differently, and two of them writing one
    cache left an index pointing at another signature's code. One signature per kernel, and an
    array of another layout is refused instead of compiled."""
    from vlmindex.metrics import merge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    y = np.arange(40) % 3
    retrieval_metrics(x, y, k=3)
    retrieval_metrics(x, y, k=3, full_ap=False)
    retrieval_metrics(np.vstack([x, x[:5]]), np.concatenate([y, y[:5]]), k=3)  # duplicate rows: copied columns
    assert set(merge._SIGNATURES) >= {n for n in merge.__all__ if hasattr(getattr(merge, n), "signatures")}
    for name in merge._SIGNATURES:
        assert len(getattr(merge, name).signatures) == 1, name
    lo, hi = np.zeros(4, np.int64), np.ones(4, np.int64)
    with pytest.raises(TypeError):
        merge.split_runs(np.zeros((6, 4), np.float32).T, lo, hi, np.zeros((4, 6), np.float32))
