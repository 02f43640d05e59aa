"""Embedding storage: Parquet parts per (model, dataset, condition), written atomically.

Each part holds ``model, dataset, condition, image_id, embedding`` (a fixed-size float list), so
DuckDB's ``embeddings`` view reads them in place and a part is self-describing. A part is either
whole or absent (temporary file + rename), which is what makes embedding runs resumable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmindex.errors import VlmindexError

_HOST = socket.gethostname().replace(".", "_") or "host"
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def part_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []


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
) -> Path:
    """Write one part atomically; returns its path."""
    if dtype not in DTYPES:
        raise VlmindexError(f"unknown --dtype {dtype!r}; use float32 or float16")
    np_type, pa_type = DTYPES[dtype]
    n, dim = embeddings.shape
    values = pa.array(np.ascontiguousarray(embeddings, dtype=np_type).reshape(-1), type=pa_type)
    table = pa.table({
        "model": pa.array([model] * n, pa.string()).dictionary_encode(),
        "dataset": pa.array([dataset] * n, pa.string()).dictionary_encode(),
        "condition": pa.array([condition] * n, pa.string()).dictionary_encode(),
        "image_id": pa.array(np.asarray(image_ids, dtype=np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
    })
    name = f"part-{time.time_ns():016x}-{tag}{uuid.uuid4().hex[:8]}.parquet"  # name order = write order
    return write_table_atomic(table, directory / name, compression="zstd")


def write_table_atomic(table: pa.Table, path: Path, **kwargs: object) -> Path:
    """Write a Parquet file through a temporary name and a rename: whole or absent, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, path)
    return path


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
    """Sorted image ids that already have an embedding in ``directory``."""
    parts = part_paths(directory)
    if not parts:
        return np.empty(0, dtype=np.int64)
    ids = [pq.read_table(p, columns=["image_id"])["image_id"].to_numpy() for p in parts]
    return np.unique(np.concatenate(ids))


def read_embeddings(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """All embeddings of a run as ``(image_ids, matrix float32)``, sorted by image id."""
    parts = part_paths(directory)
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    ids_list, mats = [], []
    for p in parts:
        t = pq.read_table(p, columns=["image_id", "embedding"])
        col = t["embedding"].combine_chunks()
        dim = col.type.list_size
        ids_list.append(t["image_id"].to_numpy())
        mats.append(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32))
    dims = {m.shape[1] for m in mats}
    if len(dims) > 1:
        raise VlmindexError(
            f"embeddings in {directory} have mixed dimensions {sorted(dims)}; "
            "delete the folder and embed again"
        )
    ids = np.concatenate(ids_list)
    mat = np.concatenate(mats)
    order = np.argsort(ids, kind="stable")
    ids, mat = ids[order], mat[order]
    # An image in two parts (an import killed before it removed the old part, a requeued shard
    # overlapping its first run): part names start with their write time, so the newest wins.
    keep = np.ones(len(ids), dtype=bool)
    keep[:-1] = ids[:-1] != ids[1:]
    return ids[keep], mat[keep]


def embeddings_checksum(ids: np.ndarray, matrix: np.ndarray) -> str:
    """sha256 over ids and float32 values: what an index was built from."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    return h.hexdigest()
