"""The command line: a thin click skin that parses, calls one library function and prints.

Command groups live in sibling modules, one per stage, and register themselves on ``cli``.
"""

from __future__ import annotations

import sys
import traceback

import click

from vlmindex import __version__
from vlmindex.catalog import Workspace
from vlmindex.errors import VlmindexError


class Context:
    """What every command gets: the workspace and the --debug flag."""

    def __init__(self, workspace: Workspace, debug: bool) -> None:
        self.workspace = workspace
        self.debug = debug


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-w",
    "--workspace",
    type=click.Path(file_okay=False),
    default=None,
    help="Workspace directory (default: $VLMINDEX_WORKSPACE, else ./vlmindex-workspace).",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, prog_name="vlmindex")
@click.pass_context
def cli(ctx: click.Context, workspace: str | None, debug: bool) -> None:
    """Which vision-language model gives the most discriminative image features for your data?

    Ingest images into a workspace, embed them with many models, index the embeddings in FAISS,
    and measure neighbour purity, retrieval mAP and overlay-text bias with SQL over any slice.

    \b
    Quick start:
      vlmindex demo                      # everything, offline, on a synthetic lesion set
      vlmindex synth demo                # or step by step
      vlmindex datasets
    """
    ctx.obj = Context(Workspace.resolve(workspace), debug)


def _register() -> None:
    # Each module adds its commands to `cli` when imported.
    from vlmindex.cli import (  # noqa: F401
        bias_cmds,
        catalog_cmds,
        duplicate_cmds,
        embed_cmds,
        index_cmds,
        look_cmds,
        model_cmds,
        overlay_cmds,
        report_cmds,
        study_cmds,
    )


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit code 1; --debug shows tracebacks."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="vlmindex", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VlmindexError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted; what was written so far is kept and the next run resumes.", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"Error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)
