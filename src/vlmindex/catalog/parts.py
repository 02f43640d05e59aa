"""Parquet files of the workspace: their schemas, and the one atomic writer every file goes through.

**Embedding parts** (``embeddings/<model>/<dataset>/<condition>/part-*.parquet``), one row per image:

========== ==================== ==========================================================
column     type                 meaning
========== ==================== ==========================================================
model      string               the run's model name
dataset    string               the run's dataset
condition  string               ``clean`` or an overlay condition
image_id   int64                the image (``images.image_id``, the FAISS id)
pixels     string               fingerprint of the pixels that were embedded (``image_pixels``)
part       string               the part's own name: identity and write order of its rows
embedding  fixed_size_list      the vector (float32, or float16 with ``--dtype float16``)
========== ==================== ==========================================================

Each part is immutable and whole or absent (temporary file + rename). Its Parquet metadata key
``vlmindex.run`` holds the provenance of the run that wrote it (model weights, preprocessing,
library versions, device), so a ``runs`` row that a failed catalog write never recorded can be
rebuilt from the parts themselves. Part names start with a sequence number that only grows within a
run directory (assigned under the workspace lock), so name order is commit order: where an image has
rows in several parts, the newest part wins (``catalog.embeddings``).

**Neighbour files** (``neighbors/<model>/<dataset>/<condition>/<analysis_id>.parquet``): ``model,
dataset, condition, analysis_id, image_id, rank, neighbor_id, score, inputs_fingerprint``, one row
per query and rank; the fingerprint ties the file to its ``summaries`` row (a file rewritten by an
analysis that never committed does not match it, and the ``neighbors`` view leaves it out).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmindex.errors import VlmindexError

_HOST = socket.gethostname().replace(".", "_") or "host"
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
RUN_METADATA_KEY = b"vlmindex.run"
_PART_RE = re.compile(r"^part-([0-9a-f]{16})-")

NEIGHBOR_SCHEMA = pa.schema([
    ("model", pa.dictionary(pa.int32(), pa.string())),
    ("dataset", pa.dictionary(pa.int32(), pa.string())),
    ("condition", pa.dictionary(pa.int32(), pa.string())),
    ("analysis_id", pa.dictionary(pa.int32(), pa.string())),
    ("image_id", pa.int64()),
    ("rank", pa.int32()),
    ("neighbor_id", pa.int64()),
    ("score", pa.float32()),
    ("inputs_fingerprint", pa.dictionary(pa.int32(), pa.string())),
])


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The Arrow schema of an embedding part of dimension ``dim``."""
    return pa.schema([
        ("model", pa.dictionary(pa.int32(), pa.string())),
        ("dataset", pa.dictionary(pa.int32(), pa.string())),
        ("condition", pa.dictionary(pa.int32(), pa.string())),
        ("image_id", pa.int64()),
        ("pixels", pa.string()),
        ("part", pa.dictionary(pa.int32(), pa.string())),
        ("embedding", pa.list_(DTYPES[dtype][1], dim)),
    ])


def part_paths(directory: Path) -> list[Path]:
    """The committed parts of a run directory, in name (= commit) order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet")


def next_part_name(directory: Path, tag: str = "") -> str:
    """A new part name that sorts after every part already in ``directory``.

    Called under the workspace lock by committing writers, so the sequence is a commit order;
    legacy parts (named by their write time in ns) are part of the same sequence.
    """
    last = max((int(m.group(1), 16) for p in part_paths(directory) if (m := _PART_RE.match(p.name))), default=0)
    return f"part-{last + 1:016x}-{tag}{uuid.uuid4().hex[:8]}.parquet"


def part_table(*, model: str, dataset: str, condition: str, image_ids: np.ndarray, embeddings: np.ndarray,
               pixels: list[str | None] | None, part: str, dtype: str = "float32") -> pa.Table:
    """The Arrow table of one embedding part."""
    if dtype not in DTYPES:
        raise VlmindexError(f"unknown --dtype {dtype!r}; use float32 or float16")
    np_type, _ = DTYPES[dtype]
    n, dim = embeddings.shape
    values = pa.array(np.ascontiguousarray(embeddings, dtype=np_type).reshape(-1), type=DTYPES[dtype][1])
    schema = embedding_schema(dim, dtype)
    return pa.table({
        "model": pa.array([model] * n, pa.string()).dictionary_encode(),
        "dataset": pa.array([dataset] * n, pa.string()).dictionary_encode(),
        "condition": pa.array([condition] * n, pa.string()).dictionary_encode(),
        "image_id": pa.array(np.asarray(image_ids, dtype=np.int64)),
        "pixels": pa.array(pixels if pixels is not None else [None] * n, pa.string()),
        "part": pa.array([part] * n, pa.string()).dictionary_encode(),
        "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
    }).cast(schema)


def write_part(
    directory: Path,
    *,
    model: str,
    dataset: str,
    condition: str,
    image_ids: np.ndarray,
    embeddings: np.ndarray,
    dtype: str = "float32",
    tag: str = "",
    pixels: list[str | None] | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """Write one part atomically; returns its path.

    This is the low-level writer: it checks nothing against the catalog. vlmindex's own writers
    go through :func:`vlmindex.catalog.embeddings.commit_part`, which calls it under the
    workspace lock after checking the rows' pixel fingerprints. Rows written here without
    ``pixels`` (by hand, or by a version that did not record them) are taken as they are.
    """
    name = next_part_name(directory, tag)
    table = part_table(model=model, dataset=dataset, condition=condition, image_ids=image_ids,
                       embeddings=embeddings, pixels=pixels, part=Path(name).stem, dtype=dtype)
    metadata = {RUN_METADATA_KEY: json.dumps(run or {}, default=str, sort_keys=True).encode()}
    return write_table_atomic(table.replace_schema_metadata(metadata), directory / name, compression="zstd")


def write_table_atomic(table: pa.Table, path: Path, **kwargs: object) -> Path:
    """Write a Parquet file through a temporary name and a rename: whole or absent, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, path)
    return path


def run_metadata(path: Path) -> dict[str, Any]:
    """The provenance stored in a part's Parquet metadata (empty for legacy parts)."""
    meta = pq.read_schema(path).metadata or {}
    try:
        return json.loads(meta.get(RUN_METADATA_KEY, b"{}"))
    except ValueError:
        return {}


def dimension(path: Path) -> int:
    """The vector size of a part."""
    return int(pq.read_schema(path).field("embedding").type.list_size)


def row_count(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files of this host's processes that no longer run (a kill -9 leaves them).

    Shards on other nodes of a shared filesystem write here too: their pids mean nothing on this
    host, so only files named with this host are judged.
    """
    if not directory.is_dir():
        return
    for tmp in directory.glob(f".part-*.{_HOST}.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stored_ids(directory: Path) -> np.ndarray:
    """Sorted image ids that have a row in some part of ``directory`` (current or not)."""
    parts = part_paths(directory)
    if not parts:
        return np.empty(0, dtype=np.int64)
    ids = [pq.read_table(p, columns=["image_id"])["image_id"].to_numpy() for p in parts]
    return np.unique(np.concatenate(ids))


def read_embeddings(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a run directory as ``(image_ids, matrix float32)``, newest part per image, sorted
    by id, without the catalog's pixel check (that is :func:`vlmindex.catalog.embeddings.read_run`).
    """
    parts = part_paths(directory)
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    ids_list, mats = [], []
    for p in parts:
        t = pq.read_table(p, columns=["image_id", "embedding"])
        ids_list.append(t["image_id"].to_numpy())
        mats.append(vectors_of(t["embedding"]))
    dims = {m.shape[1] for m in mats}
    if len(dims) > 1:
        raise VlmindexError(
            f"embeddings in {directory} have mixed dimensions {sorted(dims)}; "
            "delete the folder and embed again"
        )
    ids = np.concatenate(ids_list)[::-1]  # newest part first, so the first of each id is the newest
    mat = np.concatenate(mats)[::-1]
    order = np.argsort(ids, kind="stable")
    ids, mat = ids[order], mat[order]
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    return ids[keep], np.ascontiguousarray(mat[keep])


def unusable_rows(vectors: np.ndarray) -> np.ndarray:
    """The rows that are all zeros or not finite (a uniform image under hog, a model's NaN): no
    image is nearer to them than another, so they are left out of indexes and analyses, and
    refused as queries."""
    return ~(np.isfinite(vectors).all(axis=1) & vectors.any(axis=1))


def vectors_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A (fixed-size or variable) list column of vectors as a float32 matrix."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(col) == 0:
        return np.empty((0, getattr(col.type, "list_size", 0)), dtype=np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), -1).astype(np.float32, copy=False)


def add_part_column(embeddings_root: Path) -> None:
    """Rewrite legacy parts (without ``part``/``pixels`` columns) in the current layout, once.

    Their rows keep no pixel fingerprint: they were written while every change of pixels dropped
    the embeddings made from them, so they are taken as current (see :func:`write_part`).
    """
    if not embeddings_root.is_dir():
        return
    for run_dir in sorted(p for p in embeddings_root.glob("*/*/*") if p.is_dir()):
        for path in part_paths(run_dir):
            schema = pq.read_schema(path)
            if "part" in schema.names:
                continue
            t = pq.read_table(path)
            emb = t["embedding"].combine_chunks()
            dtype = "float16" if pa.types.is_float16(emb.type.value_type) else "float32"
            table = part_table(model=t["model"][0].as_py(), dataset=t["dataset"][0].as_py(),
                               condition=t["condition"][0].as_py(), image_ids=t["image_id"].to_numpy(),
                               embeddings=vectors_of(emb), pixels=None, part=path.stem, dtype=dtype)
            write_table_atomic(table.replace_schema_metadata({RUN_METADATA_KEY: b"{}"}), path,
                               compression="zstd")
