"""The nearest-neighbour service behind ``vlmindex serve``, without any web framework.

Read-only over a workspace. What it keeps in memory, and why each is safe with writers at work:

- an index snapshot per (model, dataset, condition): the FAISS index (IVF lists memory-mapped,
  flat and HNSW indexes read into memory) and its sidecar, opened after the file's checksum and
  the run's fingerprint were checked under one catalog connection. A cheap signature of the
  files a writer touches (the index pair, the run's folder, the catalog) is compared on every
  request; when it moved, the snapshot is checked again from scratch, and a stale or damaged
  index is refused (409). While a writer holds the catalog, the last verified snapshot answers
  (``"verified": false``) only if its own index and run files did not move; otherwise 503.
- the catalog rows of each dataset's images and the dataset and condition names, read again
  whenever the catalog file changed; the index sidecars, listed again whenever one of them (or its
  index file) changed: a request that names its models stats only their two files each.
- loaded models, at most ``Limits.max_models`` (least recently used goes first): each loads once
  per process, and every load and embedding runs on one thread (torch's thread teams of two
  threads spin against each other; see :meth:`NeighbourService.on_model_thread`).
- thumbnails, by (image, its sha256, condition recipe, size).

Queries that arrive together on one flat index are searched together (one pass over the vectors
for all of them, :func:`scan.scores`): under concurrent clients that keeps the cost per query
down. Queries to an approximate index cost the same alone as in a batch, so each is searched by
itself, several at once (:class:`_Alone`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from vlmindex import index as vlm_index
from vlmindex import thumbnails
from vlmindex.catalog import CLEAN, RunKey, Workspace, results
from vlmindex.catalog import conditions as catalog_conditions
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog.embeddings import newest_weights
from vlmindex.errors import VlmindexError, WorkspaceBusy
from vlmindex.models import LoadOptions
from vlmindex.serve import scan

READ_WAIT = 0.5  # seconds a request waits for a writer holding the catalog before a cached answer or a 503
BUSY = "the workspace is busy (another vlmindex process is writing to it); try again in a moment"

IMAGE_FIELDS = ("image_id", "dataset", "path", "sha256", "pixel_sha256", "label", "split", "group_id", "modality")
LEADERBOARD_FIELDS = ("analysis_id", "model", "condition", "modality", "scope", "k", "n_queries", "map_micro",
                      "map_macro", "purity_micro", "knn_acc_macro", "p_at_1_micro", "silhouette",
                      "probe_balanced_accuracy", "sampled_queries", "query_pool", "ci", "created_at")


class ServiceError(Exception):
    """A request the service refuses, with its HTTP status and, for unknown names, the valid ones."""

    status = 400

    def __init__(self, message: str, choices: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.choices = message, choices


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class TooLarge(ServiceError):
    status = 413


class Busy(ServiceError):
    status = 503


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024   # an upload larger than this is refused (413)
    max_pixels: int = 50_000_000        # width × height of an upload, checked before decoding
    max_k: int = 100
    max_models: int = 4                 # models kept loaded at once
    thumbnail_cache: int = 4096


@dataclass(frozen=True)
class ImageMeta:
    image_id: int
    dataset: str
    path: str
    sha256: str | None
    pixel_sha256: str | None
    label: str | None
    split: str | None
    group_id: str | None
    modality: str | None

    def public(self) -> dict[str, Any]:
        """What a response may say about an image: never its file-system path."""
        return {"image_id": self.image_id, "dataset": self.dataset, "label": self.label, "split": self.split,
                "group_id": self.group_id, "modality": self.modality}


def _stat(path: str | Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class _Batcher:
    """Queries to one flat index searched together (one pass over its vectors serves them all):
    whoever arrives while no search runs searches every query waiting, its own among them (leader
    and followers, no worker thread).

    A request alone pays no hand-off to another thread; requests that arrive during a search wait
    and go in the next one. Each query's neighbours and scores are the same alone as in any batch
    (the searches score every row independently). ``owner`` (the index whose memory ``search``
    reads) is held here, so a snapshot replaced while a request is still searching it is not
    unmapped under it.
    """

    def __init__(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], owner: Any) -> None:
        self._search, self._owner = search, owner
        self._cond = threading.Condition()
        self._waiting: list[list[Any]] = []  # [vector, k, answer or None, error or None]
        self._leading = False
        self.searches = 0  # calls of the search function (the batches)

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        mine: list[Any] = [vector, k, None, None]
        with self._cond:
            self._waiting.append(mine)
            while mine[2] is None and mine[3] is None and self._leading:
                self._cond.wait()
            # Unanswered with no one searching: a leader answers (or fails) all it took, so ours
            # is still waiting, and we lead.
            batch: list[list[Any]] = []
            if mine[2] is None and mine[3] is None:
                self._leading = True
                batch, self._waiting = self._waiting, []
        if batch:
            try:
                self._answer(batch)
            finally:
                with self._cond:
                    for item in batch:  # interrupted (a BaseException): none of them waits forever
                        if item[2] is None and item[3] is None:
                            item[3] = RuntimeError("the search was interrupted; send the request again")
                    self._leading = False
                    self._cond.notify_all()
        if mine[3] is not None:
            raise mine[3]
        return mine[2]

    def close(self) -> None:
        """Nothing to stop: a replaced snapshot's waiting requests are answered by their leader."""

    def _answer(self, batch: list[list[Any]]) -> None:
        self.searches += 1
        try:
            k = max(item[1] for item in batch)
            scores, ids = self._search(np.stack([item[0] for item in batch]), k)
            answers = [(scores[row, :item[1]], ids[row, :item[1]]) for row, item in enumerate(batch)]
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error, none hangs
            for item in batch:
                item[3] = exc
            return
        for item, answer in zip(batch, answers, strict=True):
            item[2] = answer


class _Alone:
    """Each query searched by itself on its caller's thread, several requests' searches at once.

    For indexes whose queries cost the same alone as in a batch (a graph, inverted lists; unlike
    a flat scan, where a batch shares one pass over the vectors): batched, one search ran at a
    time and a query's answer had to be searched for the largest k allowed, so as not to depend
    on the k of the others. ``owner`` as in :class:`_Batcher`."""

    def __init__(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], owner: Any) -> None:
        self._search, self._owner = search, owner

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._search(vector[None, :], k)
        return scores[0], ids[0]

    def close(self) -> None:
        """Nothing waits here."""


_NO_ID = np.iinfo(np.int64).max  # FAISS's empty slots (-1) sort last among equal scores


@contextlib.contextmanager
def _one_openmp_thread() -> Iterator[None]:
    """FAISS runs its searches on the calling thread alone meanwhile. It splits a batch's queries
    over an OpenMP team of every core, and a search here is of one query: the idle members spun
    (one request at a time by image_id at 100k, HNSW, on 2 cores: 4.1 ms of CPU for 2 ms of wall
    time; 2.2 ms alone), and each request thread that searched kept a team of its own. The
    caller's setting is restored."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _approximate_top_k(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search of an approximate index for ``k`` results, then score descending and
    image_id ascending among equal scores. Refinement and probes scale with k, so a query's
    answer is its own k's (each is searched alone, :class:`_Alone`), as `vlmindex query -k` gives."""
    with _one_openmp_thread():
        scores, ids = vlm_index.search(index, queries, k)
    out_s, out_i = np.empty_like(scores), np.empty_like(ids)
    for r in range(len(scores)):
        order = np.lexsort((np.where(ids[r] < 0, _NO_ID, ids[r]), -scores[r]))
        out_s[r], out_i[r] = scores[r][order], ids[r][order]
    return out_s, out_i


def with_own_vector(scores: np.ndarray, ids: np.ndarray, own_id: int, vector: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """An approximate result for a catalog image's own vector, with that image in it: its exact
    nearest neighbour (cosine with itself), which a graph or quantised index can miss. Placed by
    the tie rule (score descending, image_id ascending), the k-th result dropped for it."""
    if own_id in set(ids.tolist()):
        return scores, ids
    v = vlm_index.normalise(np.asarray(vector, dtype=np.float32)[None, :])[0].astype(np.float64)
    own = np.float32(v @ v)
    valid = ids >= 0
    s = np.concatenate([scores[valid], [own]]).astype(np.float32)
    i = np.concatenate([ids[valid], [own_id]]).astype(np.int64)
    order = np.lexsort((i, -s))[:k]
    return s[order], i[order]


RESCORE_MARGIN = 1e-4  # above float32 rounding of a 512..4096-d dot product of unit vectors


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product over the rows of ``vectors`` (unit rows: cosine), exactly.

    All queries are scored in float32 in one pass over the vectors (:func:`scan.scores`: at 100k
    × 512 on 2 cores, 19.7 ms for 8 queries, 7.6 for one); every vector within
    :data:`RESCORE_MARGIN` of the k-th score is then scored again in float64, and those decide.
    So a query's result never depends on what else was in its batch, and the order is score
    descending, then ``image_id`` ascending among equal scores (the analyses' tie rule), also at
    the k-th place.
    """
    q = vlm_index.normalise(queries)
    k = min(k, len(ids))
    n = len(ids)
    fast = scan.scores(vectors, q)
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    for r, s in enumerate(fast):
        kth = np.partition(s, n - k)[n - k]
        cand = np.flatnonzero(s >= kth - RESCORE_MARGIN)
        # a product and a sum per row, not BLAS's matrix-vector product: that one gave equal rows
        # scores 1 ulp apart by their place in the matrix, and the tie rule then ordered them by that
        exact = (vectors[cand].astype(np.float64) * q[r].astype(np.float64)).sum(axis=1)
        order = np.lexsort((ids[cand], -exact))[:k]
        out_s[r], out_i[r] = exact[order], ids[cand[order]]
    return out_s, out_i


@dataclass
class _Snapshot:
    key: RunKey
    index: Any
    info: vlm_index.IndexInfo
    signature: tuple
    weights: str | None
    positions: dict[int, int]
    batcher: _Batcher | _Alone
    verified: bool = True

    def vector(self, image_id: int) -> np.ndarray | None:
        """The indexed vector of an image, read back from indexes that store vectors exactly
        (flat, HNSW); None for others (IVF needs a direct map, PQ codes are approximate)."""
        import faiss

        pos = self.positions.get(image_id)
        if pos is None or self.info.kind not in ("flat", "hnsw"):
            return None
        inner = faiss.downcast_index(self.index.index if hasattr(self.index, "id_map") else self.index)
        return np.asarray(inner.reconstruct(pos), dtype=np.float32)


@dataclass(frozen=True)
class _CatalogState:
    signature: tuple
    datasets: list[str]
    conditions: dict[str, list[str]]
    recipes: dict[tuple[str, str], str | None]  # (dataset, condition) -> recipe JSON


@dataclass(frozen=True)
class _IndexListing:
    files: dict[str, tuple]  # sidecar path -> (its stat, its index file's stat), taken before reading
    indexes: list[vlm_index.IndexInfo]


class NeighbourService:
    """Datasets, indexes, leaderboards, neighbours and thumbnails of one workspace, read-only."""

    def __init__(self, ws: Workspace, *, limits: Limits | None = None, load: LoadOptions | None = None) -> None:
        self.ws = ws.require()
        self.limits = limits or Limits()
        self.load = load or LoadOptions()
        self._lock = threading.Lock()
        self._snapshots: dict[RunKey, _Snapshot] = {}
        self._key_locks: dict[RunKey, threading.Lock] = {}
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._model_lock = threading.Lock()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmindex-models")
        self._meta: dict[int, ImageMeta] = {}
        self._by_sha: dict[tuple[str, str], int] = {}
        self._meta_signature: dict[str, tuple] = {}
        self._catalog: _CatalogState | None = None
        self._index_listing: _IndexListing | None = None
        self._key_paths: dict[RunKey, tuple[str, str, str]] = {}
        self._catalog_files = (str(self.ws.root / "catalog.duckdb"), str(self.ws.root / "catalog.duckdb.wal"))
        self._current: dict[RunKey, tuple[tuple, bool]] = {}
        self.thumbnail = functools.lru_cache(maxsize=self.limits.thumbnail_cache)(self._thumbnail)

    # -- catalog reads ------------------------------------------------------------------------------
    def _catalog_signature(self) -> tuple:
        return tuple(_stat(p) for p in self._catalog_files)

    def _index_files(self) -> dict[str, tuple]:
        """Every index sidecar of the workspace, with its stat and its index file's."""
        return {str(p): (_stat(p), _stat(p.with_suffix(".faiss")))
                for p in sorted((self.ws.root / "indexes").glob("*/*/*.json"))}

    def _paths(self, key: RunKey, *, remember: bool = True) -> tuple[str, str, str]:
        """The index file, its sidecar and the run's folder of ``key``, as strings (stat'ed per
        request). ``remember=False`` for a model name not yet checked: requests must not grow the
        memo with names of their choosing."""
        paths = self._key_paths.get(key)
        if paths is None:
            index = self.ws.index_path(key.model, key.dataset, key.condition)
            run_dir = self.ws.embeddings_dir(key.model, key.dataset, key.condition)
            paths = (str(index), str(index.with_suffix(".json")), str(run_dir))
            if remember:
                self._key_paths[key] = paths
        return paths

    def _listing(self, keys: list[RunKey] | None = None) -> _IndexListing:
        """The index sidecars of the workspace, listed again only when one moved.

        With ``keys``, only their own two files are stat'ed: the listing is kept when each is as
        it was listed (absent then, absent now). A request naming its models then costs two stats
        per model instead of a walk of the indexes folder, which was the largest part of a
        by-image_id request's own time under load (a fifth of it)."""
        listing = self._index_listing
        if listing is not None and keys is not None and all(
                listing.files.get(sidecar, (None, None)) == (_stat(sidecar), _stat(index))
                for index, sidecar, _ in (self._paths(key, remember=False) for key in keys)):
            return listing
        files = self._index_files()  # before the sidecars are read: a write after it is seen next time
        if listing is not None and listing.files == files:
            return listing
        self._index_listing = _IndexListing(files, vlm_index.list_indexes(self.ws))
        return self._index_listing

    def _state(self) -> _CatalogState:
        """Dataset and condition names and the overlay recipes, read again only after a catalog write."""
        sig = self._catalog_signature()
        state = self._catalog
        if state is not None and state.signature == sig:
            return state
        try:
            with self.ws.read(views=False, wait=READ_WAIT) as con:
                names = catalog_datasets.dataset_names(con)
                conds = {d: [CLEAN, *(n for n in catalog_conditions.names(con, d) if n != CLEAN)] for d in names}
                recipes = {(d, c): catalog_conditions.recipe_json(con, d, c) for d in names for c in conds[d]
                           if c != CLEAN}
        except WorkspaceBusy:
            if state is not None:
                return state
            raise Busy(BUSY) from None
        self._catalog = _CatalogState(sig, names, conds, recipes)
        return self._catalog

    def datasets(self) -> list[dict[str, Any]]:
        with self._reading() as con:
            rows = catalog_datasets.dataset_summaries(con)
        return [{k: v for k, v in r.items() if k not in ("source", "options")} for r in rows]

    def dataset_names(self) -> list[str]:
        return list(self._state().datasets)

    def require_dataset(self, dataset: str) -> None:
        names = self.dataset_names()
        if dataset not in names:
            raise NotFound(f"unknown dataset {dataset!r}", names)

    def condition_names(self, dataset: str) -> list[str]:
        return list(self._state().conditions.get(dataset, [CLEAN]))

    def indexes(self, dataset: str) -> list[vlm_index.IndexInfo]:
        return [i for i in self._listing().indexes if i.dataset == dataset]

    def models(self, dataset: str) -> list[dict[str, Any]]:
        """Each model with an index on ``dataset``: its conditions, kind, size and whether current."""
        self.require_dataset(dataset)
        out: dict[str, dict[str, Any]] = {}
        for info in self.indexes(dataset):
            key = RunKey(info.model, info.dataset, info.condition)
            current = self._is_current(key)
            entry = out.setdefault(info.model, {"model": info.model, "conditions": []})
            entry["conditions"].append({"condition": info.condition, "kind": info.kind, "count": info.count,
                                        "dim": info.dim, "built_at": info.built_at, "current": current})
        return list(out.values())

    def _is_current(self, key: RunKey) -> bool | None:
        """Whether the index is current (None: a writer holds the catalog); the hash of the file is
        computed again only when something it depends on moved."""
        sig = self._signature(key)
        hit = self._current.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
        try:
            with self.ws.read(views=False, wait=READ_WAIT):
                pass  # is_current waits long; ask first whether a writer is at work
            current = vlm_index.is_current(self.ws, key)
        except WorkspaceBusy:
            return None
        self._current[key] = (sig, current)
        return current

    def leaderboard(self, dataset: str) -> list[dict[str, Any]]:
        self.require_dataset(dataset)
        with self._reading(views=True) as con:
            rows = results.latest_summaries(con, dataset)
        return [{f: (str(r[f]) if f == "created_at" and r.get(f) is not None else r.get(f))
                 for f in LEADERBOARD_FIELDS} for r in rows]

    @contextlib.contextmanager
    def _reading(self, *, views: bool = False) -> Iterator[Any]:
        """A short read-only catalog connection; a writer holding the catalog is a quick 503
        (callers with a cached answer use that instead), never a request left hanging."""
        try:
            with self.ws.read(views=views, wait=READ_WAIT) as con:
                yield con
        except WorkspaceBusy:
            raise Busy(BUSY) from None

    def public(self, message: str) -> str:
        """``message`` without the server's file-system paths (errors go to whoever asked)."""
        return message.replace(str(self.ws.root), "<workspace>")

    def _dataset_meta(self, dataset: str) -> tuple:
        """Load (or refresh after a catalog write) the image rows of ``dataset``; the catalog
        signature they were read at (one request checks the catalog once)."""
        sig = self._catalog_signature()
        if self._meta_signature.get(dataset) == sig:
            return sig
        try:
            with self.ws.read(views=False, wait=READ_WAIT) as con:
                rows = catalog_datasets.images(con, dataset, columns=IMAGE_FIELDS)
        except WorkspaceBusy:
            if dataset in self._meta_signature:
                return self._meta_signature[dataset]  # a writer is at work: the rows read last stay
            raise Busy(BUSY) from None
        with self._lock:
            for key in [k for k in self._by_sha if k[0] == dataset]:
                del self._by_sha[key]
            for image_id in [i for i, m in self._meta.items() if m.dataset == dataset]:
                del self._meta[image_id]  # images removed since (ingest --replace) must not linger
            for r in rows:
                m = ImageMeta(*r)
                self._meta[m.image_id] = m
                if m.sha256:
                    self._by_sha[(dataset, m.sha256)] = m.image_id
                if m.pixel_sha256:
                    self._by_sha[(dataset, "pixels:" + m.pixel_sha256)] = m.image_id
            self._meta_signature[dataset] = sig
        return sig

    def image(self, image_id: int, catalog_signature: tuple | None = None) -> ImageMeta:
        """The catalog row of an image; while a writer holds the catalog, the one read last.
        ``catalog_signature``: the one this request already read (else it is read here)."""
        m = self._meta.get(image_id)
        if m is not None and self._meta_signature.get(m.dataset) == (catalog_signature or self._catalog_signature()):
            return m
        try:
            with self._reading() as con:
                row = catalog_datasets.images_by_id(con, [image_id], IMAGE_FIELDS[1:]).get(image_id)
        except Busy:
            if m is not None:
                return m
            raise
        if row is None:
            self._meta.pop(image_id, None)
            raise NotFound(f"no image with image_id {image_id} in this workspace")
        m = ImageMeta(image_id, *row)
        self._meta[image_id] = m
        return m

    # -- indexes --------------------------------------------------------------------------------------
    def _signature(self, key: RunKey) -> tuple:
        index, sidecar, run_dir = self._paths(key)
        return _stat(index), _stat(sidecar), _stat(run_dir), self._catalog_signature()

    def snapshot(self, key: RunKey) -> _Snapshot:
        """The verified index of ``key``, reloaded when anything it was read from changed."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            sig = self._signature(key)
            snap = self._snapshots.get(key)
            if snap is not None and snap.signature == sig:
                return snap
            try:
                fresh = self._open(key, sig)
            except WorkspaceBusy:
                # the last verified snapshot answers only while its own files are untouched (the
                # writer is busy elsewhere in the catalog); a moved run or index may be stale: 503
                if snap is not None and snap.signature[:3] == sig[:3]:
                    snap.verified = False
                    return snap
                raise Busy(BUSY) from None
            except VlmindexError as exc:
                self._drop(key)
                raise Conflict(self.public(str(exc))) from None
            self._drop(key)
            self._snapshots[key] = fresh
            return fresh

    def _drop(self, key: RunKey) -> None:
        old = self._snapshots.pop(key, None)
        if old is not None:
            old.batcher.close()

    def _open(self, key: RunKey, sig: tuple) -> _Snapshot:
        import faiss

        for _ in range(3):
            try:
                index, info = vlm_index.load_index(self.ws, key.model, key.dataset, key.condition, mmap=True,
                                                   wait=READ_WAIT)
                break
            except vlm_index.IndexReplaced:
                sig = self._signature(key)
        else:
            raise Busy(f"the index of {key} keeps being rebuilt; try again in a moment")

        ids = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else np.arange(index.ntotal)
        weights = newest_weights(self.ws, key)
        inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
        if isinstance(inner, faiss.IndexFlat) and inner.ntotal > 0:
            # the flat index's own (memory-mapped) vectors, scored in batches in one pass each:
            # on few cores several times FAISS's query-by-query scan, and an explicit tie rule
            xb = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)
            batcher = _Batcher(functools.partial(exact_top_k, xb, ids.astype(np.int64)), index)
        else:
            batcher = _Alone(functools.partial(_approximate_top_k, index), index)
        return _Snapshot(key, index, info, sig, weights, {int(i): p for p, i in enumerate(ids.tolist())}, batcher)

    # -- models -----------------------------------------------------------------------------------------
    def extractor(self, model: str) -> Any:
        """The loaded model, loading it once, on the model thread (:meth:`on_model_thread`): loads
        are serial there, so two requests never build one model at once (their draws from torch's
        global RNG would interleave, and seeded weights differ). Models already loaded are handed
        out meanwhile; their embeddings queue behind a load in progress."""
        with self._model_lock:
            if model in self._models:
                self._models.move_to_end(model)
                return self._models[model]

        def load() -> Any:
            with self._model_lock:
                if model in self._models:  # loaded by a request queued before this one
                    return self._models[model]
            loaded = self.load.load(model)
            with self._model_lock:
                self._models[model] = loaded
                while len(self._models) > self.limits.max_models:
                    self._models.popitem(last=False)
            return loaded

        try:
            return self.on_model_thread(load)
        except VlmindexError as exc:
            raise Conflict(f"model {model!r} cannot embed an uploaded image here: {self.public(str(exc))}") from None

    def on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the one thread that runs torch in this process, and its result.

        Each thread that runs torch gets its own OpenMP team, and the teams of two threads spin
        against each other: on 2 cores one ViT forward pass took 4.3 ms on one thread, 10.6 and
        14.8 ms once a second thread had used torch too. So every load and embedding is queued
        here, which also makes them serial."""
        return self._model_thread.submit(fn).result()

    # -- requests ---------------------------------------------------------------------------------------
    def _resolve(self, dataset: str, models: list[str] | None, condition: str, k: int) -> list[RunKey]:
        state = self._state()  # once per request: it stats the catalog
        if dataset not in state.datasets:
            raise NotFound(f"unknown dataset {dataset!r}", list(state.datasets))
        if not 1 <= k <= self.limits.max_k:
            raise BadRequest(f"k={k}: choose 1..{self.limits.max_k}")
        conditions = state.conditions.get(dataset, [CLEAN])
        if condition not in conditions:
            raise NotFound(f"unknown condition {condition!r} for dataset {dataset!r}", list(conditions))
        def indexed_in(listing: _IndexListing) -> list[str]:
            return sorted({i.model for i in listing.indexes if i.dataset == dataset and i.condition == condition})

        indexed = indexed_in(self._listing([RunKey(m, dataset, condition) for m in models] if models else None))
        if models and any(m not in indexed for m in models):  # a 404 names every index as it is now
            indexed = indexed_in(self._listing())
        if not indexed:
            raise NotFound(f"no model has an index on {dataset}/{condition}; build one with `vlmindex index build "
                           f"-m MODEL -d {dataset} -c {condition}`", [])
        chosen = models or indexed
        unknown = [m for m in chosen if m not in indexed]
        if unknown:
            raise NotFound(f"no index of {', '.join(map(repr, unknown))} on {dataset}/{condition}", indexed)
        return [RunKey(m, dataset, condition) for m in chosen]

    def decode_upload(self, data: bytes) -> tuple[Any, str]:
        """The RGB image of an upload and its sha256, within the byte and pixel limits."""
        from PIL import Image, UnidentifiedImageError

        from vlmindex.imageio import load_image

        if len(data) > self.limits.max_bytes:
            raise TooLarge(f"the upload is {len(data)} bytes; the limit is {self.limits.max_bytes}")
        if not data:
            raise BadRequest("the upload is empty; send an image file as 'file'")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except Image.DecompressionBombError:  # PIL's own limit, far above ours: too large, not broken
            raise TooLarge(f"the upload declares more pixels than PIL opens; the limit is {self.limits.max_pixels}"
                           ) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise BadRequest("the upload is not an image that can be decoded (PNG, JPEG, TIFF, BMP, ...)") from None
        if w * h > self.limits.max_pixels:
            raise TooLarge(f"the upload is {w}×{h} = {w * h} pixels; the limit is {self.limits.max_pixels}")
        try:
            img = load_image(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - any decoder failure is a bad upload
            raise BadRequest("the upload is not an image that can be decoded (it is truncated or damaged)") from None
        return img, hashlib.sha256(data).hexdigest()

    def knn(self, dataset: str, *, models: list[str] | None = None, condition: str = CLEAN, k: int = 10,
            image_id: int | None = None, upload: bytes | None = None, label: str | None = None) -> dict[str, Any]:
        """Each model's top ``k`` for one query: a catalog image (its indexed vector) or an upload
        (embedded with each model's own preprocessing). A query found in the catalog (same file
        bytes, or same decoded pixels) is marked as such, and its own group flagged in the results."""
        from vlmindex.imageio import pixels_sha256
        from vlmindex.query import check_weights, embed_images, require_rankable

        keys = self._resolve(dataset, models, condition, k)
        catalog_sig = self._dataset_meta(dataset)
        img = None
        if image_id is not None:
            meta = self.image(image_id, catalog_sig)
            if meta.dataset != dataset:
                raise NotFound(f"image_id {image_id} is not in dataset {dataset!r} (it is in {meta.dataset!r})")
            query: dict[str, Any] = {"in_catalog": True, **meta.public()}
        elif upload is not None:
            img, sha = self.decode_upload(upload)
            found = self._by_sha.get((dataset, sha)) or self._by_sha.get((dataset, "pixels:" + pixels_sha256(img)))
            query = ({"in_catalog": True, **self._meta[found].public()} if found is not None
                     else {"in_catalog": False, "image_id": None, "label": label, "group_id": None})
            query["sha256"] = sha
        else:
            raise BadRequest("give either an uploaded image ('file') or an 'image_id'")
        if label is not None and not query.get("label"):
            query["label"] = label
        out: dict[str, list[dict[str, Any]]] = {}
        indexes: dict[str, dict[str, Any]] = {}
        for key in keys:
            snap = self.snapshot(key)
            if image_id is not None:
                vector = snap.vector(image_id) if image_id in snap.positions else None
                if vector is None and image_id in snap.positions:
                    vector = self._stored_vector(key, image_id)
                if vector is None:
                    raise Conflict(f"image_id {image_id} has no embedding in the index of {key}; run `vlmindex embed "
                                   f"{key.cli_args()}` and `vlmindex index build {key.cli_args()}`")
            else:
                extractor = self.extractor(key.model)
                try:
                    check_weights(extractor, key, snap.weights)
                except VlmindexError as exc:
                    raise Conflict(str(exc)) from None
                shown = img
                if condition != CLEAN:
                    shown = self._overlay_upload(img, dataset, condition, query)
                vector = self.on_model_thread(lambda ex=extractor, im=shown: embed_images(ex, [im])[0])
                try:
                    require_rankable(vector[None, :], key.model, ["the upload"])
                except VlmindexError as exc:
                    others = sorted({i.model for i in self.indexes(dataset) if i.condition == condition} - {key.model})
                    raise BadRequest(str(exc), others) from None
            scores, ids = snap.batcher.search(np.asarray(vector, dtype=np.float32), k)
            if image_id is not None and snap.info.kind != "flat":
                scores, ids = with_own_vector(scores, ids, image_id, vector, k)
            # the rows of the catalog as it is now (the snapshot may be newer than the request's start)
            out[key.model] = self._rows(ids, scores, query, condition, self._dataset_meta(dataset))
            indexes[key.model] = {"kind": snap.info.kind, "count": snap.info.count, "built_at": snap.info.built_at,
                                  "verified": snap.verified}
        return {"query": query, "condition": condition, "k": k, "results": out, "indexes": indexes}

    def _stored_vector(self, key: RunKey, image_id: int) -> np.ndarray | None:
        from vlmindex.catalog.embeddings import read_run

        try:
            run = read_run(self.ws, key, ids=np.array([image_id]))
        except WorkspaceBusy:
            raise Busy(BUSY) from None
        return run.vectors[0] if len(run.ids) else None

    def _overlay_upload(self, img: Any, dataset: str, condition: str, query: dict[str, Any]) -> Any:
        """An upload under an overlay condition gets the condition's text, as its gallery did."""
        from vlmindex.overlay import apply_overlay, get_condition

        with self._reading() as con:
            recipe = get_condition(con, dataset, condition)
            pools = catalog_datasets.class_pools(con, dataset)
        if recipe.needs_labels and not query.get("label"):
            raise BadRequest(f"condition {condition!r} writes the image's class; give the upload's 'label'")
        names = tuple(pools.get(query.get("modality"), []) or sorted({c for v in pools.values() for c in v}))
        return apply_overlay(img, recipe, image_id=int(query.get("image_id") or 0), label=query.get("label"),
                             class_names=names)

    def _rows(self, ids: np.ndarray, scores: np.ndarray, query: dict[str, Any], condition: str,
              catalog_sig: tuple) -> list[dict]:
        rows = []
        for rank, (i, s) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True), start=1):
            if i < 0:
                continue
            m = self.image(int(i), catalog_sig)
            row = {"rank": rank, "image_id": m.image_id, "score": round(float(s), 6), "label": m.label,
                   "split": m.split, "group_id": m.group_id, "modality": m.modality,
                   "thumbnail_url": f"/api/images/{m.image_id}/thumbnail"
                                    + (f"?condition={quote(condition, safe='')}" if condition != CLEAN else ""),
                   "is_query": query.get("in_catalog", False) and m.image_id == query.get("image_id"),
                   "same_group": bool(query.get("group_id")) and m.group_id == query.get("group_id"),
                   "same_class": None if not query.get("label") else m.label == query["label"]}
            rows.append(row)
        return rows

    # -- thumbnails ---------------------------------------------------------------------------------------
    def thumbnail_png(self, image_id: int, condition: str = CLEAN, size: int = thumbnails.THUMBNAIL_PX) -> bytes:
        if not thumbnails.MIN_PX <= size <= thumbnails.MAX_PX:
            raise BadRequest(f"size={size}: choose {thumbnails.MIN_PX}..{thumbnails.MAX_PX}")
        meta = self.image(image_id)
        recipe_json = None
        if condition != CLEAN:
            names = self.condition_names(meta.dataset)
            if condition not in names:
                raise NotFound(f"unknown condition {condition!r} for dataset {meta.dataset!r}", names)
            recipe_json = self._state().recipes.get((meta.dataset, condition))
        # the recipe is in the key: `overlay add --replace` changes what the thumbnail shows
        return self.thumbnail(meta, condition, recipe_json, size)

    def _thumbnail(self, meta: ImageMeta, condition: str, recipe_json: str | None, size: int) -> bytes:
        from vlmindex.overlay import OverlayRecipe

        recipe, names = None, ()
        if recipe_json is not None:
            recipe = OverlayRecipe.from_json(recipe_json)
            with self._reading() as con:
                names = tuple(catalog_datasets.class_pools(con, meta.dataset).get(meta.modality, []))
        ref = thumbnails.ImageRef(meta.image_id, meta.path, meta.sha256, meta.label, meta.modality)
        try:
            return thumbnails.render(ref, size=size, recipe=recipe, class_names=names)
        except Exception:  # noqa: BLE001 - the file changed or vanished under the catalog
            raise Conflict(f"image {meta.image_id} cannot be shown: its file is missing, unreadable or changed "
                           "since it was ingested; re-ingest its dataset") from None

    def close(self) -> None:
        for key in list(self._snapshots):
            self._drop(key)
        self._model_thread.shutdown(wait=True)


def explore_app(ws: Workspace, key: RunKey) -> Path | None:
    """The static explorer published for ``key`` in the workspace, when there is one."""
    from vlmindex.explore import app_dir

    path = app_dir(ws, key)
    return path if (path / "index.html").is_file() else None

