"""Study files: one TOML file names datasets, overlay conditions, models and analysis options; the
runner does every missing step of that grid in dependency order and skips what is already done.

Order: ingest → conditions → per model, stage by stage (embed, index, duplicates when the analysis
excludes them, analyze, overlay effect, zero-shot) over every step the stage covers (a run; for
analyze with ``[analysis] per_modality = true``, a run's all-modality analysis and one per
modality) → leaderboard (and report). Each stage's own currency check (fingerprints of its inputs,
``vlmindex.catalog.fingerprints``) decides what is already done. A model that cannot be loaded or
fails is skipped with its reason and listed at the end; everything else goes on.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from vlmindex.analyze import AnalyzeOptions, is_device_name
from vlmindex.catalog import CLEAN, RunKey, Workspace
from vlmindex.catalog import embeddings as store
from vlmindex.datasets import FORMATS, IngestOptions
from vlmindex.errors import VlmindexError
from vlmindex.ingest import NAME_RE
from vlmindex.models.registry import FAMILIES


@dataclass(frozen=True)
class _Type:
    """What one key of a study section must hold: a test, and the words an error uses for it."""

    ok: Callable[[Any], bool]
    expect: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)   # bool is an int subclass: k = true is no count


def _int(minimum: int | None = None) -> _Type:
    return _Type(lambda v: _is_int(v) and (minimum is None or v >= minimum),
                 "an integer" if minimum is None else f"an integer >= {minimum}")


def _str_list(what: str) -> _Type:
    # A bare string is refused, not iterated: names = "hog" would otherwise run models h, o, g.
    return _Type(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), f"a list of {what} (strings)")


def _one_of(*choices: str) -> _Type:
    return _Type(lambda v: isinstance(v, str) and v in choices, f"one of {', '.join(choices)}")


def _compiles(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        re.compile(v)
    except re.error:
        return False
    return True


_STR = _Type(lambda v: isinstance(v, str), "a string")
_BOOL = _Type(lambda v: isinstance(v, bool), "true or false")
_NUMBER = _Type(lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number")
_NAME = _Type(lambda v: isinstance(v, str) and bool(NAME_RE.fullmatch(v)),
              "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
_SYNTH_TABLE = _Type(lambda v: isinstance(v, dict), "a table of synth settings")
_STR_TABLE = _Type(lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                   "a table of model = checkpoint (strings)")

# Every key the loader accepts, with its type: the unknown-key check and the type check both read
# these, so a key cannot be allowed without being checked. run_study relies on what passes here.
_STUDY_TYPES = {"name": _STR, "description": _STR, "report": _STR, "overlay_effects": _BOOL, "zeroshot": _BOOL}
_INGEST_TYPES = {
    "exclude": _str_list("glob patterns"), "group_regex": _Type(_compiles, "a regular expression"),
    "modality": _STR, "follow_symlinks": _BOOL, "path_col": _STR, "label_col": _STR, "split_col": _STR,
    "group_col": _STR, "modality_col": _STR, "image_root": _STR, "extension": _STR, "flavour": _STR,
    "labels_csv": _STR,
}
_DATASET_TYPES = {"name": _NAME, "synth": _SYNTH_TABLE, "source": _STR, "format": _one_of(*FORMATS), **_INGEST_TYPES}
_SYNTH_TYPES = {"seed": _int(), "lesions_per_class": _int(1), "views_per_lesion": _int(1), "size": _int(1),
                "modalities": _str_list("modality names"), "test_fraction": _NUMBER}
_RECIPE_TYPES = {"text": _STR, "position": _STR, "size": _NUMBER, "color": _STR, "opacity": _NUMBER,
                 "seed": _int(), "box": _BOOL}
_CONDITION_TYPES = {
    "name": _Type(lambda v: _NAME.ok(v) and v != CLEAN, _NAME.expect + f" (not {CLEAN!r})"),
    "datasets": _str_list("dataset names"), **_RECIPE_TYPES,
}
_MODELS_TYPES = {"names": _str_list("model names"), "checkpoints": _STR_TABLE,
                 "trust_remote_code": _str_list("model names"),
                 "family": _Type(lambda v: isinstance(v, dict) and all(x in FAMILIES for x in v.values()),
                                 f"a table of model = family ({', '.join(FAMILIES)})")}
_ANALYSIS_TYPES = {"k": _int(1), "exclude_group": _BOOL, "query_split": _STR, "gallery_split": _STR,
                   "modality": _STR, "probe": _BOOL, "seed": _int(), "allow_partial": _BOOL,
                   "exclude_duplicates": _BOOL, "duplicates_model": _STR, "probe_seeds": _int(1),
                   "per_modality": _BOOL, "sample_queries": _int(1),
                   "device": _Type(is_device_name, "one of auto, cpu, cuda, cuda:N")}
# [analysis] keys that shape the study's grid of analyses rather than one analysis's options.
_ANALYSIS_GRID_KEYS = {"per_modality"}
_EMBED_TYPES = {"batch_size": _int(1), "num_workers": _int(0), "dtype": _one_of("float32", "float16"),
                "device": _STR, "part_size": _int(1)}
_INGEST_KEYS = {f for f in IngestOptions.__dataclass_fields__ if f != "extra"}
_RECIPE_KEYS = set(_RECIPE_TYPES)
_ANALYSIS_KEYS = set(_ANALYSIS_TYPES)
_EMBED_KEYS = set(_EMBED_TYPES)
_PATH_KEYS = ("image_root", "labels_csv")   # ingest options naming files: relative to the study


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
    families: dict[str, str] = field(default_factory=dict)  # [models] family: for models the registry does not know
    analysis: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    per_modality: bool = False  # besides the all-modality analysis, one per modality of each dataset
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
        raise VlmindexError(f"{path}: unknown key(s) {', '.join(extra)} in {section}; "
                            f"allowed: {', '.join(sorted(allowed))}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check(path: Path, section: str, given: dict[str, Any], types: dict[str, _Type], prefix: str = "") -> None:
    """Unknown keys, then the type of every key given; ``section`` is how the error names it."""
    _unknown(section, given, set(types), path)
    for key, value in given.items():
        if not types[key].ok(value):
            raise VlmindexError(f"{path}: {section} {prefix}{key} must be {types[key].expect}, got {_shown(value)}")


def _table(path: Path, data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise VlmindexError(f"{path}: [{key}] must be a table, got {_shown(value)}")
    return value


def _entries(path: Path, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise VlmindexError(f"{path}: [[{key}]] must be an array of tables (one [[{key}]] block each), "
                            f"got {_shown(value)}")
    return value


def _entry_section(kind: str, i: int, entry: dict[str, Any]) -> str:
    name = entry.get("name")
    return f"[{kind}.{name}]" if isinstance(name, str) else f"[[{kind}]] #{i}"


def _names_once(path: Path, kind: str, entries: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for e in entries:
        if e["name"] in seen:
            raise VlmindexError(f"{path}: [[{kind}]] name {e['name']!r} is given twice; names must be unique")
        seen.add(e["name"])


def _check_datasets(path: Path, datasets: list[dict[str, Any]]) -> None:
    for i, d in enumerate(datasets, start=1):
        if "name" not in d:
            raise VlmindexError(f"{path}: a [[datasets]] entry has no name")
        section = _entry_section("datasets", i, d)
        _check(path, section, d, _DATASET_TYPES)
        if "synth" not in d and not {"source", "format"} <= set(d):
            raise VlmindexError(
                f"{path}: dataset {d['name']!r} needs `synth = {{...}}` or `source` and `format`")
        if "synth" in d:
            _unknown(f"{section[:-1]}.synth]", d["synth"], set(_SYNTH_TYPES), path)
            _check(path, section, d["synth"], _SYNTH_TYPES, prefix="synth.")
    _names_once(path, "datasets", datasets)


def _check_conditions(path: Path, conditions: list[dict[str, Any]], datasets: set[str]) -> None:
    from vlmindex.overlay import OverlayRecipe

    for i, c in enumerate(conditions, start=1):
        if "name" not in c or "text" not in c:
            raise VlmindexError(f"{path}: every [[conditions]] entry needs a name and a text source")
        section = _entry_section("conditions", i, c)
        _check(path, section, c, _CONDITION_TYPES)
        for d in c.get("datasets", []):
            if d not in datasets:
                raise VlmindexError(f"{path}: {section} datasets names {d!r}, which is not a [[datasets]] name")
        try:
            OverlayRecipe(**{k: v for k, v in c.items() if k in _RECIPE_KEYS}).validate()
        except VlmindexError as exc:
            raise VlmindexError(f"{path}: {section} {exc}") from None
    _names_once(path, "conditions", conditions)


def load_study(path: str | Path) -> Study:
    """Parse and check a study file; every mistake is a one-line error naming the file and key.

    Everything is checked before anything runs: a wrong type found half-way through a study would
    otherwise surface as a skipped model, or as a model list read letter by letter.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise VlmindexError(f"study file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise VlmindexError(f"{path} is not valid TOML: {exc}") from None
    _unknown("[top level]", data, {"study", "datasets", "conditions", "models", "analysis", "embed"}, path)
    meta = _table(path, data, "study")
    _check(path, "[study]", meta, _STUDY_TYPES)
    datasets = _entries(path, data, "datasets")
    if not datasets:
        raise VlmindexError(f"{path}: no [[datasets]]; name at least one (synth = {{}} or source + format)")
    _check_datasets(path, datasets)
    conditions = _entries(path, data, "conditions")
    _check_conditions(path, conditions, {d["name"] for d in datasets})
    models = _table(path, data, "models")
    _check(path, "[models]", models, _MODELS_TYPES)
    names = models.get("names", [])
    if not names:
        raise VlmindexError(
            f"{path}: [models] names is empty; list the models to compare (see `vlmindex models`)")
    analysis = _table(path, data, "analysis")
    _check(path, "[analysis]", analysis, _ANALYSIS_TYPES)
    grid = {key: analysis.pop(key) for key in _ANALYSIS_GRID_KEYS if key in analysis}
    if grid.get("per_modality") and "modality" in analysis:
        raise VlmindexError(f"{path}: [analysis] per_modality = true analyses every modality; remove "
                            f"modality = {analysis['modality']!r} (or per_modality)")
    dm = analysis.get("duplicates_model")
    unknown = sorted(set(models.get("family", {})) - set(names))
    if unknown:
        raise VlmindexError(f"{path}: [models] family names {', '.join(map(repr, unknown))}, not in [models] names; "
                            "add them there or drop them from the table")
    if dm is not None and dm not in names:
        raise VlmindexError(f"{path}: [analysis] duplicates_model = {dm!r} is not in [models] names; add it there "
                            f"(its search finds the near duplicates every model's analysis leaves out)")
    if dm is not None and not analysis.get("exclude_duplicates"):
        raise VlmindexError(f"{path}: [analysis] duplicates_model needs exclude_duplicates = true")
    embed = _table(path, data, "embed")
    _check(path, "[embed]", embed, _EMBED_TYPES)
    base = path.parent
    for d in datasets:
        if "source" in d and not Path(d["source"]).expanduser().is_absolute():
            d["source"] = str((base / d["source"]).resolve())
        for key in _PATH_KEYS:
            if key in d:
                # IngestOptions holds Paths; relative ones mean the study's folder, like source.
                p = Path(d[key]).expanduser()
                d[key] = p if p.is_absolute() else (base / p).resolve()
    return Study(
        path=path, name=meta.get("name", path.stem), datasets=datasets, conditions=conditions,
        models=list(names), checkpoints=dict(models.get("checkpoints", {})),
        trust_remote_code=set(models.get("trust_remote_code", [])), families=dict(models.get("family", {})),
        analysis=AnalyzeOptions(**analysis), per_modality=grid.get("per_modality", False), embed=embed,
        overlay_effects=meta.get("overlay_effects", True),
        zeroshot=meta.get("zeroshot", True),
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
class StudyStep:
    """One result a stage computes: a run and, for a stage with several results per run (one
    analysis per modality), the options of this one."""

    key: RunKey
    options: Any = None

    def __str__(self) -> str:
        modality = getattr(self.options, "modality", None)
        return f"{self.key.model} {self.key.dataset}/{self.key.condition}" + (f" modality={modality}" if modality
                                                                               else "")


@dataclass(frozen=True)
class StudyStage:
    """One stage as the runner sees it: which steps it covers, whether a step's result is current
    (the stage's own fingerprint check), and how to compute it."""

    name: str
    steps: Callable[[_Context], list[StudyStep]]
    is_current: Callable[[_Context, StudyStep], bool]
    run: Callable[[_Context, StudyStep], Any]


def _runs(ctx: _Context) -> list[StudyStep]:
    return [StudyStep(RunKey(ctx.model, d["name"], c)) for d in ctx.study.datasets
            for c in _conditions_for(ctx.study, d["name"])]


def analysis_options(ws: Workspace, study: Study, dataset: str) -> list[AnalyzeOptions]:
    """The analyses the study makes of each run of ``dataset``: its [analysis] options and, with
    ``per_modality``, the same options once per modality the dataset has."""
    from vlmindex import analyze

    if not study.per_modality:
        return [study.analysis]
    return [study.analysis, *analyze.per_modality(study.analysis, analyze.modalities(ws, dataset)[0])]


def _analysis_steps(ctx: _Context) -> list[StudyStep]:
    per_dataset = {d["name"]: analysis_options(ctx.ws, ctx.study, d["name"]) for d in ctx.study.datasets}
    return [StudyStep(s.key, o) for s in _runs(ctx) for o in per_dataset[s.key.dataset]]


def _overlay_runs(ctx: _Context) -> list[StudyStep]:
    if not ctx.study.overlay_effects:
        return []
    return [s for s in _runs(ctx) if s.key.condition != CLEAN]


def _duplicate_runs(ctx: _Context) -> list[StudyStep]:
    """One search per dataset, made while the study's ``duplicates_model`` (or, exact pairs only,
    its first model) is the model at work: every model's analysis then excludes the same pairs."""
    a = ctx.study.analysis
    if not a.exclude_duplicates or ctx.model != (a.duplicates_model or ctx.study.models[0]):
        return []
    return [StudyStep(RunKey(ctx.model, d["name"], CLEAN)) for d in ctx.study.datasets]


def _zeroshot_runs(ctx: _Context) -> list[StudyStep]:
    from vlmindex.models import get_spec

    if not (ctx.study.zeroshot and get_spec(ctx.model).has_text):
        return []
    return [StudyStep(RunKey(ctx.model, d["name"], CLEAN)) for d in ctx.study.datasets]


def _extractor(ctx: _Context) -> Any:
    if ctx.extractor is None:
        ctx.extractor = ctx.load.load(ctx.model)
    return ctx.extractor


def _embed(ctx: _Context, step: StudyStep) -> Any:
    from vlmindex.embed import embed_run

    return embed_run(ctx.ws, step.key, ctx.embed_options, extractor=_extractor(ctx))


def _zeroshot_options(ctx: _Context) -> Any:
    from vlmindex.zeroshot import ZeroShotOptions

    return ZeroShotOptions(checkpoint=ctx.study.checkpoints.get(ctx.model),
                           trust_remote_code=ctx.model in ctx.study.trust_remote_code)


def _stages() -> tuple[StudyStage, ...]:
    from vlmindex import analyze, bias, duplicates, embed, index, zeroshot

    a = lambda ctx: ctx.study.analysis  # noqa: E731 - the study's analysis options, read when a stage runs
    effect = lambda ctx: asdict(bias.EffectOptions(k=a(ctx).k, exclude_group=a(ctx).exclude_group))  # noqa: E731
    dup = lambda ctx: duplicates.DuplicateOptions(model=a(ctx).duplicates_model)  # noqa: E731
    # Each lambda takes (ctx, step) and reads the run as step.key; analyze steps carry their options.
    return (
        StudyStage("embed", _runs,
                   lambda ctx, s: embed.pending_count(ctx.ws, s.key.model, s.key.dataset, s.key.condition,
                                                      ctx.embed_options) == 0,
                   _embed),
        StudyStage("index", _runs, lambda ctx, s: index.is_current(ctx.ws, s.key),
                   lambda ctx, s: index.build_index(ctx.ws, s.key.model, s.key.dataset, s.key.condition)),
        # exact and near (this model, clean) pairs, at the default threshold unless a search at
        # another one is stored and current
        StudyStage("duplicates", _duplicate_runs,
                   lambda ctx, s: duplicates.is_current(ctx.ws, s.key.dataset, dup(ctx), any_threshold=True),
                   lambda ctx, s: duplicates.find_duplicates(ctx.ws, s.key.dataset, dup(ctx))),
        StudyStage("analyze", _analysis_steps,
                   lambda ctx, s: analyze.is_current(ctx.ws, s.key.model, s.key.dataset, s.key.condition, s.options),
                   lambda ctx, s: analyze.analyze_run(ctx.ws, s.key, s.options)),
        StudyStage("overlay effect", _overlay_runs,
                   lambda ctx, s: bias.is_current(ctx.ws, s.key.model, s.key.dataset, s.key.condition, **effect(ctx)),
                   lambda ctx, s: bias.compute_overlay_effect(ctx.ws, s.key.model, s.key.dataset, s.key.condition,
                                                              **effect(ctx), allow_partial=a(ctx).allow_partial)),
        StudyStage("zeroshot", _zeroshot_runs,
                   lambda ctx, s: zeroshot.is_current(ctx.ws, s.key.model, s.key.dataset,
                                                      _conditions_for(ctx.study, s.key.dataset),
                                                      _zeroshot_options(ctx)),
                   lambda ctx, s: zeroshot.zeroshot(ctx.ws, s.key.model, s.key.dataset,
                                                    _conditions_for(ctx.study, s.key.dataset),
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
    if study.per_modality:
        from vlmindex.analyze import modalities, without_modality_warning

        for d in study.datasets:
            names, unassigned = modalities(ws, d["name"])
            if not names:
                log(f"  warning: dataset {d['name']} records no modality; per_modality adds no analysis of it")
            elif unassigned:
                log(f"  warning: {without_modality_warning(d['name'], unassigned)}")
    embed_options = EmbedOptions(progress=progress, **study.embed)
    stages = _stages()
    # The duplicates model first: its search is what every model's analysis excludes.
    first = study.analysis.duplicates_model if study.analysis.exclude_duplicates else None
    for model in sorted(study.models, key=lambda m: m != first):
        log(f"model {model}")
        try:
            get_spec(model)
            family = study.families.get(model)
            ctx = _Context(ws, study, model, replace(embed_options, family=family))
            if family is not None:  # runs embedded before the family was given get it too
                for d in study.datasets:
                    for cond in _conditions_for(study, d["name"]):
                        store.set_family(ws, RunKey(model, d["name"], cond), family)
            for stage in stages:
                for step in stage.steps(ctx):
                    if stage.is_current(ctx, step):
                        result.skipped_steps += 1
                        continue
                    t = time.perf_counter()
                    stage.run(ctx, step)
                    what = (f"{stage.name} {step.key.model} {step.key.dataset}" if stage.name == "zeroshot"
                            else f"{stage.name} {step}")
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

    for d in study.datasets:
        with ws.read(views=False) as con:
            record = catalog_datasets.dataset_record(con, d["name"])
        if record is not None:
            differs = _differs(record, d)
            if differs:
                raise VlmindexError(
                    f"{study.path}: dataset {d['name']!r} of the workspace {differs}; rename it in the study, or "
                    "re-ingest it with `--replace` (which drops its embeddings and results)")
            result.skipped_steps += 1
            continue
        if "synth" in d:
            step(f"synth {d['name']}", ingest_synthetic, ws, d["name"], progress=progress, **d["synth"])
        else:
            step(f"ingest {d['name']}", ingest, ws, d["name"], d["source"], d["format"], _ingest_options(d),
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


def _ingest_options(d: dict[str, Any]) -> IngestOptions:
    return IngestOptions(**{k: (tuple(v) if k == "exclude" else v) for k, v in d.items() if k in _INGEST_KEYS})


def _differs(record: dict[str, Any], d: dict[str, Any]) -> str | None:
    """How a dataset already in the workspace differs from the study's entry for it (None: it is the
    same), so that a study never reports numbers of data other than the data it describes."""
    import json

    if "synth" in d:
        stored = record["options"].get("extra", {}).get("synth")
        wanted = {"seed": 0, **d["synth"]}
        if record["format"] != "synth" or stored is None or json.loads(stored) != wanted:
            return f"was ingested as {record['format']} {stored or record['source']}, not synth {wanted}"
        return None
    if record["format"] != d["format"] or record["source"] != str(Path(d["source"]).resolve()):
        return f"was ingested from {record['source']} as {record['format']}, not {d['source']} as {d['format']}"
    from dataclasses import asdict

    wanted_options = json.loads(json.dumps({k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in asdict(_ingest_options(d)).items() if k != "extra"}))
    stored_options = {k: v for k, v in record["options"].items() if k != "extra"}
    if stored_options != wanted_options:
        changed = sorted(k for k in wanted_options if stored_options.get(k) != wanted_options[k])
        return f"was ingested with other options ({', '.join(changed)})"
    return None


def leaderboard(ws: Workspace, study: Study) -> tuple[list[str], list[dict[str, Any]]]:
    """The shipped leaderboard restricted to the study's own analyses (its grid and its options)."""
    from vlmindex.catalog import sandbox, shipped

    ids = [o.analysis_id(m, d["name"], c) for d in study.datasets for o in analysis_options(ws, study, d["name"])
           for m in study.models for c in _conditions_for(study, d["name"])]
    with sandbox.connect(ws) as con:
        return shipped.run(con, "leaderboard", analysis_ids=ids, exclude=("analysis_id",))


ATTACK_COLUMNS = ("dataset", "condition", "model", "map_clean", "attack_map", "attack_d_map", "attack_d_map_ci",
                  "attack_d_knn_acc", "attack_d_knn_acc_ci", "attack_success", "attack_success_ci",
                  "attack_success_clean", "attack_success_chance")


def attack_summary(ws: Workspace, study: Study) -> tuple[list[str], list[dict[str, Any]]]:
    """The typographic-attack figures of the study's models (shipped ``overlay_effect``, its lead
    columns), with the study's k and group rule."""
    from vlmindex.catalog import sandbox, shipped

    with sandbox.connect(ws) as con:
        return shipped.run(con, "overlay_effect", columns=ATTACK_COLUMNS, only={
            "model": study.models, "dataset": [d["name"] for d in study.datasets], "k": [study.analysis.k],
            "exclude_group": [study.analysis.exclude_group]})


def study_findings(ws: Workspace, study: Study) -> list[Any]:
    """The findings (:mod:`vlmindex.findings`) of each of the study's datasets, stored in ``findings``.

    They read every current analysis of those datasets, the study's models and any other."""
    from vlmindex.findings import FindingsOptions, compute_findings, save_findings

    found: list[Any] = []
    for d in study.datasets:
        found += compute_findings(ws, FindingsOptions(dataset=d["name"]))
    if found:
        save_findings(ws, found, FindingsOptions())
    return found
