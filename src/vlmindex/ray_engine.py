"""The Ray engine of ``vlmindex embed --engine ray``: Ray Data tasks decode, an actor pool embeds.

The driver (the ``embed`` process) reads the selection from the catalog as the local engine does
and turns it into a Ray Dataset of (image_id, path, checksum, label, modality) rows. Decoding,
the checksum check, the overlay and the model's preprocessing run in Ray tasks
(``map_batches`` of :func:`preprocess_batch`); the model runs in an actor pool of replicas
(``map_batches`` of :class:`Replica` with ``concurrency=R``), each loading the model once. The
embedded batches stream back to the driver, which writes them through the same
``commit_part`` as the local engine: the Parquet parts, resume, shards, ``index`` and ``analyze``
cannot tell the engines apart, and a driver killed midway leaves only whole parts, so the next
run embeds exactly the rest.

With no ``--ray-address`` a local Ray is started for the run (all cores, no GPU needed) and shut
down after it; with one, the run joins that cluster. Ray is the optional extra ``vlmindex[ray]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from vlmindex.catalog import embeddings as store
from vlmindex.errors import VlmindexError

__all__ = ["Replica", "preprocess_batch", "ray_batches"]


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is in the extra, not in every Ray install
    except ImportError:
        raise VlmindexError("--engine ray needs Ray Data: pip install 'vlmindex[ray]'") from None
    return ray


def preprocess_batch(batch: dict[str, np.ndarray], *, preprocess: Any, recipe_json: str | None,
                     pools: dict[str | None, list[str]], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One Ray task's batch: decode, verify, overlay and preprocess every row (failures kept per row)."""
    from vlmindex.embed import ImageSource
    from vlmindex.overlay import OverlayRecipe

    recipe = OverlayRecipe.from_json(recipe_json) if recipe_json is not None else None
    rows = [store.PendingImage(int(i), str(p), _none(lab), _none(mod), str(sha), "")
            for i, p, lab, mod, sha in zip(batch["image_id"], batch["path"], batch["label"], batch["modality"],
                                           batch["sha256"], strict=True)]
    source = ImageSource(rows, preprocess, recipe, pools)
    n = len(rows)
    pixels = np.zeros((n, *shape), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        _, tensor, err = source[i]
        if err is None:
            pixels[i] = tensor.numpy()
            ok[i] = True
        else:
            errors[i] = err
    return {"image_id": np.asarray(batch["image_id"], dtype=np.int64), "pixels": pixels, "ok": ok, "error": errors}


class Replica:
    """One model replica of the actor pool: loads the model once, embeds the batches it is given."""

    def __init__(self, model: str, load: Any, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.extractor = load.load(model)
        if device.startswith("cuda"):
            self.extractor = self.extractor.to(device, half=True)
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = batch["ok"]
        vectors = np.zeros((len(ok), self.extractor.dim), dtype=np.float32)
        if ok.any():
            with torch.inference_mode():
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device)
                vectors[ok] = self.extractor.encode_image(pixels).float().cpu().numpy()
        return {"image_id": batch["image_id"], "ok": ok, "error": batch["error"], "embedding": vectors}


def _none(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _sample_shape(extractor: Any) -> tuple[int, ...]:
    """The shape of one preprocessed image (every image of a model has it: the local engine stacks them)."""
    from PIL import Image

    return tuple(extractor.preprocess(Image.new("RGB", (64, 64))).shape)


def ray_batches(todo: list[store.PendingImage], model: str, opts: Any, extractor: Any, recipe_json: str | None,
                pools: dict[str | None, list[str]]) -> tuple[Iterator[tuple[np.ndarray, np.ndarray, list]],
                                                             dict[str, Any]]:
    """The Ray engine's (ids, vectors, failures) batches for ``todo``, and what the run records of it.

    Replicas: ``opts.replicas``, else one per ``opts.gpus_per_replica`` GPUs of the cluster when
    GPUs are asked for, else one replica with a torch thread per CPU of the cluster. Each replica
    loads the model with ``opts.load``, on ``cuda`` when it reserves a GPU.
    """
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if opts.ray_address:
                ray.init(address=opts.ray_address, log_to_driver=False)
            else:
                # "local": a new Ray for this run, never one that some other program started.
                ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=0 if not opts.gpus_per_replica else None,
                         include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - Ray's own errors are many and multi-line
            where = opts.ray_address or "a local Ray"
            raise VlmindexError(f"cannot start or join {where}: {' '.join(str(exc).split())[:300]}") from None
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = float(opts.gpus_per_replica or 0.0)
    if opts.replicas is not None:
        replicas = int(opts.replicas)
    elif gpus > 0:
        replicas = max(1, int(resources.get("GPU", 0) // gpus))
    else:
        replicas = 1
    device = "cuda" if gpus > 0 else "cpu"
    # CPU replicas share the cores with the decoding tasks (Ray often fuses both into the replica's
    # process): each takes its share of torch threads and reserves one CPU.
    threads = max(1, cpus // replicas) if gpus == 0 else 1
    meta = {"engine": "ray", "ray_address": opts.ray_address or "local", "replicas": replicas,
            "gpus_per_replica": gpus, "device": device}
    shape = _sample_shape(extractor)
    load = opts.load
    if device == "cpu":
        from dataclasses import replace

        load = replace(load, device="cpu")

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run's own bar counts the images
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
        try:
            items = [{"image_id": p.image_id, "path": p.path, "sha256": p.sha256, "label": p.label,
                      "modality": p.modality} for p in todo]
            blocks = max(1, min(len(items), 4 * cpus, -(-len(items) // opts.batch_size)))
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            ds = ds.map_batches(preprocess_batch, fn_kwargs=dict(preprocess=extractor.preprocess,
                                                                 recipe_json=recipe_json, pools=pools, shape=shape),
                                batch_size=opts.batch_size, batch_format="numpy", num_cpus=1)
            ds = ds.map_batches(Replica, fn_constructor_kwargs=dict(model=model, load=load, device=device,
                                                                    threads=threads),
                                batch_size=opts.batch_size, batch_format="numpy", concurrency=replicas,
                                num_gpus=gpus, num_cpus=0 if gpus else 1)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                ok = np.asarray(batch["ok"], dtype=bool)
                ids = np.asarray(batch["image_id"], dtype=np.int64)
                failed = [(int(i), str(e)) for i, e in zip(ids[~ok], batch["error"][~ok], strict=True)]
                yield ids[ok], np.asarray(batch["embedding"], dtype=np.float32)[ok], failed
        finally:
            if started_here:
                ray.shutdown()

    return batches(), meta
