"""Valuation at scale on real MNIST: projected gradients into a store, in-run valuation's overhead,
EK-FAC influence of the DC ConvNet.

    python bench/bench_valuation_scale.py --dataset ../shared/data/mnist.npz \
        [--only store,inrun,ekfac] [--threads 2] [--out bench/measured/cpu-2026-12-07/bench_valuation_scale.md]

- store: factorized projections (dim 4096) of all 60,000 training images' gradients through the
  MNIST MLP (784-128-10, 101,770 parameters) into a memory-mapped GradientStore, timed, with the
  process's peak RSS; beside it materialize-then-project (per-sample gradients times a dense
  matrix, TRAK's CPU path) and torch.func vmap + project, timed on 2,048 images.
- inrun: a training step of the MLP 784-512-256-10 and of the MNIST MLP (B = 256 and 1024) with
  ``InRunValuation.backward`` (32 validation rows) against a plain step (forward, backward,
  optimizer step), medians of interleaved runs; beside them the floor (a plain step over the
  B + 32 rows plus the ghost dot products' GEMMs).
- ekfac: ``InfluenceFunction(hessian="ekfac")`` of the DC ConvNet (width 128, depth 3, 28x28,
  320k parameters) on 10,000 training images for 500 test images: fit, then scores; time and
  peak RSS.
Each section runs in a fresh process (its own peak RSS). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _report import STEADY_MALLOC, rss_kb, write_report  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist(path, flat=True):
    with np.load(path) as f:
        X, y, Xt, yt = f["X_train"], f["y_train"], f["X_test"], f["y_test"]

    def prep(a):
        t = (torch.from_numpy(a).float() / 255.0 - MNIST_MEAN) / MNIST_STD
        return t.flatten(1) if flat else t.unsqueeze(1)

    return prep(X), torch.from_numpy(y).long(), prep(Xt), torch.from_numpy(yt).long()


def mnist_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def section_store(args):
    from fastdd.grad.api import per_sample_grad_projections
    from fastdd.valuation import GradientStore
    import fastdd

    X, y, _, _ = mnist(args.dataset)
    model = mnist_mlp().eval()
    dim, chunk = 4096, 2048
    with tempfile.TemporaryDirectory() as tmp:
        per_sample_grad_projections(model, X[:64], y[:64], dim)  # warm: matrices, first-call costs
        base_rss = rss_kb("VmRSS")
        t0 = time.perf_counter()
        store = GradientStore(os.path.join(tmp, "g.npy"), len(y), dim, {"model": "mnist-mlp"})
        for s in store.missing(chunk):
            store.write(s, per_sample_grad_projections(model, X[s], y[s], dim))
        t_store = time.perf_counter() - t0
        peak = rss_kb("VmHWM")
        size_mb = os.path.getsize(store.path) / 2**20
    # baselines on 2,048 images: materialize the per-sample gradients, then project them with a dense
    # matrix held in memory (generated before timing: TRAK's CPU projector), fastdd's or vmap's
    n = 2048
    names = list(dict(model.named_parameters()))
    R = torch.randn(sum(p.numel() for p in model.parameters()), dim) / dim ** 0.5
    from workloads import vmap_per_sample  # noqa: E402

    per_sample = vmap_per_sample(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def project(g):
        return torch.cat([g[k].flatten(1) for k in names], 1) @ R

    t0 = time.perf_counter()
    for s in range(0, n, 256):
        project(fastdd.per_sample_grads(model, X[s:s + 256], y[s:s + 256]))
    t_mat = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, n, 256):
        project(per_sample(params, X[s:s + 256], y[s:s + 256]))
    t_vmap = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, n, 256):
        per_sample_grad_projections(model, X[s:s + 256], y[s:s + 256], dim)
    t_fact = time.perf_counter() - t0
    return dict(t_store=t_store, n=len(y), dim=dim, peak_mb=peak / 1024, base_mb=base_rss / 1024, store_mb=size_mb,
                chunk=chunk, t_mat_2048=t_mat, t_vmap_2048=t_vmap, t_fact_2048=t_fact)


def section_inrun(args):
    import torch.nn.functional as F
    from fastdd.valuation import InRunValuation

    X, y, Xv, yv = mnist(args.dataset)
    rows = []
    for (name, sizes), B in itertools.product((("MLP 784-512-256-10", (784, 512, 256, 10)),
                                               ("MNIST MLP 784-128-10", (784, 128, 10))), (256, 1024)):
        torch.manual_seed(0)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        valuer = InRunValuation(model, Xv[:1000], yv[:1000], n_train=len(y), val_batch_size=32)
        gen = torch.Generator().manual_seed(0)

        def plain():
            idx = torch.randint(0, len(y), (B,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()

        def inrun():
            idx = torch.randint(0, len(y), (B,), generator=gen)
            opt.zero_grad()
            valuer.backward(X[idx], y[idx], idx, lr=0.01)
            opt.step()

        # The floor no implementation gets under: a plain step over the B + 32 rows (the validation
        # rows must go forward and backward) plus the ghost dot products' GEMMs on those shapes
        # ((a_i . a_j)(g_i . g_j) per Linear: B 32 (d + p) flops, the cheapest exact form here).
        def plain_with_val_rows():
            idx = torch.randint(0, len(y), (B + 32,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()

        linears = [m for m in model if isinstance(m, nn.Linear)]
        A = [torch.randn(B + 32, m.in_features) for m in linears]
        G = [torch.randn(B + 32, m.out_features) for m in linears]
        w = torch.full((32,), 1 / 32)

        def ghost_gemms():
            total = torch.zeros(B)
            for a, g in zip(A, G):
                K = g[:B] @ g[B:].T
                K *= (a[:B] @ a[B:].T).add_(1.0)
                total += K @ w

        times = {"plain": [], "inrun": [], "plain_val_rows": [], "ghost": []}
        steps = (("plain", plain), ("inrun", inrun), ("plain_val_rows", plain_with_val_rows), ("ghost", ghost_gemms))
        for _ in range(5):
            for _, fn in steps:
                fn()
        for _ in range(args.repeat):
            for k, fn in steps:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append(dict(model=name, B=B, plain_ms=1e3 * med["plain"], inrun_ms=1e3 * med["inrun"],
                         floor_ms=1e3 * (med["plain_val_rows"] + med["ghost"])))
    return rows


def section_ekfac(args):
    from fastdd.models import ConvNet
    from fastdd.valuation import InfluenceFunction

    X, y, Xt, yt = mnist(args.dataset, flat=False)
    X, y, Xt, yt = X[:10_000], y[:10_000], Xt[:500], yt[:500]
    torch.manual_seed(0)
    model = ConvNet(in_channels=1, num_classes=10, image_size=28, width=128, depth=3)
    from fastdd.train import train_model

    t0 = time.perf_counter()
    train_model(model, X[:2000], y[:2000], epochs=1, batch_size=128)  # a briefly trained model
    t_train = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    import warnings

    base = rss_kb("VmRSS")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = InfluenceFunction(model, hessian="ekfac", batch_size=256, test_chunk=500).fit(X, y)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    S = inf.scores(Xt, yt)
    t_scores = time.perf_counter() - t0
    return dict(n_params=n_params, n_scored=inf.flat.numel, t_train=t_train, t_fit=t_fit, t_scores=t_scores,
                peak_mb=rss_kb("VmHWM") / 1024, base_mb=base / 1024, shape=list(S.shape),
                finite=bool(torch.isfinite(S).all()), warning=str(caught[0].message)[:160] if caught else "")


SECTIONS = {"store": section_store, "inrun": section_inrun, "ekfac": section_ekfac}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--only", default="store,inrun,ekfac")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.section:
        print("RESULT " + json.dumps(SECTIONS[args.section](args)))
        return
    results = {}
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--dataset", args.dataset, "--threads", str(args.threads),
               "--repeat", str(args.repeat), "--section", name]
        # steady malloc for the step timings: page faults of freshly mapped gradients swing them
        env = {**os.environ, **STEADY_MALLOC} if name == "inrun" else None
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise SystemExit(f"section {name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[-1][7:])
        print(name, results[name], flush=True)
    lines = ["# Valuation at scale on MNIST (CPU)", "",
             f"`python bench/bench_valuation_scale.py --dataset PATH --only {args.only}`, torch {torch.__version__}, "
             f"{args.threads} threads, each section in a fresh process.", ""]
    if "store" in results:
        r = results["store"]
        lines += ["## Projected gradients of all MNIST training images (MNIST MLP, dim 4096, factorized)", "",
                  "| what | figure |", "|---|---|",
                  f"| {r['n']:,} images into a memory-mapped GradientStore (chunks of {r['chunk']}) | **{r['t_store']:.1f} s** |",
                  f"| store file | {r['store_mb']:.0f} MB |",
                  f"| peak RSS of the process / RSS before the run | {r['peak_mb']:.0f} / {r['base_mb']:.0f} MB |",
                  f"| 2,048 images: fastdd factorized | {r['t_fact_2048']:.2f} s |",
                  f"| 2,048 images: fastdd per-sample gradients, then a dense projection held in memory (1.7 GB) | {r['t_mat_2048']:.2f} s |",
                  f"| 2,048 images: torch.func vmap gradients, then the same dense projection | {r['t_vmap_2048']:.2f} s |", ""]
    if "inrun" in results:
        lines += ["## In-run valuation: a training step with InRunValuation.backward vs a plain step (32 validation "
                  f"rows, medians of {args.repeat} interleaved steps, steady malloc)", "",
                  "| model | B | plain step (ms) | with in-run valuation (ms) | overhead | floor (ms) | "
                  "floor's overhead |", "|---|---|---|---|---|---|---|"]
        for r in results["inrun"]:
            floor = r.get("floor_ms")
            lines.append(f"| {r['model']} | {r['B']} | {r['plain_ms']:.2f} | {r['inrun_ms']:.2f} | "
                         f"{100 * (r['inrun_ms'] / r['plain_ms'] - 1):+.0f}% | "
                         + (f"{floor:.2f} | {100 * (floor / r['plain_ms'] - 1):+.0f}% |" if floor else "- | - |"))
        lines += ["", "Floor: a plain step over the B + 32 rows plus the ghost dot products' GEMMs alone (what any "
                  "exact implementation computes beyond the plain step); the rest of the overhead is the engine's "
                  "hooks, its per-step bookkeeping and the copies.", ""]
    if "ekfac" in results:
        r = results["ekfac"]
        lines += ["## EK-FAC influence of the DC ConvNet (width 128, depth 3, 28x28) on 10,000 MNIST images, 500 test images",
                  "", "| what | figure |", "|---|---|",
                  f"| parameters (scored: Linear/Conv layers) | {r['n_params']:,} ({r['n_scored']:,}) |",
                  f"| fit: covariances + eigendecompositions + eigenvalue correction | {r['t_fit']:.0f} s |",
                  f"| scores [10,000 x 500] | {r['t_scores']:.0f} s |",
                  f"| total | **{r['t_fit'] + r['t_scores']:.0f} s** |",
                  f"| peak RSS / before | {r['peak_mb']:.0f} / {r['base_mb']:.0f} MB |",
                  f"| warning | {r['warning']} |", ""]
    print("\n".join(lines))
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
