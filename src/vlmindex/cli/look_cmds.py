"""Commands that show the images: vlmindex explore (Embedding Atlas) and vlmindex serve (FastAPI)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import click

from vlmindex.cli import cli, pass_ctx
from vlmindex.cli.options import condition_option, dataset_option, load_options
from vlmindex.errors import VlmindexError


@cli.command()
@click.option("--model", "-m", required=True, help="The model whose run to explore (one: each has its own map).")
@dataset_option
@condition_option
@click.option("--analysis", "analysis_id", default=None,
              help="The analysis whose neighbours and metrics to show (default: the newest current one over "
                   "all modalities; ids in `vlmindex sql \"select analysis_id, scope from latest_summaries\"`).")
@click.option("--port", "-p", type=int, default=5055, show_default=True, help="Port of the Embedding Atlas server.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the workspace's images to the network.")
@click.option("--export", "export", type=click.Path(file_okay=False), default=None,
              help="Write the self-contained static application to this folder instead of starting a server.")
@click.option("--publish", is_flag=True,
              help="Write the static application into the workspace, where `vlmindex serve` links to it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the 2-D UMAP map.")
@click.option("--thumbnail-size", type=int, default=96, show_default=True, help="Thumbnail size in pixels.")
@pass_ctx
def explore(ctx, model, dataset, condition, analysis_id, port, host, export, publish, seed, thumbnail_size):
    """Explore one analysed run in Embedding Atlas: map, neighbours, thumbnails, metrics.

    Writes one Parquet table (one row per image: label, modality, split, group, a thumbnail of
    what the model saw, seeded 2-D UMAP coordinates, the analysis's exact top-k neighbours,
    purity@k, AP, kNN verdict, predicted class, detected text, duplicate cluster), then opens
    Embedding Atlas on it. Its scatter plot needs WebGPU (current Chrome, Edge or Safari); the
    table, histograms, search and thumbnails work in any browser.

    \b
    Examples:
      vlmindex explore -m hog -d demo                      # serves http://127.0.0.1:5055
      vlmindex explore -m hog -d demo --export atlas-hog   # static app, opens from any file server
    """
    from pathlib import Path

    from vlmindex import explore as explorer
    from vlmindex.catalog import RunKey

    if export and publish:
        raise VlmindexError("give --export DIR or --publish, not both")
    ctx.workspace.require()
    key = RunKey(model, dataset, condition)
    explorer.require_atlas()
    table = explorer.build_table(ctx.workspace, key, explorer.ExploreOptions(
        analysis_id=analysis_id, seed=seed, thumbnail_px=thumbnail_size), progress=sys.stderr.isatty())
    click.echo(f"explorer table: {table.path} ({table.rows} images; analysis {table.analysis_id}, {table.scope})",
               err=True)
    if export or publish:
        out = Path(export) if export else explorer.app_dir(ctx.workspace, key)
        explorer.export_app(table.path, out.resolve())
        click.echo(f"application written to {out}; serve it with `python -m http.server -d {out} -b 127.0.0.1` "
                   "(or open it from `vlmindex serve` when published)", err=True)
        return
    _warn_host(host)
    click.echo(f"Embedding Atlas on http://{host}:{port} (Ctrl-C stops it)", err=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops Embedding Atlas, not with a traceback
        subprocess.run(explorer.atlas_command(table.path, host=host, port=port), check=False)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the workspace's images to the network.")
@click.option("--port", "-p", type=int, default=8765, show_default=True)
@click.option("--max-upload-mb", type=float, default=20.0, show_default=True,
              help="Largest upload accepted (413 above).")
@click.option("--max-upload-pixels", type=int, default=50_000_000, show_default=True,
              help="Largest upload in width × height, checked before decoding (413 above).")
@click.option("--max-models", type=int, default=4, show_default=True,
              help="Models kept loaded at once (by each worker).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes answering requests (one per core is the most that helps). One runs one "
                   "request's Python at a time (the GIL), so for several clients at once more answer faster, "
                   "except on exact (flat) indexes: one process searches the queries waiting together, in one "
                   "pass over the vectors, and N processes make N passes. "
                   "Each loads its own models (memory grows with N) and gets the cores divided by N for its "
                   "thread teams, unless OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or MKL_NUM_THREADS say otherwise.")
@load_options
@pass_ctx
def serve(ctx, host, port, max_upload_mb, max_upload_pixels, max_models, workers, load):
    """Serve the workspace read-only: a nearest-neighbour API and a page to try it.

    \b
    GET  /                         drop an image, see each model's neighbours side by side
    GET  /api/datasets             datasets of the workspace
    GET  /api/models?dataset=D     models with an index, per condition
    GET  /api/leaderboard?dataset=D
    POST /api/knn                  multipart 'file' or JSON {"image_id": N}; dataset, models, condition, k
    GET  /api/images/ID/thumbnail?condition=C&size=S
    GET  /api/docs                 the OpenAPI page

    Models load once and stay loaded; indexes are memory-mapped and checked against their
    embeddings before they are used, and again whenever a writer touched them.

    \b
    Example:
      vlmindex serve --port 8765        # then open http://127.0.0.1:8765
      vlmindex serve --workers 2        # two processes, for several clients at once
    """
    try:
        import uvicorn  # noqa: F401 - checked here: the message says how to install it

        from vlmindex.serve import Limits, NeighbourService
        from vlmindex.serve.server import check_port, cores, run
    except ImportError:
        raise VlmindexError("the service needs FastAPI and uvicorn; install them with "
                            "`pip install 'vlmindex[serve]'`") from None
    if max_upload_mb <= 0 or max_upload_pixels <= 0 or max_models < 1 or workers < 1:
        raise VlmindexError("--max-upload-mb, --max-upload-pixels, --max-models and --workers must be positive")
    if workers > cores():
        click.echo(f"warning: --workers {workers} on {cores()} cores: workers beyond one per core add memory (each "
                   "loads its own models), not speed", err=True)
    service = NeighbourService(ctx.workspace, load=load, limits=Limits(
        max_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_upload_pixels, max_models=max_models))
    check_port(host, port)
    _warn_host(host)
    click.echo(f"vlmindex serve: workspace {ctx.workspace.root} on http://{host}:{port}"
               + (f", {workers} workers" if workers > 1 else "") + " (Ctrl-C stops it)", err=True)
    run(service, host=host, port=port, workers=workers)


def _warn_host(host: str) -> None:
    if not (host in ("localhost", "::1") or host.startswith("127.")):
        click.echo(f"warning: listening on {host}, not loopback: anyone who can reach this machine can see the "
                   "workspace's images", err=True)

