"""Shared fixtures: a small synthetic workspace made once per session, and an in-process CLI runner."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A second writer waits this long before "busy" (30 s for users): the busy tests need not wait 30 s.
os.environ.setdefault("VLMINDEX_WRITE_WAIT", "8")

SMALL_SYNTH = {"lesions_per_class": 3, "views_per_lesion": 3, "size": 64}  # 8 classes: 72 images


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def vlm(capsys):
    """Run the CLI in-process: ``vlm(ws, "datasets", "--format", "json", expect=0)``."""
    from vlmindex.cli import main

    def run(ws: Path | None, *args: object, expect: int | None = 0) -> CliResult:
        argv = (["-w", str(ws)] if ws is not None else []) + [str(a) for a in args]
        code = 0
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        if expect is not None:
            assert code == expect, f"exit {code} for {argv}\nstdout: {out}\nstderr: {err}"
        return CliResult(code, out, err)

    return run


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, which the browser tests drive; a missing one fails them (never skips)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed; the pages must be checked in a real browser: install Debian's "
                    "package (`apt-get install chromium`, as `make test` does) and rerun")
    return exe


@pytest.fixture(scope="session")
def synth_template(tmp_path_factory) -> Path:
    """A workspace holding the small synthetic set 'demo' (8 classes x 3 lesions x 3 views = 72 images)."""
    from vlmindex.catalog.workspace import Workspace
    from vlmindex.ingest import ingest_synthetic

    root = tmp_path_factory.mktemp("synth-template")
    ingest_synthetic(Workspace(root), "demo", seed=0, progress=False, **SMALL_SYNTH)
    return root


@pytest.fixture
def synth_ws(synth_template, tmp_path) -> Path:
    """A fresh workspace whose catalog holds the synthetic set (images shared, read-only)."""
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(synth_template / "catalog.duckdb", root / "catalog.duckdb")
    return root


SERVED_MODELS = ("hog", "raw-pixels")


@pytest.fixture(scope="session")
def served_ws(synth_template, tmp_path_factory) -> Path:
    """The small synthetic set embedded by two offline models, clean and with the label burned in
    ('lbl'), indexed, and analysed (k = 5, group excluded): what `serve` and `explore` are pointed at.
    Tests that write to a workspace copy it first."""
    from vlmindex.cli import main

    def cli(*args: object) -> None:
        main(["-w", str(root), *map(str, args)])

    root = tmp_path_factory.mktemp("served") / "ws"
    root.mkdir()
    shutil.copy(synth_template / "catalog.duckdb", root / "catalog.duckdb")
    cli("overlay", "add", "demo", "lbl", "--text", "label")
    for cond in ("clean", "lbl"):
        cli("embed", "-m", ",".join(SERVED_MODELS), "-d", "demo", "-c", cond, "--workers", "0")
        cli("index", "build", "-m", ",".join(SERVED_MODELS), "-d", "demo", "-c", cond)
    cli("analyze", "-m", ",".join(SERVED_MODELS), "-d", "demo", "-k", "5", "--exclude-group", "--no-probe")
    return root
