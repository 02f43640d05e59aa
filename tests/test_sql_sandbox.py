"""`vlmindex sql` cannot escape the workspace: no file outside it read or written, no database
attached, no extension installed or loaded, no Parquet part overwritten, with or without --write;
and the Parquet views work for workspace paths with glob characters, spaces and quotes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pytest

from vlmindex.catalog import parts
from vlmindex.catalog.workspace import Workspace
from vlmindex.synth import MODALITIES


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def embedded(synth_template, tmp_path_factory) -> Path:
    """The small synthetic set with raw-pixels embeddings (shared, copied per test)."""
    from vlmindex.cli import main

    root = tmp_path_factory.mktemp("sandbox") / "ws"
    root.mkdir()
    shutil.copy(synth_template / "catalog.duckdb", root / "catalog.duckdb")
    main(["-w", str(root), "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0"])  # exits only on error
    return root


@pytest.fixture
def ws(embedded, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(embedded, root)
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("patient names\n")
    con = duckdb.connect(str(d / "other.duckdb"))
    con.execute("CREATE TABLE t AS SELECT range AS a FROM range(5)")
    con.close()
    return d


def _escapes(ws: Path, outside: Path) -> dict[str, str]:
    part = parts.part_paths(Workspace(ws).embeddings_dir("raw-pixels", "demo"))[0]
    return {
        "copy to a file outside": f"COPY (SELECT 1 AS junk) TO '{outside}/stolen.csv'",
        "copy over a parquet part": f"COPY (SELECT 1 AS junk) TO '{part}'",
        "copy into the workspace": f"COPY (SELECT 1 AS junk) TO '{ws}/new.csv'",
        "read_text outside": f"SELECT * FROM read_text('{outside}/secret.txt')",
        "read_csv outside": f"SELECT * FROM read_csv('{outside}/secret.txt')",
        "replacement scan of a path": f"SELECT * FROM '{outside}/secret.txt'",
        "read a part by path": f"SELECT count(*) FROM read_parquet('{part}')",
        "glob the filesystem": f"SELECT * FROM glob('{outside}/*')",
        "attach and delete": f"ATTACH '{outside}/other.duckdb' AS o; DELETE FROM o.t",
        "install an extension": "INSTALL httpfs",
        "load an extension": "LOAD httpfs",
        "turn file access back on": "SET enable_external_access = true",
        "export the database": f"EXPORT DATABASE '{outside}/dump'",
    }


@pytest.mark.parametrize("write", [False, True], ids=["read-only", "--write"])
def test_sql_cannot_touch_files_outside_or_the_parts(vlm, ws, outside, write):
    part = parts.part_paths(Workspace(ws).embeddings_dir("raw-pixels", "demo"))[0]
    part_sha, before = _sha(part), sorted(p.name for p in outside.iterdir())
    flag = ["--write"] if write else []
    for what, statement in _escapes(ws, outside).items():
        res = vlm(ws, "sql", *flag, statement, expect=None)
        assert res.code == 1, f"{what} was allowed: {res.out}"
        assert res.err.startswith("Error: SQL error") and len(res.err.strip().splitlines()) == 1, what
    assert sorted(p.name for p in outside.iterdir()) == before, "a file appeared outside the workspace"
    assert _sha(part) == part_sha, "a Parquet part was overwritten"
    assert not (ws / "new.csv").exists()
    con = duckdb.connect(str(outside / "other.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(5,)], "an attached database was changed"
    con.close()
    # The views over the parts still answer, and the embeddings are all there.
    got = json.loads(vlm(ws, "sql", "SELECT count(*) AS n, count(DISTINCT image_id) AS d FROM embeddings",
                         "--format", "json").out)
    assert got == [{"n": 72, "d": 72}]


def test_read_only_sql_cannot_change_the_catalog_but_write_can(vlm, ws):
    res = vlm(ws, "sql", "CREATE TABLE notes AS SELECT 1 AS a", expect=1)
    assert "--write" in res.err
    vlm(ws, "sql", "--write", "CREATE TABLE notes AS SELECT 1 AS a")
    assert json.loads(vlm(ws, "sql", "SELECT a FROM notes", "--format", "json").out) == [{"a": 1}]


def test_statements_no_flag_allows_are_not_told_to_pass_write(vlm, ws):
    # --write would refuse these too: the hint must not send the user there.
    for statement in ("INSTALL httpfs", "LOAD httpfs", "ATTACH 'x.duckdb' AS x", "COPY images TO 'x.csv'"):
        res = vlm(ws, "sql", statement, expect=1)
        assert "--write" not in res.err, (statement, res.err)


def test_read_only_commands_do_not_create_a_workspace(vlm, tmp_path):
    for args in (["datasets"], ["sql", "SELECT 1"], ["overlay", "list"], ["report", "--out", tmp_path / "r.html"]):
        res = vlm(tmp_path / "nowhere", *args, expect=1)
        assert "no vlmindex workspace at" in res.err and len(res.err.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", ["ws[1]", "ws?q", "ws*", "my ws", "o'brien \"ws\""])
def test_views_read_only_their_own_workspace_whatever_its_path(vlm, synth_template, tmp_path, name):
    """A workspace named ws[1] once read the parts of a sibling ws1 (a glob match), and one named
    ws?q could not create its catalog (DuckDB reads a '?' as URL parameters)."""
    sibling = {"ws[1]": "ws1", "ws?q": "wsXq", "ws*": "ws-other"}.get(name)
    if sibling:
        other = tmp_path / sibling
        other.mkdir()
        shutil.copy(synth_template / "catalog.duckdb", other / "catalog.duckdb")
        vlm(other, "embed", "-m", "color-hist", "-d", "demo", "--workers", "0")
    root = tmp_path / name
    vlm(root, "synth", "demo", "--lesions-per-class", "2", "--views", "2", "--size", "32")
    vlm(root, "embed", "-m", "raw-pixels", "-d", "demo", "--workers", "0")
    vlm(root, "analyze", "-m", "raw-pixels", "-d", "demo", "-k", "3", "--no-probe")
    got = json.loads(vlm(root, "sql", "SELECT model, count(*) AS n FROM embeddings GROUP BY model",
                         "--format", "json").out)
    n_images = 2 * 2 * sum(len(labels) for labels in MODALITIES.values())  # 2 lesions x 2 views per class
    assert got == [{"model": "raw-pixels", "n": n_images}]
    nb = json.loads(vlm(root, "sql", "SELECT count(DISTINCT image_id) AS q FROM neighbors", "--format", "json").out)
    assert nb == [{"q": n_images}]


@pytest.mark.parametrize("statement", [
    "CREATE MACRO sha256(x) AS 'same'",                       # would make every fingerprint constant
    "DROP VIEW latest_summaries; CREATE TABLE latest_summaries AS SELECT 1 AS a",
    "CREATE OR REPLACE VIEW image_pixels AS SELECT dataset, 'clean' AS condition, image_id, 'x' AS pixels FROM images",
    "ALTER TABLE summaries DROP COLUMN inputs_fingerprint",
    "DELETE FROM images; SELECT * FROM no_such_table",        # an error after a change: nothing kept
    "BEGIN; DELETE FROM images; COMMIT",
])
def test_write_cannot_redefine_vlmindex_objects_or_leave_half_a_change(vlm, ws, statement):
    before = json.loads(vlm(ws, "sql", "SELECT count(*) AS n FROM images", "--format", "json").out)
    res = vlm(ws, "sql", "--write", statement, expect=1)
    assert res.err.startswith("Error: SQL error") and len(res.err.strip().splitlines()) == 1
    assert json.loads(vlm(ws, "sql", "SELECT count(*) AS n FROM images", "--format", "json").out) == before
    # vlmindex's own writes still work, with the fingerprints they had
    vlm(ws, "index", "build", "-m", "raw-pixels", "-d", "demo")
    assert "up to date" in vlm(ws, "index", "build", "-m", "raw-pixels", "-d", "demo").out


def test_write_may_change_rows_and_make_tables_of_ones_own(vlm, ws):
    vlm(ws, "sql", "--write", "CREATE TABLE mine AS SELECT 1 AS a; INSERT INTO mine VALUES (2)")
    vlm(ws, "sql", "--write", "UPDATE images SET label = upper(label) WHERE false")
    assert json.loads(vlm(ws, "sql", "SELECT sum(a) AS s FROM mine", "--format", "json").out) == [{"s": 3}]
    vlm(ws, "sql", "--write", "DROP TABLE mine")
