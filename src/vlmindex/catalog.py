"""Read-side catalog queries shared by the CLI and later stages."""

from __future__ import annotations

from typing import Any

import duckdb

from vlmindex.errors import VlmindexError


def dataset_summaries(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """One row per dataset: format, modalities, classes, and image counts per split."""
    rows = con.execute(
        """
        SELECT d.name, d.format,
               string_agg(DISTINCT i.modality, ', ' ORDER BY i.modality) AS modality,
               count(DISTINCT i.label) AS n_classes,
               string_agg(DISTINCT i.label, ', ' ORDER BY i.label) AS classes,
               count(i.image_id) AS images,
               count(DISTINCT i.group_id) AS groups,
               d.n_skipped AS skipped,
               d.source
        FROM datasets d LEFT JOIN images i ON i.dataset = d.name
        GROUP BY ALL ORDER BY d.name
        """
    ).fetchall()
    cols = ["name", "format", "modality", "n_classes", "classes", "images", "groups", "skipped", "source"]
    out = [dict(zip(cols, r, strict=True)) for r in rows]
    splits = con.execute(
        "SELECT dataset, coalesce(split, '(none)'), count(*) FROM images GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    per = {}
    for ds, split, n in splits:
        per.setdefault(ds, {})[split] = n
    by_modality: dict[str, dict] = {}
    for ds, modality, label, n in con.execute(
        "SELECT dataset, coalesce(modality, '(none)'), coalesce(label, '(none)'), count(*) FROM images "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall():
        by_modality.setdefault(ds, {}).setdefault(modality, {})[label] = n
    group_sizes = {ds: {"min": lo, "max": hi, "mean": round(mean, 2)} for ds, lo, hi, mean in con.execute(
        "SELECT dataset, min(n), max(n), avg(n) FROM "
        "(SELECT dataset, group_id, count(*) AS n FROM images GROUP BY ALL) GROUP BY dataset"
    ).fetchall()}
    for row in out:
        row["splits"] = per.get(row["name"], {})
        row["modalities"] = by_modality.get(row["name"], {})
        row["images_per_group"] = group_sizes.get(row["name"])
    return out


def require_dataset(con: duckdb.DuckDBPyConnection, name: str) -> None:
    if con.execute("SELECT 1 FROM datasets WHERE name = ?", [name]).fetchone():
        return
    known = [r[0] for r in con.execute("SELECT name FROM datasets ORDER BY name").fetchall()]
    hint = f"known datasets: {', '.join(known)}" if known else "the workspace has none yet"
    raise VlmindexError(
        f"unknown dataset {name!r} ({hint}); add it with `vlmindex ingest` or `vlmindex synth`"
    )


def class_names(con: duckdb.DuckDBPyConnection, dataset: str) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT DISTINCT label FROM images WHERE dataset = ? AND label IS NOT NULL ORDER BY label",
        [dataset],
    ).fetchall()]


def class_pools(con: duckdb.DuckDBPyConnection, dataset: str) -> dict[str | None, list[str]]:
    """Sorted class names per modality of a dataset.

    A ``wrong-label`` overlay draws from the image's own modality, so a chest X-ray is never
    labelled "melanoma": that would test a model's reading, not its pull toward a plausible class.
    """
    pools: dict[str | None, list[str]] = {}
    for modality, label in con.execute(
        "SELECT DISTINCT modality, label FROM images WHERE dataset = ? AND label IS NOT NULL "
        "ORDER BY modality, label", [dataset],
    ).fetchall():
        pools.setdefault(modality, []).append(label)
    return pools
