"""What a dataset adapter yields: candidate images with their metadata, or files it had to skip.

An adapter is a function ``scan(source, options, out_dir) -> Iterator[Candidate | Skip]``. It
finds files and reads metadata; the ingest driver (``vlmindex.ingest``) decodes each candidate,
records width, height and sha256, and turns anything unreadable into a ``Skip`` with its reason.
Adapters that convert (MedMNIST arrays, DICOM) write PNGs into ``out_dir`` and point the
candidate's ``path`` at them, keeping the original in ``source_path``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


@dataclass
class Candidate:
    path: Path                    # the file later stages read
    key: str                      # stable identity inside the dataset (usually the relative path)
    label: str | None
    split: str | None = None
    group_id: str | None = None   # None: the image is its own group
    modality: str | None = None
    source_path: str | None = None


@dataclass
class Skip:
    path: str
    reason: str


@dataclass
class IngestOptions:
    """Every adapter's options in one object (CLI flags map onto these one to one)."""

    exclude: tuple[str, ...] = ()          # glob patterns over the relative path or file name
    group_regex: str | None = None         # first capture group of a match on the file name
    modality: str | None = None            # one modality for the whole dataset
    follow_symlinks: bool = False          # folder symlinks leaving SOURCE (imagefolder, dicom)
    # csv manifests
    path_col: str | None = None
    label_col: str | None = None
    split_col: str | None = None
    group_col: str | None = None
    modality_col: str | None = None
    image_root: Path | None = None         # where manifest paths are relative to
    extension: str | None = None           # appended to ids without one (ISIC, HAM10000: .jpg)
    # medmnist
    flavour: str | None = None             # dermamnist, breastmnist, ... (default: from file name)
    # dicom
    labels_csv: Path | None = None         # path,label CSV instead of class folders
    extra: dict[str, str] = field(default_factory=dict)

    def group_of(self, name: str) -> str | None:
        """The group id a ``--group-regex`` derives from a file name, or None when it does not match."""
        if not self.group_regex:
            return None
        m = re.search(self.group_regex, name)
        if not m:
            return None
        return m.group(1) if m.groups() else m.group(0)


def normalise_split(value: str | None) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    return SPLIT_ALIASES.get(value.lower(), value.lower())


Adapter = Callable[[Path, IngestOptions, Path], Iterator[Candidate | Skip]]


def write_png_if_changed(img: Image.Image, path: Path) -> bool:
    """Write ``img`` as PNG unless ``path`` already holds exactly those bytes; True when written.

    Converting adapters (MedMNIST, DICOM) run again on every re-ingest: leaving identical files
    alone keeps their mtimes, so nothing downstream mistakes a re-ingest for new images.
    """
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)  # same encoder settings as imageio.save_png
    data = buf.getvalue()
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except OSError:
        pass
    # Rename into place (no fsync, like imageio.save_png): a killed run leaves no half file, and
    # syncing every one of 100k small PNGs would dominate the ingest.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True
