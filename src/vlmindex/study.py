"""Study files: one TOML file names datasets, overlay conditions, models and analysis options; the
runner does every missing step of that grid in dependency order and skips what is already done.

Order: ingest → conditions → per model, stage by stage (embed, index, analyze, overlay effect,
zero-shot) over every run the stage covers → leaderboard (and report). Each stage's own currency
check (fingerprints of its inputs, ``vlmindex.catalog.fingerprints``) decides what is already
done. A model that cannot be loaded or fails is skipped with its reason and listed at the end;
everything else goes on.
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
from vlmindex.catalog import CLEAN, RunKey, Workspace
from vlmindex.datasets import IngestOptions
from vlmindex.errors import VlmindexError

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


@dataclass
class _Context:
    """What the stages of one model share while the runner works through them."""

    ws: Workspace
    study: Study
    model: str
    embed_options: Any
    extractor: Any = None  # loaded once, on the first stage that needs it

    @property
    def load(self) -> Any:
        from vlmindex.models import LoadOptions

        return LoadOptions(checkpoint=self.study.checkpoints.get(self.model),
                           trust_remote_code=self.model in self.study.trust_remote_code,
                           device=self.embed_options.device)


@dataclass(frozen=True)
class StudyStage:
    """One stage as the runner sees it: which runs it covers, whether a run's result is current
    (the stage's own fingerprint check), and how to compute it."""

    name: str
    keys: Callable[[_Context], list[RunKey]]
    is_current: Callable[[_Context, RunKey], bool]
    run: Callable[[_Context, RunKey], Any]


def _runs(ctx: _Context) -> list[RunKey]:
    return [RunKey(ctx.model, d["name"], c) for d in ctx.study.datasets for c in _conditions_for(ctx.study, d["name"])]


def _overlay_runs(ctx: _Context) -> list[RunKey]:
    if not ctx.study.overlay_effects:
        return []
    return [k for k in _runs(ctx) if k.condition != CLEAN]


def _zeroshot_runs(ctx: _Context) -> list[RunKey]:
    from vlmindex.models import get_spec

    if not (ctx.study.zeroshot and get_spec(ctx.model).has_text):
        return []
    return [RunKey(ctx.model, d["name"], CLEAN) for d in ctx.study.datasets]


def _extractor(ctx: _Context) -> Any:
    if ctx.extractor is None:
        ctx.extractor = ctx.load.load(ctx.model)
    return ctx.extractor


def _embed(ctx: _Context, key: RunKey) -> Any:
    from vlmindex.embed import embed_run

    return embed_run(ctx.ws, key, ctx.embed_options, extractor=_extractor(ctx))


def _zeroshot_options(ctx: _Context) -> Any:
    from vlmindex.zeroshot import ZeroShotOptions

    return ZeroShotOptions(checkpoint=ctx.study.checkpoints.get(ctx.model),
                           trust_remote_code=ctx.model in ctx.study.trust_remote_code)


def _stages() -> tuple[StudyStage, ...]:
    from vlmindex import analyze, bias, embed, index, zeroshot

    a = lambda ctx: ctx.study.analysis  # noqa: E731 - the study's analysis options, read when a stage runs
    effect = lambda ctx: {"k": a(ctx).k, "exclude_group": a(ctx).exclude_group}  # noqa: E731
    return (
        StudyStage("embed", _runs,
                   lambda ctx, k: embed.pending_count(ctx.ws, k.model, k.dataset, k.condition, ctx.embed_options) == 0,
                   _embed),
        StudyStage("index", _runs, lambda ctx, k: index.is_current(ctx.ws, k),
                   lambda ctx, k: index.build_index(ctx.ws, k.model, k.dataset, k.condition)),
        StudyStage("analyze", _runs,
                   lambda ctx, k: analyze.is_current(ctx.ws, k.model, k.dataset, k.condition, a(ctx)),
                   lambda ctx, k: analyze.analyze_run(ctx.ws, k, a(ctx))),
        StudyStage("overlay effect", _overlay_runs,
                   lambda ctx, k: bias.is_current(ctx.ws, k.model, k.dataset, k.condition, **effect(ctx)),
                   lambda ctx, k: bias.compute_overlay_effect(ctx.ws, k.model, k.dataset, k.condition, **effect(ctx))),
        StudyStage("zeroshot", _zeroshot_runs,
                   lambda ctx, k: zeroshot.is_current(ctx.ws, k.model, k.dataset,
                                                      _conditions_for(ctx.study, k.dataset), _zeroshot_options(ctx)),
                   lambda ctx, k: zeroshot.zeroshot(ctx.ws, k.model, k.dataset, _conditions_for(ctx.study, k.dataset),
                                                    _zeroshot_options(ctx), extractor=_extractor(ctx))),
    )


def run_study(ws: Workspace, study: Study, *, log: Callable[[str], None] = print,
              progress: bool = False) -> StudyResult:
    """Run every missing step of ``study`` in ``ws``: datasets, conditions, then for each model every
    stage over every run it covers, skipping each result that is already current."""
    from vlmindex.embed import EmbedOptions
    from vlmindex.models import get_spec

    result = StudyResult()
    t0 = time.perf_counter()
    log(f"study {study.name}: {len(study.datasets)} dataset(s), {len(study.conditions)} overlay "
        f"condition(s), {len(study.models)} model(s)")
    _prepare_data(ws, study, result, log, progress)
    embed_options = EmbedOptions(progress=progress, **study.embed)
    stages = _stages()
    for model in study.models:
        log(f"model {model}")
        try:
            get_spec(model)
            ctx = _Context(ws, study, model, embed_options)
            for stage in stages:
                for key in stage.keys(ctx):
                    if stage.is_current(ctx, key):
                        result.skipped_steps += 1
                        continue
                    t = time.perf_counter()
                    stage.run(ctx, key)
                    what = f"{stage.name} {key.model} {key.dataset}" + (
                        "" if stage.name == "zeroshot" else f"/{key.condition}")
                    log(f"  {what} ({time.perf_counter() - t:.1f} s)")
                    result.done.append(what)
        except Exception as exc:  # noqa: BLE001 - a failing model never stops the study
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, VlmindexError):
                reason = f"{type(exc).__name__}: {reason}"
            result.skipped_models[model] = reason
            log(f"  skipped {model}: {reason}")
    result.seconds = time.perf_counter() - t0
    return result


def _prepare_data(ws: Workspace, study: Study, result: StudyResult, log: Callable[[str], None],
                  progress: bool) -> None:
    """Ingest the study's datasets and register its conditions, where not done already."""
    from vlmindex.catalog import datasets as catalog_datasets
    from vlmindex.ingest import ingest, ingest_synthetic
    from vlmindex.overlay import OverlayRecipe, add_condition, get_condition

    def step(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        fn(*args, **kwargs)
        log(f"  {what} ({time.perf_counter() - t:.1f} s)")
        result.done.append(what)

    with ws.read(views=False) as con:
        have = set(catalog_datasets.dataset_names(con))
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
    for c in study.conditions:
        recipe = OverlayRecipe(**{k: v for k, v in c.items() if k in _RECIPE_KEYS})
        for d in c.get("datasets", [x["name"] for x in study.datasets]):
            with ws.read(views=False) as con:
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


def leaderboard(ws: Workspace, study: Study) -> tuple[list[str], list[dict[str, Any]]]:
    """The shipped leaderboard restricted to the study's own analyses (its grid and its options)."""
    from vlmindex.catalog import sandbox, shipped

    ids = [study.analysis.analysis_id(m, d["name"], c) for m in study.models for d in study.datasets
           for c in _conditions_for(study, d["name"])]
    with sandbox.connect(ws) as con:
        return shipped.run(con, "leaderboard", analysis_ids=ids, exclude=("analysis_id",))
