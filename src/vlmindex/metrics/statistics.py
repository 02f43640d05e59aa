r"""Uncertainty of metric values: one percentile bootstrap, one paired test, and Holm's correction.

Pure NumPy/SciPy, no I/O, every result seeded so that a rerun gives the same numbers.

Resampling unit. The bootstrap resamples *units* with replacement. A unit is a group of queries
that are not independent of one another (views of one lesion, images of one patient:
``images.group_id``) or, when every query is its own unit, a single query: per-query resampling is
the special case of one query per group, not a second method.

* :func:`bootstrap_ci` is the engine. One replicate draws ``n`` unit indices uniformly with
  replacement, :math:`u_1..u_n`, and evaluates a statistic on them; the interval is the
  :math:`(1 \mp \text{level})/2` quantiles (linear interpolation) of the ``n_boot`` replicates that
  are finite. The draws are ``numpy.random.default_rng(seed).integers(0, n, size=(n_boot, n))``,
  row by row, whatever the block size they are drawn in, so every statistic over the same units
  sees the same resamples and a rerun gives the same interval.
* :func:`bootstrap_mean_ci` is the engine applied to the mean over queries with groups as units:
  with group sums :math:`S_g` and sizes :math:`C_g`, a replicate is
  :math:`\sum_i S_{u_i} / \sum_i C_{u_i}`, the mean over the queries of the drawn groups.
* :func:`paired_comparison` compares two metrics on the same queries, :math:`d_q = a_q - b_q`: the
  mean difference, its :func:`bootstrap_mean_ci` interval over groups, and the two-sided Wilcoxon
  signed-rank p-value (:func:`wilcoxon_p`) of the per-group mean differences :math:`\bar d_g`.
* :func:`paired_delta` is the same difference as a micro mean or a macro (class) mean, with its
  interval and a bootstrap p-value from the same resamples (``vlmindex findings``).
* :func:`holm` adjusts a family of p-values for multiple comparisons.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DeltaResult",
    "PairedResult",
    "bootstrap_ci",
    "bootstrap_mean_ci",
    "bootstrap_replicates",
    "class_mean",
    "group_codes",
    "holm",
    "paired_comparison",
    "paired_delta",
    "resample_blocks",
    "wilcoxon_p",
]

# Resample cells (units x replicates) drawn per block: bounds the index matrix to ~32 MB.
_BOOT_CELLS = 4_000_000
_ZERO = 1e-12


# --------------------------------------------------------------------------------------------------
# Percentile bootstrap


def resample_blocks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The ``n_boot`` resamples of ``n`` units, as ``[b, n]`` blocks of unit indices, in draw order.

    Bounded memory: a block holds at most ``_BOOT_CELLS`` indices (and at least one replicate).
    ``Generator.integers`` draws element by element from one stream, so the concatenated blocks
    equal a single ``(n_boot, n)`` draw for any block size.
    """
    rng = np.random.default_rng(seed)
    per_block = max(1, min(n_boot, _BOOT_CELLS // n))
    done = 0
    while done < n_boot:
        b = min(per_block, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def bootstrap_ci(stat: Callable[[np.ndarray], np.ndarray], n: int, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of a statistic over ``n`` units resampled with replacement.

    ``stat`` maps a ``[b, n]`` block of resampled unit indices to the ``b`` statistics (for
    per-query resampling the units are the queries themselves). The draws depend only on
    ``(n, n_boot, seed)``; see the module docstring. Resamples where the statistic is undefined
    (not finite) are dropped. ``(None, None)`` when ``n_boot < 1``, there are no units, or no
    resample is finite.
    """
    if n_boot < 1 or n < 1:
        return None, None
    v = bootstrap_replicates(stat, n, n_boot=n_boot, seed=seed)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None, None
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(v, [tail, 1.0 - tail])
    return float(lo), float(hi)


def bootstrap_replicates(stat: Callable[[np.ndarray], np.ndarray], n: int, *, n_boot: int = 1000,
                         seed: int = 0) -> np.ndarray:
    """The ``n_boot`` statistics :func:`bootstrap_ci` takes its quantiles of, in draw order
    (NaN or inf where the statistic is undefined on a resample)."""
    if n_boot < 1 or n < 1:
        return np.empty(0)
    return np.concatenate([np.asarray(stat(idx), dtype=np.float64) for idx in resample_blocks(n, n_boot, seed)])


def group_codes(n: int, groups: Sequence[Any] | np.ndarray | None) -> np.ndarray:
    """Unit code (0..G-1) of each of ``n`` queries: its group, compared as ``str``; None: its own."""
    if groups is None:
        return np.arange(n)
    g = np.asarray([str(x) for x in groups], dtype=object)
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} entries for {n} values")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def bootstrap_mean_ci(values: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None, *,
                      n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    r"""Percentile bootstrap interval of the mean of ``values``, resampling whole groups.

    With group sums :math:`S_g` and sizes :math:`C_g`, one replicate draws :math:`G` groups with
    replacement, :math:`g_1..g_G`, and takes :math:`\sum_i S_{g_i} / \sum_i C_{g_i}`, the mean over
    the queries of the drawn groups; :func:`bootstrap_ci` does the drawing and takes the
    ``(1 ± confidence) / 2`` quantiles of the ``n_boot`` replicates. ``groups=None`` makes every
    value its own group. Returns ``(nan, nan)`` for no values, non-finite values (the mean is
    undefined) or ``n_boot < 1``, and the value twice for one group.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0 or not np.isfinite(v).all():
        return math.nan, math.nan
    codes = group_codes(len(v), groups)
    if codes.max() == 0:
        return float(v.mean()), float(v.mean())
    lo, hi = bootstrap_ci(_group_mean_stat(v, codes), int(codes.max()) + 1, n_boot=n_boot, seed=seed,
                          level=confidence)
    if lo is None or hi is None:
        return math.nan, math.nan
    return lo, hi


# --------------------------------------------------------------------------------------------------
# Paired test and multiple comparisons


@dataclass(frozen=True)
class PairedResult:
    """A paired difference ``a - b`` over the same queries."""

    n_queries: int
    n_units: int  # independent groups the interval and the test are computed over
    mean_a: float
    mean_b: float
    mean_diff: float  # = mean_a - mean_b, mean over queries
    ci_low: float
    ci_high: float
    p_value: float  # two-sided Wilcoxon signed-rank on per-group mean differences


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``diffs`` (zeros dropped, as Wilcoxon did).

    All-zero differences give 1.0 (no evidence of any difference); SciPy picks the exact
    distribution for small samples without ties and the normal approximation otherwise.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    if np.count_nonzero(d) == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sample size too small for normal approximation"
        return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_comparison(a: np.ndarray, b: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None,
                      *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> PairedResult:
    r"""Compare two metrics measured on the same queries: ``d_q = a_q - b_q``.

    mean_diff = (1/n) Σ_q d_q; its interval is :func:`bootstrap_mean_ci` over groups; the p-value
    is :func:`wilcoxon_p` of the per-group means :math:`\bar d_g` (queries of one group are not
    independent, so they count once). Pairs where either value is NaN are dropped first.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"a and b differ in shape: {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    g = None if groups is None else np.asarray([str(x) for x in groups], dtype=object)[ok]
    a, b = a[ok], b[ok]
    d = a - b
    if d.size == 0:
        return PairedResult(0, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    codes = group_codes(len(d), g)
    unit_means = np.bincount(codes, weights=d) / np.bincount(codes)
    lo, hi = bootstrap_mean_ci(d, g, n_boot=n_boot, seed=seed, confidence=confidence)
    return PairedResult(n_queries=int(d.size), n_units=int(len(unit_means)), mean_a=float(a.mean()),
                        mean_b=float(b.mean()), mean_diff=float(d.mean()), ci_low=lo, ci_high=hi,
                        p_value=wilcoxon_p(unit_means))


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    r"""Holm–Bonferroni adjusted p-values (NaN stays NaN and is not counted in the family).

    Sorted ascending, :math:`p_{(1)} \le … \le p_{(m)}`:
    :math:`\tilde p_{(i)} = \min(1, \max_{j \le i} (m - j + 1)\, p_{(j)})`. Rejecting where
    :math:`\tilde p < α` controls the family-wise error rate at α.

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def stratified_sample(labels: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    r"""Sorted indices of ``n`` of the ``M = len(labels)`` items, drawn per class, without replacement.

    Class :math:`c` with :math:`M_c` items gets :math:`\lfloor n M_c / M \rfloor` draws, and the
    :math:`n - \sum_c \lfloor n M_c / M \rfloor` left over go one each to the classes with the largest
    remainders :math:`n M_c / M - \lfloor n M_c / M \rfloor` (ties: class name order), so every class
    keeps its share to within one item. Within a class the items are drawn uniformly by a generator
    of its own, ``numpy.random.default_rng([seed, crc32(class name)])``: the same labels, ``n`` and
    seed give the same sample, and a class's draw does not move when another class gains or loses
    an item (unless that changes its allocation). Requires ``0 < n < M``.
    """
    lab = np.asarray(labels).astype(str)
    m = len(lab)
    if not 0 < n < m:
        raise ValueError(f"a sample of {n} from {m} items needs 0 < n < {m}")
    classes, inverse = np.unique(lab, return_inverse=True)
    sizes = np.bincount(inverse)
    exact = n * sizes / m
    take = np.floor(exact).astype(int)
    left = n - int(take.sum())
    if left:
        order = sorted(range(len(classes)), key=lambda c: (-(exact[c] - take[c]), classes[c]))
        for c in order[:left]:
            take[c] += 1
    picked = [np.random.default_rng([seed, zlib.crc32(str(classes[c]).encode())]).choice(
                  np.flatnonzero(inverse == c), size=int(take[c]), replace=False)
              for c in range(len(classes)) if take[c]]
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)


def bootstrap_class_mean_ci(values: np.ndarray, classes: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None,
                            *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
                            ) -> tuple[float, float]:
    r"""Percentile bootstrap interval of the macro mean (the mean over classes of the class means),
    resampling whole groups as :func:`bootstrap_mean_ci` does.

    With :math:`S_{gc}` and :math:`C_{gc}` the sum and count of class :math:`c` in group :math:`g`, a
    replicate drawing groups :math:`g_1..g_G` takes the mean over the classes present in it of
    :math:`\sum_i S_{g_i c} / \sum_i C_{g_i c}`. ``(nan, nan)`` as for :func:`bootstrap_mean_ci`.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0 or not np.isfinite(v).all() or n_boot < 1:
        return math.nan, math.nan
    codes = group_codes(len(v), groups)
    lo, hi = bootstrap_ci(_class_mean_stat(v, codes, _class_codes(classes)), int(codes.max()) + 1,
                          n_boot=n_boot, seed=seed, level=confidence)
    if lo is None or hi is None:
        return math.nan, math.nan
    return lo, hi


def class_mean(values: np.ndarray, classes: Sequence[Any] | np.ndarray) -> float:
    """The mean over the classes present of the class means of ``values`` (a macro figure)."""
    v = np.asarray(values, dtype=float)
    c = np.asarray(classes)
    return float(np.mean([v[c == k].mean() for k in np.unique(c)]))


def _class_codes(classes: Sequence[Any] | np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(classes).astype(str), return_inverse=True)[1].reshape(-1)


def _group_mean_stat(v: np.ndarray, codes: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Resampled groups -> mean over their queries: sum of the drawn groups' sums over their sizes."""
    sums = np.bincount(codes, weights=v)
    counts = np.bincount(codes).astype(float)
    return lambda idx: sums[idx].sum(axis=1) / counts[idx].sum(axis=1)


def _class_mean_stat(v: np.ndarray, codes: np.ndarray, cls: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Resampled groups -> mean over the classes present of the class means over their queries."""
    n_groups, n_classes = int(codes.max()) + 1, int(cls.max()) + 1
    sums = np.zeros((n_groups, n_classes))
    counts = np.zeros((n_groups, n_classes))
    np.add.at(sums, (codes, cls), v)
    np.add.at(counts, (codes, cls), 1.0)

    def stat(idx: np.ndarray) -> np.ndarray:
        # how often each group was drawn, then one product: memory b x G, never b x G x C
        draws = np.zeros((len(idx), n_groups))
        for r in range(len(idx)):
            draws[r] = np.bincount(idx[r], minlength=n_groups)
        s, c = draws @ sums, draws @ counts
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(c > 0, s / np.where(c > 0, c, 1), np.nan)
        present = (c > 0).sum(axis=1)
        return np.where(present > 0, np.nansum(means, axis=1) / np.maximum(present, 1), np.nan)

    return stat


@dataclass(frozen=True)
class DeltaResult:
    """A difference over the same queries, with its group-bootstrap interval and p-value."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, of delta = 0; NaN with fewer than two groups
    n_queries: int
    n_units: int


def paired_delta(d: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None,
                 classes: Sequence[Any] | np.ndarray | None = None, *, n_boot: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> DeltaResult:
    r"""A paired difference :math:`d_q = a_q - b_q` over the same queries, resampling whole groups.

    Without ``classes`` the difference is the mean :math:`\bar d = \frac{1}{n}\sum_q d_q` (a micro
    metric such as mAP); with them it is the mean over classes of the class means of :math:`d_q`
    (a macro metric such as kNN balanced accuracy, where that mean equals the difference of the
    two macro values on the same queries). Replicates are :func:`bootstrap_replicates` of the
    groups, the statistic recomputed on the drawn groups' queries; the interval is their
    ``(1 ± confidence) / 2`` quantiles and the two-sided p-value
    :math:`\min(1, 2\,\min(\#\{d^*_b \le 0\}, \#\{d^*_b \ge 0\}) / B)` over the :math:`B` finite
    replicates (below 1e-12 in size counted as 0: rounding), so that the interval at confidence
    :math:`1 - α` excludes 0 exactly when p < α (up to the quantiles' interpolation); p = 0 means no
    replicate reached 0, i.e. p < 1/B. Non-finite
    :math:`d_q` are dropped first; with one group there
    is nothing to resample and the p-value is NaN.
    """
    d = np.asarray(d, dtype=float)
    ok = np.isfinite(d)
    g = None if groups is None else np.asarray([str(x) for x in groups], dtype=object)[ok]
    d = d[ok]
    if d.size == 0:
        return DeltaResult(math.nan, math.nan, math.nan, math.nan, 0, 0)
    codes = group_codes(len(d), g)
    if classes is None:
        delta = float(d.mean())
        stat = _group_mean_stat(d, codes)
    else:
        cls = _class_codes(np.asarray(classes, dtype=object)[ok])
        delta = class_mean(d, cls)
        stat = _class_mean_stat(d, codes, cls)
    n_units = int(codes.max()) + 1
    if n_units < 2 or n_boot < 1:
        return DeltaResult(delta, math.nan, math.nan, math.nan, int(d.size), n_units)
    reps = bootstrap_replicates(stat, n_units, n_boot=n_boot, seed=seed)
    reps = reps[np.isfinite(reps)]
    reps = np.where(np.abs(reps) < _ZERO, 0.0, reps)  # a tie of the two sides is 0, whatever the summing order
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(reps, [tail, 1.0 - tail])
    below, above = int((reps <= 0).sum()), int((reps >= 0).sum())
    p = min(1.0, 2.0 * min(below, above) / len(reps))
    return DeltaResult(delta, float(lo), float(hi), p, int(d.size), n_units)
