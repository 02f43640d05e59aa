"""Embedding throughput: the pipeline against the model alone, and the Ray engine against the local one.

All figures come from this run, on the same synthetic images (224 px PNGs) and the same model.

* Model alone: the extractor's ``encode_image`` on tensors already preprocessed and stacked into
  the batches the pipeline makes, in inference mode, with this process's torch threads (the
  threads the local engine's model runs with), every batch shape warmed up first, best of
  ``--repeats``. It is the model's best throughput here, so the pipeline cannot beat it except by
  noise: pipeline efficiency = local engine images/s / model-alone images/s, target >= 0.9.
* Local engine: ``vlmindex.embed.embed`` (decode and preprocess in worker processes, the model
  here, Parquet parts committed), best of ``--repeats``.
* Ray engine: ``embed(engine="ray")`` on a local Ray (all cores) started before the clock, so the
  figure is the engine's own throughput; Ray's start-up is printed apart.

    python benchmarks/bench_embed.py [--model untrained-vit-b16] [--images 96] [--batch-size 16] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vlmindex.catalog import Workspace
from vlmindex.catalog import datasets as catalog_datasets
from vlmindex.embed import EmbedOptions, embed
from vlmindex.imageio import load_image
from vlmindex.ingest import ingest_synthetic
from vlmindex.models import LoadOptions


def model_alone(extractor, batches: list[torch.Tensor], repeats: int) -> float:
    """Best images/s of encode_image over the pre-stacked batches."""
    n = sum(len(b) for b in batches)
    with torch.inference_mode():
        for b in {tuple(b.shape): b for b in batches}.values():  # every shape once: lazy init, caches
            extractor.encode_image(b)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            for b in batches:
                extractor.encode_image(b)
            best = max(best, n / (time.perf_counter() - t))
    return best


def engine_run(ws: Workspace, model: str, extractor, opts: EmbedOptions, n: int) -> float:
    shutil.rmtree(ws.root / "embeddings", ignore_errors=True)
    t = time.perf_counter()
    report = embed(ws, model, "bench", options=opts, extractor=extractor)
    seconds = time.perf_counter() - t
    assert report.embedded == n, report.summary()
    return n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="untrained-vit-b16", help="ViT-B/16-sized by default")
    ap.add_argument("--images", type=int, default=96, help="at least this many synthetic images (224 px)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true", help="leave out the Ray engine")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="vlmindex-bench-embed-"))
    try:
        ws = Workspace(root)
        per_class = max(1, -(-args.images // (8 * 2)))
        ingest_synthetic(ws, "bench", seed=0, lesions_per_class=per_class, views_per_lesion=2, progress=False)
        with ws.read(views=False) as con:
            paths = [r[0] for r in catalog_datasets.images(con, "bench", columns=("path",))]
        n = len(paths)
        extractor = LoadOptions().load(args.model)
        tensors = [extractor.preprocess(load_image(p)) for p in paths]
        batches = [torch.stack(tensors[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]
        threads = torch.get_num_threads()

        alone = model_alone(extractor, batches, args.repeats)
        local = max(engine_run(ws, args.model, extractor, EmbedOptions(batch_size=args.batch_size,
                                                                       num_workers=args.workers, progress=False), n)
                    for _ in range(args.repeats))
        print(f"model {args.model}, {n} images of 224 px, batch {args.batch_size}, torch threads {threads}, "
              f"{os.cpu_count()} cores")
        print(f"  model alone   {alone:8.2f} img/s (best of {args.repeats}, batches pre-stacked)")
        print(f"  local engine  {local:8.2f} img/s  pipeline efficiency {local / alone:.2f}"
              f"  [{'meets' if local / alone >= 0.9 else 'below'} the 0.9 target]")
        if not args.no_ray:
            import ray

            t = time.perf_counter()
            ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False,
                     log_to_driver=False)
            startup = time.perf_counter() - t
            try:
                ray_rate = max(engine_run(ws, args.model, extractor,
                                          EmbedOptions(batch_size=args.batch_size, engine="ray", progress=False), n)
                               for _ in range(args.repeats))
            finally:
                ray.shutdown()
            print(f"  ray engine    {ray_rate:8.2f} img/s  ray / local {ray_rate / local:.2f}  "
                  f"(local Ray, {os.cpu_count()} CPUs; its start-up, {startup:.1f} s, not counted)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
