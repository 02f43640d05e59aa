"""The report command: one self-contained HTML file of a workspace's analyses."""

from __future__ import annotations

from pathlib import Path

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.output import format_option, render
from vlmindex.errors import VlmindexError


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


@cli.command()
@click.option("--dataset", "-d", help="Only this dataset (default: every analysed one).")
@click.option("--condition", "-c", help="Findings 1-2 from the analyses of this condition (default clean); "
              "finding 3 for this overlay condition only (default: every one with overlay effects).")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap replicates (groups resampled) for the intervals and p-values.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Family-wise error rate of each finding's Holm correction.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--save/--no-save", default=True, show_default=True,
              help="Store the verdicts in table `findings` (replacing the dataset's earlier ones).")
@format_option()
@pass_ctx
def findings(ctx, dataset, condition, n_boot, alpha, seed, save, fmt):
    """Test the study's three findings on this workspace's analyses.

    \b
    (1) medical models separate lesion classes: each medical model vs the best baseline (floor);
    (2) LLM-enhanced models beat medical ones: best vs best, and the family means;
    (3) general models are pulled more by overlaid text: family means of the attack figures.

    Each comparison is a paired difference over identical queries with a group-bootstrap
    interval (confidence 1 - alpha); verdicts (supported, contradicted, not decided, not testable) use Holm's
    correction over a finding's comparisons. Families come from the model registry or from
    `embed/embeddings import --family`. Definitions: docs/findings.md; the stored rows:
    `vlmindex sql findings`.

    \b
    Examples:
      vlmindex findings
      vlmindex findings -d ham --format csv > findings.csv
    """
    from vlmindex.findings import FindingsOptions, compute_findings, finding_rows, save_findings

    opts = FindingsOptions(dataset=dataset, condition=condition, n_boot=n_boot, seed=seed, alpha=alpha)
    found = compute_findings(ctx.workspace.require(), opts)
    if not found:
        raise VlmindexError("no analysis to test the findings on: run `vlmindex analyze` first")
    rows = save_findings(ctx.workspace, found, opts) if save else finding_rows(found, opts)
    if fmt != "table":
        click.echo(render([{k: v for k, v in r.items() if k != "created_at"} for r in rows], fmt))
        return
    click.echo(findings_text(found, n_boot))


def findings_text(found, n_boot: int) -> str:
    """The findings as a reader wants them: a verdict per claim, the numbers beneath (a p of 0,
    no replicate reaching 0, printed as below 1/B)."""
    lines, last = [], None
    for f in found:
        where = (f.dataset + (f" · {f.modality}" if f.modality else ""), f.condition, f.scope)
        if where != last:
            lines.append(f"\n{where[0]} / {where[1]}" + (f"  ({where[2]})" if where[2] else ""))
            last = where
        lines.append(f"({f.finding}) {f.claim}: {f.verdict.upper()}: {f.reason}")
        for c in f.comparisons:
            num = "n/a" if c.delta is None else f"{c.delta:+.4f}"
            ci = f" [{c.ci_low:+.4f}, {c.ci_high:+.4f}]" if c.ci_low is not None and c.ci_high is not None else ""
            vals = "" if c.value_a is None or c.value_b is None else f" ({c.value_a:.4f} vs {c.value_b:.4f})"
            p = "" if c.p_holm is None else f"< {1 / n_boot:.2g}" if c.p_holm == 0 else f"{c.p_holm:.3g}"
            test = (f"  p_holm {p}  {c.verdict}" if c.p_holm is not None else
                    f"  {c.verdict}" if c.verdict else "  shown, not tested")
            lines.append(f"    {c.comparison}  {c.metric}  Δ {num}{ci}{vals}{test}")
    return "\n".join(lines).lstrip("\n")
