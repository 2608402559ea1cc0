"""Per-sample gradients: fastdd against torch.func vmap and a per-sample Python loop.

Each group of methods (one workload and consumer) is timed in one fresh process,
round-robin, so that drifts of this shared machine hit every method alike; each
method's peak memory comes from a process of its own: VmHWM above the RSS after set-up (what the
allocator made resident) and the exact peak of bytes held by tensors the call allocated
(``_report.peak_tensor_bytes``: activations, gradients, temporaries, results). Page faults of large temporaries swing CPU
timings here by up to 1.5x from run to run, so the table gives the median and the
minimum; --steady-malloc keeps freed memory in glibc's heap while timing
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), which steadies one-shot calls but
penalizes PerSampleGrads in a loop (it holds a step's activations until the next
forward). The write roofline is the time to fill buffers of the bytes that
materialized per-sample gradients occupy, measured in the same run.

    python bench/bench_per_sample.py [--threads 2] [--repeat 5] [--out results/bench_per_sample.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _report import STEADY_MALLOC, peak_tensor_bytes, reset_peak_rss, rss_kb, write_report
from workloads import CLIP_METHODS, ENGINE, ce, clipped_step, dot_vectors, engine_workload, vmap_consumer, vmap_per_sample

WORKLOADS = ENGINE
# (workload, consumer, methods) measured; methods: fastdd (into the caller's buffers, out=,
# for grads), fastdd_alloc (a plain call, result dropped before the next), fastdd_held (a plain
# call while the previous result is still held, as in `g = per_sample_grads(...)` in a loop),
# fastdd_fresh (a plain call with the buffer pool off: fresh memory each call, FASTDD_REUSE_BUFFERS=0),
# vmap, loop, roofline, and the fixed
# norm strategies gram / materialize (every layer the same) for the sequence model.
# The "step" consumer is a user's training step (forward, backward, SGD step) alone
# (plain), with PerSampleGrads norms from that same backward (fastdd), and followed by
# a separate vmap pass for the norms (vmap). The "clip" consumer is a training step with each
# sample's gradient clipped to norm 1: unclipped (plain), ghost clipping in the user's step
# (fastdd: PerSampleGrads(param_grads=False), whose backward skips the weight gradients that
# clipping replaces; fastdd_param_grads: the same with the step's full backward),
# fastdd.grad.clipped_grad running the forward and an output-only backward itself
# (fastdd_functional), or vmap per-sample gradients clipped and summed (vmap). vmap is timed in a
# group of its own (beside fastdd): its 912 MB per step between two plain steps slowed them by
# up to 2x and flattered every ratio to the plain step.
PLAN = [
    ("mlp", "grads", ["fastdd", "fastdd_alloc", "fastdd_held", "fastdd_fresh", "vmap", "loop", "roofline"]),
    ("mlp", "norms", ["fastdd", "vmap", "loop"]),
    ("mlp", "dots", ["fastdd", "vmap"]),
    ("mlp", "step", ["plain", "fastdd", "vmap"]),
    ("mlp", "clip", [m for m in CLIP_METHODS if m != "vmap"]),
    ("mlp", "clip", ["fastdd", "vmap"]),
    ("convnet", "grads", ["fastdd", "fastdd_alloc", "fastdd_held", "fastdd_fresh", "vmap", "loop", "roofline"]),
    ("convnet", "norms", ["fastdd", "vmap"]),
    ("convnet", "step", ["plain", "fastdd", "vmap"]),
    ("convnet", "clip", [m for m in CLIP_METHODS if m != "vmap"]),
    ("convnet", "clip", ["fastdd", "vmap"]),
    ("linear_seq", "grads", ["fastdd", "fastdd_alloc", "fastdd_held", "fastdd_fresh", "vmap", "roofline"]),
    ("linear_seq", "norms", ["fastdd", "vmap"]),
    ("seq2", "norms", ["fastdd", "gram", "materialize", "vmap"]),
    ("seq2", "dots", ["fastdd", "vmap"]),
]


# --------------------------------------------------------------------------- child side
def _method(workload, consumer, method):
    """A zero-argument callable running one measurement, with its set-up done."""
    import torch

    import fastdd
    from fastdd.grad import per_sample_linear

    model, x, y, loss = engine_workload(workload)
    loss_fn = loss or ce
    params = dict(model.named_parameters())
    B = x.shape[0]
    vectors = dot_vectors(model)

    if method == "roofline":  # write the bytes of every per-sample gradient into buffers like fastdd's
        bufs = [torch.empty(B, *p.shape) for p in params.values()]
        for b in bufs:
            b.fill_(0.0)  # pages touched once, as a reused buffer's are
        return lambda: [b.fill_(1.0) for b in bufs]

    if consumer == "clip":  # a training step with per-sample clipping to norm 1 (DP-style / robust training)
        return clipped_step(model, x, y, loss_fn, method)

    if consumer == "step":  # one training step of the user's, plus per-sample norms
        step = clipped_step(model, x, y, loss_fn, "plain")  # (the unclipped step)
        if method == "plain":
            return step
        if method == "fastdd":
            ps = fastdd.PerSampleGrads(model, loss_reduction="mean").__enter__()

            def step_and_norms():
                step()
                return ps.norms()

            return step_and_norms
        detached = {n: p.detach() for n, p in params.items()}
        per_sample = vmap_per_sample(model, loss_fn)

        def step_then_vmap():
            step()
            return sum(g.flatten(1).square().sum(1) for g in per_sample(detached, x, y).values()).sqrt()

        return step_then_vmap

    if method == "fastdd_alloc":
        return lambda: fastdd.per_sample_grads(model, x, y, loss_fn=loss_fn)

    if method == "fastdd_held":
        held = [None]

        def plain_call_in_a_loop():  # the previous result stays alive during the call
            held[0] = fastdd.per_sample_grads(model, x, y, loss_fn=loss_fn)
            return held[0]

        return plain_call_in_a_loop

    if method == "fastdd_fresh":
        def without_pool():
            os.environ["FASTDD_REUSE_BUFFERS"] = "0"
            try:
                return fastdd.per_sample_grads(model, x, y, loss_fn=loss_fn)
            finally:
                del os.environ["FASTDD_REUSE_BUFFERS"]

        return without_pool

    if method in ("gram", "materialize"):  # one fixed norm strategy for every layer, during the call only
        fixed = (lambda T, d, p: T > 1) if method == "gram" else (lambda T, d, p: False)

        def fixed_strategy():
            saved, per_sample_linear.gram_is_cheaper = per_sample_linear.gram_is_cheaper, fixed
            try:
                return fastdd.per_sample_grad_norms(model, x, y, loss_fn=loss_fn)
            finally:
                per_sample_linear.gram_is_cheaper = saved

        return fixed_strategy

    if method == "fastdd":
        if consumer == "grads":
            out = {n: torch.empty(B, *p.shape) for n, p in params.items()}
            fastdd.per_sample_grads(model, x, y, loss_fn=loss_fn, out=out)  # touch the reused buffers
            return lambda: fastdd.per_sample_grads(model, x, y, loss_fn=loss_fn, out=out)
        if consumer == "norms":
            return lambda: fastdd.per_sample_grad_norms(model, x, y, loss_fn=loss_fn)
        return lambda: fastdd.per_sample_grad_dots(model, x, y, vectors, loss_fn=loss_fn)

    if method == "vmap":
        return vmap_consumer(model, x, y, loss_fn, consumer, vectors)

    if method == "loop":
        plist = list(params.values())

        def loop():
            rows = []
            for i in range(B):
                gs = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1])[0], plist)
                if consumer == "grads":
                    rows.append([g.clone() for g in gs])
                else:
                    rows.append(torch.sqrt(sum(g.square().sum() for g in gs)))
            return rows

        return loop
    raise ValueError(method)


def child(workload, consumer, methods, threads, repeat, what):
    """Time the comma-separated ``methods`` round-robin in this one process (a drift of
    the machine then hits every method alike), or read one method's peak memory."""
    import torch

    torch.set_num_threads(threads)
    names = methods.split(",")
    fns = {m: _method(workload, consumer, m) for m in names}
    for fn in fns.values():
        fn()  # warm-up (and first-touch of reused buffers)
    if what == "memory":
        (fn,) = fns.values()
        base = rss_kb("VmRSS")
        reset_peak_rss()
        res = fn()
        rss = (rss_kb("VmHWM") - base) / 1024
        del res
        try:  # the exact figure: bytes of tensors the call holds at once
            tensors = peak_tensor_bytes(fn)[0] / 2**20
        except Exception:  # a method a dispatch mode cannot run under
            tensors = float("nan")
        print(json.dumps({"peak_mb": rss, "tensor_mb": tensors}))
        return
    times = {m: [] for m in names}
    for _ in range(repeat):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            res = fn()
            times[m].append(time.perf_counter() - t0)
            del res
    numel = None
    if consumer == "grads":
        model, x, _, _ = engine_workload(workload)
        numel = x.shape[0] * sum(p.numel() for p in model.parameters())
    print(json.dumps({m: {"median_s": statistics.median(t), "min_s": min(t), "bytes": None if numel is None else 4 * numel}
                      for m, t in times.items()}))


# --------------------------------------------------------------------------- parent side
def _run_child(workload, consumer, method, threads, repeat, what, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, consumer, method, what,
           "--threads", str(threads), "--repeat", str(repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_group(workload, consumer, methods, threads, repeat, steady_malloc=False):
    """Timings of all methods from one interleaved child; peak memory from one child each."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    timing_env = dict(env, **STEADY_MALLOC) if steady_malloc else env
    timing = _run_child(workload, consumer, ",".join(methods), threads, repeat, "time", timing_env)
    results = {}
    for m in methods:
        if "error" in timing:
            results[m] = timing
            continue
        memory = _run_child(workload, consumer, m, threads, 1, "memory", env)
        results[m] = {**timing[m], "peak_mb": memory.get("peak_mb", float("nan")),
                      "tensor_mb": memory.get("tensor_mb", float("nan"))}
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeat", type=int, default=15, help="timed runs per measurement (default 15)")
    ap.add_argument("--only", default=None, help="comma-separated workloads to run")
    ap.add_argument("--consumers", default=None, help="comma-separated consumers to run (grads, norms, dots, step, clip)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--steady-malloc", action="store_true", help="time with freed memory kept in glibc's heap")
    ap.add_argument("--child", nargs=4, metavar=("WORKLOAD", "CONSUMER", "METHODS", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        workload, consumer, method, what = args.child
        child(workload, consumer, method, args.threads, args.repeat, what)
        return
    import platform

    import torch

    only = set(args.only.split(",")) if args.only else None
    consumers = set(args.consumers.split(",")) if args.consumers else None
    lines = [
        "# Per-sample gradients: fastdd vs torch.func vmap vs a Python loop",
        "",
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"median and min of {args.repeat} runs ({'steady' if args.steady_malloc else 'default'} malloc); "
        "peak RSS = extra resident memory during one call; peak tensors = bytes of tensors the call held at once.",
        "",
        "| workload | consumer | method | median (ms) | min (ms) | vs fastdd (median) | peak RSS (MB) | peak tensors (MB) | GB/s written |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for workload, consumer, methods in PLAN:
        if (only and workload not in only) or (consumers and consumer not in consumers):
            continue
        results = run_group(workload, consumer, methods, args.threads, args.repeat, args.steady_malloc)
        base = results.get("fastdd", {}).get("median_s")  # None when fastdd failed
        for m in methods:
            r = results[m]
            if "error" in r:
                row = f"| {WORKLOADS[workload]} | {consumer} | {m} | error: {r['error']} | | | | | |"
            else:
                ratio = f"{r['median_s'] / base:.2f}x" if base else ""
                gbs = f"{r['bytes'] / r['median_s'] / 1e9:.2f}" if r.get("bytes") and m in ("fastdd", "fastdd_alloc", "fastdd_held", "fastdd_fresh", "vmap", "roofline", "loop") and consumer == "grads" else ""
                row = (f"| {WORKLOADS[workload]} | {consumer} | {m} | {1e3 * r['median_s']:.1f} | "
                       f"{1e3 * r['min_s']:.1f} | {ratio} | {r['peak_mb']:.0f} | {r['tensor_mb']:.1f} | {gbs} |")
            lines.append(row)
            print(row, flush=True)
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
