"""Duplicates and leakage: planted exact, re-encoded and resized copies of training images are found,
excluding them from rankings matches a plain NumPy loop and lowers the inflated metrics, and the
stored pairs follow the catalog's rules (rerun replaces, --replace drops, a concurrent change stores
nothing)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vlmindex import metrics
from vlmindex.catalog import RunKey, Workspace
from vlmindex.catalog.embeddings import read_run
from vlmindex.catalog.fingerprints import InputsChanged

MODEL = "raw-pixels"
N_EXACT, N_PNG, N_BMP, N_RESIZED = 5, 5, 3, 20
GROUP_REGEX = r"^(.+)_v\d+\.png$"  # views of one synthetic lesion share a group; planted copies do not


@dataclass
class Leaky:
    root: Path                          # workspace
    source: Path                        # the image folder it was ingested from
    truth: dict[tuple[int, int], str]   # planted (a, b) -> exact-bytes / exact-pixels / near
    n_images: int


def _count(ws: Path, sql: str, params: list | None = None) -> list[tuple]:
    with Workspace(ws).read() as con:
        return con.execute(sql, params or []).fetchall()


def _plant(source: Path, gen: Path, manifest) -> dict[str, tuple[str, str]]:
    """Copies of training images written into the test split: name -> (kind, original file name)."""
    train = [m for m in manifest if m.split == "train"]
    pick = np.random.default_rng(0).permutation(len(train))
    planted = {}

    def dest(m, tag: str, ext: str) -> Path:
        return source / "test" / m.label / f"planted-{tag}-{Path(m.relpath).stem}.{ext}"

    for i in pick[:N_EXACT]:
        m = train[i]
        shutil.copy(gen / m.relpath, p := dest(m, "exact", "png"))
        planted[p.name] = ("exact-bytes", Path(m.relpath).name)
    for i in pick[N_EXACT:N_EXACT + N_PNG]:  # same pixels, other bytes: compression level and a text chunk
        m = train[i]
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", "re-encoded copy")
        Image.open(gen / m.relpath).save(p := dest(m, "png9", "png"), compress_level=9, pnginfo=info)
        planted[p.name] = ("exact-pixels", Path(m.relpath).name)
    for i in pick[N_EXACT + N_PNG:N_EXACT + N_PNG + N_BMP]:
        m = train[i]
        Image.open(gen / m.relpath).save(p := dest(m, "bmp", "bmp"))
        planted[p.name] = ("exact-pixels", Path(m.relpath).name)
    for i in pick[N_EXACT + N_PNG + N_BMP:N_EXACT + N_PNG + N_BMP + N_RESIZED]:
        m = train[i]
        img = Image.open(gen / m.relpath).convert("RGB")
        w, h = img.size
        small = img.resize((round(w * 0.75), round(h * 0.75)), Image.Resampling.BILINEAR)
        small.resize((w, h), Image.Resampling.BILINEAR).save(p := dest(m, "resized", "jpg"), quality=90)
        planted[p.name] = ("near", Path(m.relpath).name)
    return planted


@pytest.fixture(scope="module")
def leaky_template(tmp_path_factory) -> Leaky:
    """An image folder of the synthetic lesions (train/test by lesion) with planted copies of
    training images in its test split, ingested and embedded with raw-pixels; no search run yet."""
    from vlmindex import synth
    from vlmindex.datasets import IngestOptions
    from vlmindex.embed import EmbedOptions, embed
    from vlmindex.ingest import ingest

    base = tmp_path_factory.mktemp("leaky")
    gen, source = base / "gen", base / "folder"
    manifest = synth.generate(gen, seed=0, lesions_per_class=6, views_per_lesion=2, size=64)
    for m in manifest:
        out = source / m.split / m.label / Path(m.relpath).name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(gen / m.relpath, out)
    planted = _plant(source, gen, manifest)
    ws = Workspace(base / "ws")
    ingest(ws, "leaky", source, "imagefolder", IngestOptions(group_regex=GROUP_REGEX), progress=False)
    embed(ws, MODEL, "leaky", options=EmbedOptions(num_workers=0, progress=False))
    with ws.read() as con:
        id_of = {Path(p).name: i for i, p in con.execute("SELECT image_id, path FROM images").fetchall()}
    truth = {tuple(sorted((id_of[name], id_of[orig]))): kind for name, (kind, orig) in planted.items()}
    return Leaky(ws.root, source, truth, len(id_of))


@pytest.fixture
def leaky(leaky_template, tmp_path) -> Leaky:
    """A private copy of the template workspace (the image folder is shared, read-only)."""
    root = tmp_path / "leaky-ws"
    shutil.copytree(leaky_template.root, root)
    return Leaky(root, leaky_template.source, leaky_template.truth, leaky_template.n_images)


def _pairs(vlm, ws: Path, *args: str) -> tuple[list[dict], str]:
    res = vlm(ws, "duplicates", "leaky", *args, "--format", "json")
    return json.loads(res.out), res.err.strip()


# -- finding them ----------------------------------------------------------------------------------


def test_finds_every_exact_and_reencoded_copy_and_the_resized_ones(vlm, leaky):
    rows, summary = _pairs(vlm, leaky.root, "-m", MODEL)
    exact = {(r["image_id_a"], r["image_id_b"]): r["kind"] for r in rows if r["kind"] != "near"}
    assert exact == {p: k for p, k in leaky.truth.items() if k != "near"}, "exact pairs are the planted ones"
    assert all(r["score"] == 1.0 and r["model"] is None for r in rows if r["kind"] != "near")
    near = {(r["image_id_a"], r["image_id_b"]): r["score"] for r in rows if r["kind"] == "near"}
    assert all(a < b for a, b in near) and len(near) == len([r for r in rows if r["kind"] == "near"])
    resized = [p for p, k in leaky.truth.items() if k == "near"]
    recall = sum(p in near for p in resized) / len(resized)
    assert recall >= 0.9, f"found {recall:.0%} of the resized JPEG copies"
    n_all = leaky.n_images * (leaky.n_images - 1) // 2
    unplanted = [p for p in near if p not in leaky.truth]
    assert len(unplanted) / n_all <= 0.01, f"{len(unplanted)} of {n_all} unrelated pairs flagged"
    # every planted copy sits in the test split, its original in train, with the same label
    assert all(r["same_split"] is False and r["same_label"] is True and r["same_group"] is False
               for r in rows if (r["image_id_a"], r["image_id_b"]) in leaky.truth)

    # the summary line, recomputed independently (scipy's connected components)
    distinct = {(r["image_id_a"], r["image_id_b"]): r for r in rows}
    ids = sorted({i for p in distinct for i in p})
    pos = {i: k for k, i in enumerate(ids)}
    graph = coo_matrix((np.ones(len(distinct)), ([pos[a] for a, _ in distinct], [pos[b] for _, b in distinct])),
                       shape=(len(ids), len(ids)))
    n_clusters = connected_components(graph, directed=False)[0]
    cross = sum(not r["same_split"] for r in distinct.values())
    mismatch = sum(not r["same_label"] for r in distinct.values())
    assert f"{len(distinct)} duplicate pairs" in summary and f"in {n_clusters} clusters" in summary, summary
    # exact copies are near ones too: the per-kind counts overlap, and the line must say so
    both = len(rows) - len(distinct)
    assert both > 0 and f"{both} found as exact and near" in summary, summary
    assert f"{cross} cross a split boundary, {mismatch} have different labels" in summary, summary
    assert rows[0]["same_split"] is False, "cross-split pairs come first"


def test_pixel_hash_is_the_decoded_rgb_array_and_is_filled_for_old_rows(vlm, leaky):
    from vlmindex.imageio import load_image

    before = dict(_count(leaky.root, "SELECT image_id, pixel_sha256 FROM images"))
    paths = dict(_count(leaky.root, "SELECT image_id, path FROM images"))
    for image_id in list(before)[:5]:
        arr = np.asarray(load_image(paths[image_id]))
        expect = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]}".encode() + arr.tobytes())
        assert before[image_id] == expect.hexdigest()
    with Workspace(leaky.root).write() as con:  # as a workspace ingested before the column existed
        con.execute("UPDATE images SET pixel_sha256 = NULL")
    rows, summary = _pairs(vlm, leaky.root)
    assert f"pixel hashes computed for {leaky.n_images} images" in summary
    assert dict(_count(leaky.root, "SELECT image_id, pixel_sha256 FROM images")) == before
    assert {(r["image_id_a"], r["image_id_b"]) for r in rows} == {p for p, k in leaky.truth.items() if k != "near"}


def test_union_find_components_match_scipy():
    from vlmindex.duplicates import cluster_keys, components

    rng = np.random.default_rng(3)
    a = rng.integers(0, 300, 200)
    b = rng.integers(0, 300, 200)
    keep = a != b
    a, b = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    comp = components(a, b)
    n, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(300, 300)), directed=False)
    for x in comp:
        members = np.flatnonzero(labels == labels[x])
        assert comp[x] == members.min()
    assert len(set(comp.values())) == len({labels[x] for x in comp})
    keys = cluster_keys(np.arange(300), a, b)
    assert [k is None for k in keys] == [x not in comp for x in range(300)]


# -- excluding them --------------------------------------------------------------------------------


def _loop_metrics(vectors, ids, labels, groups, clusters, query, gallery, *, k, exclude_group):
    """Per query (in id order): purity@k, AP, P@1, ranking the gallery minus the query, its
    cluster (and its group), by float64 cosine, ties by smaller id."""
    x = np.asarray(vectors, dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = {}
    for q in np.flatnonzero(query):
        cands = [g for g in np.flatnonzero(gallery) if g != q
                 and not (clusters[q] is not None and clusters[g] == clusters[q])
                 and not (exclude_group and groups[g] == groups[q])]
        order = sorted(cands, key=lambda g: (-float(x[q] @ x[g]), ids[g]))
        rel = np.array([labels[g] == labels[q] for g in order], dtype=float)
        r = rel.sum()
        if r == 0:
            out[int(ids[q])] = (np.nan, np.nan, np.nan)
            continue
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        out[int(ids[q])] = (rel[:k].sum() / k, float((prec * rel).sum() / r), rel[0])
    return out


def _stored(ws: Path, analysis_id: str) -> dict[int, tuple]:
    rows = _count(ws, "SELECT image_id, purity_at_k, ap, p_at_1 FROM query_metrics WHERE analysis_id = ?",
                  [analysis_id])
    return {r[0]: tuple(np.nan if v is None else v for v in r[1:]) for r in rows}


@pytest.mark.parametrize("split", [False, True], ids=["all-vs-all", "test-vs-train"])
def test_exclude_duplicates_matches_a_numpy_loop_and_lowers_inflated_metrics(vlm, leaky, split):
    from vlmindex.analyze import AnalyzeOptions, analyze, load_run
    from vlmindex.duplicates import components

    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL)
    ws = Workspace(leaky.root)
    pair_rows = _count(leaky.root, "SELECT image_id_a, image_id_b FROM duplicates WHERE dataset = 'leaky'")
    comp = components(np.array([r[0] for r in pair_rows]), np.array([r[1] for r in pair_rows]))
    run = load_run(ws, MODEL, "leaky")
    clusters = np.array([comp.get(int(i)) for i in run.ids], dtype=object)
    query = run.splits == "test" if split else np.ones(len(run.ids), bool)
    gallery = run.splits == "train" if split else np.ones(len(run.ids), bool)
    extra = {"query_split": "test", "gallery_split": "train"} if split else {}
    summaries = {}
    for exclude_group in (False, True):
        for exclude in (False, True):
            opts = AnalyzeOptions(k=5, probe=False, exclude_group=exclude_group, exclude_duplicates=exclude,
                                  duplicates_model=MODEL if exclude else None, **extra)
            summaries[exclude_group, exclude] = s = analyze(ws, MODEL, "leaky", options=opts)
            none = np.array([None] * len(run.ids), dtype=object)
            ref = _loop_metrics(run.vectors, run.ids, run.labels, run.groups, clusters if exclude else none,
                                query, gallery, k=5, exclude_group=exclude_group)
            got = _stored(leaky.root, s["analysis_id"])
            assert got.keys() == ref.keys()
            np.testing.assert_allclose(np.array([got[i] for i in sorted(got)], dtype=float),
                                       np.array([ref[i] for i in sorted(ref)], dtype=float), atol=1e-9, rtol=0)
    for g in (False, True):
        plain, excl = summaries[g, False], summaries[g, True]
        assert excl["p_at_1_micro"] < plain["p_at_1_micro"], "a planted copy is its original's first neighbour"
        assert excl["purity_micro"] < plain["purity_micro"]
        assert excl["exclude_duplicates"] is True and plain["exclude_duplicates"] is False
    scopes = {r["scope"] for r in json.loads(vlm(leaky.root, "sql", "leaderboard", "--format", "json").out)}
    assert any(f"duplicates-excluded(near {MODEL})" in s and "group-excluded" in s for s in scopes)
    assert len(scopes) == 4, "each option set is its own row of latest_summaries"
    prov = json.loads(_count(leaky.root, "SELECT provenance FROM summaries WHERE exclude_duplicates "
                                         "AND NOT exclude_group")[0][0])
    assert prov["duplicates_excluded"]["sources"] == ["exact", f"near {MODEL}/clean cosine >= 0.98"]


def test_kernel_excludes_the_union_of_group_and_cluster():
    """retrieval_metrics(clusters=...) against the loop on random data, with every combination."""
    rng = np.random.default_rng(5)
    n = 80
    x = rng.normal(size=(n, 6)).astype(np.float32)
    labels = rng.integers(0, 3, n).astype(str)
    groups = np.array([f"g{i // 3}" for i in range(n)], dtype=object)
    clusters = np.array([None] * n, dtype=object)
    clusters[::7] = "c0"      # spans many groups
    clusters[1::11] = "c1"
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    query = rng.random(n) < 0.6
    gallery = ~query | (rng.random(n) < 0.4)
    for exclude_group in (False, True):
        res = metrics.retrieval_metrics(x, labels, ids=ids, groups=groups, k=4, exclude_group=exclude_group,
                                        clusters=clusters, query_mask=query, gallery_mask=gallery)
        ref = _loop_metrics(x, ids, labels, groups, clusters, query, gallery, k=4, exclude_group=exclude_group)
        got = {int(i): (p, a, p1) for i, p, a, p1 in zip(res.query_id, res.purity_at_k, res.ap, res.p_at_1,
                                                           strict=True)}
        np.testing.assert_allclose(np.array([got[i] for i in sorted(got)], dtype=float),
                                   np.array([ref[i] for i in sorted(ref)], dtype=float), atol=1e-9, rtol=0)


def test_existing_analysis_ids_do_not_change():
    from vlmindex.analyze import AnalyzeOptions

    opts = AnalyzeOptions(k=7, exclude_group=True)
    old = {"model": "m", "dataset": "d", "condition": "clean", "k": 7, "exclude_group": True, "query_split": None,
           "gallery_split": None, "modality": None, "probe": True, "seed": 0}  # the options before the flag
    assert opts.analysis_id("m", "d", "clean") == hashlib.sha1(json.dumps(old, sort_keys=True).encode()
                                                               ).hexdigest()[:16]
    assert AnalyzeOptions(k=7, exclude_group=True, exclude_duplicates=True).analysis_id("m", "d", "clean") != \
        opts.analysis_id("m", "d", "clean")


def test_exclusion_needs_a_current_search(vlm, leaky, tmp_path):
    from vlmindex.analyze import AnalyzeOptions, is_current

    err = vlm(leaky.root, "analyze", "-m", MODEL, "-d", "leaky", "--exclude-duplicates", "--no-probe",
              expect=1).err
    assert err.startswith("Error: --exclude-duplicates needs the duplicate pairs")
    assert "vlmindex duplicates leaky" in err
    assert err.count("\n") == 1
    vlm(leaky.root, "duplicates", "leaky")
    vlm(leaky.root, "analyze", "-m", MODEL, "-d", "leaky", "-k", "5", "--exclude-duplicates", "--no-probe")
    opts = AnalyzeOptions(k=5, probe=False, exclude_duplicates=True)
    assert is_current(Workspace(leaky.root), MODEL, "leaky", options=opts)
    # --duplicates-model names whose near pairs join the exact ones; without its search, an error
    err = vlm(leaky.root, "analyze", "-m", MODEL, "-d", "leaky", "--exclude-duplicates", "--duplicates-model",
              MODEL, "--no-probe", expect=1).err
    assert f"--duplicates-model {MODEL} needs its near-duplicate pairs" in err and err.count("\n") == 1
    near = AnalyzeOptions(k=5, probe=False, exclude_duplicates=True, duplicates_model=MODEL)
    assert near.analysis_id(MODEL, "leaky", "clean") != opts.analysis_id(MODEL, "leaky", "clean")
    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL)
    # the exact-only analysis does not read near pairs: still current
    assert is_current(Workspace(leaky.root), MODEL, "leaky", options=opts)
    vlm(leaky.root, "analyze", "-m", MODEL, "-d", "leaky", "-k", "5", "--exclude-duplicates", "--duplicates-model",
        MODEL, "--no-probe")
    assert is_current(Workspace(leaky.root), MODEL, "leaky", options=near)
    # another near search replaces the pairs it excluded: that analysis is stale, the other is not
    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL, "--threshold", "0.999")
    assert not is_current(Workspace(leaky.root), MODEL, "leaky", options=near)
    assert is_current(Workspace(leaky.root), MODEL, "leaky", options=opts)


# -- storage rules ---------------------------------------------------------------------------------


def test_rerun_replaces_rows_and_replace_drops_them(vlm, leaky):
    sql = "SELECT dataset, image_id_a, image_id_b, kind, model, condition FROM duplicates ORDER BY ALL"
    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL)
    first = _count(leaky.root, sql)
    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL)
    rows = _count(leaky.root, sql)
    assert rows == first and len(rows) == len(set(rows)), "a rerun replaces its rows"
    assert _count(leaky.root, "SELECT kind, model, n_pairs FROM duplicate_searches ORDER BY kind") == [
        ("exact", None, N_EXACT + N_PNG + N_BMP), ("near", MODEL, sum(r[3] == "near" for r in rows))]
    # another threshold replaces that search's rows, and only those
    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL, "--threshold", "0.999")
    near = _count(leaky.root, "SELECT min(score), count(*), any_value(threshold) FROM duplicates WHERE kind = 'near'")
    assert near[0][0] >= 0.999 - 1e-6 and near[0][2] == 0.999
    assert _count(leaky.root, "SELECT count(*) FROM duplicates WHERE kind <> 'near'") == [(N_EXACT + N_PNG + N_BMP,)]
    # embeddings remove drops the near pairs of that run; ingest --replace drops everything
    vlm(leaky.root, "embeddings", "remove", "-m", MODEL, "-d", "leaky")
    assert _count(leaky.root, "SELECT count(*) FROM duplicates WHERE kind = 'near'") == [(0,)]
    assert _count(leaky.root, "SELECT count(*) FROM duplicates") == [(N_EXACT + N_PNG + N_BMP,)]
    vlm(leaky.root, "ingest", "leaky", leaky.source, "--format", "imagefolder", "--group-regex", GROUP_REGEX,
        "--replace")
    assert _count(leaky.root, "SELECT (SELECT count(*) FROM duplicates) + (SELECT count(*) FROM duplicate_searches)"
                  ) == [(0,)]


@pytest.mark.parametrize("stage", ["exact_pairs", "near_pairs"])
def test_search_overtaken_by_ingest_replace_stores_nothing(leaky, monkeypatch, tmp_path, stage):
    """An `ingest --replace` while a search computes: its pairs would describe images that are gone.
    (A replace with byte-identical images changes no input, and its pairs would still be right.)"""
    from vlmindex import duplicates
    from vlmindex.datasets import IngestOptions
    from vlmindex.ingest import ingest

    ws = Workspace(leaky.root)
    other = tmp_path / "other"
    shutil.copytree(leaky.source, other)
    next(other.glob("test/*/planted-exact-*.png")).unlink()  # one planted copy fewer
    original = getattr(duplicates, stage)

    def compute_then_replace(*args, **kwargs):
        out = original(*args, **kwargs)
        ingest(ws, "leaky", other, "imagefolder", IngestOptions(group_regex=GROUP_REGEX), replace=True,
               progress=False)
        return out

    monkeypatch.setattr(duplicates, stage, compute_then_replace)
    with pytest.raises(InputsChanged, match="changed while it was computed"):
        duplicates.find_duplicates(ws, "leaky", duplicates.DuplicateOptions(model=MODEL))
    assert _count(leaky.root, "SELECT (SELECT count(*) FROM duplicates) + (SELECT count(*) FROM duplicate_searches)"
                  ) == [(0,)]


def test_analysis_overtaken_by_a_new_search_stores_nothing(vlm, leaky, monkeypatch):
    from vlmindex.analyze import AnalyzeOptions, analyze
    from vlmindex.duplicates import DuplicateOptions, find_duplicates

    ws = Workspace(leaky.root)
    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL)
    original = metrics.retrieval_metrics

    def rank_then_search(*args, **kwargs):
        out = original(*args, **kwargs)
        find_duplicates(ws, "leaky", DuplicateOptions(model=MODEL, threshold=0.999))
        return out

    monkeypatch.setattr(metrics, "retrieval_metrics", rank_then_search)
    with pytest.raises(InputsChanged, match="changed while it was computed"):
        analyze(ws, MODEL, "leaky", options=AnalyzeOptions(k=5, probe=False, exclude_duplicates=True,
                                                           duplicates_model=MODEL))
    assert _count(leaky.root, "SELECT count(*) FROM summaries") == [(0,)]


def test_one_line_errors(vlm, leaky):
    cases = [
        (["duplicates", "nope"], "unknown dataset 'nope'"),
        (["duplicates", "leaky", "-m", "hog"], "run `vlmindex embed --model hog --dataset leaky"),
        (["duplicates", "leaky", "-m", MODEL, "-c", "wrong"], "has no condition 'wrong'"),
    ] + [(["duplicates", "leaky", "-m", MODEL, "--threshold", t], "--threshold must be a cosine in (0, 1]")
         for t in ("0", "-0.5", "1.01", "nan")]
    for args, message in cases:
        err = vlm(leaky.root, *args, expect=1).err
        assert err.startswith("Error: ") and message in err and err.count("\n") == 1, (args, err)
    assert _count(leaky.root, "SELECT count(*) FROM duplicate_searches") == [(0,)]


def test_threshold_one_finds_identical_vectors_only(leaky):
    from vlmindex.duplicates import DuplicateOptions, find_duplicates

    found = find_duplicates(Workspace(leaky.root), "leaky", DuplicateOptions(model=MODEL, threshold=1.0))
    near = {(r["image_id_a"], r["image_id_b"]) for r in found.rows if r["kind"] == "near"}
    assert near == {p for p, k in leaky.truth.items() if k != "near"}, "exact copies embed to the same vector"
    emb = read_run(Workspace(leaky.root), RunKey(MODEL, "leaky"))
    assert len(emb.ids) == leaky.n_images


# -- SQL, report, study, migration -------------------------------------------------------------------


def test_leaks_sql_counts_per_kind(vlm, leaky):
    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL)
    rows = {r["kind"]: r for r in json.loads(vlm(leaky.root, "sql", "leaks", "--format", "json").out)}
    assert rows["exact-bytes"]["pairs"] == rows["exact-bytes"]["cross_split"] == N_EXACT
    assert rows["exact-pixels"]["pairs"] == N_PNG + N_BMP and rows["exact-pixels"]["images"] == 2 * (N_PNG + N_BMP)
    assert rows["exact-pixels"]["test_images"] == N_PNG + N_BMP and rows["exact-pixels"]["label_mismatch"] == 0
    stored = _count(leaky.root, "SELECT count(*), count(*) FILTER (WHERE NOT same_split), "
                                "count(*) FILTER (WHERE NOT same_label) FROM duplicates WHERE kind = 'near'")[0]
    assert (rows["near"]["pairs"], rows["near"]["cross_split"], rows["near"]["label_mismatch"]) == stored
    assert rows["near"]["model"] == MODEL and rows["near"]["threshold"] == 0.98


def test_report_shows_planted_pairs_as_thumbnails(vlm, leaky, synth_ws):
    from vlmindex.report import ReportOptions, build_report

    vlm(leaky.root, "duplicates", "leaky", "-m", MODEL)
    vlm(leaky.root, "analyze", "-m", MODEL, "-d", "leaky", "-k", "5", "--no-probe")
    html, _ = build_report(Workspace(leaky.root), ReportOptions(max_points=0, n_boot=50))
    section = html[html.index("<section id='duplicates'>"):html.index("<section id='provenance'>")]
    a, b = next(p for p, k in leaky.truth.items() if k == "exact-pixels")
    pair = re.search(rf"<div class='dup cross' data-a='{a}' data-b='{b}'>(.*?)</div>", section)
    assert pair, "a planted cross-split pair is shown"
    uris = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", pair.group(1))
    assert len(uris) == 2
    for uri in uris:
        thumb = Image.open(io.BytesIO(base64.b64decode(uri)))
        assert thumb.format == "PNG" and max(thumb.size) == 64
    assert "exact-pixels" in pair.group(1)
    assert "<b>test / train</b>" in pair.group(1) or "<b>train / test</b>" in pair.group(1)
    assert "img-src data:" in html and "http" not in section

    # a dataset without stored pairs gets the one-line note instead
    vlm(synth_ws, "embed", "-m", MODEL, "-d", "demo", "--workers", "0")
    vlm(synth_ws, "analyze", "-m", MODEL, "-d", "demo", "-k", "5", "--no-probe")
    html, _ = build_report(Workspace(synth_ws), ReportOptions(max_points=0, n_boot=50))
    section = html[html.index("<section id='duplicates'>"):html.index("<section id='provenance'>")]
    assert "<img" not in section and "no duplicate pairs stored; find them with <code>vlmindex duplicates demo" \
        in section


def test_study_accepts_exclude_duplicates_and_runs_the_search_first(vlm, tmp_path):
    study = tmp_path / "dups.toml"
    study.write_text("""
[[datasets]]
name = "mini"
synth = { seed = 3, lesions_per_class = 3, views_per_lesion = 2, size = 64 }

[models]
names = ["hog", "raw-pixels"]

[analysis]
k = 3
probe = false
exclude_duplicates = true
duplicates_model = "raw-pixels"

[embed]
num_workers = 0
""")
    ws = tmp_path / "ws"
    first = vlm(ws, "run", study, "--format", "json")
    board = json.loads(first.out)
    assert sorted(r["scope"] for r in board) == ["k=3 no-probe duplicates-excluded(near raw-pixels)"] * 2
    # the duplicates model goes first, though listed second: hog's analysis needs its search
    assert first.err.index("duplicates raw-pixels mini") < first.err.index("analyze hog mini")
    assert first.err.count("duplicates ") == 1, "one search, for every model"
    assert _count(ws, "SELECT kind, model FROM duplicate_searches ORDER BY kind") == [("exact", None),
                                                                                       ("near", "raw-pixels")]
    second = vlm(ws, "run", study, "--format", "json")
    assert "0 step(s) run" in second.err
    study.write_text(study.read_text().replace('duplicates_model = "raw-pixels"', 'duplicates_model = "clip"'))
    err = vlm(ws, "run", study, expect=1).err
    assert "[analysis] duplicates_model = 'clip' is not in [models] names" in err
    study.write_text(study.read_text().replace('duplicates_model = "clip"', 'duplicates_model = "raw-pixels"'))
    study.write_text(study.read_text().replace("exclude_duplicates = true", 'exclude_duplicates = "yes"'))
    err = vlm(ws, "run", study, expect=1).err
    assert "[analysis] exclude_duplicates must be true or false" in err


def test_v2_workspace_is_migrated(vlm, synth_ws):
    from vlmindex.analyze import AnalyzeOptions, is_current
    from vlmindex.catalog import workspace as wsmod

    vlm(synth_ws, "embed", "-m", MODEL, "-d", "demo", "--workers", "0")
    vlm(synth_ws, "analyze", "-m", MODEL, "-d", "demo", "-k", "5", "--no-probe")
    hashes = dict(_count(synth_ws, "SELECT image_id, pixel_sha256 FROM images"))
    ws = Workspace(synth_ws)
    with ws.write() as con:  # back to what vlmindex wrote before v3
        con.execute("DROP VIEW latest_summaries")
        con.execute("ALTER TABLE images DROP COLUMN pixel_sha256")
        con.execute("ALTER TABLE summaries DROP COLUMN exclude_duplicates")
        con.execute("DROP TABLE duplicates")
        con.execute("DROP TABLE duplicate_searches")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with ws.read() as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
            wsmod.SCHEMA_VERSION)
        got = con.execute("SELECT exclude_duplicates, scope FROM latest_summaries").fetchall()
        assert got == [(False, "k=5 no-probe")]
        assert con.execute("SELECT count(*) FROM images WHERE pixel_sha256 IS NULL").fetchone()[0] == len(hashes)
    assert is_current(ws, MODEL, "demo", options=AnalyzeOptions(k=5, probe=False)), "the old analysis keeps its id"
    vlm(synth_ws, "duplicates", "demo")
    assert dict(_count(synth_ws, "SELECT image_id, pixel_sha256 FROM images")) == hashes


def test_file_changed_since_ingest_is_reported_not_hashed(vlm, leaky):
    """A file whose bytes are not the recorded ones is not hashed from what is on disk now: it is
    compared by its recorded file hash only, and the summary says so."""
    with Workspace(leaky.root).write() as con:
        con.execute("UPDATE images SET pixel_sha256 = NULL, sha256 = 'not-the-file'"
                    " WHERE image_id = (SELECT min(image_id) FROM images)")
    _, summary = _pairs(vlm, leaky.root)
    assert "1 images compared by file bytes only" in summary and "changed since it was ingested" in summary
    assert _count(leaky.root, "SELECT pixel_sha256 FROM images WHERE sha256 = 'not-the-file'") == [(None,)]


def test_a_model_without_embeddings_is_named_with_the_ones_that_have_some(served_ws, vlm):
    res = vlm(served_ws, "duplicates", "demo", "-m", "nonexist", expect=1)
    assert res.err.count("\n") == 1 and "'nonexist' is not a model of `vlmindex models`" in res.err
    assert "models with embeddings there: hog, raw-pixels" in res.err
    res = vlm(served_ws, "analyze", "-m", "color-hist", "-d", "demo", expect=1)
    assert "run `vlmindex embed --model color-hist" in res.err and "hog, raw-pixels" in res.err
