"""`vlmindex serve`: every route, every refusal, neighbours checked against a plain numpy ranking,
and a service that keeps answering (never with a stale or damaged index) while writers work."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vlmindex.catalog import RunKey, Workspace
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.catalog.embeddings import read_run
from vlmindex.index import normalise
from vlmindex.serve import Limits, NeighbourService, create_app
from vlmindex.thumbnails import shrink

MODELS = ("hog", "raw-pixels")  # conftest.SERVED_MODELS


def _cli(ws: Path, *args: object) -> None:
    from vlmindex.cli import main

    main(["-w", str(ws), *map(str, args)])


@pytest.fixture
def client(served_ws):
    service = NeighbourService(Workspace(served_ws))
    with TestClient(create_app(service)) as c:
        yield c
    service.close()


def _images(ws: Path) -> list[tuple]:
    with Workspace(ws).read(views=False) as con:
        return catalog_datasets.images(con, "demo", columns=("image_id", "path", "label", "group_id", "modality"))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_datasets_models_and_leaderboard(client, served_ws):
    ds = client.get("/api/datasets").json()["datasets"]
    assert [d["name"] for d in ds] == ["demo"] and ds[0]["images"] == 72
    assert "source" not in ds[0]  # a file-system path never leaves the server

    models = client.get("/api/models", params={"dataset": "demo"}).json()["models"]
    assert sorted(m["model"] for m in models) == sorted(MODELS)
    for m in models:
        assert sorted(c["condition"] for c in m["conditions"]) == ["clean", "lbl"]
        assert all(c["current"] is True and c["count"] == 72 for c in m["conditions"])

    rows = client.get("/api/leaderboard", params={"dataset": "demo"}).json()["rows"]
    from vlmindex.catalog import results

    with Workspace(served_ws).read() as con:
        stored = {s["analysis_id"]: s for s in results.latest_summaries(con, "demo")}
    assert {r["analysis_id"] for r in rows} == set(stored) and len(rows) == 2
    for r in rows:
        assert r["map_micro"] == pytest.approx(stored[r["analysis_id"]]["map_micro"])
        assert r["scope"] == stored[r["analysis_id"]]["scope"]


def test_knn_by_image_id_matches_a_numpy_ranking_and_starts_with_itself(client, served_ws):
    ws = Workspace(served_ws)
    meta = {r[0]: r for r in _images(served_ws)}
    for model in MODELS:
        run = read_run(ws, RunKey(model, "demo", "clean"))
        x = normalise(run.vectors)
        for q in (0, 17, 71):
            image_id = int(run.ids[q])
            out = client.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "models": model,
                                                "k": 8}).json()
            got = out["results"][model]
            assert got[0]["image_id"] == image_id and got[0]["score"] == pytest.approx(1.0, abs=1e-5)
            assert got[0]["is_query"] and out["query"]["in_catalog"]
            scores = x @ x[q]
            want = np.argsort(-scores, kind="stable")[:8]
            np.testing.assert_allclose([r["score"] for r in got], scores[want], atol=1e-5)
            # ties aside (equal scores may come in either order), the same images
            assert {r["image_id"] for r in got if r["score"] > scores[want][-1] + 1e-5} <= set(run.ids[want].tolist())
            for r in got:
                assert r["label"] == meta[r["image_id"]][2]
                assert r["same_group"] == (meta[r["image_id"]][3] == meta[image_id][3])
                assert r["same_class"] == (meta[r["image_id"]][2] == meta[image_id][2])
                assert r["thumbnail_url"] == f"/api/images/{r['image_id']}/thumbnail"


def test_upload_of_a_catalog_image_is_recognised_and_embedded_with_each_models_preprocessing(client, served_ws):
    image_id, path, label, group, _ = _images(served_ws)[5]
    data = Path(path).read_bytes()
    out = client.post("/api/knn", data={"dataset": "demo", "k": "5"}, files={"file": ("q.png", data)}).json()
    assert out["query"]["in_catalog"] and out["query"]["image_id"] == image_id and out["query"]["label"] == label
    assert sorted(out["results"]) == sorted(MODELS)
    for model in MODELS:
        rows = out["results"][model]
        assert len(rows) == 5 and rows[0]["image_id"] == image_id and rows[0]["score"] == pytest.approx(1, abs=1e-5)
        assert [r["same_group"] for r in rows] == [r["group_id"] == group for r in rows]

    # the same pixels in another file (other compression): found by the decoded-pixel hash
    again = io.BytesIO()
    Image.open(io.BytesIO(data)).save(again, format="PNG", compress_level=0)
    assert again.getvalue() != data
    out = client.post("/api/knn", data={"dataset": "demo", "k": "3"}, files={"file": ("q.png", again.getvalue())})
    assert out.json()["query"]["image_id"] == image_id


def test_an_upload_a_model_embeds_as_all_zeros_is_refused_not_answered(client):
    """A uniform image has no gradients, so hog embeds it as all zeros. Every gallery image then
    scores 0, and its 'neighbours' would be the lowest image_ids. `embed` leaves such vectors out
    of the analyses; the service says so instead of ranking on them (400, one line, naming the model)."""
    uniform = _png(Image.new("RGB", (96, 96), (128, 128, 128)))
    res = client.post("/api/knn", data={"dataset": "demo", "models": "hog"}, files={"file": ("q.png", uniform)})
    assert res.status_code == 400, res.json()
    body = res.json()
    assert "hog" in body["error"] and "all zeros" in body["error"] and "\n" not in body["error"]
    assert body["choices"] == ["raw-pixels"]  # the models that can be asked instead
    # a model that gives it a usable vector still answers
    ok = client.post("/api/knn", data={"dataset": "demo", "models": "raw-pixels", "k": "3"},
                     files={"file": ("q.png", uniform)})
    assert ok.status_code == 200 and len(ok.json()["results"]["raw-pixels"]) == 3


def test_query_of_an_image_a_model_embeds_as_all_zeros_is_one_line(served_ws, vlm, tmp_path):
    uniform = tmp_path / "grey.png"
    Image.new("RGB", (96, 96), (128, 128, 128)).save(uniform)
    res = vlm(served_ws, "query", uniform, "-m", "hog", "-d", "demo", expect=1)
    assert res.err.count("\n") == 1 and "grey.png" in res.err and "all zeros" in res.err and not res.out


def test_upload_outside_the_catalog(client, served_ws):
    _, path, label, _, _ = _images(served_ws)[5]
    flipped = _png(Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    out = client.post("/api/knn", data={"dataset": "demo", "k": "4", "models": "hog"},
                      files={"file": ("q.png", flipped)}).json()
    assert out["query"]["in_catalog"] is False and list(out["results"]) == ["hog"]
    assert all(r["same_class"] is None and not r["is_query"] for r in out["results"]["hog"])
    out = client.post("/api/knn", data={"dataset": "demo", "k": "4", "models": "hog", "label": label},
                      files={"file": ("q.png", flipped)}).json()
    assert [r["same_class"] for r in out["results"]["hog"]] == [r["label"] == label for r in out["results"]["hog"]]
    # under a condition that writes the class, an unknown image needs its class
    res = client.post("/api/knn", data={"dataset": "demo", "condition": "lbl"}, files={"file": ("q.png", flipped)})
    assert res.status_code == 400 and "label" in res.json()["error"]
    res = client.post("/api/knn", data={"dataset": "demo", "condition": "lbl", "label": label},
                      files={"file": ("q.png", flipped)})
    assert res.status_code == 200 and res.json()["condition"] == "lbl"


def test_thumbnails_show_the_pixels_embedded(client, served_ws):
    from vlmindex.imageio import load_image
    from vlmindex.overlay import apply_overlay, get_condition

    image_id, path, label, _, modality = _images(served_ws)[3]
    clean = client.get(f"/api/images/{image_id}/thumbnail", params={"size": 48})
    assert clean.status_code == 200 and clean.headers["content-type"] == "image/png"
    assert clean.content == shrink(load_image(path), 48)
    over = client.get(f"/api/images/{image_id}/thumbnail", params={"size": 64, "condition": "lbl"})
    with Workspace(served_ws).read(views=False) as con:
        recipe = get_condition(con, "demo", "lbl")
        names = tuple(catalog_datasets.class_pools(con, "demo")[modality])
    want = apply_overlay(load_image(path), recipe, image_id=image_id, label=label, class_names=names)
    assert over.content == shrink(want, 64)
    assert np.abs(np.asarray(Image.open(io.BytesIO(over.content)), dtype=int)
                  - np.asarray(Image.open(io.BytesIO(shrink(load_image(path), 64))), dtype=int)).max() > 50


@pytest.mark.parametrize("method,url,kwargs,status,needle", [
    ("get", "/api/models", {"params": {"dataset": "nope"}}, 404, "unknown dataset"),
    ("get", "/api/models", {"params": {"dataset": "../../etc"}}, 404, "unknown dataset"),
    ("get", "/api/leaderboard", {"params": {"dataset": "demo/../../x"}}, 404, "unknown dataset"),
    ("get", "/api/models", {}, 400, "dataset"),
    ("post", "/api/knn", {"json": {"image_id": 1, "dataset": "nope"}}, 404, "unknown dataset"),
    ("post", "/api/knn", {"json": {"image_id": 1, "dataset": "demo", "models": "../hog"}}, 404, "no index"),
    ("post", "/api/knn", {"json": {"image_id": 1, "dataset": "demo", "condition": "../../catalog"}}, 404,
     "unknown condition"),
    ("post", "/api/knn", {"json": {"image_id": 1, "dataset": "demo"}}, 404, "no image with image_id 1"),
    ("post", "/api/knn", {"json": {"image_id": "../../etc/passwd", "dataset": "demo"}}, 400, "not an integer"),
    ("post", "/api/knn", {"json": {"image_id": 1, "dataset": "demo", "k": 0}}, 400, "k=0"),
    ("post", "/api/knn", {"json": [1, 2]}, 400, "JSON body must be an object"),
    ("post", "/api/knn", {"content": b"{not json"}, 400, "neither JSON"),
    ("post", "/api/knn", {"json": {"dataset": "demo"}}, 400, "image_id"),
    ("post", "/api/knn", {"data": {"dataset": "demo"}, "files": {"file": ("x.png", b"not an image")}}, 400,
     "can be decoded"),
    ("get", "/api/images/1/thumbnail", {}, 404, "no image with image_id 1"),
    ("get", "/api/images/..%2F..%2Fcatalog.duckdb/thumbnail", {}, 404, ""),
    ("get", "/api/images/abc/thumbnail", {}, 400, "image_id"),
    ("get", "/explore/hog", {"params": {"dataset": "../demo"}}, 404, "unknown dataset"),
    ("get", "/explore/hog/demo/clean/..%2F..%2F..%2F..%2Fcatalog.duckdb", {}, 404, "explorer"),
    ("get", "/explore/..%2F..%2Fcatalog.duckdb", {"params": {"dataset": "demo"}}, 404, ""),
    ("get", "/explore/hog/demo/..%2F..%2Fembeddings/index.html", {}, 404, "unknown condition"),
])
def test_refusals_are_one_line_json_with_the_status(client, method, url, kwargs, status, needle):
    res = getattr(client, method)(url, **kwargs)
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) <= {"error", "choices"} and "\n" not in body["error"] and needle in body["error"]
    assert "SQLite" not in res.text and "DUCK" not in res.text  # never file content


def test_unknown_names_list_the_valid_choices(client, served_ws):
    image_id = _images(served_ws)[0][0]
    res = client.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "models": "clip"})
    assert res.status_code == 404 and res.json()["choices"] == sorted(MODELS)
    res = client.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "condition": "typo"})
    assert res.status_code == 404 and res.json()["choices"] == ["clean", "lbl"]
    res = client.get(f"/api/images/{image_id}/thumbnail", params={"condition": "typo"})
    assert res.status_code == 404 and res.json()["choices"] == ["clean", "lbl"]
    res = client.get(f"/api/images/{image_id}/thumbnail", params={"size": 4096})
    assert res.status_code == 400 and "size=4096" in res.json()["error"]


def test_uploads_over_the_byte_or_pixel_limit_get_413(served_ws):
    _, path, *_ = _images(served_ws)[0]
    data = Path(path).read_bytes()
    service = NeighbourService(Workspace(served_ws), limits=Limits(max_bytes=len(data) - 1))
    with TestClient(create_app(service)) as c:
        res = c.post("/api/knn", data={"dataset": "demo"}, files={"file": ("q.png", data)})
        assert res.status_code == 413 and "limit" in res.json()["error"]
        big = b"x" * (len(data) + 200_000)  # over the limit and the form's overhead: refused before parsing
        res = c.post("/api/knn", data={"dataset": "demo"}, files={"file": ("q.png", big)})
        assert res.status_code == 413
    service = NeighbourService(Workspace(served_ws), limits=Limits(max_pixels=32 * 32))
    with TestClient(create_app(service)) as c:
        res = c.post("/api/knn", data={"dataset": "demo"}, files={"file": ("q.png", data)})
        assert res.status_code == 413 and "pixels" in res.json()["error"]
    truncated = data[: len(data) // 2]
    with TestClient(create_app(NeighbourService(Workspace(served_ws)))) as c:
        res = c.post("/api/knn", data={"dataset": "demo"}, files={"file": ("q.png", truncated)})
        assert res.status_code == 400 and "decoded" in res.json()["error"]


def test_models_load_once_and_the_cache_is_bounded(served_ws, monkeypatch):
    from vlmindex.models import LoadOptions

    loads: list[str] = []
    real = LoadOptions.load

    def counting(self, name):
        loads.append(name)
        return real(self, name)

    monkeypatch.setattr(LoadOptions, "load", counting)
    _, path, *_ = _images(served_ws)[0]
    data = Path(path).read_bytes()
    service = NeighbourService(Workspace(served_ws), limits=Limits(max_models=1))
    with TestClient(create_app(service)) as c:
        for _ in range(3):
            assert c.post("/api/knn", data={"dataset": "demo", "models": "hog"},
                          files={"file": ("q.png", data)}).status_code == 200
        assert loads == ["hog"]
        c.post("/api/knn", data={"dataset": "demo", "models": "raw-pixels"}, files={"file": ("q.png", data)})
        assert loads == ["hog", "raw-pixels"] and list(service._models) == ["raw-pixels"]


def test_ivf_indexes_are_memory_mapped_and_flat_ones_read(served_ws, tmp_path):
    """IVF lists stay a shared file mapping; flat codes are read into memory (their offset in the
    file is unaligned: BLAS over a mapped view was 6x slower)."""
    root = _copy_ws(served_ws, tmp_path / "ws")
    _cli(root, "index", "build", "-m", "raw-pixels", "-d", "demo", "--kind", "ivf")
    ws = Workspace(root)
    service = NeighbourService(ws)
    image_id = _images(root)[0][0]
    for model in MODELS:
        out = service.knn("demo", models=[model], image_id=image_id, k=3)
        assert out["results"][model][0]["image_id"] == image_id
    maps = Path("/proc/self/maps").read_text()
    assert str(ws.index_path("raw-pixels", "demo", "clean")) in maps
    assert str(ws.index_path("hog", "demo", "clean")) not in maps
    service.close()


def test_approximate_searches_of_two_requests_run_at_once(served_ws, tmp_path, monkeypatch):
    """Found by the load benchmark: the batcher let one search run at a time, which suits a flat
    scan (a batch costs hardly more than one query) but not a graph or inverted lists, whose
    queries cost the same alone as in a batch: under load the searches of requests queued on one
    core. Two requests on an approximate index search at the same time, each its own query for
    its own k (as `vlmindex query -k` does; batched, every query had to ask for the largest k)."""
    from vlmindex import index as vlm_index

    root = _copy_ws(served_ws, tmp_path / "ws")
    _cli(root, "index", "build", "-m", "raw-pixels", "-d", "demo", "--kind", "hnsw")
    service = NeighbourService(Workspace(root))
    images = [r[0] for r in _images(root)[:2]]
    for image_id in images:  # the snapshot opened and checked before the searches are timed
        service.knn("demo", models=["raw-pixels"], image_id=image_id, k=3)
    together = threading.Barrier(2, timeout=10)
    batch_sizes: list[tuple[int, int]] = []
    real = vlm_index.search

    def search(index, queries, k, **kwargs):
        batch_sizes.append((len(queries), k))
        together.wait()  # both requests inside a search at once, or a BrokenBarrierError
        return real(index, queries, k, **kwargs)

    monkeypatch.setattr(vlm_index, "search", search)
    firsts: dict[int, int] = {}

    def request(image_id: int) -> None:
        firsts[image_id] = service.knn("demo", models=["raw-pixels"], image_id=image_id, k=3)[
            "results"]["raw-pixels"][0]["image_id"]

    threads = [threading.Thread(target=request, args=(i,)) for i in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.close()
    assert batch_sizes == [(1, 3), (1, 3)] and firsts == {i: i for i in images}


def test_errors_name_no_server_path(served_ws, tmp_path):
    root = _copy_ws(served_ws, tmp_path / "ws")
    ws = Workspace(root)
    rows = _images(root)
    with TestClient(create_app(NeighbourService(ws))) as c:
        path = ws.index_path("hog", "demo", "clean")
        path.write_bytes(path.read_bytes()[:-64] + b"\0" * 64)
        res = c.post("/api/knn", json={"image_id": rows[0][0], "dataset": "demo", "models": "hog"})
        assert res.status_code == 409 and "damaged" in res.json()["error"] and str(root) not in res.text
    # an image file gone from under the catalog: a 409 that names the image, not its file
    gone = tmp_path / "gone.png"
    shutil.copy(rows[1][1], gone)
    with ws.write() as con:
        con.execute("UPDATE images SET path = ? WHERE image_id = ?", [str(gone), rows[1][0]])
    gone.unlink()
    with TestClient(create_app(NeighbourService(ws))) as c:
        res = c.get(f"/api/images/{rows[1][0]}/thumbnail")
        assert res.status_code == 409 and str(gone) not in res.text and str(rows[1][0]) in res.text


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # a valid header and a first data chunk: what PIL reads before it knows the size
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_pixel_bomb_is_too_large_not_broken(client):
    for side in (10_000, 30_000):  # under and over PIL's own decompression-bomb limit
        res = client.post("/api/knn", data={"dataset": "demo"}, files={"file": ("bomb.png", _png_header(side, side))})
        assert res.status_code == 413, (side, res.text)


def test_out_of_range_ids_and_internal_errors_are_one_line_json(served_ws, monkeypatch):
    service = NeighbourService(Workspace(served_ws))
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        res = c.post("/api/knn", json={"image_id": 10**40, "dataset": "demo"})
        assert res.status_code == 400 and "out of range" in res.json()["error"]
        res = c.get(f"/api/images/{10**40}/thumbnail")
        assert res.status_code == 400 and "out of range" in res.json()["error"]
        monkeypatch.setattr(service, "datasets", lambda: (_ for _ in ()).throw(RuntimeError(str(served_ws))))
        res = c.get("/api/datasets")
        assert res.status_code == 500 and res.json() == {"error": "internal error: RuntimeError"}


def test_thumbnails_follow_a_replaced_overlay(served_ws, tmp_path):
    root = _copy_ws(served_ws, tmp_path / "ws")
    image_id = _images(root)[0][0]
    with TestClient(create_app(NeighbourService(Workspace(root)))) as c:
        before = c.get(f"/api/images/{image_id}/thumbnail", params={"condition": "lbl", "size": 64}).content
        _cli(root, "overlay", "add", "demo", "lbl", "--text", "fixed:HELLO WORLD", "--replace")
        after = c.get(f"/api/images/{image_id}/thumbnail", params={"condition": "lbl", "size": 64}).content
    assert before != after


def test_explorer_assets_stay_inside_the_published_app(served_ws, tmp_path):
    from vlmindex.explore import app_dir

    root = _copy_ws(served_ws, tmp_path / "ws")
    app = app_dir(Workspace(root), RunKey("hog", "demo", "clean"))
    (app / "assets").mkdir(parents=True)
    (app / "index.html").write_text("<!doctype html><title>atlas</title>")
    (app / "assets" / "a.js").write_text("console.log(1)")
    (app / "assets" / "out.txt").symlink_to(root / "catalog.duckdb")
    with TestClient(create_app(NeighbourService(Workspace(root)))) as c:
        assert c.get("/explore/hog", params={"dataset": "demo"}, follow_redirects=False).status_code == 307
        assert c.get("/explore/hog/demo/clean/").text.startswith("<!doctype html>")
        res = c.get("/explore/hog/demo/clean/assets/a.js")
        assert res.status_code == 200 and res.text == "console.log(1)"
        for bad in ("..%2F..%2F..%2F..%2Fcatalog.duckdb", "assets/out.txt", "%2Fetc%2Fpasswd"):
            res = c.get(f"/explore/hog/demo/clean/{bad}")
            assert res.status_code == 404 and "no file" in res.json()["error"], bad


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _copy_ws(served_ws: Path, dest: Path) -> Path:
    """A private copy of the workspace (images stay where the catalog says they are)."""
    shutil.copytree(served_ws, dest, ignore=shutil.ignore_patterns(".lock", "explore"))
    return dest


def test_index_rebuilt_while_serving_never_fails_a_request(served_ws, tmp_path):
    root = _copy_ws(served_ws, tmp_path / "ws")
    image_id = _images(root)[0][0]
    service = NeighbourService(Workspace(root))
    errors: list[str] = []
    stop = threading.Event()

    def hammer():
        with TestClient(create_app(service)) as c:
            while not stop.is_set():
                res = c.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "k": 3})
                if res.status_code != 200 or res.json()["results"]["hog"][0]["image_id"] != image_id:
                    errors.append(f"{res.status_code} {res.text[:200]}")

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):  # another process, as a user's `index build` beside `serve` would be
            subprocess.run([sys.executable, "-m", "vlmindex", "-w", str(root), "index", "build", "-m", "hog",
                            "-d", "demo", "--force"], check=True, capture_output=True, env=_env())
    finally:
        stop.set()
        for t in threads:
            t.join()
    service.close()
    assert errors == []


def test_an_index_removed_or_built_while_serving_is_seen_by_requests_naming_it(served_ws, tmp_path, monkeypatch):
    root = _copy_ws(served_ws, tmp_path / "ws")
    ws = Workspace(root)
    image_id = _images(root)[0][0]
    service = NeighbourService(ws)
    walks = []
    walk = NeighbourService._index_files
    monkeypatch.setattr(NeighbourService, "_index_files", lambda self: walks.append(1) or walk(self))
    ask = {"image_id": image_id, "dataset": "demo", "models": "hog"}
    with TestClient(create_app(service)) as c:
        assert c.post("/api/knn", json=ask).status_code == 200
        walked = len(walks)
        for _ in range(3):
            assert c.post("/api/knn", json=ask).status_code == 200
        assert len(walks) == walked  # named models: their own files are stat'ed, the folder is not walked
        for n in range(20):  # names a request made up are looked for, not remembered
            assert c.post("/api/knn", json={**ask, "models": f"made-up-{n}"}).status_code == 404
        assert {key.model for key in service._key_paths} <= {"hog", "raw-pixels"}
        for p in ws.index_path("hog", "demo", "clean").parent.glob("clean.*"):  # the index and its sidecar
            p.unlink()
        res = c.post("/api/knn", json=ask)
        assert res.status_code == 404 and res.json()["choices"] == ["raw-pixels"]
        assert c.post("/api/knn", json={**ask, "models": "raw-pixels"}).status_code == 200
        subprocess.run([sys.executable, "-m", "vlmindex", "-w", str(root), "index", "build", "-m", "hog",
                        "-d", "demo"], check=True, capture_output=True, env=_env())
        res = c.post("/api/knn", json=ask)
        assert res.status_code == 200 and res.json()["results"]["hog"][0]["image_id"] == image_id
        assert sorted(c.post("/api/knn", json={**ask, "models": ""}).json()["results"]) == ["hog", "raw-pixels"]
    service.close()


def test_a_stale_or_damaged_index_is_refused_not_served(served_ws, tmp_path):
    root = _copy_ws(served_ws, tmp_path / "ws")
    ws = Workspace(root)
    image_id = _images(root)[0][0]
    service = NeighbourService(ws)
    with TestClient(create_app(service)) as c:
        assert c.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "k": 3}).status_code == 200
        # damaged in place (not an atomic replacement): the checksum says so
        path = ws.index_path("hog", "demo", "clean")
        raw = bytearray(path.read_bytes())
        raw[-64:] = b"\0" * 64
        path.write_bytes(bytes(raw))
        res = c.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "models": "hog"})
        assert res.status_code == 409 and "damaged" in res.json()["error"]
        # the other model is untouched and still answers
        assert c.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "models": "raw-pixels"}
                      ).status_code == 200
        # embeddings that changed after the index was built: stale, refused
        subprocess.run([sys.executable, "-m", "vlmindex", "-w", str(root), "index", "build", "-m", "hog",
                        "-d", "demo", "--force"], check=True, capture_output=True, env=_env())
        assert c.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "models": "hog"}).status_code == 200
        part = sorted(ws.embeddings_dir("raw-pixels", "demo", "clean").glob("*.parquet"))[0]
        part.unlink()
        res = c.post("/api/knn", json={"image_id": image_id, "dataset": "demo", "models": "raw-pixels"})
        assert res.status_code == 409 and "stale" in res.json()["error"]
    service.close()


def test_an_approximate_result_gains_the_querys_own_image_when_the_index_missed_it():
    """HNSW can miss a stored vector's own entry (seen once in 800 queries at 100k): a query by
    image_id must still find the image itself first, at its exact score."""
    from vlmindex.serve.service import with_own_vector

    v = np.array([3.0, 4.0], np.float32)  # cosine with itself: 1
    scores = np.array([0.9, 0.8, 0.8, -1.0], np.float32)
    ids = np.array([7, 5, 9, -1], np.int64)  # -1: FAISS's empty slot
    s, i = with_own_vector(scores, ids, 42, v, 3)
    assert i.tolist() == [42, 7, 5] and s[0] == pytest.approx(1.0, abs=1e-6)
    s, i = with_own_vector(scores, ids, 4, v, 4)
    assert i.tolist() == [4, 7, 5, 9]  # the padding slot gone, ties 0.8 by id
    same = with_own_vector(scores, ids, 5, v, 3)  # present: untouched
    assert same[1].tolist() == ids.tolist()


def test_an_approximate_search_runs_on_the_request_thread_alone(monkeypatch):
    """Found by the load benchmark: FAISS searched one query with an OpenMP team of every core,
    the idle members spinning (4.1 ms of CPU for a 2 ms request at 100k, HNSW), and each request
    thread that led a search had a team of its own. The search runs on its caller's thread only,
    and that thread's OpenMP setting is restored afterwards."""
    import faiss

    from vlmindex import index as vlm_index
    from vlmindex.serve.service import _approximate_top_k

    rng = np.random.default_rng(0)
    x = normalise(rng.normal(size=(300, 16)).astype(np.float32))
    index = faiss.IndexHNSWFlat(16, 8, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    seen: list[int] = []
    real = vlm_index.search

    def search(*args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm_index, "search", search)
    before: list[int] = []
    after: list[int] = []

    def request() -> None:
        faiss.omp_set_num_threads(3)
        before.append(faiss.omp_get_max_threads())
        scores, ids = _approximate_top_k(index, x[:4], 5)
        assert ids[:, 0].tolist() == [0, 1, 2, 3]
        after.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=request)
    t.start()
    t.join()
    assert before == [3] and seen == [1] and after == [3]


def test_exact_top_k_matches_a_plain_sort_ties_included():
    from vlmindex.serve.service import exact_top_k

    rng = np.random.default_rng(0)
    # few distinct directions: many exactly equal scores, also across the k-th place
    base = normalise(rng.normal(size=(4, 8)))
    vectors = base[rng.integers(0, 4, size=60)]
    ids = rng.choice(10**12, size=60, replace=False).astype(np.int64)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    scores, got = exact_top_k(vectors, ids, queries, 7)
    q = normalise(queries)
    for r in range(len(q)):
        s = [sum(float(a) * float(b) for a, b in zip(row, q[r], strict=True)) for row in vectors]  # a plain loop
        want = sorted(range(60), key=lambda j: (-s[j], ids[j]))[:7]
        assert got[r].tolist() == ids[want].tolist()
        np.testing.assert_allclose(scores[r], [s[j] for j in want], atol=1e-6)
    for r in range(len(q)):  # alone, a query gets the very same scores as in a batch
        one_s, one_i = exact_top_k(vectors, ids, queries[r:r + 1], 7)
        assert one_i[0].tolist() == got[r].tolist() and one_s[0].tobytes() == scores[r].tobytes()
    many = rng.normal(size=(19, 8)).astype(np.float32)  # more than one batch
    s19, i19 = exact_top_k(vectors, ids, many, 7)
    for r in range(19):
        one_s, one_i = exact_top_k(vectors, ids, many[r:r + 1], 7)
        assert one_i[0].tolist() == i19[r].tolist() and one_s[0].tobytes() == s19[r].tobytes()


@pytest.fixture
def scan_shares(monkeypatch):
    """The flat scan with a fresh thread pool, recording each share it scans: (thread, lo, hi)."""
    from vlmindex.serve import scan

    scan._forget_pool()
    shares: list[tuple[str, int, int]] = []
    real = scan._rows

    def rows(vectors, queries, lo, hi, out):
        shares.append((threading.current_thread().name, lo, hi))
        real(vectors, queries, lo, hi, out)

    monkeypatch.setattr(scan, "_rows", rows)
    yield shares
    scan._forget_pool()


def test_scan_scores_match_a_float64_product_for_any_batch_and_thread_count(scan_shares):
    """The flat scan's kernel, against NumPy's float64 product: batches of 1 to 8 queries, their
    rows split into 1 to 3 shares on as many threads, all rows covered once."""
    from vlmindex.serve import scan

    rng = np.random.default_rng(3)
    n = 3 * scan.MIN_SHARE + 700
    vectors = normalise(rng.normal(size=(n, 48)))
    queries = normalise(rng.normal(size=(8, 48)))
    want = queries.astype(np.float64) @ vectors.astype(np.float64).T
    for threads in (1, 2, 3):
        for b in (1, 2, 5, 8):
            scan_shares.clear()
            got = scan.scores(vectors, queries[:b], threads=threads)
            assert got.shape == (b, n) and got.dtype == np.float32
            np.testing.assert_allclose(got, want[:b], atol=1e-5)
            spans = sorted((lo, hi) for _, lo, hi in scan_shares)
            assert len(spans) == threads and spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b_[0] for a, b_ in zip(spans, spans[1:], strict=False))
    strided = np.asfortranarray(vectors)  # not C-ordered: copied, not misread
    np.testing.assert_allclose(scan.scores(strided, queries[:2], threads=2), want[:2], atol=1e-5)
    frozen = vectors.copy()
    frozen.setflags(write=False)  # as a read-only memory map is
    np.testing.assert_allclose(scan.scores(frozen, queries[:3], threads=2), want[:3], atol=1e-5)
    with pytest.raises(ValueError, match="cannot be scored"):
        scan.scores(vectors[:, :40], queries[:2])


def test_a_larger_scan_after_a_smaller_one_gets_all_its_threads(scan_shares):
    """The pool is shared by every scan of the process: one first made for a small index grows
    for a larger split instead of queueing its shares on too few threads."""
    from vlmindex.serve import scan

    rng = np.random.default_rng(5)
    vectors = normalise(rng.normal(size=(4 * scan.MIN_SHARE, 16)))
    scan.scores(vectors[:2 * scan.MIN_SHARE], vectors[:2], threads=2)
    scan_shares.clear()
    got = scan.scores(vectors, vectors[:2], threads=4)
    assert len(scan_shares) == 4 and scan._pool_size == 3  # 3 helpers and the caller
    np.testing.assert_allclose(got, vectors[:2].astype(np.float64) @ vectors.astype(np.float64).T, atol=1e-5)


def test_a_scan_submitting_while_another_grows_the_pool_never_fails(scan_shares):
    """Found by review: a scan took the pool, another replaced it with a larger one and shut the
    old one down, and the first one's submit failed ('cannot schedule new futures after shutdown',
    4 scans in 1000 tries; this test failed 3 runs of 3 before the fix). Thread switches are
    forced often, to meet the window."""
    from vlmindex.serve import scan

    rng = np.random.default_rng(7)
    small = rng.normal(size=(3 * scan.MIN_SHARE, 8)).astype(np.float32)
    big = rng.normal(size=(4 * scan.MIN_SHARE, 8)).astype(np.float32)
    errors: list[str] = []

    def keep_scanning(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                scan.scores(small, small[:1], threads=3)
            except Exception as exc:  # noqa: BLE001 - the failure this test looks for
                errors.append(repr(exc))
                return

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(600):
            scan._forget_pool()
            scan.scores(small, small[:1], threads=3)  # a pool of 2 helpers
            stop = threading.Event()
            other = threading.Thread(target=keep_scanning, args=(stop,))
            other.start()
            try:
                scan.scores(big, big[:1], threads=4)  # grows it to 3 while the other scans
            finally:
                stop.set()
                other.join()
            if errors:
                break
    finally:
        sys.setswitchinterval(before)
    assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_scans_with_threads_of_its_own(scan_shares):
    """A child forked after the parent's scans has none of the pool's threads: its scans get a
    pool of their own instead of waiting forever on the parent's."""
    import signal

    from vlmindex.serve import scan

    vectors = normalise(np.random.default_rng(6).normal(size=(2 * scan.MIN_SHARE, 8)))
    want = vectors[:1].astype(np.float64) @ vectors.astype(np.float64).T
    scan.scores(vectors, vectors[:1], threads=2)
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, os._exit, so nothing of pytest's runs here
        code = 2
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(30)
            code = 0 if np.allclose(scan.scores(vectors, vectors[:1], threads=2), want, atol=1e-5) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's scan hung (-14: killed by its alarm) or was wrong"


def test_exact_top_k_is_exact_with_its_rows_split_between_threads(monkeypatch, scan_shares):
    """A batch and each query alone, on 1 to 3 scan threads, with ties across the k-th place:
    the same neighbours and scores as a plain sort."""
    from vlmindex.serve import scan
    from vlmindex.serve.service import exact_top_k

    rng = np.random.default_rng(4)
    n = 3 * scan.MIN_SHARE + 700
    base = normalise(rng.normal(size=(40, 16)))  # few directions: many equal scores
    direction = rng.integers(0, 40, size=n)
    vectors = base[direction]
    ids = rng.choice(10**12, size=n, replace=False).astype(np.int64)
    queries = rng.normal(size=(6, 16)).astype(np.float32)
    q = normalise(queries).astype(np.float64)
    want = []
    for r in range(len(q)):
        s = (base.astype(np.float64) @ q[r])[direction]  # equal rows, equal scores: by construction
        want.append(ids[sorted(range(n), key=lambda j, s=s: (-s[j], ids[j]))[:25]].tolist())
    for threads in (1, 2, 3):
        monkeypatch.setattr(scan, "team_size", lambda threads=threads: threads)
        scan_shares.clear()
        scores, got = exact_top_k(vectors, ids, queries, 25)
        assert got.tolist() == want and len(scan_shares) == threads
        for r in range(len(q)):
            one_s, one_i = exact_top_k(vectors, ids, queries[r:r + 1], 25)
            assert one_i[0].tolist() == want[r] and one_s[0].tobytes() == scores[r].tobytes()


def test_scan_threads_follow_the_thread_team_variables(monkeypatch):
    from vlmindex.serve import scan

    for variable in scan.THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert scan.team_size() == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    assert scan.team_size() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")  # OpenMP's nested form: the outer team
    assert scan.team_size() == 2


def test_concurrent_first_uploads_load_a_model_once(served_ws, monkeypatch):
    """Found by the load benchmark: two requests loading one model at once both built it, their
    seeded draws from torch's global RNG interleaved, and the untrained ViT got other weights."""
    import time as _time

    from vlmindex.models import LoadOptions

    loads: list[str] = []
    real = LoadOptions.load

    def slow(self, name):
        loads.append(name)
        _time.sleep(0.3)  # a real checkpoint takes seconds: the window two requests fall into
        return real(self, name)

    monkeypatch.setattr(LoadOptions, "load", slow)
    _, path, *_ = _images(served_ws)[0]
    data = Path(path).read_bytes()
    service = NeighbourService(Workspace(served_ws))
    codes: list[int] = []

    def upload():
        with TestClient(create_app(service)) as c:
            codes.append(c.post("/api/knn", data={"dataset": "demo", "models": "hog"},
                                files={"file": ("q.png", data)}).status_code)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 4 and loads == ["hog"]


def test_every_model_load_and_embedding_runs_on_one_thread(served_ws, monkeypatch):
    """Found by the load benchmark: torch called from several request threads gives each its own
    OpenMP team, the teams spin against each other, and one ViT forward pass took 2-3x longer."""
    import vlmindex.query
    from vlmindex.models import LoadOptions

    used: list[tuple[str, int]] = []
    real_load, real_embed = LoadOptions.load, vlmindex.query.embed_images

    def load(self, name):
        used.append(("load", threading.get_ident()))
        return real_load(self, name)

    def embed(extractor, images, *args, **kwargs):
        used.append(("embed", threading.get_ident()))
        return real_embed(extractor, images, *args, **kwargs)

    monkeypatch.setattr(LoadOptions, "load", load)
    monkeypatch.setattr(vlmindex.query, "embed_images", embed)
    service = NeighbourService(Workspace(served_ws))
    callers: list[int] = []
    answered: list[int] = []

    def upload(path: str) -> None:
        callers.append(threading.get_ident())
        for model in MODELS:
            answered.append(len(service.knn("demo", models=[model], upload=Path(path).read_bytes())["results"][model]))

    threads = [threading.Thread(target=upload, args=(r[1],)) for r in _images(served_ws)[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.close()
    assert answered == [10] * 8
    assert sorted(kind for kind, _ in used) == ["embed"] * 8 + ["load"] * 2
    assert len({ident for _, ident in used}) == 1 and used[0][1] not in callers


def test_a_replaced_snapshot_still_answers_the_requests_that_hold_it():
    """A request may take a snapshot just before another replaces it (and closes its batcher):
    it must get its neighbours, not wait forever."""
    from vlmindex.serve.service import _Batcher, exact_top_k

    rng = np.random.default_rng(1)
    vectors = normalise(rng.normal(size=(50, 6)))
    ids = np.arange(50, dtype=np.int64) * 7
    batcher = _Batcher(lambda q, k: exact_top_k(vectors, ids, q, k), owner=vectors)
    before = batcher.search(vectors[3], 4)
    queued = [threading.Thread(target=lambda: batcher.search(vectors[5], 4)) for _ in range(5)]
    for t in queued:
        t.start()
    batcher.close()
    for t in queued:
        t.join(timeout=10)
        assert not t.is_alive()
    after = batcher.search(vectors[3], 4)  # after close: answered in the calling thread
    assert after[1].tolist() == before[1].tolist() and after[1][0] == 21


def test_the_search_batcher_batches_waiting_queries_and_runs_a_lone_one_in_its_caller():
    """Found by the load benchmark: a lone upload paid two thread hand-offs to a search worker.
    Now whoever finds no search running searches itself, with every query that waits meanwhile."""
    from vlmindex.serve.service import _Batcher, exact_top_k

    rng = np.random.default_rng(2)
    vectors = normalise(rng.normal(size=(80, 6)))
    ids = np.arange(80, dtype=np.int64) * 3
    threads_seen: list[threading.Thread] = []
    gate = threading.Event()

    def search(q, k):
        threads_seen.append(threading.current_thread())
        if len(threads_seen) == 1:
            gate.wait(10)  # the first search is slow: the others queue behind it
        return exact_top_k(vectors, ids, q, k)

    batcher = _Batcher(search, owner=vectors)
    answers: dict[int, tuple] = {}

    def ask(i):
        answers[i] = batcher.search(vectors[i], 5)

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    while not threads_seen:
        threading.Event().wait(0.01)
    rest = [threading.Thread(target=ask, args=(i,)) for i in range(1, 9)]
    for t in rest:
        t.start()
    while len(batcher._waiting) < 8:
        threading.Event().wait(0.01)
    gate.set()
    for t in [first, *rest]:
        t.join(timeout=10)
        assert not t.is_alive()
    assert batcher.searches == 2, "the eight queries that waited went in one search"
    for i in range(9):
        alone = exact_top_k(vectors, ids, vectors[i:i + 1], 5)
        assert answers[i][1].tolist() == alone[1][0].tolist() and answers[i][0].tobytes() == alone[0][0].tobytes()
    threads_seen.clear()
    batcher.search(vectors[4], 3)
    assert threads_seen == [threading.current_thread()], "a lone query is searched by its own thread"

    def broken(q, k):
        raise RuntimeError("index unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        _Batcher(broken, owner=None).search(vectors[0], 3)


def test_a_search_interrupted_by_a_base_exception_strands_no_request():
    """Found in review: a batch whose search raised a BaseException left its followers with None
    and the batcher marked as searching for ever."""
    import time as _time

    from vlmindex.serve.service import _Batcher

    class Abort(BaseException):
        pass

    gate = threading.Event()
    calls: list[int] = []

    def search(q, k):
        calls.append(len(q))
        if len(calls) == 1:
            gate.wait(10)  # the first search is slow: two requests queue behind it
        elif len(calls) == 2:
            raise Abort()  # their batch is interrupted
        return np.zeros((len(q), k), np.float32), np.arange(len(q) * k, dtype=np.int64).reshape(len(q), k)

    batcher = _Batcher(search, owner=None)
    got: dict[str, object] = {}

    def ask(name):
        try:
            got[name] = batcher.search(np.ones(4, np.float32), 3)
        except BaseException as exc:  # noqa: BLE001 - what each caller saw is the point
            got[name] = exc

    threads = [threading.Thread(target=ask, args=("first",), daemon=True)]
    threads[0].start()
    while not calls:
        _time.sleep(0.01)
    for name in ("a", "b"):
        threads.append(threading.Thread(target=ask, args=(name,), daemon=True))
        threads[-1].start()
    while len(batcher._waiting) < 2:
        _time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert isinstance(got["first"], tuple)
    assert all(isinstance(got[n], BaseException) for n in ("a", "b")), got  # an error each, never None
    later = threading.Thread(target=ask, args=("later",), daemon=True)
    later.start()
    later.join(10)
    assert not later.is_alive() and isinstance(got["later"], tuple), "the batcher serves again"


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_workers(ws: Path, port: int, *args: str) -> tuple[subprocess.Popen, list[int]]:
    """`vlmindex serve --workers 2` in its own process group, once both workers answer."""
    import http.client
    import time

    proc = subprocess.Popen([sys.executable, "-m", "vlmindex", "-w", str(ws), "serve", "--port", str(port),
                             "--workers", "2", *args], stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers = [p for p in _children(proc.pid) if _is_worker(p)]
        if len(workers) == 2:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/api/datasets")
                if conn.getresponse().status == 200:
                    return proc, workers
            except OSError:
                pass
        time.sleep(0.3)
    _stop(proc)
    pytest.fail(f"no two workers answered: {proc.stderr.read()}")


def _stop(proc: subprocess.Popen) -> str:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _gone(pids: list[int], within: float) -> bool:
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not [p for p in pids if _is_worker(p)]:
            return True
        time.sleep(0.2)
    return False


linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")


@linux_only
def test_serve_with_two_workers_answers_with_its_settings_and_stops_on_ctrl_c(served_ws):
    """`serve --workers 2`: two processes behind one port, each started with the command's
    limits and its share of the cores, all gone after one Ctrl-C (SIGINT to the process group,
    as a terminal sends it)."""
    import http.client
    import json

    from vlmindex.serve.server import SETTINGS_ENV, cores

    port = _free_port()
    image_id, path = _images(served_ws)[5][:2]
    png = Path(path).read_bytes()
    limit_mb = (len(png) - 1) / (1024 * 1024)  # this image is one byte too large for the workers
    limit = int(limit_mb * 1024 * 1024)
    proc, workers = _serve_workers(served_ws, port, "--max-upload-mb", repr(limit_mb))
    try:
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores() // 2))
        for pid in workers:
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            assert json.loads(environ[SETTINGS_ENV])["limits"]["max_bytes"] == limit
            assert environ["OMP_NUM_THREADS"] == threads

        def ask(body: bytes, kind: str) -> tuple[int, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # a new connection each time
            conn.request("POST", "/api/knn", body=body, headers={"Content-Type": kind})
            res = conn.getresponse()
            return res.status, json.loads(res.read())

        answers: list[tuple[int, dict]] = []
        body = json.dumps({"image_id": image_id, "dataset": "demo", "models": "hog", "k": 3}).encode()
        requests = [threading.Thread(target=lambda: answers.append(ask(body, "application/json"))) for _ in range(8)]
        for t in requests:
            t.start()
        for t in requests:
            t.join()
        assert [a[0] for a in answers] == [200] * 8
        for _, out in answers:
            first = out["results"]["hog"][0]
            assert first["image_id"] == image_id and first["score"] == pytest.approx(1.0, abs=1e-5)
        boundary = "b0undary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"\r\n\r\ndemo\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
        for _ in range(4):  # whichever worker takes it applies the command's upload limit
            status, out = ask(form, f"multipart/form-data; boundary={boundary}")
            assert status == 413 and f"the limit is {limit}" in out["error"]
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "2 workers" in err
    assert _gone(workers, within=10)


@linux_only
def test_workers_stop_when_their_supervisor_is_killed_and_free_the_port(served_ws):
    """SIGKILL (or the OOM killer) takes the supervisor: its workers stop too rather than go on
    serving, and the port is free for the next `serve`."""
    import signal
    import socket

    port = _free_port()
    proc, workers = _serve_workers(served_ws, port)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        assert _gone(workers, within=30), "the workers outlived their supervisor"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # raises while a worker still holds it


def test_workers_are_started_with_the_commands_settings(served_ws, monkeypatch):
    """What `serve --workers 2` hands each worker: the workspace, the limits, the load options
    (--trust-remote-code among them) and its share of the cores for its thread teams."""
    import uvicorn

    from vlmindex.models import LoadOptions
    from vlmindex.serve import server

    for variable in (*server.THREAD_VARIABLES, server.SETTINGS_ENV):
        monkeypatch.setenv(variable, "")  # recorded as it was, so what run() sets is undone after the test
        monkeypatch.delenv(variable)
    limits = Limits(max_bytes=1234, max_pixels=5678, max_models=2)
    service = NeighbourService(Workspace(served_ws), limits=limits, load=LoadOptions(trust_remote_code=True))
    seen = {}

    def supervisor(app, **kwargs):  # in place of uvicorn's: builds one worker's app here, then stops
        seen["app"], seen["kwargs"] = app, kwargs
        worker = server.app_from_environment()
        seen["ws"], seen["limits"], seen["load"] = (worker.state.service.ws.root, worker.state.service.limits,
                                                    worker.state.service.load)

    monkeypatch.setattr(uvicorn, "run", supervisor)
    # a worker here would watch for its parent, which this process is not the child of
    monkeypatch.setattr(server, "_stop_with_parent", lambda parent: seen.setdefault("parent", parent))
    server.run(service, host="127.0.0.1", port=_free_port(), workers=2)
    assert seen["parent"] == os.getpid()
    assert seen["app"] == "vlmindex.serve.server:app_from_environment" and seen["kwargs"]["workers"] == 2
    assert seen["ws"] == Workspace(served_ws).root and seen["limits"] == limits
    assert seen["load"] == LoadOptions(trust_remote_code=True)
    assert all(os.environ[v] == str(max(1, server.cores() // 2)) for v in server.THREAD_VARIABLES)


@linux_only
def test_a_workspace_gone_before_the_workers_start_is_one_line_and_exit_1(served_ws, tmp_path):
    """The workspace removed after the command checked it and before its workers started: each
    worker exits with uvicorn's startup-failure code (its supervisor stops rather than restart
    them), and the command says so in one line, with exit code 1."""
    copy = tmp_path / "ws"
    shutil.copytree(served_ws, copy, ignore=shutil.ignore_patterns(".lock", "explore"))
    script = f"""
import sys
from pathlib import Path
from vlmindex.serve import server
real = server.run
def run(service, **kwargs):
    Path({str(copy / "catalog.duckdb")!r}).unlink()
    real(service, **kwargs)
server.run = run
from vlmindex.cli import main
main(["-w", {str(copy)!r}, "serve", "--port", "{_free_port()}", "--workers", "2"])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         start_new_session=True)
    lines = [line for line in res.stderr.splitlines() if not line.startswith("vlmindex serve: workspace")]
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: no vlmindex workspace at"), res.stderr


def test_an_address_in_use_is_one_line_naming_it(served_ws, vlm):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            res = vlm(served_ws, "serve", "--port", port, "--workers", workers, expect=1)
            assert res.err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in res.err
    res = vlm(served_ws, "serve", "--host", "no-such-host.invalid", expect=1)
    assert res.err.count("\n") == 1 and "--host no-such-host.invalid" in res.err
