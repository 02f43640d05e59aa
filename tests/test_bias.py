"""Overlay bias figures: the CLI loop on the synthetic set, planted effects, and slow reference loops."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmindex.analyze import RunData
from vlmindex.bias import bootstrap_ci, compute_overlay_effect, overlay_figures
from vlmindex.catalog import parts as store
from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError
from vlmindex.imageio import load_image
from vlmindex.overlay import OverlayRecipe, apply_overlay, get_condition, overlay_text_for

# Big centred boxed text: raw pixels see it, and its position does not depend on the image.
BIG = ["--position", "center", "--size", "0.3", "--box"]
CONDITIONS = {
    "wrong-big": ["--text", "wrong-label", *BIG],
    "word-big": ["--text", "random-word", *BIG],
    # opacity 0.001 scales the text's alpha to round(255 * 0.001) = 0: no pixel changes
    "invisible": ["--text", "fixed:XYZ", "--opacity", "0.001"],
}


def _cli(ws: Path, *args: object) -> str:
    import contextlib
    import io

    from vlmindex.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(["-w", str(ws), *[str(a) for a in args]])
        except SystemExit as exc:
            assert not exc.code, f"exit {exc.code} for {args}: {buf.getvalue()}"
    return buf.getvalue()


@pytest.fixture(scope="module")
def bias_ws(synth_template, tmp_path_factory) -> Path:
    """The synthetic set with three conditions, embedded with raw-pixels and analysed, via the CLI."""
    root = tmp_path_factory.mktemp("bias") / "ws"
    root.mkdir()
    shutil.copy(synth_template / "catalog.duckdb", root / "catalog.duckdb")
    for name, opts in CONDITIONS.items():
        _cli(root, "overlay", "add", "demo", name, *opts)
    for cond in ("clean", *CONDITIONS):
        _cli(root, "embed", "-m", "raw-pixels", "-d", "demo", "-c", cond, "--workers", "0")
        _cli(root, "index", "build", "-m", "raw-pixels", "-d", "demo", "-c", cond)
        _cli(root, "analyze", "-m", "raw-pixels", "-d", "demo", "-c", cond, "-k", "5", "--exclude-group",
             "--no-probe")
    _cli(root, "overlay", "effect", "-m", "raw-pixels", "-d", "demo", "-c", ",".join(CONDITIONS), "-k", "5",
         "--exclude-group", "--n-boot", "200")
    return root


def _figures(rows: list[dict]) -> dict[str, dict]:
    return {r["figure"]: r for r in rows}


def test_cli_loop_stores_figures_consistent_with_analyze(vlm, bias_ws):
    shipped = json.loads(vlm(bias_ws, "sql", "overlay_effect", "--format", "json").out)
    assert {r["condition"] for r in shipped} == set(CONDITIONS)
    assert all(r["model"] == "raw-pixels" and r["k"] == 5 and r["exclude_group"] for r in shipped)
    listed = json.loads(vlm(bias_ws, "sql", "--list", "--format", "json").out)
    assert "overlay_effect" in {r["name"] for r in listed}
    with Workspace(bias_ws).read() as con:
        summ = dict(con.execute("SELECT condition, map_micro FROM summaries "
                                "WHERE model = 'raw-pixels'").fetchall())
        knn = dict(con.execute("SELECT condition, knn_acc_macro FROM summaries").fetchall())
        stored = con.execute("SELECT condition, figure, value, baseline, ci_low, ci_high, n "
                             "FROM overlay_effects WHERE model = 'raw-pixels'").fetchall()
    by = {(c, f): (v, b, lo, hi, n) for c, f, v, b, lo, hi, n in stored}
    for cond in CONDITIONS:
        # Paired deltas over the same queries equal the difference of analyze's stored means.
        v, b, lo, hi, n = by[(cond, "delta_map")]
        assert n == 72 and b == pytest.approx(summ["clean"], abs=1e-12)
        assert v == pytest.approx(summ[cond] - summ["clean"], abs=1e-12)
        assert lo <= v <= hi
        assert by[(cond, "delta_knn_acc_macro")][0] == pytest.approx(knn[cond] - knn["clean"], abs=1e-12)
    # A rerun replaces the rows rather than adding to them.
    vlm(bias_ws, "overlay", "effect", "-m", "raw-pixels", "-d", "demo", "-c", "invisible", "-k", "5",
        "--exclude-group", "--n-boot", "200")
    with Workspace(bias_ws).read() as con:
        counts = con.execute("SELECT count(*), count(DISTINCT figure) FROM overlay_effects "
                             "WHERE condition = 'invisible'").fetchone()
    assert counts[0] == counts[1] > 0


def test_overlays_and_figures_are_deterministic(bias_ws, synth_template, tmp_path):
    ws = Workspace(bias_ws)
    with ws.read() as con:
        recipe = get_condition(con, "demo", "wrong-big")
        image_id, path, label = con.execute(
            "SELECT image_id, path, label FROM images WHERE dataset = 'demo' AND modality = 'xray' "
            "ORDER BY image_id LIMIT 1").fetchone()
    pool = ["benign-nodule", "malignant-mass"]
    img = load_image(path)
    a = apply_overlay(img, recipe, image_id=image_id, label=label, class_names=pool)
    b = apply_overlay(img, recipe, image_id=image_id, label=label, class_names=pool)
    assert a.tobytes() == b.tobytes() and a.tobytes() != img.tobytes()
    # Same condition embedded in a fresh workspace: the same vectors, bit for bit.
    other = tmp_path / "ws2"
    other.mkdir()
    shutil.copy(synth_template / "catalog.duckdb", other / "catalog.duckdb")
    _cli(other, "overlay", "add", "demo", "wrong-big", *CONDITIONS["wrong-big"])
    _cli(other, "embed", "-m", "raw-pixels", "-d", "demo", "-c", "wrong-big", "--workers", "0")
    ids1, v1 = store.read_embeddings(ws.embeddings_dir("raw-pixels", "demo", "wrong-big"))
    ids2, v2 = store.read_embeddings(Workspace(other).embeddings_dir("raw-pixels", "demo", "wrong-big"))
    assert np.array_equal(ids1, ids2) and np.array_equal(v1, v2)
    # Bootstrap intervals are seeded: same seed, same rows; another seed, other intervals.
    kw = dict(k=5, exclude_group=True, n_boot=200, save=False)
    r1 = compute_overlay_effect(ws, "raw-pixels", "demo", "wrong-big", seed=0, **kw)
    r2 = compute_overlay_effect(ws, "raw-pixels", "demo", "wrong-big", seed=0, **kw)
    r3 = compute_overlay_effect(ws, "raw-pixels", "demo", "wrong-big", seed=1, **kw)
    strip = [{k: v for k, v in r.items() if k != "created_at"} for r in r1]
    assert strip == [{k: v for k, v in r.items() if k != "created_at"} for r in r2]
    assert [r["value"] for r in r1] == [r["value"] for r in r3]
    assert [r["ci_low"] for r in r1] != [r["ci_low"] for r in r3]


def test_condition_that_changes_no_pixels_shows_no_effect(bias_ws):
    ws = Workspace(bias_ws)
    with ws.read() as con:
        recipe = get_condition(con, "demo", "invisible")
        rows = con.execute("SELECT image_id, path, label FROM images WHERE dataset = 'demo'").fetchall()
        fig = {f: (v, lo, hi, b) for f, v, lo, hi, b in con.execute(
            "SELECT figure, value, ci_low, ci_high, baseline FROM overlay_effects "
            "WHERE condition = 'invisible'").fetchall()}
    for image_id, path, label in rows[:12]:
        img = load_image(path)
        out = apply_overlay(img, recipe, image_id=image_id, label=label, class_names=[])
        assert out.tobytes() == img.tobytes(), "the control condition must leave every pixel as it was"
    for name, (v, lo, hi, _) in fig.items():
        if name.startswith("delta_"):
            assert (v, lo, hi) == (0.0, 0.0, 0.0), name
    assert fig["shift_cosine_mean"][0] == pytest.approx(1.0, abs=1e-12)
    assert fig["shift_cosine_std"][0] == pytest.approx(0.0, abs=1e-9)
    assert fig["text_clustering"][0] == fig["text_clustering"][3] == 1.0  # one string on every image
    assert fig["text_clustering_lift"][0] is None and fig["flip_rate"][0] is None
    assert fig["vote_change_rate"][:3] == (0.0, 0.0, 0.0)


def test_extractor_that_sees_the_text_region_clusters_by_string(bias_ws):
    with Workspace(bias_ws).read() as con:
        fig = {f: (v, lo, hi, b) for f, v, lo, hi, b in con.execute(
            "SELECT figure, value, ci_low, ci_high, baseline FROM overlay_effects "
            "WHERE condition = 'word-big'").fetchall()}
    lift, lo, _, clean_lift = fig["text_clustering_lift"]
    # Raw pixels match the burned-in word's pixels: neighbours share the word far above chance,
    # while the same images' clean neighbours share it about as often as chance would have it.
    assert lift > 4 and lo > 2 * clean_lift
    assert fig["text_clustering"][0] > 3 * fig["text_clustering"][3]
    assert fig["shift_cosine_mean"][0] < 0.8 < fig["shift_cosine_mean"][3]


def _reader_embeddings(ws: Workspace, condition: str, *, strong_share: float = 0.5
                       ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A planted "typographic" extractor: a perfect image model plus the text it reads in the pixels.

    It reads the overlaid string by re-rendering each class name of the image's modality onto the
    clean image and keeping the one whose pixels match exactly, then adds alpha times the written
    class's direction to the image's own class direction, alpha 1.5 for a seeded ``strong_share``
    of the images and 0.5 for the others.
    Returns ids, vectors, the share of images with alpha = 1.5 (the flips to expect) and the
    flip_rate_chance to expect: (1/n) Σ over those images of 1 / (C − 1), C the classes of the modality.
    """
    with ws.read() as con:
        recipe = get_condition(con, "demo", condition)
        rows = con.execute("SELECT image_id, path, label, modality FROM images WHERE dataset = 'demo' "
                           "ORDER BY image_id").fetchall()
        classes = [r[0] for r in con.execute("SELECT DISTINCT label FROM images ORDER BY label").fetchall()]
    pools = {m: sorted({r[2] for r in rows if r[3] == m}) for m in {r[3] for r in rows}}
    axis = {c: i for i, c in enumerate(classes)}
    ids, vecs, strong, chance = [], [], 0, 0.0
    for image_id, path, label, modality in rows:
        rng = np.random.default_rng(image_id % 2**32)
        v = np.zeros(len(classes))
        v[axis[label]] = 1.0
        v += 0.01 * rng.standard_normal(len(classes))
        if recipe is not None:
            clean = load_image(path)
            shown = apply_overlay(clean, recipe, image_id=image_id, label=label, class_names=pools[modality])
            alpha = 1.5 if rng.random() < strong_share else 0.5
            for c in pools[modality]:
                probe = dataclasses.replace(recipe, text=f"fixed:{c}")
                if apply_overlay(clean, probe, image_id=image_id, label=None, class_names=[]).tobytes() \
                        == shown.tobytes():
                    v[axis[c]] += alpha
                    strong += alpha > 1
                    chance += (alpha > 1) / (len(pools[modality]) - 1)
                    break
            else:
                raise AssertionError(f"the reader could not read image {image_id}")
        ids.append(image_id)
        vecs.append(v)
    return np.array(ids), np.array(vecs, dtype=np.float32), strong / len(rows), chance / len(rows)


def test_reading_extractor_flips_votes_to_the_written_class(vlm, bias_ws, tmp_path):
    ws = Workspace(bias_ws)
    expected = expected_chance = None
    for cond in ("clean", "wrong-big"):
        ids, vecs, strong, chance = _reader_embeddings(ws, cond)
        if cond != "clean":
            expected, expected_chance = strong, chance
        f = tmp_path / f"{cond}.parquet"
        pq.write_table(pa.table({"image_id": pa.array(ids),
                                 "embedding": pa.array(list(vecs), pa.list_(pa.float32()))}), f)
        vlm(bias_ws, "embeddings", "import", f, "-m", "reader", "-d", "demo", "-c", cond)
    out = vlm(bias_ws, "overlay", "effect", "-m", "reader", "-d", "demo", "-c", "wrong-big", "-k", "5",
              "--exclude-group", "--format", "json").out
    fig = _figures(json.loads(out))
    assert 0.3 < expected < 0.7
    assert fig["flip_rate"]["baseline"] == 0.0  # the clean votes are all right, never the written class
    assert fig["flip_rate"]["value"] == pytest.approx(expected, abs=1e-12)
    assert fig["flip_rate"]["ci_low"] < expected < fig["flip_rate"]["ci_high"]
    assert fig["written_vote_rate"]["value"] == pytest.approx(expected, abs=1e-12)
    # Every changed vote goes to the written class; a random change would land on it only 1 / (C − 1)
    # of the time, so with three classes in some modalities chance is below the flip rate.
    assert fig["vote_change_rate"]["value"] == fig["flip_rate"]["value"]
    assert fig["flip_rate_chance"]["value"] == pytest.approx(expected_chance, abs=1e-12)
    assert expected / 2 < expected_chance < expected
    assert fig["shift_cosine_mean"]["value"] < 0.9


# -- reference loops --------------------------------------------------------------------------------


def _slow_figures(clean: RunData, over: RunData, strings: list[str], pools: dict, k: int,
                  exclude_group: bool):
    """Text share, chance and kNN votes by plain loops over the definitions."""
    n = len(clean.ids)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def excluded(q, j):
        same_group = clean.groups[q] is not None and clean.groups[q] == clean.groups[j]
        return j == q or (exclude_group and same_group)

    def ranking(query_vec, gallery, q):
        sims = (unit(gallery) @ (query_vec / np.linalg.norm(query_vec))).astype(np.float32)
        order = sorted((j for j in range(n) if not excluded(q, j)), key=lambda j: (-sims[j], clean.ids[j]))
        return order, sims

    def vote(order, sims):
        top = order[:k]
        best = max(sorted({clean.labels[j] for j in top}),
                   key=lambda c: (sum(clean.labels[j] == c for j in top),
                                  sum(float(sims[j]) for j in top if clean.labels[j] == c)))
        return best

    share, chance, flips, changed, expect = [], [], [], [], []
    for q in range(n):
        order_o, _ = ranking(over.vectors[q], over.vectors, q)
        share.append(np.mean([strings[j] == strings[q] for j in order_o[:k]]))
        cands = [j for j in range(n) if not excluded(q, j)]
        chance.append(np.mean([strings[j] == strings[q] for j in cands]))
        order_c, sims_c = ranking(clean.vectors[q], clean.vectors, q)
        order_x, sims_x = ranking(over.vectors[q], clean.vectors, q)
        clean_vote, over_vote = vote(order_c, sims_c), vote(order_x, sims_x)
        flips.append(clean_vote != strings[q] and over_vote == strings[q])
        changed.append(over_vote != clean_vote)
        others = len(pools[clean.modalities[q]]) - 1
        expect.append((clean_vote != strings[q] and over_vote != clean_vote) / others)
    return np.mean(share), np.mean(chance), np.mean(flips), np.mean(changed), np.mean(expect)


@pytest.mark.parametrize(("exclude_group", "k"), [(False, 1), (False, 5), (True, 1), (True, 5)])
def test_figures_match_reference_loops(exclude_group, k):
    rng = np.random.default_rng(7)
    n, d = 40, 6
    labels = np.array(["a", "b", "c", "d", "e"] * 8, dtype=object)
    modalities = np.array(["m1", "m1", "m1", "m2", "m2"] * 8, dtype=object)
    groups = np.array([f"g{i // 3}" if i % 7 else None for i in range(n)], dtype=object)
    ids = np.arange(100, 100 + 3 * n, 3, dtype=np.int64)
    centre = {c: rng.standard_normal(d) for c in "abcde"}
    base = np.array([centre[c] + 0.8 * rng.standard_normal(d) for c in labels], dtype=np.float32)
    pools = {"m1": ["a", "b", "c"], "m2": ["d", "e"]}
    recipe = OverlayRecipe(text="wrong-label", seed=3)
    strings = [overlay_text_for(recipe, image_id=int(i), label=lab, class_names=pools[m])
               for i, lab, m in zip(ids, labels, modalities, strict=True)]
    # overlaid vectors pulled toward the written class's centre, by a varying amount
    over_vecs = base + np.array([rng.uniform(0, 2) * centre[s] for s in strings], dtype=np.float32)

    def run(v):
        return RunData(ids=ids, vectors=v, labels=labels, groups=groups, splits=np.array(["train"] * n),
                       modalities=modalities, missing=0)

    rows = _figures(overlay_figures(run(base), run(over_vecs), recipe, pools, k=k,
                                    exclude_group=exclude_group, n_boot=50))
    share, chance, flip, changed, expect = _slow_figures(run(base), run(over_vecs), strings, pools, k,
                                                         exclude_group)
    assert rows["text_clustering"]["value"] == pytest.approx(share, abs=1e-12)
    assert rows["text_clustering_chance"]["value"] == pytest.approx(chance, abs=1e-12)
    assert rows["text_clustering_lift"]["value"] == pytest.approx(share / chance, abs=1e-12)
    assert rows["flip_rate"]["value"] == pytest.approx(flip, abs=1e-12)
    assert rows["vote_change_rate"]["value"] == pytest.approx(changed, abs=1e-12)
    assert rows["flip_rate_chance"]["value"] == pytest.approx(expect, abs=1e-12)
    assert flip > 0  # the reference case exercises flips at all


def test_bootstrap_ci_is_a_seeded_percentile_interval():
    v = np.arange(50, dtype=float)
    lo, hi = bootstrap_ci(lambda idx: v[idx].mean(axis=1), 50, n_boot=400, seed=3)
    # the same draws by hand
    draws = np.random.default_rng(3).integers(0, 50, size=(400, 50))
    ref = np.percentile(v[draws].mean(axis=1), [2.5, 97.5])
    assert (lo, hi) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert lo < v.mean() < hi
    assert bootstrap_ci(lambda idx: v[idx].mean(axis=1), 50, n_boot=0) == (None, None)
    const = np.full(20, 0.25)
    assert bootstrap_ci(lambda idx: const[idx].mean(axis=1), 20, n_boot=100) == (0.25, 0.25)


def test_errors_name_the_next_step(vlm, bias_ws):
    err = vlm(bias_ws, "overlay", "effect", "-m", "hog", "-d", "demo", "-c", "wrong-big", expect=1).err
    assert "vlmindex embed --model hog --dataset demo --condition clean" in err
    with pytest.raises(VlmindexError, match="against clean"):
        compute_overlay_effect(Workspace(bias_ws), "raw-pixels", "demo", "clean")
    err = vlm(bias_ws, "overlay", "effect", "-m", "raw-pixels", "-d", "demo", "-c", "nope", expect=1).err
    assert "unknown condition 'nope'" in err and err.count("\n") == 1
