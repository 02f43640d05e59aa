"""Retrieval metrics and distribution figures against slow references and independent libraries."""

from __future__ import annotations

import logging
import tracemalloc
import warnings

import numpy as np
import pytest

from vlmindex.errors import VlmindexError
from vlmindex.metrics import (
    RETRIEVAL_METRICS,
    calinski_harabasz,
    davies_bouldin,
    distribution_figures,
    fisher_ratio,
    linear_probe_balanced_accuracy,
    project_2d,
    retrieval_metrics,
    silhouette_cosine,
)

PER_QUERY = ("purity_at_k", "ap", "map_at_r", "r_precision", "p_at_1", "knn_correct")


def make_data(n: int = 300, d: int = 24, sizes: tuple[float, ...] = (0.45, 0.25, 0.15, 0.1, 0.05),
              sep: float = 1.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-structured float32 unit vectors with imbalanced classes (labels 0..C-1, shuffled)."""
    rng = np.random.default_rng(seed)
    counts = np.floor(np.asarray(sizes) * n).astype(int)
    counts[0] += n - counts.sum()
    y = np.repeat(np.arange(len(sizes)), counts)
    rng.shuffle(y)
    means = rng.standard_normal((len(sizes), d)) * sep / np.sqrt(d)
    x = means[y] + rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


# ------------------------------------------------------------------------------------------------
# A slow, loop-by-loop reference written straight from the definitions in vlmindex.metrics.retrieval.


def reference(x, labels, *, ids=None, groups=None, k=10, exclude_group=False, query_mask=None,
              gallery_mask=None):
    n = len(x)
    ids = np.arange(n) if ids is None else np.asarray(ids)
    labels = np.asarray(labels)
    xn = np.asarray(x, dtype=np.float64)
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    qmask = np.ones(n, bool) if query_mask is None else query_mask
    gmask = np.ones(n, bool) if gallery_mask is None else gallery_mask
    classes = sorted(set(labels.tolist()))
    out = {name: [] for name in PER_QUERY}
    out["neighbor_id"] = []
    for q in np.flatnonzero(qmask):
        cands = [g for g in np.flatnonzero(gmask) if g != q]
        if exclude_group and groups[q] is not None:
            cands = [g for g in cands if groups[g] != groups[q]]
        sims = {g: float(xn[q] @ xn[g]) for g in cands}
        order = sorted(cands, key=lambda g: (-sims[g], ids[g]))
        rel = [labels[g] == labels[q] for g in order]
        r = sum(rel)
        top = order[:k]
        out["neighbor_id"].append([ids[g] for g in top] + [-1] * (k - len(top)))
        if r == 0:
            for name in PER_QUERY:
                out[name].append(np.nan)
            continue
        hits, ap, map_r = 0, 0.0, 0.0
        for i, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                ap += hits / i
                if i <= r:
                    map_r += hits / i
        out["ap"].append(ap / r)
        out["map_at_r"].append(map_r / r)
        out["r_precision"].append(sum(rel[:r]) / r)
        out["p_at_1"].append(float(rel[0]))
        out["purity_at_k"].append(sum(rel[:k]) / k)
        votes = {c: [0, 0.0] for c in classes}
        for g in top:
            votes[labels[g]][0] += 1
            votes[labels[g]][1] += sims[g]
        # Most votes, then larger summed similarity, then the smaller label.
        pred = min(classes, key=lambda c: (-votes[c][0], -votes[c][1], classes.index(c)))
        out["knn_correct"].append(float(pred == labels[q]))
    return {name: np.asarray(v, dtype=float) for name, v in out.items() if name != "neighbor_id"} | {
        "neighbor_id": np.asarray(out["neighbor_id"])
    }


def assert_matches_reference(res, ref, atol=1e-9):
    for name in PER_QUERY:
        ours = getattr(res, name)
        if ours is None:  # ap with full_ap=False
            continue
        np.testing.assert_allclose(ours, ref[name], atol=atol, rtol=0, err_msg=name)
    np.testing.assert_array_equal(res.neighbor_id, ref["neighbor_id"])


# ------------------------------------------------------------------------------------------------
# Independent implementations


def test_against_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    acc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    logging.getLogger("PML").setLevel(logging.WARNING)
    x, y = make_data(n=400, d=16, sep=1.0, seed=1)
    res = retrieval_metrics(x, y, k=5)
    summary = res.summary()
    names = {
        "precision_at_1": "p_at_1",
        "r_precision": "r_precision",
        "mean_average_precision_at_r": "map_at_r",
        "mean_average_precision": "ap",  # with k=None pml ranks the whole reference set: full-ranking AP
    }
    for avg_of_avgs, kind in ((False, "micro"), (True, "macro")):
        calc = acc_mod.AccuracyCalculator(include=tuple(names), k=None, avg_of_avgs=avg_of_avgs,
                                          device=torch.device("cpu"))
        pml = calc.get_accuracy(x, y)  # reference = query, ref_includes_query=True
        for pml_name, ours in names.items():
            assert summary[f"{ours}_{kind}"] == pytest.approx(pml[pml_name], abs=1e-6), (pml_name, kind)
    # The comparison must not be vacuous.
    assert 0.2 < summary["map_at_r_micro"] < 0.9


def test_query_gallery_split_against_pml():
    torch = pytest.importorskip("torch")
    acc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = make_data(n=360, d=16, sep=1.0, seed=2)
    test = np.random.default_rng(3).random(len(y)) < 0.3
    res = retrieval_metrics(x, y, k=5, query_mask=test, gallery_mask=~test)
    assert res.n_queries == test.sum() and res.n_gallery == (~test).sum()
    assert (res.n_candidates == (~test).sum()).all()  # no query is in the gallery: nothing to drop
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    calc = acc_mod.AccuracyCalculator(include=include, k=None, device=torch.device("cpu"))
    pml = calc.get_accuracy(x[test], y[test], x[~test], y[~test], ref_includes_query=False)
    s = res.summary()
    assert s["p_at_1_micro"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert s["r_precision_micro"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert s["map_at_r_micro"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert_matches_reference(res, reference(x, y, k=5, query_mask=test, gallery_mask=~test))


def test_per_query_ap_against_sklearn():
    from sklearn.metrics import average_precision_score

    x, y = make_data(n=200, d=12, seed=4)
    res = retrieval_metrics(x, y, k=3)
    xn = x.astype(np.float64)
    for qi, q in enumerate(res.query_index):
        others = np.arange(len(y)) != q
        expected = average_precision_score(y[others] == y[q], xn[others] @ xn[q])
        assert res.ap[qi] == pytest.approx(expected, abs=1e-6)


def test_purity_against_numpy_loop():
    x, y = make_data(n=150, d=8, seed=5)
    k = 7
    res = retrieval_metrics(x, y, k=k)
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    for q in range(len(y)):
        s = sims[q].copy()
        s[q] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        assert res.purity_at_k[q] == pytest.approx(np.mean(y[top] == y[q]))
        np.testing.assert_array_equal(res.neighbor_index[q], top)
        np.testing.assert_allclose(res.neighbor_score[q], s[top], atol=1e-6)


def test_full_reference_with_groups_split_and_shuffled_ids():
    x, y = make_data(n=120, d=6, sep=1.5, seed=6)
    rng = np.random.default_rng(7)
    ids = rng.permutation(10_000)[: len(y)]
    groups = np.array([f"p{i}" for i in rng.integers(0, 40, len(y))], dtype=object)
    groups[::17] = None  # no patient id: shares with nobody
    # Exact duplicates (same image stored twice, different ids) make real ties.
    x[10] = x[11]
    x[20] = x[21] = x[22]
    qmask = rng.random(len(y)) < 0.7
    gmask = rng.random(len(y)) < 0.8
    for exclude in (False, True):
        for full in (True, False):
            res = retrieval_metrics(x, y, ids=ids, groups=groups, k=6, exclude_group=exclude,
                                    query_mask=qmask, gallery_mask=gmask, full_ap=full)
            ref = reference(x, y, ids=ids, groups=groups, k=6, exclude_group=exclude,
                            query_mask=qmask, gallery_mask=gmask)
            assert (res.ap is None) == (not full)
            assert_matches_reference(res, ref)


def tie_heavy_data(n: int = 240, seed: int = 13) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors of 16 entries of +-0.25: every similarity is an exact multiple of 1/16, so
    nearly every relevant item ties with irrelevant ones and only the id rule orders them."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 2, size=(n, 16)) * 0.5 - 0.25).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    ids = rng.permutation(100_000)[:n]
    groups = rng.integers(0, n // 3, size=n)
    return x, y, ids, groups


def test_cross_class_ties_follow_the_id_rule_against_the_loop():
    x, y, ids, groups = tie_heavy_data()
    qmask = np.arange(len(y)) % 3 != 0
    for exclude in (False, True):
        for full in (True, False):
            res = retrieval_metrics(x, y, ids=ids, groups=groups, k=7, exclude_group=exclude, query_mask=qmask,
                                    full_ap=full)
            ref = reference(x, y, ids=ids, groups=groups, k=7, exclude_group=exclude, query_mask=qmask)
            assert_matches_reference(res, ref)


@pytest.mark.parametrize("data", ["random", "ties"])
def test_torch_path_on_the_cpu_equals_the_numpy_path(data):
    # The GPU path (device="cuda") is the same torch code; here it runs on the CPU.
    if data == "ties":
        x, y, ids, groups = tie_heavy_data(seed=21)
    else:
        x, y = make_data(n=260, d=12, seed=22)
        rng = np.random.default_rng(23)
        ids, groups = rng.permutation(50_000)[: len(y)], rng.integers(0, 80, len(y))
        x[30] = x[31]  # a bit-identical pair: an exact tie on both paths
    clusters = np.where(np.arange(len(y)) % 11 == 0, np.arange(len(y)) % 4, None).astype(object)
    qmask = np.arange(len(y)) % 4 != 1
    for kwargs in (dict(), dict(exclude_group=True), dict(exclude_group=True, clusters=clusters)):
        numpy_path = retrieval_metrics(x, y, ids=ids, groups=groups, k=9, query_mask=qmask, **kwargs)
        torch_path = retrieval_metrics(x, y, ids=ids, groups=groups, k=9, query_mask=qmask, device="cpu", **kwargs)
        for name in PER_QUERY:
            np.testing.assert_allclose(getattr(torch_path, name), getattr(numpy_path, name), atol=1e-6, rtol=0,
                                       err_msg=name)
        for name in ("neighbor_id", "knn_pred_code", "n_relevant", "n_candidates"):
            np.testing.assert_array_equal(getattr(torch_path, name), getattr(numpy_path, name), err_msg=name)
        np.testing.assert_allclose(torch_path.neighbor_score, numpy_path.neighbor_score, atol=1e-6)
        if data == "ties" and "clusters" not in kwargs:
            ref = reference(x, y, ids=ids, groups=groups, k=9, query_mask=qmask, **kwargs)
            assert_matches_reference(torch_path, ref)


# ------------------------------------------------------------------------------------------------
# Hand-made cases: ties, groups, kNN votes, skipped queries, macro vs micro


def test_ties_broken_by_smaller_id():
    # Rows 1 and 2 are the same vector: the query row 0 sees them tied at similarity 1.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = ["a", "b", "a", "b"]
    res = retrieval_metrics(x, labels, ids=np.array([10, 7, 3, 20]), k=3)
    # Query id 10: tie between id 7 (b) and id 3 (a) -> id 3 first.
    np.testing.assert_array_equal(res.neighbor_id[0], [3, 7, 20])
    assert res.p_at_1[0] == 1.0
    # Query id 7 (b): ids 3 and 10 (both a) tie, id 20 (b) last: R = 1, AP = 1/3, MAP@R = 0.
    np.testing.assert_array_equal(res.neighbor_id[1], [3, 10, 20])
    assert res.ap[1] == pytest.approx(1 / 3)
    assert res.map_at_r[1] == 0.0 and res.r_precision[1] == 0.0
    # Swapping the ids swaps the order: the rule follows ids, not row positions.
    res2 = retrieval_metrics(x, labels, ids=np.array([10, 3, 7, 20]), k=3)
    np.testing.assert_array_equal(res2.neighbor_id[0], [3, 7, 20])
    assert res2.neighbor_index[0, 0] == 1 and res2.p_at_1[0] == 0.0


def test_duplicate_vectors_tie_exactly_at_any_position():
    # BLAS may round the same dot product differently at different matrix positions; duplicates
    # must still tie so that the id rule decides.
    rng = np.random.default_rng(8)
    base = rng.standard_normal((60, 32)).astype(np.float32)
    x = np.concatenate([base, base[::-1]])
    n = len(x)
    ids = np.arange(n)
    labels = np.arange(n) % 3
    res = retrieval_metrics(x, labels, ids=ids, k=n - 1, query_mask=np.arange(n) < 5, chunk_size=2)
    twin = {i: n - 1 - i for i in range(60)} | {n - 1 - i: i for i in range(60)}
    for qi, q in enumerate(res.query_index):
        order = list(res.neighbor_id[qi])
        scores = res.neighbor_score[qi]
        assert order[0] == twin[q]  # its own duplicate is the nearest
        for i, other in twin.items():
            if q in (i, other):
                continue
            a, b = order.index(i), order.index(other)
            assert scores[a] == scores[b]  # bit-identical similarity
            if i < other:
                assert a < b


def test_group_exclusion():
    # q and its near-duplicate share patient P1; another class-a image (P2) is farther than a b image.
    x = np.array([[1.0, 0.0], [0.99, 0.1], [0.5, 0.8], [0.9, 0.3]])
    labels = ["a", "a", "a", "b"]
    groups = ["P1", "P1", "P2", "P3"]
    on = retrieval_metrics(x, labels, groups=groups, k=1, exclude_group=True)
    off = retrieval_metrics(x, labels, groups=groups, k=1, exclude_group=False)
    assert off.n_relevant[0] == 2 and off.p_at_1[0] == 1.0
    assert on.n_relevant[0] == 1 and on.n_candidates[0] == 2
    assert on.p_at_1[0] == 0.0  # the b image is now first
    assert on.neighbor_index[0, 0] == 3
    assert 1 not in on.neighbor_index[0]
    # Fewer candidates than k: the missing places are padded (-1, NaN) and count as misses.
    short = retrieval_metrics(x, labels, groups=groups, k=3, exclude_group=True)
    np.testing.assert_array_equal(short.neighbor_index[0], [3, 2, -1])
    assert np.isnan(short.neighbor_score[0, 2]) and short.purity_at_k[0] == pytest.approx(1 / 3)
    with pytest.raises(VlmindexError, match="groups"):
        retrieval_metrics(x, labels, exclude_group=True)


def _unit(angle_deg: float) -> list[float]:
    t = np.deg2rad(angle_deg)
    return [float(np.cos(t)), float(np.sin(t))]


def test_knn_vote_tie_rules():
    q = _unit(0)
    # k=4: two a votes (cos 10°, cos 70°) against two b votes (cos 20°, cos 30°): b has the larger sum.
    x = np.array([q, _unit(10), _unit(70), _unit(20), _unit(30)])
    res = retrieval_metrics(x, ["c", "a", "a", "b", "b"], k=4, query_mask=np.arange(5) == 0)
    assert res.knn_pred[0] == "b" and res.n_skipped == 1  # class c has no other image
    # k=3: more votes beat a larger single similarity.
    x = np.array([q, _unit(5), _unit(40), _unit(45)])
    res = retrieval_metrics(x, ["c", "a", "b", "b"], k=3, query_mask=np.arange(4) == 0)
    assert res.knn_pred[0] == "b"
    # Votes and summed similarity exactly equal (duplicated vectors): the smaller label wins.
    x = np.array([q, _unit(10), _unit(10), _unit(30), _unit(30)])
    res = retrieval_metrics(x, ["c", "b", "a", "b", "a"], k=4, query_mask=np.arange(5) == 0)
    assert res.knn_pred[0] == "a"
    res = retrieval_metrics(x, ["c", "b", "z", "b", "z"], k=4, query_mask=np.arange(5) == 0)
    assert res.knn_pred[0] == "b"


def test_zero_relevant_queries_are_skipped_and_counted():
    x, y = make_data(n=80, d=8, seed=9)
    y[5] = 99  # a class of one: R = 0
    res = retrieval_metrics(x, y, k=3)
    assert res.n_skipped == 1 and res.n_relevant[5] == 0
    for name in PER_QUERY:
        assert np.isnan(getattr(res, name)[5])
    assert not np.isnan(res.map_at_r[np.arange(80) != 5]).any()
    s = res.summary()
    assert s["n_skipped"] == 1 and s["n_scored"] == 79
    kept = np.arange(80) != 5
    assert s["map_at_r_micro"] == pytest.approx(np.mean(res.map_at_r[kept]))
    # A query whose class is missing from the gallery is skipped too.
    gallery = y != y[0]
    res = retrieval_metrics(x, y, k=3, query_mask=np.arange(80) == 0, gallery_mask=gallery)
    assert res.n_skipped == 1 and np.isnan(res.summary()["p_at_1_micro"])


def test_macro_versus_micro_on_imbalanced_classes():
    # a: 0°, 1°, 2° (each nearest an a); b: 3.5° (nearest a at 2°) and 90° (nearest b at 3.5°).
    x = np.array([_unit(0), _unit(1), _unit(2), _unit(3.5), _unit(90)])
    res = retrieval_metrics(x, ["a", "a", "a", "b", "b"], k=1)
    np.testing.assert_array_equal(res.p_at_1, [1, 1, 1, 0, 1])
    s = res.summary()
    assert s["p_at_1_micro"] == pytest.approx(4 / 5)
    assert s["p_at_1_macro"] == pytest.approx((1 + 0.5) / 2)
    rows = {r["label"]: r for r in res.per_class()}
    assert rows["a"]["p_at_1"] == 1.0 and rows["b"]["p_at_1"] == 0.5 and rows["b"]["n_queries"] == 2


def test_chunk_size_and_threads_do_not_change_results():
    x, y = make_data(n=700, d=10, seed=10)
    groups = np.arange(len(y)) // 3
    runs = [dict(chunk_size=None, n_threads=1), dict(chunk_size=1, n_threads=2),
            dict(chunk_size=300, n_threads=2), dict(chunk_size=10_000, n_threads=1)]
    results = [retrieval_metrics(x, y, groups=groups, exclude_group=True, k=5, **run) for run in runs]
    for other in results[1:]:
        # Bitwise: the products are taken on fixed-shape blocks whatever the chunking.
        for name in (*PER_QUERY, "neighbor_id", "neighbor_score", "knn_pred_code", "n_relevant"):
            np.testing.assert_array_equal(getattr(other, name), getattr(results[0], name), err_msg=name)


def test_partial_sort_equals_full_sort():
    x, y = make_data(n=300, d=10, seed=11)
    full = retrieval_metrics(x, y, k=4, full_ap=True)
    part = retrieval_metrics(x, y, k=4, full_ap=False)
    assert part.ap is None and "ap_micro" not in part.summary()
    for name in ("purity_at_k", "map_at_r", "r_precision", "p_at_1", "knn_correct", "neighbor_id"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name), err_msg=name)


def test_memory_is_bounded_by_chunk():
    x, y = make_data(n=6000, d=16, seed=12)
    tracemalloc.start()
    retrieval_metrics(x, y, k=5, n_threads=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # One 6000 x 6000 matrix of uint64 keys alone would take 288 MB; a 256-query block needs ~60 MB.
    assert peak < 100e6, peak


def test_summary_keys_and_labels_of_any_type():
    x, y = make_data(n=60, d=6, seed=13)
    names = np.array(["mel", "nv", "bcc", "akiec", "df"])[y]
    res = retrieval_metrics(x, names, k=3)
    s = res.summary()
    for metric in RETRIEVAL_METRICS:
        assert f"{metric}_micro" in s and f"{metric}_macro" in s
    assert set(res.knn_pred) <= set(names)
    assert res.query_label.tolist() == names.tolist()


def test_input_errors():
    x, y = make_data(n=20, d=4, seed=14)
    bad = x.copy()
    bad[3] = 0
    with pytest.raises(VlmindexError, match="id 3"):
        retrieval_metrics(bad, y)
    with pytest.raises(VlmindexError, match="twice"):
        retrieval_metrics(x, y, ids=np.zeros(20, dtype=np.int64))
    with pytest.raises(VlmindexError, match="k=20"):
        retrieval_metrics(x, y, k=20)
    with pytest.raises(VlmindexError, match="label"):
        retrieval_metrics(x, [None] + list(y[1:]))
    with pytest.raises(VlmindexError, match="gallery is empty"):
        retrieval_metrics(x, y, gallery_mask=np.zeros(20, bool))
    with pytest.raises(VlmindexError, match="one entry per"):
        retrieval_metrics(x, y[:-1])


# ------------------------------------------------------------------------------------------------
# Distribution figures


def test_distribution_figures_against_sklearn():
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    x, y = make_data(n=250, d=12, seed=15)
    raw = x * np.random.default_rng(16).uniform(0.5, 3.0, size=(len(y), 1))  # norms must not matter
    unit = x.astype(np.float64)
    assert silhouette_cosine(raw, y) == pytest.approx(silhouette_score(unit, y, metric="cosine"), abs=1e-6)
    assert davies_bouldin(raw, y) == pytest.approx(davies_bouldin_score(unit, y), abs=1e-6)
    assert calinski_harabasz(raw, y) == pytest.approx(calinski_harabasz_score(unit, y), rel=1e-6)
    # Fisher ratio from explicit scatter matrices.
    mu = unit.mean(axis=0)
    sb = np.zeros((12, 12))
    sw = np.zeros((12, 12))
    for c in np.unique(y):
        xc = unit[y == c]
        mc = xc.mean(axis=0)
        sb += len(xc) * np.outer(mc - mu, mc - mu)
        sw += (xc - mc).T @ (xc - mc)
    assert fisher_ratio(raw, y) == pytest.approx(np.trace(sb) / np.trace(sw), rel=1e-9)
    # Singletons count as 0 in the silhouette, as in sklearn.
    y2 = y.copy()
    y2[0] = 99
    assert silhouette_cosine(raw, y2) == pytest.approx(silhouette_score(unit, y2, metric="cosine"), abs=1e-6)
    figs = distribution_figures(raw, y, cv=3)
    assert figs["n"] == 250 and figs["n_classes"] == 5
    assert figs["silhouette_cosine"] == pytest.approx(silhouette_cosine(raw, y))


def test_tight_classes_keep_their_spread_instead_of_rounding_noise():
    """Classes of near-copies (1e-7 apart): the within-class spread must come from x - mu itself, not
    from ||x||^2 - 2 x.mu + ||mu||^2, where it cancels to noise (CH and Fisher off by percent);
    exact copies give a spread of (almost) 0: Davies-Bouldin ~0, Calinski-Harabasz astronomically large."""
    base = np.random.default_rng(3).standard_normal((3, 64))
    y = np.repeat([0, 1, 2], [5, 7, 4])
    copies = np.repeat(base, [5, 7, 4], axis=0)
    tight = copies + 1e-7 * np.random.default_rng(31).standard_normal(copies.shape)
    unit = tight / np.linalg.norm(tight, axis=1, keepdims=True)
    sw = sum(np.sum((unit[y == c] - unit[y == c].mean(axis=0)) ** 2) for c in range(3))
    m = unit.mean(axis=0)
    sb = sum((y == c).sum() * np.sum((unit[y == c].mean(axis=0) - m) ** 2) for c in range(3))
    assert fisher_ratio(tight, y) == pytest.approx(sb / sw, rel=1e-6)
    assert calinski_harabasz(tight, y) == pytest.approx(sb / sw * (len(y) - 3) / 2, rel=1e-6)
    spread = [np.mean(np.linalg.norm(unit[y == c] - unit[y == c].mean(axis=0), axis=1)) for c in range(3)]
    cen = np.array([unit[y == c].mean(axis=0) for c in range(3)])
    want = np.mean([max((spread[i] + spread[j]) / np.linalg.norm(cen[i] - cen[j]) for j in range(3) if j != i)
                    for i in range(3)])
    assert davies_bouldin(tight, y) == pytest.approx(want, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert davies_bouldin(copies, y) < 1e-12 and calinski_harabasz(copies, y) > 1e20


def test_degenerate_figures_warn_and_return_nan():
    x, _ = make_data(n=30, d=4, seed=17)
    one = np.zeros(30, dtype=int)
    for fn in (silhouette_cosine, davies_bouldin, calinski_harabasz, fisher_ratio,
               linear_probe_balanced_accuracy):
        with pytest.warns(RuntimeWarning, match="one class"):
            assert np.isnan(fn(x, one))
    singleton = np.arange(30) % 3
    singleton[0] = 7
    with pytest.warns(RuntimeWarning, match="single image"):
        assert np.isnan(linear_probe_balanced_accuracy(x, singleton))


def test_linear_probe():
    x, y = make_data(n=300, d=16, sep=4.0, seed=18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        separable = linear_probe_balanced_accuracy(x, y, cv=3, seed=0)
        assert separable > 0.9
        assert linear_probe_balanced_accuracy(x, y, cv=3, seed=0) == separable  # deterministic
        shuffled = np.random.default_rng(0).permutation(y)
        assert linear_probe_balanced_accuracy(x, shuffled, cv=3, seed=0) < 0.45  # chance is 0.2
        train = np.random.default_rng(1).random(len(y)) < 0.6
        held_out = linear_probe_balanced_accuracy(x, y, train_mask=train)
        assert held_out > 0.85


def test_project_2d():
    x, _ = make_data(n=40, d=8, seed=19)
    rows, coords = project_2d(x, method="pca")
    assert coords.shape == (40, 2) and rows.tolist() == list(range(40))
    rows, coords = project_2d(x, method="tsne", max_samples=30, seed=0, max_iter=250)
    assert coords.shape == (30, 2) and len(set(rows.tolist())) == 30
    with pytest.raises(VlmindexError, match="pca"):
        project_2d(x, method="umap")


# ------------------------------------------------------------------------------------------------
# Statistics: one bootstrap engine behind the per-query and the per-group intervals


def test_per_query_bootstrap_is_the_group_bootstrap_with_singleton_groups():
    from vlmindex.metrics.statistics import bootstrap_ci, bootstrap_mean_ci

    v = np.random.default_rng(4).random(77)
    per_query = bootstrap_ci(lambda idx: v[idx].mean(axis=1), len(v), n_boot=500, seed=9)
    assert bootstrap_mean_ci(v, None, n_boot=500, seed=9) == per_query
    # Groups are units in sorted order; zero-padded names keep that the query order.
    assert bootstrap_mean_ci(v, [f"q{i:03d}" for i in range(len(v))], n_boot=500, seed=9) == per_query


def test_bootstrap_draws_do_not_depend_on_the_block_size(monkeypatch):
    from vlmindex.metrics import statistics

    v = np.random.default_rng(5).random(60)
    groups = np.arange(60) // 4
    whole = statistics.bootstrap_mean_ci(v, groups, n_boot=700, seed=2)
    ragged = statistics.bootstrap_ci(lambda idx: v[idx].mean(axis=1), 60, n_boot=700, seed=2)
    monkeypatch.setattr(statistics, "_BOOT_CELLS", 7 * 60)  # blocks of 7 replicates, a ragged last one
    assert statistics.bootstrap_mean_ci(v, groups, n_boot=700, seed=2) == whole
    assert statistics.bootstrap_ci(lambda idx: v[idx].mean(axis=1), 60, n_boot=700, seed=2) == ragged


def test_old_homes_of_the_statistics_still_export_them():
    from vlmindex import bias, report
    from vlmindex.metrics import statistics

    assert bias.bootstrap_ci is statistics.bootstrap_ci
    for name in ("bootstrap_mean_ci", "holm", "paired_comparison", "wilcoxon_p", "PairedResult"):
        assert getattr(report, name) is getattr(statistics, name)
