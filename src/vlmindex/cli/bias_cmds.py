"""Commands that measure overlay bias: overlay effect (figures against clean) and zeroshot."""

from __future__ import annotations

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.options import dataset_option, load_options, models_option, names
from vlmindex.cli.output import echo_rows, format_option
from vlmindex.cli.overlay_cmds import overlay

EFFECT_COLUMNS = ["model", "condition", "figure", "value", "ci_low", "ci_high", "baseline", "n", "note"]
ZEROSHOT_COLUMNS = ["model", "condition", "modality", "n", "n_classes", "accuracy", "balanced_accuracy",
                    "written_share", "written_share_clean", "flip_rate"]


@overlay.command("effect")
@models_option()
@dataset_option
@click.option("--condition", "-c", "conditions", required=True, multiple=True,
              help="Overlay condition(s) to compare against clean (repeatable or comma-separated).")
@click.option("-k", default=10, show_default=True,
              help="Neighbours for purity@k, kNN votes and text clustering.")
@click.option("--exclude-group", is_flag=True,
              help="Leave images of the query's group (patient/lesion) out of its ranking.")
@click.option("--n-boot", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples for the 95% intervals (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--allow-partial", is_flag=True,
              help="Compare the images embedded under both conditions even when some are not (the note says so).")
@format_option()
@pass_ctx
def overlay_effect(ctx, models, dataset, conditions, k, exclude_group, n_boot, seed, allow_partial, fmt):
    """Bias figures of overlay conditions against clean, with bootstrap 95% intervals.

    First the typographic-attack figures: overlaid queries ranked against the CLEAN gallery
    (attack_map, attack_delta_map, attack_delta_knn_acc, and for text that writes a class name
    attack_success_rate, the share of queries whose kNN vote follows the written class, with its
    clean baseline and chance rate). Then within-condition metric deltas (overlaid queries against
    the overlaid gallery: they mix reading the text with the text carrying the class), embedding
    shift, text clustering and the typographic flip rate (label, wrong-label, random-label text).
    Use a `random-label` condition as the control: its text is independent of the truth. Needs
    the clean and overlaid runs embedded; rows go to table `overlay_effects` (`vlmindex sql
    overlay_effect`; definitions in docs/overlays.md).

    \b
    Example:
      vlmindex overlay effect -m raw-pixels,hog -d demo -c wrong -k 10 --exclude-group
    """
    from vlmindex.bias import compute_overlay_effect

    rows = []
    for model in models:
        for condition in [c for text in conditions for c in names(text)]:
            rows += compute_overlay_effect(ctx.workspace, model, dataset, condition, k=k,
                                           exclude_group=exclude_group, n_boot=n_boot, seed=seed,
                                           allow_partial=allow_partial)
    echo_rows(rows, fmt, EFFECT_COLUMNS if fmt == "table" else None)


@cli.command()
@models_option(help="Model name(s) with a text tower, comma-separated.")
@dataset_option
@click.option("--condition", "-c", "conditions", multiple=True,
              help="Overlay condition(s) to classify besides clean (repeatable or comma-separated).")
@load_options
@click.option("--templates", type=click.Path(exists=True, dir_okay=False),
              help="JSON file of prompt templates per modality replacing the shipped ones.")
@click.option("--allow-partial", is_flag=True,
              help="Classify the images that have embeddings even when some have none.")
@format_option()
@pass_ctx
def zeroshot(ctx, models, dataset, conditions, load, templates, allow_partial, fmt):
    """Zero-shot classification with the model's text tower, clean against overlaid images.

    Prompts per modality come from templates shipped with vlmindex ({label} = class name); each
    image is assigned the class of its modality whose mean prompt embedding is closest (cosine) to
    its stored embedding. Reports accuracy and balanced accuracy, and for overlays writing a class
    name how often the prediction becomes the written class. Rows go to table `zeroshot_results`
    (`vlmindex sql zeroshot`).

    \b
    Example:
      vlmindex zeroshot -m biomedclip -d derma -c wrong-label
    """
    from vlmindex.zeroshot import ZeroShotOptions
    from vlmindex.zeroshot import zeroshot as run_zeroshot

    opts = ZeroShotOptions(checkpoint=load.checkpoint, trust_remote_code=load.trust_remote_code,
                           device=load.device, templates=templates, allow_partial=allow_partial)
    conds = [c for text in conditions for c in names(text)]
    rows = []
    for model in models:
        rows += run_zeroshot(ctx.workspace, model, dataset, conds or ["clean"], opts)
    echo_rows(rows, fmt, ZEROSHOT_COLUMNS if fmt == "table" else None)
