"""Model zoo: registry data, offline baselines, and tiny checkpoints in the real on-disk layouts.

No test touches the network: HF_HUB_OFFLINE=1 and every test gets an empty Hugging Face cache unless
it installs a tiny checkpoint into it under a real repository id.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import, so the libraries see it too
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="vlmindex-hf-modules-")  # remote code copies

import model_fixtures as mf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlmindex.errors import VlmindexError  # noqa: E402
from vlmindex.models import LOADERS, get_spec, is_available, list_specs, load_model, registry  # noqa: E402
from vlmindex.models.extractor import ImagePreprocess  # noqa: E402
from vlmindex.models.hub import file_sha256  # noqa: E402

REQUIRED = {
    "medical": {"biomedclip", "pubmedclip", "quiltnet-b16", "plip", "medsiglip-448"},
    "general": {
        "clip-vit-b16", "clip-vit-l14", "openclip-laion2b-b16", "siglip-b16", "siglip-so400m", "eva02-b16",
    },
    "llm-enhanced": {"llm2clip-b16", "llm2clip-l14-336"},
    "baseline": {"raw-pixels", "color-hist", "hog", "untrained-vit-tiny", "untrained-vit-b16"},
}
OFFLINE = sorted(REQUIRED["baseline"] - {"untrained-vit-b16"})


@pytest.fixture(autouse=True)
def _empty_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray((rng.random((45, 71, 3)) * 255).astype(np.uint8))  # odd, non-square


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "open_clip": mf.make_open_clip_dir(root / "biomedclip-like"),
        "clip": mf.make_hf_clip_dir(root / "pubmedclip-like"),
        "clip_bare": mf.make_hf_clip_dir(root / "clip-no-processor", seed=1, with_processor=False),
        "siglip": mf.make_hf_siglip_dir(root / "siglip-like"),
        "remote": mf.make_remote_code_dir(root / "llm2clip-like"),
        "remote_bare": mf.make_remote_code_dir(root / "llm2clip-no-processor", with_processor=False),
    }


# -- registry ------------------------------------------------------------------------------------


def test_registry_lists_every_required_model_with_its_metadata() -> None:
    specs = {s.name: s for s in list_specs()}
    for category, names in REQUIRED.items():
        for name in names:
            spec = specs[name]
            assert spec.family == category
            assert spec.medical == (category == "medical")
            assert spec.loader in LOADERS
            assert spec.licence and spec.description and spec.source
            assert spec.embed_dim and spec.embed_dim > 0
    assert specs["medsiglip-448"].gated and specs["medsiglip-448"].image_size == 448
    assert specs["biomedclip"].hf_repo == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert specs["pubmedclip"].hf_repo == "flaviagiammarino/pubmed-clip-vit-base-patch32"
    assert (specs["clip-vit-b16"].arch, specs["clip-vit-b16"].pretrained) == ("ViT-B-16-quickgelu", "openai")
    assert (specs["clip-vit-l14"].arch, specs["clip-vit-l14"].pretrained) == ("ViT-L-14-quickgelu", "openai")
    assert specs["openclip-laion2b-b16"].source == "open_clip:ViT-B-16/laion2b_s34b_b88k"
    assert specs["eva02-b16"].source == "open_clip:EVA02-B-16/merged2b_s8b_b131k"
    for name, processor in (("llm2clip-b16", "openai/clip-vit-base-patch16"),
                            ("llm2clip-l14-336", "openai/clip-vit-large-patch14-336")):
        spec = specs[name]
        assert spec.remote_code and not spec.has_text and spec.embed_dim == 1280
        assert spec.processor_repo == processor
    for name in ("untrained-vit-tiny", "untrained-vit-b16"):
        assert specs[name].untrained and "UNTRAINED" in specs[name].display_description()
        assert "UNTRAINED" in specs[name].to_dict()["description"]
    assert [s.family for s in list_specs()] == sorted(
        (s.family for s in list_specs()), key=registry.FAMILIES.index
    )


def test_open_clip_entries_agree_with_open_clips_pretrained_table() -> None:
    import open_clip

    for spec in list_specs():
        if spec.scheme != "open_clip":
            continue
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
        assert cfg, spec.name
        assert cfg["hf_hub"].rstrip("/") == spec.weights_repo
        assert cfg.get("quick_gelu", False) == spec.arch.endswith("-quickgelu")  # OpenAI weights need it
        assert tuple(cfg["mean"]) == spec.mean and tuple(cfg["std"]) == spec.std
        assert cfg["interpolation"] == spec.interpolation
        assert open_clip.get_model_config(spec.arch)["embed_dim"] == spec.embed_dim


def test_adding_a_model_is_adding_a_json_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(registry.specs_dir(), specs)
    entry = json.loads((specs / "plip.json").read_text())
    entry.update(source="hf:some-lab/derm-clip", description="a dermatology CLIP", licence="CC-BY-4.0")
    (specs / "derm-clip.json").write_text(json.dumps(entry))
    monkeypatch.setattr(registry, "specs_dir", lambda: specs)
    registry._named_specs.cache_clear()
    try:
        spec = get_spec("derm-clip")
        assert spec.hf_repo == "some-lab/derm-clip" and spec.loader == "hf_clip"
        assert "derm-clip" in {s.name for s in list_specs()}
        (specs / "broken.json").write_text(json.dumps({**entry, "loader": "nope"}))
        registry._named_specs.cache_clear()
        with pytest.raises(VlmindexError, match="broken.json.*loader 'nope'"):
            list_specs()
    finally:
        registry._named_specs.cache_clear()


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(VlmindexError) as err:
        get_spec("biomedclp")
    assert "biomedclip" in str(err.value) and "hf:ORG/REPO" in str(err.value)


def test_generic_forms_resolve(built: dict[str, Path]) -> None:
    assert get_spec("hf:org/some-model").loader == "hf_auto"
    assert get_spec("hf-hub:org/some-model").loader == "open_clip"
    oc = get_spec("open_clip:ViT-B-32/openai")
    assert (oc.arch, oc.pretrained, oc.image_size, oc.embed_dim) == ("ViT-B-32", "openai", 224, 512)
    with pytest.raises(VlmindexError, match="no pretrained tag 'nope'.*openai"):
        get_spec("open_clip:ViT-B-32/nope")
    with pytest.raises(VlmindexError, match="no architecture"):
        get_spec("open_clip:ViT-Q-99/openai")
    with pytest.raises(VlmindexError, match="ORG/REPO"):
        get_spec("hf:just-a-name")
    with pytest.raises(VlmindexError, match="hf:some-org/some-repo"):
        get_spec("some-org/some-repo")
    assert get_spec(f"local-dir:{built['open_clip']}").loader == "open_clip"
    assert get_spec(f"local-dir:{built['clip']}").loader == "hf_clip"
    assert get_spec(str(built["siglip"])).loader == "hf_siglip"  # a bare folder path works too
    remote = get_spec(f"local-dir:{built['remote']}")
    assert remote.loader == "hf_auto" and remote.family is None and remote.remote_code
    with pytest.raises(VlmindexError, match="neither an open_clip folder"):
        get_spec(f"local-dir:{built['open_clip'].parent}")


# -- offline baselines ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_extractors_load_without_download(name: str, image: Image.Image) -> None:
    ex = load_model(name)
    assert is_available(ex.spec) and ex.dim == ex.spec.embed_dim
    pre = pickle.loads(pickle.dumps(ex.preprocess))  # runs in DataLoader workers
    x = pre(image)
    assert torch.equal(x, ex.preprocess(image))
    batch = torch.stack([x, ex.preprocess(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    feats = ex.encode_image(batch)
    assert feats.shape == (2, ex.dim) and feats.dtype == torch.float32
    json.dumps(ex.info())
    if name != "untrained-vit-tiny":  # the per-image work is all in preprocess
        assert torch.equal(feats, batch.reshape(2, -1))
        assert ex.weights_sha256 is None
    with pytest.raises(VlmindexError, match="no text tower"):
        ex.encode_text(["a nevus"])


def test_offline_features_mean_what_they_say(image: Image.Image) -> None:
    from skimage.feature import hog

    flat = Image.new("RGB", (40, 30), (255, 0, 0))
    hist = load_model("color-hist").preprocess(flat)
    assert torch.isclose(hist.square().sum(), torch.tensor(1.0))
    red_bin = (7 * 8 + 0) * 8 + 0  # 8 levels per channel, index (r*8+g)*8+b
    assert hist[red_bin] == 1.0 and hist.sum() == 1.0
    raw = load_model("raw-pixels").preprocess(flat).reshape(3, 32, 32)
    assert torch.allclose(raw[0], torch.ones(32, 32)) and torch.allclose(raw[1:], -torch.ones(2, 32, 32))
    small = image.convert("L").resize((128, 128), Image.Resampling.BILINEAR)
    grey = np.asarray(small, dtype=np.float64) / 255
    expected = hog(grey, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2),
                   block_norm="L2-Hys")
    got = load_model("hog").preprocess(image)
    assert got.shape == (1764,) and np.allclose(got.numpy(), expected, atol=1e-6)


def test_untrained_vit_is_seeded_labelled_and_leaves_global_rng_alone(image: Image.Image) -> None:
    torch.manual_seed(123)
    random.seed(5)
    expected_next = torch.rand(3, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a, b = load_model("untrained-vit-tiny"), load_model("untrained-vit-tiny")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3, generator=torch.Generator().manual_seed(0)), expected_next)
    assert a.weights_sha256 == b.weights_sha256 and len(a.weights_sha256) == 64
    x = a.preprocess(image)[None]
    assert x.shape == (1, 3, 64, 64)
    fa, fb = a.encode_image(x), b.encode_image(x)
    assert torch.equal(fa, fb) and fa.shape == (1, 192) and fa.std() > 0
    assert a.spec.untrained and a.preprocess_config["untrained"] is True
    assert "UNTRAINED" in a.spec.display_description()
    blocks = list(a.model.blocks)
    assert not torch.equal(blocks[0].linear1.weight, blocks[1].linear1.weight)  # independent draws per layer
    half = a.to("cpu", half=True)
    assert half.dtype == torch.bfloat16
    out = half.encode_image(x)
    assert out.dtype == torch.float32 and torch.allclose(out, fa, atol=0.1, rtol=0.1)


def test_offline_extractor_rejects_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(VlmindexError, match="drop --checkpoint"):
        load_model("hog", checkpoint=tmp_path)


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(45, 71), (80, 33), (24, 24)])
def test_image_preprocess_matches_open_clip_bit_for_bit(mode: str, interp: str, size: tuple) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))
    mean, std = (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)
    ours = ImagePreprocess(24, mean, std, interp, mode)(img)
    theirs = image_transform_v2(
        PreprocessCfg(size=24, mean=mean, std=std, interpolation=interp, resize_mode=mode), is_train=False
    )(img)
    assert torch.equal(ours, theirs)


# -- open_clip layout (BiomedCLIP-like) ----------------------------------------------------------


def test_open_clip_folder_loads_and_matches_the_model(built: dict[str, Path], image: Image.Image) -> None:
    import open_clip

    folder = built["open_clip"]
    ex = load_model(f"local-dir:{folder}")
    ref_model, ref_preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    ref_model.eval()
    cfg = ex.preprocess_config
    assert cfg["source"] == str(folder / "open_clip_config.json")
    assert (cfg["mean"], cfg["std"]) == (mf.ODD_MEAN, mf.ODD_STD)
    assert (cfg["interpolation"], cfg["resize_mode"], cfg["image_size"], cfg["crop"]) == (
        "bilinear", "shortest", [32, 32], True,
    )
    x = ex.preprocess(image)
    assert torch.equal(x, ref_preprocess(image))  # open_clip's own transform for this checkpoint
    batch = torch.stack([x, ex.preprocess(image.rotate(90, expand=True))])
    feats = ex.encode_image(batch)
    with torch.no_grad():
        assert torch.allclose(feats, ref_model.encode_image(batch), atol=1e-6)
    assert ex.dim == 24 and ex.weights_sha256 == file_sha256(folder / "open_clip_model.safetensors")
    texts = ["a photo of a nevus", "melanoma"]
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(texts)
    with torch.no_grad():
        assert torch.allclose(ex.encode_text(texts), ref_model.encode_text(tokens), atol=1e-6)


def test_named_open_clip_model_loads_from_checkpoint_and_from_cache(
    built: dict[str, Path], image: Image.Image, _empty_offline_cache: Path
) -> None:
    folder = built["open_clip"]
    spec = get_spec("biomedclip")
    assert not is_available(spec)
    with pytest.raises(VlmindexError) as err:
        load_model("biomedclip")
    msg = str(err.value)
    assert "\n" not in msg and "'biomedclip'" in msg and "--checkpoint DIR" in msg and "network" in msg
    direct = load_model("biomedclip", checkpoint=folder)
    mf.install_in_hf_cache(_empty_offline_cache, spec.hf_repo, folder, as_blobs=True)
    assert is_available(spec)
    cached = load_model("biomedclip")
    assert cached.name == "biomedclip" and cached.spec.family == "medical"
    assert cached.spec.image_size == 32 and cached.spec.embed_dim == 24  # what the checkpoint says
    # the cache stores weights under blobs/<sha256>; the checksum is read from that name
    weights = (folder / "open_clip_model.safetensors").read_bytes()
    assert cached.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert cached.weights_sha256 == direct.weights_sha256
    x = cached.preprocess(image)[None]
    assert torch.equal(cached.encode_image(x), direct.encode_image(x))
    assert cached.encode_text(["benign nevus"]).shape == (1, 24)


def test_open_clip_architecture_with_a_weights_file(tmp_path: Path, image: Image.Image) -> None:
    import open_clip

    weights = mf.make_open_clip_arch(tmp_path, "VlmTiny-ViT-quickgelu")
    with pytest.raises(VlmindexError, match="--checkpoint"):
        load_model("open_clip:VlmTiny-ViT-quickgelu")
    ex = load_model("open_clip:VlmTiny-ViT-quickgelu", checkpoint=weights)
    assert ex.dim == 16 and ex.preprocess_config["image_size"] == [32, 32]
    assert any(isinstance(m, open_clip.model.QuickGELU) for m in ex.model.modules())
    ref = open_clip.create_model("VlmTiny-ViT-quickgelu", pretrained=str(weights)).eval()
    x = ex.preprocess(image)[None]
    with torch.no_grad():
        assert torch.allclose(ex.encode_image(x), ref.encode_image(x), atol=1e-6)


# -- transformers layouts (PubMedCLIP-, SigLIP-like) ---------------------------------------------


def test_hf_clip_checkpoint_uses_its_own_processor(built: dict[str, Path], image: Image.Image) -> None:
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    folder = built["clip"]
    ex = load_model("pubmedclip", checkpoint=folder)
    cfg = ex.preprocess_config
    assert cfg["source"] == str(folder / "preprocessor_config.json")
    assert (cfg["image_size"], cfg["resize"], cfg["crop"], cfg["interpolation"]) == (
        [32, 32], {"shortest_edge": 40}, True, "bilinear",
    )
    assert (cfg["mean"], cfg["std"]) == (mf.ODD_MEAN, mf.ODD_STD)
    json.dumps(ex.info())
    x = pickle.loads(pickle.dumps(ex.preprocess))(image)
    ref_proc = AutoImageProcessor.from_pretrained(folder)
    assert torch.equal(x, ref_proc(images=image, return_tensors="pt")["pixel_values"][0])
    flat = ex.preprocess(Image.new("RGB", (50, 40), (51, 102, 204)))
    expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor(mf.ODD_MEAN)) / torch.tensor(mf.ODD_STD)
    assert torch.allclose(flat[:, 16, 16], expected.float(), atol=1e-6)
    model = CLIPModel.from_pretrained(folder).eval()
    batch = torch.stack([x, flat])
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=batch).pooler_output
    assert ex.dim == 20 and torch.allclose(ex.encode_image(batch), ref, atol=1e-6)
    tok = CLIPTokenizer.from_pretrained(folder)
    texts = ["nevus", "melanoma lesion"]
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref_text = model.get_text_features(**enc).pooler_output
    assert torch.allclose(ex.encode_text(texts), ref_text, atol=1e-6)
    assert ex.weights_sha256 == file_sha256(folder / "model.safetensors")


def test_hf_preprocess_runs_in_dataloader_workers(built: dict[str, Path], image: Image.Image) -> None:
    from torch.utils.data import DataLoader

    ex = load_model("pubmedclip", checkpoint=built["clip"])
    images = [image, image.rotate(90, expand=True), Image.new("RGB", (33, 90), (10, 200, 30))]

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> torch.Tensor:
            return ex.preprocess(images[i])

    (batch,) = list(DataLoader(Images(), batch_size=3, num_workers=1))
    assert torch.equal(batch, torch.stack([ex.preprocess(im) for im in images]))


def test_hf_checkpoint_without_processor_falls_back_to_registry(built: dict[str, Path]) -> None:
    ex = load_model("pubmedclip", checkpoint=built["clip_bare"])
    cfg = ex.preprocess_config
    assert cfg["image_size"] == [32, 32]  # from the checkpoint's config.json
    assert cfg["mean"] == list(get_spec("pubmedclip").mean) and "registry:pubmedclip" in cfg["source"]


def test_named_hf_model_loads_from_cache_offline(
    built: dict[str, Path], image: Image.Image, _empty_offline_cache: Path
) -> None:
    spec = get_spec("pubmedclip")
    assert not is_available(spec)
    snapshot = mf.install_in_hf_cache(_empty_offline_cache, spec.hf_repo, built["clip"])
    assert is_available(spec)
    ex = load_model("pubmedclip")
    assert ex.spec.checkpoint == str(snapshot)
    x = ex.preprocess(image)[None]
    assert torch.equal(ex.encode_image(x), load_model("pubmedclip", checkpoint=built["clip"]).encode_image(x))


def test_hf_siglip_checkpoint(built: dict[str, Path], image: Image.Image) -> None:
    from transformers import SiglipImageProcessor, SiglipModel

    folder = built["siglip"]
    ex = load_model("siglip-b16", checkpoint=folder)
    cfg = ex.preprocess_config
    assert (cfg["image_size"], cfg["resize_mode"], cfg["crop"], cfg["mean"]) == ([24, 24], "squash", False,
                                                                                  mf.ODD_MEAN)
    x = ex.preprocess(image)
    assert torch.equal(x, SiglipImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")
                       ["pixel_values"][0])
    model = SiglipModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=x[None]).pooler_output
    assert ex.dim == 28 and torch.allclose(ex.encode_image(x[None]), ref, atol=1e-6)
    with pytest.raises(VlmindexError, match="tokenizer"):
        ex.encode_text(["x"])  # no tokenizer saved in this folder
    with pytest.raises(VlmindexError, match="'siglip' model"):
        load_model("pubmedclip", checkpoint=folder)


# -- remote code (LLM2CLIP-like) -----------------------------------------------------------------


def test_remote_code_is_refused_without_the_flag(
    built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinel = tmp_path / "ran.txt"
    monkeypatch.setenv("VLMINDEX_REMOTE_SENTINEL", str(sentinel))
    for kwargs in ({"name": "llm2clip-b16", "checkpoint": built["remote"]},
                   {"name": f"local-dir:{built['remote']}"},
                   {"name": "llm2clip-l14-336"}):
        with pytest.raises(VlmindexError) as err:
            load_model(**kwargs)
        assert "--trust-remote-code" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VlmindexError, match=mf.REMOTE_MODULE + r"\.py"):
        load_model(f"local-dir:{built['remote']}")
    assert not sentinel.exists()


def test_remote_code_runs_with_the_flag(
    built: dict[str, Path], image: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinel = tmp_path / "ran.txt"
    monkeypatch.setenv("VLMINDEX_REMOTE_SENTINEL", str(sentinel))
    folder = built["remote"]
    ex = load_model("llm2clip-b16", checkpoint=folder, trust_remote_code=True)
    assert sentinel.exists()
    assert ex.dim == 20 and ex.spec.family == "llm-enhanced"
    assert ex.preprocess_config["source"] == str(folder / "preprocessor_config.json")
    x = ex.preprocess(image)[None]
    with torch.no_grad():
        ref = ex.model.get_image_features(pixel_values=x)
    assert torch.equal(ex.encode_image(x), ref)
    with pytest.raises(VlmindexError, match="no text tower"):
        ex.encode_text(["nevus"])
    bare = load_model("llm2clip-b16", checkpoint=built["remote_bare"], trust_remote_code=True)
    assert "registry:llm2clip-b16" in bare.preprocess_config["source"]
    assert bare.preprocess_config["mean"] == list(get_spec("llm2clip-b16").mean)


def test_named_remote_model_from_cache_pairs_its_processor_repo(
    built: dict[str, Path], image: Image.Image, tmp_path: Path, _empty_offline_cache: Path
) -> None:
    from transformers import CLIPImageProcessor

    spec = get_spec("llm2clip-b16")
    mf.install_in_hf_cache(_empty_offline_cache, spec.hf_repo, built["remote_bare"])
    proc_dir = tmp_path / "processor"
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40},
                       image_mean=[0.3, 0.3, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(proc_dir)
    snap = mf.install_in_hf_cache(_empty_offline_cache, spec.processor_repo, proc_dir)
    assert is_available(spec)
    ex = load_model("llm2clip-b16", trust_remote_code=True)
    assert ex.preprocess_config["source"] == str(snap / "preprocessor_config.json")
    assert ex.preprocess(image).shape == (3, 40, 40) and ex.preprocess_config["mean"] == [0.3, 0.3, 0.3]


def test_open_clip_tag_availability_reads_the_hub_cache(_empty_offline_cache: Path, tmp_path: Path) -> None:
    named, generic = get_spec("clip-vit-b16"), get_spec("open_clip:ViT-B-16-quickgelu/openai")
    assert generic.weights_repo is None and not is_available(named) and not is_available(generic)
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "open_clip_model.safetensors").write_bytes(b"stand-in")
    mf.install_in_hf_cache(_empty_offline_cache, named.weights_repo, weights)
    assert is_available(named) and is_available(generic)  # registry fast path and open_clip's own table
    assert not is_available(get_spec("clip-vit-l14"))


# -- missing weights -----------------------------------------------------------------------------


def test_every_named_model_missing_offline_is_a_one_line_error() -> None:
    for spec in list_specs():
        if spec.loader == "offline":
            continue
        assert not is_available(spec), spec.name
        with pytest.raises(VlmindexError) as err:
            load_model(spec.name, trust_remote_code=True)
        msg = str(err.value)
        assert "\n" not in msg and f"'{spec.name}'" in msg, msg
        assert "--checkpoint DIR" in msg and "network access" in msg
        assert ("gated" in msg) == spec.gated


def test_weights_checksum_reads_hub_blob_names(tmp_path: Path) -> None:
    data = b"not really weights"
    plain = tmp_path / "w.safetensors"
    plain.write_bytes(data)
    assert file_sha256(plain) == hashlib.sha256(data).hexdigest()
    # a file the hub stored as blobs/<sha256> is not reread: its name is its checksum
    name = "ab" * 32
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / name).write_bytes(data)
    (tmp_path / "linked.safetensors").symlink_to(tmp_path / "blobs" / name)
    assert file_sha256(tmp_path / "linked.safetensors") == name


def test_missing_checkpoint_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VlmindexError, match="does not exist"):
        load_model("pubmedclip", checkpoint=tmp_path / "nope")


# -- CLI -----------------------------------------------------------------------------------------


def test_models_command_lists_all_with_availability(
    capsys: pytest.CaptureFixture[str], built: dict[str, Path]
) -> None:
    from vlmindex.cli import main

    main(["models", "--format", "json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set().union(*REQUIRED.values()) <= set(rows)
    assert rows["hog"]["available"] is True and rows["biomedclip"]["available"] is False
    assert rows["medsiglip-448"]["gated"] and "gated" in rows["medsiglip-448"]["notes"]
    assert "UNTRAINED" in rows["untrained-vit-b16"]["description"]
    main(["models", f"local-dir:{built['clip']}", "--available"])
    table = capsys.readouterr().out
    assert "hf_clip" in table and "True" in table
    with pytest.raises(SystemExit) as failed:
        main(["models", "biomedclp"])
    assert failed.value.code == 1 and "Error: unknown model 'biomedclp'" in capsys.readouterr().err
