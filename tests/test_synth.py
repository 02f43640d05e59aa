"""The synthetic lesion dataset: reproducible bytes, grouped splits, modalities that look their part,
and classes that are separable but not trivially so."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vlmindex.errors import VlmindexError
from vlmindex.imageio import file_sha256, load_image
from vlmindex.synth import MODALITIES, SynthImage, contact_sheet_for, generate

SIZE = 64
LESIONS = 16
VIEWS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthImage]]:
    out = tmp_path_factory.mktemp("synth_a")
    return out, generate(out, seed=0, lesions_per_class=LESIONS, views_per_lesion=VIEWS, size=SIZE)


def _hashes(out: Path, manifest: list[SynthImage]) -> dict[str, str]:
    return {m.relpath: file_sha256(out / m.relpath) for m in manifest}


def test_same_seed_gives_identical_files(dataset, tmp_path):
    out_a, manifest_a = dataset
    manifest_b = generate(tmp_path, seed=0, lesions_per_class=LESIONS, views_per_lesion=VIEWS, size=SIZE)
    assert manifest_b == manifest_a
    assert _hashes(tmp_path, manifest_b) == _hashes(out_a, manifest_a)
    # Nothing else was written besides the manifest's files.
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(m.relpath for m in manifest_b)


def test_different_seed_gives_different_images(dataset, tmp_path):
    out_a, manifest_a = dataset
    manifest_c = generate(tmp_path, seed=1, lesions_per_class=2, views_per_lesion=1, size=SIZE)
    hashes_a = _hashes(out_a, manifest_a)
    for m in manifest_c:
        assert file_sha256(tmp_path / m.relpath) != hashes_a[m.relpath], m.relpath


def test_subset_and_order_do_not_change_pixels(dataset, tmp_path):
    """Per-image seeds: generating fewer lesions, views or modalities reproduces the same images."""
    out_a, manifest_a = dataset
    hashes_a = _hashes(out_a, manifest_a)
    subset = generate(
        tmp_path,
        seed=0,
        lesions_per_class=3,
        views_per_lesion=1,
        size=SIZE,
        modalities=["ultrasound", "dermoscopy"],
    )
    assert [m.modality for m in subset][0] == "dermoscopy"  # canonical order, not the caller's
    assert {m.modality for m in subset} == {"ultrasound", "dermoscopy"}
    for m in subset:
        assert file_sha256(tmp_path / m.relpath) == hashes_a[m.relpath], m.relpath


def test_modalities_and_classes(dataset):
    out, manifest = dataset
    assert len(MODALITIES) >= 3
    assert all(len(labels) >= 2 for labels in MODALITIES.values())
    # At least two modalities with three or more classes, so a wrong-label overlay there does not
    # name the true class by elimination.
    assert sum(len(labels) >= 3 for labels in MODALITIES.values()) >= 2
    assert MODALITIES["dermoscopy"] == ("naevus", "seborrhoeic-keratosis", "melanoma")
    assert MODALITIES["ultrasound"] == ("normal", "benign", "malignant")
    all_labels = [label for labels in MODALITIES.values() for label in labels]
    assert len(all_labels) == len(set(all_labels)), "class names must be unique across modalities"
    combos = {(m.modality, m.label) for m in manifest}
    assert combos == {(mod, label) for mod, labels in MODALITIES.items() for label in labels}
    assert len(manifest) == sum(len(v) for v in MODALITIES.values()) * LESIONS * VIEWS
    for m in manifest:
        assert re.fullmatch(rf"{m.modality}/{m.label}/{m.group_id}_v\d+\.png", m.relpath), m.relpath
        with Image.open(out / m.relpath) as img:
            assert img.size == (SIZE, SIZE)
    # Every image differs from every other (views included).
    assert len(set(_hashes(out, manifest).values())) == len(manifest)


def test_groups_hold_views_and_never_straddle_splits(dataset):
    _, manifest = dataset
    groups: dict[str, list[SynthImage]] = defaultdict(list)
    for m in manifest:
        groups[m.group_id].append(m)
    assert len(groups) == len(manifest) // VIEWS
    for members in groups.values():
        assert len(members) == VIEWS
        assert len({(m.split, m.label, m.modality) for m in members}) == 1
    expected_test = min(LESIONS - 1, max(1, round(0.25 * LESIONS)))
    for mod, labels in MODALITIES.items():
        for label in labels:
            splits = [g[0].split for g in groups.values() if g[0].label == label and g[0].modality == mod]
            assert splits.count("test") == expected_test
            assert splits.count("train") == LESIONS - expected_test


def test_every_class_is_in_train_and_test(dataset, tmp_path):
    _, manifest = dataset
    splits = defaultdict(set)
    for m in manifest:
        splits[(m.modality, m.label)].add(m.split)
    assert splits == {(mod, label): {"train", "test"} for mod, labels in MODALITIES.items() for label in labels}


def test_tiny_sets_still_have_both_splits(tmp_path):
    manifest = generate(tmp_path, lesions_per_class=2, views_per_lesion=1, size=32)
    for mod, labels in MODALITIES.items():
        for label in labels:
            assert sorted(m.split for m in manifest if m.modality == mod and m.label == label) == ["test", "train"]


def test_colour_per_modality(dataset):
    out, manifest = dataset
    for m in manifest:
        rgb = np.asarray(load_image(out / m.relpath), dtype=np.int16)
        spread = np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
        if m.modality == "dermoscopy":
            assert spread.mean() > 10, m.relpath  # skin and pigment are clearly coloured
        else:
            assert spread.max() == 0, m.relpath  # radiographs and B-mode are grey
            with Image.open(out / m.relpath) as img:
                assert img.mode == "L"


def test_ultrasound_is_a_fan(dataset):
    """Outside the sector (top corners) is black; inside there is speckle."""
    out, manifest = dataset
    for m in (m for m in manifest if m.modality == "ultrasound"):
        a = np.asarray(Image.open(out / m.relpath), dtype=np.float32)
        corner = a[: SIZE // 4, : SIZE // 8]
        middle = a[SIZE // 3 : 2 * SIZE // 3, SIZE // 3 : 2 * SIZE // 3]
        assert corner.max() == 0
        assert middle.std() > 5


def _auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counting half: the Mann–Whitney AUC by a loop."""
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def _by_label(out: Path, manifest: list[SynthImage], modality: str, feature) -> dict[str, list[float]]:
    values: dict[str, list[float]] = defaultdict(list)
    for m in manifest:
        if m.modality == modality:
            values[m.label].append(float(feature(out / m.relpath)))
    return values


def _centre(n: int, radius: float) -> np.ndarray:
    t = (np.arange(n) + 0.5) / n * 2 - 1
    return np.hypot(*np.meshgrid(t, t)) < radius


def _fine_texture(path: Path) -> float:
    """Standard deviation of luminance minus its 1-px Gaussian blur over the central disc: the
    sulci, cysts and plugs of a keratosis against the even brown (and blurred network) of a naevus."""
    g = np.asarray(load_image(path), dtype=np.float32).mean(axis=-1) / 255
    return float((g - ndimage.gaussian_filter(g, 1.0))[_centre(g.shape[0], 0.5)].std())


def _bright_dots(path: Path) -> float:
    """99th percentile of a 3-px white top-hat over the central disc: small bright spots
    (milia-like cysts)."""
    g = np.asarray(load_image(path), dtype=np.float32).mean(axis=-1) / 255
    return float(np.percentile(ndimage.white_tophat(g, size=3)[_centre(g.shape[0], 0.5)], 99))


def test_keratoses_look_unlike_naevi(dataset):
    """Seborrhoeic keratoses have a rougher surface and bright cysts where a naevus is even: each
    statistic ranks a keratosis above a naevus for most pairs of images."""
    out, manifest = dataset
    for feature in (_fine_texture, _bright_dots):
        values = _by_label(out, manifest, "dermoscopy", feature)
        assert _auc(values["seborrhoeic-keratosis"], values["naevus"]) > 0.85, feature.__name__
        assert np.median(values["seborrhoeic-keratosis"]) > 1.5 * np.median(values["naevus"]), feature.__name__


def _dark_blob(path: Path) -> float:
    """Largest scale-normalised Laplacian-of-Gaussian response (σ = 6% of the side) in the upper
    middle of the fan, on the image divided by the median of the glandular layer: positive and
    large where a hypoechoic mass sits, small over layered tissue."""
    a = np.asarray(load_image(path), dtype=np.float32).mean(axis=-1)
    n = a.shape[0]
    a = a / (np.median(a[int(0.3 * n) : int(0.6 * n), int(0.3 * n) : int(0.7 * n)]) + 1)
    sigma = 0.06 * n
    log = sigma**2 * ndimage.gaussian_laplace(a, sigma)
    return float(log[int(0.25 * n) : int(0.65 * n), int(0.25 * n) : int(0.75 * n)].max())


def test_normal_ultrasound_has_no_mass(dataset):
    """A blob detector finds a dark mass in benign and malignant scans and mostly nothing in
    normal ones."""
    out, manifest = dataset
    values = _by_label(out, manifest, "ultrasound", _dark_blob)
    for label in ("benign", "malignant"):
        assert _auc(values[label], values["normal"]) > 0.8, label


def _cad_features(path: Path) -> np.ndarray:
    """Classic hand-made CAD features, position-tolerant and model-free.

    Colour percentiles over the image; the centre (where lesions mostly lie) relative to the median
    of its surroundings (removing skin tone, exposure and gain); and scale-normalised Laplacian of
    Gaussian responses (blob detectors at five scales) pooled over the image and over the centre.
    """
    a = np.asarray(load_image(path), dtype=np.float32) / 255
    n = a.shape[0]
    t = (np.arange(n) + 0.5) / n * 2 - 1
    r = np.hypot(*np.meshgrid(t, t))
    g = a.mean(axis=-1)
    centre = a[r < 0.55] / (np.median(a[(r > 0.65) & (r < 0.95)], axis=0) + 1e-3)
    lum = centre.mean(axis=-1)
    feats = [np.percentile(a[..., c], [1, 5, 50, 95, 99]) for c in range(3)]
    feats += [np.percentile(centre[:, c], [1, 5, 25, 50]) for c in range(3)]
    feats += [
        np.percentile(centre.max(axis=-1) - centre.min(axis=-1), [50, 90, 99]),
        np.percentile(lum, [1, 5, 25, 50]),
        [np.mean(lum < 0.8), np.mean(lum < 0.6), np.std(centre[:, 2] - centre[:, 0])],
        np.percentile(g[r < 0.7], [1, 5, 50, 95, 99]) - np.median(g),
        np.percentile(ndimage.gaussian_gradient_magnitude(g, 1.0), [50, 90, 99]),
    ]
    for sigma in np.array([1.0, 1.5, 2.5, 4.0, 6.0]) * n / 64:
        log = sigma**2 * ndimage.gaussian_laplace(g, sigma)
        feats.append(np.percentile(log, [0, 1, 50, 99, 100]))
        feats.append(np.percentile(log[r < 0.7], [0, 1, 5, 95, 99, 100]))
    return np.concatenate([np.asarray(f, dtype=np.float64) for f in feats])


def test_classes_separable_but_not_trivially(dataset):
    """Group-aware cross-validated accuracy of a linear probe on classic CAD features is well above
    chance within every modality, and not perfect (the classes overlap by design)."""
    out, manifest = dataset
    accuracies = {}
    for mod in MODALITIES:
        items = [m for m in manifest if m.modality == mod]
        x = np.stack([_cad_features(out / m.relpath) for m in items])
        y = np.array([m.label for m in items])
        groups = np.array([m.group_id for m in items])
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=5000))
        accuracies[mod] = cross_val_score(probe, x, y, groups=groups, cv=GroupKFold(4)).mean()
    assert all(acc > 0.6 for acc in accuracies.values()), accuracies
    assert max(accuracies.values()) < 0.97, accuracies


def test_contact_sheet(dataset):
    """One row per class of every modality, in the order of MODALITIES whatever the manifest's."""
    out, manifest = dataset
    sheet = contact_sheet_for(manifest, out, per_class=3, tile_size=64)
    n_rows = sum(len(v) for v in MODALITIES.values())
    row_h = 64 + max(12, 64 // 9)
    assert sheet.width == 3 * 64
    assert sheet.height == n_rows * row_h
    # Rows are (modality, class) in canonical order: the dermoscopy rows come first and are coloured.
    rows = [(mod, label) for mod, labels in MODALITIES.items() for label in labels]
    for i, (mod, _label) in enumerate(rows):
        tile = np.asarray(sheet.crop((2, i * row_h + 2, 62, i * row_h + 62)), dtype=np.int16)
        coloured = np.abs(tile[..., 0] - tile[..., 2]).mean() > 10
        assert coloured == (mod == "dermoscopy"), (i, mod)
    # The CLI reads the manifest back ordered by path (alphabetical classes): the same sheet.
    by_path = sorted(manifest, key=lambda m: m.relpath)
    assert by_path != manifest
    assert contact_sheet_for(by_path, out, per_class=3, tile_size=64).tobytes() == sheet.tobytes()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"modalities": ["mri"]},
        {"modalities": []},
        {"test_fraction": 1.0},
        {"test_fraction": -0.1},
        {"lesions_per_class": 0},
        {"views_per_lesion": 0},
        {"size": 8},
        {"seed": -1},
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
    with pytest.raises(VlmindexError):
        generate(tmp_path, **kwargs)
