"""The workspace: one directory holding the DuckDB catalog and every file later stages write.

Layout::

    catalog.duckdb                                    images, datasets, conditions, runs, metrics
    images/<dataset>/...                              PNGs converted at ingest (MedMNIST, DICOM)
    embeddings/<model>/<dataset>/<condition>/part-*.parquet
    indexes/<model>/<dataset>/<condition>.faiss (+ .json sidecar)
    neighbors/<model>/<dataset>/<condition>/<analysis>.parquet

Writers take an exclusive ``flock`` on ``.lock`` so a second writer gets a clear "workspace busy"
message instead of DuckDB's lock error; DuckDB's own single-writer rule is the backstop. Parquet
files are written to a temporary name and renamed, so a killed process never leaves half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import duckdb

from vlmindex.errors import VlmindexError, WorkspaceBusy

SCHEMA_VERSION = 1
DEFAULT_WORKSPACE = "vlmindex-workspace"
ENV_WORKSPACE = "VLMINDEX_WORKSPACE"
CONNECT_WAIT = 10.0  # seconds to wait for another process's short catalog write

# version -> function that upgrades a catalog from that version to version + 1.
MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection], None]] = {}

# Views over Parquet that DuckDB reads in place. When no file exists yet the view is empty but
# typed, so shipped analyses still parse on a fresh workspace.
PARQUET_VIEWS: dict[str, tuple[str, str]] = {
    "embeddings": (
        "embeddings/*/*/*/part-*.parquet",
        "SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS dataset, NULL::VARCHAR AS condition, "
        "NULL::BIGINT AS image_id, NULL::FLOAT[] AS embedding WHERE false",
    ),
    "neighbors": (
        "neighbors/*/*/*/*.parquet",
        "SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS dataset, NULL::VARCHAR AS condition, "
        "NULL::VARCHAR AS analysis_id, NULL::BIGINT AS image_id, NULL::INTEGER AS rank, "
        "NULL::BIGINT AS neighbor_id, NULL::FLOAT AS score WHERE false",
    ),
}


def sql_dir() -> Path:
    """The shipped ``.sql`` files: packaged into the wheel, or ``sql/`` of a source checkout."""
    packaged = resources.files("vlmindex") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql"


def slug(name: str) -> str:
    """A directory-safe form of a model, dataset or condition name; distinct names stay distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"
    if safe != name:
        safe = f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class Workspace:
    """A vlmindex workspace directory. Cheap to construct; nothing is created until first write."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def resolve(cls, root: str | os.PathLike[str] | None = None) -> Workspace:
        """``root``, else ``$VLMINDEX_WORKSPACE``, else ``./vlmindex-workspace``."""
        return cls(root or os.environ.get(ENV_WORKSPACE) or DEFAULT_WORKSPACE)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def images_dir(self, dataset: str) -> Path:
        return self.root / "images" / slug(dataset)

    def embeddings_dir(self, model: str, dataset: str, condition: str = "clean") -> Path:
        return self.root / "embeddings" / slug(model) / slug(dataset) / slug(condition)

    def index_path(self, model: str, dataset: str, condition: str = "clean") -> Path:
        return self.root / "indexes" / slug(model) / slug(dataset) / f"{slug(condition)}.faiss"

    def neighbors_dir(self, model: str, dataset: str, condition: str = "clean") -> Path:
        return self.root / "neighbors" / slug(model) / slug(dataset) / slug(condition)

    def drop_results(self, con: duckdb.DuckDBPyConnection, dataset: str, condition: str | None = None) -> None:
        """Delete everything derived from a dataset's pixels (or one condition's): embeddings,
        indexes, neighbours and their catalog rows. Called when those pixels change (ingest
        --replace, a condition replaced or removed), so no stale number survives the change."""
        import shutil

        for kind in ("embeddings", "neighbors"):
            for d in (self.root / kind).glob(f"*/{slug(dataset)}"):
                target = d / slug(condition) if condition else d
                if target.exists():
                    shutil.rmtree(target)
        pattern = f"{slug(condition)}.*" if condition else "*"
        for f in (self.root / "indexes").glob(f"*/{slug(dataset)}/{pattern}"):
            f.unlink()
        where, args = "dataset = ?", [dataset]
        if condition:
            where, args = where + " AND condition = ?", [dataset, condition]
        for table in ("runs", "summaries", "query_metrics", "overlay_effects", "zeroshot_results"):
            con.execute(f"DELETE FROM {table} WHERE {where}", args)
        if condition == "clean":  # every overlay effect is read against clean
            for table in ("overlay_effects", "zeroshot_results"):
                con.execute(f"DELETE FROM {table} WHERE dataset = ?", [dataset])

    # -- connections ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait: float = 0.0) -> Iterator[None]:
        """Hold the workspace's exclusive write lock; raise WorkspaceBusy after ``wait`` seconds."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fh = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        deadline = time.monotonic() + wait
        acquired = False
        try:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    acquired = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        fh.seek(0)
                        holder = fh.read().strip() or "another vlmindex process"
                        raise WorkspaceBusy(
                            f"workspace {self.root} is busy: {holder} is writing to it; "
                            "try again when it has finished"
                        ) from None
                    time.sleep(0.2)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} ({' '.join(Path(a).name for a in sys.argv[:3])})")
            fh.flush()
            yield
        finally:
            if acquired:  # a waiter that gave up must not wipe the holder's note
                with contextlib.suppress(OSError):
                    fh.seek(0)
                    fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    @contextlib.contextmanager
    def write(self, *, wait: float = 0.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write catalog connection under the write lock, schema created or migrated."""
        with self.lock(wait=wait):
            con = self._connect(read_only=False, wait=max(wait, CONNECT_WAIT))
            try:
                self._ensure_schema(con)
                _register_views(con, self.root)
                yield con
            finally:
                con.close()

    @contextlib.contextmanager
    def read(self, *, wait: float = CONNECT_WAIT) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only catalog connection with the Parquet views registered.

        Waits up to ``wait`` seconds while another process writes (shards of one run finish
        at nearly the same time and each records itself briefly).
        """
        if not self.catalog_path.exists():
            with self.write(wait=wait):
                pass
        con = self._connect(read_only=True, wait=wait)
        if _stored_version(con) != SCHEMA_VERSION:  # create, migrate or refuse: write() decides
            con.close()
            with self.write(wait=wait):
                pass
            con = self._connect(read_only=True, wait=wait)
        try:
            _register_views(con, self.root)
            yield con
        finally:
            con.close()

    def _connect(self, *, read_only: bool, wait: float = 0.0) -> duckdb.DuckDBPyConnection:
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        while True:
            try:
                return duckdb.connect(str(self.catalog_path), read_only=read_only)
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise VlmindexError(f"cannot open catalog {self.catalog_path}: {exc}") from None
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"workspace {self.root} is busy: another process has its catalog open; "
                        "try again when it has finished"
                    ) from None
                time.sleep(0.2)

    def _ensure_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        version = _stored_version(con)
        if version is not None and version > SCHEMA_VERSION:
            raise VlmindexError(
                f"workspace {self.root} has catalog schema v{version}, newer than this vlmindex "
                f"understands (v{SCHEMA_VERSION}); upgrade vlmindex or use another --workspace"
            )
        if version is not None and version < SCHEMA_VERSION:
            for v in range(version, SCHEMA_VERSION):
                if v not in MIGRATIONS:
                    raise VlmindexError(
                        f"workspace {self.root} has catalog schema v{version} and no migration "
                        f"from v{v} exists; re-create it with this vlmindex"
                    )
                con.execute("BEGIN")
                MIGRATIONS[v](con)
                con.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(v + 1)]
                )
                con.execute("COMMIT")
        con.execute((sql_dir() / "schema.sql").read_text())
        if version is None:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


def _stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except duckdb.Error:  # no meta table: not a vlmindex catalog yet
        return None
    return int(row[0]) if row else None


def _register_views(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    for name, (pattern, empty_sql) in PARQUET_VIEWS.items():
        if any(root.glob(pattern)):
            glob = str(root / pattern).replace("'", "''")
            source = f"SELECT * FROM read_parquet('{glob}', union_by_name = true)"
        else:
            source = empty_sql
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {source}")
