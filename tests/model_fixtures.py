"""Tiny checkpoints in the same on-disk layouts as the real models, built offline for tests.

- :func:`make_open_clip_dir`: an open_clip hub folder as BiomedCLIP's (``open_clip_config.json`` +
  ``open_clip_model.safetensors``), with a tiny ViT and a tiny Hugging Face BERT text tower whose
  config and tokenizer sit in a sibling folder (BiomedCLIP names ``microsoft/BiomedNLP-...`` there).
- :func:`make_hf_clip_dir` / :func:`make_hf_siglip_dir`: ``save_pretrained`` CLIP / SigLIP folders with
  their image processors (and a tiny CLIP BPE tokenizer), as PubMedCLIP's and SigLIP's.
- :func:`make_remote_code_dir`: an LLM2CLIP-style folder: ``config.json`` whose ``auto_map`` points at
  a modeling file in the folder that defines a tiny model with ``get_image_features``.
- :func:`install_in_hf_cache`: copy a folder into a Hugging Face cache layout under a repo id, so a
  *named* model resolves to it with no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
from pathlib import Path

import torch

ODD_MEAN = [0.25, 0.375, 0.5]
ODD_STD = [0.5, 0.25, 0.125]


def _tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["lesion", "benign", "malignant", "photo", "of", "a", "nevus", "melanoma"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *string.ascii_lowercase]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    ).save_pretrained(folder)
    return folder


def make_open_clip_dir(
    folder: Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    mean: list[float] = ODD_MEAN,
    std: list[float] = ODD_STD,
    interpolation: str = "bilinear",
    resize_mode: str = "shortest",
) -> Path:
    """An open_clip hub-layout folder: tiny ViT image tower + tiny HF BERT text tower (BiomedCLIP-like)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    text_dir = _tiny_bert(folder.parent / f"{folder.name}-text")
    cfg = {
        "model_cfg": {
            "embed_dim": 24,
            "vision_cfg": {
                "image_size": image_size,
                "layers": 2,
                "width": 32,
                "head_width": 16,
                "patch_size": 8,
            },
            "text_cfg": {
                "hf_model_name": str(text_dir),
                "hf_tokenizer_name": str(text_dir),
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 16,
            },
        },
        "preprocess_cfg": {
            "mean": mean,
            "std": std,
            "interpolation": interpolation,
            "resize_mode": resize_mode,
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):  # BiomedCLIP's repo ships them too
        shutil.copyfile(text_dir / name, folder / name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False, pretrained_text=False)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder


def make_open_clip_arch(folder: Path, arch: str, *, seed: int = 0) -> Path:
    """Register a tiny built-in open_clip architecture (QuickGELU, as OpenAI's) and save a weights file."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{arch}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch)
    weights = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights


def _tiny_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in letters + [c + "</w>" for c in letters]:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    tok.save_pretrained(folder)


def make_hf_clip_dir(folder: Path, *, seed: int = 0, with_processor: bool = True) -> Path:
    """``CLIPModel.save_pretrained`` + an image processor with unusual size, crop, mean/std and resample."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=20,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(folder)
    if with_processor:
        CLIPImageProcessor(
            size={"shortest_edge": 40},
            crop_size={"height": 32, "width": 32},
            image_mean=ODD_MEAN,
            image_std=ODD_STD,
            resample=2,
        ).save_pretrained(folder)
        _tiny_clip_tokenizer(folder)
    return folder


def make_hf_siglip_dir(folder: Path, *, seed: int = 0) -> Path:
    """``SiglipModel.save_pretrained`` + a SigLIP image processor (squash to 24x24, odd mean/std)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder.mkdir(parents=True, exist_ok=True)
    config = SiglipConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 24,
            "patch_size": 8,
            "hidden_size": 28,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessor(
        size={"height": 24, "width": 24}, image_mean=ODD_MEAN, image_std=ODD_STD, resample=3
    ).save_pretrained(folder)
    return folder


REMOTE_MODULE = "modeling_tiny_llm2clip"
REMOTE_CODE = '''
"""Stand-in for LLM2CLIP's remote code: a tiny image tower whose get_image_features returns a tensor."""
import os
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

if os.environ.get("VLMINDEX_REMOTE_SENTINEL"):
    Path(os.environ["VLMINDEX_REMOTE_SENTINEL"]).write_text("remote code ran")


class TinyLLM2CLIPConfig(PretrainedConfig):
    model_type = "tiny_llm2clip"

    def __init__(self, image_size=32, patch_size=8, width=24, projection_dim=20, **kwargs):
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.projection_dim = projection_dim
        super().__init__(**kwargs)


class TinyLLM2CLIP(PreTrainedModel):
    config_class = TinyLLM2CLIPConfig

    def __init__(self, config):
        super().__init__(config)
        self.patch = torch.nn.Conv2d(3, config.width, config.patch_size, config.patch_size)
        self.norm = torch.nn.LayerNorm(config.width)
        self.visual_projection = torch.nn.Linear(config.width, config.projection_dim, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass

    def get_image_features(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).mean(-1)
        return self.visual_projection(self.norm(x))
'''


def make_remote_code_dir(folder: Path, *, seed: int = 0, with_processor: bool = True) -> Path:
    """An LLM2CLIP-style folder: ``auto_map`` to a modeling file that lives in the folder."""
    import importlib.util

    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{REMOTE_MODULE}.py").write_text(REMOTE_CODE)
    config = {
        "model_type": "tiny_llm2clip",
        "architectures": ["TinyLLM2CLIP"],
        "auto_map": {
            "AutoConfig": f"{REMOTE_MODULE}.TinyLLM2CLIPConfig",
            "AutoModel": f"{REMOTE_MODULE}.TinyLLM2CLIP",
        },
        "image_size": 32,
        "patch_size": 8,
        "width": 24,
        "projection_dim": 20,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # build the weights from the same source, imported here under another name (no sentinel env set)
    spec = importlib.util.spec_from_file_location("_fixture_tiny_llm2clip", folder / f"{REMOTE_MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    sentinel = os.environ.pop("VLMINDEX_REMOTE_SENTINEL", None)
    try:
        spec.loader.exec_module(module)
    finally:
        if sentinel is not None:
            os.environ["VLMINDEX_REMOTE_SENTINEL"] = sentinel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = module.TinyLLM2CLIP(
            module.TinyLLM2CLIPConfig(image_size=32, patch_size=8, width=24, projection_dim=20)
        )
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if with_processor:
        CLIPImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_mean=ODD_MEAN,
            image_std=ODD_STD,
        ).save_pretrained(folder)
    return folder


def install_in_hf_cache(cache: Path, repo_id: str, folder: Path, *, as_blobs: bool = False) -> Path:
    """Copy ``folder``'s files into ``cache`` as the hub stores a download of ``repo_id`` (revision main).

    With ``as_blobs`` each file is stored once under ``blobs/<sha256>`` and linked from the snapshot,
    as huggingface_hub does for LFS files.
    """
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for src in sorted(folder.iterdir()):
        if not src.is_file():
            continue
        if as_blobs:
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            blob = root / "blobs" / digest
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, blob)
            (snap / src.name).symlink_to(os.path.relpath(blob, snap))
        else:
            shutil.copyfile(src, snap / src.name)
    return snap
