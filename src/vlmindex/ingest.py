"""Ingestion: run an adapter, check every candidate image, and record it (or why not) in the catalog.

Bad input never stops an ingest: a file that cannot be decoded becomes a row in ``skipped`` with
its reason, so SQL can see exactly what a study left out.
"""

from __future__ import annotations

import filecmp
import hashlib
import io
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from vlmindex.catalog import Workspace, dependencies
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog.workspace import transaction, write_wait
from vlmindex.datasets import Adapter, Candidate, IngestOptions, Skip, get_adapter
from vlmindex.errors import VlmindexError
from vlmindex.imageio import pixels_sha256, to_rgb

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BATCH = 256


@dataclass
class IngestReport:
    dataset: str
    ingested: int      # images added or refreshed by this run
    skipped: int       # files recorded in `skipped` by this run
    total: int         # images of the dataset in the catalog afterwards

    def summary(self) -> str:
        line = (f"ingested {self.ingested} images into {self.dataset!r} ({self.total} in total), "
                f"skipped {self.skipped}")
        if self.skipped:
            line += ("; see them with: vlmindex sql "
                     f"\"SELECT * FROM skipped WHERE dataset = '{self.dataset}'\"")
        return line


def image_id_for(dataset: str, key: str) -> int:
    """A stable positive 63-bit id from (dataset, key): the same file re-ingested keeps its id."""
    digest = hashlib.sha1(f"{dataset}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_name(name: str, what: str = "dataset") -> str:
    if not NAME_RE.match(name):
        raise VlmindexError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), "
            "starting with a letter or digit"
        )
    return name


def _inspect(cand: Candidate) -> tuple[Candidate, int, int, str, str] | Skip:
    """Fully decode one candidate: (candidate, width, height, file sha256, pixel sha256), or a
    Skip with the reason when it cannot be used.

    The file is read once; both hashes and the decode come from those bytes, so the pixel hash
    belongs to the file hash recorded beside it.
    """
    path = cand.path
    try:
        if not path.exists():
            return Skip(str(path), "file not found")
        if path.stat().st_size == 0:
            return Skip(str(path), "zero-byte file")
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
            # What load_image gives every later stage (EXIF rotation, 8-bit RGB); also proves the
            # mode converts (CMYK, palette, 16-bit).
            rgb = to_rgb(ImageOps.exif_transpose(img))
            # A uniform image has no gradients: HOG embeds it as a zero vector, which no cosine
            # similarity survives. getextrema is one C pass per band; it runs inside the `with`
            # because to_rgb of an RGB file is the opened image itself.
            blank = all(lo == hi for lo, hi in rgb.getextrema())
            pixels = pixels_sha256(rgb)
        if blank:
            return Skip(str(path), "blank image: every pixel has the same value")
        return cand, width, height, hashlib.sha256(data).hexdigest(), pixels
    except UnidentifiedImageError:
        return Skip(str(path), "not an image file PIL can read")
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        kind = "truncated image" if "truncated" in reason.lower() else "corrupt image"
        return Skip(str(path), f"{kind}: {reason}")
    except Image.DecompressionBombError as exc:
        return Skip(str(path), f"image too large: {exc}")
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one odd file must not end the ingest
        return Skip(str(path), f"cannot read image: {type(exc).__name__}: {exc}")


def ingest(
    ws: Workspace,
    name: str,
    source: str | os.PathLike[str],
    fmt: str,
    options: IngestOptions | None = None,
    *,
    replace: bool = False,
    progress: bool = True,
    scan: Adapter | None = None,
) -> IngestReport:
    """Ingest ``source`` as dataset ``name``. Idempotent: re-ingesting adds only what is new.

    ``scan`` overrides the adapter of ``fmt`` (the synthetic set uses its own manifest). An ingest
    that fails, or that finds no usable image for a new dataset, leaves no dataset behind (the
    files it could not use stay listed in ``skipped``).
    """
    check_name(name)
    options = options or IngestOptions()
    source = Path(source).expanduser()
    if scan is None:
        if not source.exists():
            raise VlmindexError(f"source {source} does not exist; give the folder or file to ingest")
        scan = get_adapter(fmt)
    now = datetime.now()
    out_dir = ws.images_dir(name)
    with ws.write(wait=write_wait()) as con:
        existing = catalog_datasets.dataset_record(con, name)
        if existing and existing["format"] != fmt and not replace:
            raise VlmindexError(
                f"dataset {name!r} was ingested as {existing['format']!r}, not {fmt!r}; "
                "pick another name or pass --replace"
            )
        if existing and existing["source"] != str(source.resolve()) and not replace:
            # Keys are relative paths: another source would overwrite images that merely share a name.
            raise VlmindexError(
                f"dataset {name!r} was ingested from {existing['source']}, not {source.resolve()}; "
                "pick another name or pass --replace"
            )
        # Converted images (MedMNIST, DICOM, synth) are written to a staging folder and moved into
        # the workspace only once the catalog has accepted them, while the lock is held: an ingest
        # that fails or is refused leaves the images every other process reads as they were.
        staging = out_dir.with_name(f".{out_dir.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)  # a crashed ingest's: we hold the lock
        staging.mkdir(parents=True)
        stale: list[Path] = []
        try:
            # One transaction: an ingest that fails half-way (a damaged archive, Ctrl-C) leaves the
            # catalog as it was, rather than a --replace that has dropped the old rows and added few.
            with transaction(con):
                if replace:  # the pixels may change: nothing computed from the old ones survives
                    stale = dependencies.drop_rows(con, ws, name)
                ingested, skips = _ingest_rows(con, name, source, options, scan, staging, out_dir, replace,
                                               progress, now)
                keep = existing is not None or ingested > 0
                total = 0
                if keep:
                    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
                    total = catalog_datasets.upsert_dataset(con, name=name, fmt=fmt, source=str(source.resolve()),
                                                            options=opts, n_skipped=len(skips), now=now)
                    _publish(staging, out_dir, replace=replace)
                catalog_datasets.record_skips(con, name, skips, stage="ingest", now=now)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        dependencies.remove_files(stale)
    return IngestReport(name, ingested, len(skips), total)


def _publish(staging: Path, out_dir: Path, *, replace: bool) -> None:
    """Move the converted images of an accepted ingest into the workspace (under the lock, before
    the catalog commits; a failed commit then leaves files whose checksums the catalog refuses,
    never silently different pixels). ``replace`` swaps the whole folder; otherwise files are
    merged, identical ones left alone."""
    if replace:
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        if any(staging.iterdir()):
            staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = out_dir / path.relative_to(staging)
        if target.is_file() and filecmp.cmp(path, target, shallow=False):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _ingest_rows(con: Any, name: str, source: Path, options: IngestOptions, scan: Adapter, staging: Path,
                 out_dir: Path, replace: bool, progress: bool, now: datetime) -> tuple[int, list[tuple[str, str]]]:
    catalog_datasets.clear_dataset(con, name, images=replace)
    ingested = 0
    rows: list[dict] = []
    skips: list[tuple[str, str]] = []
    seen: dict[int, str | None] = {}   # image_id -> label of the row that claimed it
    bar = tqdm(desc=f"ingest {name}", unit="img", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for result in pool.map(_inspect_or_pass, scan(source, options, staging)):
            bar.update(1)
            if not isinstance(result, Skip):
                cand = result[0]
                image_id = image_id_for(name, cand.key)
                if image_id in seen:
                    # Two rows for one key (a manifest listing a file twice) would fight over one
                    # image_id; keep the first and say so, and whether they disagree on the class.
                    first = seen[image_id]
                    if first == cand.label:
                        why = f"duplicate entry: {cand.key!r} was already listed"
                    else:
                        a, b = (repr(x) if x is not None else "no label" for x in (first, cand.label))
                        why = f"duplicate entry: {cand.key!r} is listed twice, as {a} and {b}; keep one row"
                    result = Skip(str(cand.path), why)
                else:
                    seen[image_id] = cand.label
            if isinstance(result, Skip):
                skips.append((result.path, result.reason))
                continue
            cand, width, height, sha, pixels = result
            rows.append(_row(name, cand, width, height, sha, pixels, options, now, staging, out_dir))
            ingested += 1
            if len(rows) >= BATCH:
                catalog_datasets.insert_images(con, rows)
                rows = []
    bar.close()
    catalog_datasets.insert_images(con, rows)
    return ingested, skips


def _inspect_or_pass(item: Candidate | Skip) -> tuple[Candidate, int, int, str, str] | Skip:
    return item if isinstance(item, Skip) else _inspect(item)


def _row(name: str, cand: Candidate, width: int, height: int, sha: str, pixels: str, options: IngestOptions,
         now: datetime, staging: Path, out_dir: Path) -> dict:
    image_id = image_id_for(name, cand.key)
    path = Path(cand.path)
    if path.is_relative_to(staging):  # a converted image: recorded where it will be once published
        path = out_dir / path.relative_to(staging)
    return {
        "image_id": image_id,
        "dataset": name,
        "path": str(path.resolve()),
        "source_path": cand.source_path,
        "label": cand.label,
        "split": cand.split,
        "group_id": cand.group_id or cand.key,
        "modality": cand.modality or options.modality,
        "width": width,
        "height": height,
        "sha256": sha,
        "ingested_at": now,
        "pixel_sha256": pixels,
    }


def ingest_synthetic(
    ws: Workspace, name: str, *, seed: int = 0, replace: bool = False, progress: bool = True,
    **generate_kwargs: int,
) -> IngestReport:
    """Generate the synthetic lesion set into the workspace and ingest it as ``name``."""
    from vlmindex import synth

    check_name(name)
    out_dir = ws.images_dir(name)
    with ws.read(views=False) as con:
        record = catalog_datasets.dataset_record(con, name)
    params = {"seed": seed, **generate_kwargs}
    if record and not replace:
        before = record["options"].get("extra", {}).get("synth")
        if before is not None and json.loads(before) != params:
            raise VlmindexError(
                f"dataset {name!r} was generated with {before}; pass --replace to regenerate it "
                "with other settings, or choose another name"
            )
    def scan(_source: Path, _options: IngestOptions, staging: Path):
        # Generated under the ingest's lock into its staging folder, published with its rows.
        manifest = synth.generate(staging, seed=seed, progress=progress, **generate_kwargs)
        for item in manifest:
            yield Candidate(path=staging / item.relpath, key=item.relpath, label=item.label,
                            split=item.split, group_id=item.group_id, modality=item.modality)

    options = IngestOptions(extra={"synth": json.dumps(params, sort_keys=True)})
    return ingest(ws, name, out_dir, "synth", options, replace=replace, progress=progress, scan=scan)
