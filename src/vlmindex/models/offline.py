"""Baselines that need no download: raw pixels, colour histogram, HOG and a seeded untrained ViT.

They give the floor every real model has to beat. Raw pixels, histogram and HOG do all their per-image
work in ``preprocess`` (which runs in DataLoader workers), so their ``encode_image`` is a reshape.
The untrained ViT is labelled UNTRAINED wherever it appears (spec, description, preprocess config).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmindex.errors import VlmindexError
from vlmindex.models.extractor import Extractor, ImagePreprocess, TorchExtractor, preprocess_config_of
from vlmindex.models.registry import ModelSpec


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class RawPixelsPreprocess:
    """Squash to ``size`` x ``size`` (box filter), scale by mean/std, flatten: ``3 * size**2`` values."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size = int(size)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        small = _rgb(image).resize((self.size, self.size), Image.Resampling.BOX)
        x = (np.asarray(small, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)).reshape(-1))


class ColorHistPreprocess:
    """Joint RGB histogram with ``bins`` levels per channel, as a square-rooted distribution.

    With p the normalised histogram (Σ p_i = 1) the feature is √p, so ‖√p‖ = 1 and the inner product of
    two features is the Bhattacharyya coefficient Σ √(p_i q_i). Images larger than ``max_side`` are
    first shrunk with a box filter, which leaves the distribution nearly unchanged and bounds the cost.
    """

    def __init__(self, bins: int, max_side: int) -> None:
        if not 1 <= bins <= 256:
            raise VlmindexError(f"color-hist: bins must be in 1..256, got {bins}")
        self.bins = int(bins)
        self.max_side = int(max_side)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _rgb(image)
        if max(image.size) > self.max_side:
            image = image.copy()
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.BOX)
        px = np.asarray(image, dtype=np.int64).reshape(-1, 3) * self.bins // 256
        index = (px[:, 0] * self.bins + px[:, 1]) * self.bins + px[:, 2]
        counts = np.bincount(index, minlength=self.bins**3).astype(np.float64)
        return torch.from_numpy(np.sqrt(counts / max(counts.sum(), 1.0)).astype(np.float32))


class HOGPreprocess:
    """HOG (scikit-image) of the grey image resized to ``size`` x ``size``, L2-Hys block normalisation."""

    def __init__(self, size: int, orientations: int, pixels_per_cell: int, cells_per_block: int) -> None:
        self.size = int(size)
        self.orientations = int(orientations)
        self.pixels_per_cell = int(pixels_per_cell)
        self.cells_per_block = int(cells_per_block)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from skimage.feature import hog

        grey = _rgb(image).convert("L").resize((self.size, self.size), Image.Resampling.BILINEAR)
        feat = hog(
            np.asarray(grey, dtype=np.float64) / 255.0,
            orientations=self.orientations,
            pixels_per_cell=(self.pixels_per_cell, self.pixels_per_cell),
            cells_per_block=(self.cells_per_block, self.cells_per_block),
            block_norm="L2-Hys",
            feature_vector=True,
        )
        return torch.from_numpy(feat.astype(np.float32))

    @property
    def dim(self) -> int:
        cells = self.size // self.pixels_per_cell
        blocks = cells - self.cells_per_block + 1
        return blocks * blocks * self.cells_per_block**2 * self.orientations


class FlatExtractor(Extractor):
    """Features computed entirely in ``preprocess``: encoding flattens the batch."""

    def _encode_image(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.reshape(batch.shape[0], -1)


class UntrainedViTExtractor(TorchExtractor):
    """An UNTRAINED ViT with seeded random weights; the feature is the final CLS token."""

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def _compute_weights_sha256(self) -> str | None:
        # identifies the random draw: SHA-256 over the float32 bytes of the state dict, in key order
        digest = hashlib.sha256()
        for key, value in self.model.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


class _ViT(torch.nn.Module):
    """A plain pre-norm ViT encoder (patchify, CLS token, learned positions); output: final CLS token."""

    def __init__(self, image_size: int, patch_size: int, layers: int, width: int, heads: int, mlp_dim: int):
        super().__init__()
        if image_size % patch_size:
            raise VlmindexError(
                f"untrained ViT: image size {image_size} is not a multiple of patch {patch_size}"
            )
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.patch = torch.nn.Conv2d(3, width, patch_size, patch_size)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.pos = torch.nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        # separate layers, not nn.TransformerEncoder: it deep-copies one layer, so all would share one draw
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                width, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def _untrained_vit(spec: ModelSpec, p: dict[str, Any]) -> torch.nn.Module:
    # fork_rng keeps the caller's global RNG untouched; the seed alone fixes the weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(p["seed"]))
        return _ViT(
            image_size=int(spec.image_size or 224),
            patch_size=int(p["patch_size"]),
            layers=int(p["layers"]),
            width=int(p["width"]),
            heads=int(p["heads"]),
            mlp_dim=int(p["mlp_dim"]),
        )


def load_offline(spec: ModelSpec, *, device: str = "cpu") -> Extractor:
    """Build an offline extractor from its registry entry (``spec.params['kind']``)."""
    p = dict(spec.params)
    kind = p.get("kind")
    base = {"kind": kind, "source": f"registry:{spec.name}", "params": p, "untrained": spec.untrained}
    if kind == "raw-pixels":
        size = int(p["size"])
        mean, std = spec.mean or (0.5, 0.5, 0.5), spec.std or (0.5, 0.5, 0.5)
        pre = RawPixelsPreprocess(size, mean, std)
        cfg = base | {
            "image_size": [size, size],
            "mean": list(mean),
            "std": list(std),
            "interpolation": "box",
            "resize_mode": "squash",
            "crop": False,
        }
        return FlatExtractor(spec, dim=3 * size * size, preprocess=pre, preprocess_config=cfg, device=device)
    if kind == "color-hist":
        pre_h = ColorHistPreprocess(int(p["bins"]), int(p["max_side"]))
        cfg = base | {
            "image_size": None,
            "mean": None,
            "std": None,
            "interpolation": "box",
            "resize_mode": f"fit within {pre_h.max_side} px",
            "crop": False,
        }
        return FlatExtractor(spec, dim=pre_h.bins**3, preprocess=pre_h, preprocess_config=cfg, device=device)
    if kind == "hog":
        pre_g = HOGPreprocess(
            int(p["size"]), int(p["orientations"]), int(p["pixels_per_cell"]), int(p["cells_per_block"])
        )
        cfg = base | {
            "image_size": [pre_g.size, pre_g.size],
            "mean": None,
            "std": None,
            "interpolation": "bilinear",
            "resize_mode": "squash",
            "crop": False,
            "grey": True,
        }
        return FlatExtractor(spec, dim=pre_g.dim, preprocess=pre_g, preprocess_config=cfg, device=device)
    if kind == "untrained-vit":
        size = int(spec.image_size or 224)
        pp = {
            "size": size,
            "mean": tuple(spec.mean or (0.5,) * 3),
            "std": tuple(spec.std or (0.5,) * 3),
            "interpolation": spec.interpolation or "bicubic",
            "resize_mode": spec.resize_mode or "shortest",
        }
        pre_v = ImagePreprocess(size, pp["mean"], pp["std"], pp["interpolation"], pp["resize_mode"])
        cfg = preprocess_config_of(pre_v, f"registry:{spec.name}") | {"untrained": True, "params": p}
        return UntrainedViTExtractor(
            spec,
            _untrained_vit(spec, p),
            dim=int(p["width"]),
            preprocess=pre_v,
            preprocess_config=cfg,
            device=device,
        )
    raise VlmindexError(f"registry entry '{spec.name}': unknown offline extractor kind '{kind}'")
