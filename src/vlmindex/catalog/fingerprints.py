"""Fingerprints of a result's inputs, and the one rule for "is this result current?".

A stored result (index, analysis, overlay effect, zero-shot row, ...) records
``combine(stage, {run: run_fingerprint(run)}, options)``: the fingerprints of the runs it read
(``catalog.embeddings.run_fingerprint``: pixels, labels and the parts holding each current
embedding) and the options that change its numbers. It is **current** exactly when the same
function, computed now, gives the same string. No clock is consulted, so a copied workspace, a
clock skew between cluster nodes or a rerun within one second changes nothing.

A writer computes the fingerprint from what it read, computes, and commits inside
:func:`committing`, which recomputes it under the workspace lock and refuses to store a result
whose inputs changed meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import duckdb

from vlmindex.catalog.embeddings import COMMIT_WAIT, run_fingerprint
from vlmindex.catalog.keys import RunKey
from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError


class InputsChanged(VlmindexError):
    """A result's inputs changed while it was computed; it was not stored."""


def recipe(stage: str, inputs: Sequence[RunKey], options: Mapping[str, Any]) -> dict[str, Any]:
    """What a fingerprint is computed from, stored with the result (``provenance.inputs``) so the
    storage layer can say whether any stored result is current without the stage's code."""
    return {"stage": stage, "runs": [[k.model, k.dataset, k.condition] for k in inputs], "options": dict(options)}


def combine(stage: str, runs: Mapping[RunKey, str], options: Mapping[str, Any]) -> str:
    """The fingerprint of one result: its stage, its input runs' fingerprints and its options."""
    doc = {"stage": stage, "runs": {f"{k.model}\x1f{k.dataset}\x1f{k.condition}": v for k, v in sorted(runs.items())},
           "options": options}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def current(con: duckdb.DuckDBPyConnection, ws: Workspace, stage: str, inputs: Sequence[RunKey],
            options: Mapping[str, Any]) -> str:
    """:func:`combine` of the inputs as they are now."""
    return combine(stage, {k: run_fingerprint(con, ws, k) for k in inputs}, options)


def is_current(ws: Workspace, stored: str | None, stage: str, inputs: Sequence[RunKey],
               options: Mapping[str, Any]) -> bool:
    """The currency rule: a stored fingerprint equals the one the inputs give now."""
    if not stored:
        return False
    with ws.read(views=False) as con:
        return stored == current(con, ws, stage, inputs, options)


@contextlib.contextmanager
def committing(ws: Workspace, expected: str, stage: str, inputs: Sequence[RunKey],
               options: Mapping[str, Any], *, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection under the lock, after checking that ``inputs`` still give ``expected``.

    Raises :class:`InputsChanged` (nothing stored) when another process changed them meanwhile.
    """
    with ws.write(wait=COMMIT_WAIT) as con:
        if current(con, ws, stage, inputs, options) != expected:
            names = ", ".join(str(k) for k in inputs)
            raise InputsChanged(
                f"the embeddings or images behind {what} ({names}) changed while it was computed (another "
                "vlmindex process wrote to the workspace); nothing was stored: run the command again"
            )
        yield con


def stale_analyses(con: duckdb.DuckDBPyConnection, ws: Workspace) -> set[str]:
    """The ``analysis_id`` of every stored analysis that is not current: its inputs changed since,
    or it records no fingerprint (made by an older vlmindex). One run fingerprint per run."""
    now: dict[RunKey, str] = {}
    stale = set()
    for analysis_id, stored, provenance in con.execute(
            "SELECT analysis_id, inputs_fingerprint, provenance FROM summaries").fetchall():
        try:
            made_from = json.loads(provenance or "{}").get("inputs")
        except ValueError:
            made_from = None
        if not stored or not made_from:
            stale.add(analysis_id)
            continue
        keys = [RunKey(*k) for k in made_from["runs"]]
        for k in keys:
            if k not in now:
                now[k] = run_fingerprint(con, ws, k)
        if combine(made_from["stage"], {k: now[k] for k in keys}, made_from["options"]) != stored:
            stale.add(analysis_id)
    return stale
