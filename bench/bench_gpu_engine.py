"""Per-sample gradients on a GPU: fastdd per backend against torch.func vmap.

Times per_sample_grads and per_sample_grad_norms on the MLP and the DC ConvNet with
CUDA events (median of 20 after warm-up), and the peak memory of each call. Needs a
CUDA device.

    python bench/bench_gpu_engine.py [--out FILE] [--profile FILE]

``--profile`` also writes torch.profiler's kernel tables of one ConvNet per-sample
gradient call by vmap and by fastdd (the fastest backend), to see where each spends.
"""
from __future__ import annotations

import argparse
import os

import torch

from _report import cuda_median_seconds, write_report


def timed(fn, repeat=20):
    """(median ms, peak MiB above what was allocated before)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = cuda_median_seconds(fn, repeat) * 1e3
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="file for the ConvNet kernel tables")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_engine needs a CUDA device")
    import fastdd
    from fastdd import _ext
    from fastdd.models import MLP, ConvNet
    from torch.func import functional_call, grad, vmap
    import torch.nn.functional as F

    torch.manual_seed(0)
    workloads = {
        "MLP 784-512-256-10, B=1024": (MLP(784, 10), torch.randn(1024, 1, 28, 28)),
        "ConvNet w128 d3 32x32x3, B=256": (ConvNet(3, 10, 32, width=128), torch.randn(256, 3, 32, 32)),
    }
    backends = ["torch", "triton"] + (["cuda"] if _ext.load() is not None else [])
    lines = [f"# Per-sample gradients on {torch.cuda.get_device_name()} (torch {torch.__version__})", "",
             "| workload | consumer | method | ms (median) | peak MiB | vs vmap |", "|---|---|---|---|---|---|"]
    fastest = {}
    for name, (model, x) in workloads.items():
        model, x = model.cuda(), x.cuda()
        y = torch.randint(0, 10, (x.shape[0],), device="cuda")
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        vgrad = vmap(grad(loss_one), in_dims=(None, 0, 0))
        for consumer in ["grads", "norms"]:
            if consumer == "grads":
                ref = lambda: vgrad(params, x, y)  # noqa: E731
            else:
                ref = lambda: torch.stack([g.flatten(1).square().sum(1) for g in vgrad(params, x, y).values()]).sum(0).sqrt()  # noqa: E731
            t_ref, m_ref = timed(ref)
            lines.append(f"| {name} | {consumer} | vmap | {t_ref:.2f} | {m_ref:.0f} | 1.00x |")
            for b in backends:
                os.environ["FASTDD_BACKEND"] = b
                fn = (lambda: fastdd.per_sample_grads(model, x, y)) if consumer == "grads" else \
                    (lambda: fastdd.per_sample_grad_norms(model, x, y))
                t, m = timed(fn)
                lines.append(f"| {name} | {consumer} | fastdd ({b}) | {t:.2f} | {m:.0f} | {t_ref / t:.2f}x |")
                if consumer == "grads" and t < fastest.get(name, (float("inf"),))[0]:
                    fastest[name] = (t, b, model, x, y, ref)
            os.environ.pop("FASTDD_BACKEND", None)
    print("\n".join(lines))
    write_report(args.out, lines)
    if args.profile:
        conv = next(k for k in fastest if k.startswith("ConvNet"))
        _, b, model, x, y, ref = fastest[conv]
        os.environ["FASTDD_BACKEND"] = b
        tables = [f"# Kernel tables: {conv}, per-sample gradients", ""]
        calls = [("vmap", ref), (f"fastdd ({b})", lambda: fastdd.per_sample_grads(model, x, y))]
        for label, fn in calls:
            tables += [f"## {label}", "", "```", profile_table(fn), "```", ""]
        # does cuDNN's autotuner find a better algorithm for the batch-as-groups convolution?
        torch.backends.cudnn.benchmark = True
        for label, fn in calls:
            tables.append(f"- with cudnn.benchmark: {label} {timed(fn)[0]:.2f} ms")
        torch.backends.cudnn.benchmark = False
        os.environ.pop("FASTDD_BACKEND", None)
        write_report(args.profile, tables)


def profile_table(fn, rows=25) -> str:
    """torch.profiler's table of one warm call, kernels sorted by device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    try:
        return prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=70)
    except (AttributeError, KeyError):  # older torch names it after CUDA
        return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


if __name__ == "__main__":
    main()
