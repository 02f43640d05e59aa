"""Nearest neighbours of query images (files inside or outside the catalog) in a built index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmindex.catalog import RunKey, Workspace
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog.embeddings import newest_weights
from vlmindex.catalog.parts import unusable_rows
from vlmindex.errors import VlmindexError
from vlmindex.imageio import load_image
from vlmindex.index import load_index, search
from vlmindex.models import LoadOptions


def embed_files(extractor, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """Embed image files with the extractor's own preprocessing (the one the index was built with)."""
    images = []
    for p in paths:
        try:
            images.append(load_image(p))
        except FileNotFoundError:
            raise VlmindexError(f"query image {p} does not exist") from None
        except Exception as exc:  # noqa: BLE001 - any decode failure is the user's file
            raise VlmindexError(f"cannot read query image {p}: {exc}") from None
    return embed_images(extractor, images, batch_size)


def embed_images(extractor, images: list, batch_size: int = 32) -> np.ndarray:
    """Embed decoded RGB images with the extractor's own preprocessing."""
    tensors = [extractor.preprocess(img) for img in images]
    out = []
    with torch.inference_mode():
        for i in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[i:i + batch_size]).to(extractor.device)
            out.append(extractor.encode_image(batch).float().cpu().numpy())
    return np.concatenate(out)


def check_weights(extractor, key: RunKey, indexed_with: str | None) -> None:
    """Refuse to compare a query embedded with other weights than those that embedded the run."""
    if indexed_with and extractor.weights_sha256 != indexed_with:
        raise VlmindexError(
            f"the weights loaded for {key.model!r} (sha256 {str(extractor.weights_sha256)[:12]}…) are not those "
            f"that embedded {key.dataset}/{key.condition} ({indexed_with[:12]}…); pass the --checkpoint the index "
            "was built from")


def require_rankable(vectors: np.ndarray, model: str, names: list[str]) -> None:
    """Refuse query embeddings that are all zeros or not finite (:func:`unusable_rows`): every
    gallery image scores the same against them, so their 'neighbours' would be whatever the tie
    rule puts first."""
    bad = np.flatnonzero(unusable_rows(vectors))
    if len(bad):
        raise VlmindexError(f"model {model!r} embeds {names[int(bad[0])]} as all zeros or not finite (a uniform "
                            "image?), so no image is nearer to it than another; ask another model")


def query(ws: Workspace, images: list[Path], model: str, dataset: str, condition: str = "clean", *,
          k: int = 10, checkpoint: str | None = None, trust_remote_code: bool = False,
          device: str | None = None, load: LoadOptions | None = None) -> list[dict[str, Any]]:
    """Rows ``query, model, rank, image_id, path, label, score`` for each query image's top ``k``."""
    from vlmindex.models import get_spec

    if k < 1:
        raise VlmindexError(f"-k must be at least 1, got {k}")
    load = load or LoadOptions(checkpoint=checkpoint, trust_remote_code=trust_remote_code, device=device)
    with ws.read(views=False) as con:
        catalog_datasets.require_dataset(con, dataset)
    get_spec(model)
    index, info = load_index(ws, model, dataset, condition)
    extractor = load.load(model)
    check_weights(extractor, RunKey(model, dataset, condition), newest_weights(ws, RunKey(model, dataset, condition)))
    vectors = embed_files(extractor, [Path(p) for p in images])
    if vectors.shape[1] != info.dim:
        raise VlmindexError(
            f"model {model!r} gives {vectors.shape[1]}-d embeddings but the index of "
            f"{dataset}/{condition} holds {info.dim}-d ones; rebuild it with `vlmindex embed` "
            "and `vlmindex index build`, or query with the model it was built from"
        )
    require_rankable(vectors, model, [str(p) for p in images])
    scores, ids = search(index, vectors, k, gpu=True)
    found = sorted({int(i) for i in ids.ravel() if i >= 0})
    with ws.read(views=False) as con:
        meta = catalog_datasets.images_by_id(con, found, ("path", "label"))
    rows = []
    for q, (qscores, qids) in enumerate(zip(scores, ids, strict=True)):
        for rank, (s, i) in enumerate(zip(qscores, qids, strict=True), start=1):
            if i < 0:
                continue
            path, label = meta.get(int(i), (None, None))
            rows.append({"query": str(images[q]), "model": model, "rank": rank, "image_id": int(i), "path": path,
                         "label": label, "score": round(float(s), 6)})
    return rows
