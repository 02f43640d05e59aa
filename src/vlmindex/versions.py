"""Library versions recorded with every number, so a result can be traced to its software."""

from __future__ import annotations

import platform
from importlib import metadata

DISTRIBUTIONS = ("vlmindex", "torch", "open_clip_torch", "transformers", "faiss-cpu", "numpy",
                 "scikit-learn", "duckdb", "pillow")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
