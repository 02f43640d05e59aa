"""The command that finds duplicate images: vlmindex duplicates."""

from __future__ import annotations

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.options import condition_option
from vlmindex.cli.output import echo_rows, format_option
from vlmindex.duplicates import DEFAULT_THRESHOLD

TABLE_COLUMNS = ["kind", "score", "image_id_a", "split_a", "label_a", "image_id_b", "split_b", "label_b",
                 "same_group", "model"]
ALL_COLUMNS = ["kind", "score", "image_id_a", "image_id_b", "label_a", "label_b", "split_a", "split_b", "same_split",
               "same_group", "same_label", "model", "condition", "threshold", "path_a", "path_b"]


@cli.command()
@click.argument("dataset")
@click.option("--model", "-m", default=None,
              help="Also find near duplicates: pairs whose embeddings of this model have cosine >= --threshold.")
@condition_option
@click.option("--threshold", "-t", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Cosine similarity a near-duplicate pair reaches, in (0, 1].")
@format_option()
@pass_ctx
def duplicates(ctx, dataset, model, condition, threshold, fmt):
    """Find duplicate images of DATASET and store the pairs (table `duplicates`).

    Exact duplicates always: identical files (exact-bytes) and identical decoded pixels in other
    files (exact-pixels, e.g. a re-saved PNG). Near duplicates with -m: FAISS range search over that
    model's embeddings. Prints one summary line (pairs, clusters, pairs across splits, pairs with
    different labels), then the pairs, cross-split first. `analyze --exclude-duplicates` then
    leaves each query's cluster out of its ranking; `vlmindex sql leaks` summarises every dataset.

    \b
    Example:
      vlmindex duplicates demo -m raw-pixels --threshold 0.95
    """
    from vlmindex.duplicates import DuplicateOptions, find_duplicates

    ctx.workspace.require()
    found = find_duplicates(ctx.workspace, dataset,
                            DuplicateOptions(model=model, condition=condition, threshold=threshold))
    click.echo(found.summary(), err=fmt != "table")
    echo_rows(found.rows, fmt, TABLE_COLUMNS if fmt == "table" else ALL_COLUMNS)
