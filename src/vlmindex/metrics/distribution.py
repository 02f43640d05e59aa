r"""Distribution figures: how well the classes of an embedding set separate as point clouds.

Pure NumPy (and scikit-learn for the probe), no I/O. Each figure is one number for the whole set,
computed on L2-normalised embeddings by default, the geometry the retrieval metrics use, so models
whose features differ in scale stay comparable. Each function's docstring gives its formula:

* :func:`silhouette_cosine`: mean silhouette with cosine distance, in [-1, 1] (higher is better);
* :func:`davies_bouldin`: mean over classes of the worst spread-to-separation ratio (lower is better);
* :func:`calinski_harabasz`: between- over within-class scatter, scaled by degrees of freedom;
* :func:`fisher_ratio`: :math:`\operatorname{tr}(S_B) / \operatorname{tr}(S_W)`;
* :func:`~vlmindex.metrics.probe.linear_probe_balanced_accuracy`: balanced accuracy of a
  logistic-regression probe whose regularisation is chosen on a validation split
  (:mod:`vlmindex.metrics.probe` states the protocol).

:func:`distribution_figures` computes them all at once; :func:`project_2d` gives 2-D coordinates for
plots. A figure that is undefined for the data (one class, every image its own class, ...) is NaN
with a ``RuntimeWarning`` that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmindex.errors import VlmindexError
from vlmindex.metrics.inputs import as_embeddings, factorize
from vlmindex.metrics.probe import C_GRID, linear_probe, linear_probe_balanced_accuracy
from vlmindex.metrics.ranking import l2_normalize

__all__ = [
    "calinski_harabasz",
    "davies_bouldin",
    "distribution_figures",
    "fisher_ratio",
    "linear_probe_balanced_accuracy",
    "project_2d",
    "silhouette_cosine",
]


def _class_codes(labels: Sequence[Any] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise VlmindexError(f"labels must have one entry per embedding row ({n}), got shape {arr.shape}")
    return factorize(arr, "label", allow_missing=False)


def _degenerate(name: str, reason: str) -> float:
    warnings.warn(f"{name} is undefined: {reason}; returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


# Rows per float64 block of the statistics pass: 8192 x 512 x 8 B = 32 MiB at most, whatever n is.
_STATS_ROWS = 8192


@dataclass(frozen=True)
class ClassStats:
    r"""Everything the four figures need, from two passes over the rows in float64 blocks.

    ``counts[c]`` (n_c), ``sums[c]`` (:math:`\sum_{i \in c} x_i`) and ``dots[i, c]``
    (:math:`x_i \cdot \sum_{j \in c} x_j`), with :math:`x` the (L2-normalised unless told otherwise)
    rows. Every figure is a closed form in these (O(n·C·d) time, O(n·C + C·d) memory): with
    :math:`\mu_c = \text{sums}_c / n_c`, the silhouette's class sums of cosine distances are
    :math:`n_c - \text{dots}_{ic}`, and ``own_sq_dist[i]``
    (:math:`\lVert x_i - \mu_{c(i)} \rVert^2`, from the difference itself in the second pass) gives the
    within-class scatter. No pairwise matrix and no sample: the figures are exact over all rows at any n.
    """

    codes: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    dots: np.ndarray
    own_sq_dist: np.ndarray  # ||x_i - mu_c(i)||^2 from the difference itself (see sq_dist_to_own_centroid)

    @property
    def n(self) -> int:
        return len(self.codes)

    @property
    def n_classes(self) -> int:
        return len(self.counts)

    @property
    def centroids(self) -> np.ndarray:
        return self.sums / self.counts[:, None]

    def sq_dist_to_own_centroid(self) -> np.ndarray:
        # computed as ||x - mu||^2 in the second pass, not by the expansion below: for a tight class
        # the expansion's three terms of size ~1 cancel to rounding noise (percent errors in CH)
        return self.own_sq_dist

    def scatter_traces(self) -> tuple[float, float]:
        """Traces of the between-class and within-class scatter matrices."""
        mean = self.sums.sum(axis=0) / self.n
        between = float(np.sum(self.counts * np.sum((self.centroids - mean) ** 2, axis=1)))
        within = float(np.sum(self.sq_dist_to_own_centroid()))
        return between, within


def class_stats(embeddings: np.ndarray, codes: np.ndarray, *, normalize: bool = True) -> ClassStats:
    """:class:`ClassStats` of ``embeddings`` (rows L2-normalised first unless ``normalize=False``)."""
    x = as_embeddings(embeddings)
    n, d = x.shape
    n_classes = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    sums = np.zeros((n_classes, d))

    def block(start: int) -> np.ndarray:
        xb = np.asarray(x[start:start + _STATS_ROWS], dtype=np.float64)
        if normalize:
            norms = np.linalg.norm(xb, axis=1)
            bad = ~np.isfinite(norms) | (norms == 0)
            if bad.any():
                raise VlmindexError(f"embedding row {start + int(np.flatnonzero(bad)[0])} is all zeros or not "
                                    "finite; filter it out")
            xb /= norms[:, None]
        return xb

    for start in range(0, n, _STATS_ROWS):
        xb = block(start)
        cb = codes[start:start + _STATS_ROWS]
        _add_by_class(sums, cb, xb)
    dots = np.empty((n, n_classes))
    own = np.empty(n)
    centroids = sums / np.maximum(counts, 1)[:, None]
    for start in range(0, n, _STATS_ROWS):
        xb = block(start)
        dots[start:start + len(xb)] = xb @ sums.T
        diff = xb - centroids[codes[start:start + _STATS_ROWS]]
        own[start:start + len(xb)] = np.einsum("ij,ij->i", diff, diff)
    return ClassStats(codes=codes, counts=counts, sums=sums, dots=dots, own_sq_dist=own)


def _add_by_class(sums: np.ndarray, codes: np.ndarray, xb: np.ndarray) -> None:
    order = np.argsort(codes, kind="stable")
    present, starts = np.unique(codes[order], return_index=True)
    sums[present] += np.add.reduceat(xb[order], starts, axis=0)


def _stats(embeddings: np.ndarray, labels: Any, normalize: bool) -> ClassStats:
    x = as_embeddings(embeddings)
    _, codes = _class_codes(labels, x.shape[0])
    return class_stats(x, codes, normalize=normalize)


def silhouette_cosine(embeddings: np.ndarray, labels: Any, *, stats: ClassStats | None = None) -> float:
    r"""Mean silhouette coefficient with cosine distance :math:`d(i,j) = 1 - \hat x_i \cdot \hat x_j`.

    :math:`s_i = (b_i - a_i) / \max(a_i, b_i)` with :math:`a_i` the mean distance to the other
    members of i's class and :math:`b_i` the smallest mean distance to another class;
    :math:`s_i = 0` for a class of one (as scikit-learn). Because cosine distance is linear in the
    unit vectors, :math:`\sum_{j \in c} d(i,j) = n_c - \hat x_i \cdot \sum_{j \in c} \hat x_j`, so the
    exact value over *all* samples costs O(n·C·d) time and O(n·C) extra memory (:class:`ClassStats`):
    no pairwise matrix and no subsampling, whatever n is.
    """
    st = stats if stats is not None else _stats(embeddings, labels, normalize=True)
    n, n_classes = st.n, st.n_classes
    if n_classes < 2:
        return _degenerate("silhouette", "only one class")
    if n_classes >= n:
        return _degenerate("silhouette", "every image is its own class")
    counts = st.counts
    dist_sum = np.maximum(counts[None, :] - st.dots, 0.0)  # [n, C]: Σ_{j∈c} d(i, j), self included
    own = st.codes
    own_n = counts[own]
    a = np.where(own_n > 1, dist_sum[np.arange(n), own] / np.maximum(own_n - 1, 1), 0.0)
    mean_other = dist_sum / counts[None, :]
    mean_other[np.arange(n), own] = np.inf
    b = mean_other.min(axis=1)
    denom = np.maximum(a, b)
    s = np.where((own_n > 1) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def davies_bouldin(embeddings: np.ndarray, labels: Any, *, normalize: bool = True,
                   stats: ClassStats | None = None) -> float:
    r"""Davies–Bouldin index (lower is better), Euclidean, on unit vectors by default.

    :math:`DB = \frac{1}{C}\sum_i \max_{j \ne i} \frac{s_i + s_j}{\lVert \mu_i - \mu_j \rVert}` with
    :math:`s_i` the mean distance of class i's members to its centroid :math:`\mu_i`. Two classes
    with the same centroid give +inf (with a warning) rather than scikit-learn's silent 0.
    """
    st = stats if stats is not None else _stats(embeddings, labels, normalize)
    n_classes = st.n_classes
    if n_classes < 2:
        return _degenerate("Davies-Bouldin", "only one class")
    centroids = st.centroids
    spread = np.bincount(st.codes, weights=np.sqrt(st.sq_dist_to_own_centroid()), minlength=n_classes)
    spread /= st.counts
    from scipy.spatial.distance import cdist

    centre_dist = cdist(centroids, centroids)  # from the differences: two near centroids stay apart
    np.fill_diagonal(centre_dist, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (spread[:, None] + spread[None, :]) / centre_dist
    if (centre_dist == 0).any():
        warnings.warn("Davies-Bouldin: two classes share a centroid; the index is +inf", RuntimeWarning,
                      stacklevel=2)
        ratio = np.where(centre_dist == 0, np.inf, ratio)
    return float(np.mean(np.max(ratio, axis=1)))


def calinski_harabasz(embeddings: np.ndarray, labels: Any, *, normalize: bool = True,
                      stats: ClassStats | None = None) -> float:
    r"""Calinski–Harabasz index (higher is better) on unit vectors by default.

    :math:`CH = \frac{\operatorname{tr}(S_B)/(C-1)}{\operatorname{tr}(S_W)/(n-C)}`, scatter matrices
    as in :func:`fisher_ratio`. Undefined (NaN with a warning) for one class or C = n; +inf with a
    warning when every class is a single point.
    """
    st = stats if stats is not None else _stats(embeddings, labels, normalize)
    n, n_classes = st.n, st.n_classes
    if n_classes < 2:
        return _degenerate("Calinski-Harabasz", "only one class")
    if n_classes >= n:
        return _degenerate("Calinski-Harabasz", "every image is its own class")
    between, within = st.scatter_traces()
    if within == 0:
        warnings.warn("Calinski-Harabasz: no within-class spread; the index is +inf", RuntimeWarning,
                      stacklevel=2)
        return float("inf")
    return float(between * (n - n_classes) / (within * (n_classes - 1)))


def fisher_ratio(embeddings: np.ndarray, labels: Any, *, normalize: bool = True,
                 stats: ClassStats | None = None) -> float:
    r"""Fisher ratio :math:`\operatorname{tr}(S_B) / \operatorname{tr}(S_W)` (higher is better).

    :math:`S_B = \sum_c n_c (\mu_c - \mu)(\mu_c - \mu)^\top`,
    :math:`S_W = \sum_c \sum_{i \in c} (x_i - \mu_c)(x_i - \mu_c)^\top`, on unit vectors by default;
    the traces are sums of squared norms (:class:`ClassStats`), never d×d matrices. Equals
    Calinski–Harabasz × (C − 1)/(n − C).
    """
    st = stats if stats is not None else _stats(embeddings, labels, normalize)
    if st.n_classes < 2:
        return _degenerate("Fisher ratio", "only one class")
    between, within = st.scatter_traces()
    if within == 0:
        warnings.warn("Fisher ratio: no within-class spread; the ratio is +inf", RuntimeWarning, stacklevel=2)
        return float("inf")
    return float(between / within)


def distribution_figures(
    embeddings: np.ndarray,
    labels: Any,
    *,
    splits: Any = None,
    groups: Any = None,
    train_mask: np.ndarray | None = None,
    cv: int = 5,
    seed: int = 0,
    probe: bool = True,
    probe_seeds: int = 1,
    grid: Sequence[float] = C_GRID,
) -> dict[str, Any]:
    """All distribution figures of one embedding set, as a dict (NaN where undefined).

    Keys: ``n``, ``n_classes``, ``silhouette_cosine``, ``davies_bouldin``, ``calinski_harabasz``,
    ``fisher_ratio`` and, unless ``probe=False``, ``linear_probe_balanced_accuracy`` (mean over
    ``probe_seeds`` seeds ``seed .. seed + probe_seeds - 1``), ``linear_probe_balanced_accuracy_sd``
    (their sample standard deviation; None for one seed) and ``linear_probe``, the
    :class:`~vlmindex.metrics.probe.ProbeResult` (scheme, chosen C, provenance). ``splits`` (split
    name per row), ``groups`` and ``train_mask`` go to :func:`~vlmindex.metrics.probe.linear_probe`,
    which picks its validation scheme from them. Everything is computed on
    L2-normalised embeddings, the geometry the retrieval metrics use, so models whose features
    differ in scale stay comparable.
    """
    x = as_embeddings(embeddings)
    _, codes = _class_codes(labels, x.shape[0])
    stats = class_stats(x, codes)  # once, for the four figures
    out: dict[str, Any] = {
        "n": int(len(codes)),
        "n_classes": int(codes.max()) + 1,
        "silhouette_cosine": silhouette_cosine(x, codes, stats=stats),
        "davies_bouldin": davies_bouldin(x, codes, stats=stats),
        "calinski_harabasz": calinski_harabasz(x, codes, stats=stats),
        "fisher_ratio": fisher_ratio(x, codes, stats=stats),
    }
    if probe:
        if not isinstance(probe_seeds, int) or probe_seeds < 1:
            raise VlmindexError(f"--probe-seeds must be at least 1, got {probe_seeds}")
        result = linear_probe(l2_normalize(x), codes, splits=splits, train_mask=train_mask, groups=groups,
                              seeds=range(seed, seed + probe_seeds), grid=grid, cv=cv, normalize=False)
        out["linear_probe_balanced_accuracy"] = result.balanced_accuracy
        out["linear_probe_balanced_accuracy_sd"] = result.sd
        out["linear_probe"] = result
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
    x = l2_normalize(as_embeddings(embeddings))
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
