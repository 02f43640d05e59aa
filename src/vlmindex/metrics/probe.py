r"""The linear probe: balanced accuracy of a logistic-regression classifier on the embeddings, with its
regularisation strength C chosen on rows it is never scored on.

The classifier is multinomial logistic regression (L2 penalty, lbfgs) on standardised features
(``StandardScaler`` fitted inside every fit), so one grid of C serves every model. C is chosen from
:data:`C_GRID` (10^-3 .. 10^3, 7 values) by the balanced accuracy (mean per-class recall) of a
validation step; among equal best scores the **smallest** C (strongest regularisation) wins, as
scikit-learn's ``GridSearchCV`` ranks (first best in an ascending grid). The scheme depends on the
rows there are:

* **validation split** (train, validation and test rows): for each C fit on train and score the
  validation rows; the best C's fit is scored on test. It is *not* refit on train + val: C weighs
  the penalty against a sum of losses over the training rows, so the C that is best for n_train
  rows is not the best for n_train + n_val, and keeping the validated fit means the model scored
  is the model that was validated.
* **group CV within train** (train and held-out rows, no validation rows): C chosen by stratified
  group k-fold CV inside train (per C, the mean over folds of the validation-fold balanced
  accuracy, as ``GridSearchCV`` averages), then refit on all of train and scored on the held-out rows.
* **nested group CV** (no split): outer stratified group k-fold; inside each outer training part C
  is chosen as above and the part refit; the predictions of every outer test part are pooled and
  balanced accuracy is computed over them (every row predicted once by a probe that never saw it).

Groups (``group_id``: views of one lesion, images of one patient) never straddle a split, inner or
outer: a lesion's other views would otherwise be in training while it is scored. A dataset whose
own train and held-out splits share a group (split by image, not by lesion) is not trusted: the
probe falls back to nested group CV over every row, and ``probe_protocol`` says so. A row without a
group is its own group. Folds: k = min(``cv``, the fewest groups any class has in the rows split),
at least 2. A seed drives every fold shuffle (and the solver's ``random_state``, which lbfgs does
not use); :func:`linear_probe` runs one probe per seed and reports their mean and sample standard
deviation. The validation-split scheme has no random step, so its seeds agree.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmindex.errors import VlmindexError
from vlmindex.metrics.inputs import as_embeddings, as_mask, factorize
from vlmindex.metrics.ranking import l2_normalize

__all__ = [
    "CV_FOLDS",
    "C_GRID",
    "PROTOCOL_VERSION",
    "SCHEMES",
    "ProbeResult",
    "ProbeRun",
    "group_folds",
    "linear_probe",
    "linear_probe_balanced_accuracy",
    "split_masks",
]

#: The regularisation strengths the probe chooses from: 10^-3 .. 10^3, 7 values, ascending.
C_GRID: tuple[float, ...] = tuple(float(10.0**p) for p in range(-3, 4))
CV_FOLDS = 5
MAX_ITER = 1000
SCHEMES = ("validation split", "group CV within train", "nested group CV")
#: Enters the fingerprint of every analysis with a probe: a number stored by an earlier probe
#: (one fixed C) is not current under this one.
PROTOCOL_VERSION = "probe-2: C chosen on validation, group-aware splits"


@dataclass(frozen=True)
class ProbeRun:
    """One seed's probe."""

    seed: int
    balanced_accuracy: float
    chosen_c: tuple[float, ...]                # per outer fit: one for a held-out split, one per outer fold
    scores: tuple[tuple[float, ...], ...]      # per outer fit, the validation score of each grid C
    inner_folds: tuple[int | None, ...]        # per outer fit, the k of the CV that chose C (None: val split)
    not_converged: int = 0                     # fits that stopped at max_iter


@dataclass(frozen=True)
class ProbeResult:
    """The probe over one or more seeds: :attr:`balanced_accuracy` is their mean."""

    scheme: str
    grid: tuple[float, ...]
    seeds: tuple[int, ...]
    runs: tuple[ProbeRun, ...] = ()
    n_train: int | None = None       # rows the probe is fitted on (held-out schemes)
    n_val: int | None = None
    n_test: int | None = None        # rows it is scored on (held-out schemes)
    outer_folds: int | None = None   # nested CV
    held_out: str = "test"           # what the scored rows are called in the protocol line
    note: str | None = None          # why the probe is undefined (NaN)
    fallback: str | None = None      # why the dataset's own splits were not used
    max_iter: int = MAX_ITER
    per_seed: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_seed", tuple(r.balanced_accuracy for r in self.runs))

    @property
    def balanced_accuracy(self) -> float:
        """Mean over seeds (NaN when undefined, or when any seed's is)."""
        if not self.per_seed:
            return float("nan")
        return float(np.mean(self.per_seed))

    @property
    def sd(self) -> float | None:
        """Sample standard deviation (n - 1) over seeds; None with one seed, NaN when undefined."""
        if len(self.seeds) < 2:
            return None
        if not self.per_seed or not all(np.isfinite(self.per_seed)):
            return float("nan")
        return float(statistics.stdev(self.per_seed))

    @property
    def protocol(self) -> str:
        """The scheme in one line (``summaries.probe_protocol``)."""
        g = self.grid
        grid = f"C from {len(g)} values {min(g):g}..{max(g):g}" if len(g) > 1 else f"C = {g[0]:g} (fixed)"
        folds = sorted({k for r in self.runs for k in r.inner_folds if k is not None})
        kfold = f"{folds[0]}-fold" if len(folds) == 1 else ("k-fold" if not folds else f"{folds[0]}-{folds[-1]}-fold")
        if self.scheme == SCHEMES[0]:
            text = (f"logistic regression fit on train ({self.n_train}), {grid} by balanced accuracy on val "
                    f"({self.n_val}), scored on {self.held_out} ({self.n_test})")
        elif self.scheme == SCHEMES[1]:
            text = (f"logistic regression, {grid} by {kfold} group CV within train ({self.n_train}), refit on "
                    f"train, scored on {self.held_out} ({self.n_test})")
        else:
            text = (f"nested group CV: {self.outer_folds}-fold outer, {grid} by {kfold} group CV within each "
                    "outer training part")
        chosen = sorted({c for r in self.runs for c in r.chosen_c})
        if chosen and len(g) > 1:
            text += f"; chosen C = {chosen[0]:g}" if len(chosen) == 1 else \
                f"; chosen C {chosen[0]:g}..{chosen[-1]:g} across fits"
        if len(self.seeds) > 1:
            text += f"; mean ± sd over {len(self.seeds)} seeds ({self.seeds[0]}..{self.seeds[-1]})"
        if self.fallback:
            text += f" ({self.fallback})"
        if self.note:
            text += f"; undefined: {self.note}"
        return text

    def provenance(self) -> dict[str, Any]:
        """Everything that fixes the number: scheme, grid, seeds, chosen C and validation scores
        (JSON-ready: an undefined number is None)."""

        def finite(v: float | None) -> float | None:
            return v if v is not None and np.isfinite(v) else None

        return {
            "scheme": self.scheme, "grid": list(self.grid), "seeds": list(self.seeds),
            "tie_rule": "smallest C among the best validation scores",
            "features": "L2-normalised embeddings, standardised inside each fit",
            "refit": {SCHEMES[0]: "none: the validated fit on train is scored",
                      SCHEMES[1]: "train", SCHEMES[2]: "each outer training part"}[self.scheme],
            "n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test, "outer_folds": self.outer_folds,
            "chosen_c": [list(r.chosen_c) for r in self.runs],
            "inner_folds": [list(r.inner_folds) for r in self.runs],
            "validation_scores": [[list(s) for s in r.scores] for r in self.runs],
            "balanced_accuracy_per_seed": list(self.per_seed),
            "balanced_accuracy": finite(self.balanced_accuracy), "sd": finite(self.sd),
            "not_converged": sum(r.not_converged for r in self.runs), "max_iter": self.max_iter,
            "note": self.note, "fallback": self.fallback,
        }


def _undefined(scheme: str, grid: tuple[float, ...], seeds: tuple[int, ...], reason: str, **kw: Any) -> ProbeResult:
    warnings.warn(f"linear probe is undefined: {reason}; returning NaN", RuntimeWarning, stacklevel=3)
    return ProbeResult(scheme, grid, seeds, note=reason, **kw)


class _Constant:
    """The probe of a training part that holds one class: it predicts that class."""

    def __init__(self, code: int) -> None:
        self.code = code

    def predict(self, z: np.ndarray) -> np.ndarray:
        return np.full(len(z), self.code, dtype=np.int64)


class _Features:
    r"""Training rows standardised (``StandardScaler`` fitted on them) and, when there are fewer rows
    than features, written in an orthonormal basis V of their row space (thin SVD, z ↦ z V).

    Exact, not an approximation: the gradient of the L2-penalised loss is
    :math:`\sum_i r_i z_i + w / C`, so the optimum w lies in the span of the training rows, where
    :math:`z \cdot w = (zV) \cdot (V^\top w)` and :math:`\lVert w \rVert = \lVert V^\top w \rVert`;
    a new row is scored through the same V. A fit then costs O(n²) per solver step instead of
    O(n·d): raw pixels (d = 3072) on a few hundred images went from minutes to seconds. Both forms
    stop at the solver's tolerance, so their predictions agree to that tolerance.
    """

    def __init__(self, x: np.ndarray) -> None:
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        z = self.scaler.transform(x)
        self.basis: np.ndarray | None = None
        if z.shape[1] > z.shape[0]:
            _, sv, vt = np.linalg.svd(z, full_matrices=False)
            rank = int(np.sum(sv > sv[0] * max(z.shape) * np.finfo(np.float64).eps)) if sv[0] > 0 else 0
            self.basis = vt[:max(rank, 1)].T
            z = z @ self.basis
        self.train = z

    def transform(self, x: np.ndarray) -> np.ndarray:
        z = self.scaler.transform(x)
        return z if self.basis is None else z @ self.basis


def _fit(z: np.ndarray, y: np.ndarray, c: float, seed: int, max_iter: int) -> tuple[Any, bool]:
    """(fitted classifier on transformed rows, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(y)
    if len(classes) < 2:
        return _Constant(int(classes[0])), True
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted instead, see ProbeRun.not_converged
        model.fit(z, y)
    return model, bool(np.max(model.n_iter_) < max_iter)


def _fit_grid(x: np.ndarray, y: np.ndarray, grid: Sequence[float], seed: int,
              max_iter: int) -> tuple[_Features, list[Any], int]:
    """One fit per C on the same rows: (their features, the classifiers, fits not converged)."""
    feats = _Features(x)
    fits = [_fit(feats.train, y, c, seed, max_iter) for c in grid]
    return feats, [m for m, _ in fits], sum(not ok for _, ok in fits)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a predicted class absent from these rows
        return float(balanced_accuracy_score(y, pred))


def _fewest_groups(codes: np.ndarray, units: np.ndarray) -> int:
    """The fewest distinct groups any class present in these rows has."""
    return min(len(np.unique(units[codes == c])) for c in np.unique(codes))


def group_folds(codes: np.ndarray, units: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold: ``(training, validation)`` positions into the given rows, shuffled
    with ``seed``; rows of one group are always on the same side."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a class with fewer groups than folds
        return list(splitter.split(np.zeros((len(codes), 1)), codes, units))


def _choose_by_cv(x: np.ndarray, codes: np.ndarray, units: np.ndarray, grid: tuple[float, ...], seed: int,
                  cv: int, max_iter: int) -> tuple[int, tuple[float, ...], int, int]:
    """(index of the chosen C, mean validation-fold score per C, k, fits not converged)."""
    k = max(2, min(cv, _fewest_groups(codes, units)))
    folds = group_folds(codes, units, k, seed)
    scores = np.zeros((len(grid), len(folds)))
    bad = 0
    for j, (tr, va) in enumerate(folds):
        feats, models, nb = _fit_grid(x[tr], codes[tr], grid, seed, max_iter)
        bad += nb
        z = feats.transform(x[va])
        for i, model in enumerate(models):
            scores[i, j] = _balanced_accuracy(codes[va], model.predict(z))
    means = scores.mean(axis=1)
    return int(np.argmax(means)), tuple(float(s) for s in means), k, bad


def _refit_score(x: np.ndarray, codes: np.ndarray, fit_rows: np.ndarray, score_rows: np.ndarray, c: float,
                 seed: int, max_iter: int) -> tuple[np.ndarray, int]:
    """Predictions for ``score_rows`` of a fit on ``fit_rows`` with C = ``c``, and fits not converged."""
    feats, (model,), bad = _fit_grid(x[fit_rows], codes[fit_rows], (c,), seed, max_iter)
    return model.predict(feats.transform(x[score_rows])), bad


def _one_seed(x: np.ndarray, codes: np.ndarray, units: np.ndarray, scheme: str, train: np.ndarray | None,
              val: np.ndarray | None, test: np.ndarray | None, outer: int | None, grid: tuple[float, ...],
              seed: int, cv: int, max_iter: int) -> ProbeRun:
    if scheme == SCHEMES[0]:
        assert train is not None and val is not None and test is not None
        feats, models, bad = _fit_grid(x[train], codes[train], grid, seed, max_iter)
        z_val, z_test = feats.transform(x[val]), feats.transform(x[test])
        scores = tuple(_balanced_accuracy(codes[val], m.predict(z_val)) for m in models)
        best = int(np.argmax(scores))
        score = _balanced_accuracy(codes[test], models[best].predict(z_test))
        return ProbeRun(seed, score, (grid[best],), (scores,), (None,), bad)
    if scheme == SCHEMES[1]:
        assert train is not None and test is not None
        tr = np.flatnonzero(train)
        best, scores, k, bad = _choose_by_cv(x[tr], codes[tr], units[tr], grid, seed, cv, max_iter)
        pred, nb = _refit_score(x, codes, train, test, grid[best], seed, max_iter)
        return ProbeRun(seed, _balanced_accuracy(codes[test], pred), (grid[best],), (scores,), (k,), bad + nb)
    assert outer is not None
    pred = np.empty_like(codes)
    chosen, all_scores, ks, bad = [], [], [], 0
    for tr, te in group_folds(codes, units, outer, seed):
        if len(np.unique(units[tr])) < 2:
            # One group left to train on (groups spanning classes): nothing to validate C on, so the
            # C nearest scikit-learn's default 1 is used and the fit records no scores.
            best, scores, k = int(np.argmin(np.abs(np.log10(grid)))), (), None
        else:
            best, scores, k, nb = _choose_by_cv(x[tr], codes[tr], units[tr], grid, seed, cv, max_iter)
            bad += nb
        pred[te], nb = _refit_score(x, codes, tr, te, grid[best], seed, max_iter)
        bad += nb
        chosen.append(grid[best])
        all_scores.append(scores)
        ks.append(k)
    return ProbeRun(seed, _balanced_accuracy(codes, pred), tuple(chosen), tuple(all_scores), tuple(ks), bad)


def split_masks(splits: Any) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, str]:
    """``(train, val, test, held-out name)`` masks of the probe from per-row split names.

    Rows named ``train``, ``val`` and ``test`` all present: the validation-split scheme (train, val,
    test). ``train`` and one or both of ``val``/``test``: group CV within train, scored on the
    val/test rows. Otherwise (no split, or only one): ``(None, None, None, "")``, nested group CV.
    Rows of any other split are never used by a held-out scheme.
    """
    names = np.asarray(splits, dtype=object)
    train, val, test = (names == "train"), (names == "val"), (names == "test")
    if train.any() and val.any() and test.any():
        return train, val, test, "test"
    if train.any() and (val.any() or test.any()):
        held = "test/val" if val.any() and test.any() else ("val" if val.any() else "test")
        return train, None, val | test, held
    return None, None, None, ""


def linear_probe(
    embeddings: np.ndarray,
    labels: Any,
    *,
    splits: Any = None,
    train_mask: np.ndarray | None = None,
    val_mask: np.ndarray | None = None,
    test_mask: np.ndarray | None = None,
    groups: Any = None,
    seeds: Sequence[int] = (0,),
    grid: Sequence[float] = C_GRID,
    cv: int = CV_FOLDS,
    normalize: bool = True,
    max_iter: int = MAX_ITER,
    held_out: str = "test",
) -> ProbeResult:
    """The probe of the module docstring, once per seed.

    ``splits`` (one split name per row) chooses the scheme through :func:`split_masks`; or give the
    masks: ``train_mask`` and ``val_mask``, the validation-split scheme; ``train_mask`` alone, group
    CV within train; neither, nested group CV. The scored rows are ``test_mask``, by default every row
    not in train (or validation). ``groups``: one group id per row (None: every row its own group).
    A figure undefined for the data (one class; a class with a single group in nested CV; an empty
    held-out set; a training split of one class) gives NaN with a ``RuntimeWarning`` and the reason
    in ``note``. When the smallest class has fewer groups than ``cv`` the outer folds drop to that
    count (warning).
    """
    x = as_embeddings(embeddings)
    n = x.shape[0]
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise VlmindexError(f"labels must have one entry per embedding row ({n}), got shape {arr.shape}")
    _, codes = factorize(arr, "label", allow_missing=False)
    g = np.full(n, None, dtype=object) if groups is None else np.asarray(groups, dtype=object)
    if g.shape != (n,):
        raise VlmindexError(f"groups must have one entry per embedding row ({n}), got shape {g.shape}")
    _, units = factorize(g, "group", allow_missing=True)
    # float64 throughout: lbfgs on float32 features took ten times as many iterations here.
    x = np.asarray(l2_normalize(x) if normalize else x, dtype=np.float64)
    grid_t = tuple(sorted(float(c) for c in grid))
    seeds_t = tuple(int(s) for s in seeds)
    if not grid_t or any(c <= 0 for c in grid_t):
        raise VlmindexError(f"the probe's C grid must hold positive numbers, got {list(grid)}")
    if not seeds_t:
        raise VlmindexError("the probe needs at least one seed")
    train = val = test = None
    outer = None
    fallback = None
    if splits is not None and train_mask is None:
        if np.shape(splits) != (n,):
            raise VlmindexError(f"splits must have one entry per embedding row ({n}), got shape {np.shape(splits)}")
        train_mask, val_mask, test_mask, held = split_masks(splits)
        held_out = held or held_out
        if train_mask is not None:
            # A dataset split by image, not by lesion or patient, puts views of one lesion on both
            # sides: scored there, the probe would be graded on what it was fitted on.
            other = ~train_mask & ((val_mask if val_mask is not None else False) | test_mask)
            shared = np.intersect1d(units[train_mask], units[other])
            if len(shared):
                fallback = (f"the dataset's splits put {len(shared)} group(s) on both sides; nested group CV "
                            "over every row instead")
                train_mask = val_mask = test_mask = None
    if train_mask is not None:
        train = as_mask(train_mask, n, "train_mask")
        val = as_mask(val_mask, n, "val_mask") & ~train if val_mask is not None else None
        scheme = SCHEMES[0] if val is not None else SCHEMES[1]
        rest = ~train if val is None else ~(train | val)
        test = (as_mask(test_mask, n, "test_mask") & rest) if test_mask is not None else rest
        sizes = {"n_train": int(train.sum()), "n_val": None if val is None else int(val.sum()),
                 "n_test": int(test.sum()), "held_out": held_out}
        if not test.any():
            return _undefined(scheme, grid_t, seeds_t, "the held-out split is empty", **sizes)
        if len(np.unique(codes[train])) < 2:
            return _undefined(scheme, grid_t, seeds_t, "the training split has fewer than two classes", **sizes)
        if val is not None and not val.any():
            return _undefined(scheme, grid_t, seeds_t, "the validation split is empty", **sizes)
        if val is None and len(np.unique(units[train])) < 2:
            return _undefined(scheme, grid_t, seeds_t, "the training split is a single group", **sizes)
    else:
        scheme, sizes = SCHEMES[2], {}
        if int(codes.max()) < 1:
            return _undefined(scheme, grid_t, seeds_t, "only one class")
        smallest = _fewest_groups(codes, units)
        if smallest < 2:
            return _undefined(scheme, grid_t, seeds_t,
                              "a class has a single image (or group), so it cannot be cross-validated")
        outer = min(int(cv), smallest)
        if outer < cv:
            warnings.warn(f"linear probe: smallest class has {smallest} groups; using {outer}-fold CV instead "
                          f"of {cv}", RuntimeWarning, stacklevel=2)
        sizes = {"outer_folds": outer}
        if fallback:
            warnings.warn(f"linear probe: {fallback}", RuntimeWarning, stacklevel=2)
            sizes["fallback"] = fallback
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the fits are small, so more threads mostly wait on each other (ten times
    # slower on a busy two-core machine), and one thread sums in one order on every machine.
    with threadpool_limits(limits=1):
        runs = tuple(_one_seed(x, codes, units, scheme, train, val, test, outer, grid_t, s, int(cv), max_iter)
                     for s in seeds_t)
    return ProbeResult(scheme, grid_t, seeds_t, runs, max_iter=max_iter, **sizes)


def linear_probe_balanced_accuracy(
    embeddings: np.ndarray,
    labels: Any,
    *,
    train_mask: np.ndarray | None = None,
    val_mask: np.ndarray | None = None,
    test_mask: np.ndarray | None = None,
    groups: Any = None,
    cv: int = CV_FOLDS,
    seed: int = 0,
    normalize: bool = True,
    grid: Sequence[float] = C_GRID,
    max_iter: int = MAX_ITER,
) -> float:
    """Balanced accuracy of :func:`linear_probe` with one seed (NaN with a warning when undefined)."""
    return linear_probe(embeddings, labels, train_mask=train_mask, val_mask=val_mask, test_mask=test_mask,
                        groups=groups, seeds=(seed,), grid=grid, cv=cv, normalize=normalize,
                        max_iter=max_iter).balanced_accuracy
