"""Commands over the catalog: ingest, synth, datasets, sql."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.output import echo_rows, format_option
from vlmindex.datasets import FORMATS, IngestOptions
from vlmindex.errors import VlmindexError


@cli.command()
@click.argument("name")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), required=True,
              help="How SOURCE is laid out.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip files whose name or relative path matches (repeatable), e.g. '*_mask*.png'.")
@click.option("--group-regex", metavar="REGEX",
              help=r"Derive group ids (patient/lesion) from file names: first capture group, "
              r"e.g. '^(person\d+)_'.")
@click.option("--modality", help="Modality of every image (dermoscopy, xray, ultrasound, ...).")
@click.option("--follow-symlinks", is_flag=True,
              help="imagefolder, dicom: also follow folder symlinks that lead out of SOURCE "
              "(by default they are recorded as skipped).")
@click.option("--path-col", help="csv: column with image paths or ids.")
@click.option("--label-col", help="csv: column with class labels.")
@click.option("--split-col", help="csv: column with train/val/test.")
@click.option("--group-col", help="csv: column with patient or lesion ids.")
@click.option("--modality-col", help="csv: column with the modality.")
@click.option("--image-root", type=click.Path(path_type=Path),
              help="csv: folder that manifest paths are relative to (default: the CSV's folder).")
@click.option("--ext", "extension", help="csv: extension added to ids that have none (ISIC, HAM10000: .jpg).")
@click.option("--flavour", help="medmnist: dermamnist, breastmnist, pneumoniamnist, bloodmnist, ... "
              "(default: from the file name).")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path),
              help="dicom: a CSV with path and label columns instead of class folders.")
@click.option("--replace", is_flag=True, help="Drop the dataset's images first and ingest anew.")
@click.option("--strict", is_flag=True, help="Exit non-zero when any file was skipped.")
@pass_ctx
def ingest(ctx, name, source, fmt, exclude, group_regex, modality, follow_symlinks, path_col, label_col,
           split_col, group_col, modality_col, image_root, extension, flavour, labels_csv, replace, strict):
    """Add the images in SOURCE to the workspace as dataset NAME.

    Unreadable files are skipped and recorded with the reason (table `skipped`); re-ingesting a
    name adds only what is new.

    \b
    Examples:
      vlmindex ingest busi Dataset_BUSI_with_GT --format imagefolder --exclude '*_mask*'
      vlmindex ingest kermany chest_xray --format imagefolder --group-regex '^(person\\d+)_'
      vlmindex ingest ham HAM10000_metadata.csv --format csv --image-root images --ext .jpg
      vlmindex ingest derma dermamnist_224.npz --format medmnist
      vlmindex ingest ct dicom_dir --format dicom
    """
    from vlmindex.ingest import ingest as run_ingest

    options = IngestOptions(
        exclude=tuple(exclude), group_regex=group_regex, modality=modality,
        follow_symlinks=follow_symlinks, path_col=path_col,
        label_col=label_col, split_col=split_col, group_col=group_col, modality_col=modality_col,
        image_root=image_root, extension=extension, flavour=flavour, labels_csv=labels_csv,
    )
    report = run_ingest(ctx.workspace, name, source, fmt, options, replace=replace,
                        progress=sys.stderr.isatty())
    click.echo(report.summary())
    if report.ingested == 0:
        raise VlmindexError(f"nothing was ingested from {source}; check --format and the path")
    if strict and report.skipped:
        click.echo(f"Error: --strict and {report.skipped} file(s) were skipped", err=True)
        sys.exit(2)


@cli.command()
@click.argument("name")
@click.option("--seed", default=0, show_default=True, help="Same seed, same pixels.")
@click.option("--lesions-per-class", type=int, default=None, help="Distinct lesions per class.")
@click.option("--views", type=int, default=None, help="Images of each lesion (one group).")
@click.option("--size", type=int, default=None, help="Image side in pixels.")
@click.option("--replace", is_flag=True, help="Drop an existing dataset of that name first.")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a contact sheet PNG (six lesions per class) to look at.")
@pass_ctx
def synth(ctx, name, seed, lesions_per_class, views, size, replace, sheet):
    """Generate the synthetic multi-modality lesion set and ingest it as NAME.

    Dermoscopy-like (naevus, seborrhoeic-keratosis, melanoma), chest X-ray-like (benign-nodule,
    malignant-mass) and breast-ultrasound-like (normal, benign, malignant) images, several views
    of every lesion (group ids), train/test split by lesion. Deterministic by --seed.

    \b
    Example:
      vlmindex synth demo && vlmindex datasets
    """
    from vlmindex.ingest import ingest_synthetic

    kwargs = {k: v for k, v in {"lesions_per_class": lesions_per_class, "views_per_lesion": views,
                                "size": size}.items() if v is not None}
    report = ingest_synthetic(ctx.workspace, name, seed=seed, replace=replace,
                              progress=sys.stderr.isatty(), **kwargs)
    click.echo(report.summary())
    if sheet:
        from vlmindex.catalog.datasets import images
        from vlmindex.synth import SynthImage, contact_sheet_for

        out_dir = ctx.workspace.images_dir(name)
        with ctx.workspace.read(views=False) as con:
            rows = images(con, name, columns=("path", "label", "split", "group_id", "modality"), order="path")
        manifest = [SynthImage(str(Path(p).relative_to(out_dir)), *rest) for p, *rest in rows]
        img = contact_sheet_for(manifest, out_dir)
        sheet.parent.mkdir(parents=True, exist_ok=True)
        img.save(sheet)
        click.echo(f"contact sheet written to {sheet}")


@cli.command()
@format_option()
@pass_ctx
def datasets(ctx, fmt):
    """List the datasets: format, modalities, classes, counts per split.

    JSON and CSV also give the image count of every class per modality and the images per group.
    """
    from vlmindex.catalog.datasets import dataset_summaries

    with ctx.workspace.require().read(views=False) as con:
        rows = dataset_summaries(con)
    if fmt == "table":
        for r in rows:
            r["splits"] = " ".join(f"{k}={v}" for k, v in r["splits"].items())
            for key in ("source", "modalities", "images_per_group"):
                r.pop(key)
    echo_rows(rows, fmt)


@cli.command()
@click.argument("query", required=False)
@click.option("--list", "list_", is_flag=True, help="List the shipped analyses.")
@click.option("--show", is_flag=True, help="Print the SQL of shipped analysis QUERY instead of running it.")
@click.option("--write", is_flag=True, help="Allow statements that change the catalog.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Value for a $NAME parameter of the query (repeatable).")
@format_option()
@pass_ctx
def sql(ctx, query, list_, show, write, params, fmt):
    """Run SQL over the catalog, or a shipped analysis by NAME (see --list).

    Tables: images, datasets, skipped, conditions, runs, query_metrics, summaries, overlay_effects,
    zeroshot_results, text_detections. Views: embeddings and neighbors (over the Parquet files),
    image_pixels, latest_summaries. The SQL runs in a sandbox: no file outside the catalog can be
    read or written, no database attached, no extension installed or loaded. Read-only unless
    --write, which may change catalog tables (never files).

    \b
    Examples:
      vlmindex sql "SELECT dataset, label, count(*) FROM images GROUP BY ALL"
      vlmindex sql leaderboard --format csv
      vlmindex sql --list
      vlmindex sql --show leaderboard
    """
    from vlmindex.catalog import sandbox, shipped

    if list_:
        echo_rows([{"name": k, "description": shipped.description(p)} for k, p in shipped.queries().items()], fmt)
        return
    if not query:
        raise click.UsageError("give a SQL query or the name of a shipped analysis (see --list)")
    text = shipped.text(query) if query in shipped.queries() else query
    if show:
        if query not in shipped.queries():
            raise VlmindexError(f"--show takes the name of a shipped analysis (see --list), not {query!r}")
        click.echo(text.rstrip())
        return
    bound = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep:
            raise VlmindexError(f"parameter {p!r} is not NAME=VALUE")
        bound[key] = _parse_value(value)
    if not write:
        ctx.workspace.require()
    result = sandbox.run(ctx.workspace, text, bound, write=write)
    if result is None:
        click.echo("ok")
        return
    echo_rows(result[1], fmt, result[0])


def _parse_value(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
