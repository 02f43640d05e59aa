"""The model zoo: a registry of named models kept as data, a loader per kind of checkpoint, and offline baselines.

Importing this package is cheap (no torch); :class:`Extractor` and the loaders import torch when used.

>>> from vlmindex.models import load_model
>>> ex = load_model("raw-pixels")
>>> ex.dim
3072
"""

from typing import TYPE_CHECKING, Any

from vlmindex.models.loader import LoadOptions, auto_device, is_available, load_model
from vlmindex.models.registry import FAMILIES, GENERIC_FORMS, LOADERS, ModelSpec, check_family, get_spec, list_specs

if TYPE_CHECKING:
    from vlmindex.models.extractor import Extractor

__all__ = [
    "FAMILIES",
    "GENERIC_FORMS",
    "LOADERS",
    "Extractor",
    "LoadOptions",
    "ModelSpec",
    "auto_device",
    "check_family",
    "get_spec",
    "is_available",
    "list_specs",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name == "Extractor":
        from vlmindex.models.extractor import Extractor

        return Extractor
    raise AttributeError(f"module 'vlmindex.models' has no attribute {name!r}")
