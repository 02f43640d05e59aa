"""Study files: one TOML file names datasets, overlay conditions, models and analysis options; the
runner does every missing step of that grid in dependency order and skips what is already done.

Order: ingest → conditions → per model: embed → index → analyze (clean first, then each
condition) → overlay effects and zero-shot → leaderboard (and report). A model that cannot be
loaded or fails is skipped with its reason and listed at the end; everything else goes on.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vlmindex.analyze import AnalyzeOptions
from vlmindex.datasets import IngestOptions
from vlmindex.errors import VlmindexError
from vlmindex.workspace import Workspace

CLEAN = "clean"
_INGEST_KEYS = {f for f in IngestOptions.__dataclass_fields__ if f != "extra"}
_RECIPE_KEYS = {"text", "position", "size", "color", "opacity", "seed", "box"}
_ANALYSIS_KEYS = {"k", "exclude_group", "query_split", "gallery_split", "modality", "probe", "seed"}
_EMBED_KEYS = {"batch_size", "num_workers", "dtype", "device", "part_size"}


def examples_dir() -> Path:
    """The shipped example studies: packaged into the wheel, or ``examples/`` of a checkout."""
    packaged = resources.files("vlmindex") / "examples"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "examples"


@dataclass
class Study:
    path: Path
    name: str
    datasets: list[dict[str, Any]]
    conditions: list[dict[str, Any]]
    models: list[str]
    checkpoints: dict[str, str] = field(default_factory=dict)
    trust_remote_code: set[str] = field(default_factory=set)
    analysis: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    embed: dict[str, Any] = field(default_factory=dict)
    overlay_effects: bool = True
    zeroshot: bool = True
    report: str | None = None


@dataclass
class StudyResult:
    done: list[str] = field(default_factory=list)
    skipped_steps: int = 0
    skipped_models: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _unknown(section: str, given: dict[str, Any], allowed: set[str], path: Path) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        raise VlmindexError(f"{path}: unknown key(s) {', '.join(extra)} in [{section}]; "
                            f"allowed: {', '.join(sorted(allowed))}")


def load_study(path: str | Path) -> Study:
    """Parse and check a study file; every mistake is a one-line error naming the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise VlmindexError(f"study file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise VlmindexError(f"{path} is not valid TOML: {exc}") from None
    _unknown("top level", data, {"study", "datasets", "conditions", "models", "analysis", "embed"}, path)
    meta = data.get("study", {})
    _unknown("study", meta, {"name", "description", "report", "overlay_effects", "zeroshot"}, path)
    datasets = data.get("datasets", [])
    if not datasets:
        raise VlmindexError(f"{path}: no [[datasets]]; name at least one (synth = {{}} or source + format)")
    for d in datasets:
        if "name" not in d:
            raise VlmindexError(f"{path}: a [[datasets]] entry has no name")
        if "synth" not in d and not {"source", "format"} <= set(d):
            raise VlmindexError(
                f"{path}: dataset {d['name']!r} needs `synth = {{...}}` or `source` and `format`")
        _unknown(f"datasets.{d['name']}", d, {"name", "synth", "source", "format"} | _INGEST_KEYS, path)
    conditions = data.get("conditions", [])
    for c in conditions:
        if "name" not in c or "text" not in c:
            raise VlmindexError(f"{path}: every [[conditions]] entry needs a name and a text source")
        _unknown(f"conditions.{c['name']}", c, {"name", "datasets"} | _RECIPE_KEYS, path)
    models = data.get("models", {})
    _unknown("models", models, {"names", "checkpoints", "trust_remote_code"}, path)
    names = models.get("names", [])
    if not names:
        raise VlmindexError(
            f"{path}: [models] names is empty; list the models to compare (see `vlmindex models`)")
    analysis = data.get("analysis", {})
    _unknown("analysis", analysis, _ANALYSIS_KEYS, path)
    embed = data.get("embed", {})
    _unknown("embed", embed, _EMBED_KEYS, path)
    base = path.parent
    for d in datasets:
        if "source" in d and not Path(d["source"]).expanduser().is_absolute():
            d["source"] = str((base / d["source"]).resolve())
    return Study(
        path=path, name=meta.get("name", path.stem), datasets=datasets, conditions=conditions,
        models=list(names), checkpoints=dict(models.get("checkpoints", {})),
        trust_remote_code=set(models.get("trust_remote_code", [])),
        analysis=AnalyzeOptions(**analysis), embed=embed,
        overlay_effects=bool(meta.get("overlay_effects", True)),
        zeroshot=bool(meta.get("zeroshot", True)),
        report=meta.get("report"),
    )


def _conditions_for(study: Study, dataset: str) -> list[str]:
    return [CLEAN] + [c["name"] for c in study.conditions if dataset in c.get("datasets", [dataset])]


def run_study(ws: Workspace, study: Study, *, log: Callable[[str], None] = print,
              progress: bool = False) -> StudyResult:
    """Run every missing step of ``study`` in ``ws``."""
    from vlmindex.analyze import analyze, is_current
    from vlmindex.embed import EmbedOptions, auto_device, embed, pending_count
    from vlmindex.index import build_index
    from vlmindex.ingest import ingest, ingest_synthetic
    from vlmindex.models import get_spec, load_model
    from vlmindex.overlay import OverlayRecipe, add_condition, get_condition

    result = StudyResult()
    t0 = time.perf_counter()

    def step(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        log(f"  {what} ({time.perf_counter() - t:.1f} s)")
        result.done.append(what)
        return out

    log(f"study {study.name}: {len(study.datasets)} dataset(s), {len(study.conditions)} overlay "
        f"condition(s), {len(study.models)} model(s)")
    # 1. datasets
    with ws.read() as con:
        have = {r[0] for r in con.execute("SELECT name FROM datasets").fetchall()}
    for d in study.datasets:
        if d["name"] in have:
            result.skipped_steps += 1
            continue
        if "synth" in d:
            step(f"synth {d['name']}", ingest_synthetic, ws, d["name"], progress=progress, **d["synth"])
        else:
            opts = IngestOptions(**{k: (tuple(v) if k == "exclude" else v) for k, v in d.items()
                                    if k in _INGEST_KEYS})
            step(f"ingest {d['name']}", ingest, ws, d["name"], d["source"], d["format"], opts,
                 progress=progress)
    # 2. conditions
    for c in study.conditions:
        recipe = OverlayRecipe(**{k: v for k, v in c.items() if k in _RECIPE_KEYS})
        for d in c.get("datasets", [x["name"] for x in study.datasets]):
            with ws.read() as con:
                try:
                    existing = get_condition(con, d, c["name"])
                except VlmindexError:
                    existing = None
            if existing == recipe:
                result.skipped_steps += 1
                continue
            if existing is not None:
                raise VlmindexError(
                    f"{study.path}: condition {c['name']!r} of {d!r} exists with another recipe; "
                    "rename it in the study or remove it with `vlmindex overlay remove`"
                )
            step(f"overlay add {d} {c['name']}", add_condition, ws, d, c["name"], recipe)
    # 3. per model
    embed_opts = EmbedOptions(progress=progress, **study.embed)
    for model in study.models:
        log(f"model {model}")
        try:
            spec = get_spec(model)
            grid = [(d["name"], c) for d in study.datasets for c in _conditions_for(study, d["name"])]
            extractor = None
            for dataset, condition in grid:
                if pending_count(ws, model, dataset, condition, embed_opts) == 0:
                    result.skipped_steps += 1
                else:
                    if extractor is None:
                        extractor = step(f"load {model}", load_model, model,
                                         checkpoint=study.checkpoints.get(model),
                                         trust_remote_code=model in study.trust_remote_code,
                                         device=auto_device(embed_opts.device))
                    step(f"embed {model} {dataset}/{condition}", embed, ws, model, dataset, condition,
                         embed_opts, extractor=extractor)
                info, built = build_index(ws, model, dataset, condition)
                if built:
                    result.done.append(f"index {model} {dataset}/{condition}")
                else:
                    result.skipped_steps += 1
                if is_current(ws, model, dataset, condition, study.analysis):
                    result.skipped_steps += 1
                else:
                    step(f"analyze {model} {dataset}/{condition}", analyze, ws, model, dataset, condition,
                         study.analysis)
            _after_analysis(ws, study, model, spec, step, extractor, result)
        except Exception as exc:  # noqa: BLE001 - a failing model never stops the study
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, VlmindexError):
                reason = f"{type(exc).__name__}: {reason}"
            result.skipped_models[model] = reason
            log(f"  skipped {model}: {reason}")
    result.seconds = time.perf_counter() - t0
    return result


def _after_analysis(ws: Workspace, study: Study, model: str, spec: Any, step: Callable[..., Any],
                    extractor: Any, result: StudyResult) -> None:
    """Overlay effects (each condition against clean) and zero-shot for models with a text tower."""
    from vlmindex import bias, zeroshot
    from vlmindex.analyze import results_current

    k, groups = study.analysis.k, study.analysis.exclude_group
    if study.overlay_effects:
        for d in study.datasets:
            for condition in _conditions_for(study, d["name"])[1:]:
                filters = {"model": model, "dataset": d["name"], "condition": condition, "k": k,
                           "exclude_group": groups}
                runs = [(model, d["name"], CLEAN), (model, d["name"], condition)]
                if results_current(ws, "overlay_effects", filters, runs):
                    result.skipped_steps += 1
                    continue
                step(f"overlay effect {model} {d['name']}/{condition}", bias.compute_overlay_effect,
                     ws, model, d["name"], condition, k=study.analysis.k,
                     exclude_group=study.analysis.exclude_group)
    if study.zeroshot and spec.has_text:
        opts = zeroshot.ZeroShotOptions(checkpoint=study.checkpoints.get(model),
                                        trust_remote_code=model in study.trust_remote_code)
        for d in study.datasets:
            conditions = _conditions_for(study, d["name"])
            if all(results_current(ws, "zeroshot_results", {"model": model, "dataset": d["name"], "condition": c},
                                   [(model, d["name"], c)]) for c in conditions):
                result.skipped_steps += 1
                continue
            step(f"zeroshot {model} {d['name']}", zeroshot.zeroshot, ws, model, d["name"],
                 _conditions_for(study, d["name"]), opts, extractor=extractor)


def leaderboard(ws: Workspace, study: Study) -> tuple[list[str], list[dict[str, Any]]]:
    """The shipped leaderboard restricted to the study's own analyses (its grid and its options)."""
    from vlmindex.workspace import sql_dir

    ids = [study.analysis.analysis_id(m, d["name"], c) for m in study.models for d in study.datasets
           for c in _conditions_for(study, d["name"])]
    text = (sql_dir() / "leaderboard.sql").read_text().rstrip().rstrip(";")
    with ws.read() as con:
        cur = con.execute(f"SELECT * EXCLUDE (analysis_id) FROM ({text}) WHERE analysis_id IN (SELECT unnest(?))",
                          [ids])
        cols = [c[0] for c in cur.description]
        return cols, [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
