"""`vlmindex findings`: the study's claims tested on planted effects, and its intervals against a plain loop."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmindex.catalog import Workspace
from vlmindex.overlay import get_condition, overlay_text_for

K = ("-k", "5", "--exclude-group")


def _images(ws: Workspace) -> tuple[list[tuple], dict[str, list[str]], list[str]]:
    with ws.read() as con:
        rows = con.execute("SELECT image_id, label, modality FROM images WHERE dataset = 'demo' "
                           "ORDER BY image_id").fetchall()
    classes = sorted({r[1] for r in rows})
    pools = {m: sorted({r[1] for r in rows if r[2] == m}) for m in {r[2] for r in rows}}
    return rows, pools, classes


def _plant(vlm, root, tmp_path, model: str, family: str, separation: float, seed: int, *,
           condition: str = "clean", pull: float = 0.0, jitter: int | None = None) -> None:
    """Import class-structured vectors: separation x the class's axis plus unit noise (16-d, from
    ``seed``; with ``jitter``, plus 0.05 x noise of that seed: models that differ by almost nothing);
    under an overlay condition the written class's axis is added ``pull`` times (reading the text)."""
    ws = Workspace(root)
    rows, pools, classes = _images(ws)
    with ws.read() as con:
        recipe = get_condition(con, "demo", condition)
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((len(rows), 16)).astype(np.float32)
    if jitter is not None:
        vecs += 0.05 * np.random.default_rng(jitter).standard_normal(vecs.shape).astype(np.float32)
    for i, (image_id, label, modality) in enumerate(rows):
        vecs[i, classes.index(label)] += separation
        if recipe is not None:
            written = overlay_text_for(recipe, image_id=image_id, label=label, class_names=pools[modality])
            vecs[i, classes.index(written)] += pull
    f = tmp_path / f"{model}-{condition}.parquet"
    pq.write_table(pa.table({"image_id": pa.array([r[0] for r in rows], pa.int64()),
                             "embedding": pa.array(list(vecs), pa.list_(pa.float32()))}), f)
    vlm(root, "embeddings", "import", f, "-m", model, "-d", "demo", "-c", condition, "--family", family)


def _findings(vlm, root, *args) -> list[dict]:
    return json.loads(vlm(root, "findings", "--bootstrap", "500", *args, "--format", "json").out)


def _verdict(rows: list[dict], finding: int, modality=None) -> str:
    verdicts = {r["finding_verdict"] for r in rows if r["finding"] == finding and r["modality"] == modality}
    assert len(verdicts) == 1, rows
    return verdicts.pop()


@pytest.mark.parametrize(("medical", "floor", "equal", "expect"), [
    (3.0, 0.3, False, "supported"),    # medical clearly above the floor
    # equal families: the same features. A paired test over queries decides any consistent
    # difference however small (two independent draws of noise differ on these 72 queries), so
    # "equal" has to mean equal
    (1.0, 1.0, True, "not decided"),
    (0.3, 3.0, False, "contradicted"),  # the floor above the medical models
])
def test_finding_1_follows_the_planted_separation(vlm, synth_ws, tmp_path, medical, floor, equal, expect):
    def seed(s):
        return {"seed": 1} if equal else {"seed": s}

    _plant(vlm, synth_ws, tmp_path, "med-a", "medical", medical, **seed(1))
    _plant(vlm, synth_ws, tmp_path, "med-b", "medical", medical, **seed(2))
    _plant(vlm, synth_ws, tmp_path, "floor-a", "baseline", floor, **seed(3))
    _plant(vlm, synth_ws, tmp_path, "floor-b", "baseline", floor * 0.5, **seed(4))
    vlm(synth_ws, "analyze", "-m", "med-a,med-b,floor-a,floor-b", "-d", "demo", *K, "--no-probe")
    rows = _findings(vlm, synth_ws)
    assert _verdict(rows, 1) == expect, [(r["a"], r["b"], r["metric"], r["delta"], r["p_holm"]) for r in rows]
    tested = [r for r in rows if r["finding"] == 1]
    # every medical model against the best baseline, on both metrics, Holm over the four
    assert {(r["a"], r["b"], r["metric"]) for r in tested} == {
        (m, "floor-a", x) for m in ("med-a", "med-b") for x in ("map_micro", "knn_acc_macro")}
    assert all(r["p_holm"] >= r["p_value"] for r in tested)
    if expect != "not decided":
        assert all(r["verdict"] == expect for r in tested if r["metric"] == "map_micro")
    else:
        assert all(r["ci_low"] <= 0 <= r["ci_high"] or r["verdict"] == "not decided" for r in tested)
    # finding 2 needs an LLM-enhanced model: not testable, and it says why
    (f2,) = [r for r in rows if r["finding"] == 2]
    assert f2["finding_verdict"] == "not testable" and "'llm-enhanced'" in f2["finding_reason"]
    # the stored table holds the same verdicts, with the analyses they came from
    stored = json.loads(vlm(synth_ws, "sql", "findings", "--format", "json").out)
    assert {(r["finding"], r["finding_verdict"]) for r in stored} >= {(1, expect), (2, "not testable")}
    assert all(r["current"] for r in stored)


def test_finding_2_best_against_best_and_family_means(vlm, synth_ws, tmp_path):
    _plant(vlm, synth_ws, tmp_path, "llm-a", "llm-enhanced", 3.0, seed=5)
    _plant(vlm, synth_ws, tmp_path, "med-a", "medical", 0.5, seed=6)
    _plant(vlm, synth_ws, tmp_path, "med-b", "medical", 0.8, seed=7)
    vlm(synth_ws, "analyze", "-m", "llm-a,med-a,med-b", "-d", "demo", *K, "--no-probe")
    rows = [r for r in _findings(vlm, synth_ws) if r["finding"] == 2]
    assert _verdict(rows, 2) == "supported"
    with Workspace(synth_ws).read() as con:
        (best,) = con.execute("SELECT arg_max(model, map_micro) FROM latest_summaries WHERE model LIKE 'med-%'"
                              ).fetchone()
    tested = {(r["a"], r["b"], r["metric"]): r for r in rows if r["verdict"] is not None}
    assert set(tested) == {("llm-a", best, "map_micro"), ("llm-a", best, "knn_acc_macro"),
                           ("family:llm-enhanced", "family:medical", "map_micro"),
                           ("family:llm-enhanced", "family:medical", "knn_acc_macro")}
    shown = {r["metric"] for r in rows if r["verdict"] is None}
    assert shown == {"silhouette", "fisher_ratio"}
    with Workspace(synth_ws).read() as con:
        sil = dict(con.execute("SELECT model, silhouette FROM latest_summaries").fetchall())
    (side,) = [r for r in rows if r["metric"] == "silhouette" and r["a"] == "llm-a"]
    assert side["value_a"] == pytest.approx(sil["llm-a"]) and side["value_b"] == pytest.approx(sil[best])


@pytest.mark.parametrize(("llm_pull", "medical_pull", "expect"), [
    (0.1, 3.0, "contradicted"),   # the LLM-enhanced family is pulled less than the medical one
    (3.0, 0.1, "supported"),      # the general side follows the written word
])
def test_finding_3_compares_the_family_means_of_the_attack_figures(vlm, synth_ws, tmp_path, llm_pull,
                                                                  medical_pull, expect):
    vlm(synth_ws, "overlay", "add", "demo", "wrong", "--text", "wrong-label")
    for model, family, seed, pull in (("llm-a", "llm-enhanced", 8, llm_pull), ("med-a", "medical", 9, medical_pull),
                                      ("med-b", "medical", 10, medical_pull)):
        for cond in ("clean", "wrong"):
            _plant(vlm, synth_ws, tmp_path, model, family, 2.0, seed, condition=cond, pull=pull)
    vlm(synth_ws, "overlay", "effect", "-m", "llm-a,med-a,med-b", "-d", "demo", "-c", "wrong", *K,
        "--n-boot", "100")
    rows = [r for r in _findings(vlm, synth_ws) if r["finding"] == 3]
    assert {r["condition"] for r in rows} == {"wrong"}
    assert _verdict(rows, 3) == expect, rows[0]["finding_reason"]
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"attack_delta_map", "attack_success_rate"}
    assert by_metric["attack_delta_map"]["expected"] == "a < b"
    assert by_metric["attack_success_rate"]["expected"] == "a > b"
    # the family means are means of the stored per-query attack rows, whose means are the stored figures
    with Workspace(synth_ws).read() as con:
        fig = dict(con.execute("SELECT model, value FROM overlay_effects WHERE figure = 'attack_delta_map'").fetchall())
        per_query = dict(con.execute("SELECT model, avg(ap_attack - ap_clean) FROM attack_queries "
                                     "GROUP BY model").fetchall())
    for m in fig:
        assert per_query[m] == pytest.approx(fig[m], abs=1e-12)
    d = by_metric["attack_delta_map"]
    assert d["value_a"] == pytest.approx(fig["llm-a"], abs=1e-12)
    assert d["value_b"] == pytest.approx((fig["med-a"] + fig["med-b"]) / 2, abs=1e-12)


def test_intervals_and_p_values_equal_a_plain_bootstrap_loop(vlm, synth_ws, tmp_path):
    _plant(vlm, synth_ws, tmp_path, "med-a", "medical", 1.2, seed=11)
    _plant(vlm, synth_ws, tmp_path, "floor-a", "baseline", 0.9, seed=12)
    vlm(synth_ws, "analyze", "-m", "med-a,floor-a", "-d", "demo", *K, "--no-probe")
    n_boot, seed = 300, 7
    rows = {r["metric"]: r for r in json.loads(vlm(synth_ws, "findings", "--bootstrap", str(n_boot), "--seed",
                                                   str(seed), "--format", "json", "--no-save").out)
            if r["finding"] == 1}
    with Workspace(synth_ws).read() as con:
        q = con.execute("SELECT q.model, q.image_id, q.ap, q.knn_correct::DOUBLE, q.label, "
                        "coalesce(i.group_id, 'image:' || q.image_id) FROM query_metrics q JOIN images i "
                        "USING (image_id) ORDER BY q.model, q.image_id").fetchall()
    med = [r for r in q if r[0] == "med-a"]
    flo = [r for r in q if r[0] == "floor-a"]
    assert [r[1] for r in med] == [r[1] for r in flo]
    groups = sorted({r[5] for r in med})
    draws = np.random.default_rng(seed).integers(0, len(groups), size=(n_boot, len(groups)))
    for metric, col, macro in (("map_micro", 2, False), ("knn_acc_macro", 3, True)):
        by_group: dict[str, list[tuple[float, str]]] = {g: [] for g in groups}
        for a, b in zip(med, flo, strict=True):
            by_group[a[5]].append((a[col] - b[col], a[4]))
        reps = []
        for row in draws:
            picked = [x for g in row for x in by_group[groups[g]]]
            if macro:
                per_class: dict[str, list[float]] = {}
                for d, label in picked:
                    per_class.setdefault(label, []).append(d)
                reps.append(sum(sum(v) / len(v) for v in per_class.values()) / len(per_class))
            else:
                reps.append(sum(d for d, _ in picked) / len(picked))
        lo, hi = np.quantile(reps, [0.025, 0.975])
        r = rows[metric]
        assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
        reps = [0.0 if abs(x) < 1e-12 else x for x in reps]  # as paired_delta: rounding is not a sign
        below, above = sum(x <= 0 for x in reps), sum(x >= 0 for x in reps)
        assert r["p_value"] == pytest.approx(min(1.0, 2 * min(below, above) / n_boot), abs=1e-12)
        assert (lo > 0 or hi < 0) == (r["p_value"] < 0.05)  # the interval and the p-value agree
    # Holm over the two: the smaller p doubled, the larger no smaller than it
    ps = sorted(r["p_value"] for r in rows.values())
    holm = [min(1, 2 * ps[0]), min(1, max(2 * ps[0], ps[1]))]
    assert sorted(r["p_holm"] for r in rows.values()) == pytest.approx(holm)


def test_a_model_without_a_family_is_named_in_the_reason(vlm, synth_ws, tmp_path):
    _plant(vlm, synth_ws, tmp_path, "med-a", "medical", 2.0, seed=13)
    f = tmp_path / "x.parquet"
    rows, _, _ = _images(Workspace(synth_ws))
    pq.write_table(pa.table({"image_id": pa.array([r[0] for r in rows], pa.int64()),
                             "embedding": pa.array(list(np.eye(16, dtype=np.float32)[np.arange(len(rows)) % 16]),
                                                   pa.list_(pa.float32()))}), f)
    vlm(synth_ws, "embeddings", "import", f, "-m", "mystery", "-d", "demo")
    vlm(synth_ws, "analyze", "-m", "med-a,mystery", "-d", "demo", *K, "--no-probe")
    (f1,) = [r for r in _findings(vlm, synth_ws) if r["finding"] == 1]
    assert f1["finding_verdict"] == "not testable"
    assert "no 'baseline'" in f1["finding_reason"] and "mystery" in f1["finding_reason"]
    res = vlm(synth_ws, "embeddings", "import", f, "-m", "mystery", "-d", "demo", "--family", "medicall", expect=2)
    assert "medicall" in res.err


def test_baselines_only_make_every_finding_not_testable_in_the_report_too(vlm, served_ws, tmp_path):
    """What the demo shows: offline baselines only, so no finding has the families it needs."""
    import re

    rows = json.loads(vlm(served_ws, "findings", "--no-save", "--format", "json").out)
    assert {r["finding"] for r in rows} == {1, 2, 3} and {r["finding_verdict"] for r in rows} == {"not testable"}
    assert all("families present: baseline" in r["finding_reason"] for r in rows if r["finding"] in (1, 2))
    text = vlm(served_ws, "findings", "--no-save").out
    assert text.count("NOT TESTABLE") == len(rows)
    out = tmp_path / "r.html"
    vlm(served_ws, "report", "-o", out, "--max-points", "0")
    page = out.read_text()
    section = re.search(r"<section id='findings'>(.*?)</section>", page, re.S).group(1)
    assert section.count("data-verdict='not testable'") == len(rows)
    assert page.index("id='findings'") < page.index("id='overview'")


def test_a_v4_catalog_gains_the_family_column_and_the_new_tables(tmp_path):
    from vlmindex.catalog import workspace as wsmod

    ws = Workspace(tmp_path / "ws")
    with ws.write() as con:
        con.execute("DROP TABLE attack_queries")
        con.execute("DROP TABLE findings")
        con.execute("ALTER TABLE runs DROP COLUMN family")
        con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    with ws.write() as con:
        cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'runs'").fetchall()}
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert "family" in cols and {"attack_queries", "findings"} <= tables and int(version) == wsmod.SCHEMA_VERSION


def test_embed_family_is_recorded_also_when_nothing_is_left_to_embed(vlm, synth_ws):
    from vlmindex.catalog.embeddings import run_families
    from vlmindex.findings import family_of

    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    with Workspace(synth_ws).read() as con:
        assert run_families(con, "demo") == {"raw-pixels": "baseline"}  # the registry's, recorded by the run
    res = vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0", "--family", "general")
    assert "already" in res.out
    with Workspace(synth_ws).read() as con:
        recorded = run_families(con, "demo")
    assert recorded == {"raw-pixels": "general"} and family_of("raw-pixels", recorded) == "general"
    assert family_of("raw-pixels", {}) == "baseline" and family_of("not-a-model", {}) is None


def test_a_partial_analysis_is_never_paired_with_full_ones(vlm, synth_ws, tmp_path):
    """med-b embedded on half the images (analyzed with --allow-partial) scores other queries against
    a smaller gallery: it forms a slice of its own, and the full slice is untouched by it."""
    _plant(vlm, synth_ws, tmp_path, "med-a", "medical", 1.5, seed=21)
    _plant(vlm, synth_ws, tmp_path, "floor-a", "baseline", 1.5, seed=21)
    _plant(vlm, synth_ws, tmp_path, "med-b", "medical", 1.5, seed=22)
    half = pq.read_table(tmp_path / "med-b-clean.parquet").slice(0, 36)
    pq.write_table(half, tmp_path / "half.parquet")
    vlm(synth_ws, "embeddings", "import", tmp_path / "half.parquet", "-m", "med-b", "-d", "demo", "--family", "medical")
    vlm(synth_ws, "analyze", "-m", "med-a,floor-a", "-d", "demo", *K, "--no-probe")
    vlm(synth_ws, "analyze", "-m", "med-b", "-d", "demo", *K, "--no-probe", "--allow-partial")
    rows = [r for r in _findings(vlm, synth_ws, "--no-save") if r["finding"] == 1]
    full = [r for r in rows if "partial" not in r["scope"]]
    assert {r["a"] for r in full} == {"med-a"} and all(r["n_queries"] == 72 for r in full)
    assert all(r["verdict"] == "not decided" for r in full)  # identical features: nothing to decide
    partial = [r for r in rows if "partial" in r["scope"]]
    assert partial and {r["finding_verdict"] for r in partial} == {"not testable"}  # no baseline analysed partially


def test_one_condition_replaces_only_its_own_stored_rows_and_a_bogus_one_is_refused(vlm, synth_ws, tmp_path):
    _plant(vlm, synth_ws, tmp_path, "med-a", "medical", 2.0, seed=23)
    _plant(vlm, synth_ws, tmp_path, "floor-a", "baseline", 0.5, seed=24)
    vlm(synth_ws, "analyze", "-m", "med-a,floor-a", "-d", "demo", *K, "--no-probe")
    vlm(synth_ws, "overlay", "add", "demo", "wrong", "--text", "wrong-label")
    _findings(vlm, synth_ws)
    before = {(r["finding"], r["condition"]) for r in json.loads(vlm(synth_ws, "sql", "findings", "--format",
                                                                        "json").out)}
    assert (1, "clean") in before
    _findings(vlm, synth_ws, "-c", "wrong")
    after = {(r["finding"], r["condition"]) for r in json.loads(vlm(synth_ws, "sql", "findings", "--format",
                                                                       "json").out)}
    assert (1, "clean") in after and (3, "wrong") in after
    res = vlm(synth_ws, "findings", "-c", "bogus", expect=1)
    assert "unknown condition 'bogus'" in res.err and "wrong" in res.err and "Traceback" not in res.err


def test_finding_3_leaves_out_an_overlay_effect_whose_runs_changed(vlm, synth_ws, tmp_path):
    vlm(synth_ws, "overlay", "add", "demo", "wrong", "--text", "wrong-label")
    for model, family, seed, pull in (("gen-a", "general", 31, 3.0), ("med-a", "medical", 32, 0.1)):
        for cond in ("clean", "wrong"):
            _plant(vlm, synth_ws, tmp_path, model, family, 2.0, seed, condition=cond, pull=pull)
    vlm(synth_ws, "overlay", "effect", "-m", "gen-a,med-a", "-d", "demo", "-c", "wrong", *K, "--n-boot", "50")
    assert _verdict([r for r in _findings(vlm, synth_ws, "--no-save") if r["finding"] == 3], 3) == "supported"
    _plant(vlm, synth_ws, tmp_path, "med-a", "medical", 2.0, 33, condition="wrong", pull=3.0)  # other vectors now
    (row,) = [r for r in _findings(vlm, synth_ws, "--no-save") if r["finding"] == 3]
    assert row["finding_verdict"] == "not testable" and "no medical model" in row["finding_reason"]
