"""Dataset adapters, one module per on-disk format. See ``base`` for the contract."""

from __future__ import annotations

import importlib

from vlmindex.datasets.base import Adapter, Candidate, IngestOptions, Skip
from vlmindex.errors import VlmindexError

FORMATS = {
    "imagefolder": "vlmindex.datasets.imagefolder",
    "csv": "vlmindex.datasets.csv_manifest",
    "medmnist": "vlmindex.datasets.medmnist",
    "dicom": "vlmindex.datasets.dicom",
}

__all__ = ["FORMATS", "Adapter", "Candidate", "IngestOptions", "Skip", "get_adapter"]


def get_adapter(fmt: str) -> Adapter:
    if fmt not in FORMATS:
        raise VlmindexError(f"unknown dataset format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt]).scan
