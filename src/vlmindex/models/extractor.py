"""The one interface the embedding pipeline sees: an :class:`Extractor` per loaded model.

``preprocess`` maps one PIL image to one tensor and runs in DataLoader worker processes, so it is a
small picklable object holding only its configuration (no model, no lambda); the library transform
it wraps is rebuilt lazily in each worker. ``encode_image`` maps a stacked batch of those tensors to
``[B, dim]`` float32 features on the CPU, not normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmindex.errors import VlmindexError
from vlmindex.models.hub import one_line, weights_digest
from vlmindex.models.registry import ModelSpec

_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class Extractor:
    """A loaded model (or parameter-free baseline) that turns preprocessed images into features.

    Attributes:
        name: the name it was loaded by (a registry name or a generic form).
        spec: the registry entry, with image size / normalisation / dim as read from the checkpoint.
        dim: feature dimension of :meth:`encode_image`.
        preprocess: picklable ``PIL.Image -> torch.Tensor`` for one image.
        preprocess_config: JSON-able description of ``preprocess`` (sizes, mean/std, interpolation,
            crop, resize mode, and ``source``: the file or registry entry the values were read from).
        device: where the model runs ("cpu", "cuda", "cuda:1", "mps").
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        dim: int,
        preprocess: Any,
        preprocess_config: dict[str, Any],
        device: str = "cpu",
        weights_files: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        self.spec = spec
        self.name = name or spec.name
        self.dim = int(dim)
        self.preprocess = preprocess
        self.preprocess_config = preprocess_config
        self.device = str(device)
        self.dtype = torch.float32
        self._weights_files = tuple(str(p) for p in weights_files)
        self._weights_sha256: str | None = None
        self._weights_hashed = False

    # -- identity -----------------------------------------------------------------------------
    @property
    def weights_sha256(self) -> str | None:
        """Checksum of the weights loaded (see :func:`hub.weights_digest`); None without parameters."""
        if not self._weights_hashed:
            self._weights_sha256 = self._compute_weights_sha256()
            self._weights_hashed = True
        return self._weights_sha256

    def _compute_weights_sha256(self) -> str | None:
        return weights_digest(self._weights_files)

    def info(self) -> dict[str, Any]:
        """JSON-able record of what produced a set of embeddings (for run metadata)."""
        return {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "dim": self.dim,
            "preprocess": self.preprocess_config,
            "weights_sha256": self.weights_sha256,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device!r})"

    # -- encoding -----------------------------------------------------------------------------
    def encode_image(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a batch of preprocessed images: ``[B, dim]`` float32 on the CPU, not normalised."""
        if not isinstance(batch, torch.Tensor) or batch.ndim < 2:
            raise VlmindexError(
                f"{self.name}: encode_image expects a stacked batch tensor [B, ...] from preprocess, "
                f"got {type(batch).__name__}"
            )
        with torch.inference_mode():
            out = self._encode_image(batch)
        out = out.detach().to("cpu", torch.float32)
        if out.ndim != 2 or out.shape != (batch.shape[0], self.dim):
            raise VlmindexError(
                f"{self.name}: the model returned features of shape {tuple(out.shape)}, expected "
                f"({batch.shape[0]}, {self.dim}); the checkpoint does not match its config"
            )
        return out

    def _encode_image(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text features ``[N, dim]`` float32 on the CPU, not normalised; raises without a text tower."""
        if not self.spec.has_text:
            raise VlmindexError(
                f"model '{self.name}' has no text tower vlmindex can run; use a CLIP- or SigLIP-style model"
            )
        if isinstance(texts, str):
            texts = [texts]
        with torch.inference_mode():
            out = self._encode_text(list(texts))
        return out.detach().to("cpu", torch.float32)

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        raise VlmindexError(f"model '{self.name}' has no text tower")

    def to(self, device: str, half: bool = False) -> Extractor:
        """Move to ``device``; ``half`` runs in float16 on GPUs and bfloat16 on the CPU. Returns self."""
        self.device = str(device)
        if half:
            self.dtype = torch.bfloat16 if torch.device(self.device).type == "cpu" else torch.float16
        else:
            self.dtype = torch.float32
        self._move()
        return self

    def _move(self) -> None:
        """Parameter-free extractors have nothing to move."""


class TorchExtractor(Extractor):
    """An extractor backed by a ``torch.nn.Module`` kept in eval mode."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.model = model.eval()
        self._move()

    def _move(self) -> None:
        try:
            self.model.to(device=self.device, dtype=self.dtype)
        except (RuntimeError, AssertionError) as exc:
            raise VlmindexError(one_line(f"cannot move '{self.name}' to {self.device}: {exc}")) from None

    def _encode_image(self, batch: torch.Tensor) -> torch.Tensor:
        return self._image_features(batch.to(self.device, self.dtype, non_blocking=True))

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def features_tensor(out: Any) -> torch.Tensor:
    """The feature tensor of a ``get_image_features``/``get_text_features`` result.

    transformers 5 returns a model output whose ``pooler_output`` holds the projected features; older
    versions and most remote code return the tensor itself.
    """
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise VlmindexError(f"cannot find a feature tensor in a {type(out).__name__} returned by the model")


# -- picklable preprocessors ---------------------------------------------------------------------


class _LazyTransform:
    """Base for preprocessors that wrap a library transform rebuilt from a plain config per process."""

    def __init__(self) -> None:
        self._transform: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_transform"] = None  # rebuilt in the worker: library objects need not pickle
        return state

    def _build(self) -> Any:
        raise NotImplementedError

    @property
    def transform(self) -> Any:
        if self._transform is None:
            self._transform = self._build()
        return self._transform


_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
}


class ImagePreprocess:
    """Resize, centre-crop and normalise one image in PIL and NumPy, with open_clip's semantics.

    ``resize_mode="shortest"``: scale the shorter side to ``size`` (the longer to
    ``int(size * long / short)``), then crop the centre ``size`` x ``size`` with the offset
    ``round((new - size) / 2)``; ``"squash"``: scale to ``size`` x ``size``. Then
    ``x = (pixel / 255 - mean) / std`` per channel, float32, CHW. This reproduces torchvision's
    ``Resize``/``CenterCrop``/``ToTensor``/``Normalize`` on PIL images, which open_clip uses, bit for bit,
    without importing open_clip or torchvision in every DataLoader worker.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ) -> None:
        if resize_mode not in ("shortest", "squash"):
            raise VlmindexError(f"resize_mode must be 'shortest' or 'squash', got '{resize_mode}'")
        if interpolation not in _PIL_FILTERS:
            raise VlmindexError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got '{interpolation}'")
        self.size = int(size)
        self.mean_values = tuple(float(v) for v in mean)
        self.std_values = tuple(float(v) for v in std)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
        self.interpolation = interpolation
        self.resize_mode = resize_mode

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        s, (w, h) = self.size, image.size
        resample = _PIL_FILTERS[self.interpolation]
        if self.resize_mode == "squash":
            if (w, h) != (s, s):
                image = image.resize((s, s), resample)
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            new_w, new_h = (s, new_long) if w <= h else (new_long, s)
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), resample)
            top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
            if (new_w, new_h) != (s, s):
                image = image.crop((left, top, left + s, top + s))
        x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        x = (x - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"ImagePreprocess(size={self.size}, {self.resize_mode}, {self.interpolation})"


def preprocess_config_of(pre: ImagePreprocess, source: str) -> dict[str, Any]:
    """JSON-able description of an :class:`ImagePreprocess`."""
    return {
        "kind": "resize_crop_normalize",
        "image_size": [pre.size, pre.size],
        "mean": list(pre.mean_values),
        "std": list(pre.std_values),
        "interpolation": pre.interpolation,
        "resize_mode": pre.resize_mode,
        "crop": pre.resize_mode == "shortest",
        "source": source,
    }


def make_open_clip_preprocess(cfg: dict[str, Any]) -> ImagePreprocess | OpenClipPreprocess:
    """The lightweight equivalent of open_clip's transform where one exists, else open_clip's own."""
    size = cfg.get("size", 224)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if isinstance(size, int) and mode in ("shortest", "squash"):
        # open_clip resizes with bilinear when asked, bicubic for anything else
        interp = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        return ImagePreprocess(size, cfg["mean"], cfg["std"], interp, mode)
    return OpenClipPreprocess(cfg)


class OpenClipPreprocess(_LazyTransform):
    """open_clip's own inference transform (``image_transform_v2``) for a ``PreprocessCfg`` dict."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}

    def _build(self) -> Any:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.cfg.items()}
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"OpenClipPreprocess({self.cfg})"


def open_clip_preprocess_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    size = cfg.get("size", 224)
    hw = [size, size] if isinstance(size, int) else list(size)
    mode = cfg.get("resize_mode", "shortest")
    return {
        "kind": "open_clip",
        "image_size": hw,
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": mode,
        "crop": mode == "shortest",
        "source": source,
        "library_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    }


class HFImagePreprocess(_LazyTransform):
    """A transformers image processor (built-in classes only) rebuilt from its ``to_dict()``."""

    def __init__(self, class_name: str, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.class_name = class_name
        self.cfg = cfg

    def _build(self) -> Any:
        import transformers

        cls = getattr(transformers, self.class_name, None)
        if cls is None or not hasattr(cls, "from_dict"):
            raise VlmindexError(f"transformers has no image processor class '{self.class_name}'")
        return cls.from_dict(self.cfg)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImagePreprocess({self.class_name})"


def hf_preprocess_config(class_name: str, cfg: dict[str, Any], source: str) -> dict[str, Any]:
    size = cfg.get("size") or {}
    crop = bool(cfg.get("do_center_crop")) and bool(cfg.get("crop_size"))
    if crop:
        final = [cfg["crop_size"]["height"], cfg["crop_size"]["width"]]
    elif "height" in size:
        final = [size["height"], size["width"]]
    else:
        final = None
    mode = "shortest" if "shortest_edge" in size else "squash"
    resample = cfg.get("resample")
    return {
        "kind": "hf_image_processor",
        "processor_class": class_name,
        "image_size": final,
        "resize": size,
        "mean": list(cfg["image_mean"]) if cfg.get("do_normalize", True) else None,
        "std": list(cfg["image_std"]) if cfg.get("do_normalize", True) else None,
        "interpolation": _PIL_RESAMPLE_NAMES.get(int(resample), str(resample))
        if resample is not None
        else None,
        "resize_mode": mode,
        "crop": crop,
        "source": source,
        "library_config": cfg,
    }
