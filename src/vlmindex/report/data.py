"""The report's data step: :func:`collect` reads and computes everything the page shows, once.

The result, :class:`ReportData`, holds typed rows and arrays and no HTML; :mod:`vlmindex.report.sections`
turns it into the page. Every catalog read goes through :mod:`vlmindex.catalog` (this package runs
no SQL of its own), and the numbers are those stored: the latest analysis per (model, dataset,
condition) and options, exactly as ``sql/leaderboard.sql`` picks it. The statistics added here
(bootstrap intervals, Wilcoxon tests, Holm correction; :mod:`vlmindex.metrics.statistics`) and the
projections are seeded, so the same workspace gives the same data.

Statistical unit. Views of one lesion or images of one patient are not independent queries, so
intervals and tests work on *groups* (``images.group_id``; an image without a group is its own
group): the bootstrap resamples whole groups, and the Wilcoxon test runs on per-group mean
differences. When every group holds one image this is the ordinary per-query version.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from vlmindex import __version__, duplicates, thumbnails
from vlmindex.analyze import AnalyzeOptions
from vlmindex.catalog import RunKey, Workspace, results
from vlmindex.catalog import duplicates as duplicate_store
from vlmindex.catalog.datasets import dataset_summaries
from vlmindex.catalog.datasets import images_by_id as catalog_images_by_id
from vlmindex.catalog.embeddings import read_run
from vlmindex.catalog.fingerprints import stale_analyses
from vlmindex.comparable import block_name, blocks, protocol, protocol_text  # noqa: F401  (part of this API)
from vlmindex.errors import VlmindexError
from vlmindex.metrics import registry
from vlmindex.metrics.statistics import PairedResult, bootstrap_mean_ci, holm, paired_comparison
from vlmindex.report.options import ReportOptions
from vlmindex.thumbnails import THUMBNAIL_PX

# (summaries column, header, higher is better, definition shown as a tooltip)
LEADERBOARD_COLUMNS: tuple[tuple[str, str, bool, str], ...] = registry.headline()

# overlay_effects columns that identify one figure; the newest row of each key is shown.
_EFFECT_KEYS = ("model", "dataset", "condition", "figure", "k", "exclude_group", "metric")
_EFFECT_TIME = ("created_at", "computed_at", "analysed_at")


# ------------------------------------------------------------------------------------------------
# What the page shows
# ------------------------------------------------------------------------------------------------


@dataclass
class QueryArrays:
    """One analysis's per-query rows, sorted by image id."""

    image_id: np.ndarray  # int64
    ap: np.ndarray        # float; NaN where the query had no relevant image (R = 0)
    purity: np.ndarray    # purity@k, float
    label: np.ndarray     # object (str)
    unit: np.ndarray      # object: the statistical unit, the image's group or the image itself


@dataclass
class DatasetRow:
    """One analysed dataset in the overview."""

    name: str
    in_catalog: bool  # False: analysed, but no longer in the datasets table
    format: str | None
    images: int | None
    n_classes: int | None
    groups: int | None
    modality: str | None
    splits: dict[str, int]
    conditions: list[str]  # analysed conditions, clean first


@dataclass
class BestModel:
    """The model with the highest mAP on one dataset, modality and condition ("at a glance")."""

    dataset: str
    condition: str
    model: str
    map_micro: float | None
    n_queries: int | None
    n_models: int
    modality: str | None = None  # None: all modalities


@dataclass
class LeaderboardRow:
    summary: dict[str, Any]
    map_ci: tuple[float | None, float | None]  # group-bootstrap interval of mAP; None without per-query rows


@dataclass
class LeaderboardBlock:
    """One dataset, modality and condition: its analyses, best mAP first."""

    dataset: str
    condition: str
    ks: list[int]
    rows: list[LeaderboardRow]
    best: dict[str, float]  # best value of each leaderboard column (max or min as the column says)
    modality: str | None = None  # None: all modalities (analyses without --modality)


@dataclass
class PurityTable:
    """Mean purity@k per (model, class) of one dataset, modality and condition."""

    dataset: str
    condition: str
    ks: list[int]
    models: list[str]
    labels: list[str]
    values: list[list[float | None]]  # [model][label]; None: the model has no query of that class
    counts: list[int]                 # queries per class (the largest count over models)
    modality: str | None = None


@dataclass
class ProjectionPanel:
    """One model's embeddings on one dataset, every analysed condition together, projected to 2-D.

    Per point, in point order: ``image_ids``, ``conditions``, ``labels``, ``vectors`` (the embedding
    rows that were projected, as the catalog's reader returns them) and ``coords``.
    """

    dataset: str
    model: str
    conditions: list[str]
    image_ids: np.ndarray  # int64
    vectors: np.ndarray    # float32, [n, dim]
    labels: list[str]
    coords: np.ndarray     # float, [n, 2]
    method: str            # "tsne" or "pca"
    run_conditions: list[str]  # the conditions shown, in panel order
    n_images: int          # distinct images (each appears once per condition)
    modality: str | None = None  # None: the all-modality analyses; else only that modality was analysed


@dataclass
class ProjectionGap:
    """A (dataset, model) with fewer than 3 embedded points: nothing to project."""

    dataset: str
    model: str


@dataclass
class ApDelta:
    """ΔAP = AP(overlaid) − AP(clean) of one model, paired on the same images."""

    overlay: dict[str, Any]
    clean: dict[str, Any]
    result: PairedResult  # a = overlaid, b = clean
    holm_p: float         # over all ΔAP rows of the report


@dataclass
class Comparison:
    """Two models on the same dataset, condition and protocol; A has the higher mAP."""

    dataset: str
    condition: str
    a: dict[str, Any]
    b: dict[str, Any]
    result: PairedResult
    holm_p: float  # over all comparisons of the report


@dataclass
class ProvenanceRow:
    summary: dict[str, Any]
    index: str  # the index recorded at analysis time, else the one on disk now


@dataclass
class StaleAnalysis:
    """An analysis whose stored inputs fingerprint is not what its inputs give now."""

    analysis_id: str
    model: str
    dataset: str
    condition: str
    options: AnalyzeOptions
    stored_fingerprint: str | None

    def rerun_command(self) -> str:
        """The ``vlmindex analyze`` call that recomputes it with the same options."""
        o = self.options
        args = [f"-m {self.model}", f"-d {self.dataset}", f"-c {self.condition}", f"-k {o.k}"]
        args += ["--exclude-group"] if o.exclude_group else []
        args += ["--exclude-duplicates"] if o.exclude_duplicates else []
        args += [f"--duplicates-model {o.duplicates_model}"] if o.exclude_duplicates and o.duplicates_model else []
        args += [f"--query-split {o.query_split}"] if o.query_split else []
        args += [f"--gallery-split {o.gallery_split}"] if o.gallery_split else []
        args += [f"--modality {o.modality}"] if o.modality else []
        args += [] if o.probe else ["--no-probe"]
        args += [f"--probe-seeds {o.probe_seeds}"] if o.probe_seeds != 1 else []
        args += [f"--sample-queries {o.sample_queries}"] if o.sample_queries is not None else []
        args += [f"--seed {o.seed}"] if o.seed != 0 else []
        return "vlmindex analyze " + " ".join(args)


@dataclass
class DuplicatePair:
    """One stored duplicate pair as the report shows it: two thumbnails, labels, splits, score."""

    kind: str                   # every kind it was found as: "exact-bytes, near"
    score: float
    model: str | None
    image_ids: tuple[int, int]
    labels: tuple[str | None, str | None]
    splits: tuple[str | None, str | None]
    thumbnails: tuple[str | None, str | None]  # PNG data: URIs; None when the file cannot be read
    same_split: bool
    same_label: bool


@dataclass
class DatasetDuplicates:
    """The duplicate pairs of one reported dataset: counts per kind and the top pairs."""

    dataset: str
    counts: list[dict[str, Any]]    # per kind (and model): pairs, cross_split, label_mismatch
    searches: list[dict[str, Any]]  # the stored searches, with whether each is still current
    pairs: list[DuplicatePair]      # top pairs: cross-split first, then by score
    n_total: int                    # pairs stored (all kinds)


@dataclass
class Neighbour:
    image_id: int
    label: str | None
    score: float
    same_class: bool
    thumbnail: str | None  # PNG data: URI; None when the file cannot be read


@dataclass
class ConfusedQuery:
    """A query with low purity@k and the neighbours that made it so."""

    image_id: int
    label: str | None
    purity: float
    thumbnail: str | None
    neighbours: list[Neighbour]


@dataclass
class ConfusedStrips:
    """The most confused queries of one model's clean analysis of a dataset."""

    model: str
    dataset: str
    analysis_id: str
    scope: str
    queries: list[ConfusedQuery]


@dataclass
class ReportData:
    """Everything one report shows, computed once by :func:`collect`."""

    workspace: Path
    made_at: datetime
    version: str
    python: str
    summaries: list[dict[str, Any]]            # latest analyses, as ``results.latest_summaries`` orders them
    per_query: dict[str, QueryArrays]          # by analysis id
    datasets: list[DatasetRow]
    glance: list[BestModel]
    leaderboard: list[LeaderboardBlock]
    per_class: list[PurityTable]
    projection_items: list[ProjectionPanel | ProjectionGap]  # in page order; empty with max_points 0
    overlay_effects: list[dict[str, Any]]      # stored figures, the newest of each
    has_overlay_runs: bool                     # an overlay condition was analysed
    ap_deltas: list[ApDelta]                   # only when no figures are stored
    ap_delta_skipped: list[str]                # overlay analyses without a comparable clean one
    comparisons: list[Comparison]
    single_model: list[str]                    # "dataset/condition" with nothing to compare
    provenance: list[ProvenanceRow]
    stale: list[StaleAnalysis]
    unchecked: list[str] = field(default_factory=list)  # analysis ids whose options could not be rebuilt
    notes: list[str] = field(default_factory=list)      # for the command line, not the page
    duplicates: list[DatasetDuplicates] = field(default_factory=list)  # reported datasets with stored pairs
    confused: list[ConfusedStrips] = field(default_factory=list)  # per (dataset, model): lowest purity@k queries
    findings: list[Any] = field(default_factory=list)  # vlmindex.findings.Finding, in their order

    @property
    def projections(self) -> list[ProjectionPanel]:
        return [p for p in self.projection_items if isinstance(p, ProjectionPanel)]


# ------------------------------------------------------------------------------------------------
# Reading the catalog
# ------------------------------------------------------------------------------------------------


def latest_summaries(con: Any, dataset: str | None = None) -> list[dict[str, Any]]:
    """The latest analysis per (model, dataset, condition) and options: the ``latest_summaries`` view.

    Ordered by dataset, modality (all modalities first), clean before overlay conditions, then mAP
    (best first) and model.
    """
    return results.latest_summaries(con, dataset)


def _per_query(con: Any, analysis_ids: list[str]) -> dict[str, QueryArrays]:
    """Per analysis: image_id, ap, purity_at_k, label and statistical unit (group) of each query.

    Read as Arrow and split by analysis in NumPy: a big study has millions of query rows.
    """
    if not analysis_ids:
        return {}
    t = results.per_query(con, analysis_ids)
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    aid = cols["analysis_id"].astype(str)
    cuts = np.flatnonzero(aid[1:] != aid[:-1]) + 1
    out: dict[str, QueryArrays] = {}
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(aid)], strict=True):
        if hi <= lo:
            continue
        out[str(aid[lo])] = QueryArrays(
            image_id=cols["image_id"][lo:hi].astype(np.int64),
            ap=cols["ap"][lo:hi].astype(float),  # NULL (R = 0) arrives as NaN
            purity=cols["purity_at_k"][lo:hi].astype(float),
            label=cols["label"][lo:hi].astype(object),
            unit=cols["unit"][lo:hi].astype(object),
        )
    return out


def _overlay_effects(con: Any, dataset: str | None) -> list[dict[str, Any]]:
    rows = results.overlay_effect_rows(con, dataset)
    if not rows:
        return []
    keys = [k for k in _EFFECT_KEYS if k in rows[0]]
    stamp = next((t for t in _EFFECT_TIME if t in rows[0]), None)
    newest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        key = tuple(r[k] for k in keys)
        if key not in newest or (stamp and r[stamp] is not None and
                                 (newest[key][stamp] is None or r[stamp] > newest[key][stamp])):
            newest[key] = r
    return sorted(newest.values(), key=lambda r: tuple(str(r.get(k)) for k in keys))


def _datasets(con: Any, summaries: list[dict[str, Any]]) -> list[DatasetRow]:
    info = {d["name"]: d for d in dataset_summaries(con)}
    conds: dict[str, set[str]] = {}
    for s in summaries:
        conds.setdefault(s["dataset"], set()).add(s["condition"])
    out = []
    for name in sorted(conds):
        d = info.get(name)
        out.append(DatasetRow(
            name=name, in_catalog=d is not None, format=(d or {}).get("format"), images=(d or {}).get("images"),
            n_classes=(d or {}).get("n_classes"), groups=(d or {}).get("groups"),
            modality=(d or {}).get("modality"), splits=dict(sorted(((d or {}).get("splits") or {}).items())),
            conditions=sorted(conds[name], key=lambda c: (c != "clean", c))))
    return out


def _index_text(ws: Workspace, s: dict[str, Any]) -> str:
    """The index recorded at analysis time, else the one on disk now (built after the analysis)."""
    from vlmindex.index import IndexInfo

    idx = (s.get("provenance") or {}).get("index")
    if isinstance(idx, dict):
        return f"{idx.get('kind')} {short_json(idx.get('params') or {})}"
    sidecar = ws.index_path(s["model"], s["dataset"], s["condition"]).with_suffix(".json")
    if sidecar.exists():
        info = IndexInfo.load(sidecar)
        if info is None:
            return f"unreadable sidecar {sidecar.name}"
        return (f"{info.kind} {short_json(info.params)} ({info.count} vectors, built {info.built_at}, "
                "after this analysis)")
    return "none built"


def short_json(obj: Any) -> str:
    """Compact, key-sorted JSON of settings for a table cell."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(", ", ": "))


# ------------------------------------------------------------------------------------------------
# Computing what is shown
# ------------------------------------------------------------------------------------------------


def _glance(summaries: list[dict[str, Any]]) -> list[BestModel]:
    out = []
    for (ds, mod, cond), block in blocks(summaries).items():
        top = max(block, key=lambda s: -math.inf if s["map_micro"] is None else s["map_micro"])
        out.append(BestModel(ds, cond, top["model"], top["map_micro"], top["n_queries"], len(block), mod))
    return out


def _leaderboard(summaries: list[dict[str, Any]], per_query: dict[str, QueryArrays],
                 opts: ReportOptions) -> list[LeaderboardBlock]:
    out = []
    for (ds, mod, cond), block in blocks(summaries).items():
        best = {}
        for col, _, higher, _ in LEADERBOARD_COLUMNS:
            vals = [s[col] for s in block if s.get(col) is not None and math.isfinite(s[col])]
            if vals:
                best[col] = max(vals) if higher else min(vals)
        rows = []
        for s in block:
            q = per_query.get(s["analysis_id"])
            lo = hi = None
            if q is not None:
                ok = np.isfinite(q.ap)
                lo, hi = bootstrap_mean_ci(q.ap[ok], q.unit[ok], n_boot=opts.n_boot, seed=opts.seed,
                                           confidence=opts.confidence)
            rows.append(LeaderboardRow(s, (lo, hi)))
        out.append(LeaderboardBlock(ds, cond, sorted({s["k"] for s in block}), rows, best, mod))
    return out


def _per_class(summaries: list[dict[str, Any]], per_query: dict[str, QueryArrays]) -> list[PurityTable]:
    out = []
    for (ds, mod, cond), block in blocks(summaries).items():
        labels = sorted({str(x) for s in block if s["analysis_id"] in per_query
                         for x in per_query[s["analysis_id"]].label})
        if not labels:
            continue
        values, counts = [], dict.fromkeys(labels, 0)
        for s in block:
            q = per_query.get(s["analysis_id"])
            row: list[float | None] = []
            for lab in labels:
                m = (q.label == lab) if q is not None else np.zeros(0, dtype=bool)
                if q is None or not m.any():
                    row.append(None)
                    continue
                row.append(float(np.nanmean(q.purity[m])))
                counts[lab] = max(counts[lab], int(m.sum()))
            values.append(row)
        out.append(PurityTable(ds, cond, sorted({s["k"] for s in block}), [s["model"] for s in block], labels,
                               values, [counts[lab] for lab in labels], mod))
    return out


def _projections(ws: Workspace, summaries: list[dict[str, Any]], per_query: dict[str, QueryArrays],
                 opts: ReportOptions, notes: list[str]) -> list[ProjectionPanel | ProjectionGap]:
    import sklearn.manifold  # noqa: F401  (loads OpenMP now: threadpoolctl limits only loaded libraries)
    from threadpoolctl import threadpool_limits

    from vlmindex import metrics

    if opts.max_points <= 0:
        return []
    out: list[ProjectionPanel | ProjectionGap] = []
    # One panel per (dataset, model) from its all-modality analyses; per modality only where the
    # model was analysed per modality alone (analyses of disjoint modalities share no image).
    by_model: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
    for s in summaries:
        by_model.setdefault((s["dataset"], s["model"], s.get("modality")), []).append(s)
    for key in [k for k in by_model if k[2] is not None and (k[0], k[1], None) in by_model]:
        del by_model[key]
    for (ds, model, mod), runs in by_model.items():
        runs = [r for r in runs if r["analysis_id"] in per_query]
        if not runs:
            continue
        common = None
        for r in runs:
            ids = per_query[r["analysis_id"]].image_id
            common = ids if common is None else np.intersect1d(common, ids)
        q0 = per_query[runs[0]["analysis_id"]]
        per_cond = max(1, opts.max_points // len(runs))
        rng = np.random.default_rng(opts.seed)
        chosen = common
        if len(common) > per_cond:
            chosen = np.sort(rng.choice(common, size=per_cond, replace=False))
        label_of = dict(zip(q0.image_id.tolist(), q0.label.tolist(), strict=True))
        mats = []
        for r in runs:
            # The catalog's one reader (newest current part wins, as in analyze), so a panel plots
            # the vectors the analysis scored.
            run = read_run(ws, RunKey(model, ds, r["condition"]), ids=chosen)
            chosen = np.intersect1d(chosen, run.ids)
            mats.append((r["condition"], run.ids, run.vectors))
        vecs, conds, point_ids = [], [], []
        for cond, ids, mat in mats:
            sel = np.isin(ids, chosen)
            vecs.append(mat[sel])
            conds.extend([cond] * int(sel.sum()))
            point_ids.append(ids[sel])
        if len(conds) < 3:
            notes.append(f"{model} on {ds}{' (' + mod + ')' if mod else ''}: fewer than 3 embedded points, "
                         "no projection")
            out.append(ProjectionGap(ds, model))
            continue
        x = np.concatenate(vecs).astype(np.float32)
        all_ids = np.concatenate(point_ids).astype(np.int64)
        method = opts.projection if len(conds) >= 30 else "pca"
        # One thread: sklearn's Barnes-Hut t-SNE sums gradients in thread order, so more threads
        # make the picture depend on the machine, and on a busy machine OpenMP's spinning threads
        # made a 144-point t-SNE take 37 s instead of 2 s.
        with threadpool_limits(limits=1):
            rows, coords = metrics.project_2d(x, method=method, seed=opts.seed, max_samples=len(conds))
        out.append(ProjectionPanel(
            dataset=ds, model=model, conditions=[conds[i] for i in rows], image_ids=all_ids[rows],
            vectors=x[rows], labels=[str(label_of.get(int(all_ids[i]), "?")) for i in rows],
            coords=np.asarray(coords), method=method, run_conditions=[r["condition"] for r in runs],
            n_images=len(chosen), modality=mod))
    return out


def _paired(qa: QueryArrays, qb: QueryArrays, opts: ReportOptions) -> PairedResult:
    """Paired AP comparison (a − b) on the image ids both analyses share."""
    common, ia, ib = np.intersect1d(qa.image_id, qb.image_id, return_indices=True)
    return paired_comparison(qa.ap[ia], qb.ap[ib], qa.unit[ia], n_boot=opts.n_boot,
                             seed=opts.seed, confidence=opts.confidence)


def _ap_deltas(summaries: list[dict[str, Any]], per_query: dict[str, QueryArrays],
               opts: ReportOptions) -> tuple[list[ApDelta], list[str]]:
    """ΔAP (overlay − clean) per model, paired on the same images; used when no stored figures exist."""
    # The clean analyses of each model and dataset by protocol: one per modality with --per-modality.
    clean: dict[tuple[str, str], dict[tuple[Any, ...], dict[str, Any]]] = {}
    for s in summaries:
        if s["condition"] == "clean":
            clean.setdefault((s["model"], s["dataset"]), {})[protocol(s)] = s
    rows, skipped = [], []
    for s in summaries:
        if s["condition"] == "clean":
            continue
        cands = clean.get((s["model"], s["dataset"]), {})
        c = cands.get(protocol(s))
        where = f"{s['model']} on {s['dataset']}/{s['condition']}" + (f" ({s['modality']})" if s.get("modality")
                                                                       else "")
        if c is None and cands:
            other = next(iter(cands.values()))
            skipped.append(f"{where}: clean analysis used other settings ({protocol_text(other)} vs "
                           f"{protocol_text(s)})")
            continue
        if c is None or c["analysis_id"] not in per_query or s["analysis_id"] not in per_query:
            skipped.append(f"{where}: no clean analysis to compare")
            continue
        rows.append((s, c, _paired(per_query[s["analysis_id"]], per_query[c["analysis_id"]], opts)))
    adj = holm([r.p_value for *_, r in rows])
    return [ApDelta(s, c, r, float(p)) for (s, c, r), p in zip(rows, adj, strict=True)], skipped


def _comparisons(summaries: list[dict[str, Any]], per_query: dict[str, QueryArrays],
                 opts: ReportOptions) -> tuple[list[Comparison], list[str]]:
    """Every pair of models with the same dataset, condition and protocol; Holm over all pairs."""
    pairs: list[tuple[str, str, dict[str, Any], dict[str, Any], PairedResult]] = []
    lonely = []
    for (ds, mod, cond), block in blocks(summaries).items():
        by_protocol: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for s in block:
            if s["analysis_id"] in per_query:
                by_protocol.setdefault(protocol(s), []).append(s)
        if all(len(v) < 2 for v in by_protocol.values()):
            lonely.append(block_name(ds, mod, cond).replace(" / ", "/"))
            continue
        for group in by_protocol.values():
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    a, b = group[i], group[j]  # block is sorted best mAP first
                    pairs.append((ds, cond, a, b, _paired(per_query[a["analysis_id"]],
                                                          per_query[b["analysis_id"]], opts)))
    adj = holm([r.p_value for *_, r in pairs])
    out = [Comparison(ds, cond, a, b, r, float(p)) for (ds, cond, a, b, r), p in zip(pairs, adj, strict=True)]
    return out, lonely


def analysis_options(s: dict[str, Any]) -> AnalyzeOptions:
    """The :class:`AnalyzeOptions` a summary row was computed with, rebuilt from its columns.

    The seed and probe seeds are not columns; provenance records them when an analysis stored
    them, else the defaults.
    """
    seed = (s.get("provenance") or {}).get("seed")
    probe_seeds = (s.get("provenance") or {}).get("probe_seeds")
    k = s.get("k")
    return AnalyzeOptions(k=AnalyzeOptions.k if k is None else int(k), exclude_group=bool(s["exclude_group"]),
                          query_split=s.get("query_split"), gallery_split=s.get("gallery_split"),
                          modality=s.get("modality"),
                          probe=s.get("probe_protocol") is not None,
                          exclude_duplicates=bool(s.get("exclude_duplicates")),
                          duplicates_model=s.get("duplicates_model") if s.get("exclude_duplicates") else None,
                          seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                          probe_seeds=probe_seeds if isinstance(probe_seeds, int) and not isinstance(probe_seeds, bool)
                          else 1,
                          sample_queries=int(s["sampled_queries"]) if s.get("sampled_queries") is not None else None)


def _findings(ws: Workspace, opts: ReportOptions) -> list[Any]:
    """The study's findings on the reported analyses, with the report's bootstrap settings."""
    from vlmindex.findings import FindingsOptions, compute_findings

    try:
        return compute_findings(ws, FindingsOptions(dataset=opts.dataset, n_boot=opts.n_boot, seed=opts.seed,
                                                    alpha=opts.alpha))
    except VlmindexError:  # nothing analysed: the section says so
        return []


def _stale(ws: Workspace, summaries: list[dict[str, Any]]) -> tuple[list[StaleAnalysis], list[str]]:
    """Analyses whose inputs changed since: the storage layer's own rule
    (``catalog.fingerprints.stale_analyses``, from the inputs each analysis recorded)."""
    with ws.read(views=False) as con:
        ids = stale_analyses(con, ws)
    return [StaleAnalysis(s["analysis_id"], s["model"], s["dataset"], s["condition"], analysis_options(s),
                          s.get("inputs_fingerprint")) for s in summaries if s["analysis_id"] in ids], []


def thumbnail_uri(path: str | Path, size: int = THUMBNAIL_PX) -> str | None:
    """A PNG ``data:`` URI of the image at ``path`` (what a report may embed: it fetches nothing)."""
    return thumbnails.file_uri(path, size)


def _duplicates(con: Any, ws: Workspace, datasets: list[str], top: int) -> list[DatasetDuplicates]:
    """The stored duplicate pairs of each reported dataset that has any (top ``top``, cross-split
    first, then by score), each search marked current or stale."""
    out = []
    for ds in datasets:
        counts = duplicate_store.pair_counts(con, ds)
        if not counts:
            continue
        searches = duplicate_store.searches(con, ds)
        for sr in searches:
            if sr["kind"] == duplicate_store.EXACT:
                now = duplicates.exact_fingerprint(con, ws, ds)
            else:
                now = duplicates.near_fingerprint(con, ws, RunKey(sr["model"], ds, sr["condition"]), sr["threshold"])
            sr["current"] = sr["inputs_fingerprint"] == now
        rows = duplicate_store.pair_rows(con, ds, limit=top, one_per_pair=True)
        pairs = [DuplicatePair(
            kind=r["kinds"], score=float(r["score"]), model=r["model"], image_ids=(r["image_id_a"], r["image_id_b"]),
            labels=(r["label_a"], r["label_b"]), splits=(r["split_a"], r["split_b"]),
            thumbnails=(thumbnail_uri(r["path_a"]), thumbnail_uri(r["path_b"])),
            same_split=bool(r["same_split"]), same_label=bool(r["same_label"])) for r in rows]
        out.append(DatasetDuplicates(ds, counts, searches, pairs, sum(int(c["pairs"]) for c in counts)))
    return out


def _confused(con: Any, ws: Workspace, summaries: list[dict[str, Any]], per_query: dict[str, QueryArrays],
              top: int, max_k: int = 10) -> list[ConfusedStrips]:
    """For each model's first clean all-modality analysis of each dataset: the ``top`` queries of
    lowest purity@k (then lowest AP, then image id), each with its stored top-k neighbours."""
    if top < 1:
        return []
    stale = stale_analyses(con, ws)  # the neighbour file of a stale analysis is of other vectors
    out, seen = [], set()
    for s in summaries:
        key = (s["dataset"], s["model"])
        if (s["condition"] != "clean" or s["modality"] is not None or key in seen
                or s["analysis_id"] not in per_query or s["analysis_id"] in stale):
            continue
        seen.add(key)
        qa = per_query[s["analysis_id"]]
        order = np.lexsort((qa.image_id, np.nan_to_num(qa.ap, nan=np.inf), qa.purity))[:top]
        try:
            nb = results.read_neighbors(ws, RunKey(s["model"], s["dataset"], "clean"), s["analysis_id"])
        except VlmindexError:
            continue  # an analysis without its neighbour file shows no strips rather than failing the report
        q_ids = nb.column("image_id").to_numpy()
        chosen = {int(qa.image_id[i]) for i in order}
        rows = [r for r in nb.filter(_mask(q_ids, chosen)).to_pylist() if r["rank"] <= max_k]
        meta = catalog_images_by_id(con, {*chosen, *(r["neighbor_id"] for r in rows)}, ("path", "label"))
        queries = []
        for i in order:
            qid = int(qa.image_id[i])
            path, label = meta.get(qid, (None, None))
            nbs = [Neighbour(r["neighbor_id"], meta.get(r["neighbor_id"], (None, None))[1], float(r["score"]),
                             label is not None and meta.get(r["neighbor_id"], (None, None))[1] == label,
                             thumbnail_uri(meta[r["neighbor_id"]][0]) if r["neighbor_id"] in meta else None)
                   for r in rows if r["image_id"] == qid]
            queries.append(ConfusedQuery(qid, label, float(qa.purity[i]), thumbnail_uri(path) if path else None, nbs))
        out.append(ConfusedStrips(s["model"], s["dataset"], s["analysis_id"], s.get("scope") or "", queries))
    return out


def _mask(values: np.ndarray, keep: set[int]) -> Any:
    import pyarrow as pa

    return pa.array(np.isin(values, np.fromiter(keep, dtype=np.int64)))


def collect(ws: Workspace, options: ReportOptions | None = None) -> ReportData:
    """Read and compute everything a report shows; raises when nothing has been analysed."""
    opts = options or ReportOptions()
    opts.check()
    notes: list[str] = []
    with ws.read() as con:
        summaries = latest_summaries(con, opts.dataset)
        if not summaries:
            have = results.analysed_datasets(con)
            if opts.dataset and have:
                raise VlmindexError(f"no analyses of dataset {opts.dataset!r} in {ws.root} "
                                    f"(analysed datasets: {', '.join(have)})")
            raise VlmindexError(f"no analyses in workspace {ws.root}; run `vlmindex analyze --model M "
                                "--dataset D` first")
        made_at = datetime.now()
        per_query = _per_query(con, [s["analysis_id"] for s in summaries])
        datasets = _datasets(con, summaries)
        effects = _overlay_effects(con, opts.dataset)
        dups = _duplicates(con, ws, [d.name for d in datasets], opts.duplicate_pairs)
        confused = _confused(con, ws, summaries, per_query, opts.confused_queries)
    has_overlay_runs = any(s["condition"] != "clean" for s in summaries)
    # ΔAP is the fallback of stored figures only: its bootstraps cost time the page would not show.
    ap_deltas, ap_skipped = _ap_deltas(summaries, per_query, opts) if not effects and has_overlay_runs else ([], [])
    comparisons, single = _comparisons(summaries, per_query, opts)
    stale, unchecked = _stale(ws, summaries)
    return ReportData(
        workspace=ws.root, made_at=made_at, version=__version__, python=platform.python_version(),
        summaries=summaries, per_query=per_query, datasets=datasets, glance=_glance(summaries),
        leaderboard=_leaderboard(summaries, per_query, opts), per_class=_per_class(summaries, per_query),
        projection_items=_projections(ws, summaries, per_query, opts, notes),
        overlay_effects=effects, has_overlay_runs=has_overlay_runs, ap_deltas=ap_deltas,
        ap_delta_skipped=ap_skipped, comparisons=comparisons, single_model=single,
        provenance=[ProvenanceRow(s, _index_text(ws, s)) for s in summaries], stale=stale,
        unchecked=unchecked, notes=notes, duplicates=dups, confused=confused, findings=_findings(ws, opts))
