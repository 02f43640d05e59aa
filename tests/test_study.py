"""The study runner: a whole grid from one TOML file, skipping what is done and models that fail."""

from __future__ import annotations

import json
import textwrap

import pytest

from vlmindex.errors import VlmindexError
from vlmindex.study import examples_dir, load_study

STUDY = """
[study]
name = "mini"
report = "{report}"

[[datasets]]
name = "mini"
synth = {{ seed = 3, lesions_per_class = 3, views_per_lesion = 2, size = 64 }}

[[conditions]]
name = "lbl"
text = "label"
size = 0.2

[models]
names = ["raw-pixels", "biomedclip", "color-hist"]

[analysis]
k = 5
exclude_group = true
probe = false

[embed]
num_workers = 0
"""


def test_study_runs_the_grid_skips_unloadable_models_and_resumes(vlm, tmp_path):
    report = tmp_path / "mini.html"
    study = tmp_path / "mini.toml"
    study.write_text(STUDY.format(report=report))
    ws = tmp_path / "ws"

    first = vlm(ws, "run", study, "--format", "json")
    board = json.loads(first.out)
    assert {(r["model"], r["condition"]) for r in board} == {
        (m, c) for m in ("raw-pixels", "color-hist") for c in ("clean", "lbl")}
    assert "skipped 1 model(s)" in first.err
    skipped_line = next(line for line in first.err.splitlines() if line.strip().startswith("biomedclip:"))
    assert "not in the local cache" in skipped_line and "--checkpoint" in skipped_line
    assert report.exists() and "raw-pixels" in report.read_text()

    effects = json.loads(vlm(ws, "sql", "overlay_effect", "--format", "json").out)
    assert {r["model"] for r in effects} == {"raw-pixels", "color-hist"}

    second = vlm(ws, "run", study, "--format", "json")
    assert json.loads(second.out) == board
    assert "0 step(s) run" in second.err, "a finished study has nothing left to do"


def test_study_file_errors_name_the_file_and_key(tmp_path, vlm):
    bad = tmp_path / "bad.toml"
    bad.write_text(textwrap.dedent("""
        [[datasets]]
        name = "x"
        synth = {}
        [models]
        names = ["hog"]
        [analysis]
        kk = 3
    """))
    res = vlm(tmp_path / "ws", "run", bad, expect=1)
    assert "bad.toml" in res.err and "kk" in res.err and len(res.err.strip().splitlines()) == 1
    with pytest.raises(VlmindexError, match="does not exist"):
        load_study(tmp_path / "missing.toml")
    bad.write_text("[[datasets]\n")
    assert "not valid TOML" in vlm(tmp_path / "ws", "run", bad, expect=1).err


def test_shipped_studies_parse_and_the_demo_needs_no_download():
    from vlmindex.models import get_spec

    demo = load_study(examples_dir() / "demo.toml")
    assert all(get_spec(m).family == "offline" for m in demo.models)
    assert len(demo.conditions) >= 2 and demo.datasets[0].get("synth") is not None
    paper = load_study(examples_dir() / "paper.toml")
    categories = {get_spec(m).category for m in paper.models}
    assert {"medical", "general", "llm-enhanced", "baseline"} <= categories
    assert {"llm2clip-b16", "llm2clip-l14-336"} <= paper.trust_remote_code
