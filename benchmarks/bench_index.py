"""Approximate FAISS kinds against exact search on a 100k-vector class-structured set.

For each kind: recall@10 against exact (flat) search on 1,000 sampled queries, and the query
throughput relative to flat measured in the same run. Target: recall@10 >= 0.95 for every kind.

    python benchmarks/bench_index.py [--n 100000] [--dim 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vlmindex import index as vindex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.classes, args.dim))
    labels = rng.integers(0, args.classes, size=args.n)
    x = (centres[labels] + 1.0 * rng.normal(size=(args.n, args.dim))).astype(np.float32)
    ids = rng.choice(2**62, size=args.n, replace=False).astype(np.int64)
    queries = x[rng.choice(args.n, size=args.queries, replace=False)]

    results = {}
    for kind in ("flat", "ivf", "hnsw", "ivfpq"):
        t = time.perf_counter()
        idx, params = vindex.build(ids, x, kind)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        vindex.search(idx, queries, 10)
        search_s = time.perf_counter() - t
        rec = vindex.measure_recall(idx, ids, x, labels, k=10, sample=args.queries) if kind != "flat" else None
        results[kind] = (build_s, search_s, rec, params)

    flat_search = results["flat"][1]
    print(f"{args.n} vectors, {args.dim}-d, {args.classes} classes, {args.queries} queries, k = 10")
    ok = True
    for kind, (build_s, search_s, rec, params) in results.items():
        if rec is None:
            print(f"  {kind:6s} exact baseline")
            continue
        worst = min(rec["per_class"].values())
        ok &= rec["recall"] >= 0.95
        build_ratio = build_s / max(results["flat"][0], 1e-9)
        print(f"  {kind:6s} recall@10 {rec['recall']:.4f} (worst class {worst:.4f}), "
              f"search {flat_search / search_s:.1f}x flat's speed, build {build_ratio:.0f}x "
              f"flat's time, params {params}")
    print("all approximate kinds reach recall@10 >= 0.95" if ok else "SOME KIND IS BELOW recall@10 0.95")


if __name__ == "__main__":
    main()
