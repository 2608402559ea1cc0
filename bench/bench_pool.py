"""The ConvNet's 2x2 average pooling: fastdd's row-op pooling (``AvgPool2x2``) against ATen's
``avg_pool2d`` (``nn.AvgPool2d``), as an op (forward + backward, with the write roofline: the time to
fill a tensor of the input gradient's bytes) and inside a ConvNet training step (forward, backward,
SGD step), the two modules interleaved in one process, medians.

    python bench/bench_pool.py [--threads 2] [--repeat 15] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _report import write_report  # noqa: E402
from workloads import with_aten_pooling  # noqa: E402

OP_SHAPES = [(128, 32, 28, 28), (256, 128, 28, 28), (100, 128, 28, 28), (100, 128, 7, 7)]
STEPS = [(32, 128), (128, 256), (128, 100)]  # (ConvNet width, batch) at 28x28


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds of each callable, run round-robin after two warm-up rounds."""
    times = {k: [] for k in fns}
    for _ in range(2):
        for f in fns.values():
            f()
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fastdd.models import ConvNet
    from fastdd.models.pool import avg_pool_2x2, avg_pool_2x2_ref

    lines = [f"# 2x2 average pooling: AvgPool2x2 vs ATen's avg_pool2d ({args.threads} CPU threads, torch "
             f"{torch.__version__}, medians of {args.repeat} interleaved runs)", "",
             "| op: forward + backward | ATen (ms) | AvgPool2x2 (ms) | speed-up | roofline: write the input gradient (ms) |",
             "|---|---|---|---|---|"]
    for shape in OP_SHAPES:
        x = torch.randn(*shape, requires_grad=True)
        g = torch.randn(*shape[:2], shape[2] // 2, shape[3] // 2)
        buf = torch.empty(shape)
        buf.fill_(0.0)
        med = interleaved({"aten": lambda: torch.autograd.grad(avg_pool_2x2_ref(x), x, g),
                           "fastdd": lambda: torch.autograd.grad(avg_pool_2x2(x), x, g),
                           "roofline": lambda: buf.fill_(1.0)}, args.repeat)
        lines.append(f"| {list(shape)} | {1e3 * med['aten']:.2f} | {1e3 * med['fastdd']:.2f} | "
                     f"{med['aten'] / med['fastdd']:.2f}x | {1e3 * med['roofline']:.2f} |")
    lines += ["", "| ConvNet training step, 28x28 | nn.AvgPool2d (ms) | AvgPool2x2 (ms) | speed-up |", "|---|---|---|---|"]
    for width, B in STEPS:
        torch.manual_seed(0)
        fast = ConvNet(1, 10, 28, width=width)
        aten = with_aten_pooling(copy.deepcopy(fast))
        x, y = torch.randn(B, 1, 28, 28), torch.randint(0, 10, (B,))
        opts = {id(n): torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for n in (fast, aten)}

        def step(net):
            opt = opts[id(net)]
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

        med = interleaved({"aten": lambda: step(aten), "fastdd": lambda: step(fast)},
                          args.repeat if width < 64 else max(3, args.repeat // 3))
        lines.append(f"| width {width}, B = {B} | {1e3 * med['aten']:.1f} | {1e3 * med['fastdd']:.1f} | "
                     f"{med['aten'] / med['fastdd']:.2f}x |")
    print("\n".join(lines))
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
