"""The explorer table of one analysed run, and Embedding Atlas launched on it.

One Parquet table per (model, dataset, condition) analysis, one row per embedded image: its
metadata, a thumbnail of the pixels the model saw (overlay included), seeded 2-D UMAP
coordinates of its embedding, the analysis's exact top-k neighbours in Embedding Atlas's format
(``{"ids": row indices, "distances": 1 - cosine}``), its per-query metrics, detected text and
duplicate cluster (the smallest image_id in it) where those were computed. Image ids are
written as text: they are 64-bit, and JavaScript numbers (the explorer's table) would round them.

One table (and one launch) per model, not one table with a model column: each model's 2-D map
and neighbour graph live in their own space, and a scatter mixing several would place points of
different models side by side as if distances between them meant something.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vlmindex import duplicates, thumbnails
from vlmindex.catalog import RunKey, Workspace, results, slug
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog import duplicates as duplicate_store
from vlmindex.catalog.embeddings import read_run
from vlmindex.catalog.fingerprints import stale_analyses
from vlmindex.catalog.parts import write_table_atomic
from vlmindex.errors import VlmindexError

EXPLORE_VERSION = 1  # bump when the table's columns or their meaning change


@dataclass(frozen=True)
class ExploreOptions:
    """How the table is made: which analysis, the UMAP's parameters and seed, thumbnail size."""

    analysis_id: str | None = None   # None: the newest current all-modality analysis of the run
    seed: int = 0
    n_neighbors: int = 15
    min_dist: float = 0.1
    thumbnail_px: int = 96


@dataclass
class ExploreTable:
    path: Path
    analysis_id: str
    rows: int
    k: int
    scope: str


def _choose_analysis(con: Any, ws: Workspace, key: RunKey, analysis_id: str | None) -> dict[str, Any]:
    rows = [s for s in results.latest_summaries(con, key.dataset)
            if s["model"] == key.model and s["condition"] == key.condition]
    stale = stale_analyses(con, ws)
    analyse = f"vlmindex analyze {key.cli_args()}"
    if analysis_id is not None:
        chosen = [s for s in rows if s["analysis_id"] == analysis_id]
        if not chosen:
            known = ", ".join(s["analysis_id"] for s in rows) or "none"
            raise VlmindexError(f"no current analysis {analysis_id!r} of {key}; its analyses: {known}")
    else:
        # a full analysis before a sampled one (whose rows cover only its sample), then the newest
        chosen = sorted((s for s in rows if s["modality"] is None and s["analysis_id"] not in stale),
                        key=lambda s: (s.get("sampled_queries") is None, s["created_at"]), reverse=True)
        if not chosen:
            raise VlmindexError(f"{key} has no current analysis over all modalities; run `{analyse}` first")
    s = chosen[0]
    if s["analysis_id"] in stale:
        raise VlmindexError(f"analysis {s['analysis_id']} of {key} is stale (its inputs changed); rerun `{analyse}`")
    return s


def _umap(vectors: np.ndarray, options: ExploreOptions) -> np.ndarray:
    """Seeded 2-D UMAP of unit vectors under the cosine metric (single-threaded, so reproducible)."""
    import umap

    n = len(vectors)
    if n < 4:
        raise VlmindexError(f"the run has {n} embeddings; a 2-D map needs at least 4")
    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(options.n_neighbors, n - 1), min_dist=options.min_dist,
                        metric="cosine", random_state=options.seed, n_jobs=1, init="spectral" if n > 16 else "random")
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def _neighbor_column(ids: np.ndarray, neighbors: pa.Table) -> pa.Array:
    """Per row, ``{"ids": [row indices], "distances": [1 - score]}`` of its stored neighbours."""
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    q = neighbors.column("image_id").to_numpy()
    nb = neighbors.column("neighbor_id").to_numpy()
    sc = neighbors.column("score").to_numpy()
    per_row: list[dict[str, list] | None] = [None] * len(ids)
    for query, start, stop in _runs(q):
        r = row_of.get(int(query))
        if r is None:
            continue
        keep = [j for j in range(start, stop) if int(nb[j]) in row_of]
        per_row[r] = {"ids": [row_of[int(nb[j])] for j in keep],
                      "distances": [float(1.0 - sc[j]) for j in keep]}
    kind = pa.struct([("ids", pa.list_(pa.int32())), ("distances", pa.list_(pa.float32()))])
    return pa.array(per_row, type=kind)


def _runs(sorted_keys: np.ndarray):
    """``(key, start, stop)`` of each run of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return
    edges = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(sorted_keys)]])
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        yield sorted_keys[a], a, b


def _run_dir(ws: Workspace, key: RunKey) -> Path:
    return ws.root / "explore" / slug(key.model) / slug(key.dataset) / slug(key.condition)


def table_path(ws: Workspace, key: RunKey, analysis_id: str) -> Path:
    return _run_dir(ws, key) / f"{analysis_id}.parquet"


def app_dir(ws: Workspace, key: RunKey) -> Path:
    """Where ``explore --publish`` writes the static application, and where ``serve`` finds it."""
    return _run_dir(ws, key) / "app"


def build_table(ws: Workspace, key: RunKey, options: ExploreOptions | None = None, *,
                progress: bool = False) -> ExploreTable:
    """Write the explorer table of ``key``'s analysis and return where it is (a progress bar over
    the thumbnails with ``progress``)."""
    from tqdm import tqdm

    from vlmindex.overlay import get_condition

    options = options or ExploreOptions()
    if not thumbnails.MIN_PX <= options.thumbnail_px <= thumbnails.MAX_PX:
        raise VlmindexError(f"--thumbnail-size {options.thumbnail_px}: choose {thumbnails.MIN_PX}..{thumbnails.MAX_PX}")
    with ws.read() as con:
        catalog_datasets.require_dataset(con, key.dataset)
        summary = _choose_analysis(con, ws, key, options.analysis_id)
        recipe = get_condition(con, key.dataset, key.condition)
        pools = catalog_datasets.class_pools(con, key.dataset)
        meta = {r[0]: r for r in catalog_datasets.images(
            con, key.dataset, columns=("image_id", "path", "sha256", "label", "modality", "split", "group_id"))}
        metrics = results.query_metric_table(con, summary["analysis_id"])
        text = results.detected_text(con, key.dataset, key.condition)
        # exact pairs, and near pairs found with this model's embeddings of this condition
        a, b = duplicate_store.pair_ids(con, key.dataset, kinds=(*duplicate_store.EXACT_KINDS, duplicate_store.NEAR),
                                        model=key.model, condition=key.condition)
        # the same connection that judged the analysis current: the vectors are the ones it scored
        run = read_run(ws, key, con=con)
    keep = np.array([int(i) in meta for i in run.ids.tolist()], dtype=bool)
    ids, vectors = run.ids[keep], run.vectors[keep]
    neighbors = results.read_neighbors(ws, key, summary["analysis_id"])
    xy = _umap(vectors, options)

    pngs: list[dict[str, bytes] | None] = []
    for i in tqdm(ids.tolist(), desc=f"thumbnails {key}", unit="img", disable=not progress, leave=False):
        _, path, sha, label, modality, _, _ = meta[i]
        try:
            pngs.append({"bytes": thumbnails.render(thumbnails.ImageRef(i, path, sha, label, modality),
                                                    size=options.thumbnail_px, recipe=recipe,
                                                    class_names=pools.get(modality, []))})
        except Exception:  # noqa: BLE001 - an unreadable file shows without a picture, the row stays
            pngs.append(None)

    by_query = {int(r["image_id"]): r for r in metrics.to_pylist()}
    clusters = duplicates.cluster_keys(ids, a, b)

    def col(name: str) -> list[Any]:
        return [by_query.get(int(i), {}).get(name) for i in ids.tolist()]

    def meta_col(j: int) -> list[Any]:
        return [meta[int(i)][j] for i in ids.tolist()]

    table = pa.table({
        # ids are 64-bit hashes: as text, since JavaScript numbers (and Embedding Atlas's table) cannot hold them
        "image_id": pa.array([str(i) for i in ids.tolist()], pa.string()),
        "thumbnail": pa.array(pngs, pa.struct([("bytes", pa.binary())])),
        "label": pa.array(meta_col(3), pa.string()),
        "modality": pa.array(meta_col(4), pa.string()),
        "split": pa.array(meta_col(5), pa.string()),
        "group_id": pa.array(meta_col(6), pa.string()),
        "knn_pred": pa.array(col("knn_pred"), pa.string()),
        "knn_correct": pa.array(col("knn_correct"), pa.bool_()),
        "purity_at_k": pa.array(col("purity_at_k"), pa.float64()),
        "ap": pa.array(col("ap"), pa.float64()),
        "detected_text": pa.array([text.get(int(i)) for i in ids.tolist()], pa.string()),
        "duplicate_cluster": pa.array([None if c is None else str(c) for c in clusters], pa.string()),
        "model": pa.array([key.model] * len(ids), pa.string()),
        "dataset": pa.array([key.dataset] * len(ids), pa.string()),
        "condition": pa.array([key.condition] * len(ids), pa.string()),
        "x": pa.array(xy[:, 0], pa.float32()),
        "y": pa.array(xy[:, 1], pa.float32()),
        "neighbors": _neighbor_column(ids, neighbors),
    })
    provenance = {"analysis_id": summary["analysis_id"], "scope": summary.get("scope"), "k": summary["k"],
                  "umap": {"seed": options.seed, "n_neighbors": min(options.n_neighbors, len(ids) - 1),
                           "min_dist": options.min_dist, "metric": "cosine"},
                  "explore_version": EXPLORE_VERSION, "run_fingerprint": run.fingerprint}
    table = table.replace_schema_metadata({"vlmindex": json.dumps(provenance)})
    path = write_table_atomic(table, table_path(ws, key, summary["analysis_id"]))
    return ExploreTable(path, summary["analysis_id"], len(ids), int(summary["k"]), summary.get("scope") or "")


def atlas_command(table: Path, *, host: str = "127.0.0.1", port: int = 5055,
                  export: Path | None = None) -> list[str]:
    """The ``embedding-atlas`` call that shows ``table``: precomputed map, neighbours, thumbnails."""
    exe = Path(sys.executable).with_name("embedding-atlas")
    program = [str(exe)] if exe.exists() else [shutil.which("embedding-atlas") or "embedding-atlas"]
    # Embedding Atlas adds the table's path as a column: left out, so an exported app names no local path
    cmd = [*program, str(table), "--x", "x", "--y", "y", "--image", "thumbnail", "--neighbors", "neighbors",
           "--disable-projection", "--query", "SELECT * EXCLUDE (FILE_NAME) FROM data",
           "--host", host, "--port", str(port), "--no-auto-port"]
    if export is not None:
        cmd += ["--export-application", str(export)]
    return cmd


def require_atlas() -> None:
    try:
        import embedding_atlas  # noqa: F401
    except ImportError:
        raise VlmindexError("Embedding Atlas is not installed; install it with "
                            "`pip install 'vlmindex[explore]'` (or `pip install embedding-atlas`)") from None


def export_app(table: Path, out: Path) -> Path:
    """Write Embedding Atlas's self-contained static application for ``table`` into ``out``."""
    require_atlas()
    if out.exists() and any(out.iterdir()) and not (out / "index.html").exists():
        raise VlmindexError(f"--export {out} exists and is not an exported explorer; choose an empty or new folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(atlas_command(table, export=tmp), capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (tmp / "index.html").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VlmindexError(f"embedding-atlas could not export the application: {last}")
    # swap in the new application whole: a reader of the old one never sees a mixture
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
