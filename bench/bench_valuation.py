"""Valuation benchmarks on this machine: influence solvers, KNN-Shapley at scale, TMC throughput.

    python bench/bench_valuation.py [--threads 2] [--out results/bench_valuation.md]
"""
from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch

from _report import write_report
from workloads import knn_problem


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def train(model, X, y, epochs=100, wd=1e-3):
    opt = torch.optim.LBFGS(model.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y) + 0.5 * wd * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def bench_influence(loop_points):
    from fastdd.data import load_digits
    from fastdd.valuation import InfluenceFunction

    d = load_digits()
    X, y, Xt, yt = d.X_train.flatten(1), d.y_train, d.X_test.flatten(1), d.y_test
    rows = []
    torch.manual_seed(0)
    # the MLP's Hessian is indefinite: it uses the Gauss-Newton matrix (positive semi-definite)
    models = {"logistic regression (650 params)": (torch.nn.Linear(64, 10), "exact"),
              "MLP 64-32-10 (2,410 params, Gauss-Newton)": (
                  torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)), "gauss-newton")}
    for name, (model, hessian) in models.items():
        train(model, X, y)
        kw = dict(damping=1e-3, tol=1e-5, test_chunk=450, hessian=hessian)
        t_direct, s_direct = timed(lambda: InfluenceFunction(model, solver="direct", **kw).fit(X, y).scores(Xt, yt))
        cg = InfluenceFunction(model, solver="cg", **kw).fit(X, y)
        t_cg, s_cg = timed(lambda: cg.scores(Xt, yt))
        pcg = InfluenceFunction(model, solver="cg", preconditioner="jacobi", **kw).fit(X, y)
        t_pcg, _ = timed(lambda: pcg.scores(Xt, yt))
        lissa = InfluenceFunction(model, solver="lissa", damping=1e-2, tol=1e-5, max_iter=3000, test_chunk=450,
                                  hessian=hessian).fit(X, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_lissa, _ = timed(lambda: lissa.scores(Xt, yt))
        # the baseline: one CG solve per test point, as a per-point loop does
        single = InfluenceFunction(model, solver="cg", damping=1e-3, tol=1e-5, test_chunk=1, hessian=hessian).fit(X, y)
        t_loop, _ = timed(lambda: single.scores(Xt[:loop_points], yt[:loop_points]))
        t_loop_all = t_loop * len(yt) / loop_points
        err = ((s_cg - s_direct).norm() / s_direct.norm()).item()
        rows += [
            f"| {name} | direct (Cholesky) | {t_direct:.2f} | | |",
            f"| {name} | block CG, all 450 test vectors at once | {t_cg:.2f} | {cg.info[-1].iterations} | rel. error vs direct {err:.1e} |",
            f"| {name} | block CG + Jacobi | {t_pcg:.2f} | {pcg.info[-1].iterations} | |",
            f"| {name} | LiSSA (damping 1e-2) | {t_lissa:.2f} | {lissa.info[-1].iterations} | |",
            f"| {name} | loop of single CG solves | {t_loop_all:.2f} | | measured on {loop_points} points, scaled to 450; "
            f"block CG is {t_loop_all / t_cg:.1f}x faster |",
        ]
    return rows


def bench_knn():
    from fastdd.valuation import knn_shapley

    X, y, Xt, yt = knn_problem()
    t, v = timed(lambda: knn_shapley(X, y, Xt, yt, k=5))
    # uncentred features (every point shifted by 1e4, as float32 holds them): the same time, and the
    # same values as float64 computes on those very numbers (the GEMM expansion runs on centred data)
    Xs, Xts = X + 1e4, Xt + 1e4
    t_shift, v_shift = timed(lambda: knn_shapley(Xs, y, Xts, yt, k=5))
    t64, v64 = timed(lambda: knn_shapley(Xs.double(), y, Xts.double(), yt, k=5))
    err = float((v_shift.double() - v64).abs().max() / v64.abs().max())
    return [f"| KNN-Shapley | 100,000 train x 1,000 test x 64 features, k=5 | {t:.2f} | | |",
            f"| KNN-Shapley, uncentred | the same, every point + 1e4 (float32) | {t_shift:.2f} | | "
            f"largest difference from float64 on the same numbers: {err:.2g} of the largest value |",
            f"| KNN-Shapley, float64 | the same uncentred data in float64 | {t64:.2f} | | |"]


def bench_tmc():
    from fastdd.data import load_digits
    from fastdd.valuation import KNNUtility, tmc_shapley

    d = load_digits()
    U = KNNUtility(d.X_train[:300].flatten(1), d.y_train[:300], d.X_test.flatten(1), d.y_test, k=1)
    t, res = timed(lambda: tmc_shapley(U, 300, max_permutations=50, truncation_tol=0.01, min_permutations=50))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [f"| TMC-Shapley | 300 digits, KNN utility, 50 permutations | {t:.2f} | | "
            f"{res.n_samples / t:.1f} permutations/s; peak RSS of the process so far {peak:.0f} MB |"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loop-points", type=int, default=45, help="test points timed for the per-point loop")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"# Valuation benchmarks ({args.threads} threads; digits: 1,347 train x 450 test)", "",
             "| workload | method | seconds | iterations | note |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for bench in (bench_tmc, bench_knn, lambda: bench_influence(args.loop_points)):  # TMC first: its peak RSS
        for row in bench():
            lines.append(row)
            print(row, flush=True)
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
