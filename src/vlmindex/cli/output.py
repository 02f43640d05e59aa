"""One way to print results: ``--format table|csv|json`` on every command that lists rows."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import click

FORMATS = ("table", "csv", "json")


def format_option(default: str = "table") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--format`` to a click command."""

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        return click.option(
            "--format",
            "fmt",
            type=click.Choice(FORMATS),
            default=default,
            show_default=True,
            help="Output format: an aligned table, CSV, or JSON (a list of row objects).",
        )(func)

    return decorator


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{len(value)} values]"
    return str(value)


def render(rows: Iterable[Mapping[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> str:
    """Render row dicts as ``table``, ``csv`` or ``json``; ``columns`` fixes the order."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    if fmt == "json":
        return json.dumps([{c: _jsonable(r.get(c)) for c in columns} for r in rows], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else _jsonable(r.get(c)) for c in columns])
        return buf.getvalue().rstrip("\n")
    if not rows:
        return "(no rows)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def echo_rows(rows: Iterable[Mapping[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> None:
    click.echo(render(rows, fmt, columns))


def with_format(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command body that returns row dicts (or ``(columns, rows)``) and print them."""

    @format_option()
    @functools.wraps(func)
    def wrapper(*args: Any, fmt: str, **kwargs: Any) -> None:
        result = func(*args, **kwargs)
        if isinstance(result, tuple):
            echo_rows(result[1], fmt, result[0])
        else:
            echo_rows(result, fmt)

    return wrapper
