"""FAISS indexes: exact search equals NumPy brute force; approximate kinds are measured; staleness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmindex import index as vindex
from vlmindex.catalog import parts as store
from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError


def clustered(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    x = centres[labels] + 0.8 * rng.normal(size=(n, dim))
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)
    return ids, x.astype(np.float32), labels


def test_flat_search_equals_numpy_brute_force():
    ids, x, _ = clustered(3000, 64, 5)
    idx, _ = vindex.build(ids, x, "flat")
    q = x[:200]
    scores, got = vindex.search(idx, q, 10)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)
    # where scores are not tied the order must be identical
    assert (got == ids[expected]).mean() > 0.999
    assert np.all(got[:, 0] == ids[:200])


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_kinds_reach_high_recall(kind):
    ids, x, labels = clustered(5000, 32, 7, seed=1)
    idx, params = vindex.build(ids, x, kind)
    rec = vindex.measure_recall(idx, ids, x, labels, k=10, sample=200)
    assert rec["recall"] >= 0.95, (kind, params, rec)
    assert set(rec["per_class"]) == {str(c) for c in range(7)}


def test_recall_at_k_counts_overlap():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 2, 9], [5, 6, 7, 8]])
    np.testing.assert_allclose(vindex.recall_at_k(exact, approx), [0.75, 1.0])


def test_index_build_sidecar_staleness_and_rebuild(vlm, synth_ws):
    vlm(synth_ws, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    out = json.loads(vlm(synth_ws, "index", "build", "-m", "raw-pixels", "-d", "demo", "--format", "json").out)
    assert out[0]["kind"] == "flat" and out[0]["count"] == 72 and out[0]["status"] == "built"
    again = json.loads(vlm(synth_ws, "index", "build", "-m", "raw-pixels", "-d", "demo", "--format", "json").out)
    assert again[0]["status"] == "up to date"

    ws = Workspace(synth_ws)
    sidecar = json.loads(ws.index_path("raw-pixels", "demo").with_suffix(".json").read_text())
    assert {"kind", "params", "dim", "count", "build_seconds", "checksum"} <= set(sidecar)

    # change the embeddings: the index is stale, query refuses it, build rebuilds it
    ids, vecs = store.read_embeddings(ws.embeddings_dir("raw-pixels", "demo"))
    for p in store.part_paths(ws.embeddings_dir("raw-pixels", "demo")):
        p.unlink()
    store.write_part(ws.embeddings_dir("raw-pixels", "demo"), model="raw-pixels", dataset="demo",
                     condition="clean", image_ids=ids, embeddings=vecs[::-1].copy())
    with pytest.raises(VlmindexError, match="stale"):
        vindex.load_index(ws, "raw-pixels", "demo")
    rebuilt = json.loads(vlm(synth_ws, "index", "build", "-m", "raw-pixels", "-d", "demo", "--format", "json").out)
    assert rebuilt[0]["status"] == "built"
    vindex.load_index(ws, "raw-pixels", "demo")

    hnsw = json.loads(vlm(synth_ws, "index", "build", "-m", "raw-pixels", "-d", "demo", "--kind", "hnsw",
                          "--format", "json").out)
    assert hnsw[0]["kind"] == "hnsw" and 0.0 <= hnsw[0]["recall@10"] <= 1.0
    assert set(hnsw[0]["recall_per_class"]) == {"naevus", "seborrhoeic-keratosis", "melanoma", "benign-nodule",
                                                 "malignant-mass", "normal", "benign", "malignant"}


def test_index_build_without_embeddings_says_which_command(vlm, synth_ws):
    bad = vlm(synth_ws, "index", "build", "-m", "hog", "-d", "demo", expect=1)
    assert "vlmindex embed --model hog --dataset demo" in bad.err


def test_search_uses_a_gpu_copy_only_when_faiss_sees_a_gpu(monkeypatch):
    """GPU FAISS (the `gpu` extra) is used for flat/IVF search when a GPU is there; with none, or
    for a kind without a GPU version, the CPU index answers. The GPU itself is faked here."""
    x = np.random.default_rng(3).standard_normal((50, 8)).astype(np.float32)
    ids = np.arange(50, dtype=np.int64)
    flat, _ = vindex.build(ids, x, "flat")
    cpu = vindex.search(flat, x[:3], 2, gpu=True)  # faiss-cpu: no GPU, the index itself
    assert vindex._gpu_count() == 0 and vindex.on_gpu(flat) is flat
    copied = []

    def to_gpus(index):
        inner = vindex.faiss.downcast_index(index.index) if hasattr(index, "index") else index
        if "HNSW" in type(inner).__name__:
            raise RuntimeError("no GPU version of this index")
        copied.append(index)
        return index  # stands in for the GPU copy: it searches the same way

    monkeypatch.setattr(vindex, "_gpu_count", lambda: 1)
    monkeypatch.setattr(vindex.faiss, "index_cpu_to_all_gpus", to_gpus)
    on_gpu = vindex.search(flat, x[:3], 2, gpu=True)
    assert copied == [flat]
    np.testing.assert_array_equal(on_gpu[1], cpu[1])
    hnsw, _ = vindex.build(ids, x, "hnsw")
    assert vindex.on_gpu(hnsw) is hnsw and copied == [flat]
    vindex.search(flat, x[:3], 2)  # gpu=False (the service's resident indexes): never copied
    assert copied == [flat]
