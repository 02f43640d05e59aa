"""``load_model``: resolve a name to a spec, find its weights, and build an :class:`Extractor`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlmindex.errors import VlmindexError
from vlmindex.models.availability import is_available
from vlmindex.models.registry import get_spec

if TYPE_CHECKING:
    from vlmindex.models.extractor import Extractor

__all__ = ["LoadOptions", "auto_device", "is_available", "load_model"]


def auto_device(device: str | None) -> str:
    """``device``, else ``cuda`` when a GPU is present, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded, with one meaning in every command that loads one
    (``--checkpoint``, ``--trust-remote-code``, ``--device``)."""

    checkpoint: str | None = None      # a local folder (or open_clip weights file) instead of the cache
    trust_remote_code: bool = False    # allow code shipped with the weights to run (LLM2CLIP)
    device: str | None = None          # None: cuda when present, else cpu

    def load(self, name: str) -> Extractor:
        return load_model(name, checkpoint=self.checkpoint, trust_remote_code=self.trust_remote_code,
                          device=auto_device(self.device))


def load_model(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> Extractor:
    """Load a named model, a generic form (``open_clip:``, ``hf-hub:``, ``hf:``, ``local-dir:``) or a folder.

    ``checkpoint`` replaces the download: a folder in the model's own layout (or, for open_clip
    architectures, a weights file). Code shipped with weights runs only with ``trust_remote_code``.
    Offline, a model that is not cached raises a one-line :class:`VlmindexError` saying how to get it.
    """
    spec = get_spec(name)
    if checkpoint is not None and not Path(checkpoint).expanduser().exists():
        raise VlmindexError(
            f"--checkpoint {checkpoint} does not exist; give the folder (or file) with the weights"
        )
    if spec.loader == "offline":
        if checkpoint is not None:
            raise VlmindexError(
                f"'{spec.name}' is a built-in baseline with no weights to load; drop --checkpoint"
            )
        from vlmindex.models.offline import load_offline

        extractor = load_offline(spec)
    elif spec.loader == "open_clip":
        from vlmindex.models import open_clip_loader

        extractor = open_clip_loader.load(spec, checkpoint=checkpoint, device="cpu")
    else:
        from vlmindex.models import hf_loader

        extractor = hf_loader.load(
            spec, checkpoint=checkpoint, trust_remote_code=trust_remote_code, device="cpu"
        )
    extractor.name = name.strip()
    return extractor.to(device) if device != "cpu" else extractor
