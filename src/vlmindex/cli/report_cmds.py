"""The report command: one self-contained HTML file of a workspace's analyses."""

from __future__ import annotations

from pathlib import Path

import click

from vlmindex.cli import cli, pass_ctx


@cli.command()
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="HTML file to write.")
@click.option("--dataset", "-d", help="Only this dataset's analyses.")
@click.option("--max-points", type=click.IntRange(min=0), default=1500, show_default=True,
              help="Points per model in the 2-D projections, all conditions together (0: none).")
@click.option("--projection", type=click.Choice(["tsne", "pca"]), default="tsne", show_default=True,
              help="2-D projection method (PCA is used anyway for sets under 30 points).")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap replicates for the confidence intervals.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Family-wise error rate of the Holm-corrected comparisons.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the point sampling, projections and bootstrap.")
@pass_ctx
def report(ctx, out, dataset, max_points, projection, n_boot, alpha, seed):
    """Write one self-contained HTML report of the analyses; it opens offline.

    Sections: leaderboard, per-class purity heatmaps, 2-D projections, overlay effects, paired
    model comparisons with significance, and the provenance of every number. Uses the latest
    analysis of each model, dataset and condition (`vlmindex analyze`).

    \b
    Examples:
      vlmindex report
      vlmindex report --dataset ham --out ham.html --max-points 3000
    """
    from vlmindex.report import ReportOptions, write_report

    opts = ReportOptions(dataset=dataset, max_points=max_points, projection=projection, n_boot=n_boot,
                         alpha=alpha, seed=seed)
    res = write_report(ctx.workspace.require(), out, opts)
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {res.path} ({res.bytes / 1024:.0f} KiB; {res.n_analyses} analyses of "
               f"{', '.join(res.datasets)}) in {res.seconds:.1f} s")
