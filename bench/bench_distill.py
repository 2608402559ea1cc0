"""Distillation: time per iteration and peak memory of fastdd's DC and DM against a
per-class-loop implementation of the same method (the structure of the reference code),
and MTT's peak memory against the number of unrolled student steps (whole unroll, and
``low_memory=True``: one step's graph at a time). It also times the part of DC and DM that
both implementations compute identically, which bounds the possible speed-up.

Digits (8x8), ipc 10, ConvNet width 64 / depth 2 (the demo's), 256 real images per class; with
``--dataset PATH`` (MNIST as a .npz) the papers' shapes instead: 28x28, ConvNet width 128 /
depth 3, DC at ipc 1 and 10, DM at ipc 10 and MTT at ipc 10 (MTT has no per-class loop to
compare with: its time and memory alone).
The per-class-loop references, like the DC/DSA/DM code: for each class, the real batch
through the network (DC: gradients of all parameters; DM: embeddings under autograd, then
detached), the synthetic batch likewise, the distance layer by layer in Python; DC's
inner loop (training the network on the synthetic set) is the same in both. Timings
alternate fastdd and reference iterations in one process (median and min); peak memory
(VmHWM above the RSS after set-up) comes from a process per method.

On a GPU (``--device cuda``) the same comparison runs there, with CUDA-synchronized timings and
peak memory from ``torch.cuda.max_memory_allocated``.

``--steady-malloc`` keeps freed memory in glibc's heap in the timing process: with the
default allocator, page faults of large temporaries swing these CPU timings by up to 30%.

    python bench/bench_distill.py [--threads 2] [--iters 6] [--steady-malloc] [--device cpu|cuda] [--out FILE]
    python bench/bench_distill.py --dataset ../shared/data/mnist.npz --iters 2 --steady-malloc [--only dm10]

DM's real pass is compiled by default on 28x28 (``compile="auto"``); the MNIST table shows its
eager step beside (the warm-up iteration pays the compile; memory is measured on a warm step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _report import STEADY_MALLOC, reset_peak_rss, rss_kb, write_report
from workloads import with_aten_pooling

OPTS = dict(width=64, depth=2)
IPC = 10
MNIST_OPTS = dict(width=128, depth=3)


# --------------------------------------------------------------------------- references
def _class_real_batch(engine, c):
    """Class ``c``'s real batch (the reference code's ``get_images(c, batch_real)``)."""
    import torch

    rows = engine.by_class[c]
    idx = rows[torch.randint(len(rows), (min(engine.batch_real, len(rows)),), generator=engine.gen)]
    return engine.X[idx], engine.y[idx]


def _class_syn(engine, c):
    rows = slice(c * engine.ipc, (c + 1) * engine.ipc)
    return engine.images[rows], engine.labels[rows]


def _train_on_synthetic(engine, net, net_opt, steps: int):
    """DC's inner loop: ``steps`` training steps of ``net`` on the (detached) synthetic set."""
    import torch.nn.functional as F

    images = engine.images.detach()
    for _ in range(steps):
        net_opt.zero_grad()
        F.cross_entropy(net(images), engine.labels).backward()
        net_opt.step()


def _dm_class_pair(engine, c):
    """Class ``c``'s real and synthetic images under one DSA draw (DM's reference loop body)."""
    img_real, _ = _class_real_batch(engine, c)
    img_syn, _ = _class_syn(engine, c)
    if engine.dsa is not None:
        img_real, img_syn = engine.dsa(img_real, img_syn, engine.gen)
    return img_real, img_syn


def dc_reference_step(engine):
    """DC's per-class loop (Zhao et al. 2021 code structure) on ``engine``'s state."""
    import torch
    import torch.nn.functional as F

    net = with_aten_pooling(engine._fresh_net())
    params = list(net.parameters())
    net_opt = torch.optim.SGD(net.parameters(), lr=engine.lr_net)
    for outer in range(engine.outer_loop):
        loss = 0
        for c in range(engine.num_classes):
            img_real, lab_real = _class_real_batch(engine, c)
            img_syn, lab_syn = _class_syn(engine, c)
            gw_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(img_real), lab_real), params)]
            gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab_syn), params, create_graph=True)
            for gr, gs in zip(gw_real, gw_syn):  # "ours", layer by layer; bias skipped
                if gr.dim() == 1:
                    continue
                gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
                loss = loss + (1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)).sum()
        engine.opt.zero_grad()
        loss.backward()
        engine.opt.step()
        if outer == engine.outer_loop - 1:
            break
        _train_on_synthetic(engine, net, net_opt, engine.inner_loop)


def _eager_embedder(engine):
    """A fresh frozen network's embedding, eager (the reference code compiles nothing)."""
    from fastdd.models import embedding_fn

    return embedding_fn(with_aten_pooling(engine._frozen_net()))


def dm_reference_step(engine):
    """DM's per-class loop (Zhao & Bilen 2023 code structure): one DSA draw per class."""
    embed = _eager_embedder(engine)
    loss = 0
    for c in range(engine.num_classes):
        img_real, img_syn = _dm_class_pair(engine, c)
        out_real = embed(img_real).detach()
        out_syn = embed(img_syn)
        loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
    engine.opt.zero_grad()
    loss.backward()
    engine.opt.step()


def dc_shared_part(engine):
    """What DC's reference and fastdd both do, identically: the inner loops of one iteration
    (outer_loop - 1 times inner_loop training steps on the synthetic set) and, each outer loop,
    the real images' gradient class by class (the same convolutions and products whether one
    backward serves all classes or one per class; fastdd's is one)."""
    import torch
    import torch.nn.functional as F

    net = with_aten_pooling(engine._fresh_net())
    params = list(net.parameters())
    net_opt = torch.optim.SGD(net.parameters(), lr=engine.lr_net)
    for _ in range(engine.outer_loop):
        for c in range(engine.num_classes):
            img_real, lab_real = _class_real_batch(engine, c)
            torch.autograd.grad(F.cross_entropy(net(img_real), lab_real), params)
    _train_on_synthetic(engine, net, net_opt, (engine.outer_loop - 1) * engine.inner_loop)


def dm_shared_part(engine):
    """What DM's reference and fastdd both do: the real images (DSA-augmented) through a
    fresh frozen network, class by class, without autograd (eager, as the reference runs it;
    fastdd's compiled real pass does this work faster, so it can pass the bound)."""
    import torch

    embed = _eager_embedder(engine)
    with torch.no_grad():
        for c in range(engine.num_classes):
            embed(_dm_class_pair(engine, c)[0])


# --------------------------------------------------------------------------- child side
def _engine(method, syn_steps=10, device="cpu", low_memory=False, dataset=None, ipc=IPC, compile="auto"):
    import torch

    from fastdd.data import load, load_digits
    from fastdd.distill import DistributionMatching, GradientMatching, TrajectoryMatching, train_experts

    d = load(dataset) if dataset else load_digits()
    opts = MNIST_OPTS if dataset else OPTS
    X, y = d.X_train.to(device), d.y_train.to(device)
    if method == "dc":
        return GradientMatching(X, y, ipc, model_options=opts, seed=0)
    if method == "dm":
        return DistributionMatching(X, y, ipc, model_options=opts, seed=0, compile=compile)
    if dataset:  # experts on 2,000 random images (files may come sorted by class): the trajectory's
        # length, not its quality, sets MTT's cost
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:2000]
        X, y = X[keep], y[keep]
    experts = train_experts(X, y, n_experts=1, epochs=4, model_options=opts, batch_size=256, seed=0)
    torch.manual_seed(0)
    return TrajectoryMatching(d.X_train.to(device), d.y_train.to(device), ipc, experts, model_options=opts,
                              syn_steps=syn_steps, expert_epochs=2, max_start_epoch=2, low_memory=low_memory, seed=0)


def child(method, impl, what, iters, syn_steps, device, dataset=None, ipc=IPC):
    import torch

    cuda = device == "cuda"
    eng = _engine(method, syn_steps, device, low_memory=impl == "low_memory", dataset=dataset, ipc=ipc)
    reference = {"dc": dc_reference_step, "dm": dm_reference_step}.get(method)
    fns = {"fastdd": eng.step}
    if method == "dm" and what == "time" and dataset:  # what the compiled real pass adds: the step, eager
        fns["fastdd_eager"] = _engine(method, syn_steps, device, dataset=dataset, ipc=ipc, compile=False).step
    if reference is not None:
        fns["reference"] = lambda: reference(eng)
    if what == "time" and method in ("dc", "dm"):
        shared = {"dc": dc_shared_part, "dm": dm_shared_part}[method]
        fns["shared"] = lambda: shared(eng)
    if what == "memory":
        fn = fns["reference" if impl == "reference" else "fastdd"]  # "low_memory" is MTT's fastdd step
        if method == "dm":
            fn()  # a warm step first (both sides): the compile's own memory is not the step's
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            print(json.dumps({"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}))
            return
        base = rss_kb("VmRSS")
        reset_peak_rss()
        fn()
        print(json.dumps({"peak_mb": (rss_kb("VmHWM") - base) / 1024}))
        return
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            if cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    print(json.dumps(times))


def run_child(args, *child_args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.steady_malloc and child_args[2] == "time":
        env.update(STEADY_MALLOC)
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--device", args.device,
           "--child", *map(str, child_args)] + (["--dataset", args.dataset] if args.dataset else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6, help="timed iterations per implementation")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steady-malloc", action="store_true", help="time with freed memory kept in glibc's heap")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dataset", default=None, help="MNIST as a .npz: the papers' shapes (see above)")
    ap.add_argument("--only", default="dc1,dm10,dc10,mtt10", help="with --dataset: which of dc1, dm10, dc10, mtt10")
    ap.add_argument("--child", nargs=6, metavar=("METHOD", "IMPL", "WHAT", "ITERS", "SYN_STEPS", "IPC"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        method, impl, what, iters, syn_steps, ipc = args.child
        return child(method, impl, what, int(iters), int(syn_steps), args.device, args.dataset, int(ipc))
    if args.dataset:
        return main_mnist(args, torch)
    where = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{args.threads} CPU threads, {'steady' if args.steady_malloc else 'default'} malloc"
    lines = [f"# Distillation per iteration, digits ipc {IPC}, ConvNet width 64 depth 2 ({where}, "
             f"torch {torch.__version__})", "",
             "| method | implementation | s/iter (median) | s/iter (min) | peak MB | speed-up (median) |",
             "|---|---|---|---|---|---|"]
    bounds = []
    for method in ("dc", "dm"):
        times = run_child(args, method, "both", "time", args.iters, 0, IPC)
        med = {k: statistics.median(v) for k, v in times.items()}
        for impl in ("reference", "fastdd"):
            mem = run_child(args, method, impl, "memory", 1, 0, IPC)["peak_mb"]
            label = "per-class loop" if impl == "reference" else "fastdd"
            lines.append(f"| {method.upper()} | {label} | {med[impl]:.3f} | {min(times[impl]):.3f} | {mem:.0f} | "
                         f"{med['reference'] / med[impl]:.2f}x |")
        print("\n".join(lines[-2:]), flush=True)
        bounds.append(f"| {method.upper()} | {med['shared']:.3f} | {100 * med['shared'] / med['reference']:.0f}% | "
                      f"{med['reference'] / med['shared']:.2f}x |")
    lines += ["", "The part both implementations share, computed the same way (DC: the inner loops training the "
              "network on the synthetic set; DM: the real images through the frozen network), bounds any "
              "speed-up of the rest (Amdahl): reference / shared part.", "",
              "| method | shared part s/iter (median) | of the reference | bound on the speed-up |", "|---|---|---|---|",
              *bounds]
    print("\n".join(lines[-len(bounds) - 2:]), flush=True)
    lines += ["", "| MTT syn_steps | peak MB, unrolled | peak MB, low_memory=True |", "|---|---|---|"]
    for n in (5, 10, 20, 40):
        mem = run_child(args, "mtt", "fastdd", "memory", 1, n, IPC)["peak_mb"]
        low = run_child(args, "mtt", "low_memory", "memory", 1, n, IPC)["peak_mb"]
        lines.append(f"| {n} | {mem:.0f} | {low:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    write_report(args.out, lines)


def main_mnist(args, torch):
    """The papers' shapes on MNIST: DC ipc 1 and 10, DM ipc 10 against their per-class loops, MTT ipc 10."""
    where = f"{args.threads} CPU threads, {'steady' if args.steady_malloc else 'default'} malloc"
    lines = [f"# Distillation per iteration on MNIST 28x28, ConvNet width 128 depth 3 ({where}, torch "
             f"{torch.__version__})", "",
             "256 real images per class; DC's outer/inner loops by ipc as the paper (1: 1/1, 10: 10/50). Shared part: "
             "what both implementations compute the same way (DC: the real images' class gradients and the inner "
             "loops; DM: the real images through the frozen network); bound = reference / shared part.", "",
             "Shared part and bound are eager, as the reference runs; DM's real pass is compiled by default "
             "(`compile=\"auto\"`), which speeds that shared work itself: its eager step is shown beside.", "",
             "| method | ipc | per-class loop s/iter | fastdd s/iter | speed-up | fastdd eager s/iter | shared part s/iter "
             "| bound | peak MB loop | peak MB fastdd |", "|---|---|---|---|---|---|---|---|---|---|"]
    wanted = args.only.split(",")
    for method, ipc in (("dc", 1), ("dm", 10), ("dc", 10)):
        if f"{method}{ipc}" not in wanted:
            continue
        times = run_child(args, method, "both", "time", args.iters, 0, ipc)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {impl: run_child(args, method, impl, "memory", 1, 0, ipc)["peak_mb"] for impl in ("reference", "fastdd")}
        eager = f"{med['fastdd_eager']:.2f}" if "fastdd_eager" in med else "-"
        lines.append(f"| {method.upper()} | {ipc} | {med['reference']:.2f} | {med['fastdd']:.2f} | "
                     f"{med['reference'] / med['fastdd']:.2f}x | {eager} | {med['shared']:.2f} | "
                     f"{med['reference'] / med['shared']:.2f}x | {mem['reference']:.0f} | {mem['fastdd']:.0f} |")
        print(lines[-1], flush=True)
    if "mtt10" in wanted:
        times = run_child(args, "mtt", "fastdd", "time", args.iters, 30, 10)
        mem = run_child(args, "mtt", "fastdd", "memory", 1, 30, 10)["peak_mb"]
        low = run_child(args, "mtt", "low_memory", "memory", 1, 30, 10)["peak_mb"]
        lines += ["", "| MTT, ipc 10, 30 student steps | s/iter (median) | peak MB | peak MB, low_memory=True |",
                  "|---|---|---|---|", f"| fastdd | {statistics.median(times['fastdd']):.2f} | {mem:.0f} | {low:.0f} |"]
    print("\n".join(lines))
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
