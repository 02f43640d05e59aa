"""The linear probe: C chosen on a validation split or group CV, checked against scikit-learn loops."""

from __future__ import annotations

import json
import statistics
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vlmindex.metrics import probe
from vlmindex.metrics.probe import C_GRID, linear_probe

GRID = {"logisticregression__C": list(C_GRID)}


def _pipeline(seed: int = 0):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))


def _blobs(seed: int, n_groups: int = 60, views: int = 3, d: int = 6, classes: int = 3, sep: float = 1.0):
    """Gaussian classes; each group (lesion) has its own centre and a few jittered views."""
    rng = np.random.default_rng(seed)
    y_g = np.arange(n_groups) % classes
    centres = rng.standard_normal((classes, d)) * sep
    g_centre = centres[y_g] + rng.standard_normal((n_groups, d))
    x = np.repeat(g_centre, views, axis=0) + 0.3 * rng.standard_normal((n_groups * views, d))
    return x, np.repeat(y_g, views), np.repeat(np.arange(n_groups), views)


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def _inner_k(y, g, cv=5):
    return max(2, min(cv, min(len(set(g[y == c])) for c in np.unique(y))))


def _grid_search(x, y, g, rows, seed):
    """GridSearchCV over the grid with StratifiedGroupKFold inside ``rows``, refit on them."""
    k = _inner_k(y[rows], g[rows])
    search = GridSearchCV(_pipeline(seed), GRID, scoring="balanced_accuracy",
                          cv=StratifiedGroupKFold(k, shuffle=True, random_state=seed))
    ctx = _quiet()
    try:
        search.fit(x[rows], y[rows], groups=g[rows])
    finally:
        ctx.__exit__(None, None, None)
    return search


def _independent_group_cv(x, y, g, train, test, seed):
    """Group CV within train, refit on train, score test."""
    search = _grid_search(x, y, g, train, seed)
    score = balanced_accuracy_score(y[test], search.predict(x[test]))
    return search.best_params_["logisticregression__C"], search.cv_results_["mean_test_score"], score


def test_group_cv_within_train_chooses_the_c_grid_search_chooses():
    x, y, g = _blobs(0)
    splits = np.where(g % 5 == 0, "test", "train")
    train, test = splits == "train", splits == "test"
    for seed in (0, 1, 2):
        res = linear_probe(x, y, splits=splits, groups=g, seeds=(seed,), normalize=False)
        best_c, mean_scores, score = _independent_group_cv(x, y, g, train, test, seed)
        run = res.runs[0]
        assert res.scheme == "group CV within train" and run.chosen_c == (best_c,)
        np.testing.assert_allclose(run.scores[0], mean_scores, rtol=0, atol=1e-12)
        assert res.balanced_accuracy == score
        assert run.inner_folds == (_inner_k(y[train], g[train]),)
    assert res.n_train == train.sum() and res.n_test == test.sum()
    assert "by 5-fold group CV within train" in res.protocol and "scored on test" in res.protocol


def test_validation_split_chooses_on_val_and_scores_the_validated_fit_on_test():
    x, y, g = _blobs(1, n_groups=90)
    splits = np.array(["train", "train", "train", "val", "test"], dtype=object)[g % 5]
    train, val, test = (splits == s for s in ("train", "val", "test"))
    val_scores, fits = [], []
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x[train], y[train])
        fits.append(model)
        val_scores.append(balanced_accuracy_score(y[val], model.predict(x[val])))
    best = int(np.argmax(val_scores))  # first best: the smallest C among equals
    res = linear_probe(x, y, splits=splits, groups=g, normalize=False)
    assert res.scheme == "validation split"
    assert res.runs[0].chosen_c == (C_GRID[best],)
    assert list(res.runs[0].scores[0]) == val_scores
    assert res.balanced_accuracy == balanced_accuracy_score(y[test], fits[best].predict(x[test]))
    assert (res.n_train, res.n_val, res.n_test) == (train.sum(), val.sum(), test.sum())
    # no random step: every seed gives the same number, sd 0
    three = linear_probe(x, y, splits=splits, groups=g, seeds=range(3), normalize=False)
    assert three.per_seed == (res.balanced_accuracy,) * 3 and three.sd == 0.0


def test_nested_group_cv_equals_an_independent_nested_loop():
    x, y, g = _blobs(2, n_groups=45)
    seed = 4
    res = linear_probe(x, y, groups=g, seeds=(seed,), normalize=False)
    assert res.scheme == "nested group CV" and res.outer_folds == 5
    pred = np.empty_like(y)
    chosen = []
    for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(x, y, g):
        search = _grid_search(x, y, g, tr, seed)
        chosen.append(search.best_params_["logisticregression__C"])
        pred[te] = search.predict(x[te])
    assert res.runs[0].chosen_c == tuple(chosen)
    assert res.balanced_accuracy == balanced_accuracy_score(y, pred)


def _strong_regularisation_best(seed: int, n_groups: int = 80, d: int = 80, delta: float = 0.2):
    """Two classes shifted by ±delta in every one of d isotropic features, d close to the rows of an
    inner fit (96): the class-mean difference (what a strongly regularised fit estimates) is the
    Bayes direction, and a weakly regularised fit spends its few rows estimating a covariance."""
    rng = np.random.default_rng(seed)
    y_g = np.arange(n_groups) % 2
    centre = rng.standard_normal((n_groups, d)) + delta * (2 * y_g[:, None] - 1)
    x = np.repeat(centre, 2, axis=0) + 0.2 * rng.standard_normal((2 * n_groups, d))
    return x, np.repeat(y_g, 2), np.repeat(np.arange(n_groups), 2)


def _weak_regularisation_best(seed: int, n_groups: int = 40):
    """The class is in f1 - f2 only; both carry a large shared nuisance, so the class-mean
    difference points along f1 (mostly nuisance) and only a weakly regularised fit finds f1 - f2."""
    rng = np.random.default_rng(seed)
    y_g = np.arange(n_groups) % 2
    u = 3 * rng.standard_normal(n_groups)
    base = np.c_[u + 0.5 * (2 * y_g - 1), u, rng.standard_normal((n_groups, 3))]
    x = np.repeat(base, 2, axis=0) + 0.05 * rng.standard_normal((2 * n_groups, 5))
    return x, np.repeat(y_g, 2), np.repeat(np.arange(n_groups), 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_data_puts_the_chosen_c_at_the_right_end_of_the_grid(seed):
    x, y, g = _strong_regularisation_best(seed)
    splits = np.where((g // 2) % 4 == 0, "test", "train")
    strong = linear_probe(x, y, splits=splits, groups=g, normalize=False)
    scores = strong.runs[0].scores[0]
    assert strong.runs[0].chosen_c == (min(C_GRID),)
    assert scores[0] > scores[-1] + 0.03, scores  # clearly: the weakest penalty validates worse

    x, y, g = _weak_regularisation_best(seed)
    weak = linear_probe(x, y, splits=np.where((g // 2) % 4 == 0, "test", "train"), groups=g, normalize=False)
    scores = weak.runs[0].scores[0]
    assert weak.runs[0].chosen_c[0] >= 10
    assert scores[0] < max(scores) - 0.2, scores


def test_same_seed_same_choice_and_score():
    x, y, g = _blobs(3)
    for kwargs in ({"splits": np.where(g % 4 == 0, "test", "train")}, {}):
        a = linear_probe(x, y, groups=g, seeds=(7,), **kwargs)
        b = linear_probe(x, y, groups=g, seeds=(7,), **kwargs)
        assert a.runs == b.runs and a.balanced_accuracy == b.balanced_accuracy
        assert a.protocol == b.protocol and a.provenance() == b.provenance()


def test_probe_seeds_mean_and_sd_equal_an_independent_loop():
    x, y, g = _blobs(5)
    splits = np.where(g % 5 == 0, "test", "train")
    res = linear_probe(x, y, splits=splits, groups=g, seeds=range(3), normalize=False)
    loop = [_independent_group_cv(x, y, g, splits == "train", splits == "test", s)[2] for s in range(3)]
    assert res.seeds == (0, 1, 2) and list(res.per_seed) == loop
    assert res.balanced_accuracy == pytest.approx(np.mean(loop), abs=1e-15)
    assert res.sd == pytest.approx(statistics.stdev(loop), abs=1e-15)
    assert res.sd == pytest.approx(np.std(loop, ddof=1), abs=1e-12)
    one = linear_probe(x, y, splits=splits, groups=g, seeds=(0,), normalize=False)
    assert one.sd is None and one.balanced_accuracy == loop[0]
    prov = res.provenance()
    assert prov["seeds"] == [0, 1, 2] and prov["grid"] == list(C_GRID) and len(prov["chosen_c"]) == 3
    assert prov["balanced_accuracy_per_seed"] == loop and prov["scheme"] == "group CV within train"
    assert "mean ± sd over 3 seeds" in res.protocol


def test_groups_never_straddle_an_inner_or_outer_split(monkeypatch):
    x, y, g = _blobs(6, n_groups=50, views=4)
    labels = np.array([f"lesion-{i}" for i in g], dtype=object)
    calls = []
    real = probe.group_folds

    def recording(codes, units, n_splits, seed):
        folds = real(codes, units, n_splits, seed)
        calls.append((units, folds))
        return folds

    monkeypatch.setattr(probe, "group_folds", recording)
    splits = np.where(g % 5 == 0, "test", "train")
    linear_probe(x, y, splits=splits, groups=labels, seeds=(0, 1))
    assert len(calls) == 2  # one inner CV per seed, over the training rows only
    assert all(len(units) == (splits == "train").sum() for units, _ in calls)
    linear_probe(x, y, groups=labels, seeds=(0,))  # nested: 1 outer + 5 inner
    assert len(calls) == 2 + 6
    for units, folds in calls:
        seen = np.zeros(len(units), dtype=int)
        for tr, va in folds:
            assert not set(units[tr]) & set(units[va]), "a lesion on both sides of a split"
            seen[va] += 1
        assert (seen == 1).all()
    # Rows without a group are each their own group: nothing to keep together, nothing lost.
    res = linear_probe(x, y, splits=splits, groups=[None] * len(y))
    assert np.isfinite(res.balanced_accuracy)


def test_row_space_fit_is_the_same_optimum():
    """With fewer rows than features the probe fits in the training rows' span: same optimum."""
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((30, 80)), np.arange(30) % 3
    x[:, :5] += y[:, None]
    feats = probe._Features(x)
    assert feats.basis is not None and feats.train.shape == (30, 29)  # centring costs one rank
    tight = {"C": 0.5, "tol": 1e-12, "max_iter": 100000}
    small = LogisticRegression(**tight).fit(feats.train, y)
    full = LogisticRegression(**tight).fit(StandardScaler().fit_transform(x), y)
    np.testing.assert_allclose(small.coef_ @ feats.basis.T, full.coef_, atol=1e-6)
    np.testing.assert_allclose(small.intercept_, full.intercept_, atol=1e-6)
    new = rng.standard_normal((20, 80))
    np.testing.assert_allclose(small.decision_function(feats.transform(new)),
                               full.decision_function(StandardScaler().fit(x).transform(new)), atol=1e-5)


def test_undefined_probes_say_why():
    x, y, g = _blobs(9)
    with pytest.warns(RuntimeWarning, match="held-out split is empty"):
        res = linear_probe(x, y, train_mask=np.ones(len(y), bool))
    assert np.isnan(res.balanced_accuracy) and "held-out split is empty" in res.protocol
    assert json.loads(json.dumps(res.provenance(), allow_nan=False))["balanced_accuracy"] is None
    with pytest.warns(RuntimeWarning, match="single image"):
        res = linear_probe(x, y, groups=np.where(y == 0, "one-lesion", g.astype(str)).astype(object))
    assert res.provenance()["note"].startswith("a class has a single")
    with pytest.warns(RuntimeWarning, match="fewer than two classes"):
        linear_probe(x, y, splits=np.where(y == 0, "train", "test"))
    assert probe.split_masks(np.array(["train", "val", None], dtype=object))[3] == "val"
    assert probe.split_masks(np.array(["test", "val"], dtype=object))[0] is None


def test_splits_that_share_groups_are_not_trusted():
    """A dataset split by image (views of one lesion in train and in test) graded the probe on what
    it was fitted on: with labels that carry nothing but group identity it scored far above chance."""
    from vlmindex.metrics.probe import SCHEMES, linear_probe

    rng = np.random.default_rng(0)
    n_groups, views = 30, 4
    groups = np.repeat([f"g{i}" for i in range(n_groups)], views)
    labels = np.repeat(rng.integers(0, 3, n_groups), views)            # one class per lesion
    centres = rng.normal(size=(n_groups, 16))
    x = np.repeat(centres, views, axis=0) + 0.05 * rng.normal(size=(n_groups * views, 16))
    per_image = np.array(["train", "train", "train", "test"] * n_groups, dtype=object)  # every lesion straddles
    with pytest.warns(RuntimeWarning, match="on both sides"):
        leaky = linear_probe(x, labels, splits=per_image, groups=groups)
    honest = linear_probe(x, labels, groups=groups)
    assert leaky.scheme == SCHEMES[2] and "on both sides" in leaky.protocol
    assert leaky.balanced_accuracy == honest.balanced_accuracy  # the nested CV it falls back to
    assert leaky.balanced_accuracy < 0.6  # no signal beyond the lesion: near chance (1/3)
