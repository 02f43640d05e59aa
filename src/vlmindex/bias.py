r"""Overlay bias figures: how far burned-in text moves a model's features, against the clean images.

For one (model, dataset, overlay condition) the clean and the overlaid embeddings of the same images
are compared, query by query (conditions: :mod:`vlmindex.overlay`). Every figure is a mean over
queries with a seeded percentile bootstrap 95% confidence interval, queries resampled with
replacement (:func:`vlmindex.metrics.statistics.bootstrap_ci`, every query its own unit).

Figures (``figure`` column of table ``overlay_effects``; ``baseline`` says what to read it against):

* **Attack figures** (:func:`attack_figures`), the typographic-attack protocol: overlaid queries
  ranked against the *clean* gallery, read against clean queries on the same gallery:
  ``attack_map``, ``attack_knn_acc``, ``attack_p_at_1``, ``attack_delta_map``,
  ``attack_delta_knn_acc``, and for text that writes a class name ``attack_success_rate`` (the
  kNN vote follows the written class) with ``attack_success_chance``.
* ``delta_<metric>`` and ``delta_<metric>_macro`` (*within-condition* deltas) for purity@k, mAP
  (``map``), MAP@R, R-precision, P@1 and kNN accuracy (``knn_acc``): overlaid queries against the
  *overlaid* gallery, paired per image, :math:`\Delta_q = m_q^{overlay} - m_q^{clean}`. They mix
  "the model reads text" with "the text carries the class" (with ``label`` text every neighbour
  of the right class also carries the query's word): read them with that in mind. Both runs
  are scored by :func:`vlmindex.metrics.retrieval_metrics` with the same k and group rule
  (definitions: :mod:`vlmindex.metrics.retrieval`; stems: :mod:`vlmindex.metrics.registry`);
  micro = mean over queries, macro = mean over classes of the class means. Baseline: the clean
  value. Queries with R = 0 are left out, as in ``analyze``.
* ``shift_cosine_mean`` / ``shift_cosine_std``: mean and standard deviation over images of
  :math:`\cos(e_i^{clean}, e_i^{overlay})`; 1 = the overlay changed nothing. Baseline of the mean:
  the mean cosine between a clean image and its nearest clean neighbour, the scale of "near".
* ``text_clustering``: share of a query's top-k neighbours (overlaid gallery) carrying the same
  overlaid string as the query. Baseline: the same share among its *clean* neighbours, which
  separates a model reading the text from strings that merely follow the class (``label`` text).
* ``text_clustering_chance``: the share expected for neighbours drawn at random from the query's
  candidates (gallery minus itself, and its group with ``exclude_group``), averaged over queries.
* ``text_clustering_lift``: ``text_clustering / text_clustering_chance`` (ratio of the means); the
  baseline is the clean share over the same chance. Undefined when no two images share a string.
* ``flip_rate`` (text sources that write a class name: ``label``, ``wrong-label``,
  ``random-label``): each overlaid query votes (kNN, same k and tie rule) over the *clean*
  gallery without its own clean image (and group); flip = the clean query's vote was not the
  written class and the overlaid query's vote is. Baseline: share of queries whose clean vote
  already is the written class.
* ``written_vote_rate``: share of overlaid queries whose vote over the clean gallery is the written
  class (flips plus those already voting for it); baseline as for ``flip_rate``.
* ``vote_change_rate`` (any text source): share of queries whose vote over the clean gallery changes
  at all under the overlay (disruption, in any direction).
* ``flip_rate_chance``: the flip rate expected if every changed vote fell on a random other class
  of the query's modality, :math:`\frac{1}{n}\sum_q [v^{clean}_q \ne w_q][v^{over}_q \ne v^{clean}_q]
  / (C_q - 1)`. A flip rate well above it is the text being read; with two classes per modality
  the two coincide, since any change of vote is toward the written class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
import pyarrow as pa

from vlmindex import metrics
from vlmindex.analyze import RunData, load
from vlmindex.catalog import CLEAN, RunKey, Workspace, fingerprints, results
from vlmindex.catalog.datasets import class_pools, require_dataset
from vlmindex.errors import VlmindexError
from vlmindex.metrics import registry
from vlmindex.metrics.statistics import bootstrap_ci, class_mean
from vlmindex.overlay import CLASS_NAME_SOURCES, OverlayRecipe, get_condition, overlay_text_for

# (figure stem, RetrievalResult attribute)
DELTA_METRICS = registry.delta_metrics()


# --------------------------------------------------------------------------------------------------
# Statistics of one resample block (rows of query indices) for vlmindex.metrics.statistics.bootstrap_ci


def _mean_stat(v: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda idx: v[idx].mean(axis=1)


def _ratio_stat(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def stat(idx: np.ndarray) -> np.ndarray:
        den = b[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, a[idx].mean(axis=1) / np.where(den > 0, den, 1.0), np.nan)

    return stat


def _std_stat(v: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda idx: v[idx].std(axis=1, ddof=1) if idx.shape[1] > 1 else np.full(len(idx), np.nan)


def _macro_stat(v: np.ndarray, codes: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    n_classes = int(codes.max()) + 1

    def stat(idx: np.ndarray) -> np.ndarray:
        b = len(idx)
        cell = (np.arange(b)[:, None] * n_classes + codes[idx]).ravel()
        sums = np.bincount(cell, weights=v[idx].ravel(), minlength=b * n_classes).reshape(b, n_classes)
        counts = np.bincount(cell, minlength=b * n_classes).reshape(b, n_classes)
        present = counts > 0
        means = np.where(present, sums / np.maximum(counts, 1), 0.0)
        return means.sum(axis=1) / present.sum(axis=1)

    return stat


# --------------------------------------------------------------------------------------------------
# Figures


def _pair(clean: RunData, over: RunData) -> tuple[RunData, RunData, int]:
    """Both runs restricted to the images embedded in both, in the same (image_id) order."""
    common = np.intersect1d(clean.ids, over.ids)
    if len(common) == 0:
        raise VlmindexError("the clean and overlaid runs share no embedded image; embed both first")

    def take(run: RunData) -> RunData:
        pos = np.searchsorted(run.ids, common)
        return RunData(ids=run.ids[pos], vectors=run.vectors[pos], labels=run.labels[pos],
                       groups=run.groups[pos], splits=run.splits[pos], modalities=run.modalities[pos],
                       missing=run.missing)

    unpaired = len(clean.ids) + len(over.ids) - 2 * len(common)
    return take(clean), take(over), unpaired


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _group_keys(run: RunData, exclude_group: bool) -> np.ndarray:
    """Exclusion key per image: its group with ``exclude_group`` (itself when it has none), else itself.

    Used with ``exclude_group=True`` in :func:`metrics.retrieval_metrics` over a stacked
    [clean; overlaid] matrix, so that an overlaid query never meets its own clean image.
    """
    own = np.array([f"\x00image:{i}" for i in run.ids], dtype=object)
    if not exclude_group:
        return own
    return np.array([own[j] if g is None or (isinstance(g, float) and np.isnan(g)) else f"group:{g}"
                     for j, g in enumerate(run.groups)], dtype=object)


def _neighbour_share(neighbors: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per query: share of its (valid) neighbours whose code equals the query's own code."""
    valid = neighbors >= 0
    same = (codes[np.maximum(neighbors, 0)] == codes[:, None]) & valid
    return same.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)


def _chance_share(codes: np.ndarray, keys: np.ndarray, exclude_group: bool,
                  n_candidates: np.ndarray) -> np.ndarray:
    """Per query: share of its candidate neighbours (after exclusions) carrying the query's string."""
    total = np.bincount(codes)[codes] - 1  # the query itself is never a candidate
    if exclude_group:
        _, key_codes = np.unique(keys.astype(str), return_inverse=True)
        pair = key_codes.astype(np.int64) * (int(codes.max()) + 1) + codes
        _, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
        total = total - (counts[inverse] - 1)  # same string inside the query's own group
    return total / np.maximum(n_candidates, 1)


def _row(figure: str, value: float | None, ci: tuple[float | None, float | None], n: int,
         baseline: float | None = None, note: str | None = None) -> dict[str, Any]:
    def clean_float(x: float | None) -> float | None:
        return None if x is None or not np.isfinite(x) else float(x)

    return {"figure": figure, "value": clean_float(value), "ci_low": clean_float(ci[0]),
            "ci_high": clean_float(ci[1]), "n": int(n), "baseline": clean_float(baseline), "note": note}


def overlay_figures(clean: RunData, over: RunData, recipe: OverlayRecipe, pools: dict[str | None, list[str]],
                    **options: Any) -> list[dict[str, Any]]:
    """All bias figures of two paired runs (same images, same order); see the module docstring.

    Pure computation on arrays: :func:`compute_overlay_effect` loads, pairs and stores around it.
    ``options``: those of :func:`overlay_analysis`.
    """
    return overlay_analysis(clean, over, recipe, pools, **options)[0]


def overlay_analysis(
    clean: RunData,
    over: RunData,
    recipe: OverlayRecipe,
    pools: dict[str | None, list[str]],
    *,
    k: int = 10,
    exclude_group: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """:func:`overlay_figures` and the per-query values its attack figures average (:func:`attack_queries`)."""
    n = len(clean.ids)
    if n != len(over.ids) or not np.array_equal(clean.ids, over.ids):
        raise VlmindexError("clean and overlaid runs must hold the same images in the same order")
    boot = {"n_boot": n_boot, "seed": seed}
    common = dict(ids=clean.ids, groups=clean.groups, k=k, exclude_group=exclude_group)
    res_c = metrics.retrieval_metrics(clean.vectors, clean.labels, **common)
    res_o = metrics.retrieval_metrics(over.vectors, over.labels, **common)
    rows: list[dict[str, Any]] = []

    # Paired metric deltas over the scored queries (R > 0: the same set in both runs).
    scored = ~res_c.skipped
    codes = res_c.query_label_code[scored]
    for stem, attr in DELTA_METRICS:
        vc = np.asarray(getattr(res_c, attr), dtype=np.float64)[scored]
        vo = np.asarray(getattr(res_o, attr), dtype=np.float64)[scored]
        d = vo - vc
        m = len(d)
        if m == 0:
            note = "every query's class has no other image in the gallery"
            rows.append(_row(f"delta_{stem}", None, (None, None), 0, note=note))
            rows.append(_row(f"delta_{stem}_macro", None, (None, None), 0, note=note))
            continue
        rows.append(_row(f"delta_{stem}", d.mean(), bootstrap_ci(_mean_stat(d), m, **boot), m,
                         baseline=vc.mean()))
        rows.append(_row(f"delta_{stem}_macro", class_mean(d, codes),
                         bootstrap_ci(_macro_stat(d, codes), m, **boot), m, baseline=class_mean(vc, codes)))

    # Embedding shift: cosine between each image's clean and overlaid embedding.
    # Clipped: rounding can put the cosine of identical vectors a hair above 1.
    cos = np.clip(np.einsum("ij,ij->i", _unit(clean.vectors), _unit(over.vectors)), -1.0, 1.0)
    near = float(np.nanmean(res_c.neighbor_score[:, 0].astype(np.float64)))
    rows.append(_row("shift_cosine_mean", cos.mean(), bootstrap_ci(_mean_stat(cos), n, **boot), n,
                     baseline=near))
    rows.append(_row("shift_cosine_std", cos.std(ddof=1) if n > 1 else None,
                     bootstrap_ci(_std_stat(cos), n, **boot), n))

    # Text clustering: do neighbours carry the query's overlaid string?
    strings = [overlay_text_for(recipe, image_id=int(i), label=lab, class_names=pools.get(mod, []))
               for i, lab, mod in zip(clean.ids, clean.labels, clean.modalities, strict=True)]
    uniq, scode = np.unique(np.array(strings, dtype=object).astype(str), return_inverse=True)
    keys = _group_keys(clean, exclude_group)
    share_o = _neighbour_share(res_o.neighbor_index, scode)
    share_c = _neighbour_share(res_c.neighbor_index, scode)
    chance = _chance_share(scode, keys, exclude_group, res_o.n_candidates)
    rows.append(_row("text_clustering", share_o.mean(), bootstrap_ci(_mean_stat(share_o), n, **boot), n,
                     baseline=share_c.mean()))
    rows.append(_row("text_clustering_chance", chance.mean(), bootstrap_ci(_mean_stat(chance), n, **boot),
                     n))
    if len(uniq) == 1:
        rows.append(_row("text_clustering_lift", None, (None, None), n,
                         note="every image carries the same string, so sharing it says nothing"))
    elif chance.mean() == 0:
        rows.append(_row("text_clustering_lift", None, (None, None), n,
                         note="no two candidate images share a string (chance = 0)"))
    else:
        rows.append(_row("text_clustering_lift", share_o.mean() / chance.mean(),
                         bootstrap_ci(_ratio_stat(share_o, chance), n, **boot), n,
                         baseline=share_c.mean() / chance.mean()))

    # Votes of the overlaid queries over the clean gallery (own clean image and group excluded).
    both = np.vstack([np.asarray(clean.vectors, dtype=np.float32),
                      np.asarray(over.vectors, dtype=np.float32)])
    side = np.r_[np.zeros(n, dtype=bool), np.ones(n, dtype=bool)]
    res_x = metrics.retrieval_metrics(
        both, np.concatenate([clean.labels, clean.labels]), ids=np.concatenate([clean.ids, clean.ids]),
        groups=np.concatenate([keys, keys]), k=k, exclude_group=True, query_mask=side, gallery_mask=~side,
    )
    vote_clean = np.array([None if p is None else str(p) for p in res_c.knn_pred], dtype=object)
    vote_over = np.array([None if p is None else str(p) for p in res_x.knn_pred], dtype=object)
    changed = (vote_over != vote_clean).astype(np.float64)
    rows.append(_row("vote_change_rate", changed.mean(), bootstrap_ci(_mean_stat(changed), n, **boot), n))
    written = np.array(strings, dtype=object)
    attack = attack_queries(res_c, res_x, clean.labels, written, clean.modalities, pools)
    rows += attack_figures(attack, boot=boot)

    # Typographic flip: only a class name can be voted for.
    if recipe.text not in CLASS_NAME_SOURCES:
        note = f"text source {recipe.text!r} does not write a class name"
        for name in ("flip_rate", "written_vote_rate", "flip_rate_chance"):
            rows.append(_row(name, None, (None, None), n, note=note))
        return rows, attack
    already = (vote_clean == written).astype(np.float64)
    voted = (vote_over == written).astype(np.float64)
    flip = voted * (1.0 - already)
    rows.append(_row("flip_rate", flip.mean(), bootstrap_ci(_mean_stat(flip), n, **boot), n,
                     baseline=already.mean()))
    rows.append(_row("written_vote_rate", voted.mean(), bootstrap_ci(_mean_stat(voted), n, **boot), n,
                     baseline=already.mean()))
    n_other = np.array([len(pools.get(m, [])) - 1 for m in clean.modalities], dtype=np.float64)
    expect = np.where(n_other > 0, changed * (1.0 - already) / np.maximum(n_other, 1.0), 0.0)
    rows.append(_row("flip_rate_chance", expect.mean(), bootstrap_ci(_mean_stat(expect), n, **boot), n))
    return rows, attack


# Attack figures: (stem, RetrievalResult attribute) of the metrics read for overlaid queries
# against the clean gallery, and the stems whose paired delta is reported.
ATTACK_METRICS = tuple((stem, attr) for stem, attr in DELTA_METRICS if stem in ("map", "knn_acc", "p_at_1"))
ATTACK_DELTAS = ("map", "knn_acc")


def attack_queries(res_clean: metrics.RetrievalResult, res_attack: metrics.RetrievalResult, labels: np.ndarray,
                   written: np.ndarray, modalities: np.ndarray, pools: dict[str | None, list[str]]
                   ) -> dict[str, np.ndarray]:
    """Per scored query (R > 0, the same set in both results): what :func:`attack_figures` averages.

    ``<m>_clean``/``<m>_attack`` for m in :data:`ATTACK_METRICS` (``map``: the query's AP, ``knn_acc``:
    its kNN vote right or not, ``p_at_1``) of the clean and the overlaid query against the clean
    gallery (table ``attack_queries`` stores them as ``ap_*`` and ``knn_correct_*``);
    ``attack_success`` (object: True, False or None) is whether the attacked kNN vote is the
    written class, None where the text writes no class of the query's modality other than its
    true one (see :func:`attack_figures`); ``success_clean`` whether the clean vote already was;
    ``names_a_class`` whether the text is a class name of the query's modality; ``n_classes`` the
    number of classes of that modality.
    """
    scored = ~res_clean.skipped
    truth = np.array([str(x) for x in labels], dtype=object)
    written = np.asarray(written, dtype=object)
    names_a_class = np.array([str(w) in {str(c) for c in pools.get(mod, [])}
                              for w, mod in zip(written, modalities, strict=True)], dtype=bool)
    vote_a = np.array([None if p is None else str(p) for p in res_attack.knn_pred], dtype=object)
    vote_c = np.array([None if p is None else str(p) for p in res_clean.knn_pred], dtype=object)
    eligible = names_a_class & (written != truth)
    success = np.array([bool(v == w) if e else None for v, w, e in zip(vote_a, written, eligible, strict=True)],
                       dtype=object)
    n_classes = np.array([len(pools.get(mod, [])) for mod in modalities], dtype=np.float64)
    out = {"image_id": np.asarray(res_clean.query_id, dtype=np.int64), "label": truth,
           "modality": np.asarray(modalities, dtype=object), "written": written.astype(str).astype(object),
           "success_clean": vote_c == written, "names_a_class": names_a_class,
           "attack_success": success, "n_classes": n_classes}
    for stem, attr in ATTACK_METRICS:
        out[f"{stem}_clean"] = np.asarray(getattr(res_clean, attr), dtype=np.float64)
        out[f"{stem}_attack"] = np.asarray(getattr(res_attack, attr), dtype=np.float64)
    return {name: v[scored] for name, v in out.items()}


def attack_figures(queries: dict[str, np.ndarray], *, boot: dict[str, int]) -> list[dict[str, Any]]:
    r"""Typographic-attack figures: overlaid queries against the **clean** gallery.

    ``queries`` (:func:`attack_queries`) holds, per scored query, the overlaid query ranked over the
    clean images without its own clean image (and its group), and the clean query ranked over the
    same gallery with the same exclusions, so the two differ only in the query's pixels:

    * ``attack_<m>`` for m in map, knn_acc, p_at_1: mean of m over the attacked queries; baseline:
      the clean → clean mean;
    * ``attack_delta_<m>`` for map and knn_acc: mean of the paired :math:`m_q^{attack} - m_q^{clean}`;
    * ``attack_success_rate``: among queries on which the text writes a class name of their
      modality other than their true class (every query under ``wrong-label``; those written
      another class under ``random-label``; under ``fixed:melanoma``, the queries of a modality
      with a melanoma class that are not melanomas), the share whose kNN vote is the written class;
      baseline: the share whose *clean* vote already was (the rate with no attack);
      ``attack_success_chance``: the share a vote drawn uniformly over the modality's classes
      would give, :math:`\frac{1}{n}\sum_q 1/C_q`.

    A query whose written class is its true class counts in no success figure: following the text
    cannot be told from recognising the lesion there (``random-label`` writes the truth for about
    one query in C).
    """
    m = len(queries["image_id"])
    rows: list[dict[str, Any]] = []
    success_names = ("attack_success_rate", "attack_success_chance")
    if m == 0:
        note = "every query's class has no other image in the gallery"
        names = [f"attack_{s}" for s, _ in ATTACK_METRICS] + [f"attack_delta_{s}" for s in ATTACK_DELTAS]
        return [_row(name, None, (None, None), 0, note=note) for name in (*names, *success_names)]
    for stem, _ in ATTACK_METRICS:
        va, vc = queries[f"{stem}_attack"], queries[f"{stem}_clean"]
        rows.append(_row(f"attack_{stem}", va.mean(), bootstrap_ci(_mean_stat(va), m, **boot), m, baseline=vc.mean()))
        if stem in ATTACK_DELTAS:
            d = va - vc
            rows.append(_row(f"attack_delta_{stem}", d.mean(), bootstrap_ci(_mean_stat(d), m, **boot), m,
                             baseline=vc.mean()))
    eligible = np.array([v is not None for v in queries["attack_success"]], dtype=bool)
    e = int(eligible.sum())
    if e == 0:
        note = ("the text writes no class name of the queries' modality" if not queries["names_a_class"].any()
                else "the written class is the true class on every query")
        return rows + [_row(name, None, (None, None), 0, note=note) for name in success_names]
    success = queries["attack_success"][eligible].astype(np.float64)
    already = queries["success_clean"][eligible].astype(np.float64)
    chance = 1.0 / np.maximum(queries["n_classes"][eligible], 1.0)
    rows.append(_row("attack_success_rate", success.mean(), bootstrap_ci(_mean_stat(success), e, **boot), e,
                     baseline=already.mean()))
    rows.append(_row("attack_success_chance", chance.mean(), bootstrap_ci(_mean_stat(chance), e, **boot), e))
    return rows


def _attack_table(q: dict[str, np.ndarray], key: RunKey, k: int, exclude_group: bool, now: datetime,
                  fp: str) -> pa.Table:
    n = len(q["image_id"])
    return pa.table({
        "model": [key.model] * n, "dataset": [key.dataset] * n, "condition": [key.condition] * n,
        "k": pa.array([k] * n, pa.int32()), "exclude_group": [exclude_group] * n,
        "image_id": pa.array(q["image_id"], pa.int64()),
        "label": pa.array(q["label"].tolist(), pa.string()),
        "modality": pa.array([None if m is None else str(m) for m in q["modality"]], pa.string()),
        "written": pa.array(q["written"].tolist(), pa.string()),
        "ap_clean": q["map_clean"], "ap_attack": q["map_attack"],
        "knn_correct_clean": q["knn_acc_clean"] > 0.5, "knn_correct_attack": q["knn_acc_attack"] > 0.5,
        "attack_success": pa.array(q["attack_success"].tolist(), pa.bool_()),
        "created_at": pa.array([now] * n, pa.timestamp("us")), "inputs_fingerprint": [fp] * n,
    })


# Enters every overlay effect's fingerprint: figures stored by an earlier set of figures (before
# the attack figures) are not current and are recomputed.
FIGURES_VERSION = "figures-3: attack figures against the clean gallery, with their per-query rows"


STAGE = "overlay_effect"


@dataclass(frozen=True)
class EffectOptions:
    """The options that change the overlay figures: they enter the stored rows and their fingerprint."""

    k: int = 10
    exclude_group: bool = False
    n_boot: int = 1000
    seed: int = 0


def _options(k: int, exclude_group: bool, n_boot: int, seed: int) -> dict[str, Any]:
    return {**asdict(EffectOptions(k, bool(exclude_group), n_boot, seed)), "figures": FIGURES_VERSION}


def is_current(ws: Workspace, model: str, dataset: str, condition: str, *, k: int = 10, exclude_group: bool = False,
               n_boot: int = 1000, seed: int = 0) -> bool:
    """Whether the stored figures of these options were computed from both runs as they are now."""
    key = RunKey(model, dataset, condition)
    with ws.read(views=False) as con:
        stored = results.stored_fingerprints(con, "overlay_effects", {
            "model": model, "dataset": dataset, "condition": condition, "k": k,
            "exclude_group": bool(exclude_group), "n_boot": n_boot, "seed": seed})
    return len(stored) == 1 and fingerprints.is_current(ws, next(iter(stored)), STAGE, [key.clean, key],
                                                        _options(k, exclude_group, n_boot, seed))


def compute_overlay_effect(
    ws: Workspace,
    model: str,
    dataset: str,
    condition: str,
    *,
    k: int = 10,
    exclude_group: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    save: bool = True,
    allow_partial: bool = False,
) -> list[dict[str, Any]]:
    """Bias figures of ``condition`` against ``clean`` for one model; stored in ``overlay_effects``.

    Needs both runs embedded (the error names the missing ``vlmindex embed`` command), every
    labelled image in both unless ``allow_partial`` (as ``analyze``); images are paired by
    ``image_id``, and with ``allow_partial`` those embedded under only one condition are left out
    and counted in the note of every row. A rerun with the same (k, exclude_group) replaces the rows.
    """
    if condition == CLEAN:
        raise VlmindexError("compare an overlay condition against clean: give -c NAME of an overlay "
                            "condition (see `vlmindex overlay list`)")
    if not isinstance(k, int) or k < 1:
        raise VlmindexError(f"-k must be at least 1, got {k}")
    if n_boot < 0:
        raise VlmindexError(f"--n-boot must be 0 (no intervals) or more, got {n_boot}")
    key = RunKey(model, dataset, condition)
    with ws.read(views=False) as con:
        require_dataset(con, dataset)
        recipe = get_condition(con, dataset, condition)
        pools = class_pools(con, dataset)
    recipe = cast(OverlayRecipe, recipe)  # not None: condition is not clean
    clean_run, over_run = load(ws, key.clean), load(ws, key)
    missing = {k.condition: r.missing for k, r in ((key.clean, clean_run), (key, over_run)) if r.missing}
    if missing and not allow_partial:
        which = " and ".join(f"{n} no {c} one" for c, n in missing.items())
        raise VlmindexError(
            f"of {clean_run.n_selected} labelled images of {dataset}, {which} for {model}; embed them "
            f"(`vlmindex embed -m {model} -d {dataset} -c {next(iter(missing))}`) or pass --allow-partial")
    clean, over, unpaired = _pair(clean_run, over_run)
    rows, attack = overlay_analysis(clean, over, recipe, pools, k=k, exclude_group=exclude_group, n_boot=n_boot,
                                    seed=seed)
    now = datetime.now()
    options = _options(k, exclude_group, n_boot, seed)
    fp = fingerprints.combine(STAGE, {key.clean: clean_run.fingerprint, key: over_run.fingerprint}, options)
    extra = (f"{unpaired} image(s) embedded under only one of clean/{condition} left out; finish with "
             f"`vlmindex embed -m {model} -d {dataset} -c {condition}`") if unpaired else None
    if missing:
        partial = "partial: " + ", ".join(f"{n} labelled images without a {c} embedding" for c, n in missing.items())
        extra = "; ".join(x for x in (partial, extra) if x)
    out = []
    for r in rows:
        note = "; ".join(x for x in (r["note"], extra) if x) or None
        out.append({"model": model, "dataset": dataset, "condition": condition, "k": k,
                    "exclude_group": bool(exclude_group), **r, "note": note, "n_boot": n_boot, "seed": seed,
                    "created_at": now, "inputs_fingerprint": fp})
    if save:
        with fingerprints.committing(ws, fp, STAGE, [key.clean, key], options,
                                     what=f"the overlay effect of {key}") as con:
            results.store_overlay_effects(con, key, k=k, exclude_group=bool(exclude_group), rows=out,
                                          attack=_attack_table(attack, key, k, bool(exclude_group), now, fp))
    return out
