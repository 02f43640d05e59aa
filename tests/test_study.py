"""The study runner: a whole grid from one TOML file, skipping what is done and models that fail."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

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

    # the printed attack table leads with the attack figures, the kNN-accuracy delta and its CI included
    attack = vlm(ws, "run", study).out.split("Typographic attack", 1)[1].split("Findings", 1)[0]
    header = attack.splitlines()[1].split()
    for column in ("attack_map", "attack_d_map", "attack_d_map_ci", "attack_d_knn_acc", "attack_d_knn_acc_ci",
                   "attack_success"):
        assert column in header, column
    stored = next(r for r in effects if r["model"] == "raw-pixels" and r["condition"] == "lbl")
    printed = next(line for line in attack.splitlines() if "raw-pixels" in line and " lbl " in line)
    assert f"{stored['attack_d_knn_acc']}" in printed and stored["attack_d_knn_acc_ci"] in printed


PER_MODALITY_STUDY = """
[[datasets]]
name = "mini"
synth = { seed = 3, lesions_per_class = 3, views_per_lesion = 2, size = 64 }

[[conditions]]
name = "lbl"
text = "label"
size = 0.2

[models]
names = ["color-hist"]

[analysis]
k = 3
exclude_group = true
probe_seeds = 2
per_modality = true

[embed]
num_workers = 0
"""


def test_per_modality_study_analyses_each_modality_resumes_and_shows_every_block(vlm, tmp_path):
    from vlmindex.catalog import Workspace
    from vlmindex.study import leaderboard

    study_file = tmp_path / "pm.toml"
    study_file.write_text(PER_MODALITY_STUDY)
    ws = tmp_path / "ws"
    first = vlm(ws, "run", study_file, "--format", "json")
    board = json.loads(first.out)
    mods = (None, "dermoscopy", "ultrasound", "xray")
    # one row per (modality, condition): all modalities first, clean before the overlay
    assert [(r["modality"], r["condition"]) for r in board] == [(m, c) for m in mods for c in ("clean", "lbl")]
    analysed = [line.strip().rsplit(" (", 1)[0] for line in first.err.splitlines()
                if line.strip().startswith("analyze ")]
    assert analysed == [f"analyze color-hist mini/{c}" + (f" modality={m}" if m else "") for c in ("clean", "lbl")
                        for m in mods]

    study = load_study(study_file)
    assert study.per_modality and study.analysis.probe_seeds == 2 and study.analysis.modality is None
    with Workspace(ws).read() as con:
        stored = con.execute("SELECT analysis_id, modality, probe_balanced_accuracy_sd FROM summaries").fetchall()
    cols, rows = leaderboard(Workspace(ws), study)
    assert len(stored) == len(rows) == 8 and all(sd is not None for _, _, sd in stored)
    assert {r["modality"] for r in rows} == set(mods)

    second = vlm(ws, "run", study_file, "--format", "json")
    assert json.loads(second.out) == board
    assert "0 step(s) run" in second.err, "a finished per-modality study has nothing left to do"
    table = vlm(ws, "run", study_file).out
    assert [line for line in table.splitlines() if line.startswith("Leaderboard")] == [
        "Leaderboard (pm; k = 3, group-excluded): mini, " + (f"modality {m}" if m else "all modalities") for m in mods]


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
    assert all(get_spec(m).loader == "offline" for m in demo.models)
    assert len(demo.conditions) >= 2 and demo.datasets[0].get("synth") is not None
    paper = load_study(examples_dir() / "paper.toml")
    families = {get_spec(m).family for m in paper.models}
    assert {"medical", "general", "llm-enhanced", "baseline"} <= families
    assert {"llm2clip-b16", "llm2clip-l14-336"} <= paper.trust_remote_code


def _study_text(*, study: str = "", dataset: str = "synth = {}", condition: str = "",
                models: str = 'names = ["hog"]', analysis: str = "", embed: str = "") -> str:
    """A valid study with one piece swapped out by the caller."""
    return "\n".join([
        "[study]", study,
        "[[datasets]]", 'name = "x"', dataset,
        "[[conditions]]", 'name = "lbl"', 'text = "label"', condition,
        "[models]", models,
        "[analysis]", analysis,
        "[embed]", embed, "",
    ])


@pytest.mark.parametrize(("piece", "message"), [
    ({"models": 'names = "hog"'}, "[models] names must be a list of model names (strings), got 'hog'"),
    ({"models": "names = [1]"}, "[models] names must be a list of model names (strings), got [1]"),
    ({"models": 'names = ["hog"]\ncheckpoints = "x"'},
     "[models] checkpoints must be a table of model = checkpoint (strings), got 'x'"),
    ({"models": 'names = ["hog"]\ncheckpoints = { hog = 3 }'},
     "[models] checkpoints must be a table of model = checkpoint (strings), got {'hog': 3}"),
    ({"models": 'names = ["hog"]\nfamily = { hog = "doctor" }'},
     "[models] family must be a table of model = family (medical, general, llm-enhanced, baseline), "
     "got {'hog': 'doctor'}"),
    ({"models": 'names = ["hog"]\nfamily = { hgo = "medical" }'},
     "[models] family names 'hgo', not in [models] names; add them there or drop them from the table"),
    ({"models": 'names = ["hog"]\ntrust_remote_code = true'},
     "[models] trust_remote_code must be a list of model names (strings), got True"),
    ({"analysis": 'k = "ten"'}, "[analysis] k must be an integer >= 1, got 'ten'"),
    ({"analysis": "k = 0"}, "[analysis] k must be an integer >= 1, got 0"),
    ({"analysis": "k = true"}, "[analysis] k must be an integer >= 1, got True"),
    ({"analysis": 'exclude_group = "yes"'}, "[analysis] exclude_group must be true or false, got 'yes'"),
    ({"analysis": "query_split = 1"}, "[analysis] query_split must be a string, got 1"),
    ({"analysis": "gallery_split = []"}, "[analysis] gallery_split must be a string, got []"),
    ({"analysis": "modality = false"}, "[analysis] modality must be a string, got False"),
    ({"analysis": "probe = 1"}, "[analysis] probe must be true or false, got 1"),
    ({"analysis": "seed = 1.5"}, "[analysis] seed must be an integer, got 1.5"),
    ({"analysis": "probe_seeds = 0"}, "[analysis] probe_seeds must be an integer >= 1, got 0"),
    ({"analysis": 'per_modality = "yes"'}, "[analysis] per_modality must be true or false, got 'yes'"),
    ({"analysis": 'device = "gpu"'}, "[analysis] device must be one of auto, cpu, cuda, cuda:N, got 'gpu'"),
    ({"analysis": 'per_modality = true\nmodality = "xray"'},
     "[analysis] per_modality = true analyses every modality; remove modality = 'xray'"),
    ({"embed": 'batch_size = "32"'}, "[embed] batch_size must be an integer >= 1, got '32'"),
    ({"embed": "num_workers = -1"}, "[embed] num_workers must be an integer >= 0, got -1"),
    ({"embed": "dtype = 16"}, "[embed] dtype must be one of float32, float16, got 16"),
    ({"embed": "device = 0"}, "[embed] device must be a string, got 0"),
    ({"embed": "part_size = 0"}, "[embed] part_size must be an integer >= 1, got 0"),
    ({"study": "name = 3"}, "[study] name must be a string, got 3"),
    ({"study": "description = []"}, "[study] description must be a string, got []"),
    ({"study": "report = true"}, "[study] report must be a string, got True"),
    ({"study": 'overlay_effects = "no"'}, "[study] overlay_effects must be true or false, got 'no'"),
    ({"study": "zeroshot = 1"}, "[study] zeroshot must be true or false, got 1"),
    ({"dataset": "synth = true"}, "[datasets.x] synth must be a table of synth settings, got True"),
    ({"dataset": 'synth = { seed = "a" }'}, "[datasets.x] synth.seed must be an integer, got 'a'"),
    ({"dataset": "synth = { sed = 1 }"}, "unknown key(s) sed in [datasets.x.synth]"),
    ({"dataset": 'source = 3\nformat = "csv"'}, "[datasets.x] source must be a string, got 3"),
    ({"dataset": 'source = "a"\nformat = "tiff"'},
     "[datasets.x] format must be one of imagefolder, csv, medmnist, dicom, got 'tiff'"),
    ({"dataset": 'source = "a"\nformat = "imagefolder"\nexclude = "*_mask*"'},
     "[datasets.x] exclude must be a list of glob patterns (strings), got '*_mask*'"),
    ({"dataset": 'source = "a"\nformat = "imagefolder"\ngroup_regex = "("'},
     "[datasets.x] group_regex must be a regular expression"),
    ({"dataset": 'source = "a"\nformat = "imagefolder"\nfollow_symlinks = "yes"'},
     "[datasets.x] follow_symlinks must be true or false, got 'yes'"),
    ({"dataset": 'source = "a"\nformat = "csv"\nimage_root = 3'}, "[datasets.x] image_root must be a string, got 3"),
    ({"dataset": 'source = "a"\nformat = "csv"\npath_col = 1'}, "[datasets.x] path_col must be a string, got 1"),
    ({"condition": "size = \"big\""}, "[conditions.lbl] size must be a number, got 'big'"),
    ({"condition": "box = \"yes\""}, "[conditions.lbl] box must be true or false, got 'yes'"),
    ({"condition": "seed = 1.5"}, "[conditions.lbl] seed must be an integer, got 1.5"),
    ({"condition": 'datasets = "x"'}, "[conditions.lbl] datasets must be a list of dataset names (strings), got 'x'"),
    ({"condition": 'datasets = ["y"]'}, "[conditions.lbl] datasets names 'y', which is not a [[datasets]] name"),
    ({"condition": 'position = "middle"'}, "[conditions.lbl] unknown overlay position 'middle'"),
])
def test_study_field_types_are_checked_before_anything_runs(tmp_path, piece, message):
    study = tmp_path / "study.toml"
    study.write_text(_study_text(**piece))
    with pytest.raises(VlmindexError) as err:
        load_study(study)
    text = str(err.value)
    assert text.startswith(f"{study}: ") and message in text and "\n" not in text


def test_study_sections_of_the_wrong_kind_are_one_line_errors(tmp_path):
    study = tmp_path / "study.toml"
    for text, message in [
        ('datasets = "x"\n[models]\nnames = ["hog"]\n', "[[datasets]] must be an array of tables"),
        ('models = ["hog"]\n[[datasets]]\nname = "x"\nsynth = {}\n', "[models] must be a table"),
        ('[[datasets]]\nname = 3\nsynth = {}\n[models]\nnames = ["hog"]\n',
         "[[datasets]] #1 name must be 1-64 letters, digits"),
        ('[[datasets]]\nname = "x"\nsynth = {}\n[[datasets]]\nname = "x"\nsynth = {}\n[models]\nnames = ["hog"]\n',
         "[[datasets]] name 'x' is given twice"),
    ]:
        study.write_text(text)
        with pytest.raises(VlmindexError, match=re.escape(message)):
            load_study(study)


def test_bad_study_types_stop_the_cli_before_anything_runs(tmp_path, vlm):
    bad = tmp_path / "bad.toml"
    bad.write_text(_study_text(analysis='k = "ten"'))
    ws = tmp_path / "ws"
    res = vlm(ws, "run", bad, expect=1)
    assert res.err.strip() == f"Error: {bad}: [analysis] k must be an integer >= 1, got 'ten'"
    assert res.out == "" and not (ws / "catalog.duckdb").exists()
    bad.write_text(_study_text(models='names = "hog"'))
    res = vlm(ws, "run", bad, expect=1)
    assert res.err.strip() == f"Error: {bad}: [models] names must be a list of model names (strings), got 'hog'"


def test_study_paths_are_relative_to_the_study_file(tmp_path):
    study = tmp_path / "studies" / "s.toml"
    study.parent.mkdir()
    study.write_text(_study_text(dataset='source = "../data/m.csv"\nformat = "csv"\nimage_root = "../data/img"\n'
                                         'labels_csv = "~/labels.csv"'))
    d = load_study(study).datasets[0]
    assert d["source"] == str((tmp_path / "data" / "m.csv").resolve())
    assert d["image_root"] == (tmp_path / "data" / "img").resolve()
    assert d["labels_csv"] == Path("~/labels.csv").expanduser()


def test_every_option_the_runner_passes_on_has_a_type_check():
    import inspect
    from dataclasses import fields

    from vlmindex import study, synth
    from vlmindex.analyze import AnalyzeOptions
    from vlmindex.overlay import OverlayRecipe

    assert set(study._INGEST_TYPES) == study._INGEST_KEYS
    assert set(study._ANALYSIS_TYPES) == {f.name for f in fields(AnalyzeOptions)} | study._ANALYSIS_GRID_KEYS
    assert set(study._RECIPE_TYPES) == {f.name for f in fields(OverlayRecipe)}
    assert set(study._SYNTH_TYPES) <= set(inspect.signature(synth.generate).parameters)


def test_a_study_never_reports_a_dataset_other_than_the_one_it_describes(vlm, tmp_path):
    """A dataset of the study's name already in the workspace, made with other settings, used to be
    analysed as it was, without a word."""
    ws = tmp_path / "ws"
    vlm(ws, "synth", "mini", "--seed", "0", "--lesions-per-class", "2", "--views", "2", "--size", "32")
    study = tmp_path / "s.toml"
    study.write_text(textwrap.dedent("""
        [[datasets]]
        name = "mini"
        synth = { seed = 7, lesions_per_class = 2, views_per_lesion = 2, size = 32 }
        [models]
        names = ["color-hist"]
        [analysis]
        k = 3
        probe = false
        [embed]
        num_workers = 0
    """))
    res = vlm(ws, "run", study, expect=1)
    assert "s.toml: dataset 'mini' of the workspace was ingested as synth" in res.err and "seed" in res.err
    study.write_text(study.read_text().replace("seed = 7", "seed = 0"))
    vlm(ws, "run", study)
    assert "0 step(s) run" in vlm(ws, "run", study).err


def test_study_leaderboard_keeps_its_rows_after_another_analysis_of_the_run(vlm, tmp_path):
    """An analysis with the study's k but another probe setting used to hide the study's own rows
    (the leaderboard printed no rows)."""
    study = tmp_path / "s.toml"
    study.write_text(textwrap.dedent("""
        [[datasets]]
        name = "mini"
        synth = { seed = 1, lesions_per_class = 2, views_per_lesion = 2, size = 32 }
        [models]
        names = ["color-hist"]
        [analysis]
        k = 3
        [embed]
        num_workers = 0
    """))
    ws = tmp_path / "ws"
    first = json.loads(vlm(ws, "run", study, "--format", "json").out)
    vlm(ws, "analyze", "-m", "color-hist", "-d", "mini", "-k", "3", "--no-probe")
    assert json.loads(vlm(ws, "run", study, "--format", "json").out) == first != []
