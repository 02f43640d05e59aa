r"""The study's three findings, tested on this workspace's own analyses (``vlmindex findings``).

The claims (Takeda & Sakai 2026, in our words):

1. Medical VLMs extract features that separate lesion classes: each ``medical`` model against the
   best ``baseline`` model (the offline floor), on ``map_micro`` and ``knn_acc_macro`` (kNN
   balanced accuracy); predicted: medical > floor.
2. General VLMs with a richer text side (``llm-enhanced``) give more refined feature
   distributions than medical ones: the best llm-enhanced model against the best medical model,
   and the two family means, on the same two metrics (predicted: llm-enhanced > medical), with
   ``silhouette`` and ``fisher_ratio`` of both side by side (shown, not tested: one number each).
3. General VLMs are more easily pulled by text overlaid on the image: the family mean of the
   general side (``general`` and ``llm-enhanced`` models, the paper's "general VLMs") against the
   ``medical`` family mean, per overlay condition, on ``attack_delta_map`` (predicted: general <
   medical, a larger drop) and ``attack_success_rate`` (predicted: general > medical).

Every tested comparison is a paired difference over identical queries, :math:`d_q = a_q - b_q`
(a family mean is the mean over the family's models of each query's value), with a
group-bootstrap percentile interval and a two-sided bootstrap p-value from the same resamples
(:func:`vlmindex.metrics.statistics.paired_delta`; groups: ``images.group_id``). Holm's
correction runs over the tested comparisons of one finding in one slice (dataset, modality,
condition, protocol). A comparison is *supported* when its Holm-adjusted p is below ``alpha`` and
its difference has the predicted sign, *contradicted* when significant with the other sign, and
*not decided* otherwise (its interval spans 0, or it does not survive Holm). A finding is
supported when at least one of its comparisons is and none contradicts it, contradicted in the
mirror case, not decided when none is decided or they disagree, and *not testable* (with the
reason) when the slice lacks a family it needs.

Families come from the runs (``embed --family``, ``embeddings import --family``, the study's
``[models] family`` table), else from the model registry. Stale analyses are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from vlmindex import bias
from vlmindex.catalog import CLEAN, Workspace, results
from vlmindex.catalog import conditions as catalog_conditions
from vlmindex.catalog.embeddings import run_families
from vlmindex.catalog.fingerprints import stale_analyses
from vlmindex.comparable import protocol
from vlmindex.errors import VlmindexError
from vlmindex.metrics.statistics import class_mean, holm, paired_delta

CLAIMS = {
    1: "Medical VLMs extract features that separate lesion classes (better than the offline floor)",
    2: "LLM-enhanced general VLMs give more refined feature distributions than medical VLMs",
    3: "General VLMs are more easily pulled by text overlaid on the image than medical VLMs",
}
GENERAL_SIDE = ("general", "llm-enhanced")  # the paper's "general VLMs" of finding 3
TESTED = {"map_micro": "ap", "knn_acc_macro": "knn_correct"}  # summaries column -> per-query column
SHOWN = ("silhouette", "fisher_ratio")  # finding 2's distribution figures, side by side

SUPPORTED, CONTRADICTED, UNDECIDED, UNTESTABLE = "supported", "contradicted", "not decided", "not testable"


@dataclass(frozen=True)
class FindingsOptions:
    """What the findings are computed from and how; the seed fixes every resample."""

    dataset: str | None = None    # None: every analysed dataset
    condition: str | None = None  # (1), (2): analyses of this condition (default clean); (3): this overlay only
    n_boot: int = 2000
    seed: int = 0
    alpha: float = 0.05


@dataclass
class Comparison:
    """One row of a finding: ``a`` against ``b`` on one metric."""

    comparison: str
    a: str
    b: str
    metric: str
    value_a: float | None
    value_b: float | None
    delta: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    expected: str | None = None  # "a > b" or "a < b"; None: shown, not tested
    p_value: float | None = None
    p_holm: float | None = None
    verdict: str | None = None
    n_queries: int | None = None
    n_units: int | None = None


@dataclass
class Finding:
    """One claim tested on one slice of the workspace."""

    finding: int
    dataset: str
    modality: str | None
    condition: str
    scope: str
    verdict: str
    reason: str
    comparisons: list[Comparison] = field(default_factory=list)
    analysis_ids: list[str] = field(default_factory=list)
    effect_fingerprints: list[str] = field(default_factory=list)

    @property
    def claim(self) -> str:
        return CLAIMS[self.finding]


# --------------------------------------------------------------------------------------------------
# Verdicts


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _judge(comparisons: list[Comparison], alpha: float) -> tuple[str, str]:
    """Holm over the tested comparisons (in place), then the finding's verdict and why."""
    tested = [c for c in comparisons if c.expected is not None]
    adjusted = holm([math.nan if c.p_value is None else c.p_value for c in tested])
    for c, p in zip(tested, adjusted, strict=True):
        c.p_holm = _finite(p)
        if c.p_holm is None or c.delta is None or c.p_holm >= alpha or c.delta == 0:
            c.verdict = UNDECIDED
        else:
            predicted = (c.delta > 0) == (c.expected == "a > b")
            c.verdict = SUPPORTED if predicted else CONTRADICTED
    if tested and all(c.ci_low is None for c in tested):
        return UNDECIDED, ("nothing to resample: the compared models share fewer than two groups of scored "
                           "queries")
    n_for = sum(c.verdict == SUPPORTED for c in tested)
    n_against = sum(c.verdict == CONTRADICTED for c in tested)
    words = f"Holm over {len(tested)} comparison(s), alpha {alpha:g}"
    if n_for and not n_against:
        return SUPPORTED, f"{n_for} of {len(tested)} comparisons support it, none contradicts it ({words})"
    if n_against and not n_for:
        return CONTRADICTED, f"{n_against} of {len(tested)} comparisons contradict it, none supports it ({words})"
    if n_for and n_against:
        return UNDECIDED, f"the comparisons disagree: {n_for} support it, {n_against} contradict it ({words})"
    return UNDECIDED, f"no comparison is decided: each interval spans 0 or does not survive Holm ({words})"


def _paired(name: str, a: str, b: str, metric: str, va: np.ndarray, vb: np.ndarray, units: np.ndarray,
            classes: np.ndarray | None, expected: str, opts: FindingsOptions) -> Comparison:
    """``a - b`` over the queries where both are finite; a macro metric when ``classes`` is given."""
    ok = np.isfinite(va) & np.isfinite(vb)
    d = va[ok] - vb[ok]
    r = paired_delta(d, units[ok], None if classes is None else classes[ok], n_boot=opts.n_boot, seed=opts.seed,
                     confidence=1.0 - opts.alpha)
    if classes is None:
        mean_a, mean_b = (float(va[ok].mean()), float(vb[ok].mean())) if ok.any() else (None, None)
    else:
        mean_a, mean_b = ((class_mean(va[ok], classes[ok]), class_mean(vb[ok], classes[ok])) if ok.any()
                          else (None, None))
    return Comparison(name, a, b, metric, mean_a, mean_b, _finite(r.delta), _finite(r.ci_low), _finite(r.ci_high),
                      expected, _finite(r.p_value), None, None, r.n_queries, r.n_units)


# --------------------------------------------------------------------------------------------------
# Reading the workspace


def family_of(model: str, recorded: dict[str, str]) -> str | None:
    """A model's family: what its runs recorded, else the registry's; None when neither says."""
    if model in recorded:
        return recorded[model]
    from vlmindex.models import get_spec

    try:
        return get_spec(model).family
    except VlmindexError:  # an imported model's own name
        return None


@dataclass
class _Queries:
    """One analysis's per-query values, by image id order."""

    image_id: np.ndarray
    values: dict[str, np.ndarray]  # "ap", "knn_correct" (float; NaN: undefined)
    label: np.ndarray
    unit: np.ndarray


def _align(runs: dict[str, _Queries]) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]], np.ndarray, np.ndarray]:
    """The queries every run scored, and each run's values on them in one order."""
    common = None
    for q in runs.values():
        common = q.image_id if common is None else np.intersect1d(common, q.image_id)
    assert common is not None
    first = next(iter(runs.values()))
    pos0 = np.searchsorted(first.image_id, common)
    out = {}
    for name, q in runs.items():
        pos = np.searchsorted(q.image_id, common)
        out[name] = {k: v[pos] for k, v in q.values.items()}
    return common, out, first.label[pos0], first.unit[pos0]


def _floats(v: np.ndarray) -> np.ndarray:
    """Booleans with NULLs (None) as 1.0 / 0.0 / NaN."""
    return np.array([math.nan if x is None else float(x) for x in v], dtype=float)


def _scope(s: dict[str, Any]) -> str:
    # the probe changes no per-query value, so it does not split a slice
    return " ".join(t for t in str(s.get("scope") or "").split() if t != "no-probe")


# --------------------------------------------------------------------------------------------------
# The findings


def compute_findings(ws: Workspace, opts: FindingsOptions | None = None) -> list[Finding]:
    """Every finding on every slice of the workspace (or of ``opts.dataset``); nothing is stored."""
    opts = opts or FindingsOptions()
    if opts.n_boot < 1:
        raise VlmindexError(f"--n-boot must be at least 1, got {opts.n_boot}")
    if not 0 < opts.alpha < 1:
        raise VlmindexError(f"--alpha must be between 0 and 1, got {opts.alpha}")
    with ws.read() as con:
        summaries = results.latest_summaries(con, opts.dataset)
        stale = stale_analyses(con, ws)
        datasets = sorted({s["dataset"] for s in summaries} | set(results.attacked_datasets(con, opts.dataset)))
        if opts.dataset is not None and not datasets:
            raise VlmindexError(f"dataset {opts.dataset!r} has no analysis: run `vlmindex analyze -d {opts.dataset}` "
                                "for its models first")
        if opts.condition not in (None, CLEAN):
            known = sorted({c for ds in datasets for c in catalog_conditions.names(con, ds)} | {CLEAN})
            if opts.condition not in known:
                raise VlmindexError(f"unknown condition {opts.condition!r}; conditions of "
                                    f"{', '.join(datasets) or 'the workspace'}: {', '.join(known)}")
        recorded = {ds: run_families(con, ds) for ds in datasets}
        current = [s for s in summaries if s["analysis_id"] not in stale]
        table = results.per_query(con, [s["analysis_id"] for s in current])
        attack = {ds: results.attack_query_rows(con, ds) for ds in datasets}
        effects = {ds: results.attack_effects(con, ds) for ds in datasets}
    # an overlay effect whose runs changed since is not read (as stale analyses are not)
    fresh = {ds: {e["inputs_fingerprint"] for e in rows if bias.is_current(
                 ws, e["model"], ds, e["condition"], k=e["k"], exclude_group=e["exclude_group"],
                 n_boot=e["n_boot"], seed=e["seed"])} for ds, rows in effects.items()}
    query_cols = _columns(table)
    per_query = {aid: _Queries(c["image_id"].astype(np.int64),
                               {"ap": c["ap"].astype(float), "knn_correct": _floats(c["knn_correct"])},
                               c["label"].astype(str).astype(object), c["unit"].astype(str).astype(object))
                 for aid, c in _split_by(query_cols, query_cols["analysis_id"].astype(str)).items()}
    out: list[Finding] = []
    condition = opts.condition or CLEAN
    for ds in datasets:
        models = {s["model"] for s in summaries if s["dataset"] == ds}
        models |= set(attack[ds].column("model").to_pylist())
        fam = {m: family_of(m, recorded[ds]) for m in models}
        slices: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
        for s in current:
            if s["dataset"] == ds and s["condition"] == condition and s["analysis_id"] in per_query:
                # the same queries and gallery: a partial analysis (--allow-partial) pairs only with its like
                key = (s.get("modality"), protocol(s), s["k"], int(s.get("n_missing") or 0))
                slices.setdefault(key, {}).setdefault(s["model"], s)  # one analysis per model: the first
        if not slices:
            for n in (1, 2):
                out.append(Finding(n, ds, None, condition, "", UNTESTABLE,
                                   f"no current analysis of {ds} under {condition}: run `vlmindex analyze`"))
        for (modality, *_), by_model in slices.items():
            scope = _scope(next(iter(by_model.values())))
            out.append(_finding_1(ds, modality, condition, scope, by_model, fam, per_query, opts))
            out.append(_finding_2(ds, modality, condition, scope, by_model, fam, per_query, opts))
        per_modality = sorted({s["modality"] for s in summaries if s["dataset"] == ds and s.get("modality")})
        for modality in (None, *per_modality):
            out += _finding_3(ds, modality, attack[ds], fresh[ds], fam, opts)
    return out


def _families_present(fam: dict[str, str | None], models: list[str]) -> str:
    have = sorted({fam.get(m) or "none" for m in models})
    return ", ".join(have) if have else "none"


def _untestable(n: int, ds: str, modality: str | None, condition: str, scope: str, why: str,
                by_model: dict[str, dict[str, Any]] | None = None) -> Finding:
    ids = sorted(s["analysis_id"] for s in (by_model or {}).values())
    return Finding(n, ds, modality, condition, scope, UNTESTABLE, why, analysis_ids=ids)


def _need(fam: dict[str, str | None], models: list[str], *wanted: str) -> str | None:
    """Why a finding cannot be tested on these models (None: it can)."""
    missing = [w for w in wanted if not any(fam.get(m) == w for m in models)]
    if not missing:
        return None
    unknown = sorted(m for m in models if fam.get(m) is None)
    hint = (f"; models without a family: {', '.join(unknown)} (give one with embed --family or embeddings "
            "import --family)") if unknown else ""
    return (f"no {' and no '.join(repr(w) for w in missing)} model analysed here (families present: "
            f"{_families_present(fam, models)}){hint}")


def _finding_1(ds, modality, condition, scope, by_model, fam, per_query, opts) -> Finding:
    models = sorted(by_model)
    why = _need(fam, models, "medical", "baseline")
    if why:
        return _untestable(1, ds, modality, condition, scope, why, by_model)
    floor = _best([m for m in models if fam[m] == "baseline"], by_model)
    medical = [m for m in models if fam[m] == "medical"]
    _, vals, classes, units = _align({m: per_query[by_model[m]["analysis_id"]] for m in [*medical, floor]})
    comps = []
    for m in medical:
        for metric, col in TESTED.items():
            comps.append(_paired(f"{m} vs {floor} (floor)", m, floor, metric, vals[m][col], vals[floor][col], units,
                                 classes if metric.endswith("_macro") else None, "a > b", opts))
    verdict, reason = _judge(comps, opts.alpha)
    return Finding(1, ds, modality, condition, scope, verdict, reason, comps,
                   sorted(by_model[m]["analysis_id"] for m in [*medical, floor]))


def _best(models: list[str], by_model: dict[str, dict[str, Any]]) -> str:
    """The model of highest ``map_micro`` (a missing one ranks last; ties: the later name)."""
    return max(models, key=lambda m: (-math.inf if by_model[m]["map_micro"] is None else by_model[m]["map_micro"], m))


def _finding_2(ds, modality, condition, scope, by_model, fam, per_query, opts) -> Finding:
    models = sorted(by_model)
    why = _need(fam, models, "llm-enhanced", "medical")
    if why:
        return _untestable(2, ds, modality, condition, scope, why, by_model)
    llm = [m for m in models if fam[m] == "llm-enhanced"]
    medical = [m for m in models if fam[m] == "medical"]
    best_l, best_m = _best(llm, by_model), _best(medical, by_model)
    _, vals, classes, units = _align({m: per_query[by_model[m]["analysis_id"]] for m in [*llm, *medical]})
    comps = []
    for metric, col in TESTED.items():
        macro = classes if metric.endswith("_macro") else None
        comps.append(_paired(f"best llm-enhanced {best_l} vs best medical {best_m}", best_l, best_m, metric,
                             vals[best_l][col], vals[best_m][col], units, macro, "a > b", opts))
        if len(llm) == len(medical) == 1:
            continue  # the family means are the two models: the same test twice would count twice in Holm
        mean_l = np.mean([vals[m][col] for m in llm], axis=0)
        mean_m = np.mean([vals[m][col] for m in medical], axis=0)
        comps.append(_paired("family mean llm-enhanced vs medical", "family:llm-enhanced", "family:medical", metric,
                             mean_l, mean_m, units, macro, "a > b", opts))
    for metric in SHOWN:
        a, b = by_model[best_l].get(metric), by_model[best_m].get(metric)
        comps.append(Comparison(f"best llm-enhanced {best_l} vs best medical {best_m} (side by side)", best_l, best_m,
                                metric, _finite(a), _finite(b),
                                _finite(a - b) if a is not None and b is not None else None))
        fa = [by_model[m].get(metric) for m in llm]
        fb = [by_model[m].get(metric) for m in medical]
        if all(x is not None for x in (*fa, *fb)):
            ma, mb = float(np.mean(fa)), float(np.mean(fb))
            comps.append(Comparison("family mean llm-enhanced vs medical (side by side)", "family:llm-enhanced",
                                    "family:medical", metric, _finite(ma), _finite(mb), _finite(ma - mb)))
    verdict, reason = _judge(comps, opts.alpha)
    return Finding(2, ds, modality, condition, scope, verdict, reason, comps,
                   sorted(by_model[m]["analysis_id"] for m in [*llm, *medical]))


def _finding_3(ds: str, modality: str | None, table: Any, fresh: set[str], fam: dict[str, str | None],
               opts: FindingsOptions) -> list[Finding]:
    """Per overlay condition and (k, group rule) of the stored attack rows that are current; for
    one modality's queries when ``modality`` is given (the dataset has per-modality analyses)."""
    slices: dict[tuple[str, int, bool], dict[str, _Queries]] = {}
    prints: dict[tuple[str, int, bool], set[str]] = {}
    cols = _columns(table)
    n = len(cols.get("model", []))
    keep = np.ones(n, dtype=bool)
    if n:
        stale = ~np.isin(cols["inputs_fingerprint"].astype(str), list(fresh))
        keep &= ~stale
        if opts.condition not in (None, CLEAN):
            keep &= cols["condition"].astype(str) == opts.condition
        if modality is not None:
            keep &= cols["modality"].astype(str) == modality
    n_stale = len({(m, c) for m, c, s in zip(cols.get("model", []), cols.get("condition", []), stale if n else [],
                                            strict=True) if s})
    cols = {c: v[keep] for c, v in cols.items()}
    if not keep.any():
        where = (f"overlay condition {opts.condition!r}" if opts.condition not in (None, CLEAN)
                 else "any overlay condition")
        why = (f"no current overlay effect of {where} on {ds}: run `vlmindex overlay effect -c NAME` for its "
               "models" + (f" ({n_stale} stored ones are stale: their runs changed since)" if n_stale else ""))
        return [Finding(3, ds, modality, opts.condition or "(overlays)", "", UNTESTABLE, why)]
    key = np.array([f"{c}\x00{k}\x00{g}\x00{m}" for c, k, g, m in
                    zip(cols["condition"], cols["k"], cols["exclude_group"], cols["model"], strict=True)])
    for sub, c in _split_by(cols, key).items():
        cond, k, g, model = sub.split("\x00")
        skey = (cond, int(k), g == "True")
        success = _floats(c["attack_success"])
        slices.setdefault(skey, {})[model] = _Queries(
            c["image_id"].astype(np.int64),
            {"attack_delta_map": c["ap_attack"].astype(float) - c["ap_clean"].astype(float),
             "attack_success_rate": success},
            c["label"].astype(str).astype(object), c["unit"].astype(str).astype(object))
        prints.setdefault(skey, set()).update(str(x) for x in c["inputs_fingerprint"])
    out = []
    for (cond, k, group), runs in sorted(slices.items()):
        scope = f"k={k}" + (" group-excluded" if group else "") + " attacked queries vs the clean gallery"
        models = sorted(runs)
        missing = [w for w, fams in (("general or llm-enhanced", GENERAL_SIDE), ("medical", ("medical",)))
                   if not any(fam.get(m) in fams for m in models)]
        if missing:
            why = (f"no {' and no '.join(missing)} model has overlay effects here (families present: "
                   f"{_families_present(fam, models)})")
            out.append(Finding(3, ds, modality, cond, scope, UNTESTABLE, why,
                               effect_fingerprints=sorted(prints[(cond, k, group)])))
            continue
        general = [m for m in models if fam.get(m) in GENERAL_SIDE]
        medical = [m for m in models if fam.get(m) == "medical"]
        _, vals, _, units = _align({m: runs[m] for m in [*general, *medical]})
        side = "+".join(f for f in GENERAL_SIDE if any(fam.get(m) == f for m in general))
        comps = []
        for metric, expected in (("attack_delta_map", "a < b"), ("attack_success_rate", "a > b")):
            ga = np.mean([vals[m][metric] for m in general], axis=0)
            mb = np.mean([vals[m][metric] for m in medical], axis=0)
            if not (np.isfinite(ga) & np.isfinite(mb)).any():
                continue  # the text writes no other class: no success rate
            comps.append(_paired(f"family mean {side} vs medical", f"family:{side}", "family:medical", metric, ga, mb,
                                 units, None, expected, opts))
        verdict, reason = _judge(comps, opts.alpha)
        out.append(Finding(3, ds, modality, cond, scope, verdict, reason, comps,
                           effect_fingerprints=sorted(prints[(cond, k, group)])))
    return out


def _columns(table: Any) -> dict[str, np.ndarray]:
    """An Arrow table as NumPy columns."""
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _split_by(cols: dict[str, np.ndarray], key: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Rows grouped by ``key`` (stably: a group keeps the rows' order) -> {key: its columns}."""
    if len(key) == 0:
        return {}
    order = np.argsort(key, kind="stable")
    key = key[order]
    cols = {c: v[order] for c, v in cols.items()}
    cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
    return {str(key[lo]): {c: v[lo:hi] for c, v in cols.items()}
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(key)], strict=True)}


# --------------------------------------------------------------------------------------------------
# Rows and storage


def finding_rows(findings: list[Finding], opts: FindingsOptions, created_at: datetime | None = None
                 ) -> list[dict[str, Any]]:
    """One row per comparison (one row for a finding without any), the ``findings`` table's columns."""
    now = created_at or datetime.now()
    out = []
    for f in findings:
        base = {**dict.fromkeys(results.FINDING_COLUMNS),
                "dataset": f.dataset, "modality": f.modality, "condition": f.condition, "scope": f.scope,
                "finding": f.finding, "claim": f.claim, "finding_verdict": f.verdict, "finding_reason": f.reason,
                "analysis_ids": f.analysis_ids or None, "effect_fingerprints": f.effect_fingerprints or None,
                "n_boot": opts.n_boot, "seed": opts.seed, "alpha": opts.alpha, "created_at": now}
        if not f.comparisons:
            out.append(base)
        for c in f.comparisons:
            out.append({**base, **c.__dict__})
    return out


def save_findings(ws: Workspace, findings: list[Finding], opts: FindingsOptions) -> list[dict[str, Any]]:
    """Replace the ``findings`` rows of the datasets computed (of ``opts.condition`` only, when
    given: findings 1-2 of the analyses of that condition, or finding 3 of that overlay); the rows stored."""
    from vlmindex.catalog.workspace import write_wait

    rows = finding_rows(findings, opts)
    with ws.write(wait=write_wait()) as con:
        results.store_findings(con, sorted({f.dataset for f in findings}), rows, condition=opts.condition)
    return rows
