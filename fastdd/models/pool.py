"""2x2 average pooling (stride 2) that is fast on a CPU.

The DC ConvNet pools after every block, and on a CPU ATen's ``avg_pool2d`` walks each 2x2 window
element by element. Measured here (bench/bench_pool.py, 2 threads): forward + backward 1.7-2.2x faster
on the engine's ConvNet maps (``[128, 32, 28, 28]``), 1.1-1.3x on an evaluation batch
(``[100, 128, 28, 28]``), no gain on the largest map (``[256, 128, 28, 28]``, where both are bound by
writing fresh pages); a whole ConvNet training step 1.06-1.24x. This module computes the same windows
with vectorized row ops:

- forward: add the even and odd rows (two contiguous row views), then the even and odd columns
  of that sum, and scale by 1/4;
- backward: each output gradient / 4 written to its window's two columns, then that row written
  twice (``cat`` of a row pair), padded with zeros where an odd size left a last row or column out.

It is exactly ``avg_pool2d(x, 2, 2)`` (up to the order of the four additions) and twice
differentiable (DC's gradient matching and MTT's unrolled steps differentiate through the
backward), and ``torch.func`` transforms (vmap, grad, jvp) run it too. Elsewhere (CUDA, channels-last
or other layouts, under ``torch.compile``, where ATen or the compiler already does well) the module runs
ATen's kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def avg_pool_2x2_ref(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H // 2, W // 2]``: ATen's 2x2 average pooling with stride 2 (the reference)."""
    return F.avg_pool2d(x, 2, 2)


def _pool_rows(x: torch.Tensor) -> torch.Tensor:
    ho, wo = x.shape[-2] // 2, x.shape[-1] // 2
    rows = x[..., 0:2 * ho:2, :2 * wo] + x[..., 1:2 * ho:2, :2 * wo]  # [B, C, ho, 2 wo]: contiguous rows
    out = rows[..., 0::2] + rows[..., 1::2]
    return out.mul_(0.25)


def _unpool_rows(g: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The gradient ``[B, C, h, w]`` of 2x2 average pooling for output gradient ``g [B, C, h // 2, w // 2]``."""
    B, C, ho, wo = g.shape
    row = torch.mul(g.unsqueeze(-1).expand(B, C, ho, wo, 2), 0.25).reshape(B, C, ho, 1, 2 * wo)
    gx = torch.cat([row, row], 3).reshape(B, C, 2 * ho, 2 * wo)
    if (h, w) != (2 * ho, 2 * wo):  # the last row / column an odd size leaves out of every window
        gx = F.pad(gx, (0, w - 2 * wo, 0, h - 2 * ho))
    return gx


class _AvgPool2x2(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func.vmap (per-sample gradients) runs the same row ops, batched

    @staticmethod
    def forward(x):
        return _pool_rows(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.hw = inputs[0].shape[-2:]

    @staticmethod
    def backward(ctx, g):
        return _unpool_rows(g, *ctx.hw)  # torch ops: differentiable again (double backward)

    @staticmethod
    def jvp(ctx, x_t):
        return _pool_rows(x_t)  # pooling is linear


def _fast_path(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype.is_floating_point and min(x.shape[-2:]) >= 2
            and not torch.compiler.is_compiling() and x.is_contiguous())


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling with stride 2 of ``x [B, C, H, W]`` -> ``[B, C, H // 2, W // 2]``, the
    CPU's fast row-op path where it applies (contiguous 4-d float tensors), else ATen's."""
    return _AvgPool2x2.apply(x) if _fast_path(x) else avg_pool_2x2_ref(x)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` computed by :func:`avg_pool_2x2`: the same module to its users (type,
    repr, state dict), faster on a CPU."""

    def __init__(self):
        super().__init__(2, 2)

    def _get_name(self):
        return "AvgPool2d"  # the same computation: a model's repr (and the digest of a user's architecture) is kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_2x2(x)
