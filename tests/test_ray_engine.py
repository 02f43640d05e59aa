"""`embed --engine ray` on a local Ray with 2 CPUs: the local engine's parts and vectors, and resume after SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlmindex.catalog import parts as store
from vlmindex.catalog.workspace import Workspace
from vlmindex.embed import EmbedOptions, embed


def catalog_ids(ws: Workspace, split: str | None = None) -> np.ndarray:
    with ws.read() as con:
        rows = con.execute("SELECT image_id FROM images WHERE dataset = 'demo'" + (" AND split = ?" if split else ""),
                           [split] if split else []).fetchall()
    return np.array(sorted(r[0] for r in rows), dtype=np.int64)


def part_ids(out_dir: Path) -> np.ndarray:
    return np.concatenate([pq.read_table(p, columns=["image_id"])["image_id"].to_numpy()
                           for p in store.part_paths(out_dir)])


@pytest.fixture
def ray_tmp():
    """A short Ray temp root of this test's own (its sockets must fit in 107 bytes), and no Ray
    process of it left afterwards, even one that a killed driver left behind."""
    root = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    yield root
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            # Ray renames its agents ("ray::DashboardAgent"); their environment still names the root.
            if root.encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    shutil.rmtree(root, ignore_errors=True)


def test_ray_engine_stores_the_local_engines_vectors_once_per_image(synth_ws, tmp_path, vlm, ray_tmp, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    local_ws = tmp_path / "local"
    local_ws.mkdir()
    shutil.copy(synth_ws / "catalog.duckdb", local_ws / "catalog.duckdb")
    embed(Workspace(local_ws), "hog", "demo", options=EmbedOptions(num_workers=0, progress=False))

    out = vlm(synth_ws, "embed", "-m", "hog", "-d", "demo", "--engine", "ray", "--batch-size", "8",
              "--part-size", "16").out
    assert "embedded 72 images" in out
    assert not ray.is_initialized()  # the local Ray it started is shut down
    ws = Workspace(synth_ws)
    ids = part_ids(ws.embeddings_dir("hog", "demo"))
    assert len(ids) == len(np.unique(ids)) == 72
    ray_ids, ray_vecs = store.read_embeddings(ws.embeddings_dir("hog", "demo"))
    local_ids, local_vecs = store.read_embeddings(Workspace(local_ws).embeddings_dir("hog", "demo"))
    assert np.array_equal(ray_ids, local_ids) and np.array_equal(ray_ids, catalog_ids(ws))
    np.testing.assert_allclose(ray_vecs, local_vecs, atol=1e-6, rtol=0)
    # The local engine sees the Ray engine's parts as its own: nothing left to do.
    assert "already embedded (72 images)" in vlm(synth_ws, "embed", "-m", "hog", "-d", "demo").out
    with ws.read() as con:
        assert con.execute("SELECT count(*), sum(n) FROM runs WHERE model = 'hog'").fetchone() == (1, 72)


def test_sigkill_of_the_ray_driver_midway_then_a_rerun_gives_one_embedding_per_image(synth_ws, ray_tmp,
                                                                                      monkeypatch):
    ws = Workspace(synth_ws)
    # 36 parts of 2 images through a ViT: a few seconds, time to land a kill between parts.
    model = "untrained-vit-tiny"
    out_dir = ws.embeddings_dir(model, "demo")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    cmd = [sys.executable, "-m", "vlmindex", "-w", str(synth_ws), "embed", "-m", model, "-d", "demo",
           "--batch-size", "2", "--part-size", "2", "--engine", "ray"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(store.part_paths(out_dir)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    test_ids = catalog_ids(ws)
    done_before = len(store.stored_ids(out_dir))
    assert 0 < done_before < len(test_ids), "the kill should land midway"

    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    report = embed(ws, model, "demo", options=EmbedOptions(engine="ray", batch_size=2, part_size=2, progress=False))
    assert report.embedded == len(test_ids) - done_before
    ids = part_ids(out_dir)
    assert len(ids) == len(np.unique(ids)) == len(test_ids)
    assert np.array_equal(np.sort(ids), test_ids)
    assert not list(out_dir.glob(".*.tmp"))


def test_ray_options_need_the_ray_engine(vlm, synth_ws):
    res = vlm(synth_ws, "embed", "-m", "hog", "-d", "demo", "--replicas", "2", expect=1)
    assert "need --engine ray" in res.err and "Traceback" not in res.err
