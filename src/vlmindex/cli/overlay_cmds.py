"""Commands for overlay-text conditions (overlay add/list/preview/remove) and OCR (detect-text)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.output import echo_rows, format_option
from vlmindex.errors import VlmindexError
from vlmindex.overlay import POSITIONS


@cli.group()
def overlay() -> None:
    """Overlay-text conditions: text burned into images on the fly, to measure its pull on features.

    A condition is a named recipe stored in the catalog; no copy of the images is written. Embed
    and analyse with `--condition NAME` to compare against the clean images.

    \b
    Examples:
      vlmindex overlay add derma true-label --text label
      vlmindex overlay add derma misleading --text wrong-label --position top-left --seed 1
      vlmindex overlay add derma marker --text fixed:L --position top-right --size 0.08
      vlmindex overlay preview derma misleading -n 16 --out misleading.png
    """


@overlay.command("add")
@click.argument("dataset")
@click.argument("name")
@click.option("--text", "text_source", required=True, metavar="SOURCE",
              help="label | wrong-label | random-label | random-word | id | fixed:TEXT")
@click.option("--position", type=click.Choice([*POSITIONS, "centre"]), default="bottom-right",
              show_default=True, help="Where the text goes; random is fixed per (seed, image).")
@click.option("--size", type=float, default=0.12, show_default=True,
              help="Font size as a fraction of image height (shrunk only if the text is too wide).")
@click.option("--color", "--colour", "color", default="white", show_default=True,
              help="A colour name or #rrggbb; the outline takes the contrasting colour.")
@click.option("--opacity", type=float, default=1.0, show_default=True, help="0 < opacity <= 1.")
@click.option("--box", is_flag=True, help="Draw an opaque contrasting box behind the text.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Chooses wrong labels, words, IDs and random positions; same seed, same pixels.")
@click.option("--replace", is_flag=True, help="Overwrite an existing condition of that name.")
@pass_ctx
def overlay_add(ctx, dataset, name, text_source, position, size, color, opacity, box, seed, replace):
    """Register condition NAME on DATASET: a recipe, applied whenever its images load.

    \b
    Example:
      vlmindex overlay add derma wrong --text wrong-label --position bottom-left --seed 3
    """
    from vlmindex.overlay import OverlayRecipe, add_condition

    recipe = OverlayRecipe(
        text=text_source, position="center" if position == "centre" else position, size=size,
        color=color, opacity=opacity, seed=seed, box=box,
    )
    add_condition(ctx.workspace, dataset, name, recipe, replace=replace)
    click.echo(f"Condition {name!r} on {dataset!r}: {recipe.to_json()}")
    click.echo(f"See it with: vlmindex overlay preview {dataset} {name} --out {name}.png")


@overlay.command("list")
@click.argument("dataset", required=False)
@format_option()
@pass_ctx
def overlay_list(ctx, dataset, fmt):
    """List conditions (of DATASET, or all); `clean` always exists and is not listed.

    \b
    Example:
      vlmindex overlay list derma --format json
    """
    from vlmindex.overlay import list_conditions

    with ctx.workspace.require().read(views=False) as con:
        rows = list_conditions(con, dataset)
    columns = ["dataset", "name", "text", "position", "size", "color", "opacity", "box", "seed",
               "created_at"]
    if fmt != "table":
        columns.append("recipe")
    echo_rows(rows, fmt, columns)


@overlay.command("remove")
@click.argument("dataset")
@click.argument("name")
@pass_ctx
def overlay_remove(ctx, dataset, name):
    """Delete condition NAME of DATASET and its detect-text results.

    Its embeddings, indexes, analyses and overlay figures are removed with it.

    \b
    Example:
      vlmindex overlay remove derma wrong
    """
    from vlmindex.overlay import remove_condition

    remove_condition(ctx.workspace, dataset, name)
    click.echo(f"Removed condition {name!r} of {dataset!r}.")


@overlay.command("preview")
@click.argument("dataset")
@click.argument("name")
@click.option("-n", "n", type=int, default=16, show_default=True, help="Images to show.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write (default: <dataset>-<name>-preview.png).")
@click.option("--tile-size", type=int, default=192, show_default=True, help="Pixels per tile.")
@pass_ctx
def overlay_preview(ctx, dataset, name, n, out, tile_size):
    """Write a contact sheet of DATASET's images, each clean next to overlaid with NAME.

    \b
    Example:
      vlmindex overlay preview derma wrong -n 16 --out sheet.png
    """
    from vlmindex.catalog import slug
    from vlmindex.imageio import save_png
    from vlmindex.overlay import preview_tiles
    from vlmindex.sheet import contact_sheet

    if tile_size < 32:
        raise VlmindexError(f"--tile-size {tile_size} is too small; use 32 or more")
    tiles = preview_tiles(ctx.workspace.require(), dataset, name, n=n)
    out = out or Path(f"{slug(dataset)}-{slug(name)}-preview.png")
    save_png(contact_sheet(tiles, columns=min(8, len(tiles)), tile_size=tile_size), out)
    click.echo(f"Wrote {out} ({len(tiles) // 2} images, clean | {name}).")


@cli.command("detect-text")
@click.argument("dataset")
@click.option("--condition", default="clean", show_default=True,
              help="Check the images as loaded under this overlay condition.")
@click.option("--det-size", type=int, default=448, show_default=True,
              help="Images with a shorter side below this are upscaled for text detection.")
@click.option("--min-score", type=float, default=0.6, show_default=True,
              help="Recognition confidence a string needs to count as text.")
@click.option("--single-char-score", type=float, default=0.8, show_default=True,
              help="Confidence a single letter or digit needs (blobs read as 'O' score below it).")
@click.option("--threads", type=int, default=0, show_default=True, help="OCR threads (0 = all cores).")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Commit results every this many images.")
@click.option("--limit", type=int, default=None, help="Process at most this many new images.")
@click.option("--redo", is_flag=True, help="Re-run images that already have results.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
@format_option()
@pass_ctx
def detect_text_cmd(ctx, dataset, condition, det_size, min_score, single_char_score, threads,
                    batch_size, limit, redo, progress, fmt):
    """Find burned-in text in DATASET's images with offline OCR; store has_text, text and area.

    Results go to table `text_detections`; a rerun resumes where the last one stopped.
    Needs the OCR extra: pip install 'vlmindex[ocr]'.

    \b
    Examples:
      vlmindex detect-text isic
      vlmindex detect-text derma --condition wrong
      vlmindex sql "SELECT label, avg(has_text::INT) FROM images JOIN text_detections
                    USING (image_id) WHERE condition = 'clean' GROUP BY label"
    """
    from vlmindex.detect_text import OcrSettings, detect_text

    settings = OcrSettings(det_size=det_size, min_score=min_score,
                           single_char_score=single_char_score, threads=threads)
    summary = detect_text(
        ctx.workspace, dataset, condition=condition, settings=settings, batch_size=batch_size,
        limit=limit, redo=redo, progress=sys.stderr.isatty() if progress is None else progress,
    )
    echo_rows([summary], fmt)
