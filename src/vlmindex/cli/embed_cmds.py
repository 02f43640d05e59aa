"""Commands that make embeddings: embed, embeddings import/export/remove."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.options import condition_option, dataset_option, family_option, load_options, models_option
from vlmindex.errors import VlmindexError


@cli.command()
@models_option()
@dataset_option
@condition_option
@click.option("--split", help="Embed only this split.")
@click.option("--shard", metavar="i/n", help="Embed only the i-th of n disjoint shards (0-based).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes (default: one per core; 0 decodes in the main process).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage precision of the embeddings.")
@load_options
@click.option("--part-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Images per Parquet part: a killed run loses at most this many.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: decoding processes and the model in this process. ray: Ray Data tasks decode and "
                   "an actor pool of model replicas embeds (needs vlmindex[ray]); the same parts either way.")
@click.option("--ray-address", metavar="ADDR",
              help="--engine ray: join this cluster ('auto', 'ray://host:10001'); default: start a local Ray.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="--engine ray: model replicas (default: one per --gpus-per-replica GPUs, else one).")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--engine ray: GPUs each replica reserves (0: the replicas run on CPUs).")
@family_option
@pass_ctx
def embed(ctx, models, dataset, condition, split, shard, batch_size, workers, dtype, load, part_size, engine,
          ray_address, replicas, gpus_per_replica, family):
    """Embed a dataset's images with one or more models.

    Cached and resumable: images that already have an embedding of their current pixels are
    skipped, so a re-run of a finished model does nothing and a killed run continues where it
    stopped. Two runs of one model at once never store an image twice.

    \b
    Examples:
      vlmindex embed --model hog,color-hist --dataset demo
      vlmindex embed -m biomedclip -d ham --condition label-br --shard 0/4
      vlmindex embed -m biomedclip -d ham --engine ray --ray-address auto --gpus-per-replica 1
    """
    from vlmindex.embed import EmbedOptions, parse_shard
    from vlmindex.embed import embed as run_embed

    opts = EmbedOptions(batch_size=batch_size, num_workers=workers, dtype=dtype, shard=parse_shard(shard),
                        split=split, device=load.device, checkpoint=load.checkpoint,
                        trust_remote_code=load.trust_remote_code, part_size=part_size,
                        progress=sys.stderr.isatty(), engine=engine, ray_address=ray_address, replicas=replicas,
                        gpus_per_replica=gpus_per_replica, family=family)
    if engine == "local" and (ray_address or replicas or gpus_per_replica):
        raise VlmindexError("--ray-address, --replicas and --gpus-per-replica need --engine ray")
    for model in models:
        report = run_embed(ctx.workspace, model, dataset, condition, opts)
        click.echo(report.summary())
        if report.failed and not report.embedded and not report.cached:
            raise VlmindexError(f"{model}: none of the {report.failed} images could be read (first: "
                                f"{report.first_failure}); was the workspace or the dataset's folder moved?")


@cli.group()
def embeddings():
    """Import embeddings computed elsewhere, export ours, or remove a run."""


@embeddings.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="Name to store them under (any name).")
@dataset_option
@condition_option
@click.option("--ids", "ids_file", type=click.Path(path_type=Path),
              help="With an NPY matrix: a file of image_ids or paths, one per line (or an NPY).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@family_option
@pass_ctx
def embeddings_import(ctx, file, model, dataset, condition, ids_file, dtype, family):
    """Store embeddings from FILE (Parquet with image_id|path + embedding, or NPY + --ids).

    \b
    Example:
      vlmindex embeddings import feats.parquet --model my-model --dataset ham --family medical
    """
    from vlmindex.transfer import import_embeddings

    n = import_embeddings(ctx.workspace, model, dataset, file, condition=condition, ids_file=ids_file,
                          dtype=dtype, family=family)
    click.echo(f"imported {n} embeddings as {model} on {dataset}/{condition}")


@embeddings.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True)
@dataset_option
@condition_option
@pass_ctx
def embeddings_export(ctx, out, model, dataset, condition):
    """Write a run's current embeddings to OUT (.parquet, or .npy plus OUT.ids.txt)."""
    from vlmindex.transfer import export_embeddings

    n = export_embeddings(ctx.workspace.require(), model, dataset, out, condition=condition)
    click.echo(f"exported {n} embeddings to {out}")


@embeddings.command("remove")
@models_option()
@dataset_option
@condition_option
@pass_ctx
def embeddings_remove(ctx, models, dataset, condition):
    """Delete a run's embeddings with its index and everything computed from it.

    \b
    Example:
      vlmindex embeddings remove -m hog -d demo -c wrong
    """
    from vlmindex.catalog import RunKey
    from vlmindex.catalog.embeddings import remove_run

    ctx.workspace.require()
    for model in models:
        n = remove_run(ctx.workspace, RunKey(model, dataset, condition))
        click.echo(f"removed {n} part(s) of {model} on {dataset}/{condition} and the results computed from them")
