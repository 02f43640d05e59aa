"""The model registry: one JSON file per named model in ``specs/``, plus generic forms.

Adding a model is adding ``specs/<name>.json`` (the name is the file stem, as in open_clip's
``model_configs``). Generic forms resolve to a spec built on the fly:

- ``open_clip:ARCH/TAG``  an open_clip architecture and pretrained tag (``open_clip:ViT-B-32/openai``);
  ``open_clip:ARCH`` alone takes its weights from ``--checkpoint FILE``
- ``hf-hub:ORG/REPO``     a Hugging Face repository in open_clip's layout (``open_clip_config.json``)
- ``hf:ORG/REPO``         a Hugging Face repository in transformers' layout (``config.json``)
- ``local-dir:PATH`` or an existing directory: either layout, detected from the files present.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vlmindex.errors import VlmindexError

LOADERS = ("open_clip", "hf_clip", "hf_siglip", "hf_auto", "llm2clip", "offline")
# What kind of model it is, the grouping `vlmindex findings` tests the paper's claims over.
FAMILIES = ("medical", "general", "llm-enhanced", "baseline")
GENERIC_FORMS = "open_clip:ARCH/TAG, hf-hub:ORG/REPO, hf:ORG/REPO, local-dir:PATH"

# transformers model_type -> loader, for generic ``hf:`` and local transformers folders
_HF_LOADER_BY_TYPE = {"clip": "hf_clip", "siglip": "hf_siglip"}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: what a model is, where its weights come from, and how it sees images.

    ``image_size``/``mean``/``std``/``embed_dim`` are the published values; the extractor of a loaded
    model carries the values read from the checkpoint itself (``Extractor.spec``).
    """

    name: str
    loader: str  # one of LOADERS: which code loads the weights
    family: str | None  # one of FAMILIES; None: not said (a generic form without --family)
    source: (
        str  # canonical generic form: "hf-hub:org/repo", "hf:org/repo", "open_clip:ARCH/TAG", "builtin:..."
    )
    image_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    embed_dim: int | None
    licence: str
    has_text: bool
    description: str
    gated: bool = False
    remote_code: bool = False
    untrained: bool = False
    interpolation: str | None = None  # "bicubic" | "bilinear" | ...
    resize_mode: str | None = None  # "shortest" (resize + centre crop) | "squash" | "longest"
    processor_repo: str | None = None  # image processor to pair with the weights (LLM2CLIP)
    weights_repo: str | None = None  # hub repository open_clip downloads a pretrained tag's weights from
    text_padding: str | None = None  # "max_length" where the text tower was trained on padded input
    url: str | None = None  # model card
    params: dict[str, Any] = field(default_factory=dict, hash=False)  # extractor settings (offline loader)
    generic: bool = False  # built from a generic form, not a registry file
    checkpoint: str | None = None  # set on Extractor.spec: the weights file or folder actually loaded

    @property
    def medical(self) -> bool:
        return self.family == "medical"

    # -- derived views of ``source`` ------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def location(self) -> str:
        return self.source.split(":", 1)[1] if ":" in self.source else self.source

    @property
    def hf_repo(self) -> str | None:
        """The Hugging Face repository holding the weights (``hf-hub:`` and ``hf:`` sources)."""
        return self.location if self.scheme in ("hf-hub", "hf") else None

    @property
    def arch(self) -> str | None:
        """open_clip architecture name (``open_clip:`` sources)."""
        return self.location.split("/", 1)[0] if self.scheme == "open_clip" else None

    @property
    def pretrained(self) -> str | None:
        """open_clip pretrained tag (``open_clip:`` sources)."""
        if self.scheme != "open_clip" or "/" not in self.location:
            return None
        return self.location.split("/", 1)[1]

    @property
    def local_dir(self) -> str | None:
        return self.location if self.scheme == "local-dir" else None

    def display_description(self) -> str:
        """The description, marked UNTRAINED where the weights are random."""
        if self.untrained and "UNTRAINED" not in self.description:
            return f"UNTRAINED (random weights) - {self.description}"
        return self.description

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (tuples become lists), including the derived fields."""
        out = dataclasses.asdict(self)
        for key in ("mean", "std"):
            if out[key] is not None:
                out[key] = list(out[key])
        out["description"] = self.display_description()
        out.update(medical=self.medical, hf_repo=self.hf_repo, arch=self.arch, pretrained=self.pretrained)
        return out


# -- named specs ---------------------------------------------------------------------------------


def _spec_from_json(name: str, data: dict[str, Any], origin: str) -> ModelSpec:
    data = dict(data)
    if data.pop("name", name) != name:
        raise VlmindexError(f"{origin}: 'name' differs from the file name '{name}'; drop the key or rename")
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VlmindexError(f"{origin}: unknown keys {unknown}; allowed: {sorted(known - {'name'})}")
    for key in ("mean", "std"):
        if data.get(key) is not None:
            data[key] = tuple(float(v) for v in data[key])
    try:
        spec = ModelSpec(name=name, **data)
    except TypeError as exc:
        raise VlmindexError(f"{origin}: {exc}") from None
    _validate(spec, origin)
    return spec


def _validate(spec: ModelSpec, origin: str) -> None:
    if spec.loader not in LOADERS:
        raise VlmindexError(f"{origin}: loader '{spec.loader}' is not one of {', '.join(LOADERS)}")
    if spec.family not in FAMILIES:
        raise VlmindexError(f"{origin}: family '{spec.family}' is not one of {', '.join(FAMILIES)}")
    if spec.untrained and "UNTRAINED" not in spec.display_description():
        raise VlmindexError(f"{origin}: untrained models must say UNTRAINED in their description")


def check_family(family: str | None) -> str | None:
    """``family`` itself when it is None or one of :data:`FAMILIES`; else a one-line error."""
    if family is not None and family not in FAMILIES:
        raise VlmindexError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    return family


def specs_dir() -> Path:
    return Path(str(resources.files("vlmindex.models") / "specs"))


@functools.cache
def _named_specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for path in sorted(specs_dir().glob("*.json")):
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise VlmindexError(f"{path}: not valid JSON ({exc})") from None
        specs[path.stem] = _spec_from_json(path.stem, data, str(path))
    return specs


_FAMILY_ORDER = {c: i for i, c in enumerate(FAMILIES)}


def list_specs() -> list[ModelSpec]:
    """All named models: medical, general, LLM-enhanced, then offline baselines; by name within each."""
    return sorted(_named_specs().values(), key=lambda s: (_FAMILY_ORDER[s.family], s.name))


def get_spec(name: str) -> ModelSpec:
    """The spec of a named model or of a generic form; an unknown name lists close matches."""
    name = name.strip()
    named = _named_specs()
    if name in named:
        return named[name]
    if name.startswith("open_clip:"):
        return _open_clip_generic(name)
    if name.startswith("hf-hub:"):
        return _hub_generic(name)
    if name.startswith("hf:"):
        return _hf_generic(name)
    if name.startswith("local-dir:"):
        return local_dir_spec(name[len("local-dir:") :], name=name)
    if os.sep in name or name.startswith((".", "~")):
        path = Path(name).expanduser()
        if path.is_dir():
            return local_dir_spec(str(path), name=name)
        raise VlmindexError(
            f"model directory '{name}' does not exist; give an existing folder, a model name, or a "
            f"repository as hf:{name} (transformers) or hf-hub:{name} (open_clip)"
        )
    close = difflib.get_close_matches(name, list(named), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise VlmindexError(
        f"unknown model '{name}': {hint}`vlmindex models` lists named ones; generic forms: {GENERIC_FORMS}"
    )


# -- generic forms -------------------------------------------------------------------------------


def _generic(name: str, loader: str, source: str, **kw: Any) -> ModelSpec:
    # No family: whether a checkpoint is medical cannot be read from its files (embed --family says).
    base: dict[str, Any] = dict(
        family=None,
        image_size=None,
        mean=None,
        std=None,
        embed_dim=None,
        licence="unknown (see the source's model card)",
        has_text=loader not in ("offline", "llm2clip"),
        description=f"generic {loader} model from {source}",
        generic=True,
    )
    base.update(kw)
    return ModelSpec(name=name, loader=loader, source=source, **base)


def _open_clip_generic(name: str) -> ModelSpec:
    import open_clip

    rest = name[len("open_clip:") :]
    arch, _, tag = rest.partition("/")
    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=5, cutoff=0.5)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise VlmindexError(f"'{name}': open_clip has no architecture '{arch}'{hint}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    model_cfg = open_clip.get_model_config(arch) or {}
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if not tag:
        # weights must then come from --checkpoint FILE; preprocessing from open_clip's defaults
        return _generic(
            name,
            "open_clip",
            f"open_clip:{arch}",
            image_size=size if isinstance(size, int) else None,
            embed_dim=model_cfg.get("embed_dim"),
            description=f"open_clip {arch}, weights from --checkpoint (tags: {', '.join(tags) or 'none'})",
        )
    if tag not in tags:
        raise VlmindexError(
            f"'{name}': open_clip has no pretrained tag '{tag}' for {arch}; tags: {', '.join(tags) or 'none'}"
        )
    pp = open_clip.get_pretrained_cfg(arch, tag)
    return _generic(
        name,
        "open_clip",
        f"open_clip:{arch}/{tag}",
        image_size=size if isinstance(size, int) else None,
        mean=tuple(pp["mean"]) if pp.get("mean") else None,
        std=tuple(pp["std"]) if pp.get("std") else None,
        embed_dim=model_cfg.get("embed_dim"),
        interpolation=pp.get("interpolation"),
        resize_mode=pp.get("resize_mode"),
    )


def _open_clip_cfg_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    model_cfg = cfg.get("model_cfg", cfg)
    pp = cfg.get("preprocess_cfg", {})
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    out: dict[str, Any] = {"embed_dim": model_cfg.get("embed_dim")}
    if isinstance(size, int):
        out["image_size"] = size
    for key in ("mean", "std"):
        if pp.get(key) is not None:
            out[key] = tuple(pp[key])
    for key in ("interpolation", "resize_mode"):
        if pp.get(key):
            out[key] = pp[key]
    return out


def _hub_generic(name: str) -> ModelSpec:
    from vlmindex.models.hub import cached_file

    repo = name[len("hf-hub:") :]
    _check_repo_id(name, repo)
    kw: dict[str, Any] = {}
    cfg_path = cached_file(repo, "open_clip_config.json")
    if cfg_path is not None:
        kw.update(_open_clip_cfg_fields(_read_json(cfg_path)))
    return _generic(name, "open_clip", f"hf-hub:{repo}", **kw)


def _hf_config_fields(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Loader and metadata from a transformers ``config.json``."""
    model_type = cfg.get("model_type", "")
    remote = "AutoModel" in (cfg.get("auto_map") or {})
    loader = _HF_LOADER_BY_TYPE.get(model_type, "hf_auto")
    if remote and loader != "hf_auto":
        # the repository's own code is what its authors run; a native class might load it wrongly
        loader = "hf_auto"
    vision = cfg.get("vision_config") or {}
    kw: dict[str, Any] = {"remote_code": remote}
    if isinstance(vision.get("image_size"), int):
        kw["image_size"] = vision["image_size"]
    dim = cfg.get("projection_dim") if loader == "hf_clip" else None
    if loader == "hf_siglip":
        dim = vision.get("hidden_size")
        kw["text_padding"] = "max_length"
    if dim:
        kw["embed_dim"] = dim
    return loader, kw


def _hf_generic(name: str) -> ModelSpec:
    from vlmindex.models.hub import cached_file

    repo = name[len("hf:") :]
    _check_repo_id(name, repo)
    loader, kw = "hf_auto", {}
    cfg_path = cached_file(repo, "config.json")
    if cfg_path is not None:
        loader, kw = _hf_config_fields(_read_json(cfg_path))
    return _generic(name, loader, f"hf:{repo}", **kw)


def local_dir_spec(path: str, *, name: str | None = None) -> ModelSpec:
    """Spec of a folder in open_clip's layout (open_clip_config.json) or transformers' (config.json)."""
    folder = Path(path).expanduser()
    label = name or f"local-dir:{path}"
    if not folder.is_dir():
        raise VlmindexError(f"model directory '{folder}' does not exist; give an existing folder")
    source = f"local-dir:{folder.resolve()}"
    if (folder / "open_clip_config.json").is_file():
        cfg = _read_json(folder / "open_clip_config.json")
        return _generic(label, "open_clip", source, **_open_clip_cfg_fields(cfg))
    if (folder / "config.json").is_file():
        loader, kw = _hf_config_fields(_read_json(folder / "config.json"))
        return _generic(label, loader, source, **kw)
    raise VlmindexError(
        f"'{folder}' is neither an open_clip folder (open_clip_config.json) nor a transformers folder "
        "(config.json); point at the folder that holds one of them"
    )


def _check_repo_id(name: str, repo: str) -> None:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise VlmindexError(
            f"'{name}': expected ORG/REPO after the prefix, e.g. hf:google/siglip-base-patch16-224"
        )


def _read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise VlmindexError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise VlmindexError(f"model config {path} is not a JSON object")
    return data
