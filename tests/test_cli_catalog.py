"""`vlmindex ingest` through the CLI: summary line, exit codes, --strict, --replace, busy workspace."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmindex.catalog.workspace import Workspace
from vlmindex.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def run(*args: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real entry point (it maps VlmindexError to exit 1); (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "lesions"
    png(root / "train" / "benign" / "b1.png", 1)
    png(root / "train" / "malignant" / "m1.png", 2)
    png(root / "test" / "benign" / "b2.png", 3)
    return root


@pytest.fixture
def wsdir(tmp_path: Path) -> Path:
    return tmp_path / "ws"


def test_ingest_summary_line_and_exit_zero(folder: Path, wsdir: Path, capsys) -> None:
    code, out, err = run("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder", capsys=capsys)
    assert code == 0, err
    assert out.strip() == "ingested 3 images into 'les' (3 in total), skipped 0"

    (folder / "test" / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "test" / "benign" / "empty.png").write_bytes(b"")
    code, out, err = run("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder", capsys=capsys)
    assert code == 0, err                    # some skipped, some ingested: still a success
    assert out.strip() == (
        "ingested 3 images into 'les' (3 in total), skipped 2; see them with: "
        "vlmindex sql \"SELECT * FROM skipped WHERE dataset = 'les'\""
    )
    code, out, _ = run("-w", wsdir, "sql", "SELECT path, reason FROM skipped ORDER BY path",
                       "--format", "json", capsys=capsys)
    assert code == 0
    rows = json.loads(out)
    assert [Path(r["path"]).name for r in rows] == ["broken.png", "empty.png"]
    assert rows[1]["reason"] == "zero-byte file"


def test_strict_exits_non_zero_only_when_something_was_skipped(folder: Path, wsdir: Path, capsys) -> None:
    code, out, _ = run("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder", "--strict",
                       capsys=capsys)
    assert code == 0 and "skipped 0" in out
    (folder / "train" / "benign" / "notes.txt").write_text("hello")
    code, out, err = run("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder", "--strict",
                         capsys=capsys)
    assert code == 2
    assert "ingested 3 images" in out and "skipped 1" in out
    assert "--strict" in err
    # What was read is kept even though the command failed.
    ws = Workspace(wsdir)
    with ws.read() as con:
        assert con.execute("SELECT count(*) FROM images WHERE dataset = 'les'").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM skipped").fetchone()[0] == 1


def test_nothing_ingested_is_an_error(tmp_path: Path, wsdir: Path, capsys) -> None:
    junk = tmp_path / "junk" / "cls"
    junk.mkdir(parents=True)
    (junk / "a.jpg").write_text("not a jpeg")
    (junk / "b.png").write_bytes(b"")
    code, out, err = run("-w", wsdir, "ingest", "junk", junk.parent, "--format", "imagefolder",
                         capsys=capsys)
    assert code == 1
    assert "ingested 0 images" in out and "skipped 2" in out
    assert err.startswith("Error: nothing was ingested")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run("-w", wsdir, "ingest", "empty", empty, "--format", "imagefolder", capsys=capsys)
    assert code == 1 and "nothing was ingested" in err


def test_user_errors_are_one_line(tmp_path: Path, wsdir: Path, capsys) -> None:
    code, _, err = run("-w", wsdir, "ingest", "x", tmp_path / "missing", "--format", "imagefolder",
                       capsys=capsys)
    assert code == 1 and err.startswith("Error: source") and "does not exist" in err
    assert "Traceback" not in err
    code, _, err = run("-w", wsdir, "ingest", "bad name!", tmp_path, "--format", "imagefolder",
                       capsys=capsys)
    assert code == 1 and "invalid dataset name" in err
    code, _, err = run("-w", wsdir, "ingest", "x", tmp_path, "--format", "nifti", capsys=capsys)
    assert code == 2 and "nifti" in err                  # click's usage error


def test_reingest_and_replace_through_cli(folder: Path, wsdir: Path, capsys) -> None:
    args = ("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder")
    run(*args, capsys=capsys)
    ws = Workspace(wsdir)
    with ws.read() as con:
        ids = sorted(r[0] for r in con.execute("SELECT image_id FROM images").fetchall())
    code, out, _ = run(*args, capsys=capsys)
    assert code == 0 and "(3 in total)" in out
    with ws.read() as con:
        assert sorted(r[0] for r in con.execute("SELECT image_id FROM images").fetchall()) == ids
    (folder / "test" / "benign" / "b2.png").unlink()
    code, out, _ = run(*args, capsys=capsys)
    assert "(3 in total)" in out                         # kept: re-ingest only adds
    code, out, _ = run(*args, "--replace", capsys=capsys)
    assert code == 0 and out.startswith("ingested 2 images into 'les' (2 in total)")


def test_csv_flags_reach_the_adapter(tmp_path: Path, wsdir: Path, capsys) -> None:
    png(tmp_path / "imgs" / "p1_a.png", 1)
    png(tmp_path / "imgs" / "p1_b.png", 2)
    png(tmp_path / "imgs" / "p2_a.png", 3)
    manifest = tmp_path / "meta" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text("img;diag;part\np1_a;nevus;train\np1_b;nevus;test\np2_a;melanoma;train\n")
    code, out, err = run("-w", wsdir, "ingest", "m", manifest, "--format", "csv", "--path-col", "img",
                         "--label-col", "diag", "--split-col", "part", "--image-root", tmp_path / "imgs",
                         "--ext", ".png", "--group-regex", r"^(p\d+)_", "--modality", "dermoscopy",
                         capsys=capsys)
    assert code == 0, err
    assert out.startswith("ingested 3 images")
    with Workspace(wsdir).read() as con:
        rows = con.execute("SELECT label, split, group_id, modality FROM images ORDER BY path").fetchall()
    assert rows == [("nevus", "train", "p1", "dermoscopy"), ("nevus", "test", "p1", "dermoscopy"),
                    ("melanoma", "train", "p2", "dermoscopy")]


def test_medmnist_through_cli(tmp_path: Path, wsdir: Path, capsys) -> None:
    src = tmp_path / "any.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(src, train_images=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
                        train_labels=np.array([[0], [1], [1], [0]], dtype=np.uint8))
    code, out, err = run("-w", wsdir, "ingest", "pn", src, "--format", "medmnist",
                         "--flavour", "pneumoniamnist", capsys=capsys)
    assert code == 0, err
    with Workspace(wsdir).read() as con:
        got = con.execute("SELECT label, count(*) FROM images GROUP BY label ORDER BY label").fetchall()
    assert got == [("normal", 2), ("pneumonia", 2)]
    chest = tmp_path / "chestmnist.npz"
    np.savez(chest, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 14)))
    code, _, err = run("-w", wsdir, "ingest", "chest", chest, "--format", "medmnist", capsys=capsys)
    assert code == 1 and "multi-label" in err


HOLDER = textwrap.dedent(
    """
    import sys
    from vlmindex.catalog.workspace import Workspace
    with Workspace(sys.argv[1]).write() as con:
        con.execute("SELECT count(*) FROM images").fetchone()
        print("holding", flush=True)
        sys.stdin.read()          # hold the lock until the test closes our stdin
    """
)


def test_second_writer_gets_busy_message(folder: Path, wsdir: Path, capsys) -> None:
    code, _, _ = run("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder", capsys=capsys)
    assert code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(wsdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        code, out, err = run("-w", wsdir, "ingest", "other", folder, "--format", "imagefolder",
                             capsys=capsys)
        assert code == 1
        assert "busy" in err and err.startswith("Error: workspace")
        assert out == ""
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    # The catalog is intact and the refused ingest left nothing behind.
    with Workspace(wsdir).read() as con:
        assert con.execute("SELECT count(*) FROM images WHERE dataset = 'les'").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM datasets").fetchone()[0] == 1
    code, out, _ = run("-w", wsdir, "ingest", "other", folder, "--format", "imagefolder", capsys=capsys)
    assert code == 0 and "(3 in total)" in out


def test_busy_while_lock_held_in_process(folder: Path, wsdir: Path, capsys) -> None:
    ws = Workspace(wsdir)
    with ws.lock():
        code, _, err = run("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder", capsys=capsys)
    assert code == 1 and "busy" in err
    code, _, _ = run("-w", wsdir, "ingest", "les", folder, "--format", "imagefolder", capsys=capsys)
    assert code == 0
