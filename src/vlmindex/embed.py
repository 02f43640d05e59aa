"""Batched, resumable, shardable embedding runs: reader → model → Parquet writer.

Images are read, checked against their ingest checksum, overlaid (for a text condition) and
preprocessed in DataLoader worker processes while the model runs in the main process. Every
``part_size`` images a part is committed through :func:`vlmindex.catalog.embeddings.commit_part`,
which keeps only rows whose pixels are still the catalog's and whose image has no current
embedding yet, so a run killed at any point resumes from what is on disk, two runs of one model at
once end with one embedding per image, and a run overtaken by ``ingest --replace`` stores nothing
stale. ``--shard i/n`` takes the images with ``image_id % n == i``: disjoint, and together the whole
dataset, because image ids are uniform hashes.

Stage shape: :class:`EmbedOptions`; the computation is the model's own ``encode_image``, run by an
engine that yields (ids, vectors, failures) batches: ``local`` (DataLoader workers, the model in
this process) or ``ray`` (Ray Data tasks and an actor pool of model replicas,
:mod:`vlmindex.ray_engine`); persist is ``commit_part`` plus the ``runs`` row, the same for both,
so resume, shards and a later run of the other engine see one embedding per image; currency is
"no image of the selection is pending".
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import duckdb
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlmindex.catalog import RunKey, Workspace
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog import embeddings as store
from vlmindex.catalog.parts import remove_stale_temporaries, unusable_rows
from vlmindex.errors import VlmindexError, WorkspaceBusy
from vlmindex.imageio import load_verified
from vlmindex.models import LoadOptions, auto_device
from vlmindex.versions import library_versions

PART_COMMIT_WAIT = 5.0     # seconds a part waits for the workspace lock before the run goes on (and retries)
FINAL_COMMIT_WAIT = 600.0  # seconds the last part waits: after it there is nothing left to retry with

__all__ = ["EmbedOptions", "EmbedReport", "auto_device", "embed", "embed_run", "parse_shard", "pending_count"]


@dataclass
class EmbedOptions:
    batch_size: int = 32
    num_workers: int | None = None        # None: one per core, at most 8
    dtype: str = "float32"                # storage precision of the embeddings
    shard: tuple[int, int] | None = None  # (i, n)
    split: str | None = None
    device: str | None = None             # None: cuda when present, else cpu
    checkpoint: str | None = None
    trust_remote_code: bool = False
    part_size: int = 512                  # images per Parquet part: at most this much is lost to a kill
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    engine: str = "local"                 # local (DataLoader + this process) or ray (vlmindex.ray_engine)
    ray_address: str | None = None        # ray: a running cluster ("auto", "ray://host:10001"); None: a local one
    replicas: int | None = None           # ray: model replicas in the actor pool (default: see ray_engine)
    gpus_per_replica: float = 0.0         # ray: GPUs each replica reserves
    family: str | None = None             # medical | general | llm-enhanced | baseline; None: the registry's

    @property
    def load(self) -> LoadOptions:
        return LoadOptions(checkpoint=self.checkpoint, trust_remote_code=self.trust_remote_code, device=self.device)


@dataclass
class EmbedReport:
    model: str
    dataset: str
    condition: str
    embedded: int
    total: int            # images of the selection with a current embedding afterwards
    seconds: float
    cached: bool = False
    failed: int = 0
    zero: int = 0         # embeddings that came out all zeros (recorded in `skipped`, left out of analyses)
    changed: int = 0      # images whose pixels changed while they were embedded (embedded next run)
    duplicates: int = 0   # images another process embedded first
    first_failure: str | None = None  # the reason of the first image that could not be read

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        what = f"{self.model} on {self.dataset}/{self.condition}"
        if self.cached:
            return f"{what}: already embedded ({self.total} images); nothing to do"
        line = (f"{what}: embedded {self.embedded} images in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s), {self.total} in total")
        if self.failed:
            line += f"; {self.failed} could not be read (recorded in `skipped`)"
        if self.zero:
            line += f"; {self.zero} gave an all-zero embedding (recorded in `skipped`, left out of analyses)"
        if self.changed:
            line += f"; {self.changed} changed while embedding and were not stored (run embed again)"
        if self.duplicates:
            line += f"; {self.duplicates} were embedded meanwhile by another process"
        return line


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``'i/n'`` → ``(i, n)`` with ``0 <= i < n``."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise VlmindexError(f"--shard {text!r} is not i/n (e.g. 0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise VlmindexError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


class ImageSource(Dataset):
    """The reader: one (image_id, tensor) per pending image, overlay applied before preprocessing."""

    def __init__(self, rows: list[store.PendingImage], preprocess, recipe=None,
                 pools: dict[str | None, list[str]] | None = None) -> None:
        self.rows, self.preprocess, self.recipe, self.pools = rows, preprocess, recipe, pools or {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            img = load_verified(row.path, row.sha256)
            if self.recipe is not None:
                from vlmindex.overlay import apply_overlay

                img = apply_overlay(img, self.recipe, image_id=row.image_id, label=row.label,
                                    class_names=self.pools.get(row.modality, []))
            return row.image_id, self.preprocess(img), None
        except Exception as exc:  # noqa: BLE001 - recorded per image, never silently dropped
            return row.image_id, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    ok = [(i, t) for i, t, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    ids = torch.tensor([i for i, _ in ok], dtype=torch.int64)
    batch = torch.stack([t for _, t in ok]) if ok else None
    return ids, batch, failed


def _worker_init(lock_fd: int, _: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model for cores
    with contextlib.suppress(OSError):
        os.close(lock_fd)  # the run's lock is the parent's: it must die with the parent


def _check_run(ws: Workspace, key: RunKey) -> None:
    """Fail early, in one line, on an unknown dataset or condition."""
    from vlmindex.overlay import get_condition

    with ws.read(views=False) as con:
        catalog_datasets.require_dataset(con, key.dataset)
        get_condition(con, key.dataset, key.condition)


def _selection(ws: Workspace, key: RunKey, opts: EmbedOptions) -> store.Selection:
    sel = store.pending(ws, key, split=opts.split, shard=opts.shard)
    if sel.total == 0:
        where = f" split {opts.split!r} of" if opts.split else ""
        raise VlmindexError(f"no images in{where} dataset {key.dataset!r}")
    return sel


def pending_count(ws: Workspace, model: str, dataset: str, condition: str = "clean",
                  options: EmbedOptions | None = None) -> int:
    """How many images of the selection still need an embedding (0: the run is current)."""
    key = RunKey(model, dataset, condition)
    _check_run(ws, key)
    return len(_selection(ws, key, options or EmbedOptions()).todo)


def embed(ws: Workspace, model: str, dataset: str, condition: str = "clean",
          options: EmbedOptions | None = None, *, extractor=None) -> EmbedReport:
    """Embed every image of ``dataset`` under ``condition`` that has no current embedding yet.

    ``extractor`` reuses a loaded model across runs (the study runner loads each model once).
    """
    return embed_run(ws, RunKey(model, dataset, condition), options, extractor=extractor)


def embed_run(ws: Workspace, key: RunKey, options: EmbedOptions | None = None, *, extractor=None) -> EmbedReport:
    """:func:`embed` for a :class:`RunKey`."""
    from vlmindex.models import check_family, get_spec

    opts = options or EmbedOptions()
    get_spec(key.model)  # an unknown name fails before any work
    check_family(opts.family)
    _check_run(ws, key)
    out_dir = ws.embeddings_dir(key.model, key.dataset, key.condition)
    remove_stale_temporaries(out_dir)
    _record_missing_runs(ws, key)
    def cached(total: int) -> EmbedReport:
        if opts.family is not None:  # nothing to embed, but the family given now is recorded
            store.set_family(ws, key, opts.family)
        return EmbedReport(key.model, key.dataset, key.condition, 0, total, 0.0, cached=True)

    sel = _selection(ws, key, opts)
    if not sel.todo:
        return cached(sel.total)
    with store.embedding_lock(ws, key, opts.shard) as lock_fd:
        sel = _selection(ws, key, opts)  # under the lock: what another run finished is not redone
        if not sel.todo:
            return cached(sel.total)
        return _embed_pending(ws, key, opts, sel, extractor, lock_fd)


def _embed_pending(ws: Workspace, key: RunKey, opts: EmbedOptions, sel: store.Selection, extractor,
                   lock_fd: int) -> EmbedReport:
    from vlmindex.overlay import OverlayRecipe

    todo = sel.todo
    recipe = OverlayRecipe.from_json(sel.recipe) if sel.recipe is not None else None
    if opts.engine not in ("local", "ray"):
        raise VlmindexError(f"--engine {opts.engine!r} is not local or ray")
    # With Ray the replicas run the model; the driver's copy (on the CPU) gives the preprocessing,
    # the weights checksum and the dimension that the parts record.
    device = "cpu" if opts.engine == "ray" else auto_device(opts.device)
    if extractor is None:
        extractor = replace(opts.load, device=device).load(key.model)
    store.check_resumable(ws, key, extractor.weights_sha256, extractor.dim)
    if device.startswith("cuda") and extractor.dtype != torch.float16:
        extractor = extractor.to(device, half=True)
    if opts.engine == "ray":
        from vlmindex.ray_engine import ray_batches

        workers = 0
        source, engine_meta = ray_batches(todo, key.model, opts, extractor, sel.recipe, sel.pools)
        device = engine_meta["device"]
    else:
        workers = opts.num_workers if opts.num_workers is not None else min(os.cpu_count() or 1, 8)
        loader = DataLoader(
            ImageSource(todo, extractor.preprocess, recipe, sel.pools),
            batch_size=opts.batch_size, num_workers=workers, collate_fn=_collate,
            worker_init_fn=functools.partial(_worker_init, lock_fd) if workers else None,
            prefetch_factor=4 if workers else None, pin_memory=device.startswith("cuda"),
        )
        source, engine_meta = _local_batches(loader, extractor, device), {"engine": "local"}
    pixels_of = {p.image_id: p.pixels for p in todo}
    paths = {p.image_id: p.path for p in todo}
    started, t0 = datetime.now(), time.perf_counter()
    run_meta = {
        "run_id": uuid.uuid4().hex, "split": opts.split,
        "shard": f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else None, "dtype": opts.dtype, "device": device,
        "batch_size": opts.batch_size, "num_workers": workers, "preprocessing": extractor.preprocess_config,
        "versions": library_versions(), "weights_sha256": extractor.weights_sha256,
        "started_at": started.isoformat(timespec="seconds"), "dim": extractor.dim,
        "family": opts.family or extractor.spec.family, **engine_meta,
    }
    buf_ids: list[np.ndarray] = []
    buf_vecs: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    counts = {"embedded": 0, "changed": 0, "duplicates": 0}
    embedded_ids: list[int] = []
    zero: list[int] = []

    def flush(final: bool = False) -> None:
        nonlocal buf_ids, buf_vecs
        if buf_ids:
            # empty the buffer first: a Ctrl-C during the write must not make `finally` write it twice
            ids_, vecs_ = np.concatenate(buf_ids), np.concatenate(buf_vecs)
            buf_ids, buf_vecs = [], []
            run_meta["dim"] = int(vecs_.shape[1])
            try:
                commit = store.commit_part(
                    ws, key, image_ids=ids_, pixels=[pixels_of[int(i)] for i in ids_], vectors=vecs_,
                    dtype=opts.dtype, tag=f"s{opts.shard[0]}of{opts.shard[1]}-" if opts.shard else "",
                    run=dict(run_meta, seconds=round(time.perf_counter() - t0, 3)),
                    wait=FINAL_COMMIT_WAIT if final else PART_COMMIT_WAIT)
            except WorkspaceBusy:
                if final:
                    raise
                # A long writer (an ingest) holds the workspace: keep the vectors, retry at the next part.
                buf_ids, buf_vecs = [ids_], [vecs_]
                return
            counts["embedded"] += commit.written
            embedded_ids.extend(commit.ids.tolist())
            counts["changed"] += commit.changed
            counts["duplicates"] += commit.duplicates

    bar = tqdm(total=len(todo), desc=f"embed {key}", unit="img", disable=not opts.progress, dynamic_ncols=True)
    try:
        for ids, vecs, failed in source:
            failures.extend(failed)
            bar.update(len(failed))
            if len(ids) == 0:
                continue
            zero += ids[unusable_rows(vecs)].tolist()
            buf_ids.append(ids)
            buf_vecs.append(vecs)
            bar.update(len(vecs))
            if sum(len(b) for b in buf_ids) >= opts.part_size:
                flush()
    finally:
        try:
            flush(final=True)  # on Ctrl-C too: finished embeddings are kept
        finally:
            bar.close()
            close = getattr(source, "close", None)
            if close is not None:  # now, not when the generator is collected: Ray's shutdown is in it
                close()
    seconds = time.perf_counter() - t0
    stored = set(embedded_ids)
    zero = [i for i in zero if i in stored]  # a zero vector another process committed first is its to report
    total = store.current_count(ws, key, split=opts.split, shard=opts.shard)
    report = EmbedReport(key.model, key.dataset, key.condition, counts["embedded"], total, seconds,
                         failed=len(failures), zero=len(zero), changed=counts["changed"],
                         duplicates=counts["duplicates"], first_failure=failures[0][1] if failures else None)
    row = {**run_meta, "model": key.model, "dataset": key.dataset, "condition": key.condition,
           "n": report.embedded, "total": report.total, "seconds": report.seconds,
           "images_per_s": report.images_per_s, "started_at": started, "finished_at": datetime.now(),
           "recorded_from": "embed"}
    skips = [store.Failure(i, paths[i], f"embed {key.model}: {err}", pixels_of[i]) for i, err in failures]
    skips += [store.Failure(i, paths[i], f"embed {key.model}: the embedding is all zeros or not finite "
                            "(a uniform image?); left out of analyses", pixels_of[i]) for i in zero]
    if report.embedded or skips:
        try:
            store.record_run(ws, key, row if report.embedded else None, skips, [paths[i] for i in embedded_ids])
        except (WorkspaceBusy, duckdb.Error, OSError) as exc:
            # The embeddings are safe in their parts, which carry this provenance too: the next
            # embed of this run records the missing row from them.
            warnings.warn(f"embeddings written, but the run could not be recorded in `runs` "
                          f"({' '.join(str(exc).split())}); the next `vlmindex embed` of this run records it",
                          stacklevel=2)
    return report


def _local_batches(loader: DataLoader, extractor, device: str) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
    """The local engine: (ids, vectors, failures) per DataLoader batch, the model in this process."""
    with torch.inference_mode():
        for batch_ids, batch, failed in loader:
            if batch is None:
                yield np.empty(0, np.int64), np.empty((0, extractor.dim), np.float32), failed
                continue
            vecs = extractor.encode_image(batch.to(device, non_blocking=True)).float().cpu().numpy()
            yield batch_ids.numpy(), vecs, failed


def _record_missing_runs(ws: Workspace, key: RunKey) -> None:
    try:
        store.record_missing_runs(ws, key)
    except (WorkspaceBusy, duckdb.Error, OSError) as exc:
        warnings.warn(f"could not record earlier runs of {key} in `runs`: {' '.join(str(exc).split())}",
                      stacklevel=3)
