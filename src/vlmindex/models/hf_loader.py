"""transformers models: CLIP, SigLIP, any AutoModel with ``get_image_features``, and remote code (LLM2CLIP).

A model folder (cache snapshot, ``--checkpoint DIR`` or ``local-dir:``) is resolved first; its
``config.json`` decides whether the repository's own Python code would run, and that is refused
before anything is imported unless ``trust_remote_code``. Native classes load with
``trust_remote_code=False`` and ``local_files_only=True``; safetensors are used when present (the
default of ``from_pretrained``), and ``.bin`` files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmindex.errors import VlmindexError
from vlmindex.models import hub
from vlmindex.models.availability import cached_hf_folder, remote_modules
from vlmindex.models.availability import hf_weight_files as weight_files
from vlmindex.models.availability import read_hf_config as _read_config
from vlmindex.models.extractor import HFImagePreprocess, TorchExtractor, features_tensor, hf_preprocess_config
from vlmindex.models.registry import ModelSpec, _hf_config_fields

_EXPECTED_TYPE = {"hf_clip": "clip", "hf_siglip": "siglip"}
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")
_DOWNLOAD_PATTERNS = ("*.json", "model*.safetensors", "*.txt", "*.model", "*.tiktoken")


class HFExtractor(TorchExtractor):
    """``get_image_features`` of a transformers model (its projected embedding), text via its tokenizer."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, *, folder: Path, **kw: Any) -> None:
        super().__init__(spec, model, **kw)
        self.folder = folder
        self._tokenizer: Any = None

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return features_tensor(self.model.get_image_features(pixel_values=pixels))

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not any((self.folder / f).is_file() for f in _TOKENIZER_FILES):
                raise VlmindexError(
                    f"no tokenizer for '{self.name}' in {self.folder} (none of "
                    f"{', '.join(_TOKENIZER_FILES)}); save the model's tokenizer there to embed text"
                )
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.folder, local_files_only=True, trust_remote_code=False
                )
            except Exception as exc:  # noqa: BLE001
                raise VlmindexError(
                    hub.one_line(f"no usable tokenizer for '{self.name}' in {self.folder}: {exc}")
                ) from None
        tok = self._tokenizer
        max_len = tok.model_max_length if 0 < tok.model_max_length < 100_000 else 77
        enc = tok(
            texts,
            padding=self.spec.text_padding or True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        names = getattr(tok, "model_input_names", None) or list(enc.keys())
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in names}
        return features_tensor(self.model.get_text_features(**inputs))


def _needs_remote(loader: str, config: dict[str, Any]) -> bool:
    return loader in ("hf_auto", "llm2clip") and "AutoModel" in (config.get("auto_map") or {})


def _refusal(spec: ModelSpec, where: str, config: dict[str, Any] | None) -> VlmindexError:
    files = ", ".join(remote_modules(config)) if config else "the repository's .py files"
    return VlmindexError(
        f"model '{spec.name}' ({where}) runs code shipped with its weights ({files}); vlmindex loads it only "
        "with --trust-remote-code (trust_remote_code=True), after you have read that code"
    )


def _resolve_folder(spec: ModelSpec, checkpoint: str | os.PathLike[str] | None, trust: bool) -> Path:
    if checkpoint is not None:
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            raise VlmindexError(
                f"--checkpoint {folder}: '{spec.name}' is a transformers model; give the folder that holds "
                "config.json and the weights"
            )
        return folder
    if spec.scheme == "local-dir":
        return Path(spec.location)
    if spec.scheme != "hf":
        raise VlmindexError(f"'{spec.name}': cannot load a transformers model from source '{spec.source}'")
    repo = spec.location
    folder = cached_hf_folder(repo, with_code=spec.remote_code and trust)
    if folder is not None:
        return folder
    if not hub.download_allowed():
        raise hub.missing_error(spec.name, spec.source, gated=spec.gated)
    patterns = list(_DOWNLOAD_PATTERNS) + (["*.py"] if trust else [])
    try:
        folder = hub.snapshot(repo, patterns)
        if not weight_files(folder):
            folder = hub.snapshot(repo, [*patterns, "pytorch_model*.bin"])
    except Exception as exc:  # noqa: BLE001 - HTTP, gating and connection errors alike
        raise hub.missing_error(spec.name, spec.source, gated=spec.gated, detail=str(exc)) from None
    return folder


# -- loading -------------------------------------------------------------------------------------


def load(
    spec: ModelSpec,
    *,
    checkpoint: str | os.PathLike[str] | None,
    trust_remote_code: bool,
    device: str,
) -> HFExtractor:
    if spec.remote_code and not trust_remote_code and checkpoint is None and spec.scheme == "hf":
        raise _refusal(spec, spec.source, None)  # before any download
    folder = _resolve_folder(spec, checkpoint, trust_remote_code)
    config = _read_config(folder)
    loader, derived = _hf_config_fields(config)
    if spec.generic:
        spec = dataclasses.replace(spec, loader=loader, **derived)
    elif spec.loader in _EXPECTED_TYPE and config.get("model_type") != _EXPECTED_TYPE[spec.loader]:
        raise VlmindexError(
            f"{folder} holds a '{config.get('model_type')}' model, but '{spec.name}' is a "
            f"'{_EXPECTED_TYPE[spec.loader]}' model; load that folder as local-dir:{folder} instead"
        )
    remote = _needs_remote(spec.loader, config)
    if spec.loader == "llm2clip" and not remote:
        raise VlmindexError(
            f"{folder}/config.json has no auto_map for AutoModel; it is not an LLM2CLIP folder"
        )
    if remote and not trust_remote_code:
        raise _refusal(spec, str(folder), config)
    missing_code = [f for f in remote_modules(config) if not (folder / f).is_file()] if remote else []
    if missing_code:
        raise VlmindexError(
            f"{folder}: config.json names {', '.join(missing_code)}, which is not in the folder"
        )
    weights = weight_files(folder)
    if not weights:
        raise VlmindexError(
            f"{folder}: no complete weights (model.safetensors, pytorch_model.bin or their sharded index)"
        )
    model = _load_model(spec, folder, remote)
    class_name, proc_cfg, source = _image_processor(spec, folder, config)
    pre_cfg = hf_preprocess_config(class_name, proc_cfg, source)
    preprocess = HFImagePreprocess(class_name, proc_cfg)
    dim = _feature_dim(spec.loader, model, preprocess, pre_cfg)
    size = pre_cfg["image_size"]
    actual = dataclasses.replace(
        spec,
        image_size=size[0] if size and size[0] == size[1] else spec.image_size,
        mean=tuple(pre_cfg["mean"]) if pre_cfg["mean"] else None,
        std=tuple(pre_cfg["std"]) if pre_cfg["std"] else None,
        interpolation=pre_cfg["interpolation"],
        resize_mode=pre_cfg["resize_mode"],
        embed_dim=dim,
        checkpoint=str(folder),
    )
    return HFExtractor(
        actual,
        model,
        folder=folder,
        dim=dim,
        preprocess=preprocess,
        preprocess_config=pre_cfg,
        device=device,
        weights_files=[str(w) for w in weights],
        name=spec.name,
    )


def _load_model(spec: ModelSpec, folder: Path, remote: bool) -> torch.nn.Module:
    import transformers

    if spec.loader == "hf_clip":
        cls: Any = transformers.CLIPModel
    elif spec.loader == "hf_siglip":
        cls = transformers.SiglipModel
    else:
        cls = transformers.AutoModel
    try:
        with hub.hub_offline(), _no_progress_bars():
            model = cls.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=remote, dtype=torch.float32
            )
    except Exception as exc:  # noqa: BLE001 - report any library failure as one line
        raise VlmindexError(hub.one_line(f"cannot load '{spec.name}' from {folder}: {exc}")) from None
    if not hasattr(model, "get_image_features"):
        raise VlmindexError(f"'{spec.name}' ({type(model).__name__}) has no get_image_features method")
    return model


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a "Loading weights" bar per load; the embedding run draws its own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _processor_folders(spec: ModelSpec, folder: Path) -> list[Path]:
    folders = [folder]
    if spec.processor_repo:
        found = hub.cached_file(spec.processor_repo, "preprocessor_config.json")
        if found is None and hub.download_allowed():
            try:
                found = hub.download_file(spec.processor_repo, "preprocessor_config.json")
            except Exception:  # noqa: BLE001 - fall back to the registry's values below
                found = None
        if found is not None:
            folders.append(found.parent)
    return folders


def _image_processor(
    spec: ModelSpec, folder: Path, config: dict[str, Any]
) -> tuple[str, dict[str, Any], str]:
    """Class name, settings and origin of the image processor: the checkpoint's own file first."""
    import transformers

    for cand in _processor_folders(spec, folder):
        path = cand / "preprocessor_config.json"
        if path.is_file():
            try:
                proc = transformers.AutoImageProcessor.from_pretrained(
                    str(cand), local_files_only=True, trust_remote_code=False
                )
            except Exception as exc:  # noqa: BLE001
                raise VlmindexError(hub.one_line(f"cannot read the image processor {path}: {exc}")) from None
            return type(proc).__name__, _jsonable(proc.to_dict()), str(path)
    # no processor file: the model's own input size, normalisation from the registry entry
    size = (config.get("vision_config") or {}).get("image_size") or spec.image_size
    if not size or spec.mean is None or spec.std is None:
        raise VlmindexError(
            f"{folder} has no preprocessor_config.json and '{spec.name}' has no registry normalisation; "
            "save the model's image processor into the folder (processor.save_pretrained)"
        )
    resample = _RESAMPLE.get(spec.interpolation or "bicubic", 3)
    common = {"image_mean": list(spec.mean), "image_std": list(spec.std), "resample": resample}
    if spec.loader == "hf_siglip" or spec.resize_mode == "squash":
        proc = transformers.SiglipImageProcessor(size={"height": size, "width": size}, **common)
    else:
        proc = transformers.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **common
        )
    source = f"registry:{spec.name} normalisation, image size from {folder / 'config.json'}"
    return type(proc).__name__, _jsonable(proc.to_dict()), source


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(cfg, default=lambda v: int(v) if isinstance(v, int) else str(v)))


def _feature_dim(loader: str, model: torch.nn.Module, preprocess: HFImagePreprocess, pre_cfg: dict) -> int:
    cfg = model.config
    if loader == "hf_clip" and getattr(cfg, "projection_dim", None):
        return int(cfg.projection_dim)
    if loader == "hf_siglip":
        return int(cfg.vision_config.hidden_size)
    # anything else (remote code included): one forward pass on a blank image is the ground truth
    from PIL import Image

    side = pre_cfg.get("image_size") or [224, 224]
    blank = preprocess(Image.new("RGB", (side[1], side[0]))).unsqueeze(0)
    with torch.inference_mode():
        out = features_tensor(model.get_image_features(pixel_values=blank))
    return int(out.shape[-1])
