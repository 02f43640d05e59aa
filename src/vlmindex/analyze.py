"""Analysis: exact neighbours and discriminability metrics of one (model, dataset, condition) run.

Neighbours are computed exactly by ``vlmindex.metrics`` (brute-force cosine with the tie rule of
``vlmindex.metrics.retrieval``), never by an approximate index, so the numbers are the same
whatever index was built. Per-query rows go to ``query_metrics``, neighbours to Parquet (the
``neighbors`` view), and one summary row with the provenance of every number to ``summaries``.

Stage shape: :class:`AnalyzeOptions`; :func:`compute` is pure (arrays in, tables out);
:func:`analyze_run` loads, computes and persists inside ``fingerprints.committing``;
:func:`is_current` compares the stored inputs fingerprint with the run's now.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from vlmindex import metrics
from vlmindex.catalog import RunKey, Workspace, fingerprints, results
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog import embeddings as store
from vlmindex.errors import VlmindexError

STAGE = "analyze"


@dataclass(frozen=True)
class AnalyzeOptions:
    k: int = 10
    exclude_group: bool = False
    query_split: str | None = None
    gallery_split: str | None = None
    modality: str | None = None
    probe: bool = True
    seed: int = 0
    allow_partial: bool = False  # score the images that have an embedding even when some have none
    exclude_duplicates: bool = False  # leave each query's duplicate cluster out (vlmindex.duplicates)
    duplicates_model: str | None = None  # with exclude_duplicates: also the near pairs of this model's search
    probe_seeds: int = 1         # the probe repeated over seeds seed .. seed + probe_seeds - 1 (mean and sd)
    sample_queries: int | None = None  # score this many queries, drawn by class with ``seed``, against the gallery
    device: str | None = None    # where the ranking runs (ranking_device); the numbers do not depend on it

    def numbers(self) -> dict[str, Any]:
        """The options that change the numbers: they name the analysis and enter its fingerprint.

        ``exclude_duplicates`` and ``sample_queries`` only when set and ``probe_seeds`` only when it
        is not 1: they came after analyses were stored, which keep their ids.
        """
        out = asdict(self)
        out.pop("allow_partial")
        out.pop("device")
        if not out["exclude_duplicates"]:
            out.pop("exclude_duplicates")
            out.pop("duplicates_model")
        elif out["duplicates_model"] is None:
            out.pop("duplicates_model")
        if self.probe_seeds == 1:
            out.pop("probe_seeds")
        if self.sample_queries is None:
            out.pop("sample_queries")
        return out

    def analysis_id(self, model: str, dataset: str, condition: str) -> str:
        key = json.dumps({"model": model, "dataset": dataset, "condition": condition, **self.numbers()},
                         sort_keys=True)
        return hashlib.sha1(key.encode()).hexdigest()[:16]


@dataclass
class RunData:
    """A run's embeddings aligned with their catalog rows (only images with a label)."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    splits: np.ndarray
    modalities: np.ndarray
    missing: int              # labelled images of the selection without an embedding
    zero: int = 0             # labelled images whose embedding is all zeros (left out, see `skipped`)
    fingerprint: str = ""     # of the run as read (catalog.embeddings.run_fingerprint)
    n_selected: int = 0       # labelled images of the selection


def load_run(ws: Workspace, model: str, dataset: str, condition: str = "clean",
             modality: str | None = None) -> RunData:
    """Embeddings of a run joined to the catalog; raises when there are none."""
    return load(ws, RunKey(model, dataset, condition), modality)


def load(ws: Workspace, key: RunKey, modality: str | None = None) -> RunData:
    """:func:`load_run` for a :class:`RunKey`: one read-only connection for catalog rows and parts."""
    from vlmindex.overlay import get_condition

    with ws.read(views=False) as con:
        catalog_datasets.require_dataset(con, key.dataset)
        get_condition(con, key.dataset, key.condition)  # an unknown condition is named as such
        emb = store.read_run(ws, key, con=con)
        rows = catalog_datasets.images(con, key.dataset, columns=("image_id", "label", "group_id", "split", "modality"),
                                       labelled=True, modality=modality)
    if len(emb.ids) == 0 and len(emb.zero_ids) == 0:
        raise store.no_embeddings(ws, key)
    if not rows:
        raise VlmindexError(f"dataset {key.dataset!r} has no labelled images" +
                            (f" of modality {modality!r}" if modality else ""))
    cat_ids = np.array([r[0] for r in rows], dtype=np.int64)
    pos = np.clip(np.searchsorted(emb.ids, cat_ids), 0, max(len(emb.ids) - 1, 0))
    present = emb.ids[pos] == cat_ids if len(emb.ids) else np.zeros(len(cat_ids), dtype=bool)
    zero = np.isin(cat_ids, emb.zero_ids)
    sel = np.flatnonzero(present)
    col = list(zip(*rows, strict=True))
    return RunData(
        ids=cat_ids[sel],
        vectors=emb.vectors[pos[sel]] if len(sel) else np.empty((0, emb.dim), np.float32),
        labels=np.array(col[1], dtype=object)[sel],
        groups=np.array(col[2], dtype=object)[sel],
        splits=np.array(col[3], dtype=object)[sel],
        modalities=np.array(col[4], dtype=object)[sel],
        missing=int((~present & ~zero).sum()),
        zero=int(zero.sum()),
        fingerprint=emb.fingerprint,
        n_selected=len(cat_ids),
    )


def _cuda_visible() -> bool:
    """torch.cuda.is_available(), without importing torch (seconds, and ~0.5 GB) where no GPU
    driver is installed at all."""
    import shutil
    import sys
    from pathlib import Path

    if ("torch" not in sys.modules and not Path("/proc/driver/nvidia/gpus").is_dir()
            and not Path("/dev/kfd").exists() and shutil.which("nvidia-smi") is None):
        return False
    import torch

    return bool(torch.cuda.is_available())


_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_name(device: object) -> bool:
    """Whether ``device`` is a spelling ``--device`` accepts: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    return isinstance(device, str) and _DEVICE_RE.fullmatch(device) is not None


def ranking_device(device: str | None) -> str | None:
    """The ``device`` of :func:`vlmindex.metrics.retrieval_metrics` for ``--device``: None (the NumPy
    kernels) for ``cpu``; a torch device for ``cuda``/``cuda:N``; for None or ``auto``, ``cuda``
    when torch sees a GPU, else None."""
    if device is not None and not is_device_name(device):
        raise VlmindexError(f"--device {device!r} is not cpu, cuda, cuda:N or auto")
    if device in (None, "auto"):
        return "cuda" if _cuda_visible() else None
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        raise VlmindexError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    if device != "cuda" and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise VlmindexError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s); "
                            "use cuda:0 .. cuda:N-1")
    return device


def _split_mask(splits: np.ndarray, split: str | None, what: str) -> np.ndarray | None:
    if split is None:
        return None
    mask = splits == split
    if not mask.any():
        have = sorted({str(s) for s in splits})
        raise VlmindexError(f"--{what}-split {split!r} matches no image (splits here: {', '.join(have)})")
    return mask


def provenance(ws: Workspace, model: str, dataset: str, condition: str) -> dict[str, Any]:
    """What produced a run's embeddings: preprocessing, weights checksum, versions, index kind."""
    from vlmindex.index import IndexInfo
    from vlmindex.versions import library_versions

    row = store.last_run(ws, RunKey(model, dataset, condition))
    out: dict[str, Any] = {"analysis_versions": library_versions()}
    if row:
        out.update(preprocessing=json.loads(row["preprocessing"]) if row["preprocessing"] else None,
                   weights_sha256=row["weights_sha256"],
                   embed_versions=json.loads(row["versions"]) if row["versions"] else None,
                   dtype=row["dtype"], device=row["device"])
    sidecar = ws.index_path(model, dataset, condition).with_suffix(".json")
    info = IndexInfo.load(sidecar) if sidecar.exists() else None
    if info is not None:
        out["index"] = {"kind": info.kind, "params": info.params, "built_at": info.built_at}
    out["neighbours"] = "exact brute-force cosine (vlmindex.metrics), ties by smaller image_id"
    return out


def fingerprint_options(options: AnalyzeOptions) -> dict[str, Any]:
    """What enters an analysis's fingerprint: its numbers() and, with the probe on, the probe
    protocol's version, so a probe number stored by an earlier protocol is not current."""
    out = options.numbers()
    if options.probe:
        out["probe_protocol"] = metrics.probe.PROTOCOL_VERSION
    return out


def fingerprint(key: RunKey, run_fingerprint: str, options: AnalyzeOptions,
                duplicates_fingerprint: str | None = None) -> str:
    """The analysis fingerprint; with ``exclude_duplicates``, that of the excluded pairs enters it
    (``vlmindex.duplicates.exclusion``)."""
    from vlmindex import duplicates

    catalog = ({duplicates.exclusion_input_name(key.dataset): duplicates_fingerprint}
               if options.exclude_duplicates else None)
    return fingerprints.combine(STAGE, {key: run_fingerprint}, fingerprint_options(options), catalog)


def _catalog_recipe(key: RunKey, options: AnalyzeOptions) -> fingerprints.CatalogRecipe | None:
    """The catalog inputs an analysis reads besides its run: the duplicate pairs it leaves out."""
    if not options.exclude_duplicates:
        return None
    from vlmindex import duplicates

    return {duplicates.exclusion_input_name(key.dataset): (duplicates.PROVIDER, {
        "dataset": key.dataset, "model": options.duplicates_model})}


def _catalog_inputs(ws: Workspace, key: RunKey, options: AnalyzeOptions) -> fingerprints.CatalogInputs | None:
    return fingerprints.catalog_inputs(ws, _catalog_recipe(key, options))


def is_current(ws: Workspace, model: str, dataset: str, condition: str = "clean",
               options: AnalyzeOptions | None = None) -> bool:
    """Whether an analysis with these options is stored and was computed from the run as it is now."""
    opts = options or AnalyzeOptions()
    key = RunKey(model, dataset, condition)
    with ws.read(views=False) as con:
        stored = results.summary_fingerprint(con, opts.analysis_id(model, dataset, condition))
    return fingerprints.is_current(ws, stored, STAGE, [key], fingerprint_options(opts), _catalog_inputs(ws, key, opts))


def analyze(ws: Workspace, model: str, dataset: str, condition: str = "clean",
            options: AnalyzeOptions | None = None) -> dict[str, Any]:
    """Compute and store the metrics of one run; returns the summary row."""
    return analyze_run(ws, RunKey(model, dataset, condition), options)


def analyze_run(ws: Workspace, key: RunKey, options: AnalyzeOptions | None = None) -> dict[str, Any]:
    """:func:`analyze` for a :class:`RunKey`."""
    opts = options or AnalyzeOptions()
    if opts.k < 1:
        raise VlmindexError(f"-k must be at least 1, got {opts.k}")
    if not isinstance(opts.probe_seeds, int) or opts.probe_seeds < 1:
        raise VlmindexError(f"--probe-seeds must be at least 1, got {opts.probe_seeds}")
    t0 = time.perf_counter()
    run = load(ws, key, opts.modality)
    if run.missing and not opts.allow_partial:
        raise VlmindexError(
            f"{run.missing} of {run.n_selected} labelled images of {key.dataset}/{key.condition} have no embedding "
            f"for {key.model} (not embedded yet, or a Parquet part was removed); run "
            f"`vlmindex embed {key.cli_args()}`, or pass --allow-partial to score the "
            f"{len(run.ids)} that have one"
        )
    if len(run.ids) == 0:
        raise VlmindexError(f"no usable embeddings for {key} (every one is all zeros; see table `skipped`)")
    excl, dup_keys = None, None
    if opts.exclude_duplicates:
        from vlmindex import duplicates

        with ws.read(views=False) as con:
            excl = duplicates.exclusion(con, ws, key.dataset, opts.duplicates_model).require()
        dup_keys = duplicates.cluster_keys(run.ids, excl.a, excl.b)
    summary, per_query, nb = compute(run, key, opts, duplicate_keys=dup_keys)
    summary["seconds"] = time.perf_counter() - t0
    prov = provenance(ws, key.model, key.dataset, key.condition)
    prov.update(summary.pop("provenance"))  # compute's part: the probe's scheme, grid, seeds and chosen C
    prov.update(k=opts.k, exclude_group=opts.exclude_group, modality=opts.modality, seed=opts.seed, probe=opts.probe,
                ranking_device=ranking_device(opts.device) or "cpu (NumPy)",
                probe_seeds=opts.probe_seeds, images_without_embedding=run.missing, zero_embeddings_left_out=run.zero,
                inputs=fingerprints.recipe(STAGE, [key], fingerprint_options(opts), _catalog_recipe(key, opts)))
    if excl is not None:
        in_cluster = [k for k in dup_keys if k is not None]
        prov["duplicates_excluded"] = {"sources": excl.sources, "pairs": len(excl.a),
                                       "images_in_clusters": len(in_cluster), "clusters": len(set(in_cluster))}
    summary["provenance"] = json.dumps(prov, default=str)
    summary["created_at"] = datetime.now()
    fp = fingerprint(key, run.fingerprint, opts, excl.fingerprint if excl else None)
    summary["inputs_fingerprint"] = fp
    neighbors = results.neighbor_table(key, summary["analysis_id"], fp, nb[0], nb[1], nb[2])
    with fingerprints.committing(ws, fp, STAGE, [key], fingerprint_options(opts), what=f"the analysis of {key}",
                                 catalog_inputs=_catalog_inputs(ws, key, opts)) as con:
        results.store_analysis(con, ws, key, summary, per_query, neighbors)
    return summary


def modalities(ws: Workspace, dataset: str) -> tuple[list[str], int]:
    """The modalities of a dataset's labelled images (sorted) and how many labelled images have none."""
    with ws.read(views=False) as con:
        catalog_datasets.require_dataset(con, dataset)
        return catalog_datasets.modalities(con, dataset)


def without_modality_warning(dataset: str, n: int) -> str:
    return (f"{n} labelled image(s) of {dataset} have no modality and are in no per-modality analysis "
            "(the all-modality analysis includes them)")


def per_modality(options: AnalyzeOptions, names: list[str]) -> list[AnalyzeOptions]:
    """The options of one analysis per modality: ``options`` with ``modality`` set to each name."""
    if options.modality is not None:
        raise VlmindexError(f"--per-modality analyses every modality; leave out --modality {options.modality}")
    return [replace(options, modality=m) for m in names]


def analyze_per_modality(ws: Workspace, key: RunKey, options: AnalyzeOptions | None = None) -> list[dict[str, Any]]:
    """One analysis per modality of the dataset, gallery and queries within it: each is the analysis
    ``modality=M`` gives (same id, fingerprint and numbers). Labelled images without a modality
    are in none of them; a ``UserWarning`` says how many. Returns the summary rows, by modality."""
    opts = options or AnalyzeOptions()
    names, unassigned = modalities(ws, key.dataset)
    plan = per_modality(opts, names)
    if not names:
        raise VlmindexError(f"dataset {key.dataset!r} records no modality for its labelled images, so there is "
                            "nothing to analyse per modality; give one at ingest (--modality, or a modality "
                            "column) or analyze without --per-modality")
    if unassigned:
        warnings.warn(without_modality_warning(key.dataset, unassigned), UserWarning, stacklevel=2)
    if opts.sample_queries is not None:  # N is per modality: refuse before any block is stored
        with ws.read(views=False) as con:
            sizes = catalog_datasets.query_counts(con, key.dataset, split=opts.query_split)
        small = {m: sizes.get(m, 0) for m in names if sizes.get(m, 0) <= opts.sample_queries}
        if small:
            raise VlmindexError(f"--sample-queries {opts.sample_queries} is per modality, and these have no more "
                                f"queries than that: {', '.join(f'{m} ({n})' for m, n in small.items())}; "
                                "choose a smaller N or analyze them without it")
    return [analyze_run(ws, key, o) for o in plan]


def merged_groups(groups: np.ndarray, clusters: np.ndarray | None) -> np.ndarray:
    """One unit per connected set of images sharing a group or a duplicate cluster (None: none)."""
    n = len(groups)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for values in (groups, clusters if clusters is not None else [None] * n):
        seen: dict[Any, int] = {}
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                continue
            if v in seen:
                parent[find(i)] = find(seen[v])
            else:
                seen[v] = i
    return np.array([f"unit:{find(i)}" for i in range(n)], dtype=object)


def sample_query_mask(run: RunData, query_mask: np.ndarray | None, opts: AnalyzeOptions,
                      key: RunKey) -> tuple[np.ndarray, int]:
    """``--sample-queries N``: the mask of N queries drawn by class (``stratified_sample``, seeded
    with ``opts.seed``) from the queries the options select, and how many those were."""
    pool = np.flatnonzero(query_mask) if query_mask is not None else np.arange(len(run.ids))
    n = opts.sample_queries
    if not isinstance(n, int) or n < 1:
        raise VlmindexError(f"--sample-queries must be a positive number of queries, got {n!r}")
    if n >= len(pool):
        raise VlmindexError(f"--sample-queries {n} is not fewer than the {len(pool)} queries of {key}; "
                            "analyze all of them: leave --sample-queries out")
    mask = np.zeros(len(run.ids), dtype=bool)
    mask[pool[metrics.stratified_sample(run.labels[pool], n, seed=opts.seed)]] = True
    return mask, int(len(pool))


def sample_intervals(res: Any, groups: np.ndarray, *, seed: int, n_boot: int = 2000) -> dict[str, list[float | None]]:
    """Bootstrap 95% intervals of the retrieval figures of a sampled analysis, over its scored
    queries resampled by group (``{summaries column: [low, high]}``)."""
    scored = ~res.skipped
    qgroups = groups[res.query_index][scored]
    labels = np.asarray(res.classes)[res.query_label_code[scored]]
    out: dict[str, list[float | None]] = {}
    for m in metrics.RETRIEVAL:
        values = res.metric(m.result_key)
        if values is None:
            continue
        v = np.asarray(values, dtype=float)[scored]
        for c in m.columns:
            lo, hi = (metrics.bootstrap_mean_ci(v, qgroups, n_boot=n_boot, seed=seed) if c.aggregate == "micro"
                      else metrics.bootstrap_class_mean_ci(v, labels, qgroups, n_boot=n_boot, seed=seed))
            out[c.name] = [None if not np.isfinite(x) else float(x) for x in (lo, hi)]  # JSON has no NaN
    return out


def compute(run: RunData, key: RunKey, opts: AnalyzeOptions, *, duplicate_keys: np.ndarray | None = None
            ) -> tuple[dict[str, Any], pa.Table, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The pure step: the summary row, the per-query table and (query ids, neighbour ids, scores).

    ``duplicate_keys`` (with ``exclude_duplicates``): each image's duplicate cluster, None outside
    any (``vlmindex.duplicates.cluster_keys``), left out of the ranking of its members.
    """
    if opts.exclude_duplicates and duplicate_keys is None:
        raise VlmindexError("exclude_duplicates needs the duplicate cluster of each image")
    query_mask = _split_mask(run.splits, opts.query_split, "query")
    gallery_mask = _split_mask(run.splits, opts.gallery_split, "gallery")
    pool = None
    if opts.sample_queries is not None:
        query_mask, pool = sample_query_mask(run, query_mask, opts, key)
    res = metrics.retrieval_metrics(
        run.vectors, run.labels, ids=run.ids, groups=run.groups, k=opts.k,
        exclude_group=opts.exclude_group, query_mask=query_mask, gallery_mask=gallery_mask,
        clusters=duplicate_keys if opts.exclude_duplicates else None, device=ranking_device(opts.device),
    )
    summary = res.summary()
    # The probe validates and scores on the dataset's splits (vlmindex.metrics.probe); over a
    # --gallery-split it cross-validates within the gallery. Groups keep a lesion on one side.
    gallery = gallery_mask if gallery_mask is not None else np.ones(len(run.ids), dtype=bool)
    # With duplicates excluded, a duplicate cluster is one unit for the probe too: a copy of a
    # training image is never among the rows it is scored on.
    probe_groups = merged_groups(run.groups, duplicate_keys) if opts.exclude_duplicates else run.groups
    dist = metrics.distribution_figures(
        run.vectors[gallery], run.labels[gallery], groups=probe_groups[gallery],
        splits=run.splits if gallery_mask is None else None,
        probe=opts.probe, seed=opts.seed, probe_seeds=opts.probe_seeds)
    probe = dist.get("linear_probe")
    analysis_id = opts.analysis_id(key.model, key.dataset, key.condition)
    row = {
        "analysis_id": analysis_id, "model": key.model, "dataset": key.dataset, "condition": key.condition,
        "k": opts.k, "exclude_group": opts.exclude_group, "exclude_duplicates": opts.exclude_duplicates,
        "duplicates_model": opts.duplicates_model, "query_split": opts.query_split,
        "gallery_split": opts.gallery_split, "modality": opts.modality, "n_queries": summary["n_queries"],
        "n_skipped_queries": summary["n_skipped"], "n_gallery": summary["n_gallery"],
        "n_classes": summary["n_classes"], "dim": int(run.vectors.shape[1]),
        "n_missing": run.missing,
        # summary() and distribution_figures() keys -> summaries columns: vlmindex.metrics.registry
        **metrics.summary_columns(summary), **metrics.distribution_columns(dist),
        "probe_protocol": probe.protocol if probe is not None else None,
        "sampled_queries": opts.sample_queries, "query_pool": pool,
        # units as the probe's: groups, images without one on their own, duplicate clusters merged
        "ci": json.dumps(sample_intervals(res, merged_groups(run.groups, duplicate_keys if opts.exclude_duplicates
                                                            else None), seed=opts.seed)) if pool is not None else None,
        # merged into the stored provenance by analyze_run
        "provenance": {"linear_probe": probe.provenance()} if probe is not None else {},
    }
    qi = res.query_index
    per_query = pa.table({
        "analysis_id": pa.array([analysis_id] * len(qi), pa.string()),
        "model": pa.array([key.model] * len(qi), pa.string()),
        "dataset": pa.array([key.dataset] * len(qi), pa.string()),
        "condition": pa.array([key.condition] * len(qi), pa.string()),
        "image_id": pa.array(run.ids[qi]),
        "label": pa.array([str(x) for x in run.labels[qi]], pa.string()),
        "modality": pa.array(list(run.modalities[qi]), pa.string()),
        "split": pa.array(list(run.splits[qi]), pa.string()),
        "k": pa.array(np.full(len(qi), opts.k, dtype=np.int32)),
        "exclude_group": pa.array(np.full(len(qi), opts.exclude_group)),
        "n_relevant": pa.array(res.n_relevant.astype(np.int64)),
        "purity_at_k": pa.array(res.purity_at_k, from_pandas=True),
        "ap": pa.array(res.ap, from_pandas=True),
        "map_at_r": pa.array(res.map_at_r, from_pandas=True),
        "r_precision": pa.array(res.r_precision, from_pandas=True),
        "p_at_1": pa.array(res.p_at_1, from_pandas=True),
        "knn_pred": pa.array([None if p is None else str(p) for p in res.knn_pred], pa.string()),
        # NaN (unscored query, R = 0) must stay NULL, not become a wrong vote
        "knn_correct": pa.array(np.asarray(res.knn_correct, dtype=float) > 0.5,
                                mask=np.isnan(np.asarray(res.knn_correct, dtype=float))),
    })
    return row, per_query, (run.ids[qi], res.neighbor_id, res.neighbor_score)
