"""Batched, resumable, shardable embedding runs: reader → model → Parquet writer.

Images are decoded, overlaid (for a text condition) and preprocessed in DataLoader worker
processes while the model runs in the main process. Parts are written every ``part_size`` images,
atomically, so a run killed at any point resumes from what is on disk and ends with exactly one
embedding per image. ``--shard i/n`` takes the images with ``image_id % n == i``: disjoint, and
together the whole dataset, because image ids are uniform hashes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlmindex import store
from vlmindex.catalog import class_pools, require_dataset
from vlmindex.errors import VlmindexError, WorkspaceBusy
from vlmindex.imageio import load_image
from vlmindex.versions import library_versions
from vlmindex.workspace import Workspace


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


@dataclass
class EmbedReport:
    model: str
    dataset: str
    condition: str
    embedded: int
    total: int            # images of the selection with an embedding afterwards
    seconds: float
    cached: bool = False
    failed: int = 0

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
    """The reader: one (image_id, tensor) per catalog row, overlay applied before preprocessing."""

    def __init__(self, rows: list[tuple[int, str, str | None, str | None]], preprocess, recipe=None,
                 pools: dict[str | None, list[str]] | None = None) -> None:
        self.rows, self.preprocess, self.recipe, self.pools = rows, preprocess, recipe, pools or {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        image_id, path, label, modality = self.rows[i]
        try:
            img = load_image(path)
            if self.recipe is not None:
                from vlmindex.overlay import apply_overlay

                img = apply_overlay(img, self.recipe, image_id=image_id, label=label,
                                    class_names=self.pools.get(modality, []))
            return image_id, self.preprocess(img), None
        except Exception as exc:  # noqa: BLE001 - recorded per image, never silently dropped
            return image_id, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    ok = [(i, t) for i, t, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    ids = torch.tensor([i for i, _ in ok], dtype=torch.int64)
    batch = torch.stack([t for _, t in ok]) if ok else None
    return ids, batch, failed


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model for cores


def select_images(ws: Workspace, dataset: str, condition: str, split: str | None):
    """Catalog rows ``(image_id, path, label, modality)`` of a dataset (and split), the recipe and
    the class names per modality (the pools a wrong-label overlay draws from)."""
    from vlmindex.overlay import get_condition

    with ws.read() as con:
        require_dataset(con, dataset)
        recipe = get_condition(con, dataset, condition)
        pools = class_pools(con, dataset)
        sql = "SELECT image_id, path, label, modality FROM images WHERE dataset = ?"
        args: list[Any] = [dataset]
        if split:
            sql += " AND split = ?"
            args.append(split)
        rows = con.execute(sql + " ORDER BY image_id", args).fetchall()
    if not rows:
        where = f" split {split!r} of" if split else ""
        raise VlmindexError(f"no images in{where} dataset {dataset!r}")
    return rows, recipe, pools


def auto_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _selection(ws: Workspace, model: str, dataset: str, condition: str, opts: EmbedOptions):
    """The run's rows (split and shard applied), which of them lack an embedding, recipe and pools."""
    rows, recipe, pools = select_images(ws, dataset, condition, opts.split)
    if opts.shard:
        i, n = opts.shard
        rows = [r for r in rows if r[0] % n == i]
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    done = np.isin(ids, store.stored_ids(ws.embeddings_dir(model, dataset, condition)))
    pending = [r for r, is_done in zip(rows, done, strict=True) if not is_done]
    return rows, ids, pending, recipe, pools


def pending_count(ws: Workspace, model: str, dataset: str, condition: str = "clean",
                  options: EmbedOptions | None = None) -> int:
    """How many images of the selection still need an embedding (0: the run is complete)."""
    return len(_selection(ws, model, dataset, condition, options or EmbedOptions())[2])


def embed(ws: Workspace, model: str, dataset: str, condition: str = "clean",
          options: EmbedOptions | None = None, *, extractor=None) -> EmbedReport:
    """Embed every image of ``dataset`` under ``condition`` that has no embedding yet.

    ``extractor`` reuses a loaded model across runs (the study runner loads each model once).
    """
    from vlmindex.models import get_spec, load_model

    opts = options or EmbedOptions()
    get_spec(model)  # an unknown name fails before any work
    out_dir = ws.embeddings_dir(model, dataset, condition)
    store.remove_stale_temporaries(out_dir)
    rows, ids, pending, recipe, pools = _selection(ws, model, dataset, condition, opts)
    if not pending:
        return EmbedReport(model, dataset, condition, 0, len(rows), 0.0, cached=True)

    device = auto_device(opts.device)
    if extractor is None:
        extractor = load_model(model, checkpoint=opts.checkpoint,
                               trust_remote_code=opts.trust_remote_code, device=device)
    if len(pending) < len(rows):
        _check_same_weights(ws, model, dataset, condition, extractor.weights_sha256)
    if device.startswith("cuda") and extractor.dtype != torch.float16:
        extractor = extractor.to(device, half=True)
    workers = opts.num_workers if opts.num_workers is not None else min(os.cpu_count() or 1, 8)
    loader = DataLoader(
        ImageSource(pending, extractor.preprocess, recipe, pools),
        batch_size=opts.batch_size, num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None, pin_memory=device.startswith("cuda"),
    )
    shard_tag = f"s{opts.shard[0]}of{opts.shard[1]}-" if opts.shard else ""
    started, t0 = datetime.now(), time.perf_counter()
    buf_ids: list[np.ndarray] = []
    buf_vecs: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    embedded = 0
    dim = extractor.dim

    def flush() -> None:
        nonlocal buf_ids, buf_vecs
        if buf_ids:
            # empty the buffer first: a Ctrl-C during the write must not make `finally` write it twice
            ids_, vecs_ = np.concatenate(buf_ids), np.concatenate(buf_vecs)
            buf_ids, buf_vecs = [], []
            store.write_part(out_dir, model=model, dataset=dataset, condition=condition,
                             image_ids=ids_, embeddings=vecs_, dtype=opts.dtype, tag=shard_tag)

    bar = tqdm(total=len(pending), desc=f"embed {model} {dataset}/{condition}", unit="img",
               disable=not opts.progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for batch_ids, batch, failed in loader:
                failures.extend(failed)
                bar.update(len(failed))
                if batch is None:
                    continue
                feats = extractor.encode_image(batch.to(device, non_blocking=True))
                vecs = feats.float().cpu().numpy()
                dim = vecs.shape[1]
                buf_ids.append(batch_ids.numpy())
                buf_vecs.append(vecs)
                embedded += len(vecs)
                bar.update(len(vecs))
                if sum(len(b) for b in buf_ids) >= opts.part_size:
                    flush()
    finally:
        flush()  # on Ctrl-C too: finished embeddings are kept
        bar.close()
    seconds = time.perf_counter() - t0
    total = int(np.isin(ids, store.stored_ids(out_dir)).sum())
    report = EmbedReport(model, dataset, condition, embedded, total, seconds, failed=len(failures))
    try:
        _record_run(ws, report, extractor, opts, device, dim, workers, started, failures, rows)
    except WorkspaceBusy as exc:  # the embeddings are safe on disk; only the log entry is missing
        warnings.warn(f"embeddings written, but the run could not be recorded in `runs`: {exc}", stacklevel=2)
    return report


def _check_same_weights(ws: Workspace, model: str, dataset: str, condition: str, sha: str | None) -> None:
    """Refuse to resume a run with other weights: one run must hold one model's embeddings."""
    with ws.read() as con:
        row = con.execute(
            "SELECT weights_sha256 FROM runs WHERE model = ? AND dataset = ? AND condition = ? "
            "AND device <> 'import' ORDER BY finished_at DESC LIMIT 1", [model, dataset, condition]).fetchone()
    if row and row[0] != sha:
        raise VlmindexError(
            f"{model!r} on {dataset}/{condition} was embedded with other weights (sha256 {str(row[0])[:12]}…, "
            f"now {str(sha)[:12]}…); embed under another --model name, or remove "
            f"{ws.embeddings_dir(model, dataset, condition)} to start over"
        )


def _record_run(ws, report, extractor, opts, device, dim, workers, started, failures, rows) -> None:
    paths = {r[0]: r[1] for r in rows}
    with ws.write(wait=120) as con:
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                uuid.uuid4().hex, report.model, report.dataset, report.condition, opts.split,
                f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else None,
                report.embedded, report.total, dim, opts.dtype, report.seconds,
                report.images_per_s, device, opts.batch_size, workers,
                json.dumps(extractor.preprocess_config, default=str),
                json.dumps(library_versions()), extractor.weights_sha256, started, datetime.now(),
            ],
        )
        if failures:
            con.executemany(
                "INSERT INTO skipped VALUES (?, ?, ?, ?)",
                [(report.dataset, paths.get(i, str(i)), f"embed {report.model}: {err}", datetime.now())
                 for i, err in failures],
            )
