"""``vlmindex models``: the model zoo, its metadata, and what loads on this machine without a download."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click

from vlmindex.cli import cli
from vlmindex.cli.output import echo_rows, format_option

TABLE_COLUMNS = (
    "name",
    "family",
    "loader",
    "medical",
    "image_size",
    "embed_dim",
    "licence",
    "available",
    "notes",
    "source",
)


def _notes(spec: Any) -> str:
    notes = []
    if spec.untrained:
        notes.append("UNTRAINED")
    if spec.gated:
        notes.append("gated")
    if spec.remote_code:
        notes.append("needs --trust-remote-code")
    if not spec.has_text:
        notes.append("image only")
    return ", ".join(notes)


def model_rows(names: Iterable[str] = (), only_available: bool = False) -> list[dict[str, Any]]:
    """One row per model (all named ones, or the given names/generic forms) with an ``available`` flag."""
    from vlmindex.models import get_spec, is_available, list_specs

    specs = [get_spec(n) for n in names] if names else list_specs()
    rows = []
    for spec in specs:
        row = spec.to_dict()
        row["available"] = is_available(spec)
        row["notes"] = _notes(spec)
        if only_available and not row["available"]:
            continue
        rows.append(row)
    return rows


@cli.command("models")
@click.argument("names", nargs=-1)
@click.option("--available", "only_available", is_flag=True, help="Only models that load without a download.")
@format_option()
def models_cmd(names: tuple[str, ...], only_available: bool, fmt: str) -> None:
    """List the model zoo: family, loader, source, image size, dimension, licence, availability.

    The family (medical, general, llm-enhanced, baseline) is what `vlmindex findings` compares.

    NAMES (optional) are registry names or generic forms (open_clip:ARCH/TAG, hf-hub:ORG/REPO,
    hf:ORG/REPO, local-dir:PATH); without them every named model is listed. A model is available when
    its weights are in the local Hugging Face cache; the offline baselines always are.

    \b
    Examples:
      vlmindex models
      vlmindex models --available --format json
      vlmindex models hf:google/siglip-base-patch16-224 local-dir:./my-clip
    """
    rows = model_rows(names, only_available)
    echo_rows(rows, fmt, list(TABLE_COLUMNS) if fmt == "table" else None)
