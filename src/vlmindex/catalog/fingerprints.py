"""Fingerprints of a result's inputs, and the one rule for "is this result current?".

A stored result (index, analysis, overlay effect, zero-shot row, ...) records
``combine(stage, {run: run_fingerprint(run)}, options)``: the fingerprints of the runs it read
(``catalog.embeddings.run_fingerprint``: pixels, labels and the parts holding each current
embedding) and the options that change its numbers. It is **current** exactly when the same
function, computed now, gives the same string. No clock is consulted, so a copied workspace, a
clock skew between cluster nodes or a rerun within one second changes nothing.

A result may also read catalog rows that are not a run (a dataset's image rows, the stored
duplicate pairs): ``catalog_inputs`` names a function per such input that fingerprints it from a
connection, and its value enters the fingerprint beside the runs'.

A writer computes the fingerprint from what it read, computes, and commits inside
:func:`committing`, which recomputes it under the workspace lock and refuses to store a result
whose inputs changed meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import duckdb

from vlmindex.catalog.embeddings import COMMIT_WAIT, run_fingerprint
from vlmindex.catalog.keys import RunKey
from vlmindex.catalog.workspace import Workspace
from vlmindex.errors import VlmindexError


class InputsChanged(VlmindexError):
    """A result's inputs changed while it was computed; it was not stored."""


# name -> a function giving the fingerprint of that catalog input from a connection
CatalogInputs = Mapping[str, Callable[[duckdb.DuckDBPyConnection], str]]
# Catalog inputs as a stored result records them: name -> (provider, arguments). A provider is a
# function ``(con, ws, **arguments) -> fingerprint`` that a stage registers in PROVIDERS, so the
# storage layer can recompute any recorded input; PROVIDER_MODULES says which module registers it.
CatalogRecipe = Mapping[str, tuple[str, Mapping[str, Any]]]
PROVIDERS: dict[str, Callable[..., str]] = {}
PROVIDER_MODULES = {"duplicate pairs": "vlmindex.duplicates"}


def recipe(stage: str, inputs: Sequence[RunKey], options: Mapping[str, Any],
           catalog: CatalogRecipe | None = None) -> dict[str, Any]:
    """What a fingerprint is computed from, stored with the result (``provenance.inputs``) so the
    storage layer can say whether any stored result is current without the stage's code."""
    out: dict[str, Any] = {"stage": stage, "runs": [[k.model, k.dataset, k.condition] for k in inputs],
                           "options": dict(options)}
    if catalog:
        out["catalog"] = {name: [provider, dict(args)] for name, (provider, args) in catalog.items()}
    return out


def combine(stage: str, runs: Mapping[RunKey, str], options: Mapping[str, Any],
            catalog: Mapping[str, str] | None = None) -> str:
    """The fingerprint of one result: its stage, its input runs' fingerprints, its options, and the
    fingerprints of the other catalog inputs it read (``catalog``; absent when there are none, so
    the results of stages that read none keep their fingerprints)."""
    doc: dict[str, Any] = {
        "stage": stage, "runs": {f"{k.model}\x1f{k.dataset}\x1f{k.condition}": v for k, v in sorted(runs.items())},
        "options": options}
    if catalog:
        doc["catalog"] = dict(catalog)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def current(con: duckdb.DuckDBPyConnection, ws: Workspace, stage: str, inputs: Sequence[RunKey],
            options: Mapping[str, Any], catalog_inputs: CatalogInputs | None = None) -> str:
    """:func:`combine` of the inputs as they are now."""
    catalog = {name: fn(con) for name, fn in (catalog_inputs or {}).items()}
    return combine(stage, {k: run_fingerprint(con, ws, k) for k in inputs}, options, catalog)


def is_current(ws: Workspace, stored: str | None, stage: str, inputs: Sequence[RunKey],
               options: Mapping[str, Any], catalog_inputs: CatalogInputs | None = None) -> bool:
    """The currency rule: a stored fingerprint equals the one the inputs give now."""
    if not stored:
        return False
    with ws.read(views=False) as con:
        return stored == current(con, ws, stage, inputs, options, catalog_inputs)


@contextlib.contextmanager
def committing(ws: Workspace, expected: str, stage: str, inputs: Sequence[RunKey],
               options: Mapping[str, Any], *, what: str,
               catalog_inputs: CatalogInputs | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection under the lock, after checking that ``inputs`` (and
    ``catalog_inputs``) still give ``expected``.

    Raises :class:`InputsChanged` (nothing stored) when another process changed them meanwhile.
    """
    with ws.write(wait=COMMIT_WAIT) as con:
        if current(con, ws, stage, inputs, options, catalog_inputs) != expected:
            names = ", ".join([str(k) for k in inputs] + list(catalog_inputs or {}))
            raise InputsChanged(
                f"the embeddings or images behind {what} ({names}) changed while it was computed (another "
                "vlmindex process wrote to the workspace); nothing was stored: run the command again"
            )
        yield con


def catalog_inputs(ws: Workspace, catalog: CatalogRecipe | None) -> CatalogInputs | None:
    """The functions that fingerprint recorded catalog inputs now (see :data:`PROVIDERS`)."""
    if not catalog:
        return None
    out = {}
    for name, (provider, args) in catalog.items():
        if provider not in PROVIDERS:
            importlib.import_module(PROVIDER_MODULES[provider])  # the stage module registers it
        out[name] = functools.partial(PROVIDERS[provider], ws=ws, **dict(args))
    return out


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
        recorded = {name: (provider, args) for name, (provider, args) in made_from.get("catalog", {}).items()}
        catalog = {name: fn(con) for name, fn in (catalog_inputs(ws, recorded) or {}).items()}
        if combine(made_from["stage"], {k: now[k] for k in keys}, made_from["options"], catalog) != stored:
            stale.add(analysis_id)
    return stale
