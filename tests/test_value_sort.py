"""The value sort of the ranking runs: NumPy's sort or the radix sort, whichever this machine runs
faster. The radix sort must give NumPy's sorted values (ties, ±0, ±inf, subnormals), and the
metrics must be the same numbers, bit for bit, whichever sort ran."""

from __future__ import annotations

import numpy as np
import pytest
from test_metrics import assert_matches_reference, make_data, reference, tie_heavy_data

from vlmindex.metrics import merge, retrieval_metrics

FIELDS = ("purity_at_k", "ap", "map_at_r", "r_precision", "p_at_1", "knn_correct", "knn_pred_code", "neighbor_id",
          "neighbor_score")


def special_values(n: int, rng: np.random.Generator) -> np.ndarray:
    v = (rng.standard_normal(n) * 0.1 + 0.3).astype(np.float32)
    picks = np.array([0.0, -0.0, np.inf, -np.inf, 1e-42, -1e-42, 1.0, -1.0, np.finfo(np.float32).max,
                      np.finfo(np.float32).min, 0.25], dtype=np.float32)
    at = rng.random(n) < 0.2
    v[at] = rng.choice(picks, size=int(at.sum()))
    return v


@pytest.mark.parametrize("n", [0, 1, 2, 3, 100, merge.RADIX_FROM - 1, merge.RADIX_FROM, 5000, 70_000])
def test_radix_sort_gives_numpys_sorted_values(n):
    rng = np.random.default_rng(n)
    for values in (special_values(n, rng),
                   np.full(n, 0.5, dtype=np.float32),                # every digit pass skipped
                   rng.integers(-3, 4, size=n).astype(np.float32) / 4,  # few distinct values, both signs
                   -np.abs(rng.standard_normal(n)).astype(np.float32)):
        ours = values.copy()
        merge.radix_sort_bits(ours.view(np.uint32), np.empty(n, np.uint32))
        expected = np.sort(values)
        np.testing.assert_array_equal(ours, expected)  # -0.0 == 0.0: the two zeros may swap places
        # the same bit patterns, none lost or changed
        np.testing.assert_array_equal(np.sort(ours.view(np.uint32)), np.sort(values.view(np.uint32)))


def test_value_sort_sorts_long_and_short_runs_with_either_choice(monkeypatch):
    rng = np.random.default_rng(1)
    tmp = np.empty(6000, np.uint32)
    for faster in (True, False):
        monkeypatch.setattr(merge, "_radix_is_faster", lambda faster=faster: faster)
        for n in (10, merge.RADIX_FROM, 6000):
            run = special_values(n, rng)
            expected = np.sort(run)
            merge.value_sort(run, tmp)
            np.testing.assert_array_equal(run, expected)


@pytest.mark.parametrize("full_ap", [True, False])
def test_the_metrics_do_not_depend_on_which_sort_ran(monkeypatch, full_ap):
    # Runs longer than RADIX_FROM, coarse entries (exact ties across classes, -0.0 entries and
    # so ±0 similarities): the walk and the tie rule read radix-sorted runs as they read NumPy's.
    x, y = make_data(n=5000, d=12, sizes=(0.6, 0.25, 0.15), seed=2)
    x = (np.round(x * 3) / 3).astype(np.float32)
    x[np.abs(x).sum(axis=1) == 0, 0] = 1.0
    assert (np.signbit(x) & (x == 0)).any()
    groups = np.arange(len(y)) // 3
    kwargs = dict(k=7, groups=groups, exclude_group=True, full_ap=full_ap)
    results = {}
    for faster in (True, False):
        monkeypatch.setattr(merge, "_radix_is_faster", lambda faster=faster: faster)
        results[faster] = retrieval_metrics(x, y, **kwargs)
    assert int(results[True].n_relevant.max()) > merge.RADIX_FROM
    for name in FIELDS:
        a, b = getattr(results[True], name), getattr(results[False], name)
        if a is None:
            assert b is None and not full_ap
            continue
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_radix_sorted_ranking_matches_the_loop_under_heavy_ties(monkeypatch):
    monkeypatch.setattr(merge, "RADIX_FROM", 8)  # so that this small set's runs take the radix sort
    monkeypatch.setattr(merge, "_radix_is_faster", lambda: True)
    x, y, ids, groups = tie_heavy_data()
    kwargs = dict(ids=ids, groups=groups, k=5, exclude_group=True)
    assert_matches_reference(retrieval_metrics(x, y, **kwargs), reference(x, y, **kwargs))
