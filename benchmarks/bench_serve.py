"""Load on `vlmindex serve` over loopback: /api/knn by image_id at 100,000 vectors, and by upload.

Builds a workspace in a temporary folder: 100,000 28-px images ingested from a MedMNIST-format
file with 512-d class-structured embeddings imported for them and indexed twice (flat and HNSW),
plus the synthetic lesion set embedded by offline extractors (for uploads). Starts `vlmindex
serve` on 127.0.0.1, with one worker process and then with one per core (`--workers`), and sends
requests from 1 and from 8 concurrent clients (threads, one keep-alive connection each). Prints
requests/s, p50 and p99 latency and the error count (a non-200 answer, or an image_id query
whose first result is not the image itself).

The upload baseline is measured in the same run: decoding and embedding the same images, one at
a time, in this process with the same extractor; for 8 clients also under the same load (8
threads of this process embedding at once, no HTTP), since 8 requests in flight on a machine with
fewer cores each wait for the others whatever the service does. Targets: p50 <= 20 ms by
image_id at 100k; by upload, p50 within 1.5x of embedding the image alone.

    python benchmarks/bench_serve.py [--n 100000] [--requests 400] [--model raw-pixels] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np


def _cli(ws: Path, *args: object) -> None:
    subprocess.run([sys.executable, "-m", "vlmindex", "-w", str(ws), *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(ws: Path, n: int, dim: int, model: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlmindex.catalog import Workspace
    from vlmindex.catalog import datasets as catalog_datasets

    rng = np.random.default_rng(0)
    classes = 7
    labels = rng.integers(0, classes, size=n)
    n_train = int(n * 0.8)
    imgs = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
    npz = ws.parent / "bigmnist.npz"
    np.savez(npz, train_images=imgs[:n_train], train_labels=labels[:n_train, None],
             test_images=imgs[n_train:], test_labels=labels[n_train:, None])
    t = time.perf_counter()
    _cli(ws, "ingest", "big", npz, "--format", "medmnist", "--flavour", "dermamnist")
    print(f"  ingested {n} images in {time.perf_counter() - t:.0f} s", flush=True)
    with Workspace(ws).read(views=False) as con:
        rows = catalog_datasets.images(con, "big", columns=("image_id", "label"))
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    names = sorted({r[1] for r in rows})
    lab = np.array([names.index(r[1]) for r in rows])
    centres = rng.normal(size=(len(names), dim)).astype(np.float32)
    vecs = centres[lab] + 1.5 * rng.normal(size=(len(ids), dim)).astype(np.float32)
    feats = ws.parent / "feats.parquet"
    pq.write_table(pa.table({"image_id": ids, "embedding": list(vecs)}), feats)
    for model, kind in BIG_INDEXES.items():  # the same vectors under two names: one per index kind
        _cli(ws, "embeddings", "import", feats, "-m", model, "-d", "big")
        _cli(ws, "index", "build", "-m", model, "-d", "big", "--kind", kind)
    _cli(ws, "synth", "demo")


# The 100k vectors are indexed twice: exactly (flat: a scan of all of them per batch of queries)
# and approximately (HNSW, FAISS's defaults of vlmindex index build): the two ends of the trade.
BIG_INDEXES = {"imported-512": "flat", "imported-512-hnsw": "hnsw"}


def add_model(ws: Path, model: str) -> None:
    _cli(ws, "embed", "-m", model, "-d", "demo")
    _cli(ws, "index", "build", "-m", model, "-d", "demo")


def _multipart(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in fields.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def load(port: int, requests: list[tuple[bytes, str, int | None]], clients: int) -> dict[str, float]:
    """Send the requests from ``clients`` threads; each request is (body, content type, expected first id)."""
    latencies: list[float] = []
    errors = [0]
    first_error: list[str] = []
    lock = threading.Lock()
    chunks = [requests[i::clients] for i in range(clients)]

    def run(mine):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for body, kind, expect in mine:
            t = time.perf_counter()
            try:
                conn.request("POST", "/api/knn", body=body, headers={"Content-Type": kind})
                res = conn.getresponse()
                payload = res.read()
                ok = res.status == 200
                if ok and expect is not None:
                    first = next(iter(json.loads(payload)["results"].values()))[0]["image_id"]
                    ok = first == expect
                why = f"HTTP {res.status}: {payload[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                errors[0] += not ok
                if not ok and not first_error:
                    first_error.append(why)
        conn.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    if first_error:
        print(f"  first error: {first_error[0]}", flush=True)
    return {"requests": len(lat), "errors": errors[0], "rps": len(lat) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


def embed_alone(paths: list[str], model: str, clients: int, per_client: int) -> float:
    """Median ms to decode and embed one image when ``clients`` threads of this process do so at
    once (1: alone), each one image at a time, with one model object: the upload's own work under
    the same load, with no HTTP. The better of two schedules: the threads take turns on the model
    (a lock; the service runs every embedding on one thread) or run it at the same time."""
    import io

    from vlmindex.imageio import load_image
    from vlmindex.models import LoadOptions
    from vlmindex.query import embed_images

    extractor = LoadOptions().load(model)
    data = [Path(p).read_bytes() for p in paths]
    best = float("inf")
    for lock in (threading.Lock(), None):
        times: list[float] = []

        def run(c: int, lock=lock, times=times) -> None:
            for r in range(per_client):
                blob = data[(c * per_client + r) % len(data)]
                t = time.perf_counter()
                img = load_image(io.BytesIO(blob))
                if lock is not None:
                    with lock:
                        embed_images(extractor, [img])
                else:
                    embed_images(extractor, [img])
                times.append(time.perf_counter() - t)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best = min(best, statistics.median(times) * 1000)
    return best


def scan_floor(feats: Path, repeats: int = 9) -> dict[int, float]:
    """Median ms of the exact search alone (the service's exact_top_k, in this process) over the
    100k vectors for a batch of 1 and of 8 queries: what a flat index costs before any HTTP."""
    import pyarrow.parquet as pq

    from vlmindex.serve.service import exact_top_k

    t = pq.read_table(feats)
    x = np.asarray(t["embedding"].to_pylist(), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = t["image_id"].to_numpy()
    out = {}
    for b in (1, 8):
        times = []
        for r in range(repeats):
            q = x[r * b:(r + 1) * b]
            t0 = time.perf_counter()
            exact_top_k(x, ids, q, 10)
            times.append(time.perf_counter() - t0)
        out[b] = statistics.median(times) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--model", default="raw-pixels",
                    help="offline extractor for uploads (the cheapest: the service's own overhead shows most)")
    ap.add_argument("--model2", default="untrained-vit-tiny",
                    help="a second one with a real forward pass (as CLIP-like models have); '' to skip")
    ap.add_argument("--workers", type=lambda v: [int(w) for w in v.split(",")],
                    default=sorted({1, os.cpu_count() or 1}),
                    help="comma-separated `serve --workers` counts, each measured in turn (default: 1 and the cores)")
    ap.add_argument("--keep", type=Path, default=None, help="build (or reuse) the workspace here")
    args = ap.parse_args()

    from vlmindex.catalog import Workspace
    from vlmindex.catalog import datasets as catalog_datasets

    tmp = tempfile.TemporaryDirectory()
    ws = (args.keep or Path(tmp.name)) / "ws"
    if not (ws / "catalog.duckdb").exists():
        ws.mkdir(parents=True, exist_ok=True)
        print(f"building the workspace ({args.n} vectors x {args.dim}) ...", flush=True)
        build(ws, args.n, args.dim, args.model)
    models = [m for m in (args.model, args.model2) if m]
    for m in models:
        if not (ws / "indexes" / m / "demo").exists():
            add_model(ws, m)
    with Workspace(ws).read(views=False) as con:
        big_ids = [r[0] for r in catalog_datasets.images(con, "big", columns=("image_id",))]
        demo = [r[0] for r in catalog_datasets.images(con, "demo", columns=("path",))]

    rng = np.random.default_rng(1)
    picked = rng.choice(big_ids, size=args.requests)
    by_id = {kind: [(json.dumps({"image_id": int(i), "dataset": "big", "models": model, "k": 10}).encode(),
                     "application/json", int(i)) for i in picked]
             for model, kind in BIG_INDEXES.items()}
    picks = rng.choice(demo, size=args.requests // 2)
    uploads = {m: [(*_multipart(Path(p).read_bytes(), {"dataset": "demo", "models": m, "k": "10"}), None)
                   for p in picks] for m in models}
    alone = {m: embed_alone(demo[:50], m, 1, 100) for m in models}
    alone8 = {m: embed_alone(demo[:50], m, 8, 25) for m in models}
    floor = scan_floor(ws.parent / "feats.parquet")
    rows = []
    for workers in args.workers:
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "vlmindex", "-w", str(ws), "serve", "--port", str(port),
                                   "--workers", str(workers)])  # its errors, if any, on this terminal
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            # warm: each worker opens and checks an index on its first use of it, and loads a model;
            # connections go to whichever worker accepts them, so each warm-up opens 8 of them, 3 times
            for _ in range(3):
                for reqs in by_id.values():
                    load(port, reqs[:16], 8)
                for m in models:
                    load(port, uploads[m][:16], 8)
            for name, reqs in (*((f"by image_id (100k {kind})", r) for kind, r in by_id.items()),
                               *((f"upload {m}", uploads[m]) for m in models)):
                for clients in (1, 8):
                    rows.append((name, workers, clients, load(port, reqs, clients)))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"\n{'requests':<26} {'workers':>7} {'clients':>7} {'n':>5} {'errors':>6} {'req/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8}")
    for name, workers, clients, r in rows:
        print(f"{name:<26} {workers:>7} {clients:>7} {r['requests']:>5} {r['errors']:>6} {r['rps']:>8.1f} "
              f"{r['p50']:>8.1f} {r['p99']:>8.1f}")
    print()
    for m in models:
        print(f"embedding one image alone ({m}, decode + preprocess + encode, in-process): {alone[m]:.2f} ms")
        print(f"embedding one image alone ({m}), 8 threads at once in-process: {alone8[m]:.2f} ms")
    for name, workers, clients, r in rows:
        if name.startswith("upload "):
            m = name.split(" ", 1)[1]
            print(f"upload {m} p50 / embedding alone, {workers} worker(s), {clients} client(s): "
                  f"{r['p50'] / alone[m]:.2f} "
                  "(target <= 1.5)" + (f"; / embedding alone under the same load (8 threads): "
                                      f"{r['p50'] / alone8[m]:.2f}" if clients == 8 else ""))
    for b, ms in floor.items():
        print(f"exact search alone over the 100k vectors, a batch of {b} (in-process, no HTTP): {ms:.1f} ms")
    for name, workers, clients, r in rows:
        if name.startswith("by image_id"):
            print(f"{name} p50, {workers} worker(s), {clients} client(s): {r['p50']:.1f} ms (target <= 20 ms)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
