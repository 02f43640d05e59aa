"""One self-contained HTML report of a workspace's analyses (``vlmindex report``).

Sections, each a ``<section id=...>``: overview, leaderboard, per-class purity heatmaps, 2-D
projections per model (clean and overlaid images together), overlay effects with confidence
intervals, paired comparisons between models on the same queries, and the provenance of every
number. Everything is inline (CSS in ``<style>``, plots as SVG from :mod:`vlmindex.report_plots`)
and a Content-Security-Policy forbids any fetch, so the file opens offline and cannot leak data.

The numbers come from the catalog as stored: the latest analysis per (model, dataset, condition),
exactly as ``sql/leaderboard.sql`` picks it. The statistics added here (bootstrap intervals,
Wilcoxon tests, Holm correction; :mod:`vlmindex.metrics.statistics`) are seeded, so the same
workspace gives the same report.

Statistical unit. Views of one lesion or images of one patient are not independent queries, so
intervals and tests work on *groups* (``images.group_id``; an image without a group is its own
group): the bootstrap resamples whole groups, and the Wilcoxon test runs on per-group mean
differences. When every group holds one image this is the ordinary per-query version.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from vlmindex import __version__
from vlmindex.catalog import RunKey, Workspace, results
from vlmindex.catalog.embeddings import read_run
from vlmindex.catalog.workspace import atomic_write_bytes
from vlmindex.errors import VlmindexError
from vlmindex.metrics import registry
from vlmindex.metrics.statistics import PairedResult, bootstrap_mean_ci, holm, paired_comparison
from vlmindex.metrics.statistics import wilcoxon_p as wilcoxon_p  # not used here; kept importable from here
from vlmindex.report_plots import Bar, Point, bar_chart, esc, heatmap, scatter

SECTIONS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("leaderboard", "Leaderboard"),
    ("per-class", "Per-class purity"),
    ("projections", "2-D projections"),
    ("overlay-effects", "Overlay effects"),
    ("comparisons", "Paired comparisons"),
    ("provenance", "Provenance"),
)

# (summaries column, header, higher is better, definition shown as a tooltip)
LEADERBOARD_COLUMNS: tuple[tuple[str, str, bool, str], ...] = registry.headline()

# overlay_effects columns that identify one figure; the newest row of each key is shown.
_EFFECT_KEYS = ("model", "dataset", "condition", "figure", "k", "exclude_group", "metric")
_EFFECT_TIME = ("created_at", "computed_at", "analysed_at")


@dataclass(frozen=True)
class ReportOptions:
    dataset: str | None = None
    max_points: int = 1500  # per model panel, all conditions together; 0 leaves projections out
    projection: str = "tsne"  # "tsne" or "pca"; tiny sets always use PCA
    n_boot: int = 2000
    confidence: float = 0.95
    alpha: float = 0.05  # family-wise error rate of the Holm-corrected comparisons
    seed: int = 0


@dataclass
class ReportResult:
    path: Path
    n_analyses: int
    datasets: list[str]
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Reading the catalog
# ------------------------------------------------------------------------------------------------


def latest_summaries(con: Any, dataset: str | None = None) -> list[dict[str, Any]]:
    """The latest analysis per (model, dataset, condition) and options: the ``latest_summaries`` view.

    Ordered by dataset, clean before overlay conditions, then mAP (best first) and model.
    """
    return results.latest_summaries(con, dataset)


def _protocol(s: dict[str, Any]) -> tuple[Any, ...]:
    """What must match for two analyses' per-query AP to be comparable (k does not change AP)."""
    return (bool(s.get("exclude_group")), s.get("query_split"), s.get("gallery_split"),
            (s.get("provenance") or {}).get("modality"))


def _protocol_text(s: dict[str, Any]) -> str:
    excl, qs, gs, mod = _protocol(s)
    parts = ["group excluded" if excl else "group not excluded"]
    if qs:
        parts.append(f"queries: {qs}")
    if gs:
        parts.append(f"gallery: {gs}")
    if mod:
        parts.append(f"modality: {mod}")
    return ", ".join(parts)


def _per_query(con: Any, analysis_ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per analysis: image_id, ap, purity_at_k, label and statistical unit (group) of each query.

    Read as Arrow and split by analysis in NumPy: a big study has millions of query rows.
    """
    if not analysis_ids:
        return {}
    t = results.per_query(con, analysis_ids)
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    aid = cols["analysis_id"].astype(str)
    cuts = np.flatnonzero(aid[1:] != aid[:-1]) + 1
    out: dict[str, dict[str, np.ndarray]] = {}
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(aid)], strict=True):
        if hi <= lo:
            continue
        out[str(aid[lo])] = {
            "image_id": cols["image_id"][lo:hi].astype(np.int64),
            "ap": cols["ap"][lo:hi].astype(float),  # NULL (R = 0) arrives as NaN
            "purity": cols["purity_at_k"][lo:hi].astype(float),
            "label": cols["label"][lo:hi].astype(object),
            "unit": cols["unit"][lo:hi].astype(object),
        }
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


def _read_rows(ws: Workspace, key: RunKey, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Current embeddings of the ``wanted`` image ids only: the catalog's one reader (newest part wins,
    as in ``analyze``), so a projection plots the vectors the analysis scored."""
    run = read_run(ws, key, ids=wanted)
    return run.ids, run.vectors


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return esc(v)


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _p_note(p: float, alpha: float) -> str:
    """``p = 0.0123 *`` for a bar's label; the star marks significance at ``alpha``."""
    text = _p(p)
    sig = " *" if math.isfinite(p) and p < alpha else ""
    return ("p " + text if text.startswith("<") else "p = " + text) + sig


def _blocks(summaries: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        out.setdefault((s["dataset"], s["condition"]), []).append(s)
    return out


def _anchor(s: dict[str, Any]) -> str:
    return f"prov-{esc(s['analysis_id'])}"


def _overview(ws: Workspace, con: Any, summaries: list[dict[str, Any]], opts: ReportOptions) -> str:
    from vlmindex.catalog.datasets import dataset_summaries

    datasets = sorted({s["dataset"] for s in summaries})
    info = {d["name"]: d for d in dataset_summaries(con)}
    conds = {}
    for s in summaries:
        conds.setdefault(s["dataset"], set()).add(s["condition"])
    rows = []
    for name in datasets:
        d = info.get(name, {})
        analysed = sorted(conds.get(name, set()), key=lambda c: (c != "clean", c))
        splits = ", ".join(f"{esc(k)} {v}" for k, v in sorted((d.get("splits") or {}).items()))
        rows.append(f"<tr><td>{esc(name)}</td><td>{esc(d.get('format', '–'))}</td>"
                    f"<td class='num'>{_num(d.get('images'))}</td>"
                    f"<td class='num'>{_num(d.get('n_classes'))}</td>"
                    f"<td class='num'>{_num(d.get('groups'))}</td><td>{esc(d.get('modality') or '–')}</td>"
                    f"<td>{splits}</td><td>{esc(', '.join(analysed))}</td></tr>")
    best = []
    for (ds, cond), block in _blocks(summaries).items():
        top = max(block, key=lambda s: -math.inf if s["map_micro"] is None else s["map_micro"])
        best.append(f"<li>{esc(ds)} / {esc(cond)}: <b>{esc(top['model'])}</b> has the highest mAP, "
                    f"{_num(top['map_micro'])} over {_num(top['n_queries'])} queries "
                    f"(of {len(block)} model{'s' if len(block) != 1 else ''}).</li>")
    return (
        "<p>Workspace <code>" + esc(ws.root) + "</code>; "
        f"{len(summaries)} analyses (latest per model, dataset and condition) of "
        f"{len({s['model'] for s in summaries})} models on {len(datasets)} dataset(s). "
        f"Report made {esc(datetime.now().isoformat(timespec='seconds'))} by vlmindex {esc(__version__)} "
        f"(Python {esc(platform.python_version())}); projections: {esc(opts.projection)}, at most "
        f"{opts.max_points} points per model; bootstrap: {opts.n_boot} replicates, seed {opts.seed}.</p>"
        "<table><thead><tr><th>dataset</th><th>format</th><th>images</th><th>classes</th><th>groups</th>"
        "<th>modalities</th><th>splits</th><th>analysed conditions</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
        "<h3>At a glance</h3><ul>" + "".join(best) + "</ul>"
    )


def _leaderboard(summaries: list[dict[str, Any]], per_query: dict[str, dict[str, np.ndarray]],
                 opts: ReportOptions) -> str:
    out = ["<p>Latest analysis per model, dataset and condition, ranked by mAP. <i>micro</i> = mean "
           "over queries, <i>macro</i> = mean of the class means (hover a header for its definition). "
           "The best value of each column is bold. A model name links to the provenance of its row. "
           f"Bars: mAP with a {opts.confidence:.0%} bootstrap interval over groups (patients/lesions).</p>"]
    by_dataset: dict[str, list[Bar]] = {}
    for (ds, cond), block in _blocks(summaries).items():
        ks = sorted({s["k"] for s in block})
        out.append(f"<h3>{esc(ds)} / {esc(cond)} <span class='sub'>k = {esc(', '.join(map(str, ks)))}"
                   "</span></h3>")
        best = {}
        for col, _, higher, _ in LEADERBOARD_COLUMNS:
            vals = [s[col] for s in block if s.get(col) is not None and math.isfinite(s[col])]
            if vals:
                best[col] = max(vals) if higher else min(vals)
        head = "".join(f"<th title='{esc(tip)}'>{esc(h)}</th>" for _, h, _, tip in LEADERBOARD_COLUMNS)
        out.append("<table class='leaderboard' data-dataset='" + esc(ds) + "' data-condition='" + esc(cond)
                   + "'><thead><tr><th>#</th><th>model</th><th>k</th>" + head
                   + "<th>queries</th><th>protocol</th></tr></thead><tbody>")
        for rank, s in enumerate(block, 1):
            cells = []
            for col, _, _, _ in LEADERBOARD_COLUMNS:
                v = s.get(col)
                bold = " best" if col in best and v == best[col] and len(block) > 1 else ""
                cells.append(f"<td class='num{bold}' data-col='{col}' data-value='{esc(repr(v))}'>"
                             f"{_num(v)}</td>")
            out.append(f"<tr data-analysis='{esc(s['analysis_id'])}' data-model='{esc(s['model'])}'>"
                       f"<td>{rank}</td><td><a href='#{_anchor(s)}'>{esc(s['model'])}</a></td>"
                       f"<td class='num'>{_num(s['k'])}</td>" + "".join(cells)
                       + f"<td class='num' data-col='n_queries' data-value='{esc(s['n_queries'])}'>"
                       f"{_num(s['n_queries'])}</td><td class='small'>{esc(_protocol_text(s))}</td></tr>")
        out.append("</tbody></table>")
        for s in block:
            q = per_query.get(s["analysis_id"])
            lo = hi = None
            if q is not None:
                ok = np.isfinite(q["ap"])
                lo, hi = bootstrap_mean_ci(q["ap"][ok], q["unit"][ok], n_boot=opts.n_boot, seed=opts.seed,
                                           confidence=opts.confidence)
            v = s["map_micro"] if s["map_micro"] is not None else math.nan
            by_dataset.setdefault(ds, []).append(Bar(s["model"] + (" · " + cond), v, lo, hi, colour_key=cond))
    for ds, bars in by_dataset.items():
        out.append("<div class='figure'>" + bar_chart(
            bars, title=f"{ds}: mAP per model and condition ({opts.confidence:.0%} CI)", axis_label="mAP",
            colour_title="condition") + "</div>")
    return "".join(out)


def _per_class(summaries: list[dict[str, Any]], per_query: dict[str, dict[str, np.ndarray]]) -> str:
    out = ["<p>Mean purity@k per class (rows: models, columns: classes; the number under a column is "
           "its query count). A dark column is a class every model confuses; a dark row, a model that "
           "separates nothing.</p>"]
    for (ds, cond), block in _blocks(summaries).items():
        labels = sorted({str(x) for s in block if s["analysis_id"] in per_query
                         for x in per_query[s["analysis_id"]]["label"]})
        if not labels:
            continue
        values, counts = [], dict.fromkeys(labels, 0)
        for s in block:
            q = per_query.get(s["analysis_id"])
            row: list[float | None] = []
            for lab in labels:
                m = (q["label"] == lab) if q is not None else np.zeros(0, dtype=bool)
                if q is None or not m.any():
                    row.append(None)
                    continue
                row.append(float(np.nanmean(q["purity"][m])))
                counts[lab] = max(counts[lab], int(m.sum()))
            values.append(row)
        ks = sorted({s["k"] for s in block})
        title = f"{ds} / {cond}: purity@k per class (k = {', '.join(map(str, ks))})"
        out.append(f"<div class='figure' data-dataset='{esc(ds)}' data-condition='{esc(cond)}'>"
                   + heatmap([s["model"] for s in block], labels, values, title=title,
                             col_notes=[f"n={counts[lab]}" for lab in labels]) + "</div>")
    return "".join(out)


def _projections(ws: Workspace, summaries: list[dict[str, Any]], per_query: dict[str, dict[str, np.ndarray]],
                 opts: ReportOptions, notes: list[str]) -> str:
    import sklearn.manifold  # noqa: F401  (loads OpenMP now: threadpoolctl limits only loaded libraries)
    from threadpoolctl import threadpool_limits

    from vlmindex import metrics

    if opts.max_points <= 0:
        return "<p class='note'>Projections left out (--max-points 0).</p>"
    out = [f"<p>Each panel projects one model's embeddings to 2-D ({esc(opts.projection)}; PCA for sets "
           "under 30 points). Colour is the class, marker shape the condition: the same sampled images "
           "appear once per condition, so overlaid images that drift from their clean copies show text "
           f"pulling the features. At most {opts.max_points} points per panel, sampled with seed "
           f"{opts.seed}.</p><div class='grid'>"]
    panels = 0
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        by_model.setdefault((s["dataset"], s["model"]), []).append(s)
    for (ds, model), runs in by_model.items():
        runs = [r for r in runs if r["analysis_id"] in per_query]
        if not runs:
            continue
        common = None
        for r in runs:
            ids = per_query[r["analysis_id"]]["image_id"]
            common = ids if common is None else np.intersect1d(common, ids)
        q0 = per_query[runs[0]["analysis_id"]]
        per_cond = max(1, opts.max_points // len(runs))
        rng = np.random.default_rng(opts.seed)
        chosen = common
        if len(common) > per_cond:
            chosen = np.sort(rng.choice(common, size=per_cond, replace=False))
        label_of = dict(zip(q0["image_id"].tolist(), q0["label"].tolist(), strict=True))
        mats, keys = [], []
        for r in runs:
            ids, mat = _read_rows(ws, RunKey(model, ds, r["condition"]), chosen)
            chosen = np.intersect1d(chosen, ids)
            mats.append((r["condition"], ids, mat))
        vecs = []
        for cond, ids, mat in mats:
            sel = np.isin(ids, chosen)
            vecs.append(mat[sel])
            keys.extend((cond, int(i)) for i in ids[sel])
        if len(keys) < 3:
            notes.append(f"{model} on {ds}: fewer than 3 embedded points, no projection")
            out.append(f"<div class='panel note'>{esc(model)} on {esc(ds)}: fewer than 3 points to "
                       "project.</div>")
            continue
        x = np.concatenate(vecs).astype(np.float32)
        method = opts.projection if len(keys) >= 30 else "pca"
        # One thread: sklearn's Barnes-Hut t-SNE sums gradients in thread order, so more threads
        # make the picture depend on the machine, and on a busy machine OpenMP's spinning threads
        # made a 144-point t-SNE take 37 s instead of 2 s.
        with threadpool_limits(limits=1):
            rows, coords = metrics.project_2d(x, method=method, seed=opts.seed, max_samples=len(keys))
        pts = [Point(float(coords[j, 0]), float(coords[j, 1]), str(label_of.get(keys[i][1], "?")),
                     keys[i][0], f"{label_of.get(keys[i][1], '?')} · {keys[i][0]} · image {keys[i][1]}")
               for j, i in enumerate(rows)]
        caption = f"{len(chosen)} images × {len(runs)} condition(s), {method}"
        out.append(f"<div class='panel' data-dataset='{esc(ds)}' data-model='{esc(model)}'>"
                   + scatter(pts, title=f"{model} on {ds}", caption=caption) + "</div>")
        panels += 1
    out.append("</div>")
    return "".join(out)


def _overlay_section(con: Any, summaries: list[dict[str, Any]], per_query: dict[str, dict[str, np.ndarray]],
                     opts: ReportOptions) -> str:
    effects = _overlay_effects(con, opts.dataset)
    overlay_runs = [s for s in summaries if s["condition"] != "clean"]
    if effects:
        return _stored_effects(effects, opts)
    if not overlay_runs:
        return ("<p class='note' id='no-overlay'>No overlay conditions analysed. Add one with "
                "<code>vlmindex overlay add DATASET NAME --text label</code>, then embed and analyze "
                "with <code>-c NAME</code>.</p>")
    return _ap_deltas(overlay_runs, summaries, per_query, opts)


# Figures of `vlmindex overlay effect` (vlmindex.bias) shown first, in this order; others follow.
_HEADLINE_FIGURES = ("delta_map", "delta_purity_at_k", "delta_p_at_1", "delta_knn_acc", "shift_cosine_mean",
                     "text_clustering_lift", "flip_rate", "written_vote_rate")


def _figure_order(fig: str) -> tuple[int, str]:
    return (_HEADLINE_FIGURES.index(fig) if fig in _HEADLINE_FIGURES else len(_HEADLINE_FIGURES), fig)


def _stored_effects(effects: list[dict[str, Any]], opts: ReportOptions) -> str:
    out = ["<p>Overlay-effect figures from table <code>overlay_effects</code> (<code>vlmindex overlay "
           "effect</code>; the newest of each figure). Charts show the headline figures: bars are the "
           "value with its confidence interval, the dashed mark the figure's baseline where it is on "
           "the same scale (a delta's baseline, the clean value, is in the table). Every figure is in "
           "the table below the charts; definitions in <code>vlmindex.bias</code>.</p>"]
    by_dataset: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for e in effects:
        fig = str(e.get("figure", e.get("metric", "effect")))
        by_dataset.setdefault(str(e.get("dataset")), {}).setdefault(fig, []).append(e)
    for ds, figures in by_dataset.items():
        out.append(f"<h3>{esc(ds)}</h3><div class='grid'>")
        table = ["<table class='effects'><thead><tr><th>figure</th><th>model</th><th>condition</th>"
                 "<th>value</th><th>CI</th><th>baseline</th><th>n</th><th>k</th><th>group excluded</th>"
                 "<th>note</th></tr></thead><tbody>"]
        charted = [f for f in figures if f in _HEADLINE_FIGURES] or list(figures)
        for fig in sorted(figures, key=_figure_order):
            rows = figures[fig]
            bars = []
            for e in rows:
                v, lo, hi, ref = (None if e.get(c) is None else float(e[c])
                                  for c in ("value", "ci_low", "ci_high", "baseline"))
                bars.append(Bar(f"{e.get('model')} · {e.get('condition')}", math.nan if v is None else v,
                                lo, hi, colour_key=str(e.get("condition")),
                                ref=None if fig.startswith("delta_") else ref))
                ci = (f"[{_num(e.get('ci_low'))}, {_num(e.get('ci_high'))}]"
                      if e.get("ci_low") is not None else "–")
                table.append(
                    f"<tr data-figure='{esc(fig)}'><td>{esc(fig)}</td><td>{esc(e.get('model'))}</td>"
                    f"<td>{esc(e.get('condition'))}</td>"
                    f"<td class='num' data-value='{esc(repr(e.get('value')))}'>{_num(e.get('value'))}</td>"
                    f"<td class='num'>{ci}</td><td class='num'>{_num(e.get('baseline'))}</td>"
                    f"<td class='num'>{_num(e.get('n'))}</td><td class='num'>{_num(e.get('k'))}</td>"
                    f"<td>{_num(e.get('exclude_group'))}</td>"
                    f"<td class='small'>{esc(e.get('note') or '')}</td></tr>")
            if fig in charted:
                out.append("<div class='panel'>" + bar_chart(bars, title=fig, width=560,
                                                             colour_title="condition") + "</div>")
        table.append("</tbody></table>")
        out.append("</div>")
        out.extend(table)
    return "".join(out)


def _ap_deltas(overlay_runs: list[dict[str, Any]], summaries: list[dict[str, Any]],
               per_query: dict[str, dict[str, np.ndarray]], opts: ReportOptions) -> str:
    """ΔAP (overlay − clean) per model, paired on the same images; used when no stored figures exist."""
    clean = {(s["model"], s["dataset"]): s for s in summaries if s["condition"] == "clean"}
    out = ["<p>No overlay-effect figures are stored (run <code>vlmindex overlay effect -m MODEL "
           "-d DATASET -c CONDITION</code> for embedding shift, text clustering and flip rates), so "
           "this section shows the change in per-query AP caused by each overlay: "
           "ΔAP = AP(overlaid) − AP(clean), paired on the same images, with a "
           f"{opts.confidence:.0%} group bootstrap interval and a Wilcoxon signed-rank p-value "
           "(Holm-corrected over the rows below). Negative: the text hurts retrieval. Positive with an "
           "overlay that writes the class name: the model reads the text, a shortcut, not the lesion.</p>"]
    rows, bars, skipped = [], [], []
    for s in overlay_runs:
        c = clean.get((s["model"], s["dataset"]))
        if c is None or c["analysis_id"] not in per_query or s["analysis_id"] not in per_query:
            skipped.append(f"{s['model']} on {s['dataset']}/{s['condition']}: no clean analysis to compare")
            continue
        if _protocol(c) != _protocol(s):
            skipped.append(f"{s['model']} on {s['dataset']}/{s['condition']}: clean analysis used other "
                           f"settings ({_protocol_text(c)} vs {_protocol_text(s)})")
            continue
        res = _paired(per_query[s["analysis_id"]], per_query[c["analysis_id"]], opts)
        rows.append((s, res))
    adj = holm([r.p_value for _, r in rows])
    table = ["<table class='effects'><thead><tr><th>dataset</th><th>condition</th><th>model</th>"
             "<th>mAP clean</th><th>mAP overlaid</th><th>ΔAP</th><th>95% CI</th><th>Holm p</th>"
             "<th>queries / groups</th></tr></thead><tbody>"]
    for (s, r), p in zip(rows, adj, strict=True):
        sig = math.isfinite(p) and p < opts.alpha
        bars.append(Bar(f"{s['model']} · {s['condition']}", r.mean_diff, r.ci_low, r.ci_high,
                        colour_key=s["condition"], note=_p_note(p, opts.alpha)))
        table.append(f"<tr class='{'sig' if sig else ''}'><td>{esc(s['dataset'])}</td>"
                     f"<td>{esc(s['condition'])}</td><td>{esc(s['model'])}</td>"
                     f"<td class='num'>{_num(r.mean_b)}</td>"
                     f"<td class='num'>{_num(r.mean_a)}</td><td class='num'>{r.mean_diff:+.4f}</td>"
                     f"<td class='num'>[{r.ci_low:+.4f}, {r.ci_high:+.4f}]</td><td class='num'>{_p(p)}</td>"
                     f"<td class='num'>{r.n_queries} / {r.n_units}</td></tr>")
    table.append("</tbody></table>")
    if bars:
        out.append("<div class='figure'>" + bar_chart(
            bars, title=f"ΔAP overlay − clean ({opts.confidence:.0%} CI; * Holm p < {opts.alpha:g})",
            axis_label="ΔAP", colour_title="condition", digits=4) + "</div>")
        out.extend(table)
    if skipped:
        out.append("<p class='note'>Not compared: " + "; ".join(esc(x) for x in skipped) + ".</p>")
    return "".join(out)


def _paired(qa: dict[str, np.ndarray], qb: dict[str, np.ndarray], opts: ReportOptions) -> PairedResult:
    """Paired AP comparison on the image ids both analyses share."""
    common, ia, ib = np.intersect1d(qa["image_id"], qb["image_id"], return_indices=True)
    return paired_comparison(qa["ap"][ia], qb["ap"][ib], qa["unit"][ia], n_boot=opts.n_boot,
                             seed=opts.seed, confidence=opts.confidence)


def _comparisons(summaries: list[dict[str, Any]], per_query: dict[str, dict[str, np.ndarray]],
                 opts: ReportOptions) -> str:
    out = [f"<p>Every pair of models on the same dataset, condition and protocol, on the queries both "
           f"analysed: mean difference of per-query AP (A − B, A the model with the higher mAP) with a "
           f"{opts.confidence:.0%} bootstrap interval that resamples whole groups "
           f"({opts.n_boot} replicates, seed {opts.seed}), and a two-sided Wilcoxon signed-rank test "
           "on per-group mean differences. p-values are Holm-corrected over all comparisons in this "
           f"report; a difference is called significant when the corrected p &lt; {opts.alpha:g}.</p>"]
    pairs: list[tuple[str, str, dict[str, Any], dict[str, Any], PairedResult]] = []
    lonely = []
    for (ds, cond), block in _blocks(summaries).items():
        by_protocol: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for s in block:
            if s["analysis_id"] in per_query:
                by_protocol.setdefault(_protocol(s), []).append(s)
        if all(len(v) < 2 for v in by_protocol.values()):
            lonely.append(f"{ds}/{cond}")
            continue
        for group in by_protocol.values():
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    a, b = group[i], group[j]  # block is sorted best mAP first
                    pairs.append((ds, cond, a, b, _paired(per_query[a["analysis_id"]],
                                                          per_query[b["analysis_id"]], opts)))
    if not pairs:
        out.append("<p class='note'>Nothing to compare: every dataset/condition has a single model "
                   "analysed.</p>")
        return "".join(out)
    adj = holm([r.p_value for *_, r in pairs])
    sentences, table, bars = [], [], []
    table.append("<table class='comparisons'><thead><tr><th>dataset</th><th>condition</th>"
                 "<th>A</th><th>B</th>"
                 "<th>mAP A</th><th>mAP B</th><th>A − B</th><th>95% CI</th><th>Wilcoxon p</th>"
                 "<th>Holm p</th><th>queries / groups</th><th>verdict</th></tr></thead><tbody>")
    n_sig = 0
    for (ds, cond, a, b, r), p in zip(pairs, adj, strict=True):
        sig = math.isfinite(p) and p < opts.alpha
        n_sig += sig
        verdict = "significant" if sig else "not significant"
        table.append(
            f"<tr class='{'sig' if sig else ''}' data-a='{esc(a['model'])}' data-b='{esc(b['model'])}' "
            f"data-holm-p='{esc(repr(float(p)))}'><td>{esc(ds)}</td><td>{esc(cond)}</td>"
            f"<td>{esc(a['model'])}</td><td>{esc(b['model'])}</td><td class='num'>{_num(r.mean_a)}</td>"
            f"<td class='num'>{_num(r.mean_b)}</td><td class='num'>{r.mean_diff:+.4f}</td>"
            f"<td class='num'>[{r.ci_low:+.4f}, {r.ci_high:+.4f}]</td><td class='num'>{_p(r.p_value)}</td>"
            f"<td class='num'>{_p(p)}</td><td class='num'>{r.n_queries} / {r.n_units}</td>"
            f"<td>{verdict}</td></tr>")
        bars.append(Bar(f"{a['model']} − {b['model']} · {cond}", r.mean_diff, r.ci_low, r.ci_high,
                        colour_key=cond, note=_p_note(p, opts.alpha)))
        if sig:
            sentences.append(
                f"<li class='sig'>On {esc(ds)}/{esc(cond)}, <b>{esc(a['model'])}</b> retrieves better than "
                f"<b>{esc(b['model'])}</b>: mean AP difference {r.mean_diff:+.4f} "
                f"({opts.confidence:.0%} CI {r.ci_low:+.4f} to {r.ci_high:+.4f}), Holm-corrected "
                f"p = {_p(p)}. <b>Significant.</b></li>")
        else:
            sentences.append(
                f"<li>On {esc(ds)}/{esc(cond)}, {esc(a['model'])} vs {esc(b['model'])}: mean AP "
                f"difference {r.mean_diff:+.4f} ({opts.confidence:.0%} CI {r.ci_low:+.4f} to "
                f"{r.ci_high:+.4f}), Holm-corrected p = {_p(p)}: not significant; these data do not "
                "tell the two apart.</li>")
    table.append("</tbody></table>")
    out.append(f"<p class='verdict'><b>{n_sig} of {len(pairs)}</b> paired difference(s) are significant "
               f"after Holm correction (α = {opts.alpha:g}).</p><ul class='sentences'>"
               + "".join(sentences) + "</ul>")
    out.append("<div class='figure'>" + bar_chart(
        bars, title=f"AP difference A − B ({opts.confidence:.0%} CI; * Holm p < {opts.alpha:g})",
        axis_label="mean AP difference", colour_title="condition", digits=4) + "</div>")
    out.extend(table)
    if lonely:
        out.append("<p class='note'>Single model (nothing to compare) on: "
                   + esc(", ".join(lonely)) + ".</p>")
    return "".join(out)


def _short_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(", ", ": "))


def _versions_text(v: dict[str, Any] | None) -> str:
    if not v:
        return "–"
    return " · ".join(f"{k} {val}" for k, val in v.items())


def _index_text(ws: Workspace, s: dict[str, Any]) -> str:
    """The index recorded at analysis time, else the one on disk now (built after the analysis)."""
    from vlmindex.index import IndexInfo

    idx = (s.get("provenance") or {}).get("index")
    if isinstance(idx, dict):
        return f"{idx.get('kind')} {_short_json(idx.get('params') or {})}"
    sidecar = ws.index_path(s["model"], s["dataset"], s["condition"]).with_suffix(".json")
    if sidecar.exists():
        info = IndexInfo.load(sidecar)
        if info is None:
            return f"unreadable sidecar {sidecar.name}"
        return (f"{info.kind} {_short_json(info.params)} ({info.count} vectors, built {info.built_at}, "
                "after this analysis)")
    return "none built"


def _provenance(ws: Workspace, summaries: list[dict[str, Any]]) -> str:
    out = ["<p>Where every number above comes from: one row per analysis (the id is "
           "<code>summaries.analysis_id</code> and <code>query_metrics.analysis_id</code>). "
           "Neighbours are exact brute-force cosine rankings, so an approximate index never changes "
           "a metric; the index kind is listed for completeness.</p>"
           "<table class='provenance'><thead><tr><th>analysis</th><th>model · dataset · condition</th>"
           "<th>settings</th><th>preprocessing</th><th>weights sha256</th><th>index</th>"
           "<th>embedding</th><th>library versions</th><th>analysed</th></tr></thead><tbody>"]
    for s in summaries:
        p = s.get("provenance") or {}
        index_text = _index_text(ws, s)
        sha = p.get("weights_sha256") or "–"
        settings = (f"k = {s['k']}; {_protocol_text(s)}; {s['n_queries']} queries "
                    f"({s['n_skipped_queries']} skipped, R = 0), gallery {s['n_gallery']}, "
                    f"{s['n_classes']} classes, dim {s['dim']}; "
                    f"probe: {s.get('probe_protocol') or 'not run'}")
        if p.get("images_without_embedding"):
            settings += f"; {p['images_without_embedding']} catalog images without embedding"
        embed = " · ".join(str(x) for x in (p.get("dtype"), p.get("device")) if x) or "–"
        versions = ("<b>embed:</b> " + esc(_versions_text(p.get("embed_versions")))
                    + "<br><b>analyze:</b> " + esc(_versions_text(p.get("analysis_versions"))))
        created = s.get("created_at")
        out.append(
            f"<tr id='{_anchor(s)}'><td><code>{esc(s['analysis_id'])}</code></td>"
            f"<td>{esc(s['model'])} · {esc(s['dataset'])} · {esc(s['condition'])}</td>"
            f"<td class='small'>{esc(settings)}</td>"
            f"<td class='small'><code>{esc(_short_json(p.get('preprocessing')))}</code></td>"
            f"<td class='small'><code title='{esc(sha)}'>{esc(sha[:16])}{'…' if len(sha) > 16 else ''}"
            f"</code></td><td class='small'>{esc(index_text)}</td><td class='small'>{esc(embed)}</td>"
            f"<td class='small'>{versions}</td>"
            f"<td class='small'>{esc(created.isoformat(sep=' ', timespec='seconds') if created else '–')}"
            f"<br>{_num(s.get('seconds'), 2)} s</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
:root{--ink:#1b1f24;--muted:#5b6470;--line:#d8dde3;--bg:#fff;--accent:#0b5cad;--sig:#e9f6ec}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:var(--ink);
background:var(--bg)}
header{padding:18px 28px 8px;border-bottom:1px solid var(--line)}
header h1{margin:0 0 4px;font-size:22px}
nav{position:sticky;top:0;background:#f6f8fa;border-bottom:1px solid var(--line);padding:6px 28px;z-index:2}
nav a{margin-right:16px;color:var(--accent);text-decoration:none;font-weight:500}
main{padding:0 28px 40px;max-width:1600px}
section{padding-top:10px;border-bottom:1px solid var(--line);padding-bottom:18px}
h2{font-size:19px;margin:18px 0 8px}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:var(--muted);font-weight:400;font-size:13px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 7px;vertical-align:top;text-align:left}
th{background:#f2f4f7;font-weight:600}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.best{font-weight:700}
td.small,.small{font-size:12px}
tr.sig{background:var(--sig)!important}
li.sig{background:var(--sig)}
code{font-size:12px;word-break:break-all}
.note{color:var(--muted);font-style:italic}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.panel{border:1px solid var(--line);padding:4px}
.figure{margin:8px 0;overflow-x:auto}
table.provenance td{max-width:340px}
a{color:var(--accent)}
"""


def build_report(ws: Workspace, options: ReportOptions | None = None,
                 notes: list[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The report's HTML and the summary rows it shows; raises when nothing has been analysed."""
    opts = options or ReportOptions()
    if opts.projection not in ("tsne", "pca"):
        raise VlmindexError(f"unknown projection {opts.projection!r}; choose tsne or pca")
    if opts.n_boot < 1:
        raise VlmindexError(f"bootstrap replicates must be at least 1, got {opts.n_boot}")
    notes = notes if notes is not None else []
    with ws.read() as con:
        summaries = latest_summaries(con, opts.dataset)
        if not summaries:
            have = results.analysed_datasets(con)
            if opts.dataset and have:
                raise VlmindexError(f"no analyses of dataset {opts.dataset!r} in {ws.root} "
                                    f"(analysed datasets: {', '.join(have)})")
            raise VlmindexError(f"no analyses in workspace {ws.root}; run `vlmindex analyze --model M "
                                "--dataset D` first")
        per_query = _per_query(con, [s["analysis_id"] for s in summaries])
        body = {
            "overview": _overview(ws, con, summaries, opts),
            "leaderboard": _leaderboard(summaries, per_query, opts),
            "per-class": _per_class(summaries, per_query),
            "overlay-effects": _overlay_section(con, summaries, per_query, opts),
            "comparisons": _comparisons(summaries, per_query, opts),
            "provenance": _provenance(ws, summaries),
        }
    body["projections"] = _projections(ws, summaries, per_query, opts, notes)
    title = "vlmindex report" + (f": {opts.dataset}" if opts.dataset else "")
    nav = "".join(f"<a href='#{sid}'>{esc(name)}</a>" for sid, name in SECTIONS)
    sections = "".join(f"<section id='{sid}'><h2>{esc(name)}</h2>{body[sid]}</section>"
                       for sid, name in SECTIONS)
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        # Nothing may be fetched: the report must open offline and must not leak patient data.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<meta name='generator' content='vlmindex {esc(__version__)}'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><div class='sub'>Which model gives the most discriminative "
        f"features? Workspace <code>{esc(ws.root)}</code></div></header><nav>{nav}</nav>"
        f"<main>{sections}</main></body></html>\n"
    )
    return page, summaries


def write_report(ws: Workspace, out: str | Path, options: ReportOptions | None = None) -> ReportResult:
    """Build the report and write it atomically to ``out``."""
    t0 = time.perf_counter()
    notes: list[str] = []
    page, summaries = build_report(ws, options, notes)
    path = Path(out).expanduser().resolve()
    if path.is_dir():
        raise VlmindexError(f"--out {out} is a directory; give a file name such as {path / 'report.html'}")
    data = page.encode("utf-8")
    atomic_write_bytes(path, data)
    return ReportResult(path=path, n_analyses=len(summaries),
                        datasets=sorted({s["dataset"] for s in summaries}), bytes=len(data),
                        seconds=time.perf_counter() - t0, notes=notes)
