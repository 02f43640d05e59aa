"""What is on this machine: weight files in folders and in the Hugging Face cache.

Kept free of torch, open_clip and transformers imports so ``vlmindex models`` answers quickly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmindex.errors import VlmindexError
from vlmindex.models import hub
from vlmindex.models.registry import ModelSpec

OPEN_CLIP_CONFIG = "open_clip_config.json"
# the names open_clip itself looks for in a folder, safetensors first (no pickle involved)
OPEN_CLIP_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
# what open_clip downloads from a hub repository (the safetensors variant first)
HUB_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_WEIGHTS = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)


# -- open_clip -----------------------------------------------------------------------------------


def find_open_clip_weights(folder: Path) -> Path | None:
    """The weights file open_clip would pick in ``folder``: known names first, safetensors preferred."""
    for name in OPEN_CLIP_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def read_open_clip_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmindexError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise VlmindexError(f"{path} has no 'model_cfg'; it is not an open_clip model config")
    return cfg


def text_tower_repo(cfg: dict[str, Any]) -> str | None:
    """The Hugging Face model an open_clip config builds its text tower from (BiomedCLIP's PubMedBERT)."""
    text_cfg = cfg.get("model_cfg", cfg).get("text_cfg", {})
    name = text_cfg.get("hf_model_name")
    return name if name and not os.path.isdir(name) else None


def cached_hub_files(repo: str) -> tuple[Path | None, Path | None]:
    """Cached ``open_clip_config.json`` and weights of an open_clip hub repository."""
    cfg = hub.cached_file(repo, OPEN_CLIP_CONFIG)
    return cfg, cached_repo_weights(repo, "")


def cached_repo_weights(repo: str, filename: str) -> Path | None:
    """Cached weights of an open_clip download: ``filename`` (or the default names), safetensors first."""
    names = [filename] if filename else list(HUB_WEIGHT_NAMES)
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return next((p for n in names if (p := hub.cached_file(repo, n)) is not None), None)


def cached_tag_weights(tag_cfg: dict[str, Any]) -> Path | None:
    """Cached weights of an open_clip pretrained tag (its ``hf_hub`` entry, else the legacy URL cache)."""
    hub_id = tag_cfg.get("hf_hub", "")
    if hub_id:
        # open_clip's convention: "org/repo/" means the default file names, "org/repo/file" one file
        repo, filename = os.path.split(hub_id)
        found = cached_repo_weights(repo, filename)
        if found is not None:
            return found
    url = tag_cfg.get("url", "")
    if url:
        legacy = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if legacy.is_file():
            return legacy
    return None


def _open_clip_available(spec: ModelSpec) -> bool:
    if spec.scheme == "local-dir":
        folder = Path(spec.location)
        return (folder / OPEN_CLIP_CONFIG).is_file() and find_open_clip_weights(folder) is not None
    if spec.scheme == "hf-hub":
        cfg, weights = cached_hub_files(spec.location)
        if cfg is None or weights is None:
            return False
        repo = text_tower_repo(read_open_clip_config(cfg))
        return repo is None or hub.cached_file(repo, "config.json") is not None
    if spec.scheme == "open_clip" and spec.arch and spec.pretrained:
        if spec.weights_repo:  # registry entries name it, which spares importing open_clip
            return cached_repo_weights(spec.weights_repo, "") is not None
        import open_clip

        return cached_tag_weights(open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)) is not None
    return False


# -- transformers --------------------------------------------------------------------------------


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` would read in ``folder`` (safetensors first); [] if incomplete."""
    for name, sharded in _HF_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if not sharded:
            return [path]
        try:
            with open(path, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return []
        files = [folder / s for s in shards]
        return files if all(f.is_file() for f in files) else []
    return []


def remote_modules(config: dict[str, Any]) -> list[str]:
    """The ``.py`` files a config's ``auto_map`` would import."""
    refs: list[str] = []
    for value in (config.get("auto_map") or {}).values():
        refs.extend(v for v in (value if isinstance(value, list) else [value]) if v)
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise VlmindexError(f"{folder} has no config.json; it is not a transformers model folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmindexError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise VlmindexError(f"{path} is not a JSON object")
    return cfg


def cached_hf_folder(repo: str, *, with_code: bool) -> Path | None:
    """The cache snapshot of a transformers repository when config and weights (and code) are all there."""
    cfg_path = hub.cached_file(repo, "config.json")
    if cfg_path is None:
        return None
    folder = cfg_path.parent
    if not hf_weight_files(folder):
        return None
    if with_code and any(not (folder / f).is_file() for f in remote_modules(read_hf_config(folder))):
        return None
    return folder


def _hf_available(spec: ModelSpec) -> bool:
    if spec.scheme == "local-dir":
        folder = Path(spec.location)
        return (folder / "config.json").is_file() and bool(hf_weight_files(folder))
    if spec.scheme == "hf":
        return cached_hf_folder(spec.location, with_code=spec.remote_code) is not None
    return False


def is_available(spec: ModelSpec) -> bool:
    """True when the model loads without a download: offline extractors always, others when cached."""
    if spec.loader == "offline":
        return True
    try:
        return _open_clip_available(spec) if spec.loader == "open_clip" else _hf_available(spec)
    except VlmindexError:
        return False
