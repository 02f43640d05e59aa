"""Embeddings in and out: analyse vectors computed elsewhere, or take ours to another tool.

Exchange format (as the ``embeddings`` view): Parquet with an ``image_id`` or ``path`` column and
an ``embedding`` list column; or an NPY matrix plus an id file (one image_id or path per line, or
an NPY of ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmindex.catalog import RunKey, Workspace
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog import embeddings as store
from vlmindex.catalog.parts import write_table_atomic
from vlmindex.errors import VlmindexError
from vlmindex.models.registry import check_family
from vlmindex.overlay import get_condition


def _read_keys(path: Path) -> list[str]:
    if path.suffix == ".npy":
        return [str(x) for x in np.load(path, allow_pickle=False).tolist()]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _resolve_ids(con, dataset: str, keys: list, by_path: bool, source: Path) -> np.ndarray:
    if by_path:
        exact: dict[str, int] = {}
        by_name: dict[str, set[int]] = {}
        for image_id, path, src in catalog_datasets.images(con, dataset, columns=("image_id", "path", "source_path")):
            for key in (path, src):
                if key:
                    exact.setdefault(str(key), image_id)
            by_name.setdefault(Path(path).name, set()).add(image_id)
        out = []
        for key in keys:
            key = str(key)
            hit = exact.get(key, exact.get(str(Path(key).resolve())))
            if hit is None:
                # a bare file name is only safe when one image has it (MedMNIST has train/0.png and test/0.png)
                named = by_name.get(Path(key).name, set())
                if len(named) > 1:
                    raise VlmindexError(
                        f"{source}: path {key!r} matches {len(named)} images of {dataset!r} by file name; "
                        "give full paths (as in `vlmindex embeddings export`) or image_id"
                    )
                hit = next(iter(named), None)
            if hit is None:
                raise VlmindexError(f"{source}: path {key!r} is not an image of dataset {dataset!r}")
            out.append(hit)
        return np.asarray(out, dtype=np.int64)
    ids = np.asarray([int(k) for k in keys], dtype=np.int64)
    known = {r[0] for r in catalog_datasets.images(con, dataset, columns=("image_id",))}
    missing = [int(i) for i in ids if int(i) not in known]
    if missing:
        raise VlmindexError(
            f"{source}: {len(missing)} image_id(s) are not in dataset {dataset!r} (first: {missing[0]})"
        )
    return ids


def import_embeddings(ws: Workspace, model: str, dataset: str, file: Path, *, condition: str = "clean",
                      ids_file: Path | None = None, dtype: str = "float32", family: str | None = None) -> int:
    """Store embeddings from ``file`` as model ``model``'s run; replaces an earlier import.

    ``family`` (one of :data:`vlmindex.models.FAMILIES`) is stored with the run: what kind of
    model made the vectors, which ``vlmindex findings`` needs and cannot read from them."""
    check_family(family)
    file = Path(file)
    if not file.exists():
        raise VlmindexError(f"embeddings file {file} does not exist")
    if file.suffix == ".npy":
        if ids_file is None:
            raise VlmindexError(f"{file}: an NPY matrix needs --ids FILE (one image_id or path per line)")
        matrix = np.load(file, allow_pickle=False)
        keys: list = _read_keys(Path(ids_file))
        by_path = not all(k.lstrip("-").isdigit() for k in keys)
    else:
        try:
            table = pq.read_table(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise VlmindexError(f"cannot read {file} as Parquet: {exc}") from None
        if "embedding" not in table.column_names:
            have = ", ".join(table.column_names)
            raise VlmindexError(f"{file} has no 'embedding' column (columns: {have})")
        key_col = "image_id" if "image_id" in table.column_names else "path"
        if key_col not in table.column_names:
            raise VlmindexError(f"{file} needs an 'image_id' or a 'path' column")
        keys = table[key_col].to_pylist()
        by_path = key_col == "path"
        matrix = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    if matrix.ndim != 2 or len(matrix) != len(keys):
        raise VlmindexError(f"{file}: {len(keys)} ids but an embedding matrix of shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise VlmindexError(f"{file}: embeddings contain NaN or infinite values")
    key = RunKey(model, dataset, condition)
    with ws.read(views=False) as con:
        catalog_datasets.require_dataset(con, dataset)
        get_condition(con, dataset, condition)
        ids = _resolve_ids(con, dataset, keys, by_path, file)
        pixels = store.pixels_of(con, key, ids)  # the pixels these vectors stand for, checked again at commit
    if len(np.unique(ids)) != len(ids):
        raise VlmindexError(f"{file}: some images appear more than once")
    store.import_run(ws, key, image_ids=ids, vectors=matrix, dtype=dtype, source=str(file.resolve()),
                     pixels=pixels, family=family)
    return len(ids)


def export_embeddings(ws: Workspace, model: str, dataset: str, out: Path, *, condition: str = "clean") -> int:
    """Write a run's current embeddings to ``out``: ``.parquet`` (image_id, path, label, embedding) or
    ``.npy`` (plus ``<out>.ids.txt``)."""
    run = store.read_run(ws, RunKey(model, dataset, condition))
    ids, matrix = run.ids, run.vectors
    if len(ids) == 0:
        raise store.no_embeddings(ws, RunKey(model, dataset, condition))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        tmp = out.with_name(f".{out.name}.tmp.npy")
        np.save(tmp, matrix)
        tmp.replace(out)
        Path(f"{out}.ids.txt").write_text("\n".join(str(i) for i in ids) + "\n")
        return len(ids)
    with ws.read(views=False) as con:
        meta = catalog_datasets.images_by_id(con, ids.tolist(), ("path", "label"))
    dim = matrix.shape[1]
    table = pa.table({
        "image_id": pa.array(ids),
        "path": pa.array([meta.get(int(i), (None, None))[0] for i in ids], pa.string()),
        "label": pa.array([meta.get(int(i), (None, None))[1] for i in ids], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim),
    })
    write_table_atomic(table, out)
    return len(ids)
