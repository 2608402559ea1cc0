"""Pruning benchmarks: k-means against scikit-learn at equal iterations, GraNd against vmap,
SemDeDup on 60,000 embeddings (time and the largest similarity block it holds).

    python bench/bench_pruning.py [--threads 2] [--out results/bench_pruning.md]
"""
from __future__ import annotations

import argparse
import os

import torch

from fastdd._timing import best_of
from _report import write_report
from workloads import dedup_embeddings, kmeans_blobs, vmap_per_sample


def bench_kmeans(repeat):
    import numpy as np
    from sklearn.cluster import KMeans

    from fastdd.pruning import kmeans

    rows = []
    # the same data, and the same data shifted by 1000 (uncentred, as raw features are): the
    # objectives must agree with scikit-learn's on both
    for offset, iters in ((0.0, 10), (0.0, 30), (1000.0, 30)):
        X = kmeans_blobs(offset)
        Xn = X.numpy().astype(np.float32)
        # tol=0 and one init: both run exactly `iters` Lloyd iterations after k-means++
        ours = best_of(lambda: kmeans(X, 100, n_init=1, max_iter=iters, tol=0.0, seed=0), repeat)
        theirs = best_of(lambda: KMeans(100, n_init=1, max_iter=iters, tol=0.0, random_state=0,
                                        algorithm="lloyd").fit(Xn), repeat)
        o = kmeans(X, 100, n_init=1, max_iter=iters, tol=0.0, seed=0).objective
        t = KMeans(100, n_init=1, max_iter=iters, tol=0.0, random_state=0, algorithm="lloyd").fit(Xn).inertia_
        shift = f", shifted by {offset:g}" if offset else ""
        rows.append(f"| k-means 100,000 x 64{shift}, k=100, {iters} iterations | {ours[0]:.3f} | {theirs[0]:.3f} | "
                    f"{theirs[0] / ours[0]:.2f}x | objective {o:.4g} vs {t:.4g} |")
    return rows


def bench_grand(repeat):
    from fastdd.models import MLP
    from fastdd.pruning import grand_scores

    torch.manual_seed(0)
    model = MLP(784, 10, hidden=(512, 256))
    X, y = torch.randn(1024, 1, 28, 28), torch.randint(0, 10, (1024,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    per_sample = vmap_per_sample(model)

    def vmap_norms():
        return torch.cat([sum(g.flatten(1).square().sum(1) for g in per_sample(params, X[i:i + 256], y[i:i + 256]).values()).sqrt()
                          for i in range(0, 1024, 256)])

    ours = best_of(lambda: grand_scores(model, X, y, batch_size=256), repeat)
    theirs = best_of(vmap_norms, repeat)
    return [f"| GraNd, MLP 784-512-256-10, 1,024 samples (batches of 256) | {ours[0]:.3f} | {theirs[0]:.3f} | "
            f"{theirs[0] / ours[0]:.1f}x | vmap then norms |"]


def bench_semdedup(repeat):
    from fastdd.curation import semdedup

    E, planted = dedup_embeddings()
    seconds, _ = best_of(lambda: semdedup(E, eps=1e-4), repeat)
    res = semdedup(E, eps=1e-4)
    largest = int(torch.bincount(res.clusters).max())
    block = min(largest, 1024)
    return [f"| SemDeDup, 60,000 x 32 embeddings ({planted:,} planted near-copies), k=245 | {seconds:.3f} | | | "
            f"removed {len(res.removed()):,} at eps 1e-4; largest cluster {largest:,}: similarity blocks of at most "
            f"{largest:,} x {block} ({4 * largest * block / 2**20:.1f} MB), never 60,000 x 60,000 (13.4 GB) |"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    lines = [f"# Pruning benchmarks ({args.threads} threads, best of {args.repeat})", "",
             "| workload | fastdd (s) | alternative (s) | speed-up | note |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for row in bench_kmeans(args.repeat) + bench_grand(args.repeat) + bench_semdedup(args.repeat):
        lines.append(row)
        print(row, flush=True)
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
