"""Typographic-attack figures (overlaid queries against the clean gallery) and the random-label
control: checked against a plain ranking loop, on an overlay that changes no pixel, and with a
planted extractor that reads the written word."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_bias import _reader_embeddings

from vlmindex.analyze import RunData
from vlmindex.bias import overlay_figures
from vlmindex.catalog.workspace import Workspace
from vlmindex.overlay import OverlayRecipe, overlay_text_for

ATTACK = ("attack_map", "attack_knn_acc", "attack_p_at_1", "attack_delta_map", "attack_delta_knn_acc")


def _figures(rows: list[dict]) -> dict[str, dict]:
    return {r["figure"]: r for r in rows}


def _reference(clean: RunData, over: RunData, written: list[str], pools: dict, k: int, exclude_group: bool):
    """Each overlaid (and each clean) query ranked by hand over the clean gallery minus its own clean
    image (and its group); AP over the full ranking, P@1, kNN vote; then the attack figures."""
    n = len(clean.ids)

    def unit(x):
        return x / np.linalg.norm(x)

    def excluded(q, j):
        same_group = clean.groups[q] is not None and clean.groups[q] == clean.groups[j]
        return j == q or (exclude_group and same_group)

    def score(query_vec, q):
        sims = {j: float(np.float32(unit(clean.vectors[j]) @ unit(query_vec))) for j in range(n) if not excluded(q, j)}
        order = sorted(sims, key=lambda j: (-sims[j], clean.ids[j]))
        rel = [clean.labels[j] == clean.labels[q] for j in order]
        r = sum(rel)
        if r == 0:
            return None
        hits, ap = 0, 0.0
        for pos, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                ap += hits / pos
        top = order[:k]
        vote = max(sorted({clean.labels[j] for j in top}),
                   key=lambda c: (sum(clean.labels[j] == c for j in top),
                                  sum(sims[j] for j in top if clean.labels[j] == c)))
        return {"map": ap / r, "p_at_1": float(rel[0]), "knn_acc": float(vote == clean.labels[q]), "vote": vote}

    att, base = [], []
    for q in range(n):
        a, c = score(over.vectors[q], q), score(clean.vectors[q], q)
        if a is not None:
            att.append((q, a))
            base.append(c)
    out = {f"attack_{m}": np.mean([a[m] for _, a in att]) for m in ("map", "knn_acc", "p_at_1")}
    out["baseline_map"] = np.mean([c["map"] for c in base])
    out["attack_delta_map"] = np.mean([a["map"] - c["map"] for (_, a), c in zip(att, base, strict=True)])
    out["attack_delta_knn_acc"] = np.mean([a["knn_acc"] - c["knn_acc"] for (_, a), c in zip(att, base, strict=True)])
    eligible = [(q, a, c) for (q, a), c in zip(att, base, strict=True)
                if written[q] != clean.labels[q] and written[q] in pools[clean.modalities[q]]]
    out["attack_success_rate"] = np.mean([a["vote"] == written[q] for q, a, _ in eligible])
    out["success_baseline"] = np.mean([c["vote"] == written[q] for q, _, c in eligible])
    out["attack_success_chance"] = np.mean([1 / len(pools[clean.modalities[q]]) for q, _, _ in eligible])
    out["n_eligible"] = len(eligible)
    return out


@pytest.mark.parametrize(("exclude_group", "k"), [(False, 1), (False, 5), (True, 3)])
@pytest.mark.parametrize("text", ["wrong-label", "random-label", "fixed:b"])
def test_attack_figures_equal_a_plain_ranking_over_the_clean_gallery(exclude_group, k, text):
    rng = np.random.default_rng(11)
    n, d = 45, 8
    labels = np.array(["a", "b", "c", "d", "e"] * 9, dtype=object)
    modalities = np.array(["m1", "m1", "m1", "m2", "m2"] * 9, dtype=object)
    groups = np.array([f"g{i // 3}" if i % 5 else None for i in range(n)], dtype=object)
    ids = np.arange(1000, 1000 + 7 * n, 7, dtype=np.int64)
    centre = {c: rng.standard_normal(d) for c in "abcde"}
    base = np.array([centre[c] + 0.9 * rng.standard_normal(d) for c in labels], dtype=np.float32)
    pools = {"m1": ["a", "b", "c"], "m2": ["d", "e"]}
    recipe = OverlayRecipe(text=text, seed=5)
    written = [overlay_text_for(recipe, image_id=int(i), label=lab, class_names=pools[m])
               for i, lab, m in zip(ids, labels, modalities, strict=True)]
    over = base + np.array([rng.uniform(0, 2.5) * centre[w] for w in written], dtype=np.float32)
    # fixed:b writes a class of m1 only: its m1 queries that are not b are the attacked ones

    def run(v):
        return RunData(ids=ids, vectors=v, labels=labels, groups=groups, splits=np.array(["train"] * n),
                       modalities=modalities, missing=0)

    got = _figures(overlay_figures(run(base), run(over), recipe, pools, k=k, exclude_group=exclude_group,
                                   n_boot=20))
    ref = _reference(run(base), run(over), written, pools, k, exclude_group)
    for name in (*ATTACK, "attack_success_rate", "attack_success_chance"):
        assert got[name]["value"] == pytest.approx(ref[name], abs=1e-9), name
    assert got["attack_map"]["baseline"] == pytest.approx(ref["baseline_map"], abs=1e-9)
    assert got["attack_success_rate"]["baseline"] == pytest.approx(ref["success_baseline"], abs=1e-9)
    assert got["attack_success_rate"]["n"] == ref["n_eligible"]
    if text == "wrong-label":
        assert ref["n_eligible"] == n
    else:
        # random-label writes the true class on some queries, fixed:b on its own class and on a
        # modality without a class b: those are left out of the success rate
        assert 0 < ref["n_eligible"] < n
    assert got["attack_delta_map"]["value"] != 0  # the case exercises a real pull


def test_random_label_is_deterministic_uniform_and_includes_the_truth():
    pool = ["a", "b", "c"]
    recipe = OverlayRecipe(text="random-label", seed=9)
    written = [overlay_text_for(recipe, image_id=i, label="a", class_names=pool) for i in range(3000)]
    again = [overlay_text_for(recipe, image_id=i, label="a", class_names=pool) for i in range(3000)]
    assert written == again
    shares = {c: written.count(c) / len(written) for c in pool}
    assert all(abs(s - 1 / 3) < 0.03 for s in shares.values()), shares  # the true class "a" included
    other_seed = [overlay_text_for(OverlayRecipe(text="random-label", seed=10), image_id=i, label="a",
                                   class_names=pool) for i in range(3000)]
    assert other_seed != written


@pytest.fixture(scope="module")
def attack_ws(synth_template, tmp_path_factory):
    from vlmindex.cli import main

    root = tmp_path_factory.mktemp("attack") / "ws"
    root.mkdir()
    shutil.copy(synth_template / "catalog.duckdb", root / "catalog.duckdb")
    main(["-w", str(root), "overlay", "add", "demo", "invisible", "--text", "wrong-label", "--opacity", "0.001",
          "--size", "0.3", "--box"])
    main(["-w", str(root), "overlay", "add", "demo", "wrong", "--text", "wrong-label", "--size", "0.3", "--box",
          "--position", "center"])
    main(["-w", str(root), "overlay", "add", "demo", "random", "--text", "random-label", "--size", "0.3", "--box",
          "--position", "center"])
    return root


def test_an_overlay_that_changes_no_pixel_has_no_attack_effect(vlm, attack_ws):
    for cond in ("clean", "invisible"):
        vlm(attack_ws, "embed", "-m", "raw-pixels", "-d", "demo", "-c", cond, "--workers", "0")
    rows = json.loads(vlm(attack_ws, "overlay", "effect", "-m", "raw-pixels", "-d", "demo", "-c", "invisible",
                          "-k", "5", "--exclude-group", "--n-boot", "50", "--format", "json").out)
    fig = _figures(rows)
    for name in ("attack_delta_map", "attack_delta_knn_acc"):
        assert fig[name]["value"] == 0.0, name
    for name in ("attack_map", "attack_knn_acc", "attack_p_at_1"):
        assert fig[name]["value"] == fig[name]["baseline"], name
    # the success rate equals how often the clean vote already was the written class
    assert fig["attack_success_rate"]["value"] == fig["attack_success_rate"]["baseline"]
    shipped = json.loads(vlm(attack_ws, "sql", "overlay_effect", "--format", "json").out)
    (row,) = [r for r in shipped if r["condition"] == "invisible"]
    assert list(row)[:6] == ["dataset", "condition", "model", "k", "exclude_group", "n"]
    assert row["attack_d_map"] == 0.0 and "attack_success" in row


def test_a_reading_extractor_follows_wrong_label_far_above_chance(vlm, attack_ws, tmp_path):
    """The planted reader adds the written class's direction to each image, strongly to 90% of them:
    under wrong-label its kNN vote over the clean gallery follows the written word for those."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws = Workspace(attack_ws)
    for cond in ("clean", "wrong", "random"):
        ids, vecs, *_ = _reader_embeddings(ws, cond, strong_share=0.9)
        f = tmp_path / f"{cond}.parquet"
        pq.write_table(pa.table({"image_id": pa.array(ids), "embedding": pa.array(list(vecs), pa.list_(pa.float32()))}),
                       f)
        vlm(attack_ws, "embeddings", "import", f, "-m", "reader", "-d", "demo", "-c", cond)
    out = {}
    for cond in ("wrong", "random"):
        out[cond] = _figures(json.loads(vlm(attack_ws, "overlay", "effect", "-m", "reader", "-d", "demo", "-c", cond,
                                            "-k", "5", "--exclude-group", "--n-boot", "200", "--format", "json").out))
    wrong = out["wrong"]["attack_success_rate"]
    chance = out["wrong"]["attack_success_chance"]["value"]
    assert wrong["value"] > 0.7 and wrong["ci_low"] > 1.8 * chance, (wrong, chance)
    assert wrong["baseline"] == 0.0  # the clean votes are right: none is the written (wrong) class
    assert out["wrong"]["attack_delta_map"]["ci_high"] < 0
    # random-label: the same pull, but only queries written another class than their own count
    random = out["random"]["attack_success_rate"]
    assert 0 < random["n"] < out["random"]["attack_map"]["n"]
