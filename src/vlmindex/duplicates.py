"""Duplicates and leakage: exact and near-duplicate image pairs of a dataset (``vlmindex duplicates``).

Medical datasets leak: HAM10000 holds several images of one lesion, and DermaMNIST has exact and
near duplicates across its train and test splits. A query whose duplicate sits in the gallery
finds it first, so neighbour purity and P@1 computed across duplicates are inflated;
``analyze --exclude-duplicates`` leaves each query's duplicate cluster out of its ranking.

Kinds of pair (each reported once, ``image_id_a < image_id_b``):

- ``exact-bytes``: the two files have the same sha256 (``images.sha256``);
- ``exact-pixels``: different bytes, the same decoded pixels (``images.pixel_sha256``: sha256 of
  the RGB array :func:`vlmindex.imageio.load_image` gives, and its shape), e.g. a PNG re-saved at
  another compression level, or as BMP;
- ``near``: cosine similarity >= ``threshold`` between two images' current embeddings of one
  model. FAISS ``IndexFlatIP.range_search`` over the L2-normalised float32 vectors finds the
  candidates (at ``threshold - 0.001``, so no n² loop runs in Python and float32 rounding loses
  none); each candidate's cosine is then computed in float64, which decides and is the stored
  score, so ``threshold = 1`` finds identical vectors and the result does not depend on BLAS.

A **cluster** is a connected component of the pair graph (union-find): duplicates of duplicates
belong together.

Stage shape: :class:`DuplicateOptions`; :func:`exact_pairs`, :func:`near_pairs` and
:func:`components` are pure; :func:`find_duplicates` reads, computes and stores each search inside
``fingerprints.committing`` (an ``ingest --replace`` meanwhile stores nothing); :func:`exclusion`
gives an analysis the pairs to exclude and their fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np

from vlmindex.catalog import CLEAN, RunKey, Workspace, fingerprints
from vlmindex.catalog import conditions as catalog_conditions
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog import duplicates as store
from vlmindex.catalog import embeddings as run_store
from vlmindex.errors import VlmindexError

STAGE = "duplicates"
# Measured with raw-pixels on the planted set of tests/test_duplicates.py (docs/metrics.md): copies
# resized to 0.75x and back and saved as JPEG (quality 90) score >= 0.9948 with their originals;
# 3.3% of the unrelated pairs pass 0.95, 0.16% pass 0.98. Other models need a look at the scores.
DEFAULT_THRESHOLD = 0.98
CANDIDATE_SLACK = 1e-3     # float32 inner products of 3072-d unit vectors are off by up to ~1e-5
EXACT_SLACK = 1e-9         # float64 rounding of a cosine that is 1 in exact arithmetic
MAX_PAIRS_PER_IMAGE = 100  # a threshold that finds more is finding similarity, not duplicates
_BATCH = 2048              # queries per range search


@dataclass(frozen=True)
class DuplicateOptions:
    model: str | None = None      # near duplicates from this model's embeddings (None: exact only)
    condition: str = CLEAN
    threshold: float = DEFAULT_THRESHOLD

    def check(self) -> None:
        t = self.threshold
        if not (isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 1):
            raise VlmindexError(f"--threshold must be a cosine in (0, 1], got {t!r}")

    def near_numbers(self) -> dict[str, Any]:
        """The options that enter a near search's fingerprint."""
        return {"kind": store.NEAR, "threshold": float(self.threshold)}


EXACT_NUMBERS = {"kind": store.EXACT}


# ------------------------------------------------------------------------------------------------
# Pure steps
# ------------------------------------------------------------------------------------------------


def _within_groups(ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (a < b) of ids sharing a key (None keys share nothing)."""
    by_key: dict[Any, list[int]] = {}
    for i, key in zip(ids.tolist(), keys.tolist(), strict=True):
        if key is not None:
            by_key.setdefault(key, []).append(i)
    a: list[int] = []
    b: list[int] = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        m = np.sort(np.asarray(members, dtype=np.int64))
        ia, ib = np.triu_indices(len(m), k=1)
        a += m[ia].tolist()
        b += m[ib].tolist()
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def exact_pairs(ids: np.ndarray, file_sha: np.ndarray, pixel_sha: np.ndarray) -> dict[str, np.ndarray]:
    """Pairs of identical files (``exact-bytes``) and of other files with identical decoded pixels
    (``exact-pixels``), sorted by (a, b); a pair of identical files is not listed twice."""
    ids = np.asarray(ids, dtype=np.int64)
    ba, bb = _within_groups(ids, np.asarray(file_sha, dtype=object))
    pa_, pb = _within_groups(ids, np.asarray(pixel_sha, dtype=object))
    sha_of = dict(zip(ids.tolist(), list(file_sha), strict=True))
    other_bytes = np.array([sha_of[x] != sha_of[y] for x, y in zip(pa_.tolist(), pb.tolist(), strict=True)],
                           dtype=bool)
    a = np.concatenate([ba, pa_[other_bytes]])
    b = np.concatenate([bb, pb[other_bytes]])
    kind = np.array(["exact-bytes"] * len(ba) + ["exact-pixels"] * int(other_bytes.sum()), dtype=object)
    order = np.lexsort((b, a))
    return {"a": a[order], "b": b[order], "kind": kind[order], "score": np.ones(len(a))}


def near_pairs(ids: np.ndarray, vectors: np.ndarray, threshold: float, *,
               max_pairs: int | None = None) -> dict[str, np.ndarray]:
    """Pairs (a < b) whose cosine similarity, computed in float64, is at least ``threshold``.

    Candidates come from a FAISS range search at ``threshold -`` :data:`CANDIDATE_SLACK` over the
    L2-normalised float32 vectors in an exact inner-product index (each pair from the side of its
    smaller id, so once); the float64 cosine of each candidate decides. Raises when more than
    ``max_pairs`` candidates pass (the threshold is too low to mean "duplicate").
    """
    import faiss

    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        return {"a": np.empty(0, np.int64), "b": np.empty(0, np.int64), "kind": np.empty(0, object),
                "score": np.empty(0)}
    x = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    x64 = np.asarray(vectors, dtype=np.float64)
    x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    qs, ns = [], []
    found = 0
    for lo in range(0, len(x), _BATCH):
        lims, _, nb = index.range_search(x[lo:lo + _BATCH], float(threshold) - CANDIDATE_SLACK)
        q = lo + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = ids[q] < ids[nb]  # drops each image's match with itself, and the mirror of each pair
        qs.append(q[keep])
        ns.append(nb[keep].astype(np.int64))
        found += int(keep.sum())
        if max_pairs is not None and found > max_pairs:
            raise VlmindexError(
                f"cosine >= {threshold:g} pairs more than {max_pairs} image pairs of {len(ids)} images (and the "
                "search is not finished): that is similarity, not duplication; raise --threshold")
    q, nb = np.concatenate(qs), np.concatenate(ns)
    score = np.einsum("ij,ij->i", x64[q], x64[nb])
    ok = score >= threshold - EXACT_SLACK
    a, b, score = ids[q[ok]], ids[nb[ok]], np.minimum(score[ok], 1.0)
    order = np.lexsort((b, a))
    return {"a": a[order], "b": b[order], "kind": np.array([store.NEAR] * len(a), dtype=object),
            "score": score[order]}


def components(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """Union-find over the pairs: ``image_id -> smallest image_id of its connected component``,
    for every image in at least one pair."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist(), strict=True):
        parent.setdefault(x, x)
        parent.setdefault(y, y)
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)  # the smaller id stays root: the result needs no sort
    return {x: find(x) for x in parent}


def cluster_keys(ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per id, the representative of its duplicate cluster, or None when it is in no pair: the
    exclusion keys of ``analyze --exclude-duplicates``."""
    comp = components(a, b)
    return np.array([comp.get(int(i)) for i in np.asarray(ids).tolist()], dtype=object)


# ------------------------------------------------------------------------------------------------
# Reading, computing, storing
# ------------------------------------------------------------------------------------------------


@dataclass
class DuplicateReport:
    """What one ``vlmindex duplicates`` call found, as stored."""

    dataset: str
    searches: list[str]                 # "exact", "near raw-pixels/clean >= 0.95"
    rows: list[dict[str, Any]]          # the stored pairs of these searches, cross-split first
    n_images: int
    hashed: int = 0                     # pixel hashes computed now (workspaces ingested before them)
    unhashed: list[str] = field(default_factory=list)  # images whose pixels could not be hashed: why

    @property
    def n_pairs(self) -> int:
        return len({(r["image_id_a"], r["image_id_b"]) for r in self.rows})

    @property
    def n_clusters(self) -> int:
        comp = components(np.array([r["image_id_a"] for r in self.rows], dtype=np.int64),
                          np.array([r["image_id_b"] for r in self.rows], dtype=np.int64))
        return len(set(comp.values()))

    def _distinct(self, column: str) -> int:
        return len({(r["image_id_a"], r["image_id_b"]) for r in self.rows if r[column] is False})

    def summary(self) -> str:
        by_kind: dict[str, int] = {}
        for r in self.rows:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
        both = len(self.rows) - self.n_pairs  # a pair stored under two kinds (an exact copy is near too)
        if both:
            kinds += f"; {both} found as exact and near"
        line = (f"{self.dataset}: {self.n_pairs} duplicate pairs" + (f" ({kinds})" if kinds else "")
                + f" in {self.n_clusters} clusters over {self.n_images} images; "
                f"{self._distinct('same_split')} cross a split boundary, {self._distinct('same_label')} have "
                f"different labels [{'; '.join(self.searches)}]")
        if self.hashed:
            line += f"; pixel hashes computed for {self.hashed} images"
        if self.unhashed:
            line += (f"; {len(self.unhashed)} images compared by file bytes only (pixels unreadable: "
                     f"{self.unhashed[0]})")
        return line


def _search_name(model: str, condition: str, threshold: float) -> str:
    return f"near {model}/{condition} cosine >= {threshold:g}"


def fill_pixel_hashes(ws: Workspace, dataset: str) -> tuple[int, list[str]]:
    """Compute ``images.pixel_sha256`` where it is NULL (workspaces ingested before the column), from
    exactly the bytes the catalog knows (``load_verified``). Returns (recorded, reasons of failures)."""
    from vlmindex.imageio import ChangedOnDisk, load_verified, pixels_sha256

    with ws.read(views=False) as con:
        todo = store.pixel_hash_todo(con, dataset)
    if not todo:
        return 0, []

    def one(row: tuple[int, str, str]) -> tuple[int, str, str] | str:
        image_id, path, sha = row
        try:
            return image_id, sha, pixels_sha256(load_verified(path, sha))
        except ChangedOnDisk as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - one unreadable file is reported, not fatal
            return f"{path}: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(one, todo))
    done = [r for r in results if not isinstance(r, str)]
    failed = [r for r in results if isinstance(r, str)]
    with ws.write(wait=run_store.COMMIT_WAIT) as con:
        recorded = store.set_pixel_hashes(con, done)
    return recorded, failed


def _images_input(dataset: str) -> fingerprints.CatalogInputs:
    return {f"images of {dataset}": functools.partial(store.images_fingerprint, dataset=dataset)}


def exact_fingerprint(con: duckdb.DuckDBPyConnection, ws: Workspace, dataset: str) -> str:
    """The fingerprint an exact search of ``dataset`` made now would store."""
    return fingerprints.current(con, ws, STAGE, [], EXACT_NUMBERS, _images_input(dataset))


def near_fingerprint(con: duckdb.DuckDBPyConnection, ws: Workspace, key: RunKey, threshold: float) -> str:
    """The fingerprint a near search of run ``key`` at ``threshold`` made now would store."""
    return fingerprints.current(con, ws, STAGE, [key], DuplicateOptions(threshold=threshold).near_numbers())


def _search_exact(ws: Workspace, dataset: str) -> int:
    t0 = time.perf_counter()
    with ws.read(views=False) as con:
        ids, file_sha, pixel_sha = store.image_hashes(con, dataset)
        fp = exact_fingerprint(con, ws, dataset)
    pairs = exact_pairs(ids, file_sha, pixel_sha)
    with fingerprints.committing(ws, fp, STAGE, [], EXACT_NUMBERS, what=f"the exact duplicates of {dataset}",
                                 catalog_inputs=_images_input(dataset)) as con:
        return store.store_search(con, dataset=dataset, kind=store.EXACT, model=None, condition=None, threshold=None,
                                  pairs=pairs, n_images=len(ids), seconds=time.perf_counter() - t0, fingerprint=fp)


def _search_near(ws: Workspace, key: RunKey, options: DuplicateOptions) -> int:
    t0 = time.perf_counter()
    with ws.read(views=False) as con:
        emb = run_store.read_run(ws, key, con=con)
    if len(emb.ids) == 0 and len(emb.zero_ids) == 0:
        raise run_store.no_embeddings(ws, key)
    fp = fingerprints.combine(STAGE, {key: emb.fingerprint}, options.near_numbers())
    pairs = near_pairs(emb.ids, emb.vectors, options.threshold,
                       max_pairs=MAX_PAIRS_PER_IMAGE * max(len(emb.ids), 1))
    with fingerprints.committing(ws, fp, STAGE, [key], options.near_numbers(),
                                 what=f"the near duplicates of {key}") as con:
        return store.store_search(con, dataset=key.dataset, kind=store.NEAR, model=key.model,
                                  condition=key.condition, threshold=float(options.threshold), pairs=pairs,
                                  n_images=len(emb.ids), seconds=time.perf_counter() - t0, fingerprint=fp)


def find_duplicates(ws: Workspace, dataset: str, options: DuplicateOptions | None = None) -> DuplicateReport:
    """Search ``dataset`` for exact duplicates, and for near ones when ``options.model`` is set;
    store each search (replacing its earlier rows) and return what was found."""
    opts = options or DuplicateOptions()
    opts.check()
    with ws.read(views=False) as con:
        catalog_datasets.require_dataset(con, dataset)
        if opts.model is not None and opts.condition != CLEAN and not catalog_conditions.exists(
                con, dataset, opts.condition):
            have = ", ".join(catalog_conditions.names(con, dataset))
            raise VlmindexError(f"dataset {dataset!r} has no condition {opts.condition!r} (it has: {have}); "
                                "see `vlmindex overlay list`")
    key = RunKey(opts.model, dataset, opts.condition) if opts.model is not None else None
    if key is not None and run_store.current_count(ws, key) == 0:
        raise run_store.no_embeddings(ws, key)
    hashed, unhashed = fill_pixel_hashes(ws, dataset)
    _search_exact(ws, dataset)
    searches = [store.EXACT]
    if key is not None:
        _search_near(ws, key, opts)
        searches.append(_search_name(opts.model, opts.condition, opts.threshold))
    with ws.read(views=False) as con:
        kinds = list(store.EXACT_KINDS) + ([store.NEAR] if key else [])
        rows = store.pair_rows(con, dataset, kinds=kinds, model=opts.model, condition=opts.condition)
        n_images = len(catalog_datasets.images(con, dataset, columns=("image_id",)))
    return DuplicateReport(dataset, searches, rows, n_images, hashed, unhashed)


def is_current(ws: Workspace, dataset: str, options: DuplicateOptions | None = None, *,
               any_threshold: bool = False) -> bool:
    """Whether the exact search (and the near search of ``options.model``, at its threshold or, with
    ``any_threshold``, at the one it was made with) of ``dataset`` is stored and was made from the
    inputs as they are now."""
    opts = options or DuplicateOptions()
    with ws.read(views=False) as con:
        found = {(s["kind"], s["model"], s["condition"]): s for s in store.searches(con, dataset)}
        exact = found.get((store.EXACT, None, None))
        if exact is None or exact["inputs_fingerprint"] != exact_fingerprint(con, ws, dataset):
            return False
        if opts.model is None:
            return True
        near = found.get((store.NEAR, opts.model, opts.condition))
        if near is None or not (any_threshold or near["threshold"] == float(opts.threshold)):
            return False
        return near["inputs_fingerprint"] == near_fingerprint(con, ws, RunKey(opts.model, dataset, opts.condition),
                                                              near["threshold"])


# ------------------------------------------------------------------------------------------------
# What an analysis excludes
# ------------------------------------------------------------------------------------------------


@dataclass
class Exclusion:
    """The pairs ``analyze --exclude-duplicates`` leaves out, and the fingerprint they enter it with."""

    a: np.ndarray
    b: np.ndarray
    fingerprint: str
    sources: list[str]          # which searches the pairs come from
    problem: str | None = None  # why they cannot be used (no search, or a stale one)

    def require(self) -> Exclusion:
        if self.problem:
            raise VlmindexError(self.problem)
        return self


def exclusion(con: duckdb.DuckDBPyConnection, ws: Workspace, dataset: str, model: str | None) -> Exclusion:
    """The stored pairs of ``dataset`` an analysis excludes: the exact ones always, and with
    ``model`` (``--duplicates-model``) the near ones of ``model`` on the clean images, which must be
    stored. One ``model`` for every analysed model, so all are compared on the same images.

    Near pairs come from the clean condition whatever condition is analysed: duplication is a
    property of the images, and an overlay's text would make unrelated images look alike, so a
    clean and an overlaid analysis leave the same clusters out and stay comparable.
    """
    found = {(s["kind"], s["model"], s["condition"]): s for s in store.searches(con, dataset)}
    exact = found.get((store.EXACT, None, None))
    problem = None
    doc: dict[str, Any] = {}
    sources = []
    if exact is None:
        problem = (f"--exclude-duplicates needs the duplicate pairs of dataset {dataset!r}; find them with "
                   f"`vlmindex duplicates {dataset}`" + (f" -m {model}" if model else ""))
    elif exact["inputs_fingerprint"] != exact_fingerprint(con, ws, dataset):
        problem = (f"the duplicate pairs of {dataset!r} were found before its images changed; run "
                   f"`vlmindex duplicates {dataset}` again")
    doc["exact"] = exact["inputs_fingerprint"] if exact else None
    sources.append("exact")
    kinds = list(store.EXACT_KINDS)
    near = found.get((store.NEAR, model, CLEAN)) if model is not None else None
    if model is not None and near is None:
        problem = problem or (f"--duplicates-model {model} needs its near-duplicate pairs of {dataset!r}; find them "
                              f"with `vlmindex duplicates {dataset} -m {model}`")
    if near is not None:
        key = RunKey(model, dataset, CLEAN)
        if near["inputs_fingerprint"] != near_fingerprint(con, ws, key, near["threshold"]):
            problem = problem or (f"the near-duplicate pairs of {model} on {dataset}/{CLEAN} were found before "
                                  f"its embeddings changed; run `vlmindex duplicates {dataset} -m {model} "
                                  f"--threshold {near['threshold']:g}` again")
        doc["near"] = {"model": model, "threshold": near["threshold"], "fingerprint": near["inputs_fingerprint"]}
        sources.append(_search_name(model, CLEAN, near["threshold"]))
        kinds.append(store.NEAR)
    a, b = store.pair_ids(con, dataset, kinds=kinds, model=model, condition=CLEAN)
    doc["pairs"] = hashlib.sha256(a.tobytes() + b"|" + b.tobytes()).hexdigest()
    doc["problem"] = problem
    fp = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return Exclusion(a, b, fp, sources, problem)


def exclusion_input_name(dataset: str) -> str:
    return f"duplicate pairs of {dataset}"


PROVIDER = "duplicate pairs"


def exclusion_fingerprint(con: duckdb.DuckDBPyConnection, *, ws: Workspace, dataset: str,
                          model: str | None) -> str:
    """The fingerprint of the pairs an analysis with ``--exclude-duplicates`` (and near pairs of
    ``model``) leaves out: the catalog input it records (``fingerprints.PROVIDERS[PROVIDER]``)."""
    return exclusion(con, ws, dataset, model).fingerprint


fingerprints.PROVIDERS[PROVIDER] = exclusion_fingerprint
