"""DICOM folders, converted to 8-bit PNGs in ``out_dir`` as a viewer would display them.

Greyscale: the Modality LUT or rescale (CT in Hounsfield units) is applied, then the VOI LUT or
window stored in the file, and the result is mapped onto 0..255 over the VOI output range; with no
VOI the image's own min..max is used. MONOCHROME1 (white = low) is inverted. RGB and YBR keep their
colour (YBR converted to RGB), PALETTE COLOR goes through its lookup table, multi-frame files give
their middle frame.

Labels come from class folders (``[split/]class/file``, as ``imagefolder``) or from ``--labels``, a
CSV with path and label columns (paths relative to SOURCE; a bare file name also matches). The group
is the PatientID, the modality the Modality tag as a name (CR -> xray), unless ``--group-regex`` /
``--modality`` say otherwise. Files that are not DICOM or hold no pixel data are recorded as skipped.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vlmindex.datasets.base import Candidate, IngestOptions, Skip, normalise_split, write_png_if_changed
from vlmindex.datasets.imagefolder import folder_label_split, walk_files
from vlmindex.errors import VlmindexError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class NotUsable(Exception):
    """A file this adapter cannot turn into an image; the message is the skip reason."""


# DICOM Modality codes -> the lower-case names the other formats use, so one SQL slice
# (`WHERE modality = 'xray'`) covers a DICOM set and a MedMNIST one alike. Other codes stay as
# given, lower-cased.
MODALITY_NAMES = {
    "CR": "xray", "DX": "xray", "RG": "xray", "US": "ultrasound", "MG": "mammography",
    "CT": "ct", "MR": "mri", "PT": "pet", "NM": "nuclear", "XA": "angiography", "OP": "fundus",
    "SM": "pathology", "OCT": "oct",
}


def modality_name(code: object) -> str | None:
    """The modality name for a DICOM Modality code (``CR`` -> ``xray``); None when absent."""
    text = str(code or "").strip().upper()
    if not text:
        return None
    return MODALITY_NAMES.get(text, text.lower())


def read_dicom(path: Path) -> Dataset:
    """Parse ``path``; NotUsable when it is not DICOM or holds no pixel data."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        # Old archives write files without the 128-byte preamble; accept those only when a forced
        # parse finds an image or a SOP Class UID, so a text file is not mistaken for DICOM.
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # noqa: BLE001 - any parser failure on a forced read means "not DICOM"
            raise NotUsable("not a DICOM file") from None
        has_image = any(t in ds for t in PIXEL_TAGS) and "Rows" in ds
        if not (has_image or "SOPClassUID" in ds):
            raise NotUsable("not a DICOM file") from None
    except Exception as exc:  # noqa: BLE001 - a damaged header must not stop the ingest
        raise NotUsable(f"unreadable DICOM: {_msg(exc)}") from None
    _fill_transfer_syntax(ds)
    if not any(t in ds for t in PIXEL_TAGS):
        kind = ds.get("Modality") or ds.get("SOPClassUID", "")
        raise NotUsable(f"DICOM without pixel data ({kind})" if kind else "DICOM without pixel data")
    return ds


def _fill_transfer_syntax(ds: Dataset) -> None:
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.file_meta:
        return
    # Files without a file meta header: the parser has already worked out the encoding.
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _msg(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """The range ``apply_voi_lut`` maps onto (PS3.3 C.11.2), or None when the file has no VOI."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return y_min, y_max


def to_image(ds: Dataset) -> Image.Image:
    """The displayed image of a DICOM dataset as 8-bit greyscale ('L') or RGB."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    frames = int(ds.get("NumberOfFrames") or 1)
    arr = pixel_array(ds, index=frames // 2 if frames > 1 else None)  # YBR arrives as RGB
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        if rgb.dtype != np.uint8:  # 16-bit palette entries
            rgb = _scale(rgb, 0, 65535)
        return Image.fromarray(rgb, "RGB")
    if arr.ndim == 3:
        if arr.shape[-1] != 3:
            raise NotUsable(f"unsupported pixel layout {arr.shape} ({photometric})")
        if arr.dtype != np.uint8:
            bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
            arr = _scale(arr, 0, 2**bits - 1)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    values = apply_modality_lut(arr, ds)
    span = None
    try:
        span = _voi_output_range(ds)
        if span is not None:
            values = apply_voi_lut(values, ds, index=0)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        span = None  # malformed window tags: fall back to the image's own range
        values = apply_modality_lut(arr, ds)
    lo, hi = span if span is not None else (float(np.min(values)), float(np.max(values)))
    out = _scale(values, lo, hi)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, "L")


def _read_labels(csv_path: Path, source: Path,
                 options: IngestOptions) -> dict[str, tuple[str | None, str | None]]:
    """``--labels`` CSV as {relative path or file name: (label, split)}."""
    if not csv_path.is_file():
        raise VlmindexError(f"labels file {csv_path} does not exist; give a CSV with path,label columns")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        path_col, label_col = options.path_col or "path", options.label_col or "label"
        split_col = options.split_col or ("split" if "split" in header else None)
        for col in (path_col, label_col, split_col):
            if col is not None and col not in header:
                raise VlmindexError(
                    f"labels file {csv_path} has no column {col!r} (columns: {', '.join(header)}); "
                    "it needs path and label columns (or name them with --path-col/--label-col)"
                )
        by_rel: dict[str, tuple[str | None, str | None]] = {}
        by_name: dict[str, list[tuple[str | None, str | None]]] = {}
        for row in reader:
            raw = (row.get(path_col) or "").strip()
            if not raw:
                continue
            p = Path(raw)
            if p.is_absolute():
                try:
                    raw = p.resolve().relative_to(source.resolve()).as_posix()
                except ValueError:
                    raw = p.name
            entry = ((row.get(label_col) or "").strip() or None,
                     normalise_split(row.get(split_col)) if split_col else None)
            rel = PurePosixPath(raw.replace("\\", "/")).as_posix()
            by_rel[rel] = entry
            by_name.setdefault(PurePosixPath(rel).name, []).append(entry)
    for name, entries in by_name.items():
        if len(entries) == 1:
            by_rel.setdefault(name, entries[0])
    return by_rel


def scan(source: Path, options: IngestOptions, out_dir: Path) -> Iterator[Candidate | Skip]:
    """Convert every DICOM file under ``source`` (a folder, or one file) to PNG and yield it."""
    if source.is_file():
        files: Iterator[tuple[Path, str] | Skip] = iter([(source, source.name)])
        base = source.parent
    else:
        files = walk_files(source, options)
        base = source
    labels = _read_labels(options.labels_csv, base, options) if options.labels_csv else None
    for item in files:
        if isinstance(item, Skip):
            yield item
            continue
        path, rel = item
        try:
            ds = read_dicom(path)
            img = to_image(ds)
        except NotUsable as exc:
            yield Skip(str(path), str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - undecodable pixel data is recorded, not fatal
            yield Skip(str(path), f"cannot decode DICOM pixel data: {_msg(exc)}")
            continue
        if labels is not None:
            label, split = labels.get(rel) or labels.get(PurePosixPath(rel).name) or (None, None)
            if split is None:
                split = folder_label_split(rel)[1]
        elif source.is_file():
            label, split = None, None
        else:
            label, split = folder_label_split(rel)
        png = out_dir / f"{rel}.png"
        write_png_if_changed(img, png)
        patient = str(ds.get("PatientID") or "").strip() or None
        yield Candidate(
            path=png,
            key=rel,
            label=label,
            split=split,
            group_id=options.group_of(path.name) or patient,
            modality=options.modality or modality_name(ds.get("Modality")),
            source_path=str(path.resolve()),
        )
