"""Per-sample Linear kernels: torch path vs Triton vs CUDA, per consumer.

On a GPU every available backend runs; on a CPU the torch path runs (and Triton
only under TRITON_INTERPRET=1, which measures the interpreter, not the kernel).
Reports time, GFLOP/s, GB/s, peak memory, and the bandwidth of a plain copy of
the same bytes measured in the same run (the roofline).

    python bench/bench_kernels.py [--out FILE] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from _report import cuda_median_seconds, write_report

SHAPES_GPU = [(256, 1, 784, 512), (32, 128, 512, 512), (64, 256, 1024, 1024), (512, 16, 256, 256)]
SHAPES_CPU = [(256, 1, 784, 512), (32, 128, 512, 512)]
K = 8


def timeit(fn, device, repeat=20):
    if device == "cuda":
        return cuda_median_seconds(fn, repeat)
    fn()
    times = []
    for _ in range(max(3, repeat // 4)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()

    from fastdd.grad import per_sample_linear as psl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    backends = ["torch"]
    if device == "cuda":
        from fastdd import _ext

        backends.append("triton")
        if _ext.load() is not None:
            backends.append("cuda")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"# Per-sample Linear kernels on {name}, {args.dtype}", "",
             "| B, T, d, p | consumer | backend | ms | GFLOP/s | GB/s | peak MB | copy roofline GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for B, T, d, p in SHAPES_GPU if device == "cuda" else SHAPES_CPU:
        A = torch.randn(B, T, d, device=device, dtype=dtype)
        G = torch.randn(B, T, p, device=device, dtype=dtype)
        V = torch.randn(K, p, d, device=device, dtype=dtype)
        out = torch.empty(B, p, d, device=device, dtype=dtype)
        esize = A.element_size()
        src = torch.empty_like(out)
        roof = out.numel() * esize * 2 / timeit(lambda: out.copy_(src), device)  # read + write
        consumers = {
            "materialize": (lambda: psl.psg_linear(A, G, out=out), 2 * B * T * d * p,
                            (A.numel() + G.numel() + out.numel()) * esize),
            "sqnorm": (lambda: psl.psg_linear_sqnorm(A, G), 2 * B * T * d * p, (A.numel() + G.numel()) * esize),
            "dot": (lambda: psl.psg_linear_dot(A, G, V), 2 * B * T * d * p + 2 * B * K * d * p,
                    (A.numel() + G.numel() + V.numel()) * esize),
        }
        for consumer, (fn, flops, nbytes) in consumers.items():
            for backend in backends:
                os.environ["FASTDD_BACKEND"] = backend
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                try:
                    sec = timeit(fn, device)
                except Exception as exc:  # report, keep going
                    row = f"| {B}, {T}, {d}, {p} | {consumer} | {backend} | error: {type(exc).__name__}: {exc} | | | | |"
                else:
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
                    row = (f"| {B}, {T}, {d}, {p} | {consumer} | {backend} | {sec * 1e3:.3f} | {flops / sec / 1e9:.0f} | "
                           f"{nbytes / sec / 1e9:.0f} | {peak:.0f} | {roof / 1e9:.0f} |")
                lines.append(row)
                print(row, flush=True)
        os.environ.pop("FASTDD_BACKEND", None)
    lines += ["", "| P, K | CG update (xr + p) | backend | ms | GB/s | | | |"]
    print(lines[-1], flush=True)
    from fastdd.valuation.block_cg import cg_update_p, cg_update_xr

    for rows, cols in ([(1_000_000, 64), (100_000, 450)] if device == "cuda" else [(100_000, 64)]):
        x, r, p, ap = (torch.randn(rows, cols, device=device) for _ in range(4))
        alpha, beta = torch.rand(cols, device=device), torch.rand(cols, device=device)
        nbytes = 9 * 4 * rows * cols  # xr: read x, r, p, Ap, write x, r; p: read r, p, write p
        for backend in backends:
            os.environ["FASTDD_BACKEND"] = backend
            sec = timeit(lambda: (cg_update_xr(x, r, p, ap, alpha), cg_update_p(p, r, beta)), device)
            row = f"| {rows}, {cols} | fused | {backend} | {sec * 1e3:.3f} | {nbytes / sec / 1e9:.0f} | | | |"
            lines.append(row)
            print(row, flush=True)
        os.environ.pop("FASTDD_BACKEND", None)
    conv_kernels(lines, backends, device, dtype)
    projection_kernels(lines, device, dtype)
    distill_kernels(lines, backends, device)
    write_report(args.out, lines)


def projection_kernels(lines, device, dtype):
    """Projected per-sample Linear gradients: the fused kernels (Triton on a GPU) against
    materialize-then-project (per-sample gradients, then a cached dense R: TRAK's CPU path)."""
    from fastdd.grad import per_sample_linear as psl
    from fastdd.grad.projection import factor_dims, factorized_linear_ref, hash_matrix, stream_key

    lines += ["", "| B, T, d, p | projection (dim) | path | ms | GFLOP/s | | | |"]
    print(lines[-1], flush=True)
    key, key_g = stream_key(0, 1), stream_key(0, 2)
    shapes = [(256, 1, 784, 128, 4096), (64, 16, 512, 512, 2048)] if device == "cuda" else [(256, 1, 784, 128, 1024)]
    for B, T, d, p, dim in shapes:
        A = torch.randn(B, T, d, device=device, dtype=dtype)
        G = torch.randn(B, T, p, device=device, dtype=dtype)
        R = hash_matrix(key, p * d, dim, 0, torch.float32, device)
        k_g, k_a, id_g, id_a = factor_dims(dim, p, d)
        P_A, P_G = hash_matrix(key, d, k_a, 0, torch.float32, device), hash_matrix(key_g, p, k_g, 0, torch.float32, device)
        runs = {
            ("jl", "materialize then project"): (lambda: psl.psg_linear(A, G).reshape(B, -1).float() @ R,
                                                 2 * B * T * d * p + 2 * B * d * p * dim),
            ("factorized", "torch"): (lambda: factorized_linear_ref(A, G, P_A, P_G, dim, False),
                                      2 * B * T * (d * k_a + p * k_g) + 2 * B * T * k_a * k_g),
        }
        if device == "cuda":
            from fastdd.kernels.projection import factorized_linear_fwd, jl_linear_fwd

            runs[("jl", "fused Triton")] = (lambda: jl_linear_fwd(A, G, key, 0, None, dim),
                                            2 * B * T * d * p + 2 * B * d * p * dim)
            runs[("factorized", "Triton")] = (lambda: factorized_linear_fwd(A, G, key, key_g, k_a, k_g, dim, False),
                                              2 * B * T * (d * k_a + p * k_g) + 2 * B * T * k_a * k_g)
        for (kind, path), (fn, flops) in runs.items():
            try:
                sec = timeit(fn, device, repeat=10)
                row = f"| {B}, {T}, {d}, {p} | {kind} ({dim}) | {path} | {sec * 1e3:.3f} | {flops / sec / 1e9:.0f} | | | |"
            except Exception as exc:  # report, keep going
                row = f"| {B}, {T}, {d}, {p} | {kind} ({dim}) | {path} | error: {type(exc).__name__}: {exc} | | | | |"
            lines.append(row)
            print(row, flush=True)


def conv_kernels(lines, backends, device, dtype):
    """Per-sample Conv2d weight gradients (3x3, padding 1) and their squared norms: the torch
    path's batch-as-groups convolution backward against the Triton implicit GEMM and its
    fused norm (fp32 follows torch's cuDNN TF32 setting in both)."""
    from fastdd.grad.per_sample_conv import conv_weight_grads, conv_weight_sqnorms

    tf32 = torch.backends.cudnn.allow_tf32
    lines += ["", f"| B, C_in, C_out, HxW | per-sample conv weight grads (cuDNN TF32 {tf32}) | backend | ms | GFLOP/s | | | |"]
    print(lines[-1], flush=True)
    shapes = [(256, 3, 128, 32), (256, 128, 128, 16), (256, 128, 128, 8)] if device == "cuda" else [(64, 64, 64, 8)]
    for B, C, O, S in shapes:
        x = torch.randn(B, C, S, S, device=device, dtype=dtype)
        g = torch.randn(B, O, S, S, device=device, dtype=dtype)
        out = torch.empty(B, O, C, 3, 3, device=device, dtype=dtype)
        flops = 2 * B * O * C * 9 * S * S
        shape, geo = out.shape[1:], ((1, 1), (1, 1), (1, 1))
        consumers = {
            "materialize": lambda: conv_weight_grads(x, g, shape, *geo, 1, out=out),
            # the torch path's norms reduce materialized gradients; the Triton kernel never writes them
            "sqnorm": lambda: (conv_weight_sqnorms(x, g, shape, *geo, 1) if os.environ["FASTDD_BACKEND"] == "triton"
                               else conv_weight_grads(x, g, shape, *geo, 1, out=out).flatten(1).float().square().sum(1)),
        }
        for consumer, fn in consumers.items():
            for backend in ["torch"] + (["triton"] if "triton" in backends else []):
                os.environ["FASTDD_BACKEND"] = backend
                try:
                    sec = timeit(fn, device)
                    row = (f"| {B}, {C}, {O}, {S}x{S} | {consumer} | {backend} | {sec * 1e3:.3f} | "
                           f"{flops / sec / 1e9:.0f} | | | |")
                except Exception as exc:  # report, keep going
                    row = f"| {B}, {C}, {O}, {S}x{S} | {consumer} | {backend} | error: {type(exc).__name__}: {exc} | | | | |"
                lines.append(row)
                print(row, flush=True)
        if device == "cuda" and "triton" in backends:
            lines.append(f"| {B}, {C}, {O}, {S}x{S} | triton configs: " + conv_sweep(x, g, out, device) + " | | | | | | |")
            print(lines[-1], flush=True)
    os.environ.pop("FASTDD_BACKEND", None)


def conv_sweep(x, g, out, device) -> str:
    """ms of the Triton conv kernel per (BLOCK_O, BLOCK_K, BLOCK_P, num_warps, num_stages)."""
    from fastdd.kernels.conv_wgrad import psg_conv2d_wgrad_fwd

    flat = out.view(out.shape[0], out.shape[1], -1)
    res = []
    for bo, bk, bp, nw, ns in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
                               (64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 2), (32, 64, 32, 4, 3)]:
        if bk > 32 and flat.shape[2] <= 32:
            continue
        try:
            sec = timeit(lambda: psg_conv2d_wgrad_fwd(x, g, (3, 3), (1, 1), (1, 1), (1, 1), flat, BLOCK_O=bo, BLOCK_K=bk,
                                                      BLOCK_P=bp, num_warps=nw, num_stages=ns), device)
            res.append(f"{bo}/{bk}/{bp}/w{nw}/s{ns} {sec * 1e3:.3f}")
        except Exception as exc:  # report, keep going
            res.append(f"{bo}/{bk}/{bp}/w{nw}/s{ns} error {type(exc).__name__}")
    return "; ".join(res)


def distill_kernels(lines, backends, device):
    """DC's gradient distance (forward + backward) and DM's RBF MMD (forward + backward)
    per backend, against the per-class, per-layer loop of the reference code."""
    from fastdd.distill.grad_distance import SegmentLayout, classwise_grad_distance, classwise_grad_distance_ref, pack
    from fastdd.distill.mmd import class_mmd

    lines += ["", "| distillation op | shape | backend | ms (fwd + bwd) | | | | |"]
    print(lines[-1], flush=True)
    C = 10
    shapes = [(128, 3, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3), (10, 2048)]  # DC ConvNet at 32x32
    real = [torch.randn(C, *s, device=device) for s in shapes]
    syn = [torch.randn(C, *s, device=device, requires_grad=True) for s in shapes]
    layout = SegmentLayout.of_shapes(shapes, device)
    packed_real = pack(real)

    def fused():
        classwise_grad_distance(packed_real, pack(syn), layout, "ours").sum().backward()

    def loop():
        classwise_grad_distance_ref(real, syn, "ours").sum().backward()

    rows = [("grad distance, per-class loop", loop, ["torch"])] + [("grad distance, fused", fused, backends)]
    D = 2048 if device == "cuda" else 128
    n_real = 256 if device == "cuda" else 64
    f_real = torch.randn(C * n_real, D, device=device)
    f_syn = torch.randn(C * 10, D, device=device, requires_grad=True)
    counts_r, counts_s = torch.full((C,), n_real), torch.full((C,), 10)

    def mmd():
        class_mmd(f_real, counts_r, f_syn, counts_s, kernel="rbf", gamma=1.0 / D).sum().backward()

    rows.append((f"RBF MMD, {C} classes x {n_real} real x 10 syn", mmd, backends))
    for label, fn, which in rows:
        for backend in which:
            os.environ["FASTDD_BACKEND"] = backend
            try:
                sec = timeit(fn, device)
                row = f"| {label} | D={D} | {backend} | {sec * 1e3:.3f} | | | | |" if "MMD" in label else \
                    f"| {label} | DC ConvNet 32x32 | {backend} | {sec * 1e3:.3f} | | | | |"
            except Exception as exc:  # report, keep going
                row = f"| {label} | | {backend} | error: {type(exc).__name__}: {exc} | | | | |"
            lines.append(row)
            print(row, flush=True)
    os.environ.pop("FASTDD_BACKEND", None)


if __name__ == "__main__":
    main()
