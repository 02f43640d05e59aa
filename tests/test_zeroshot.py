"""Zero-shot classification: shipped prompts, a tiny CLIP text tower end to end, controlled argmax."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import model_fixtures as mf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import balanced_accuracy_score

from vlmindex.catalog import parts as store
from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError
from vlmindex.zeroshot import label_text, load_templates, templates_for, zeroshot

WRONG = ["--text", "wrong-label", "--position", "center", "--size", "0.3", "--box"]


def test_shipped_templates_are_package_data():
    path = resources.files("vlmindex").joinpath("prompts", "templates.json")
    assert path.is_file()
    raw = json.loads(path.read_text())
    t = load_templates()
    assert t["templates"] == raw["templates"]
    assert {"dermoscopy", "xray", "ultrasound", "default"} <= set(t["templates"])
    assert all("{label}" in s for items in t["templates"].values() for s in items)
    assert templates_for("X-Ray", t) == raw["templates"]["xray"]  # case-insensitive, via alias
    assert templates_for("CXR", t) == raw["templates"]["xray"]
    assert templates_for("dermoscopy", t) == raw["templates"]["dermoscopy"]
    assert templates_for("thermal", t) == templates_for(None, t) == raw["templates"]["default"]
    assert label_text("benign-nodule") == "benign nodule" and label_text("basal_cell  carcinoma") == \
        "basal cell carcinoma"


def test_user_templates_are_validated(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"default": ["an image of a lesion"]}))
    with pytest.raises(VlmindexError, match="no \\{label\\} placeholder"):
        load_templates(bad)
    bad.write_text(json.dumps({"xray": ["{label}"]}))
    with pytest.raises(VlmindexError, match="'default' entry"):
        load_templates(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"default": ["{label}"], "xray": ["x-ray of {label}"]}))
    assert templates_for("xray", load_templates(good)) == ["x-ray of {label}"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    # seed 3: a random tiny CLIP whose predictions are not one class everywhere (checked below)
    return mf.make_hf_clip_dir(tmp_path_factory.mktemp("zs") / "tiny-clip", seed=3)


def _numpy_zeroshot(ws: Workspace, model: str, condition: str, clip_dir: Path):
    """The definition, computed independently: per modality, mean of unit prompt vectors, cosine argmax."""
    from vlmindex.models import load_model

    templates = json.loads(resources.files("vlmindex").joinpath("prompts", "templates.json").read_text())
    ids, vecs = store.read_embeddings(ws.embeddings_dir(model, "demo", condition))
    with ws.read() as con:
        meta = {r[0]: (r[1], r[2]) for r in con.execute(
            "SELECT image_id, label, modality FROM images WHERE dataset = 'demo'").fetchall()}
    ex = load_model(model)
    labels = np.array([meta[i][0] for i in ids], dtype=object)
    mods = np.array([meta[i][1] for i in ids], dtype=object)
    pred = np.empty(len(ids), dtype=object)
    for m in sorted(set(mods)):
        classes = sorted(set(labels[mods == m]))
        w = []
        for c in classes:
            prompts = [t.replace("{label}", c.replace("-", " ")) for t in templates["templates"][m]]
            t = ex.encode_text(prompts).numpy().astype(np.float64)
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            w.append(t.mean(axis=0) / np.linalg.norm(t.mean(axis=0)))
        x = vecs[mods == m].astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        pred[mods == m] = np.array(classes, dtype=object)[np.argmax(x @ np.array(w).T, axis=1)]
    return labels, mods, pred


def test_tiny_clip_zero_shot_matches_numpy(vlm, synth_ws, clip_dir):
    model = f"local-dir:{clip_dir}"
    vlm(synth_ws, "overlay", "add", "demo", "wrong", *WRONG)
    for cond in ("clean", "wrong"):
        vlm(synth_ws, "embed", "-m", model, "-d", "demo", "-c", cond, "--workers", "0")
    out = vlm(synth_ws, "zeroshot", "-m", model, "-d", "demo", "-c", "wrong", "--format", "json").out
    got = {(r["condition"], r["modality"]): r for r in json.loads(out)}
    modalities = ("dermoscopy", "xray", "ultrasound", "all")
    assert set(got) == {(c, m) for c in ("clean", "wrong") for m in modalities}
    ws = Workspace(synth_ws)
    varied = False
    for cond in ("clean", "wrong"):
        labels, mods, pred = _numpy_zeroshot(ws, model, cond, clip_dir)
        for m in ("dermoscopy", "xray", "ultrasound", "all"):
            sel = np.ones(len(labels), bool) if m == "all" else mods == m
            r = got[(cond, m)]
            assert r["n"] == sel.sum()
            assert r["accuracy"] == pytest.approx(np.mean(pred[sel] == labels[sel]), abs=1e-12)
            assert r["balanced_accuracy"] == pytest.approx(
                balanced_accuracy_score(labels[sel].astype(str), pred[sel].astype(str)), abs=1e-12)
            varied |= m != "all" and len(set(pred[sel])) > 1
    assert varied, "the fixture model predicts one class everywhere; the comparison would prove little"
    assert got[("clean", "all")]["written_share"] is None
    assert got[("wrong", "all")]["written_share"] is not None
    shipped = json.loads(vlm(synth_ws, "sql", "zeroshot", "--format", "json").out)
    wrong_all = [r for r in shipped if r["condition"] == "wrong" and r["modality"] == "all"]
    assert len(wrong_all) == 1 and wrong_all[0]["same_prompts"] is True
    assert wrong_all[0]["d_acc"] == pytest.approx(got[("wrong", "all")]["accuracy"]
                                                  - got[("clean", "all")]["accuracy"], abs=1e-4)
    # Text features from other weights than the images were embedded with are refused.
    other = mf.make_hf_clip_dir(clip_dir.parent / "other-clip", seed=4)
    err = vlm(synth_ws, "zeroshot", "-m", model, "-d", "demo", "--checkpoint", other, expect=1).err
    assert "not those that embedded" in err and "--checkpoint" in err


def test_models_without_a_text_tower_are_refused(vlm, synth_ws):
    err = vlm(synth_ws, "zeroshot", "-m", "raw-pixels", "-d", "demo", expect=1).err
    assert err.startswith("Error: model 'raw-pixels' has no text tower") and err.count("\n") == 1
    err = vlm(synth_ws, "zeroshot", "-m", "my-imported-feats", "-d", "demo", expect=1).err
    assert "'my-imported-feats'" in err and "no text tower" in err and err.count("\n") == 1


class ControlledTextTower:
    """encode_text with known outputs: slot axis of the class named in the prompt, and on the first
    template of each modality a decoy axis at 100x the length.

    Averaging the *normalised* prompt vectors keeps the slot axis dominant; averaging raw ones would
    let the decoy win. With C classes, class i has slot axis i and decoy axis C + i. A prompt is
    matched to its class by filling every template with every class name, not by substring: one
    class name can be part of another ("benign" in "benign nodule").
    """

    def __init__(self, classes: list[str], templates: dict) -> None:
        self.classes = classes
        self.dim = 2 * len(classes)
        first = {t[0] for t in templates["templates"].values()}
        self.prompts: dict[str, int] = {}
        self.first: set[str] = set()
        for template in {t for group in templates["templates"].values() for t in group}:
            for i, c in enumerate(classes):
                prompt = template.replace("{label}", label_text(c))
                assert self.prompts.setdefault(prompt, i) == i, prompt
                if template in first:
                    self.first.add(prompt)
        self.calls = 0

    def encode_text(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim))
        for row, text in enumerate(texts):
            i = self.prompts[text]
            if text in self.first:
                out[row, len(self.classes) + i] = 100.0
            else:
                out[row, i] = 1.0
        return out


def _import(vlm, ws: Path, model: str, cond: str, ids, vecs, tmp_path: Path) -> None:
    f = tmp_path / f"{model}-{cond}.parquet"
    pq.write_table(pa.table({"image_id": pa.array(np.asarray(ids, dtype=np.int64)),
                             "embedding": pa.array([list(map(float, v)) for v in vecs],
                                                   pa.list_(pa.float32()))}), f)
    vlm(ws, "embeddings", "import", f, "-m", model, "-d", "demo", "-c", cond)


def test_argmax_over_normalised_prompt_means_within_the_modality(vlm, synth_ws, tmp_path):
    ws = Workspace(synth_ws)
    with ws.read() as con:
        rows = con.execute("SELECT image_id, label, modality FROM images WHERE dataset = 'demo' "
                           "ORDER BY image_id").fetchall()
    classes = sorted({r[1] for r in rows})
    other = {c: next(o for o in classes if o != c and any(r[1] == o and r[2] == m for r in rows))
             for c, m in {(r[1], r[2]) for r in rows}}
    axis = {c: i for i, c in enumerate(classes)}
    tower = ControlledTextTower(classes, load_templates())
    clean = []
    for _, label, modality in rows:
        v = np.zeros(tower.dim)
        v[axis[label]] = 1.0
        v[len(classes) + axis[other[label]]] = 0.5  # would win if raw prompt vectors were averaged
        if modality != "dermoscopy":
            v[axis["naevus"]] = 2.0  # would win if classes of every modality competed
        clean.append(v)
    ids = [r[0] for r in rows]
    _import(vlm, synth_ws, "controlled", "clean", ids, clean, tmp_path)

    vlm(synth_ws, "overlay", "add", "demo", "wrong", *WRONG)
    # Overlaid embeddings: every other image moves onto its written (wrong) class's slot.
    from vlmindex.catalog.datasets import class_pools
    from vlmindex.overlay import get_condition, overlay_text_for

    with ws.read() as con:
        recipe, pools = get_condition(con, "demo", "wrong"), class_pools(con, "demo")
    written = [overlay_text_for(recipe, image_id=i, label=lab, class_names=pools[m]) for i, lab, m in rows]
    moved = np.array([k % 2 == 0 for k in range(len(rows))])
    over = []
    for v, w, mv in zip(clean, written, moved, strict=True):
        v = v.copy()
        if mv:
            v[axis[w]] = 3.0
        over.append(v)
    _import(vlm, synth_ws, "controlled", "wrong", ids, over, tmp_path)

    out = zeroshot(ws, "controlled", "demo", ["wrong"], extractor=tower)
    got = {(r["condition"], r["modality"]): r for r in out}
    assert tower.calls >= 1
    for m in ("dermoscopy", "xray", "ultrasound", "all"):
        assert got[("clean", m)]["accuracy"] == 1.0
        assert got[("clean", m)]["balanced_accuracy"] == 1.0
    assert got[("wrong", "all")]["accuracy"] == pytest.approx(1 - moved.mean())
    assert got[("wrong", "all")]["written_share"] == pytest.approx(moved.mean())
    assert got[("wrong", "all")]["written_share_clean"] == 0.0
    assert got[("wrong", "all")]["flip_rate"] == pytest.approx(moved.mean())
    with ws.read() as con:
        n, hashes = con.execute("SELECT count(*), count(DISTINCT prompts_sha256) FROM zeroshot_results "
                                "WHERE model = 'controlled'").fetchone()
    assert (n, hashes) == (8, 1)
