"""vlmindex report: the HTML holds every section with the catalog's numbers, fetches nothing, and
renders in a real browser (headless Chromium) with every plot."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from vlmindex.analyze import is_current
from vlmindex.catalog import RunKey, results
from vlmindex.catalog.embeddings import read_run
from vlmindex.catalog.workspace import Workspace
from vlmindex.metrics import project_2d
from vlmindex.report import (
    SECTIONS,
    ReportOptions,
    bootstrap_mean_ci,
    build_report,
    collect,
    holm,
    paired_comparison,
    wilcoxon_p,
)
from vlmindex.report.data import analysis_options

SECTION_IDS = [sid for sid, _ in SECTIONS]
MODELS = ("raw-pixels", "color-hist")


def _cli(ws: Path, *args: object) -> None:
    from vlmindex.cli import main

    main(["-w", str(ws), *map(str, args)])  # raises SystemExit on any error


@pytest.fixture(scope="module")
def report_ws(synth_template, tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic set embedded by two offline models, clean and with the label burned in,
    analysed, and reported. Built once: every test below reads it."""
    root = tmp_path_factory.mktemp("report") / "ws"
    root.mkdir()
    shutil.copy(synth_template / "catalog.duckdb", root / "catalog.duckdb")
    _cli(root, "overlay", "add", "demo", "lbl", "--text", "label")
    for cond in ("clean", "lbl"):
        _cli(root, "embed", "-m", ",".join(MODELS), "-d", "demo", "-c", cond, "--workers", "0")
        _cli(root, "analyze", "-m", ",".join(MODELS), "-d", "demo", "-c", cond, "-k", "5", "--exclude-group")
    _cli(root, "index", "build", "-m", "raw-pixels", "-d", "demo")
    out = root.parent / "report.html"
    _cli(root, "report", "--out", out)
    return root, out


class _Dom(HTMLParser):
    """Just enough of the DOM: ids, plots, leaderboard cells and comparison rows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.plots: list[str] = []
        self.cells: list[dict[str, str]] = []  # leaderboard cells with data-col
        self.pairs: list[dict[str, object]] = []  # comparison rows: attrs + cell texts
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value) of src/href
        self._row: dict[str, str] = {}
        self._cell: dict[str, str] | None = None
        self._pair: dict[str, object] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            if key in a:
                self.refs.append((tag, key, a[key]))
        if tag == "svg" and "plot" in a.get("class", ""):
            self.plots.append(a.get("data-kind", ""))
        if tag == "tr":
            self._row = a
            self._pair = {"attrs": a, "cells": []} if "data-a" in a else None
        if tag == "td":
            self._text = []
            self._cell = dict(a, analysis=self._row.get("data-analysis", "")) if "data-col" in a else None

    def handle_data(self, data):
        self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td":
            text = "".join(self._text).strip()
            if self._cell is not None:
                self._cell["text"] = text
                self.cells.append(self._cell)
                self._cell = None
            if self._pair is not None:
                self._pair["cells"].append(text)
        if tag == "tr" and self._pair is not None:
            self.pairs.append(self._pair)
            self._pair = None


def _parse(html: str) -> _Dom:
    dom = _Dom()
    dom.feed(html)
    return dom


def test_report_has_every_section_with_the_catalogs_numbers(report_ws):
    root, out = report_ws
    html = out.read_text(encoding="utf-8")
    dom = _parse(html)
    for sid in SECTION_IDS:
        assert dom.ids.count(sid) == 1, f"section {sid!r} missing or duplicated"
    assert dom.plots.count("heatmap") == 2  # one per dataset/condition
    assert dom.plots.count("scatter") == 2  # one per model
    assert dom.plots.count("bars") >= 3  # mAP, overlay ΔAP, comparisons
    assert "no-overlay" not in dom.ids  # an overlay condition was analysed

    ws = Workspace(root)
    with ws.read() as con:
        rows = con.execute("SELECT analysis_id, model, condition, map_micro, purity_macro, p_at_1_micro, "
                           "silhouette, n_queries FROM summaries").fetchall()
    assert len(rows) == 4
    seen = 0
    for aid, model, cond, *vals in rows:
        for col, v in zip(("map_micro", "purity_macro", "p_at_1_micro", "silhouette", "n_queries"), vals,
                          strict=True):
            cell = [c for c in dom.cells if c["analysis"] == aid and c["data-col"] == col]
            assert len(cell) == 1, (model, cond, col)
            if col == "n_queries":
                assert cell[0]["text"] == str(v) == "72"
            else:
                assert float(cell[0]["data-value"]) == v
                assert cell[0]["text"] == f"{v:.4f}"
            seen += 1
        assert f"prov-{aid}" in dom.ids, "each analysis has a provenance row"
    assert seen == 20
    # Provenance names the preprocessing, index and versions that produced the numbers.
    prov = html[html.index("id='provenance'"):]
    assert "flat" in prov and "color-hist" in prov and "open_clip_torch" in prov
    assert "&quot;resize_mode&quot;" in prov  # preprocessing JSON, escaped


def test_paired_comparisons_match_an_independent_computation(report_ws):
    """A − B, its Wilcoxon p over per-lesion mean differences and the Holm step, recomputed from SQL."""
    root, out = report_ws
    dom = _parse(out.read_text(encoding="utf-8"))
    assert len(dom.pairs) == 2  # 2 models, on clean and on lbl
    with Workspace(root).read() as con:
        raw_p = []
        for pair in dom.pairs:
            cells = pair["cells"]
            cond, a, b = cells[1], cells[2], cells[3]
            diffs = con.execute(
                "SELECT i.group_id, qa.ap - qb.ap FROM query_metrics qa "
                "JOIN query_metrics qb USING (image_id, condition) JOIN images i USING (image_id) "
                "WHERE qa.model = ? AND qb.model = ? AND qa.condition = ? ORDER BY image_id",
                [a, b, cond]).fetchall()
            d = np.array([x[1] for x in diffs])
            assert cells[6] == f"{d.mean():+.4f}"
            by_group: dict[str, list[float]] = {}
            for g, x in diffs:
                by_group.setdefault(g, []).append(x)
            assert cells[10] == f"{len(d)} / {len(by_group)}" == "72 / 24"
            p = wilcoxon([np.mean(v) for v in by_group.values()]).pvalue
            assert cells[8] == f"{p:.4f}"
            raw_p.append(p)
            lo, hi = (float(x) for x in re.findall(r"[-+][0-9.]+", cells[7]))
            assert lo < d.mean() < hi
        lo_p, hi_p = sorted(raw_p)
        expected = {lo_p: min(1, 2 * lo_p), hi_p: min(1, max(2 * lo_p, hi_p))}
        for pair, p in zip(dom.pairs, raw_p, strict=True):
            assert float(pair["attrs"]["data-holm-p"]) == pytest.approx(expected[p])
            verdict = "significant" if expected[p] < 0.05 else "not significant"
            assert pair["cells"][11] == verdict


def test_overlay_section_shows_paired_ap_change(report_ws):
    root, out = report_ws
    html = out.read_text(encoding="utf-8")
    section = html[html.index("id='overlay-effects'"):html.index("id='comparisons'")]
    assert "data-kind=\"bars\"" in section
    with Workspace(root).read() as con:
        for model in MODELS:
            clean, lbl = (con.execute("SELECT avg(ap) FROM query_metrics WHERE model = ? AND condition = ?",
                                      [model, c]).fetchone()[0] for c in ("clean", "lbl"))
            assert f"<td>{model}</td><td class='num'>{clean:.4f}</td><td class='num'>{lbl:.4f}</td>" \
                   f"<td class='num'>{lbl - clean:+.4f}</td>" in section.replace("<td>lbl</td>", "")


def test_report_is_self_contained(report_ws):
    _, out = report_ws
    html = out.read_text(encoding="utf-8")
    dom = _parse(html)
    external = [r for r in dom.refs if not r[2].startswith("#")
                and not (r[0] == "img" and r[1] == "src" and r[2].startswith("data:image/png;base64,"))]
    assert external == [], f"external references: {external}"
    assert not re.search(r"@import|url\(|<script|<link|<iframe", html, re.I)
    # Only the SVG namespace URI may look like a URL; it is an identifier, never fetched.
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def _browser(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def test_report_renders_in_headless_chromium(report_ws, tmp_path, chromium):
    from PIL import Image

    _, out = report_ws
    exe = chromium
    url = out.resolve().as_uri()
    res = _browser(exe, tmp_path / "profile", "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = _parse(res.stdout)
    for sid in SECTION_IDS:
        assert sid in dom.ids, f"section {sid!r} not in the rendered page"
    assert dom.plots.count("heatmap") == 2 and dom.plots.count("scatter") == 2
    assert dom.plots.count("bars") >= 3
    assert res.stdout.count("<circle") > 100  # the projections' points survived rendering

    png = tmp_path / "report.png"
    res = _browser(exe, tmp_path / "profile", f"--screenshot={png}", "--window-size=1400,6000", url)
    assert res.returncode == 0 and png.exists(), res.stderr[-2000:]
    if os.environ.get("VLMINDEX_REPORT_SCREENSHOT"):  # to look at it: a person checks what a test cannot
        shutil.copy(png, os.environ["VLMINDEX_REPORT_SCREENSHOT"])
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (6000, 1400, 3)
    # Painted, not blank: the palette's first colour (bars, legend, points) shows up on screen.
    blue = np.all(np.abs(img.astype(int) - (0x00, 0x72, 0xB2)) < 12, axis=-1)
    assert blue.sum() > 500
    assert (img.min(axis=-1) < 100).mean() > 0.005  # text and plots, not an empty page


def test_report_with_stored_overlay_effects_and_hostile_names(report_ws, tmp_path):
    """Stored overlay figures become bars with CI whiskers; names from the catalog are escaped."""
    root, _ = report_ws
    ws = Workspace(tmp_path / "copy")
    ws.root.mkdir()
    shutil.copy(root / "catalog.duckdb", ws.catalog_path)
    evil = "<script>alert('x')</script>&"
    with ws.write() as con:
        con.execute("UPDATE summaries SET model = ? WHERE model = 'color-hist'", [evil])
        con.execute("UPDATE query_metrics SET model = ? WHERE model = 'color-hist'", [evil])
        con.execute("CREATE TABLE IF NOT EXISTS overlay_effects (model VARCHAR, dataset VARCHAR, "
                    "condition VARCHAR, figure VARCHAR, value DOUBLE, ci_low DOUBLE, ci_high DOUBLE, "
                    "n BIGINT)")
        cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'overlay_effects'").fetchall()}
        row = {"model": evil, "dataset": "demo", "condition": "lbl", "figure": "embedding shift",
               "value": 0.125, "ci_low": 0.1, "ci_high": 0.15, "n": 72, "k": 5, "exclude_group": True,
               "baseline": 0.5}
        row = {k: v for k, v in row.items() if k in cols}
        con.execute(f"INSERT INTO overlay_effects ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()))
    html, _ = build_report(ws, ReportOptions(max_points=0))
    assert "<script" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in html
    section = html[html.index("id='overlay-effects'"):html.index("id='comparisons'")]
    assert "embedding shift" in section and "data-kind=\"bars\"" in section
    assert 'class="whisker"' in section and 'class="ref"' in section and "0.1250" in section

    with ws.write() as con:  # no overlay analysed and no stored figures: a note, not an error
        con.execute("DELETE FROM overlay_effects")
        con.execute("DELETE FROM summaries WHERE condition <> 'clean'")
    html, _ = build_report(ws, ReportOptions(max_points=0))
    assert "id='no-overlay'" in html and "No overlay conditions analysed" in html


def test_report_errors_are_one_line(vlm, synth_ws, report_ws, tmp_path):
    res = vlm(synth_ws, "report", "--out", tmp_path / "r.html", expect=1)
    assert "no analyses in workspace" in res.err and "vlmindex analyze" in res.err
    assert not (tmp_path / "r.html").exists()
    root, _ = report_ws
    res = vlm(root, "report", "--dataset", "nope", "--out", tmp_path / "r.html", expect=1)
    assert "no analyses of dataset 'nope'" in res.err and "demo" in res.err


def test_report_cli_writes_file_and_prints_path(vlm, report_ws, tmp_path):
    root, _ = report_ws
    out = tmp_path / "sub" / "r.html"
    res = vlm(root, "report", "--out", out, "--dataset", "demo", "--projection", "pca", "--max-points", "40")
    assert f"wrote {out.resolve()}" in res.out and out.exists()
    assert "20 images × 2 condition(s), pca" in out.read_text(encoding="utf-8")


# -- the data step: typed ReportData, checked against the catalog ------------------------------------


def test_report_data_intervals_and_tables_match_the_stored_per_query_rows(report_ws):
    """Leaderboard intervals are the group bootstrap of the stored per-query AP; per-class purity
    is the stored mean per label; comparison p-values are Holm over the raw ones."""
    root, _ = report_ws
    ws = Workspace(root)
    opts = ReportOptions(max_points=0, n_boot=300, seed=3)
    data = collect(ws, opts)
    assert [(b.dataset, b.condition) for b in data.leaderboard] == [("demo", "clean"), ("demo", "lbl")]
    with ws.read() as con:
        for block in data.leaderboard:
            assert block.ks == [5] and {r.summary["model"] for r in block.rows} == set(MODELS)
            for row in block.rows:
                aid = row.summary["analysis_id"]
                ap, unit = zip(*con.execute(
                    "SELECT q.ap, coalesce(i.group_id, 'image:' || q.image_id::VARCHAR) FROM query_metrics q "
                    "LEFT JOIN images i USING (image_id) WHERE q.analysis_id = ? AND q.ap IS NOT NULL "
                    "ORDER BY q.image_id", [aid]).fetchall(), strict=True)
                ap = np.array(ap)
                q = data.per_query[aid]
                np.testing.assert_array_equal(q.ap[np.isfinite(q.ap)], ap)
                expected = bootstrap_mean_ci(ap, np.array(unit, dtype=object), n_boot=300, seed=3,
                                             confidence=0.95)
                assert row.map_ci == expected
                assert expected[0] <= row.summary["map_micro"] <= expected[1]
        for table in data.per_class:
            for model, values in zip(table.models, table.values, strict=True):
                stored = dict(con.execute(
                    "SELECT label, avg(purity_at_k) FROM query_metrics WHERE model = ? AND dataset = ? "
                    "AND condition = ? GROUP BY label", [model, table.dataset, table.condition]).fetchall())
                assert table.labels == sorted(stored)
                assert values == pytest.approx([stored[lab] for lab in table.labels])
    assert len(data.comparisons) == 2
    raw = [c.result.p_value for c in data.comparisons]
    assert [c.holm_p for c in data.comparisons] == pytest.approx(list(holm(raw)))
    for c in data.comparisons:
        assert c.a["map_micro"] >= c.b["map_micro"] and c.result.n_queries == 72
    assert data.overlay_effects == [] and data.has_overlay_runs
    assert sorted((d.overlay["model"], d.overlay["condition"]) for d in data.ap_deltas) == sorted(
        (m, "lbl") for m in MODELS)


def test_report_data_projection_panels_hold_the_current_embeddings(report_ws):
    """Each point of a panel carries the image, its condition, its label and the exact vector the
    catalog's reader returns for it now; the coordinates are the projection of those vectors."""
    root, _ = report_ws
    ws = Workspace(root)
    data = collect(ws, ReportOptions(projection="pca", max_points=40, n_boot=100))
    assert sorted((p.dataset, p.model) for p in data.projections) == sorted(("demo", m) for m in MODELS)
    with ws.read() as con:
        label_of = dict(con.execute("SELECT image_id, label FROM images").fetchall())
    for p in data.projections:
        n = len(p.image_ids)
        assert p.method == "pca" and p.run_conditions == ["clean", "lbl"] and n == 2 * p.n_images == 40
        assert p.vectors.dtype == np.float32 and p.vectors.shape[0] == n and p.coords.shape == (n, 2)
        assert len(p.conditions) == len(p.labels) == n
        assert p.labels == [label_of[int(i)] for i in p.image_ids]
        for cond in p.run_conditions:
            mask = np.array(p.conditions) == cond
            assert mask.sum() == p.n_images
            run = read_run(ws, RunKey(p.model, "demo", cond), ids=p.image_ids[mask])
            np.testing.assert_array_equal(run.ids, p.image_ids[mask])
            np.testing.assert_array_equal(p.vectors[mask], run.vectors)
        _, coords = project_2d(p.vectors, method="pca", seed=0, max_samples=n)
        np.testing.assert_allclose(p.coords, coords, atol=1e-6)


def test_stale_analyses_are_listed_after_their_embeddings_change(report_ws, tmp_path, vlm):
    """Other vectors imported for raw-pixels on demo/clean: that analysis, and only it, is stale (the
    verdict of analyze's own currency rule) and the overview says how to rerun it."""
    root, _ = report_ws
    copy = tmp_path / "ws"
    shutil.copytree(root, copy)
    ws = Workspace(copy)
    opts = ReportOptions(max_points=0, n_boot=100)
    data = collect(ws, opts)
    assert data.stale == [] and data.unchecked == []
    assert all(is_current(ws, s["model"], s["dataset"], s["condition"], analysis_options(s)) for s in data.summaries)
    assert "id='stale'" not in build_report(ws, opts)[0]

    vlm(copy, "embeddings", "export", "-m", "raw-pixels", "-d", "demo", tmp_path / "e.npy")
    vecs = np.load(tmp_path / "e.npy")
    np.save(tmp_path / "other.npy", np.ascontiguousarray(vecs[::-1]))  # every image gets another's vector
    vlm(copy, "embeddings", "import", tmp_path / "other.npy", "--ids", tmp_path / "e.npy.ids.txt",
        "-m", "raw-pixels", "-d", "demo")
    data = collect(ws, opts)
    (stale,) = data.stale
    assert (stale.model, stale.dataset, stale.condition) == ("raw-pixels", "demo", "clean")
    assert stale.stored_fingerprint is not None
    for s in data.summaries:
        current = is_current(ws, s["model"], s["dataset"], s["condition"], analysis_options(s))
        assert current == (s["analysis_id"] != stale.analysis_id)
    html, _ = build_report(ws, opts)
    overview = html[html.index("id='overview'"):html.index("id='leaderboard'")]
    note = re.search(r"<p class='note' id='stale'>.*?</p>", overview).group(0)
    assert "raw-pixels on demo/clean" in note
    assert "vlmindex analyze -m raw-pixels -d demo -c clean -k 5 --exclude-group" in note
    assert "lbl" not in note and "color-hist" not in note

    vlm(copy, *stale.rerun_command().split()[1:])  # the command the note names makes it current again
    assert collect(ws, opts).stale == []


# -- statistics, against hand-computed values and SciPy --------------------------------------------


def test_holm_matches_hand_computation():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.001]), [0.5, 0.002])
    adj = holm([0.02, math.nan, 0.9])
    assert math.isnan(adj[1]) and adj[0] == pytest.approx(0.04) and adj[2] == pytest.approx(0.9)
    assert holm([]).size == 0


def test_paired_comparison_groups_are_the_unit():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=60)
    b = a - 0.1 + rng.normal(scale=0.02, size=60)
    groups = np.repeat(np.arange(20), 3)
    res = paired_comparison(a, b, groups, n_boot=500, seed=0)
    assert res.n_queries == 60 and res.n_units == 20
    assert res.mean_diff == pytest.approx((a - b).mean())
    assert res.ci_low < res.mean_diff < res.ci_high and res.ci_low > 0.05
    unit = (a - b).reshape(20, 3).mean(axis=1)
    assert res.p_value == pytest.approx(wilcoxon(unit).pvalue)
    # Deterministic for a seed; NaN pairs dropped.
    assert paired_comparison(a, b, groups, n_boot=500, seed=0) == res
    a2 = a.copy()
    a2[0] = math.nan
    assert paired_comparison(a2, b, groups, n_boot=500).n_queries == 59
    assert wilcoxon_p(np.zeros(5)) == 1.0


def test_bootstrap_ci_resamples_groups():
    v = np.array([0.0] * 10 + [1.0] * 10)
    # Two groups of identical values: a group bootstrap can only draw means 0, 0.5 or 1.
    lo, hi = bootstrap_mean_ci(v, np.repeat([0, 1], 10), n_boot=2000, seed=0)
    assert (lo, hi) == (0.0, 1.0)
    lo_q, hi_q = bootstrap_mean_ci(v, None, n_boot=2000, seed=0)  # per value: much narrower
    assert 0.2 < lo_q < 0.5 < hi_q < 0.8
    assert bootstrap_mean_ci(np.array([0.3, 0.3]), ["g", "g"]) == (0.3, 0.3)
    assert all(math.isnan(x) for x in bootstrap_mean_ci(np.array([])))


def test_report_is_deterministic(report_ws):
    root, _ = report_ws
    opts = ReportOptions(max_points=60, n_boot=200)
    first, _ = build_report(Workspace(root), opts)
    second, _ = build_report(Workspace(root), opts)
    strip = re.compile(r"Report made [0-9T:-]+")
    assert strip.sub("", first) == strip.sub("", second)


def test_confused_queries_are_the_lowest_purity_with_their_stored_neighbours(report_ws):
    """Each model's strips: its 4 lowest purity@k queries (stored rows), each with the neighbour file's
    top-k, frames marked by whether the neighbour's catalog label is the query's."""
    root, out = report_ws
    html = out.read_text(encoding="utf-8")
    section = html[html.index("id='confused'"):html.index("id='overlay-effects'")]
    ws = Workspace(root)
    with ws.read() as con:
        from vlmindex.catalog import datasets as catalog_datasets

        labels = {r[0]: r[1] for r in catalog_datasets.images(con, "demo", columns=("image_id", "label"))}
        clean = [s for s in results.latest_summaries(con, "demo") if s["condition"] == "clean"
                 and s["modality"] is None]
        per_model = {s["model"]: results.query_metric_table(con, s["analysis_id"]).to_pylist() for s in clean}
    assert sorted(per_model) == sorted(MODELS)
    strips = [re.match(r" data-query='(\d+)' data-purity='([0-9.]+)'>(.*)", part, re.S).groups()
              for part in section.split("<div class='strip'")[1:]]
    assert len(strips) == 4 * len(MODELS)
    for m, model in enumerate(sorted(MODELS, key=lambda x: section.index(f"data-model='{x}'"))):
        rows = sorted(per_model[model], key=lambda r: (r["purity_at_k"], r["ap"], r["image_id"]))[:4]
        mine = strips[4 * m:4 * m + 4]
        assert [int(q) for q, _, _ in mine] == [r["image_id"] for r in rows]
        assert [float(p) for _, p, _ in mine] == [round(r["purity_at_k"], 4) for r in rows]
        key = RunKey(model, "demo", "clean")
        aid = next(s["analysis_id"] for s in clean if s["model"] == model)
        nb = results.read_neighbors(ws, key, aid).to_pylist()
        for q, _, body in mine:
            figs = re.findall(r"<figure class='(\w+)' data-image-id='(\d+)'><img src='data:image/png;base64,", body)
            assert figs[0] == ("query", q)
            want = [r["neighbor_id"] for r in nb if r["image_id"] == int(q)]
            assert [int(i) for _, i in figs[1:]] == want and len(want) == 5
            assert [c for c, _ in figs[1:]] == ["same" if labels[i] == labels[int(q)] else "other" for i in want]
