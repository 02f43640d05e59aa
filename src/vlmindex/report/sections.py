"""The report's rendering step: :func:`render` turns a :class:`~vlmindex.report.data.ReportData` into HTML.

Pure string building: no catalog, no statistics; every number comes from the data step. Sections,
each a ``<section id=...>`` (:data:`SECTIONS`): overview, leaderboard, per-class purity heatmaps,
2-D projections per model (clean and overlaid images together), each model's most confused queries
with their neighbours as thumbnail strips, overlay effects with confidence
intervals, paired comparisons between models on the same queries, duplicate image pairs (thumbnails
as PNG ``data:`` URIs) and the provenance of every number. Everything is inline (CSS from
``style.css`` in ``<style>``, plots as SVG from :mod:`vlmindex.report.plots`) and a
Content-Security-Policy forbids any fetch, so the file opens offline and cannot leak data. Every
value from the catalog goes through :func:`esc`.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources
from typing import Any

from vlmindex.report.data import (
    LEADERBOARD_COLUMNS,
    ApDelta,
    DatasetDuplicates,
    ProjectionPanel,
    ReportData,
    block_name,
    protocol_text,
    short_json,
)
from vlmindex.report.options import ReportOptions
from vlmindex.report.plots import Bar, Point, bar_chart, esc, heatmap, scatter

SECTIONS: tuple[tuple[str, str], ...] = (
    ("findings", "Findings"),
    ("overview", "Overview"),
    ("leaderboard", "Leaderboard"),
    ("per-class", "Per-class purity"),
    ("projections", "2-D projections"),
    ("confused", "Most confused queries"),
    ("overlay-effects", "Overlay effects"),
    ("comparisons", "Paired comparisons"),
    ("duplicates", "Duplicates and leakage"),
    ("provenance", "Provenance"),
)

# Figures of `vlmindex overlay effect` (vlmindex.bias) shown first, in this order; others follow.
_HEADLINE_FIGURES = ("attack_delta_map", "attack_success_rate", "attack_delta_knn_acc", "attack_map",
                     "delta_map", "delta_purity_at_k", "delta_p_at_1", "delta_knn_acc", "shift_cosine_mean",
                     "text_clustering_lift", "flip_rate", "written_vote_rate")


@cache
def stylesheet() -> str:
    """The page's CSS, a data file of this package (it ships in the wheel with the modules)."""
    return resources.files("vlmindex.report").joinpath("style.css").read_text(encoding="utf-8")


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


def _anchor(s: dict[str, Any]) -> str:
    return f"prov-{esc(s['analysis_id'])}"


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _stale_note(data: ReportData) -> str:
    if not data.stale:
        return ""
    items = []
    for a in data.stale:
        why = "" if a.stored_fingerprint else " (stored without an inputs fingerprint)"
        items.append(f"{esc(a.model)} on {esc(a.dataset)}/{esc(a.condition)} (k = {a.options.k}){why}: "
                     f"rerun <code>{esc(a.rerun_command())}</code>")
    n = len(data.stale)
    return (f"<p class='note' id='stale'><b>{n} stale analys{'es' if n != 1 else 'is'}</b>, computed before "
            "their embeddings or images changed; the numbers below describe the old inputs. "
            + "; ".join(items) + ".</p>")


def _overview(data: ReportData, opts: ReportOptions) -> str:
    rows = []
    for d in data.datasets:
        splits = ", ".join(f"{esc(k)} {v}" for k, v in d.splits.items())
        rows.append(f"<tr><td>{esc(d.name)}</td><td>{esc(d.format) if d.in_catalog else '–'}</td>"
                    f"<td class='num'>{_num(d.images)}</td>"
                    f"<td class='num'>{_num(d.n_classes)}</td>"
                    f"<td class='num'>{_num(d.groups)}</td><td>{esc(d.modality or '–')}</td>"
                    f"<td>{splits}</td><td>{esc(', '.join(d.conditions))}</td></tr>")
    best = [f"<li>{esc(block_name(b.dataset, b.modality, b.condition))}: <b>{esc(b.model)}</b> has the highest mAP, "
            f"{_num(b.map_micro)} over {_num(b.n_queries)} queries "
            f"(of {b.n_models} model{'s' if b.n_models != 1 else ''}).</li>" for b in data.glance]
    summaries = data.summaries
    return (
        "<p>Workspace <code>" + esc(data.workspace) + "</code>; "
        f"{len(summaries)} analyses (latest per model, dataset and condition) of "
        f"{len({s['model'] for s in summaries})} models on {len(data.datasets)} dataset(s). "
        f"Report made {esc(data.made_at.isoformat(timespec='seconds'))} by vlmindex {esc(data.version)} "
        f"(Python {esc(data.python)}); projections: {esc(opts.projection)}, at most "
        f"{opts.max_points} points per model; bootstrap: {opts.n_boot} replicates, seed {opts.seed}.</p>"
        + _stale_note(data) +
        "<table><thead><tr><th>dataset</th><th>format</th><th>images</th><th>classes</th><th>groups</th>"
        "<th>modalities</th><th>splits</th><th>analysed conditions</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
        "<h3>At a glance</h3><ul>" + "".join(best) + "</ul>"
    )


def _leaderboard(data: ReportData, opts: ReportOptions) -> str:
    out = ["<p>Latest analysis per model, dataset and condition, ranked by mAP; one table per dataset, "
           "modality (all modalities first, then each modality analysed alone) and condition. <i>micro</i> = mean "
           "over queries, <i>macro</i> = mean of the class means (hover a header for its definition). "
           "The best value of each column is bold. A model name links to the provenance of its row. "
           f"Bars: mAP with a {opts.confidence:.0%} bootstrap interval over groups (patients/lesions).</p>"]
    by_dataset: dict[tuple[str, str | None], list[Bar]] = {}
    for block in data.leaderboard:
        ds, mod, cond, best = block.dataset, block.modality, block.condition, block.best
        out.append(f"<h3>{esc(block_name(ds, mod, cond))} <span class='sub'>k = "
                   f"{esc(', '.join(map(str, block.ks)))}</span></h3>")
        head = "".join(f"<th title='{esc(tip)}'>{esc(h)}</th>" for _, h, _, tip in LEADERBOARD_COLUMNS)
        out.append("<table class='leaderboard' data-dataset='" + esc(ds) + "' data-condition='" + esc(cond)
                   + "' data-modality='" + esc(mod or "") + "'><thead><tr><th>#</th><th>model</th><th>k</th>" + head
                   + "<th>queries</th><th>protocol</th></tr></thead><tbody>")
        for rank, row in enumerate(block.rows, 1):
            s = row.summary
            cells = []
            for col, _, _, _ in LEADERBOARD_COLUMNS:
                v = s.get(col)
                bold = " best" if col in best and v == best[col] and len(block.rows) > 1 else ""
                cells.append(f"<td class='num{bold}' data-col='{col}' data-value='{esc(repr(v))}'>"
                             f"{_num(v)}</td>")
            out.append(f"<tr data-analysis='{esc(s['analysis_id'])}' data-model='{esc(s['model'])}'>"
                       f"<td>{rank}</td><td><a href='#{_anchor(s)}'>{esc(s['model'])}</a></td>"
                       f"<td class='num'>{_num(s['k'])}</td>" + "".join(cells)
                       + f"<td class='num' data-col='n_queries' data-value='{esc(s['n_queries'])}'>"
                       f"{_num(s['n_queries'])}</td><td class='small'>{esc(protocol_text(s))}</td></tr>")
        out.append("</tbody></table>")
        for row in block.rows:
            s = row.summary
            v = s["map_micro"] if s["map_micro"] is not None else math.nan
            lo, hi = row.map_ci
            by_dataset.setdefault((ds, mod), []).append(Bar(s["model"] + (" · " + cond), v, lo, hi, colour_key=cond))
    for (ds, mod), bars in by_dataset.items():
        name = ds + (f" · {mod}" if mod is not None else "")
        out.append("<div class='figure'>" + bar_chart(
            bars, title=f"{name}: mAP per model and condition ({opts.confidence:.0%} CI)", axis_label="mAP",
            colour_title="condition") + "</div>")
    return "".join(out)


def _per_class(data: ReportData) -> str:
    out = ["<p>Mean purity@k per class (rows: models, columns: classes; the number under a column is "
           "its query count). A dark column is a class every model confuses; a dark row, a model that "
           "separates nothing.</p>"]
    for t in data.per_class:
        title = (f"{block_name(t.dataset, t.modality, t.condition)}: purity@k per class "
                 f"(k = {', '.join(map(str, t.ks))})")
        out.append(f"<div class='figure' data-dataset='{esc(t.dataset)}' data-condition='{esc(t.condition)}' "
                   f"data-modality='{esc(t.modality or '')}'>"
                   + heatmap(t.models, t.labels, t.values, title=title,
                             col_notes=[f"n={n}" for n in t.counts]) + "</div>")
    return "".join(out)


def _projections(data: ReportData, opts: ReportOptions) -> str:
    if opts.max_points <= 0:
        return "<p class='note'>Projections left out (--max-points 0).</p>"
    out = [f"<p>Each panel projects one model's embeddings to 2-D ({esc(opts.projection)}; PCA for sets "
           "under 30 points). Colour is the class, marker shape the condition: the same sampled images "
           "appear once per condition, so overlaid images that drift from their clean copies show text "
           f"pulling the features. At most {opts.max_points} points per panel, sampled with seed "
           f"{opts.seed}.</p><div class='grid'>"]
    for p in data.projection_items:
        if not isinstance(p, ProjectionPanel):
            out.append(f"<div class='panel note'>{esc(p.model)} on {esc(p.dataset)}: fewer than 3 points to "
                       "project.</div>")
            continue
        pts = [Point(float(p.coords[j, 0]), float(p.coords[j, 1]), p.labels[j], p.conditions[j],
                     f"{p.labels[j]} · {p.conditions[j]} · image {int(p.image_ids[j])}")
               for j in range(len(p.image_ids))]
        caption = f"{p.n_images} images × {len(p.run_conditions)} condition(s), {p.method}"
        where = p.dataset + (f" · {p.modality}" if p.modality else "")
        out.append(f"<div class='panel' data-dataset='{esc(p.dataset)}' data-model='{esc(p.model)}'>"
                   + scatter(pts, title=f"{p.model} on {where}", caption=caption) + "</div>")
    out.append("</div>")
    return "".join(out)


def _overlay_section(data: ReportData, opts: ReportOptions) -> str:
    if data.overlay_effects:
        return _stored_effects(data.overlay_effects)
    if not data.has_overlay_runs:
        return ("<p class='note' id='no-overlay'>No overlay conditions analysed. Add one with "
                "<code>vlmindex overlay add DATASET NAME --text label</code>, then embed and analyze "
                "with <code>-c NAME</code>.</p>")
    return _ap_deltas(data.ap_deltas, data.ap_delta_skipped, opts)


def _figure_order(fig: str) -> tuple[int, str]:
    return (_HEADLINE_FIGURES.index(fig) if fig in _HEADLINE_FIGURES else len(_HEADLINE_FIGURES), fig)


def _stored_effects(effects: list[dict[str, Any]]) -> str:
    out = ["<p>Overlay-effect figures from table <code>overlay_effects</code> (<code>vlmindex overlay "
           "effect</code>; the newest of each figure). The <b>attack</b> figures come first: overlaid "
           "queries ranked against the <i>clean</i> gallery, read against the clean queries on the same "
           "gallery; <code>attack_success_rate</code> is the share of queries whose kNN vote follows the "
           "written class name (baseline: the clean votes; see also <code>attack_success_chance</code>). "
           "The <code>delta_*</code> figures are within-condition (overlaid queries against an overlaid "
           "gallery) and mix reading the text with the text carrying the class. Charts show the headline "
           "figures: bars are the value with its confidence interval, the dashed mark the figure's "
           "baseline where it is on the same scale (a delta's baseline, the clean value, is in the "
           "table). Every figure is in the table below the charts; definitions in "
           "<code>vlmindex.bias</code> and docs/overlays.md.</p>"]
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
                                ref=None if "delta_" in fig else ref))
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


def _ap_deltas(deltas: list[ApDelta], skipped: list[str], opts: ReportOptions) -> str:
    """ΔAP (overlay − clean) per model, paired on the same images; shown when no stored figures exist."""
    out = ["<p>No overlay-effect figures are stored (run <code>vlmindex overlay effect -m MODEL "
           "-d DATASET -c CONDITION</code> for embedding shift, text clustering and flip rates), so "
           "this section shows the change in per-query AP caused by each overlay: "
           "ΔAP = AP(overlaid) − AP(clean), paired on the same images, with a "
           f"{opts.confidence:.0%} group bootstrap interval and a Wilcoxon signed-rank p-value "
           "(Holm-corrected over the rows below). Negative: the text hurts retrieval. Positive with an "
           "overlay that writes the class name: the model reads the text, a shortcut, not the lesion.</p>"]
    bars = []
    table = ["<table class='effects'><thead><tr><th>dataset</th><th>condition</th><th>model</th>"
             "<th>mAP clean</th><th>mAP overlaid</th><th>ΔAP</th><th>95% CI</th><th>Holm p</th>"
             "<th>queries / groups</th></tr></thead><tbody>"]
    for d in deltas:
        s, r, p = d.overlay, d.result, d.holm_p
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


def _comparisons(data: ReportData, opts: ReportOptions) -> str:
    out = [f"<p>Every pair of models on the same dataset, condition and protocol, on the queries both "
           f"analysed: mean difference of per-query AP (A − B, A the model with the higher mAP) with a "
           f"{opts.confidence:.0%} bootstrap interval that resamples whole groups "
           f"({opts.n_boot} replicates, seed {opts.seed}), and a two-sided Wilcoxon signed-rank test "
           "on per-group mean differences. p-values are Holm-corrected over all comparisons in this "
           f"report; a difference is called significant when the corrected p &lt; {opts.alpha:g}.</p>"]
    if not data.comparisons:
        out.append("<p class='note'>Nothing to compare: every dataset/condition has a single model "
                   "analysed.</p>")
        return "".join(out)
    sentences, table, bars = [], [], []
    table.append("<table class='comparisons'><thead><tr><th>dataset</th><th>condition</th>"
                 "<th>A</th><th>B</th>"
                 "<th>mAP A</th><th>mAP B</th><th>A − B</th><th>95% CI</th><th>Wilcoxon p</th>"
                 "<th>Holm p</th><th>queries / groups</th><th>verdict</th></tr></thead><tbody>")
    n_sig = 0
    for c in data.comparisons:
        ds, cond, a, b, r, p = c.dataset, c.condition, c.a, c.b, c.result, c.holm_p
        mod = a.get("modality")
        where = block_name(ds, mod, cond).replace(" / ", "/")
        sig = math.isfinite(p) and p < opts.alpha
        n_sig += sig
        verdict = "significant" if sig else "not significant"
        table.append(
            f"<tr class='{'sig' if sig else ''}' data-a='{esc(a['model'])}' data-b='{esc(b['model'])}' "
            f"data-holm-p='{esc(repr(float(p)))}'><td>{esc(ds + (' · ' + mod if mod else ''))}</td><td>{esc(cond)}</td>"
            f"<td>{esc(a['model'])}</td><td>{esc(b['model'])}</td><td class='num'>{_num(r.mean_a)}</td>"
            f"<td class='num'>{_num(r.mean_b)}</td><td class='num'>{r.mean_diff:+.4f}</td>"
            f"<td class='num'>[{r.ci_low:+.4f}, {r.ci_high:+.4f}]</td><td class='num'>{_p(r.p_value)}</td>"
            f"<td class='num'>{_p(p)}</td><td class='num'>{r.n_queries} / {r.n_units}</td>"
            f"<td>{verdict}</td></tr>")
        bars.append(Bar(f"{a['model']} − {b['model']} · {cond}" + (f" · {mod}" if mod else ""), r.mean_diff,
                        r.ci_low, r.ci_high, colour_key=cond, note=_p_note(p, opts.alpha)))
        if sig:
            sentences.append(
                f"<li class='sig'>On {esc(where)}, <b>{esc(a['model'])}</b> retrieves better than "
                f"<b>{esc(b['model'])}</b>: mean AP difference {r.mean_diff:+.4f} "
                f"({opts.confidence:.0%} CI {r.ci_low:+.4f} to {r.ci_high:+.4f}), Holm-corrected "
                f"p = {_p(p)}. <b>Significant.</b></li>")
        else:
            sentences.append(
                f"<li>On {esc(where)}, {esc(a['model'])} vs {esc(b['model'])}: mean AP "
                f"difference {r.mean_diff:+.4f} ({opts.confidence:.0%} CI {r.ci_low:+.4f} to "
                f"{r.ci_high:+.4f}), Holm-corrected p = {_p(p)}: not significant; these data do not "
                "tell the two apart.</li>")
    table.append("</tbody></table>")
    out.append(f"<p class='verdict'><b>{n_sig} of {len(data.comparisons)}</b> paired difference(s) are "
               f"significant after Holm correction (α = {opts.alpha:g}).</p><ul class='sentences'>"
               + "".join(sentences) + "</ul>")
    out.append("<div class='figure'>" + bar_chart(
        bars, title=f"AP difference A − B ({opts.confidence:.0%} CI; * Holm p < {opts.alpha:g})",
        axis_label="mean AP difference", colour_title="condition", digits=4) + "</div>")
    out.extend(table)
    if data.single_model:
        out.append("<p class='note'>Single model (nothing to compare) on: "
                   + esc(", ".join(data.single_model)) + ".</p>")
    return "".join(out)


def _no_duplicates_note(dataset: str) -> str:
    return (f"<p class='note' data-dataset='{esc(dataset)}'>{esc(dataset)}: no duplicate pairs stored; find "
            f"them with <code>vlmindex duplicates {esc(dataset)} -m MODEL</code> (exact duplicates only without "
            "<code>-m</code>).</p>")


def _dataset_duplicates(d: DatasetDuplicates) -> str:
    out = [f"<h3>{esc(d.dataset)} <span class='sub'>{d.n_total} stored pair(s)</span></h3>",
           "<table class='duplicates' data-dataset='" + esc(d.dataset) + "'><thead><tr><th>kind</th><th>model</th>"
           "<th>threshold</th><th>pairs</th><th>cross-split</th><th>different labels</th></tr></thead><tbody>"]
    for c in d.counts:
        out.append(f"<tr data-kind='{esc(c['kind'])}'><td>{esc(c['kind'])}</td><td>{esc(c['model'] or '–')}</td>"
                   f"<td class='num'>{_num(c['threshold'], 3)}</td><td class='num'>{_num(c['pairs'])}</td>"
                   f"<td class='num'>{_num(c['cross_split'])}</td><td class='num'>{_num(c['label_mismatch'])}</td>"
                   "</tr>")
    out.append("</tbody></table>")
    stale = [s for s in d.searches if not s["current"]]
    if stale:
        what = "; ".join("exact" if s["kind"] == "exact" else f"near {s['model']}/{s['condition']}" for s in stale)
        out.append(f"<p class='note'>Stale search(es), made before the images or embeddings changed: {esc(what)}; "
                   f"rerun <code>vlmindex duplicates {esc(d.dataset)}</code> (with <code>-m</code> for near "
                   "pairs).</p>")
    out.append(f"<p>Top {len(d.pairs)} pair(s), pairs across splits first, then by score:</p><div class='grid'>")
    for p in d.pairs:
        imgs = "".join(f"<img src='{esc(t)}' alt='image {i}'>" if t else f"<span class='gap' title='image {i}: file "
                       "not readable'></span>" for t, i in zip(p.thumbnails, p.image_ids, strict=True))
        lab = esc(p.labels[0]) if p.same_label else f"<b>{esc(p.labels[0])} ≠ {esc(p.labels[1])}</b>"
        split = (esc(p.splits[0]) if p.same_split else f"<b>{esc(p.splits[0])} / {esc(p.splits[1])}</b>")
        score = f"cosine {p.score:.4f} ({esc(p.model)})" if p.kind == "near" else esc(p.kind)
        out.append(f"<div class='dup{'' if p.same_split else ' cross'}' data-a='{p.image_ids[0]}' "
                   f"data-b='{p.image_ids[1]}'>{imgs}<br>{lab}<br>{split}<br>{score}</div>")
    out.append("</div>")
    return "".join(out)


def _duplicates(data: ReportData) -> str:
    out = ["<p>Image pairs of table <code>duplicates</code> (<code>vlmindex duplicates</code>): identical files, "
           "identical decoded pixels, and near duplicates (cosine of one model's embeddings at or above the "
           "search's threshold). A pair across splits leaks a test image into the gallery; a pair with different "
           "labels is label noise. <code>vlmindex analyze --exclude-duplicates</code> leaves each query's "
           "duplicate cluster out of its ranking.</p>"]
    found = {d.dataset: d for d in data.duplicates}
    for ds in [d.name for d in data.datasets]:
        out.append(_dataset_duplicates(found[ds]) if ds in found else _no_duplicates_note(ds))
    return "".join(out)


def _confused(data: ReportData) -> str:
    if not data.confused:
        return ("<p class='note'>No clean analysis over all modalities with a neighbour file: run "
                "<code>vlmindex analyze</code> on the clean condition to see the queries models confuse.</p>")
    out = ["<p>For each model, the queries of lowest purity@k in its clean analysis, each followed by its "
           "top-k neighbours as the analysis ranked them (its exclusions applied). A green frame: same class as "
           "the query; red: another class.</p>"]
    for c in data.confused:
        out.append(f"<h3 data-model='{esc(c.model)}'>{esc(c.model)} <span class='sub'>{esc(c.dataset)} · "
                   f"{esc(c.scope)}</span></h3>")
        for q in c.queries:
            cells = [_thumb(q.thumbnail, q.image_id, f"query · {q.label}", "query")]
            cells += [_thumb(n.thumbnail, n.image_id, f"{n.label} · {n.score:.3f}", "same" if n.same_class else
                             "other") for n in q.neighbours]
            out.append(f"<div class='strip' data-query='{q.image_id}' data-purity='{q.purity:.4f}'>"
                       f"<div class='why'>purity@k {q.purity:.2f}</div>{''.join(cells)}</div>")
    return "".join(out)


def _thumb(uri: str | None, image_id: int, caption: str, kind: str) -> str:
    pic = (f"<img src='{esc(uri)}' alt='image {image_id}'>" if uri else
           f"<span class='gap' title='image {image_id}: file not readable'></span>")
    return f"<figure class='{kind}' data-image-id='{image_id}'>{pic}<figcaption>{esc(caption)}</figcaption></figure>"


def _versions_text(v: dict[str, Any] | None) -> str:
    if not v:
        return "–"
    return " · ".join(f"{k} {val}" for k, val in v.items())


def _provenance(data: ReportData) -> str:
    out = ["<p>Where every number above comes from: one row per analysis (the id is "
           "<code>summaries.analysis_id</code> and <code>query_metrics.analysis_id</code>). "
           "Neighbours are exact brute-force cosine rankings, so an approximate index never changes "
           "a metric; the index kind is listed for completeness.</p>"
           "<table class='provenance'><thead><tr><th>analysis</th><th>model · dataset · condition</th>"
           "<th>settings</th><th>preprocessing</th><th>weights sha256</th><th>index</th>"
           "<th>embedding</th><th>library versions</th><th>analysed</th></tr></thead><tbody>"]
    for row in data.provenance:
        s = row.summary
        p = s.get("provenance") or {}
        sha = p.get("weights_sha256") or "–"
        settings = (f"k = {s['k']}; {protocol_text(s)}; {s['n_queries']} queries "
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
            f"<td class='small'><code>{esc(short_json(p.get('preprocessing')))}</code></td>"
            f"<td class='small'><code title='{esc(sha)}'>{esc(sha[:16])}{'…' if len(sha) > 16 else ''}"
            f"</code></td><td class='small'>{esc(row.index)}</td><td class='small'>{esc(embed)}</td>"
            f"<td class='small'>{versions}</td>"
            f"<td class='small'>{esc(created.isoformat(sep=' ', timespec='seconds') if created else '–')}"
            f"<br>{_num(s.get('seconds'), 2)} s</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------


def _findings(data: ReportData) -> str:
    """The study's claims tested on these analyses (:mod:`vlmindex.findings`), verdict first."""
    if not data.findings:
        return "<p>No analysis to test the study's findings on.</p>"
    out = ["<p>The study's three claims, tested on this workspace's analyses with paired statistics over "
           "identical queries (group-bootstrap 95% intervals, Holm within each finding; <code>vlmindex "
           "findings</code>, table <code>findings</code>). Δ = a − b.</p>"]
    for f in data.findings:
        where = f.dataset + (f" · {f.modality}" if f.modality else "") + f" / {f.condition}"
        out.append(f"<div class='finding' data-finding='{f.finding}' data-verdict='{esc(f.verdict)}'>"
                   f"<h3>({f.finding}) {esc(f.claim)}: <b>{esc(f.verdict)}</b> <span class='sub'>{esc(where)}"
                   f"{' · ' + esc(f.scope) if f.scope else ''}</span></h3><p class='small'>{esc(f.reason)}</p>")
        if f.comparisons:
            out.append("<table><tr><th>comparison</th><th>metric</th><th>a</th><th>b</th><th>Δ</th>"
                       "<th>95% CI</th><th>p (Holm)</th><th>verdict</th></tr>")
            for c in f.comparisons:
                ci = "–" if c.ci_low is None else f"[{_num(c.ci_low)}, {_num(c.ci_high)}]"
                out.append(f"<tr><td>{esc(c.comparison)}</td><td>{esc(c.metric)}</td><td>{_num(c.value_a)}</td>"
                           f"<td>{_num(c.value_b)}</td><td>{_num(c.delta)}</td><td>{ci}</td>"
                           f"<td>{_num(c.p_holm, 3)}</td><td>{esc(c.verdict or 'shown, not tested')}</td></tr>")
            out.append("</table>")
        out.append("</div>")
    return "".join(out)


def render(data: ReportData, options: ReportOptions | None = None) -> str:
    """The whole HTML page of ``data``; ``options`` must be the ones ``data`` was collected with."""
    opts = options or ReportOptions()
    body = {
        "findings": _findings(data),
        "overview": _overview(data, opts),
        "leaderboard": _leaderboard(data, opts),
        "per-class": _per_class(data),
        "projections": _projections(data, opts),
        "confused": _confused(data),
        "overlay-effects": _overlay_section(data, opts),
        "comparisons": _comparisons(data, opts),
        "duplicates": _duplicates(data),
        "provenance": _provenance(data),
    }
    title = "vlmindex report" + (f": {opts.dataset}" if opts.dataset else "")
    nav = "".join(f"<a href='#{sid}'>{esc(name)}</a>" for sid, name in SECTIONS)
    sections = "".join(f"<section id='{sid}'><h2>{esc(name)}</h2>{body[sid]}</section>"
                       for sid, name in SECTIONS)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        # Nothing may be fetched: the report must open offline and must not leak patient data.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<meta name='generator' content='vlmindex {esc(data.version)}'>"
        f"<title>{esc(title)}</title><style>{stylesheet()}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><div class='sub'>Which model gives the most discriminative "
        f"features? Workspace <code>{esc(data.workspace)}</code></div></header><nav>{nav}</nav>"
        f"<main>{sections}</main></body></html>\n"
    )
