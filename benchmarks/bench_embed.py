"""Embedding pipeline efficiency: end-to-end images/s over model-only images/s, same batch size.

End to end = `vlmindex.embed.embed` on PNG files of the synthetic set (decode, preprocess in
worker processes, model, Parquet writer). Model only = the same extractor's `encode_image` on
tensors already preprocessed in memory. Both are measured in this run, one after the other, on
the same images; the ratio is what decoding costs when it does not hide behind the model.
Target: >= 0.9.

    python benchmarks/bench_embed.py [--model untrained-vit-b16] [--images 96] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vlmindex.catalog import Workspace
from vlmindex.embed import EmbedOptions, embed, select_images
from vlmindex.imageio import load_image
from vlmindex.ingest import ingest_synthetic
from vlmindex.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="untrained-vit-b16", help="ViT-B/16-sized by default")
    ap.add_argument("--images", type=int, default=96, help="at least this many synthetic images (224 px)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="vlmindex-bench-embed-"))
    try:
        ws = Workspace(root)
        per_class = max(1, -(-args.images // (6 * 2)))
        ingest_synthetic(ws, "bench", seed=0, lesions_per_class=per_class, views_per_lesion=2, progress=False)
        rows, _, _ = select_images(ws, "bench", "clean", None)
        extractor = load_model(args.model)
        tensors = [extractor.preprocess(load_image(r[1])) for r in rows]
        n = len(rows)
        with torch.inference_mode():  # warm-up: first calls allocate
            extractor.encode_image(torch.stack(tensors[: args.batch_size]))

        model_only, end_to_end = [], []
        for rep in range(args.repeats):
            t = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, n, args.batch_size):
                    extractor.encode_image(torch.stack(tensors[i: i + args.batch_size]))
            model_only.append(n / (time.perf_counter() - t))

            shutil.rmtree(ws.root / "embeddings", ignore_errors=True)
            opts = EmbedOptions(batch_size=args.batch_size, num_workers=args.workers, progress=False)
            t = time.perf_counter()
            report = embed(ws, args.model, "bench", options=opts, extractor=extractor)
            end_to_end.append(n / (time.perf_counter() - t))
            assert report.embedded == n
            print(f"repeat {rep + 1}: model only {model_only[-1]:.2f} img/s, end to end {end_to_end[-1]:.2f} img/s")

        ratio = max(end_to_end) / max(model_only)
        print(f"model {args.model}, {n} images of 224 px, batch {args.batch_size}, "
              f"threads {torch.get_num_threads()}")
        print(f"pipeline efficiency (end-to-end / model-only images/s, best of {args.repeats}): {ratio:.2f}"
              f"  [{'meets' if ratio >= 0.9 else 'below'} the 0.9 target]")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
