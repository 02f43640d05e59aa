"""Workspace: schema versioning (migrate older, refuse newer), views on a fresh workspace, env var."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlmindex.catalog import workspace as wsmod
from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError, WorkspaceBusy


def test_fresh_workspace_has_schema_and_empty_views(tmp_path):
    ws = Workspace(tmp_path / "w")
    with ws.read() as con:
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert int(version) == wsmod.SCHEMA_VERSION
        assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM neighbors").fetchone()[0] == 0
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"images", "datasets", "skipped", "conditions", "runs", "query_metrics", "summaries"} <= tables


def test_newer_workspace_is_refused(tmp_path, vlm):
    ws = Workspace(tmp_path / "w")
    with ws.write() as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(wsmod.SCHEMA_VERSION + 1)])
    res = vlm(ws.root, "datasets", expect=1)
    assert "newer than this vlmindex understands" in res.err and "upgrade vlmindex" in res.err


def test_older_workspace_is_migrated(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "w")
    with ws.write() as con:
        con.execute("DROP TABLE summaries")  # pretend v1 lacked it and v2 adds a column to images
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(wsmod.SCHEMA_VERSION)])
    calls = []

    def to_next(con):
        calls.append(1)
        con.execute("ALTER TABLE images ADD COLUMN migrated_flag BOOLEAN")

    monkeypatch.setattr(wsmod, "SCHEMA_VERSION", wsmod.SCHEMA_VERSION + 1)
    monkeypatch.setitem(wsmod.MIGRATIONS, wsmod.SCHEMA_VERSION - 1, to_next)
    with ws.read() as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
            wsmod.SCHEMA_VERSION)
        cols = {r[0] for r in con.execute("DESCRIBE images").fetchall()}
        assert "migrated_flag" in cols
        # schema.sql re-applied after the migration restores tables the old version lacked
        con.execute("SELECT count(*) FROM summaries").fetchone()
    assert calls == [1]


def test_missing_migration_is_a_clear_error(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "w")
    with ws.write():
        pass
    monkeypatch.setattr(wsmod, "SCHEMA_VERSION", wsmod.SCHEMA_VERSION + 1)
    with pytest.raises(VlmindexError, match="no migration"), ws.write():
        pass


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    ws = Workspace(tmp_path / "w")
    with ws.lock(), pytest.raises(WorkspaceBusy, match="busy: pid"), ws.lock(wait=0.3):
        pass
    with ws.lock():  # released
        pass


def test_env_var_selects_the_workspace(tmp_path, monkeypatch, vlm):
    monkeypatch.setenv("VLMINDEX_WORKSPACE", str(tmp_path / "from-env"))
    # Read-only commands no longer create a workspace (issue 9), so a writing one makes it here.
    vlm(None, "sql", "--write", "SELECT 1")
    assert (tmp_path / "from-env" / "catalog.duckdb").exists()
    assert json.loads(vlm(None, "datasets", "--format", "json").out) == []


def test_slug_keeps_distinct_names_distinct():
    names = ["hf-hub:org/repo", "hf-hub_org_repo", "local-dir:/x/y", "hog"]
    slugs = [wsmod.slug(n) for n in names]
    assert len(set(slugs)) == len(names) and wsmod.slug("hog") == "hog"
    assert all("/" not in s and ":" not in s for s in slugs)


def test_reader_waits_for_a_short_write_in_another_process(tmp_path):
    import subprocess
    import sys
    import time

    ws = Workspace(tmp_path / "w")
    with ws.write():
        pass
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from vlmindex.catalog.workspace import Workspace\n"
        "with Workspace(sys.argv[1]).write():\n"
        "    print('holding', flush=True); time.sleep(1.5)\n"), str(ws.root)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    t = time.monotonic()
    with ws.read() as con:  # DuckDB refuses while the writer is open; read() waits it out
        assert con.execute("SELECT count(*) FROM images").fetchone() == (0,)
    assert time.monotonic() - t > 0.5
    holder.wait()
    with pytest.raises(WorkspaceBusy, match="busy"):
        blocker = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from vlmindex.catalog.workspace import Workspace\n"
            "with Workspace(sys.argv[1]).write():\n"
            "    print('holding', flush=True); time.sleep(5)\n"), str(ws.root)], stdout=subprocess.PIPE, text=True)
        assert blocker.stdout.readline().strip() == "holding"
        try:
            with ws.read(wait=0.5):
                pass
        finally:
            blocker.kill()
            blocker.wait()


def test_v1_workspace_with_legacy_parts_is_migrated(synth_ws):
    """A workspace of vlmindex 0.1 (schema v1, parts without `part`/`pixels`) opens, keeps its
    embeddings, and serves them through the views and the reader."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmindex.catalog import RunKey
    from vlmindex.catalog import parts as store
    from vlmindex.catalog.embeddings import read_run

    ws = Workspace(synth_ws)
    with ws.read() as con:
        ids = np.array([r[0] for r in con.execute("SELECT image_id FROM images ORDER BY image_id").fetchall()])
    vectors = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    n = len(ids)
    legacy = pa.table({
        "model": pa.array(["old"] * n).dictionary_encode(), "dataset": pa.array(["demo"] * n).dictionary_encode(),
        "condition": pa.array(["clean"] * n).dictionary_encode(), "image_id": pa.array(ids),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8),
    })
    out = ws.embeddings_dir("old", "demo")
    out.mkdir(parents=True)
    pq.write_table(legacy, out / "part-0000018a1b2c3d4e-0123abcd.parquet")
    with ws.write() as con:
        for table, column in [("summaries", "inputs_fingerprint"), ("summaries", "n_missing"),
                              ("skipped", "stage"), ("text_detections", "pixels"), ("runs", "recorded_from")]:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with ws.read() as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
            wsmod.SCHEMA_VERSION)
        assert {"inputs_fingerprint", "probe_balanced_accuracy_sd"} <= {
            r[0] for r in con.execute("DESCRIBE summaries").fetchall()}
        assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM embeddings").fetchone() == (n, n)
    (part,) = store.part_paths(out)
    assert {"part", "pixels"} <= set(pq.read_schema(part).names)
    run = read_run(ws, RunKey("old", "demo"))
    assert np.array_equal(run.ids, ids) and np.array_equal(run.vectors, vectors)


def test_v2_workspace_gets_the_v3_probe_columns(vlm, synth_ws):
    """A v2 catalog (no probe sd column) is migrated on open, keeps its analyses, and takes new ones."""
    vlm(synth_ws, "embed", "-m", "color-hist", "-d", "demo", "--workers", "0")
    vlm(synth_ws, "analyze", "-m", "color-hist", "-d", "demo", "-k", "3", "--no-probe")
    ws = Workspace(synth_ws)
    with ws.write() as con:
        con.execute("ALTER TABLE summaries DROP COLUMN probe_balanced_accuracy_sd")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with ws.read() as con:  # through v3 to the current version (v4 added the sampled-query columns)
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
            wsmod.SCHEMA_VERSION)
        cols = {r[0] for r in con.execute("DESCRIBE summaries").fetchall()}
        assert {c for added in wsmod.V3_COLUMNS for c in (x.split()[0] for x in added["summaries"])} <= cols
        assert con.execute("SELECT count(*), count(probe_balanced_accuracy_sd) FROM summaries").fetchone() == (1, 0)
    vlm(synth_ws, "analyze", "-m", "color-hist", "-d", "demo", "-k", "3", "--probe-seeds", "2")
    with ws.read() as con:
        assert con.execute("SELECT count(probe_balanced_accuracy_sd) FROM summaries").fetchone() == (1,)


def test_write_wait_comes_from_the_environment(monkeypatch):
    from vlmindex.errors import VlmindexError

    monkeypatch.delenv(wsmod.ENV_WRITE_WAIT, raising=False)
    assert wsmod.write_wait() == 30.0
    monkeypatch.setenv(wsmod.ENV_WRITE_WAIT, "2.5")
    assert wsmod.write_wait() == 2.5
    monkeypatch.setenv(wsmod.ENV_WRITE_WAIT, "soon")
    with pytest.raises(VlmindexError, match=r"\$VLMINDEX_WRITE_WAIT='soon' is not a number of seconds"):
        wsmod.write_wait()


def test_piped_output_carries_no_progress_bar_of_duckdb(tmp_path):
    """DuckDB draws a progress bar on stdout for a query that runs over 2 s; `--format csv|json` piped
    to a file or another program must hold the rows only (seen at 100k images: `analyze --format json`
    once began with the bar and did not parse). In a child process: pytest's capture changes DuckDB's
    default."""
    ws = tmp_path / "ws"
    slow = "SELECT count(*) FROM range(600000000) t(i) WHERE hash(i) % 7 = 1"
    code = ("import sys\n"
            "from vlmindex.catalog.workspace import Workspace\n"
            "w = Workspace(sys.argv[1])\n"
            "for opened in (lambda: w.write(), lambda: w.read()):\n"
            "    with opened() as con:\n"
            f"        con.execute({slow!r}).fetchall()\n")
    res = subprocess.run([sys.executable, "-c", code, str(ws)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "", res.stdout[:200]
