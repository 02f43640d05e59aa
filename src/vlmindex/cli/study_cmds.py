"""Commands that run whole studies: run, demo."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.output import echo_rows, format_option


def _run(ctx, study, report: Path | None, fmt: str) -> None:
    from vlmindex.study import attack_summary, leaderboard, run_study

    def log(line: str) -> None:
        click.echo(line, err=True)

    result = run_study(ctx.workspace, study, log=log, progress=sys.stderr.isatty())
    cols, rows = leaderboard(ctx.workspace, study)
    if fmt != "table":
        echo_rows(rows, fmt, cols)
    else:
        # One table per (dataset, modality) block, in the leaderboard's order (all modalities first).
        title = (f"Leaderboard ({study.name}; k = {study.analysis.k}"
                 f"{', group-excluded' if study.analysis.exclude_group else ''}")
        blocks = [(key, list(group)) for key, group in
                  itertools.groupby(rows, key=lambda r: (r["dataset"], r.get("modality")))] or [((None, None), [])]
        for (dataset, modality), block in blocks:
            scope = "" if len(blocks) == 1 else f" {dataset}, " + (f"modality {modality}" if modality is not None
                                                                   else "all modalities")
            click.echo(f"\n{title}):{scope}")
            # the intervals of sampled analyses are columns a study without them leaves empty
            shown = [c for c in cols if c != "modality"
                     and not (c in ("map_ci", "ci") and all(r.get(c) is None for r in block))]
            echo_rows(block, fmt, shown)
    if study.conditions and study.overlay_effects and fmt == "table":
        attack_cols, attack_rows = attack_summary(ctx.workspace, study)
        click.echo("\nTypographic attack (overlaid queries against the clean gallery; docs/overlays.md):")
        echo_rows(attack_rows, fmt, attack_cols)
    from vlmindex.study import study_findings

    found = study_findings(ctx.workspace, study)  # stored in every format; printed with the tables
    if fmt == "table":
        from vlmindex.cli.report_cmds import findings_text

        click.echo("\nFindings (the study's claims tested on these analyses; `vlmindex findings`):")
        from vlmindex.findings import FindingsOptions

        click.echo(findings_text(found, FindingsOptions().n_boot))
    out = report or (Path(study.report) if study.report else None)
    if out is not None:
        from vlmindex.report import ReportOptions, write_report

        names = [d["name"] for d in study.datasets]
        written = write_report(ctx.workspace, Path(out),
                               ReportOptions(dataset=names[0] if len(names) == 1 else None))
        click.echo(f"report written to {written.path}", err=True)
    log(f"{len(result.done)} step(s) run, {result.skipped_steps} already done, "
        f"{result.seconds:.0f} s")
    if result.skipped_models:
        log(f"skipped {len(result.skipped_models)} model(s):")
        for model, reason in result.skipped_models.items():
            log(f"  {model}: {reason}")


@cli.command("run")
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--report", type=click.Path(path_type=Path), help="Write the HTML report here "
              "(default: the study's [study] report, if any).")
@format_option()
@pass_ctx
def run_cmd(ctx, study_file, report, fmt):
    """Run every missing step of a study file and print the leaderboard.

    Ingests the datasets, registers the overlay conditions, then for each model embeds, indexes
    and analyses every (dataset, condition), measures overlay effects and zero-shot accuracy.
    Finished steps are skipped; a model that cannot be loaded is skipped with its reason.

    \b
    Example:
      vlmindex run examples/paper.toml
    """
    from vlmindex.study import load_study

    _run(ctx, load_study(study_file), report, fmt)


@cli.command()
@click.option("--report", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="Where to write the HTML report.")
@format_option()
@pass_ctx
def demo(ctx, report, fmt):
    """Run the shipped demo study: offline baselines on the synthetic lesion set, clean and with
    text overlays; print the leaderboard and write the report. No network needed.
    """
    from vlmindex.study import examples_dir, load_study

    _run(ctx, load_study(examples_dir() / "demo.toml"), report, fmt)
