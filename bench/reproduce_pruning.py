"""Pruning on real MNIST: pruning curves of every policy and Sorscher's phase transition.

    python bench/reproduce_pruning.py --dataset ../shared/data/mnist.npz \
        [--size 60000] [--phase-sizes 1000 10000 60000] [--seeds 2] [--steps 500] \
        [--out-dir bench/measured/cpu-2026-12-02/pruning]

1. Scores of all training images: self-supervised (SimCLR) embeddings -> prototype scores
   (distance to the nearest of the k-means centroids, no labels), timed, with k-means timed against
   scikit-learn at equal iterations on the same embeddings; EL2N from briefly trained ConvNets.
2. Pruning curves on the first ``--size`` training images (a fixed stratified order): test accuracy
   of a ConvNet (width 16, depth 3) trained for a fixed number of SGD steps on the kept subset,
   for random / easy / hard / CCS / Moderate with prototype and EL2N scores, at 30-95 % pruned.
3. The phase transition: keep easy vs keep hard (prototype scores) over initial training-set
   sizes x kept fractions; a heat map of (hard - easy) accuracy.

Every model trained is recorded in ``results.json`` in the output folder as it finishes; a rerun
with the same options picks up where the last one stopped. Writes ``README.md`` (tables) and
PNG figures beside it. Threads: ``--threads`` (default 2); run it alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _report import Results  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
POLICIES = ("easy", "hard", "ccs", "moderate")


def load_mnist(path):
    with np.load(path) as f:
        X, y, Xt, yt = f["X_train"], f["y_train"], f["X_test"], f["y_test"]

    def prep(a):
        return ((torch.from_numpy(a).float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)

    return prep(X), torch.from_numpy(y).long(), prep(Xt), torch.from_numpy(yt).long()


def stratified_prefix(y, seed=0):
    """A fixed order of the training set whose every prefix is (nearly) class-balanced."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    rank = torch.empty(len(y), dtype=torch.long)
    for c in torch.unique(y):
        rows = perm[y[perm] == c]
        rank[rows] = torch.arange(len(rows))
    # interleave the classes: position = (rank within class, class)
    key = rank * 100 + y
    return perm[torch.argsort(key[perm], stable=True)]


def train_and_test(X, y, Xt, yt, steps, seed, width=16, batch_size=128):
    from fastdd.models import ConvNet
    from fastdd.train import accuracy, train_model

    torch.manual_seed(seed)
    model = ConvNet(1, 10, 28, width=width, depth=3)
    epochs = max(1, round(steps * batch_size / len(y)))
    train_model(model, X, y, epochs=epochs, batch_size=min(batch_size, len(y)), seed=seed)
    return accuracy(model, Xt, yt)


def scores_stage(X, y, res, args, lines):
    from sklearn.cluster import KMeans

    from fastdd.models import ConvNet
    from fastdd.pruning import el2n_scores, kmeans, prototype_scores, self_supervised_embeddings

    cache = os.path.join(args.out_dir, "scores.pt")
    if os.path.exists(cache):
        saved = torch.load(cache, weights_only=True)
        if saved["n"] == len(y):
            return saved["prototype"], saved["el2n"], saved["times"]
    times = {}
    t = time.perf_counter()
    emb = self_supervised_embeddings(X, epochs=args.ssl_epochs, progress=True)
    times["ssl"] = time.perf_counter() - t
    t = time.perf_counter()
    proto = prototype_scores(emb, n_clusters=args.clusters)
    times["prototype"] = time.perf_counter() - t
    iters = 20
    t = time.perf_counter()
    ours = kmeans(emb, args.clusters, n_init=1, max_iter=iters, tol=0.0, seed=0)
    times["kmeans"] = time.perf_counter() - t
    t = time.perf_counter()
    theirs = KMeans(args.clusters, n_init=1, max_iter=iters, tol=0.0, random_state=0, algorithm="lloyd").fit(
        emb.numpy())
    times["kmeans_sklearn"] = time.perf_counter() - t
    times["kmeans_objectives"] = [float(ours.objective), float(theirs.inertia_)]
    t = time.perf_counter()
    el2n = el2n_scores(lambda: ConvNet(1, 10, 28, width=16, depth=3), X, y, epochs=args.el2n_epochs, n_runs=2,
                       batch_size=128)
    times["el2n"] = time.perf_counter() - t
    torch.save({"n": len(y), "prototype": proto, "el2n": el2n, "times": times}, cache)
    return proto, el2n, times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="mnist.npz with X_train, y_train, X_test, y_test")
    ap.add_argument("--size", type=int, default=60000, help="initial training-set size of the pruning curves")
    ap.add_argument("--pruned", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9, 0.95])
    ap.add_argument("--phase-sizes", type=int, nargs="+", default=[1000, 10000, 60000])
    ap.add_argument("--phase-kept", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.7, 1.0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=500, help="SGD steps (batch 128) per model: a fixed budget")
    ap.add_argument("--ssl-epochs", type=int, default=3)
    ap.add_argument("--el2n-epochs", type=int, default=1)
    ap.add_argument("--clusters", type=int, default=100, help="k-means clusters of the prototype scores")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images (a smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="bench/measured/cpu-2026-12-02/pruning")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    from fastdd.pruning import select

    X_all, y_all, Xt, yt = load_mnist(args.dataset)
    order = stratified_prefix(y_all)
    X_all, y_all = X_all[order][:args.limit], y_all[order][:args.limit]
    res = Results(os.path.join(args.out_dir, "results.json"))
    lines = ["# Pruning on MNIST (fastdd)", "",
             f"`python bench/reproduce_pruning.py --dataset {args.dataset} --size {args.size} --seeds {args.seeds} "
             f"--steps {args.steps}` ({args.threads} threads). ConvNet width 16 depth 3, SGD lr 0.01 momentum 0.9, "
             f"{args.steps} steps of batch 128 per model (a fixed budget), test accuracy on the 10,000 MNIST test "
             f"images, mean ± std over {args.seeds} seeds. Training images in a fixed class-interleaved order; a "
             "size-N set is its first N images.", ""]
    proto, el2n, times = scores_stage(X_all, y_all, res, args, lines)
    lines += [f"## Scores of all {len(y_all):,} training images", "",
              f"- self-supervised embeddings ({args.ssl_epochs} epochs): {times['ssl']:.1f} s; prototype scores "
              f"(k-means, k={args.clusters}, 3 inits): {times['prototype']:.1f} s; together "
              f"{times['ssl'] + times['prototype']:.1f} s (target: under 300 s)",
              f"- k-means on the embeddings, k={args.clusters}, 20 Lloyd iterations: fastdd {times['kmeans']:.2f} s, "
              f"scikit-learn {times['kmeans_sklearn']:.2f} s (objectives {times['kmeans_objectives'][0]:.4g} vs "
              f"{times['kmeans_objectives'][1]:.4g})",
              f"- EL2N (2 ConvNets, {args.el2n_epochs} epoch each): {times['el2n']:.1f} s", ""]

    def run(key, X, y, seed):
        acc = res.get(key)
        if acc is None:
            t = time.perf_counter()
            acc = train_and_test(X, y, Xt, yt, args.steps, seed)
            res.put(key, acc)
            print(f"{key}: {100 * acc:.2f}% ({time.perf_counter() - t:.0f} s)", flush=True)
        return acc

    # ---------------------------------------------------------------- pruning curves
    N = min(args.size, len(y_all))
    X, y = X_all[:N], y_all[:N]
    score_sets = {"prototype": proto[:N], "el2n": el2n[:N]}
    rows = {}
    for pruned in args.pruned:
        kept = 1.0 - pruned
        for seed in range(args.seeds):
            idx = select(torch.zeros(N), kept, keep="random", labels=y, seed=seed)
            rows.setdefault(("random", "-", pruned), []).append(run(f"curve/{N}/random/{pruned}/{seed}", X[idx],
                                                                    y[idx], seed))
            for sname, s in score_sets.items():
                for policy in POLICIES:
                    idx = select(s, kept, keep=policy, labels=y, seed=seed)
                    acc = run(f"curve/{N}/{sname}/{policy}/{pruned}/{seed}", X[idx], y[idx], seed)
                    rows.setdefault((policy, sname, pruned), []).append(acc)
    full = [run(f"curve/{N}/full/{seed}", X, y, seed) for seed in range(args.seeds)]

    def cell(v):
        v = torch.tensor(v) * 100
        return f"{v.mean():.1f} ± {v.std(unbiased=True) if len(v) > 1 else 0:.1f}"

    lines += [f"## Pruning curves, initial size {N:,} (full data: {cell(full)}%)", "",
              "| policy | score | " + " | ".join(f"{p:.0%} pruned" for p in args.pruned) + " |",
              "|---|---|" + "---|" * len(args.pruned)]
    order_rows = [("random", "-")] + [(p, s) for s in score_sets for p in POLICIES]
    for policy, sname in order_rows:
        lines.append(f"| {policy} | {sname} | " + " | ".join(cell(rows[(policy, sname, p)]) for p in args.pruned) + " |")
    lines.append("")
    for sname in score_sets:
        for p in args.pruned:
            mean = {pol: float(np.mean(rows[(pol, sname if pol != "random" else "-", p)])) for pol in
                    ("random", *POLICIES)}
            best_score_only = max(mean["easy"], mean["hard"])
            lines.append(f"- {sname}, {p:.0%} pruned: CCS - random = {100 * (mean['ccs'] - mean['random']):+.1f}, "
                         f"CCS - best of easy/hard = {100 * (mean['ccs'] - best_score_only):+.1f} points")
    lines.append("")
    _plot_curves(rows, args.pruned, score_sets, os.path.join(args.out_dir, "curves.png"), N)
    lines += ["![pruning curves](curves.png)", ""]

    # ---------------------------------------------------------------- phase transition
    grid = np.zeros((len(args.phase_sizes), len(args.phase_kept)))
    spread = np.zeros_like(grid)  # std over seeds of the difference
    for i, size in enumerate(args.phase_sizes):
        size = min(size, len(y_all))
        Xs, ys, ps = X_all[:size], y_all[:size], proto[:size]
        for j, kept in enumerate(args.phase_kept):
            diff = []
            for seed in range(args.seeds):
                accs = {}
                for policy in ("easy", "hard"):
                    key = f"phase/{size}/{policy}/{kept}/{seed}" if kept < 1 else f"phase/{size}/full/{seed}"
                    idx = select(ps, kept, keep=policy, labels=ys, seed=seed)
                    accs[policy] = run(key, Xs[idx], ys[idx], seed)
                diff.append(accs["hard"] - accs["easy"])
            grid[i, j] = 100 * float(np.mean(diff))
            spread[i, j] = 100 * float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
    lines += ["## The phase transition on MNIST (prototype scores)", "",
              "Accuracy of keep-hard minus keep-easy (points, mean ± std over seeds): positive where keeping the "
              "hard examples wins.", "",
              "| initial size | " + " | ".join(f"keep {k:.0%}" for k in args.phase_kept) + " |",
              "|---|" + "---|" * len(args.phase_kept)]
    for i, size in enumerate(args.phase_sizes):
        lines.append(f"| {size:,} | " + " | ".join(f"{grid[i, j]:+.1f} ± {spread[i, j]:.1f}"
                                                   for j in range(len(args.phase_kept))) + " |")
    lines += ["", "![phase transition](phase.png)", ""]
    _plot_phase(grid, args.phase_sizes, args.phase_kept, os.path.join(args.out_dir, "phase.png"))
    with open(os.path.join(args.out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _plot_curves(rows, pruned, score_sets, path, N):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(score_sets), figsize=(6 * len(score_sets), 4), sharey=True)
    for ax, sname in zip(np.atleast_1d(axes), score_sets):
        for policy in ("random", *POLICIES):
            key = lambda p: (policy, "-" if policy == "random" else sname, p)  # noqa: E731
            mean = [100 * np.mean(rows[key(p)]) for p in pruned]
            std = [100 * np.std(rows[key(p)]) for p in pruned]
            ax.errorbar([100 * p for p in pruned], mean, yerr=std, marker="o", capsize=3, label=policy)
        ax.set_xlabel("training data pruned (%)")
        ax.set_title(f"MNIST, {N:,} images, {sname} scores")
        ax.grid(alpha=0.3)
        ax.legend()
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_phase(grid, sizes, kept, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = max(1e-9, float(np.abs(grid).max()))
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(grid.T, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
    ax.set_yticks(range(len(kept)), [f"{k:.0%}" for k in kept])
    ax.set_xlabel("initial training-set size")
    ax.set_ylabel("fraction kept")
    ax.set_title("MNIST: accuracy(keep hard) - accuracy(keep easy)")
    fig.colorbar(im, ax=ax, label="points (red: keep hard wins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
