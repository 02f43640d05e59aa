"""The pages in a real browser: `serve`'s page with an uploaded image, and the `explore` application.

Playwright drives Debian's chromium (no browser download), headless, against servers these tests
start on 127.0.0.1. Screenshots are written to $VLMINDEX_SCREENSHOTS when it is set, for a person
to look at what a test cannot judge.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from vlmindex.catalog import Workspace
from vlmindex.catalog import datasets as catalog_datasets

K = 6


@pytest.fixture
def browser(tmp_path, chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            viewport={"width": 1400, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        outside: list[str] = []
        context.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                   else outside.append(r.url))
        context.outside = outside  # requests that would leave the machine: there must be none
        yield context
        context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(served_ws):
    """`vlmindex serve`'s application on 127.0.0.1, in a thread."""
    import uvicorn

    from vlmindex.serve import NeighbourService, create_app

    port = _free_port()
    service = NeighbourService(Workspace(served_ws))
    srv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    service.close()


def _shot(page, tmp_path: Path, name: str) -> Path:
    png = tmp_path / name
    page.screenshot(path=str(png), full_page=True)
    if os.environ.get("VLMINDEX_SCREENSHOTS"):
        Path(os.environ["VLMINDEX_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(os.environ["VLMINDEX_SCREENSHOTS"]) / name)
    return png


def test_serve_page_shows_each_models_neighbours_for_an_upload(browser, server, served_ws, tmp_path):
    with Workspace(served_ws).read(views=False) as con:
        image_id, path, label = catalog_datasets.images(con, "demo", columns=("image_id", "path", "label"))[7]
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_selector("#leaderboard table")
    page.fill("#k", str(K))
    page.set_input_files("#file", path)
    page.wait_for_selector("section.model >> nth=1")
    page.wait_for_function(f"""() => {{
        const imgs = [...document.querySelectorAll('section.model figure img')];
        return imgs.length === {2 * K} && imgs.every(i => i.complete && i.naturalWidth > 0);
    }}""", timeout=30000)
    sections = page.query_selector_all("section.model")
    assert sorted(s.get_attribute("data-model") for s in sections) == ["hog", "raw-pixels"]
    for s in sections:
        figures = s.query_selector_all("figure.nb")
        assert len(figures) == K
        # the query itself comes first, in its own class, and is marked
        assert "query" in figures[0].inner_text() and "same" in figures[0].get_attribute("class")
        assert figures[0].get_attribute("data-image-id") == str(image_id)  # all 64 bits survived
        marked = [f.get_attribute("class").split()[-1] for f in figures]
        labels = [f.inner_text().split("·")[1].split()[0] for f in figures]
        assert marked == ["same" if lab == label else "other" for lab in labels]
        assert f"/ {K} same class" in s.inner_text()
    assert f"image {image_id}" in page.inner_text("#query")
    assert len(page.query_selector_all("#leaderboard tbody tr")) == 2
    assert browser.outside == []
    _shot(page, tmp_path, "serve-page.png")


def test_serve_page_says_what_went_wrong(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_selector("#leaderboard table")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "cannot be decoded" in page.inner_text("#error") or "can be decoded" in page.inner_text("#error")


def _wait_for_atlas(page, n: int) -> None:
    # document.body is null for a moment while a clicked link navigates: the check must survive that
    page.wait_for_function(f"document.body && document.body.innerText.match(/{n}\\s*\\/\\s*{n}\\s*points/)",
                           timeout=60000)
    page.wait_for_function("""() => [...document.images].filter(
        i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 0).length >= 5""", timeout=60000)


def test_explore_application_loads_offline_from_a_static_server_and_from_serve(
        browser, server, served_ws, tmp_path, vlm, request):
    """`explore --export DIR` writes a static application that a plain static file server shows
    with no network; published into the workspace, `serve` shows it behind its 'explore' link."""
    import pyarrow.parquet as pq

    from vlmindex.catalog import RunKey
    from vlmindex.explore import app_dir

    app = tmp_path / "atlas"
    res = vlm(served_ws, "explore", "-m", "hog", "-d", "demo", "--export", app)
    assert (app / "index.html").is_file() and "application written" in res.err
    data = pq.read_table(app / "data" / "dataset.parquet")
    assert data.num_rows == 72 and "FILE_NAME" not in data.column_names
    assert str(served_ws) not in (app / "data" / "metadata.json").read_text()

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(app))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
        _wait_for_atlas(page, 72)
        text = page.inner_text("body")
        assert "72 / 72 points" in re.sub(r"\s+", " ", text)
        assert "purity_at_k" in text and "knn_pred" in text
        _shot(page, tmp_path, "explore-static.png")
    finally:
        httpd.shutdown()

    published = app_dir(Workspace(served_ws), RunKey("hog", "demo", "clean"))
    shutil.copytree(app, published)  # what --publish does (tested on its own in test_explore.py)
    request.addfinalizer(lambda: shutil.rmtree(published, ignore_errors=True))  # the workspace is shared
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_selector("#leaderboard table")
    with Workspace(served_ws).read(views=False) as con:
        path = catalog_datasets.images(con, "demo", columns=("path",))[0][0]
    page.set_input_files("#file", path)
    page.wait_for_selector("section.model[data-model='hog'] a")
    page.click("section.model[data-model='hog'] a")
    _wait_for_atlas(page, 72)
    assert page.url.startswith(server + "/explore/hog/demo/clean/")
    assert browser.outside == []
    _shot(page, tmp_path, "explore-from-serve.png")
