"""The Parquet views (``embeddings``, ``neighbors``) and the rule that picks an image's current row.

Parquet files are handed to DuckDB as Arrow datasets built from file lists that Python made, never
as glob patterns: DuckDB would read ``[``, ``?`` and ``*`` in a workspace path as glob syntax, and
the SQL sandbox (``catalog.sandbox``) turns DuckDB's own file access off altogether. Each run
directory is one Arrow dataset (its parts share one vector size); the views union them.

An image's **current embedding** in a run is its row in the newest part whose ``pixels``
fingerprint equals the image's current one in the ``image_pixels`` view (rows without a
fingerprint, written by hand or by vlmindex < 0.2, are taken as they are). Rows of replaced pixels
or of a second copy never reach a view or a reader: :func:`current_rows_sql` is the one place that
rule is written, and both the views and :func:`vlmindex.catalog.embeddings.read_run` use it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vlmindex.catalog.parts import NEIGHBOR_SCHEMA, part_paths
from vlmindex.errors import VlmindexError

if TYPE_CHECKING:
    from vlmindex.catalog.workspace import Workspace

EMPTY_EMBEDDINGS = ("SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS dataset, NULL::VARCHAR AS condition, "
                    "NULL::BIGINT AS image_id, NULL::FLOAT[] AS embedding WHERE false")
EMPTY_NEIGHBORS = ("SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS dataset, NULL::VARCHAR AS condition, "
                   "NULL::VARCHAR AS analysis_id, NULL::BIGINT AS image_id, NULL::INTEGER AS rank, "
                   "NULL::BIGINT AS neighbor_id, NULL::FLOAT AS score WHERE false")
_names = itertools.count()


def literal(value: str) -> str:
    """``value`` as a SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


class _CastingStream:
    """An Arrow stream over a float16 run, cast to float32 on the fly: DuckDB has no half floats.

    DuckDB calls ``__arrow_c_stream__`` afresh for every scan, so the view stays re-readable.
    """

    def __init__(self, dataset: pads.Dataset) -> None:
        self.dataset = dataset
        fields = [f if f.name != "embedding" else pa.field("embedding", pa.list_(pa.float32(), f.type.list_size))
                  for f in dataset.schema]
        self.schema = pa.schema(fields)

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        def batches() -> Any:
            for batch in self.dataset.to_batches():
                yield batch.cast(self.schema)

        return pa.RecordBatchReader.from_batches(self.schema, batches()).__arrow_c_stream__(requested_schema)


@dataclass(frozen=True)
class RunRelation:
    """One run directory registered on a connection under ``name``."""

    name: str
    model: str
    dataset: str
    condition: str
    files: tuple[Path, ...]


def register_run(con: duckdb.DuckDBPyConnection, directory: Path, files: list[Path] | None = None
                 ) -> RunRelation | None:
    """Register the parts of ``directory`` (or the given ``files``) as one relation; None if none."""
    files = part_paths(directory) if files is None else files
    if not files:
        return None
    try:
        schema = pq.read_schema(files[-1]).remove_metadata()
        first = pq.read_table(files[-1], columns=["model", "dataset", "condition"]).slice(0, 1).to_pylist()
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise VlmindexError(f"embedding part {files[-1]} is damaged ({' '.join(str(exc).split())[:200]}); delete it "
                            "and run `vlmindex embed` again to redo its images") from None
    dataset = pads.dataset([str(f) for f in files], schema=schema, format="parquet")
    name = f"_vlm_run_{next(_names)}"
    emb = schema.field("embedding").type
    con.register(name, _CastingStream(dataset) if pa.types.is_float16(emb.value_type) else dataset)
    row = first[0] if first else {"model": "", "dataset": "", "condition": ""}
    return RunRelation(name, str(row["model"]), str(row["dataset"]), str(row["condition"]), tuple(files))


def current_rows_sql(run: RunRelation) -> str:
    """``(image_id, part)`` of each image's current row in ``run`` (see the module docstring)."""
    return (
        f"SELECT p.image_id, max(p.part::VARCHAR) AS part FROM {run.name} p "
        "JOIN image_pixels x ON x.image_id = p.image_id "
        f"WHERE x.dataset = {literal(run.dataset)} AND x.condition = {literal(run.condition)} "
        "AND (p.pixels IS NULL OR p.pixels = x.pixels) GROUP BY p.image_id"
    )


def run_directories(ws: Workspace) -> list[Path]:
    """Every ``embeddings/<model>/<dataset>/<condition>`` directory, listed (not globbed)."""
    root = ws.root / "embeddings"
    out = []
    for level1 in _subdirs(root):
        for level2 in _subdirs(level1):
            out.extend(_subdirs(level2))
    return out


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def register(con: duckdb.DuckDBPyConnection, ws: Workspace) -> None:
    """Create the temporary views ``embeddings`` and ``neighbors`` on ``con``, and the temporary
    table ``stale_analyses`` (the ids of stored analyses whose inputs changed since)."""
    selects = []
    for directory in run_directories(ws):
        run = register_run(con, directory)
        if run is None:
            continue
        selects.append(
            f"SELECT p.model::VARCHAR AS model, p.dataset::VARCHAR AS dataset, p.condition::VARCHAR AS condition, "
            f"p.image_id, p.embedding::FLOAT[] AS embedding FROM {run.name} p "
            f"JOIN ({current_rows_sql(run)}) c ON c.image_id = p.image_id AND c.part = p.part::VARCHAR"
        )
    con.execute("CREATE OR REPLACE TEMP VIEW embeddings AS " + (" UNION ALL ".join(selects) or EMPTY_EMBEDDINGS))

    files = [str(p) for d in _neighbor_dirs(ws) for p in sorted(d.glob("*.parquet"))]
    if files:
        name = f"_vlm_neighbors_{next(_names)}"
        con.register(name, pads.dataset(files, schema=NEIGHBOR_SCHEMA, format="parquet"))
        # Only files of a stored analysis, written by the run that stored it (see catalog.parts).
        source = (f"SELECT n.model::VARCHAR AS model, n.dataset::VARCHAR AS dataset, "
                  "n.condition::VARCHAR AS condition, n.analysis_id::VARCHAR AS analysis_id, n.image_id, n.rank, "
                  f"n.neighbor_id, n.score FROM {name} n "
                  "JOIN summaries s ON s.analysis_id = n.analysis_id::VARCHAR "
                  "AND s.inputs_fingerprint IS NOT DISTINCT FROM n.inputs_fingerprint::VARCHAR")
    else:
        source = EMPTY_NEIGHBORS
    con.execute(f"CREATE OR REPLACE TEMP VIEW neighbors AS {source}")
    # Which stored analyses are not current, so the shipped analyses can say so (column `current`).
    from vlmindex.catalog.fingerprints import stale_analyses

    con.execute("CREATE OR REPLACE TEMP TABLE stale_analyses AS SELECT unnest(?::VARCHAR[]) AS analysis_id",
                [sorted(stale_analyses(con, ws))])


def _neighbor_dirs(ws: Workspace) -> list[Path]:
    root = ws.root / "neighbors"
    return [c for m in _subdirs(root) for d in _subdirs(m) for c in _subdirs(d)]
