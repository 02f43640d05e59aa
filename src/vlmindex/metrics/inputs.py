"""Input checks shared by the retrieval metrics and the distribution figures.

Embedding matrices, boolean row masks and label/group values are validated here and turned into
the integer codes the kernels work on; every problem a user can cause is a :class:`VlmindexError`
that names the offending row and the way out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlmindex.errors import VlmindexError

__all__ = ["as_embeddings", "as_mask", "factorize", "is_missing"]


def is_missing(value: Any) -> bool:
    """Whether a label or group value counts as absent (None or a float NaN)."""
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def factorize(values: np.ndarray, what: str, *, allow_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes into sorted unique values; missing values (None/NaN) get fresh codes when allowed."""
    if values.dtype.kind in "biuUS":
        missing = np.zeros(len(values), dtype=bool)
    elif values.dtype.kind == "f":
        missing = np.isnan(values)
    else:
        missing = np.fromiter((is_missing(v) for v in values), dtype=bool, count=len(values))
    if missing.any() and not allow_missing:
        first = int(np.flatnonzero(missing)[0])
        raise VlmindexError(
            f"{what} of row {first} is missing; give every image a {what} or filter those images out"
        )
    present = values[~missing]
    try:
        uniques, codes_present = np.unique(present, return_inverse=True)
    except TypeError as exc:
        raise VlmindexError(
            f"{what} values mix types that cannot be ordered ({exc}); convert them all to str"
        ) from None
    codes = np.empty(len(values), dtype=np.int64)
    codes[~missing] = codes_present.reshape(-1)
    # Each missing value is its own singleton (e.g. an image with no patient id shares no group).
    codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    return uniques, codes


def as_mask(mask: np.ndarray | None, n: int, what: str) -> np.ndarray:
    """A boolean row mask of length ``n`` (all True when None); anything else is a user error."""
    if mask is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (n,):
        raise VlmindexError(f"{what} must be a boolean array of length {n} (got {mask.dtype} {mask.shape})")
    return mask


def as_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """A non-empty 2-D floating array (integer input becomes float64)."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise VlmindexError(f"embeddings must be a non-empty 2-D array (got shape {x.shape})")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x
