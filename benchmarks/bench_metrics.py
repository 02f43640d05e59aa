"""Retrieval metrics: vlmindex.metrics against pytorch-metric-learning's AccuracyCalculator (FAISS kNN).

Same embeddings for both (20,000 x 512 float32 unit vectors, 7 imbalanced classes), same metrics:
P@1, R-precision and MAP@R with k = the largest class size (pml's ``k="max_bin_count"``, the query
excluded from its own ranking). Each side is timed best-of-N in this run, the numbers must agree
to 1e-6, and the ratio is printed. vlmindex runs with ``full_ap=False`` here (AP not reported), i.e. it sorts only
each query's top max(k, R) like pml; the full-ranking AP run (``--full-ap``) is timed separately for reference.

    python benchmarks/bench_metrics.py                 # the comparison (pml needs ~8 GB RAM)
    python benchmarks/bench_metrics.py --n 5000        # a quicker, smaller one
    python benchmarks/bench_metrics.py --memory-check  # 50,000 x 768 full-ranking AP, peak RSS
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlmindex.metrics import retrieval_metrics  # noqa: E402

# Class shares of a typical imbalanced lesion dataset (7 classes, 6:1 largest to smallest).
CLASS_SHARES = (0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05)
TOLERANCE = 1e-6


def make_embeddings(n: int, dim: int, seed: int = 0, separation: float = 0.25,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Class means plus isotropic noise, L2-normalised (so FAISS's L2 ranking is the cosine ranking)."""
    rng = np.random.default_rng(seed)
    counts = np.floor(np.asarray(CLASS_SHARES) * n).astype(int)
    counts[0] += n - counts.sum()
    labels = np.repeat(np.arange(len(CLASS_SHARES)), counts)
    rng.shuffle(labels)
    means = rng.standard_normal((len(CLASS_SHARES), dim)).astype(np.float32) / np.sqrt(dim)
    x = means[labels] * separation + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def best_of(repeats: int, fn):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def ours(x: np.ndarray, y: np.ndarray, full_ap: bool) -> dict[str, float]:
    s = retrieval_metrics(x, y, k=1, full_ap=full_ap).summary()
    out = {"precision_at_1": s["p_at_1_micro"], "r_precision": s["r_precision_micro"],
           "mean_average_precision_at_r": s["map_at_r_micro"]}
    if full_ap:
        out["ap"] = s["ap_micro"]
    return out


def pml(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              k="max_bin_count", device=torch.device("cpu"))
    return calc.get_accuracy(x, y)


def compare(args: argparse.Namespace) -> int:
    logging.getLogger("PML").setLevel(logging.WARNING)
    x, y = make_embeddings(args.n, args.dim, seed=args.seed)
    counts = np.bincount(y)
    print(f"data: {args.n} x {args.dim} float32, {len(counts)} classes of {counts.tolist()}; "
          f"k = largest class size = {counts.max()}; {os.cpu_count()} CPUs; best of {args.repeats}")
    import pytorch_metric_learning  # noqa: F401  (import cost outside the timing)
    import torch  # noqa: F401

    t_ours, v_ours = best_of(args.repeats, lambda: ours(x, y, full_ap=False))
    t_pml, v_pml = best_of(args.repeats, lambda: pml(x, y))
    worst = 0.0
    for name in ("precision_at_1", "r_precision", "mean_average_precision_at_r"):
        diff = abs(v_ours[name] - v_pml[name])
        worst = max(worst, diff)
        print(f"  {name:30s} vlmindex {v_ours[name]:.9f}   pml {v_pml[name]:.9f}   |diff| {diff:.1e}")
    equal = worst <= TOLERANCE
    print(f"numbers equal to {TOLERANCE:g}: {'yes' if equal else 'NO'}")
    print(f"metrics speed-up vs pytorch-metric-learning: {t_pml / t_ours:.1f}x "
          f"(ours {t_ours:.2f} s, pml {t_pml:.2f} s; ours with full_ap=False: each row ranked to its max(R, k)-th "
          "item, as pml's kNN does, AP not reported)")
    if args.full_ap:
        t_full, v_full = best_of(1, lambda: ours(x, y, full_ap=True))
        print(f"vlmindex with full-ranking AP as well: {t_full:.2f} s (AP {v_full['ap']:.6f}; pml has no "
              "full-ranking AP at this k)")
    return 0 if equal else 1


def memory_child() -> int:
    x, y = make_embeddings(50_000, 768, seed=1)
    start = time.perf_counter()
    s = retrieval_metrics(x, y, k=10, full_ap=True).summary()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(f"50,000 x 768 full-ranking AP {s['ap_micro']:.4f} "
          f"(MAP@R {s['map_at_r_micro']:.4f}) in {seconds:.1f} s")
    print(f"peak RSS {peak:.2f} GiB (embeddings alone: {x.nbytes / 2**30:.2f} GiB)")
    return 0


def memory_check() -> int:
    """Full-ranking AP for 50,000 x 768 in a fresh process, so that its peak RSS is its own."""
    proc = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True)
    print(proc.stdout.strip() or proc.stderr.strip())
    if proc.returncode:
        return proc.returncode
    peak = float(proc.stdout.split("peak RSS ")[1].split()[0])
    print(f"under 4 GiB: {'yes' if peak < 4 else 'NO'}")
    return 0 if peak < 4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-ap", action="store_true", help="also time the full-ranking AP run")
    parser.add_argument("--memory-check", action="store_true", help="50,000 x 768 full AP peak memory")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child()
    if args.memory_check:
        return memory_check()
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
