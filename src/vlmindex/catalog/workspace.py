"""The workspace: one directory holding the DuckDB catalog and every file later stages write.

Layout::

    catalog.duckdb                                    tables (see docs/tables.md)
    images/<dataset>/...                              PNGs converted at ingest (MedMNIST, DICOM, synth)
    embeddings/<model>/<dataset>/<condition>/part-*.parquet
    indexes/<model>/<dataset>/<condition>.faiss (+ .json sidecar)
    neighbors/<model>/<dataset>/<condition>/<analysis>.parquet

Two locks keep concurrent processes apart. Writers take an exclusive ``flock`` on ``.lock``, so a
second writer gets a "workspace busy" message that names the holder instead of DuckDB's lock
error. DuckDB itself lets one process open the catalog read-write *or* several read-only, so a
reader never sees a writer's half-done change: every file a writer renames into place or deletes
(parts, indexes, neighbours) is changed while it holds the catalog read-write, and every reader
reads those files while it holds the catalog open.
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

SCHEMA_VERSION = 5
DEFAULT_WORKSPACE = "vlmindex-workspace"
ENV_WORKSPACE = "VLMINDEX_WORKSPACE"
CONNECT_WAIT = 10.0  # seconds to wait for another process's short catalog write
ENV_WRITE_WAIT = "VLMINDEX_WRITE_WAIT"


def write_wait(default: float = 30.0) -> float:
    """Seconds a catalog-changing command (ingest, overlay add/remove) waits for another writer
    before it says "busy": ``$VLMINDEX_WRITE_WAIT``, else ``default``."""
    value = os.environ.get(ENV_WRITE_WAIT)
    if value is None:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        raise VlmindexError(f"${ENV_WRITE_WAIT}={value!r} is not a number of seconds") from None

# version -> function that upgrades a catalog from that version to version + 1 (inside its
# transaction), and the files of the workspace that the same step rewrites (after it).
MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection], None]] = {}
FILE_MIGRATIONS: dict[int, Callable[[Path], None]] = {}


def sql_dir() -> Path:
    """The shipped ``.sql`` files: packaged into the wheel, or ``sql/`` of a source checkout."""
    packaged = resources.files("vlmindex") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "sql"


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

    def exists(self) -> bool:
        return self.catalog_path.is_file()

    def require(self) -> Workspace:
        """Raise a one-line error when there is no workspace here; read-only commands call this so
        that a mistyped ``-w`` is reported instead of creating an empty workspace."""
        if not self.exists():
            raise VlmindexError(
                f"no vlmindex workspace at {self.root} (no catalog.duckdb); create one with "
                "`vlmindex synth demo` or `vlmindex ingest NAME SOURCE --format ...`, or pass -w DIR"
            )
        return self

    def images_dir(self, dataset: str) -> Path:
        return self.root / "images" / slug(dataset)

    def embeddings_dir(self, model: str, dataset: str, condition: str = "clean") -> Path:
        return self.root / "embeddings" / slug(model) / slug(dataset) / slug(condition)

    def index_path(self, model: str, dataset: str, condition: str = "clean") -> Path:
        return self.root / "indexes" / slug(model) / slug(dataset) / f"{slug(condition)}.faiss"

    def neighbors_dir(self, model: str, dataset: str, condition: str = "clean") -> Path:
        return self.root / "neighbors" / slug(model) / slug(dataset) / slug(condition)

    # -- locks and connections -----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait: float = 0.0) -> Iterator[None]:
        """Hold the workspace's exclusive write lock; raise WorkspaceBusy after ``wait`` seconds."""
        with hold_flock(self.root / ".lock", wait=wait,
                        busy=lambda holder: f"workspace {self.root} is busy: {holder} is writing to it; "
                                            "try again when it has finished"):
            yield

    @contextlib.contextmanager
    def write(self, *, wait: float = 0.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write catalog connection under the write lock, schema created or migrated (no
        Parquet views: writers read runs through ``catalog.embeddings``)."""
        with self.lock(wait=wait):
            con = self._connect(read_only=False, wait=max(wait, CONNECT_WAIT))
            try:
                self._ensure_schema(con)
                yield con
            finally:
                con.close()

    @contextlib.contextmanager
    def read(self, *, wait: float = CONNECT_WAIT, views: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only catalog connection, with the Parquet views registered unless ``views=False``.

        Creates an empty catalog when there is none (library use; the CLI's read-only commands
        call :meth:`require` first). Waits up to ``wait`` seconds while another process writes
        (shards of one run finish at nearly the same time and each records itself briefly).
        """
        from vlmindex.catalog import views as parquet_views

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
            if views:
                parquet_views.register(con, self)
            yield con
        finally:
            con.close()

    def connect(self, *, read_only: bool, wait: float = CONNECT_WAIT,
                config: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
        """A bare catalog connection (no lock, no schema work): for the SQL sandbox."""
        return self._connect(read_only=read_only, wait=wait, config=config)

    def _connect(self, *, read_only: bool, wait: float = 0.0,
                 config: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        while True:
            try:
                con = duckdb.connect(self._duckdb_path(), read_only=read_only, config=config or {})
                # No progress bar: DuckDB draws it on stdout, into the rows a user pipes.
                con.execute("SET enable_progress_bar = false")
                return con
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise VlmindexError(f"cannot open catalog {self.catalog_path}: {exc}") from None
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"workspace {self.root} is busy: another process has its catalog open; "
                        "try again when it has finished"
                    ) from None
                time.sleep(0.2)

    def _duckdb_path(self) -> str:
        """The catalog's path as DuckDB is given it.

        DuckDB reads everything after the first ``?`` of a database path as URL parameters (its
        WAL would be ``ws.wal?rest``), resolves symbolic links first, and offers no escape. So a
        workspace whose path holds a ``?`` opens its catalog through a hard link (same file) in a
        hidden folder of the nearest ancestor whose path has none, on the same filesystem, where
        DuckDB then keeps the catalog's WAL too.
        """
        path = self.catalog_path
        if "?" not in str(path):
            return str(path)
        parent = next((p for p in path.parents if "?" not in str(p)), None)
        if parent is None:
            raise VlmindexError(f"cannot open a catalog under {self.root}: every folder of its path holds a '?'")
        alias_dir = parent / f".vlmindex-catalog-{hashlib.sha1(str(self.root).encode()).hexdigest()[:16]}"
        alias = alias_dir / path.name
        try:
            alias_dir.mkdir(exist_ok=True)
            if path.exists():
                if not (alias.exists() and os.path.samefile(alias, path)):
                    tmp = alias_dir / f".{path.name}.{os.getpid()}"
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                    os.link(path, tmp)
                    os.replace(tmp, alias)
            else:
                duckdb.connect(str(alias)).close()  # create it, then give it its place in the workspace
                os.link(alias, path)
        except OSError as exc:
            raise VlmindexError(f"cannot open a catalog under {self.root}, whose path holds a '?' ({exc}); "
                                "use a workspace path without '?'") from None
        return str(alias)

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
                if v in FILE_MIGRATIONS:  # files first: rewriting them twice is harmless
                    FILE_MIGRATIONS[v](self.root)
                with transaction(con):
                    MIGRATIONS[v](con)
                    con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(v + 1)])
        con.execute((sql_dir() / "schema.sql").read_text())
        if version is None:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One catalog transaction: committed when the block ends, rolled back when it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@contextlib.contextmanager
def hold_flock(path: Path, *, wait: float, busy: Callable[[str], str]) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path``, noting our pid in it; ``WorkspaceBusy(busy(holder))``
    after ``wait`` seconds. One helper for the workspace lock and the per-run embedding locks.

    Yields the lock's file descriptor: a child forked while it is held (a DataLoader worker)
    shares the lock and must close its copy, or a killed parent's lock would outlive it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
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
                    raise WorkspaceBusy(busy(holder)) from None
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({' '.join(Path(a).name for a in sys.argv[:3])})")
        fh.flush()
        yield fh.fileno()
    finally:
        if acquired:  # a waiter that gave up must not wipe the holder's note
            with contextlib.suppress(OSError):
                fh.seek(0)
                fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    except duckdb.Error:  # no meta table: not a vlmindex catalog yet
        return None
    return int(row[0][0]) if row else None


def _add_columns(con: duckdb.DuckDBPyConnection, added: dict[str, tuple[str, ...]]) -> None:
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    for table, columns in added.items():
        if table in tables:  # a missing table is created whole by schema.sql afterwards
            for column in columns:
                con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}")


def _migrate_v1(con: duckdb.DuckDBPyConnection) -> None:
    """v1 → v2: fingerprint columns on derived results and the skipped table's stage columns."""
    _add_columns(con, {
        "skipped": ("stage VARCHAR", "model VARCHAR", "condition VARCHAR"),
        "summaries": ("inputs_fingerprint VARCHAR", "n_missing BIGINT"),
        "overlay_effects": ("inputs_fingerprint VARCHAR",),
        "zeroshot_results": ("inputs_fingerprint VARCHAR",),
        "text_detections": ("pixels VARCHAR",),
        "runs": ("recorded_from VARCHAR",),
    })


def _migrate_v1_files(root: Path) -> None:
    """v1 → v2: the ``part`` column every embedding part now carries (legacy parts rewritten once)."""
    from vlmindex.catalog import parts

    parts.add_part_column(root / "embeddings")


# v2 -> v3: columns added to existing tables, one list per feature. The tables ``duplicates`` and
# ``duplicate_searches`` are new and come from schema.sql.
V3_PROBE_COLUMNS = {
    "summaries": ("probe_balanced_accuracy_sd DOUBLE",),  # linear probe over --probe-seeds seeds
}
V3_DUPLICATE_COLUMNS = {
    "images": ("pixel_sha256 VARCHAR",),  # decoded-pixel hash, filled lazily by `vlmindex duplicates`
    # false / NULL for every earlier analysis
    "summaries": ("exclude_duplicates BOOLEAN DEFAULT false", "duplicates_model VARCHAR"),
}
V3_COLUMNS: tuple[dict[str, tuple[str, ...]], ...] = (V3_PROBE_COLUMNS, V3_DUPLICATE_COLUMNS)


def _migrate_v2(con: duckdb.DuckDBPyConnection) -> None:
    """v2 → v3: the columns of :data:`V3_COLUMNS`."""
    for added in V3_COLUMNS:
        _add_columns(con, added)


MIGRATIONS[1] = _migrate_v1
FILE_MIGRATIONS[1] = _migrate_v1_files
MIGRATIONS[2] = _migrate_v2


V4_SAMPLE_COLUMNS = {
    # analyze --sample-queries: NULL for every earlier (full) analysis
    "summaries": ("sampled_queries BIGINT", "query_pool BIGINT", "ci JSON"),
}


def _migrate_v3(con: duckdb.DuckDBPyConnection) -> None:
    """v3 → v4: the columns of :data:`V4_SAMPLE_COLUMNS`."""
    _add_columns(con, V4_SAMPLE_COLUMNS)


MIGRATIONS[3] = _migrate_v3


V5_FAMILY_COLUMNS = {
    # the model family of a run (vlmindex findings); NULL for earlier runs: the registry says
    "runs": ("family VARCHAR",),
}


def _migrate_v4(con: duckdb.DuckDBPyConnection) -> None:
    """v4 → v5: :data:`V5_FAMILY_COLUMNS`; tables ``attack_queries`` and ``findings`` come from schema.sql."""
    _add_columns(con, V5_FAMILY_COLUMNS)


MIGRATIONS[4] = _migrate_v4
