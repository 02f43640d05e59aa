"""Embedding runs in the workspace: what is current, what is pending, and how a part is committed.

The one reader (:func:`read_run`) returns each image's current embedding (newest part whose pixel
fingerprint is the image's current one, see ``catalog.views``) together with the fingerprint of
everything it read. Writers never rename a part into a run directory without
:func:`commit_part`, which holds the workspace lock and keeps only rows whose pixels are still
the catalog's and whose image no other process has embedded in the meantime: two ``embed`` runs
of one model, or an ``embed`` during ``ingest --replace``, end with one current row per image.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
import numpy as np

from vlmindex.catalog import parts
from vlmindex.catalog.keys import CLEAN, RunKey
from vlmindex.catalog.views import RunRelation, current_rows_sql, register_run
from vlmindex.catalog.workspace import CONNECT_WAIT, Workspace, hold_flock, slug, transaction
from vlmindex.errors import VlmindexError

_NO_ROWS = "SELECT NULL::BIGINT AS image_id, NULL::VARCHAR AS part WHERE false"
COMMIT_WAIT = 120.0  # seconds a finished part waits for the workspace lock


@dataclass
class RunEmbeddings:
    """A run's current embeddings, sorted by image id, and the fingerprint of what was read."""

    ids: np.ndarray
    vectors: np.ndarray
    zero_ids: np.ndarray  # current rows whose vector is all zeros or not finite: left out of ``ids``
    fingerprint: str      # of the run's catalog rows and current parts (``run_fingerprint``)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0


@dataclass(frozen=True)
class PendingImage:
    image_id: int
    path: str
    label: str | None
    modality: str | None
    sha256: str
    pixels: str


def _current(run: RunRelation | None) -> str:
    return current_rows_sql(run) if run is not None else _NO_ROWS


@contextlib.contextmanager
def _reading(ws: Workspace, con: duckdb.DuckDBPyConnection | None) -> Iterator[duckdb.DuckDBPyConnection]:
    """``con`` when the caller holds one, else a short read-only connection without views."""
    if con is not None:
        yield con
        return
    with ws.read(views=False) as own:
        yield own


def run_fingerprint(con: duckdb.DuckDBPyConnection, ws: Workspace, key: RunKey,
                    run: RunRelation | None = None, *, registered: bool = False) -> str:
    """sha256 over every image of the run's dataset: its pixels under the condition, label, group,
    split, modality, and the part holding its current embedding (``-`` for none).

    Any change that could change a number computed from the run changes it: new, removed or
    replaced pixels, relabelled images, a part committed or deleted. Parts are immutable and
    uniquely named, so a part's name stands for its vectors.
    """
    if run is None and not registered:
        run = register_run(con, ws.embeddings_dir(key.model, key.dataset, key.condition))
    row = con.execute(
        f"""
        WITH cur AS ({_current(run)})
        SELECT sha256(coalesce(string_agg(concat_ws(chr(31), i.image_id::VARCHAR, x.pixels, coalesce(c.part, '-'),
                                                    coalesce(i.label, chr(0)), coalesce(i.group_id, chr(0)),
                                                    coalesce(i.split, chr(0)), coalesce(i.modality, chr(0))),
                                          chr(30) ORDER BY i.image_id), ''))
        FROM images i JOIN image_pixels x ON x.image_id = i.image_id AND x.dataset = i.dataset
        LEFT JOIN cur c ON c.image_id = i.image_id
        WHERE i.dataset = ? AND x.condition = ?
        """, [key.dataset, key.condition]).fetchall()
    return str(row[0][0])


def read_run(ws: Workspace, key: RunKey, *, ids: np.ndarray | None = None,
             con: duckdb.DuckDBPyConnection | None = None) -> RunEmbeddings:
    """The current embeddings of ``key`` (only ``ids`` when given) and the run's fingerprint.

    Vectors that are all zeros or not finite (a uniform image through HOG, a broken model) are
    returned in ``zero_ids``, never in ``ids``: no metric is defined on them.
    """
    with _reading(ws, con) as c:
        run = register_run(c, ws.embeddings_dir(key.model, key.dataset, key.condition))
        fingerprint = run_fingerprint(c, ws, key, run, registered=True)
        if run is None:
            return RunEmbeddings(np.empty(0, np.int64), np.empty((0, 0), np.float32), np.empty(0, np.int64),
                                 fingerprint)
        where, params = "", []
        if ids is not None:
            where, params = "WHERE p.image_id IN (SELECT unnest(?))", [np.asarray(ids, dtype=np.int64).tolist()]
        try:
            table = c.sql(
                f"SELECT p.image_id, p.embedding FROM {run.name} p "
                f"JOIN ({current_rows_sql(run)}) cur ON cur.image_id = p.image_id AND cur.part = p.part::VARCHAR "
                f"{where} ORDER BY p.image_id", params=params).to_arrow_table()
        except (duckdb.Error, OSError) as exc:
            raise VlmindexError(
                f"cannot read the embeddings of {key} ({' '.join(str(exc).split())[:300]}); "
                f"remove the damaged part or re-embed with `vlmindex embed {key.cli_args()}`"
            ) from None
    all_ids = table["image_id"].to_numpy()
    vectors = parts.vectors_of(table["embedding"])
    bad = parts.unusable_rows(vectors) if len(vectors) else np.zeros(0, bool)
    return RunEmbeddings(all_ids[~bad], np.ascontiguousarray(vectors[~bad]), all_ids[bad], fingerprint)


@dataclass
class Selection:
    """What an embed run works from, read in one snapshot of the catalog: the images without a
    current embedding (with the pixel fingerprints they are expected to have), the selection's
    size, the condition's recipe and the class names per modality that the recipe draws from."""

    todo: list[PendingImage]
    total: int
    recipe: str | None                    # stored recipe JSON; None for clean
    pools: dict[str | None, list[str]]


def pending(ws: Workspace, key: RunKey, *, split: str | None = None,
            shard: tuple[int, int] | None = None) -> Selection:
    """Images of the selection (split, shard) without a current embedding, and what draws them.

    One read-only connection: the recipe and class names are those the fingerprints were computed
    from, so a condition replaced meanwhile makes every row of this selection stale at commit.
    """
    from vlmindex.catalog import conditions, datasets

    where, params = "", [key.dataset, key.condition]
    if split:
        where += " AND i.split = ?"
        params.append(split)
    if shard:
        where += " AND i.image_id % ? = ?"
        params += [shard[1], shard[0]]
    with ws.read(views=False) as con:
        run = register_run(con, ws.embeddings_dir(key.model, key.dataset, key.condition))
        rows = con.execute(
            f"""
            WITH cur AS ({_current(run)})
            SELECT i.image_id, i.path, i.label, i.modality, i.sha256, x.pixels, c.image_id IS NOT NULL AS done
            FROM images i JOIN image_pixels x ON x.image_id = i.image_id AND x.dataset = i.dataset
            LEFT JOIN cur c ON c.image_id = i.image_id
            WHERE i.dataset = ? AND x.condition = ? {where}
            ORDER BY i.image_id
            """, params).fetchall()
        recipe = conditions.recipe_json(con, key.dataset, key.condition) if key.condition != CLEAN else None
        pools = datasets.class_pools(con, key.dataset)
    return Selection([PendingImage(*r[:6]) for r in rows if not r[6]], len(rows), recipe, pools)


def current_count(ws: Workspace, key: RunKey, *, split: str | None = None,
                  shard: tuple[int, int] | None = None) -> int:
    """How many images of the selection have a current embedding."""
    sel = pending(ws, key, split=split, shard=shard)
    return sel.total - len(sel.todo)


@dataclass
class Commit:
    path: str | None   # the part written, None when no row was left to commit
    ids: np.ndarray    # the images it holds
    written: int
    changed: int       # rows whose pixels changed (or whose image left the catalog) while embedding
    duplicates: int    # rows another process had committed first


def commit_part(ws: Workspace, key: RunKey, *, image_ids: np.ndarray, pixels: list[str], vectors: np.ndarray,
                dtype: str = "float32", tag: str = "", run: dict[str, Any] | None = None,
                wait: float = COMMIT_WAIT) -> Commit:
    """Check a finished batch against the catalog and rename it into the run directory.

    Under the workspace lock: rows whose pixel fingerprint is no longer the image's are dropped
    (the image is embedded again next time), as are rows of images that already have a current
    embedding (another process got there first), and the weights must be those of the run's
    newest part. Adding a part needs only a read-only connection: readers list a run's parts
    once per connection, so a part that appears meanwhile is simply not theirs yet.
    """
    directory = ws.embeddings_dir(key.model, key.dataset, key.condition)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    with ws.lock(wait=wait):
        con = ws.connect(read_only=True, wait=CONNECT_WAIT)
        try:
            cur_pixels = dict(con.execute(
                "SELECT image_id, pixels FROM image_pixels WHERE dataset = ? AND condition = ? "
                "AND image_id IN (SELECT unnest(?))", [key.dataset, key.condition, image_ids.tolist()]).fetchall())
            existing = parts.part_paths(directory)
            have: set[int] = set()
            if existing:
                run_rel = register_run(con, directory, existing)
                have = {r[0] for r in con.execute(f"SELECT image_id FROM ({current_rows_sql(run_rel)})").fetchall()}
                _check_compatible(existing[-1], run, int(vectors.shape[1]), key)
            ok_pixels = np.array([cur_pixels.get(int(i)) == p for i, p in zip(image_ids, pixels, strict=True)],
                                 dtype=bool)
            fresh = np.array([int(i) not in have for i in image_ids], dtype=bool)
            keep = ok_pixels & fresh
            commit = Commit(None, image_ids[keep], int(keep.sum()), int((~ok_pixels).sum()),
                            int((ok_pixels & ~fresh).sum()))
            if keep.any():
                meta = dict(run or {}, committed_at=datetime.now().isoformat(timespec="seconds"))
                path = parts.write_part(directory, model=key.model, dataset=key.dataset, condition=key.condition,
                                        image_ids=image_ids[keep], embeddings=vectors[keep], dtype=dtype, tag=tag,
                                        pixels=[p for p, k in zip(pixels, keep, strict=True) if k], run=meta)
                commit.path = str(path)
            return commit
        finally:
            con.close()


def import_run(ws: Workspace, key: RunKey, *, image_ids: np.ndarray, vectors: np.ndarray, dtype: str,
               source: str, pixels: list[str], family: str | None = None) -> None:
    """Replace a run's embeddings with vectors computed elsewhere, taken as made from ``pixels`` (the
    fingerprints read when the ids were resolved), and record the import in ``runs``.

    One read-write connection: no reader sees the gap, and when the images changed since their ids
    were resolved (``ingest --replace`` meanwhile) nothing is stored.
    """
    directory = ws.embeddings_dir(key.model, key.dataset, key.condition)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    now = datetime.now()
    with ws.write(wait=COMMIT_WAIT) as con:
        cur_pixels = dict(con.execute(
            "SELECT image_id, pixels FROM image_pixels WHERE dataset = ? AND condition = ? "
            "AND image_id IN (SELECT unnest(?))", [key.dataset, key.condition, image_ids.tolist()]).fetchall())
        if any(cur_pixels.get(int(i)) != p for i, p in zip(image_ids, pixels, strict=True)):
            raise VlmindexError(f"the images of {key.dataset} changed while the embeddings were read (another "
                                "vlmindex process wrote to the workspace); nothing was imported: import again")
        old = parts.part_paths(directory)
        run_id = uuid.uuid4().hex
        parts.write_part(directory, model=key.model, dataset=key.dataset, condition=key.condition,
                         image_ids=image_ids, embeddings=vectors, dtype=dtype, tag="import-", pixels=list(pixels),
                         run={"run_id": run_id, "device": "import", "dtype": dtype, "dim": int(vectors.shape[1]),
                              "preprocessing": {"imported_from": source}, "committed_at": now.isoformat(),
                              "family": family})
        for p in old:
            p.unlink()
        insert_run(con, {"run_id": run_id, "model": key.model, "dataset": key.dataset, "condition": key.condition,
                         "n": len(image_ids), "total": len(image_ids), "dim": int(vectors.shape[1]), "dtype": dtype,
                         "device": "import", "preprocessing": {"imported_from": source}, "started_at": now,
                         "finished_at": now, "recorded_from": "import", "family": family})


def pixels_of(con: duckdb.DuckDBPyConnection, key: RunKey, image_ids: np.ndarray) -> list[str]:
    """The current pixel fingerprints of ``image_ids`` under ``key``'s condition, in their order."""
    now = dict(con.execute("SELECT image_id, pixels FROM image_pixels WHERE dataset = ? AND condition = ? "
                           "AND image_id IN (SELECT unnest(?))",
                           [key.dataset, key.condition, np.asarray(image_ids, dtype=np.int64).tolist()]).fetchall())
    return [now[int(i)] for i in image_ids]


def _check_weights(recorded: dict[str, Any], run: dict[str, Any] | None, key: RunKey) -> None:
    """One run holds one model's embeddings: refuse vectors of other weights (imports and
    hand-written parts record none and are not compared)."""
    ours = (run or {}).get("weights_sha256")
    theirs = recorded.get("weights_sha256")
    if theirs and ours != theirs:
        raise VlmindexError(
            f"{key} was embedded with other weights (sha256 {str(theirs)[:12]}…, now {str(ours)[:12]}…); "
            f"embed under another --model name, or `vlmindex embeddings remove {key.cli_args()}` to start over"
        )


def _check_compatible(newest_part: Any, run: dict[str, Any] | None, dim: int, key: RunKey) -> None:
    """Refuse a part that cannot share a run with its parts: other weights, another vector size, or
    model vectors added to imported ones (their pixels and preprocessing are not the model's)."""
    recorded = parts.run_metadata(newest_part)
    _check_weights(recorded, run, key)
    start_over = (f"embed under another --model name, or `vlmindex embeddings remove {key.cli_args()}` "
                  "to start over")
    theirs = parts.dimension(newest_part)
    if theirs != dim:
        raise VlmindexError(f"{key} holds {theirs}-d embeddings, these are {dim}-d; {start_over}")
    if (recorded.get("device") == "import") != ((run or {}).get("device") == "import"):
        what = "imported embeddings" if recorded.get("device") == "import" else "embeddings of a model"
        raise VlmindexError(f"{key} holds {what}; one run is never a mix of imported and computed vectors: "
                            f"{start_over}")


def newest_weights(ws: Workspace, key: RunKey) -> str | None:
    """The weights checksum recorded by the run's newest part (None for imports and legacy parts)."""
    existing = parts.part_paths(ws.embeddings_dir(key.model, key.dataset, key.condition))
    return parts.run_metadata(existing[-1]).get("weights_sha256") if existing else None


def check_resumable(ws: Workspace, key: RunKey, weights_sha256: str | None, dim: int) -> None:
    """Refuse, before any work, to add embeddings to a run they cannot share: other weights than
    those recorded by its newest ``runs`` row that is not an import (else by its newest part),
    another vector size, or a run of imported vectors."""
    existing = parts.part_paths(ws.embeddings_dir(key.model, key.dataset, key.condition))
    if not existing:
        return
    with ws.read(views=False) as con:
        rows = con.execute("SELECT weights_sha256 FROM runs WHERE model = ? AND dataset = ? AND condition = ? "
                           "AND device IS DISTINCT FROM 'import' ORDER BY finished_at DESC NULLS LAST LIMIT 1",
                           [key.model, key.dataset, key.condition]).fetchall()
    if rows and rows[0][0]:
        _check_weights({"weights_sha256": rows[0][0]}, {"weights_sha256": weights_sha256}, key)
    _check_compatible(existing[-1], {"weights_sha256": weights_sha256}, dim, key)


@contextlib.contextmanager
def embedding_lock(ws: Workspace, key: RunKey, shard: tuple[int, int] | None) -> Iterator[int]:
    """One ``embed`` per run and shard at a time; a second one says who is embedding it. Yields the
    lock's file descriptor, which forked workers close (see ``hold_flock``).

    Overlapping selections (a sharded and an unsharded run) may still run together: their
    commits keep the first row of each image.
    """
    name = "-".join(slug(x) for x in (key.model, key.dataset, key.condition))
    if shard:
        name += f"-{shard[0]}of{shard[1]}"
    with hold_flock(ws.root / ".locks" / f"embed-{name}.lock", wait=0.0,
                    busy=lambda holder: f"{key} is already being embedded by {holder}; wait for it to finish") as fd:
        yield fd


def record_missing_runs(ws: Workspace, key: RunKey) -> int:
    """Add the ``runs`` rows that a failed final catalog write never recorded, from the parts' own
    provenance; returns how many were added."""
    existing = parts.part_paths(ws.embeddings_dir(key.model, key.dataset, key.condition))
    by_run: dict[str, dict[str, Any]] = {}
    for path in existing:
        meta = parts.run_metadata(path)
        run_id = meta.get("run_id")
        if not run_id:
            continue
        entry = by_run.setdefault(run_id, {**meta, "n": 0})
        entry["n"] += parts.row_count(path)
        entry.update({k: meta[k] for k in ("committed_at", "seconds") if k in meta})
    if not by_run:
        return 0
    with ws.read(views=False) as con:
        known = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE run_id IN (SELECT unnest(?))",
                                           [list(by_run)]).fetchall()}
    missing = {k: v for k, v in by_run.items() if k not in known}
    if not missing:
        return 0
    total = current_count(ws, key)
    with ws.write(wait=CONNECT_WAIT) as con:
        for run_id, m in missing.items():
            insert_run(con, {
                "run_id": run_id, "model": key.model, "dataset": key.dataset, "condition": key.condition,
                "split": m.get("split"), "shard": m.get("shard"), "n": m["n"], "total": total, "dim": m.get("dim"),
                "dtype": m.get("dtype"), "seconds": m.get("seconds"),
                "images_per_s": (m["n"] / m["seconds"]) if m.get("seconds") else None,
                "device": m.get("device"), "batch_size": m.get("batch_size"), "num_workers": m.get("num_workers"),
                "preprocessing": m.get("preprocessing"), "versions": m.get("versions"),
                "weights_sha256": m.get("weights_sha256"), "started_at": m.get("started_at"),
                "finished_at": m.get("committed_at"), "recorded_from": "parts", "family": m.get("family"),
            })
    return len(missing)


RUN_COLUMNS = ("run_id", "model", "dataset", "condition", "split", "shard", "n", "total", "dim", "dtype", "seconds",
               "images_per_s", "device", "batch_size", "num_workers", "preprocessing", "versions", "weights_sha256",
               "started_at", "finished_at", "recorded_from", "family")


def insert_run(con: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> None:
    """One ``runs`` row (JSON columns given as objects or JSON text)."""
    values = [json.dumps(row.get(c), default=str) if c in ("preprocessing", "versions") and
              not isinstance(row.get(c), str | None) else row.get(c) for c in RUN_COLUMNS]
    con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                values)


def set_family(ws: Workspace, key: RunKey, family: str) -> None:
    """Record ``family`` on every ``runs`` row of a run (``embed --family`` when nothing is left to embed)."""
    with ws.write(wait=COMMIT_WAIT) as con:
        con.execute("UPDATE runs SET family = ? WHERE model = ? AND dataset = ? AND condition = ? "
                    "AND family IS DISTINCT FROM ?", [family, key.model, key.dataset, key.condition, family])


def run_families(con: duckdb.DuckDBPyConnection, dataset: str | None = None) -> dict[str, str]:
    """The family each model's runs recorded (of ``dataset``, or anywhere), the newest run's where
    they differ; models whose runs recorded none are absent."""
    rows = con.execute(
        "SELECT model, arg_max(family, coalesce(finished_at, started_at)) FROM runs "
        "WHERE family IS NOT NULL AND (? IS NULL OR dataset = ?) GROUP BY model",
        [dataset, dataset]).fetchall()
    return {str(m): str(f) for m, f in rows}


def last_run(ws: Workspace, key: RunKey) -> dict[str, Any] | None:
    """The newest ``runs`` row of a run, or None."""
    with ws.read(views=False) as con:
        cur = con.execute("SELECT * FROM runs WHERE model = ? AND dataset = ? AND condition = ? "
                          "ORDER BY finished_at DESC NULLS LAST LIMIT 1", [key.model, key.dataset, key.condition])
        cols = [d[0] for d in cur.description]
        rows = cur.fetchall()
    return dict(zip(cols, rows[0], strict=True)) if rows else None


@dataclass(frozen=True)
class Failure:
    """An image an embedding run could not use, with the pixels it was selected with."""

    image_id: int
    path: str
    reason: str
    pixels: str


def record_run(ws: Workspace, key: RunKey, row: dict[str, Any] | None, failures: list[Failure],
               embedded_paths: list[str], *, wait: float = COMMIT_WAIT) -> None:
    """The final write of an embedding run: its ``runs`` row (None when it stored nothing) and the
    images it could not use. An earlier run's ``skipped`` rows of this model and condition are
    replaced for the images this run embedded or failed on, and a failure of an image whose pixels
    changed meanwhile (``ingest --replace`` during the run) is not recorded at all."""
    from vlmindex.catalog import datasets

    with ws.write(wait=wait) as con, transaction(con):
        if row is not None:
            insert_run(con, row)
        con.execute("DELETE FROM skipped WHERE dataset = ? AND stage = 'embed' AND model = ? AND condition = ? "
                    "AND path IN (SELECT unnest(?))",
                    [key.dataset, key.model, key.condition, [f.path for f in failures] + embedded_paths])
        if failures:
            now = dict(con.execute(
                "SELECT image_id, pixels FROM image_pixels WHERE dataset = ? AND condition = ? "
                "AND image_id IN (SELECT unnest(?))", [key.dataset, key.condition, [f.image_id for f in failures]]
            ).fetchall())
            still = [(f.path, f.reason) for f in failures if now.get(f.image_id) == f.pixels]
            datasets.record_skips(con, key.dataset, still, stage="embed", model=key.model, condition=key.condition)


def remove_run(ws: Workspace, key: RunKey) -> int:
    """Delete a run's embeddings and everything computed from them; returns the parts removed."""
    from vlmindex.catalog import dependencies

    directory = ws.embeddings_dir(key.model, key.dataset, key.condition)
    n = len(parts.part_paths(directory))
    with ws.write(wait=CONNECT_WAIT) as con:
        with transaction(con):
            stale = dependencies.drop_rows(con, ws, key.dataset, key.condition, model=key.model, change="embeddings")
        dependencies.remove_files([*stale, directory])
    return n


def no_embeddings(ws: Workspace, key: RunKey) -> VlmindexError:
    """The one error for a run with no embeddings: names the models that have some on that
    dataset and condition, and says whether the name is one ``vlmindex embed`` knows."""
    from vlmindex.models import get_spec

    try:
        get_spec(key.model)
        known = True
    except VlmindexError:
        known = False
    try:
        with ws.read(views=False) as con:
            have = [r[0] for r in con.execute("SELECT DISTINCT model FROM runs WHERE dataset = ? AND condition = ? "
                                              "ORDER BY 1", [key.dataset, key.condition]).fetchall()]
    except VlmindexError:
        have = []
    what = (f"run `vlmindex embed {key.cli_args()}` first" if known else
            f"{key.model!r} is not a model of `vlmindex models` (imported embeddings keep the name given to "
            "`vlmindex embeddings import`)")
    embedded = f"; models with embeddings there: {', '.join(have)}" if have else ""
    return VlmindexError(f"no embeddings for model {key.model!r} on {key.dataset}/{key.condition}; {what}{embedded}")
