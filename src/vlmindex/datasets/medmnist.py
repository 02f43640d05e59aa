"""MedMNIST v2 ``.npz`` files (``{train,val,test}_{images,labels}``), any image size.

Every image is written as a PNG to ``out_dir/<split>/<index>.png`` so later stages read all
formats the same way; ``source_path`` keeps ``file.npz#train[12]``. Arrays are streamed from the
archive one image at a time, so a 224-px file (several GB of pixels) needs no more memory than one
image. Label names are the official MedMNIST v2 ones (``medmnist.INFO[flavour]["label"]``).

A split whose arrays disagree (label count, shape, an unreadable member) is recorded as one skip,
``file.npz#val``, and the other splits are still ingested; a label that names no class (NaN, a
fraction, out of range) skips only its row, ``file.npz#val[3]``.
"""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from collections.abc import Iterator
from math import prod
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npformat
from PIL import Image

from vlmindex.datasets.base import Candidate, IngestOptions, Skip, write_png_if_changed
from vlmindex.errors import VlmindexError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

_ORGAN = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
          "lung-left", "lung-right", "pancreas", "spleen"]

# Official MedMNIST v2 label dictionaries (medmnist/info.py), index -> name.
LABELS: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                   "melanocytic nevi", "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],          # diabetic retinopathy grade (ordinal)
    "breastmnist": ["malignant", "normal, benign"],    # 0 is malignant: normal and benign merged
    "bloodmnist": ["basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                    "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"],
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}

MODALITY = {
    "pathmnist": "pathology", "dermamnist": "dermoscopy", "octmnist": "oct",
    "pneumoniamnist": "xray", "chestmnist": "xray", "retinamnist": "fundus",
    "breastmnist": "ultrasound", "bloodmnist": "microscopy", "tissuemnist": "microscopy",
    "organamnist": "ct", "organcmnist": "ct", "organsmnist": "ct",
}

MULTI_LABEL = {"chestmnist": 14}


def flavour_of(source: Path, options: IngestOptions) -> str | None:
    """``--flavour``, else the name before the size suffix: ``dermamnist_224.npz`` -> dermamnist."""
    if options.flavour:
        return options.flavour.strip().lower()
    m = re.match(r"^([a-z]+mnist(?:3d)?)", source.stem.lower())
    return m.group(1) if m else None


def _open_npy(zf: zipfile.ZipFile, member: str) -> tuple[IO[bytes], tuple[int, ...], np.dtype, bool]:
    fh = zf.open(member)
    version = npformat.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = npformat.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = npformat.read_array_header_2_0(fh)
    return fh, shape, dtype, fortran


def _iter_images(zf: zipfile.ZipFile, member: str) -> Iterator[np.ndarray]:
    """Yield the array's rows one at a time, reading only one row's bytes from the archive."""
    fh, shape, dtype, fortran = _open_npy(zf, member)
    if fortran:  # rows are not contiguous on disk: read the whole array instead
        fh.close()
        with zf.open(member) as whole:
            yield from npformat.read_array(whole)
        return
    with fh:
        row_shape = shape[1:]
        nbytes = prod(row_shape) * dtype.itemsize
        for _ in range(shape[0]):
            buf = fh.read(nbytes)
            if len(buf) < nbytes:
                raise EOFError(f"{member} ends early")
            yield np.frombuffer(buf, dtype=dtype).reshape(row_shape)


def _to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(np.ascontiguousarray(arr), "L" if arr.ndim == 2 else "RGB")


# What reading a damaged or foreign member can raise: numpy's header parser (ValueError), zipfile's
# CRC check (BadZipFile), the inflater (zlib.error), a short member (EOFError).
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _split_labels(zf: zipfile.ZipFile, members: set[str], split: str, source: Path) -> np.ndarray | str:
    """The split's labels (one per image) once its two arrays agree, else why the split is unusable.

    Only headers and the (small) label array are read, so a split is rejected before any of its
    PNGs is written. A multi-label array is a property of the whole file and raises instead.
    """
    images, labels_m = f"{split}_images.npy", f"{split}_labels.npy"
    for have, lack in ((images, labels_m), (labels_m, images)):
        if have in members and lack not in members:
            return f"{have} has no {lack} beside it"
    try:
        fh, shape, dtype, _ = _open_npy(zf, images)
        with fh:
            header_end = fh.tell()
    except _READ_ERRORS as exc:
        return f"unreadable {images}: {_msg(exc)}"
    ok_shape = len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))
    if not ok_shape or not all(shape[1:]):
        return f"{images} has shape {shape}; expected (N, H, W) or (N, H, W, 3) (3-D volumes are not supported)"
    if dtype != np.uint8:
        return f"{images} is {dtype}, expected uint8 as MedMNIST ships"
    expected = header_end + prod(shape) * dtype.itemsize
    if zf.getinfo(images).file_size < expected:
        return f"{images} holds {zf.getinfo(images).file_size} bytes, its header promises {expected}"
    try:
        with zf.open(labels_m) as lf:
            labels = np.asarray(npformat.read_array(lf))   # allow_pickle=False: data, never code
    except _READ_ERRORS as exc:
        return f"unreadable {labels_m}: {_msg(exc)}"
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise VlmindexError(
            f"{source.name} is multi-label ({labels.shape[1]} labels per image, e.g. ChestMNIST); "
            "vlmindex needs one class per image: pick a single-label MedMNIST flavour"
        )
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        return f"{labels_m} has shape {labels.shape}; expected (N,) or (N, 1)"
    if labels.dtype.kind not in "biuf":
        return f"{labels_m} holds {labels.dtype} values, not class numbers"
    labels = labels.reshape(-1)
    if labels.shape[0] != shape[0]:
        return f"{labels_m} has {labels.shape[0]} labels for {shape[0]} images"
    return labels


def _msg(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def scan(source: Path, options: IngestOptions, out_dir: Path) -> Iterator[Candidate | Skip]:
    """Convert every image of a MedMNIST ``.npz`` to PNG and yield it with its label and split."""
    if source.is_dir():
        raise VlmindexError(f"{source} is a folder; --format medmnist expects one .npz file")
    flavour = flavour_of(source, options)
    if flavour in MULTI_LABEL:
        raise VlmindexError(
            f"{flavour} is multi-label ({MULTI_LABEL[flavour]} findings per image); vlmindex needs "
            "one class per image: pick a single-label MedMNIST flavour"
        )
    if flavour and flavour.endswith("3d"):
        raise VlmindexError(f"{flavour} holds 3-D volumes; vlmindex ingests 2-D images only")
    names = LABELS.get(flavour or "")
    if names is None:
        what = f"unknown MedMNIST flavour {flavour!r}" if flavour else (
            f"cannot tell the MedMNIST flavour from the name {source.name!r}")
        note = (f"{what}: labels are kept as integers; "
                f"pass --flavour (one of {', '.join(sorted(LABELS))}) for class names")
        log.warning(note)
        options.extra["note"] = note
    modality = options.modality or MODALITY.get(flavour or "")
    source_abs = source.resolve()
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise VlmindexError(f"{source} is not a readable .npz archive ({exc}); download it again") from None
    with zf:
        members = set(zf.namelist())
        present = [s for s in SPLITS if f"{s}_images.npy" in members or f"{s}_labels.npy" in members]
        if not present:
            raise VlmindexError(
                f"{source} has no train/val/test _images and _labels arrays; is it a MedMNIST file?"
            )
        # Every split is checked before the first PNG is written: a multi-label array found in the
        # last split must not leave the first split's PNGs behind.
        checked = [_split_labels(zf, members, split, source) for split in present]
        for split, labels in zip(present, checked, strict=True):
            if isinstance(labels, str):
                yield Skip(f"{source_abs}#{split}", f"{labels}; the whole {split} split is skipped: "
                                                     "repair the file or download it again")
                continue
            images = _iter_images(zf, f"{split}_images.npy")
            try:
                yield from _convert(images, labels, split, names, flavour, modality, source_abs, out_dir)
            except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                # Found only while inflating; earlier rows of the split are already out, so the
                # whole ingest stops and its transaction rolls back.
                raise VlmindexError(
                    f"{source} is damaged ({split}_images: {exc}); download the .npz again"
                ) from None


def _class_index(y: np.generic, names: list[str] | None, flavour: str | None) -> tuple[int | None, str]:
    """The class number of one label, or (None, why) for a label no class can be read from."""
    if isinstance(y, np.floating):
        if np.isnan(y):
            return None, "label is NaN (no class)"
        if not np.isfinite(y) or y != np.round(y):
            return None, f"label {float(y):g} is not an integer class number"
    v = int(y)
    if names is not None and not 0 <= v < len(names):
        return None, f"label {v} is not a {flavour} class (0..{len(names) - 1})"
    if v < 0:
        return None, f"label {v} is not a class number (0 or more)"
    return v, ""


def _convert(images: Iterator[np.ndarray], labels: np.ndarray, split: str, names: list[str] | None,
             flavour: str | None, modality: str | None, source_abs: Path,
             out_dir: Path) -> Iterator[Candidate | Skip]:
    for i, (arr, y) in enumerate(zip(images, labels, strict=True)):
        where = f"{source_abs}#{split}[{i}]"
        cls, why = _class_index(y, names, flavour)
        if cls is None:
            yield Skip(where, why)
            continue
        path = out_dir / split / f"{i}.png"
        write_png_if_changed(_to_pil(arr), path)
        yield Candidate(
            path=path,
            key=f"{split}/{i}",
            label=names[cls] if names is not None else str(cls),
            split=split,
            modality=modality,
            source_path=where,
        )
