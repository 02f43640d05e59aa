"""FAISS indexes over L2-normalised embeddings (inner product = cosine), ids = ``image_id``.

Each index is saved with a JSON sidecar: kind, parameters, dimension, count, build seconds, the
sha256 of the ``.faiss`` file itself and the fingerprint of the run it was built from, so a stale,
damaged or truncated index is detected rather than trusted.
Approximate kinds are measured against exact search on a sample of queries (recall@k, overall and
per class) when they are built.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from vlmindex.catalog import RunKey, Workspace, fingerprints
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog.embeddings import no_embeddings, read_run, run_fingerprint
from vlmindex.catalog.workspace import atomic_write_bytes, atomic_write_json
from vlmindex.errors import VlmindexError

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
EXACT_LIMIT = 200_000  # 'auto' builds exact flat indexes up to this many vectors


@dataclass
class IndexInfo:
    model: str
    dataset: str
    condition: str
    kind: str
    params: dict[str, Any]
    dim: int
    count: int
    build_seconds: float
    checksum: str          # sha256 of the .faiss file itself
    faiss_version: str
    built_at: str
    recall: dict[str, Any] | None = None
    inputs_fingerprint: str | None = None  # of the run it was built from (catalog.fingerprints)

    @classmethod
    def load(cls, path: Path) -> IndexInfo | None:
        """The sidecar at ``path``; None when it is unreadable or not a vlmindex sidecar."""
        try:
            data = json.loads(path.read_text())
            return cls(**{f: data[f] for f in cls.__dataclass_fields__ if f in data})
        except (OSError, ValueError, TypeError):
            return None


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32 and C-contiguous for FAISS."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def default_params(kind: str, n: int, dim: int) -> dict[str, Any]:
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))  # FAISS wants ~39 points per centroid
    if kind == "ivf":
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 8))}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 200, "efSearch": 128}
    if kind == "ivfpq":
        m = next(m for m in (dim // 4, dim // 8, 16, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 8)), "m": m, "nbits": 8,
                "refine_k_factor": 8}
    return {}


def make_index(kind: str, dim: int, params: dict[str, Any]) -> faiss.Index:
    """An empty index of ``kind`` taking ids, for cosine similarity on unit vectors."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], ip)
        index.nprobe = params["nprobe"]
        return faiss.IndexIDMap(index)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], ip)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
        return faiss.IndexIDMap(index)
    if kind == "ivfpq":
        # PQ codes alone lose the ordering of close neighbours; an exact re-ranking of the
        # refine_k_factor * k candidates restores it (sidecar params say so).
        ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], params["m"],
                                 params["nbits"], ip)
        ivfpq.nprobe = params["nprobe"]
        refine = faiss.IndexRefineFlat(ivfpq)
        refine.k_factor = params["refine_k_factor"]
        return faiss.IndexIDMap(refine)
    raise VlmindexError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")


def _set_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    """Search-time parameters are not all serialised by FAISS: set them again after loading."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if kind == "ivf":
        inner.nprobe = params["nprobe"]
    elif kind == "hnsw":
        inner.hnsw.efSearch = params["efSearch"]
    elif kind == "ivfpq":
        inner.k_factor = params["refine_k_factor"]
        faiss.downcast_index(inner.base_index).nprobe = params["nprobe"]


def _gpu_count() -> int:
    try:
        return faiss.get_num_gpus()
    except AttributeError:
        return 0


def build(ids: np.ndarray, vectors: np.ndarray, kind: str, params: dict[str, Any] | None = None,
          *, seed: int = 0) -> tuple[faiss.Index, dict[str, Any]]:
    """Build an index of ``kind`` over ``vectors`` (normalised here) with ``ids``."""
    n, dim = vectors.shape
    defaults = default_params(kind, n, dim)
    unknown = sorted(set(params or {}) - set(defaults))
    if unknown:
        raise VlmindexError(f"index kind {kind!r} takes no parameter {', '.join(unknown)}; "
                            f"it takes: {', '.join(defaults) or 'none'}")
    params = {**defaults, **(params or {})}
    # FAISS aborts training with a multi-line message; say what is too small in one line
    if "nlist" in params and n < params["nlist"]:
        raise VlmindexError(f"{n} vectors are too few for a {kind} index with nlist={params['nlist']}; "
                            "use --kind flat or a smaller nlist")
    if kind == "ivfpq" and n < 2 ** params["nbits"]:
        raise VlmindexError(f"{n} vectors are too few to train {kind}'s {2 ** params['nbits']} PQ centroids; "
                            "use --kind flat or hnsw")
    x = normalise(vectors)
    index = make_index(kind, dim, params)
    gpu = _gpu_count() > 0 and kind in ("flat", "ivf")
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, size=min(n, 256 * params.get("nlist", 1)), replace=False)]
        faiss.seed = seed
        index.train(sample)
    index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
    if gpu:
        index = faiss.index_gpu_to_cpu(index)
    _set_search_params(index, kind, params)
    return index, {**params, "gpu": gpu}


def on_gpu(index: faiss.Index) -> faiss.Index:
    """The index copied to the GPUs when a GPU build of FAISS (the ``gpu`` extra) sees one, else itself.

    Flat and IVF indexes have GPU versions; HNSW and refined IVF-PQ stay on the CPU.
    """
    if _gpu_count() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):  # a kind without a GPU version
        return index


def search(index: faiss.Index, queries: np.ndarray, k: int, *, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) for each query row; queries are normalised here. With ``gpu``, the
    search runs on a GPU copy of the index when :func:`on_gpu` can make one."""
    k = min(k, index.ntotal)
    scores, ids = (on_gpu(index) if gpu else index).search(normalise(queries), k)
    return scores, ids


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> np.ndarray:
    """Per-query recall@k: |approx top-k ∩ exact top-k| / k."""
    k = exact_ids.shape[1]
    return np.array([len(set(a) & set(e)) / k for a, e in zip(approx_ids, exact_ids, strict=True)])


def measure_recall(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, labels: np.ndarray | None,
                   *, k: int = 10, sample: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Recall@k of ``index`` against exact search on a seeded sample of the indexed vectors."""
    x = normalise(vectors)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, exact_pos = exact.search(x[pick], min(k, len(x)))
    _, approx = index.search(x[pick], min(k, len(x)))
    per_query = recall_at_k(ids[exact_pos], approx)
    out: dict[str, Any] = {"k": k, "sample": len(pick), "recall": float(per_query.mean())}
    if labels is not None:
        lab = np.asarray(labels)[pick]
        out["per_class"] = {str(c): float(per_query[lab == c].mean()) for c in np.unique(lab)}
    return out


def choose_kind(kind: str | None, n: int) -> str:
    if kind in (None, "auto"):
        return "flat" if n <= EXACT_LIMIT else "hnsw"
    if kind not in KINDS:
        raise VlmindexError(f"unknown index kind {kind!r}; choose one of: auto, {', '.join(KINDS)}")
    return kind


def _stage_fingerprint(key: RunKey, run_fingerprint: str) -> str:
    return fingerprints.combine("index", {key: run_fingerprint}, {})


def build_index(ws: Workspace, model: str, dataset: str, condition: str = "clean", *,
                kind: str | None = None, params: dict[str, Any] | None = None,
                force: bool = False, recall_k: int = 10) -> tuple[IndexInfo, bool]:
    """Build (or keep, when current) the index of one run. Returns ``(info, built)``.

    An index is current when its sidecar's inputs fingerprint is the run's now, its kind is the
    one asked for, and the ``.faiss`` file's sha256 is the one recorded when it was written: a
    damaged or replaced file is rebuilt, never reported "up to date".
    """
    key = RunKey(model, dataset, condition)
    run = read_run(ws, key)
    if len(run.ids) == 0:
        with ws.read(views=False) as con:
            catalog_datasets.require_dataset(con, dataset)
        raise no_embeddings(ws, key)
    fingerprint = _stage_fingerprint(key, run.fingerprint)
    path = ws.index_path(model, dataset, condition)
    sidecar = path.with_suffix(".json")
    chosen = choose_kind(kind, len(run.ids))
    if not force and not params and sidecar.exists() and path.exists():
        info = IndexInfo.load(sidecar)
        if (info is not None and info.inputs_fingerprint == fingerprint and info.kind == chosen
                and info.checksum == file_sha256(path)):
            return info, False
    t0 = time.perf_counter()
    index, used = build(run.ids, run.vectors, chosen, params)
    seconds = time.perf_counter() - t0
    recall = None
    if chosen != "flat":
        with ws.read(views=False) as con:
            lab = catalog_datasets.images_by_id(con, run.ids.tolist(), ("label",))
        labels = np.array([lab.get(int(i), (None,))[0] for i in run.ids], dtype=object)
        recall = measure_recall(index, run.ids, run.vectors, labels, k=recall_k)
    data = faiss.serialize_index(index).tobytes()
    info = IndexInfo(model, dataset, condition, chosen, used, int(run.vectors.shape[1]), int(len(run.ids)),
                     seconds, hashlib.sha256(data).hexdigest(), faiss.__version__,
                     datetime.now().isoformat(timespec="seconds"), recall, fingerprint)
    with fingerprints.committing(ws, fingerprint, "index", [key], {}, what=f"the index of {key}"):
        atomic_write_bytes(path, data)
        atomic_write_json(sidecar, asdict(info))
    return info, True


def is_current(ws: Workspace, key: RunKey) -> bool:
    """Whether the run's index exists, is undamaged and was built from the run as it is now."""
    path = ws.index_path(key.model, key.dataset, key.condition)
    sidecar = path.with_suffix(".json")
    info = IndexInfo.load(sidecar) if sidecar.exists() and path.exists() else None
    if info is None:
        return False
    with ws.read(views=False) as con:
        now = _stage_fingerprint(key, run_fingerprint(con, ws, key))
    return info.inputs_fingerprint == now and info.checksum == file_sha256(path)


def load_index(ws: Workspace, model: str, dataset: str, condition: str = "clean", *,
               mmap: bool = False, wait: float | None = None) -> tuple[faiss.Index, IndexInfo]:
    """Load an index, refusing one that is missing, damaged, or older than its embeddings.

    With ``mmap`` the inverted lists of IVF indexes are memory-mapped read-only (they stay in the
    page cache, shared between processes); flat and HNSW indexes are read into memory. The
    checksum is verified on the same file first. ``wait``: seconds to wait for a writer.
    """
    key = RunKey(model, dataset, condition)
    path = ws.index_path(model, dataset, condition)
    sidecar = path.with_suffix(".json")
    build_cmd = f"vlmindex index build {key.cli_args()}"
    # The pair is read under a catalog connection: `index build` renames both files while it
    # holds the catalog read-write, so no reader sees a new file beside an old sidecar.
    with ws.read(views=False, **({} if wait is None else {"wait": wait})) as con:
        if not path.exists() or not sidecar.exists():
            raise VlmindexError(f"no index for {model!r} on {dataset}/{condition}; build it with `{build_cmd}`")
        info = IndexInfo.load(sidecar)
        if mmap:
            before = path.stat()
            checksum, data = file_sha256(path), None
        else:
            data = path.read_bytes()
            checksum = hashlib.sha256(data).hexdigest()
        now = _stage_fingerprint(key, run_fingerprint(con, ws, key))
    if info is not None and info.inputs_fingerprint is None:
        raise VlmindexError(f"the index of {model!r} on {dataset}/{condition} was built by an older vlmindex that "
                            f"recorded no fingerprint of its inputs; rebuild it with `{build_cmd}`")
    if info is None or checksum != info.checksum:
        raise VlmindexError(f"the index file {path} is damaged (its checksum is not the one recorded when it "
                            f"was built); rebuild it with `{build_cmd} --force`")
    if info.inputs_fingerprint != now:
        raise VlmindexError(
            f"the index of {model!r} on {dataset}/{condition} is stale (its embeddings or images changed "
            f"since it was built); rebuild it with `{build_cmd}`"
        )
    try:
        if data is not None:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        else:
            # IVF lists are mapped. Flat codes could be (IO_FLAG_MMAP_IFC) but start at an offset
            # that is not 4-byte aligned in the file: BLAS over that view ran 6x slower (69 ms
            # against 11 ms per query at 100k x 512), so flat indexes are read into memory.
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            after = path.stat()
            if (after.st_ino, after.st_size, after.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
                raise IndexReplaced(f"the index of {key} was replaced while it was being opened; open it again")
    except RuntimeError:
        raise VlmindexError(f"the index file {path} cannot be read by FAISS; rebuild it with "
                            f"`{build_cmd} --force`") from None
    _set_search_params(index, info.kind, info.params)
    return index, info


class IndexReplaced(VlmindexError):
    """An ``index build`` renamed a new file into place between the checksum and the mapping."""


def list_indexes(ws: Workspace) -> list[IndexInfo]:
    """The sidecars of every index file in the workspace (unreadable ones left out), by model,
    dataset and condition."""
    found = []
    for sidecar in sorted((ws.root / "indexes").glob("*/*/*.json")):
        info = IndexInfo.load(sidecar)
        if info is not None and sidecar.with_suffix(".faiss").exists():
            found.append(info)
    return sorted(found, key=lambda i: (i.dataset, i.model, i.condition != "clean", i.condition))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
