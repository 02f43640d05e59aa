"""open_clip models: built-in architectures with a pretrained tag, hub repositories, local folders.

Weights are located first (cache, ``--checkpoint``, or a download when allowed) and then loaded with
``open_clip.load_checkpoint(..., weights_only=True)`` into a model created without weights, so the
file that is hashed is the file that is loaded and nothing is fetched behind our back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmindex.errors import VlmindexError
from vlmindex.models import hub
from vlmindex.models.availability import (
    HUB_WEIGHT_NAMES,
    OPEN_CLIP_CONFIG,
    cached_hub_files,
    cached_tag_weights,
    find_open_clip_weights,
    text_tower_repo,
)
from vlmindex.models.availability import read_open_clip_config as _read_config
from vlmindex.models.extractor import (
    TorchExtractor,
    make_open_clip_preprocess,
    open_clip_preprocess_config,
)
from vlmindex.models.registry import ModelSpec

CONFIG_NAME = OPEN_CLIP_CONFIG


class OpenClipExtractor(TorchExtractor):
    """``model.encode_image`` of an open_clip model; text through open_clip's tokenizer for the model."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, *, tokenizer_name: str, **kw: Any) -> None:
        super().__init__(spec, model, **kw)
        self._tokenizer_name = tokenizer_name
        self._tokenizer: Any = None

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            import open_clip

            try:
                with hub.hub_offline() if hub.is_offline() else contextlib.nullcontext():
                    self._tokenizer = open_clip.get_tokenizer(
                        self._tokenizer_name, cache_dir=str(hub.hf_cache_dir())
                    )
            except Exception as exc:  # noqa: BLE001 - tokenizers fail in many library-specific ways
                raise VlmindexError(
                    hub.one_line(
                        f"cannot load the tokenizer of '{self.name}' ({self._tokenizer_name}): {exc}"
                    )
                ) from None
        tokens = self._tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly": weights load right after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _tag_cfg(arch: str, tag: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise VlmindexError(f"open_clip has no pretrained tag '{tag}' for {arch}")
    return cfg


# -- loading -------------------------------------------------------------------------------------


def load(spec: ModelSpec, *, checkpoint: str | os.PathLike[str] | None, device: str) -> OpenClipExtractor:
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            return _from_folder(spec, path, find_open_clip_weights(path), device)
        weights = path if path.is_file() else find_open_clip_weights(path) if path.is_dir() else None
        if weights is None:
            raise VlmindexError(
                f"--checkpoint {path}: no {CONFIG_NAME} and no weights file (*.safetensors, *.bin, *.pt)"
            )
        if not spec.arch:
            raise VlmindexError(
                f"--checkpoint {path}: '{spec.name}' is defined by the {CONFIG_NAME} of its repository; "
                "point --checkpoint at a folder holding that file and the weights"
            )
        return _from_arch(spec, spec.arch, spec.pretrained, weights, device)
    if spec.scheme == "local-dir":
        folder = Path(spec.location)
        return _from_folder(spec, folder, find_open_clip_weights(folder), device)
    if spec.scheme == "hf-hub":
        cfg_path, weights = _hub_files(spec)
        # open_clip reads a hub model's tokenizer from the text model its config names
        return _from_folder(spec, cfg_path.parent, weights, device, tokenizer_name=spec.source)
    if spec.scheme == "open_clip" and spec.arch and spec.pretrained:
        tag_cfg = _tag_cfg(spec.arch, spec.pretrained)
        weights = cached_tag_weights(tag_cfg)
        if weights is None:
            if not hub.download_allowed():
                raise hub.missing_error(spec.name, spec.source, gated=spec.gated)
            import open_clip

            try:
                weights = Path(open_clip.download_pretrained(tag_cfg, cache_dir=str(hub.hf_cache_dir())))
            except Exception as exc:  # noqa: BLE001 - network errors come in many types
                raise hub.missing_error(spec.name, spec.source, gated=spec.gated, detail=str(exc)) from None
        return _from_arch(spec, spec.arch, spec.pretrained, weights, device)
    if spec.scheme == "open_clip":
        raise VlmindexError(
            f"'{spec.name}' names no pretrained tag: use open_clip:{spec.arch}/TAG or pass --checkpoint FILE"
        )
    raise VlmindexError(f"'{spec.name}': cannot load an open_clip model from source '{spec.source}'")


def _hub_files(spec: ModelSpec) -> tuple[Path, Path]:
    repo = spec.location
    cfg, weights = cached_hub_files(repo)
    if cfg is not None and weights is not None:
        return cfg, weights
    if not hub.download_allowed():
        raise hub.missing_error(spec.name, spec.source, gated=spec.gated)
    try:
        cfg = cfg or hub.download_file(repo, CONFIG_NAME)
        if weights is None:
            last: Exception | None = None
            for name in HUB_WEIGHT_NAMES:
                try:
                    weights = hub.download_file(repo, name)
                    break
                except Exception as exc:  # noqa: BLE001 - the safetensors file may simply not exist
                    last = exc
            if weights is None:
                raise last or VlmindexError("no weights file")
    except Exception as exc:  # noqa: BLE001
        raise hub.missing_error(spec.name, spec.source, gated=spec.gated, detail=str(exc)) from None
    return cfg, weights


def _from_folder(
    spec: ModelSpec, folder: Path, weights: Path | None, device: str, *, tokenizer_name: str | None = None
) -> OpenClipExtractor:
    import open_clip

    cfg_path = folder / CONFIG_NAME
    cfg = _read_config(cfg_path)
    if weights is None:
        raise VlmindexError(f"{folder}: {CONFIG_NAME} found but no weights file next to it")
    text_repo = text_tower_repo(cfg)
    offline_ok = text_repo is None or hub.cached_file(text_repo, "config.json") is not None
    if not offline_ok and not hub.download_allowed():
        raise hub.missing_error(
            spec.name,
            spec.source,
            gated=spec.gated,
            detail=f"its text tower needs {text_repo}, not cached either",
        )
    try:
        with hub.hub_offline() if offline_ok else contextlib.nullcontext(), _quiet():
            model = open_clip.create_model(
                f"local-dir:{folder}",
                load_weights=False,
                pretrained_text=False,
                pretrained_image=False,
                weights_only=True,
            )
        open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
    except VlmindexError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any library failure as one line
        raise VlmindexError(hub.one_line(f"cannot load '{spec.name}' from {folder}: {exc}")) from None
    pp = open_clip.get_model_preprocess_cfg(model)
    tokenizer_name = tokenizer_name or f"local-dir:{folder}"  # tokenizer files sit next to the weights
    return _extractor(spec, model, cfg["model_cfg"], pp, str(cfg_path), weights, device, tokenizer_name)


def _from_arch(spec: ModelSpec, arch: str, tag: str | None, weights: Path, device: str) -> OpenClipExtractor:
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    tag_cfg = _tag_cfg(arch, tag) if tag else {}
    try:
        with hub.hub_offline(), _quiet():
            model = open_clip.create_model(
                arch,
                pretrained=None,
                load_weights=False,
                pretrained_text=False,
                pretrained_image=False,
                weights_only=True,
            )
        open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise VlmindexError(
            hub.one_line(f"cannot load '{spec.name}' ({arch}) from {weights}: {exc}")
        ) from None
    # the tag carries the normalisation the weights were trained with; the size comes from the model
    pp = merge_preprocess_dict(open_clip.get_model_preprocess_cfg(model), tag_cfg)
    open_clip.set_model_preprocess_cfg(model, pp)
    model_cfg = open_clip.get_model_config(arch) or {}
    source = f"open_clip pretrained tag {arch}/{tag}" if tag else f"open_clip defaults for {arch}"
    return _extractor(spec, model, model_cfg, pp, source, weights, device, arch)


def _extractor(
    spec: ModelSpec,
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    pp: dict[str, Any],
    source: str,
    weights: Path,
    device: str,
    tokenizer_name: str,
) -> OpenClipExtractor:
    size = pp.get("size")
    dim = int(model_cfg.get("embed_dim") or 0)
    if not dim:
        raise VlmindexError(f"'{spec.name}': the open_clip config has no embed_dim")
    actual = dataclasses.replace(
        spec,
        image_size=size if isinstance(size, int) else (size[0] if size and size[0] == size[1] else None),
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        interpolation=pp.get("interpolation"),
        resize_mode=pp.get("resize_mode"),
        embed_dim=dim,
        checkpoint=str(weights),
    )
    return OpenClipExtractor(
        actual,
        model,
        tokenizer_name=tokenizer_name,
        dim=dim,
        preprocess=make_open_clip_preprocess(pp),
        preprocess_config=open_clip_preprocess_config(pp, source),
        device=device,
        weights_files=[str(weights)],
        name=spec.name,
    )
