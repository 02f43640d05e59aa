"""Commands that measure: index build, analyze, query."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.options import condition_option, dataset_option, load_options, models_option
from vlmindex.cli.output import echo_rows, format_option
from vlmindex.metrics import registry


@cli.group()
def index():
    """FAISS indexes over a run's embeddings."""


@index.command("build")
@models_option()
@dataset_option
@condition_option
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq"]), default="auto",
              show_default=True, help="auto: exact flat up to 200,000 vectors, HNSW above.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Index parameter (nlist, nprobe, M, efSearch, m, ...), repeatable.")
@click.option("--force", is_flag=True, help="Rebuild even when the index is up to date.")
@format_option()
@pass_ctx
def index_build(ctx, models, dataset, condition, kind, params, force, fmt):
    """Build the index of a (model, dataset, condition) run; a stale or damaged one is rebuilt.

    Approximate kinds report recall@10 against exact search on a sample, overall and per class.

    \b
    Example:
      vlmindex index build --model hog --dataset demo
    """
    from vlmindex.errors import VlmindexError
    from vlmindex.index import build_index

    parsed = {}
    for p in params:
        key, sep, value = p.partition("=")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            sep = ""
        if not sep or not isinstance(parsed.get(key), int | float):
            raise VlmindexError(f"--param {p!r} is not NAME=NUMBER (e.g. --param nprobe=32)")
    rows = []
    for model in models:
        info, built = build_index(ctx.workspace, model, dataset, condition, kind=kind, params=parsed or None,
                                  force=force)
        row = {"model": info.model, "dataset": info.dataset, "condition": info.condition, "kind": info.kind,
               "count": info.count, "dim": info.dim, "build_seconds": round(info.build_seconds, 3),
               "status": "built" if built else "up to date"}
        if info.recall:
            row[f"recall@{info.recall['k']}"] = round(info.recall["recall"], 4)
            if fmt != "table":
                row["recall_per_class"] = info.recall.get("per_class")
        rows.append(row)
    echo_rows(rows, fmt)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@models_option()
@dataset_option
@condition_option
@click.option("-k", default=10, show_default=True, help="Neighbours per query image.")
@load_options
@format_option()
@pass_ctx
def query(ctx, images, models, dataset, condition, k, load, fmt):
    """Print the nearest indexed neighbours of IMAGE files (inside or outside the catalog).

    Query images are embedded with the model's own preprocessing, the one the index was built with.
    With several models, each model's neighbours follow one another (column `model`).

    \b
    Example:
      vlmindex query lesion.png --model hog,color-hist --dataset demo -k 5
    """
    from vlmindex.query import query as run_query

    ctx.workspace.require()
    rows = [r for model in models
            for r in run_query(ctx.workspace, list(images), model, dataset, condition, k=k, load=load)]
    columns = ["query", "rank", "image_id", "path", "label", "score"]
    echo_rows(rows, fmt, columns if len(models) == 1 else ["query", "model", *columns[1:]])


# Run identity, then the headline metrics of vlmindex.metrics.registry (summaries column names).
HEADLINE = ["model", "dataset", "condition", "k", "n_queries", *registry.headline_columns()]


@cli.command()
@models_option()
@dataset_option
@condition_option
@click.option("-k", default=10, show_default=True, help="Neighbours for purity@k and the kNN vote.")
@click.option("--exclude-group", is_flag=True,
              help="Leave images of the query's group (patient/lesion) out of its ranking.")
@click.option("--exclude-duplicates", is_flag=True,
              help="Leave the query's duplicate cluster out of its ranking (pairs of `vlmindex duplicates`).")
@click.option("--duplicates-model", metavar="MODEL",
              help="With --exclude-duplicates: also the near pairs of this model's search (`vlmindex duplicates "
                   "D -m MODEL`), the same for every analysed model; without it, exact pairs only.")
@click.option("--query-split", help="Queries from this split only (e.g. test).")
@click.option("--gallery-split", help="Gallery from this split only (e.g. train).")
@click.option("--modality", help="Only images of this modality.")
@click.option("--per-modality", is_flag=True,
              help="One analysis per modality of the dataset (gallery and queries within it), each stored as "
                   "--modality M stores it.")
@click.option("--no-probe", is_flag=True, help="Skip the linear-probe balanced accuracy (slow on big sets).")
@click.option("--probe-seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat the linear probe over this many seeds (its split and solver randomness); the "
                   "summary holds their mean and standard deviation.")
@click.option("--allow-partial", is_flag=True,
              help="Score the images that have an embedding even when some have none (the scope says so).")
@click.option("--sample-queries", type=click.IntRange(min=1), default=None, metavar="N",
              help="Score N queries drawn by class (seeded by --seed) against the whole gallery, exactly; "
                   "the scope says 'sampled N of M' and every retrieval figure gets a bootstrap 95% interval.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the query sample, of the intervals and of the probe (its splits and solver).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where the exact ranking runs: cpu (NumPy), cuda (torch on the GPU, chunks sized to its "
                   "free memory), auto (cuda when torch sees a GPU). Same numbers either way.")
@format_option()
@pass_ctx
def analyze(ctx, models, dataset, condition, k, exclude_group, exclude_duplicates, duplicates_model, query_split,
            gallery_split, modality, per_modality, no_probe, probe_seeds, allow_partial, sample_queries, seed, device,
            fmt):
    """Neighbours and discriminability metrics of embedded runs.

    Per query: purity@k, AP over the full ranking, MAP@R, R-precision, P@1, kNN vote (rows in
    `query_metrics`, neighbours in the `neighbors` view); per run: micro and macro means and the
    distribution figures (table `summaries`; `vlmindex sql leaderboard`). --exclude-duplicates
    reads the pairs `vlmindex duplicates DATASET [-m MODEL]` stored. With --per-modality, one row
    per (model, modality).

    \b
    Example:
      vlmindex analyze --model hog,raw-pixels --dataset demo -k 10 --exclude-group
      vlmindex analyze --model hog --dataset demo --per-modality --probe-seeds 3
      vlmindex analyze --model hog --dataset big --sample-queries 5000 --no-probe
    """
    import warnings

    from vlmindex.analyze import AnalyzeOptions, analyze_per_modality
    from vlmindex.analyze import analyze as run_analyze
    from vlmindex.catalog import RunKey

    opts = AnalyzeOptions(k=k, exclude_group=exclude_group, query_split=query_split,
                          gallery_split=gallery_split, modality=modality, probe=not no_probe,
                          allow_partial=allow_partial, exclude_duplicates=exclude_duplicates,
                          duplicates_model=duplicates_model if exclude_duplicates else None, probe_seeds=probe_seeds,
                          sample_queries=sample_queries, seed=seed, device=device)
    # Warnings (images in no modality block, an undefined figure) as one line each, once.
    with warnings.catch_warnings(record=True) as caught:
        for category in (UserWarning, RuntimeWarning):
            warnings.simplefilter("always", category)
        if per_modality:
            rows = [r for m in models for r in analyze_per_modality(ctx.workspace, RunKey(m, dataset, condition),
                                                                    opts)]
        else:
            rows = [run_analyze(ctx.workspace, m, dataset, condition, opts) for m in models]
    for message in dict.fromkeys(str(w.message) for w in caught):
        click.echo(f"Warning: {message}", err=True)
    if fmt == "table":
        columns = HEADLINE if not per_modality else [*HEADLINE[:3], "modality", *HEADLINE[3:]]
        if sample_queries is not None:  # what the numbers are over, and the interval of the ranking figure
            for r in rows:
                r["sampled"] = f"{r['sampled_queries']} of {r['query_pool']}"
                lo, hi = json.loads(r["ci"])["map_micro"]
                r["map_ci"] = "" if lo is None else f"[{lo:.4f}, {hi:.4f}]"
            columns = [*columns, "sampled", "map_ci"]
        echo_rows(rows, fmt, columns)
    else:
        echo_rows([{c: v for c, v in r.items() if c != "provenance"} |
                   {"provenance": json.loads(r["provenance"])} for r in rows], fmt)
