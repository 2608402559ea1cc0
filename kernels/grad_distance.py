"""Triton kernels for the fused class-wise gradient distance (DC's matching loss).

Gradients of every matched layer and every class are packed into ``[C, P]`` (one row per
class); each layer splits into *segments* (DC's "ours": one per output channel) that tile
``P``: segment ``r`` spans ``[offsets[r], offsets[r] + lengths[r])``. One launch covers all
(segment, class) pairs:

- ``row_stats``: per pair, ``[a.b, a.a, b.b, |a - b|^2]`` in fp32, from which every metric
  ("ours", "cos", "mse") is a few flops on ``[C, R, 4]``;
- ``row_axpby``: the backward, ``out = c1[c, r] a + c2[c, r] b`` over each segment.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton


@triton.jit
def _segment(off_ptr, len_ptr, P, R):
    """This program's (segment, class): the segment's length, its start in the flat [C, P]
    arrays, and the class's row of per-segment values."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    n = tl.load(len_ptr + r)
    base = c.to(tl.int64) * P + tl.load(off_ptr + r)
    return n, base, c.to(tl.int64) * R + r


@triton.jit
def row_stats_kernel(
    a_ptr, b_ptr,  # [C, P] contiguous: real-side and synthetic-side gradients
    out_ptr,  # [C, R, 4] fp32
    off_ptr, len_ptr,  # [R] int64 segment starts and lengths
    P, R,
    BLOCK: tl.constexpr,
):
    n, base, cr = _segment(off_ptr, len_ptr, P, R)
    acc_ab = tl.zeros([BLOCK], dtype=tl.float32)
    acc_aa = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n, BLOCK):
        o = k + tl.arange(0, BLOCK)
        m = o < n
        b_a = tl.load(a_ptr + base + o, mask=m, other=0.0).to(tl.float32)
        b_b = tl.load(b_ptr + base + o, mask=m, other=0.0).to(tl.float32)
        b_d = b_a - b_b
        acc_ab += b_a * b_b
        acc_aa += b_a * b_a
        acc_bb += b_b * b_b
        acc_dd += b_d * b_d
    out = out_ptr + cr * 4
    tl.store(out, tl.sum(acc_ab, axis=0))
    tl.store(out + 1, tl.sum(acc_aa, axis=0))
    tl.store(out + 2, tl.sum(acc_bb, axis=0))
    tl.store(out + 3, tl.sum(acc_dd, axis=0))


@triton.jit
def row_axpby_kernel(
    a_ptr, b_ptr,  # [C, P] contiguous
    c1_ptr, c2_ptr,  # [C, R] fp32 per-segment coefficients
    out_ptr,  # [C, P]
    off_ptr, len_ptr,  # [R] int64
    P, R,
    BLOCK: tl.constexpr,
):
    n, base, cr = _segment(off_ptr, len_ptr, P, R)
    k1 = tl.load(c1_ptr + cr)
    k2 = tl.load(c2_ptr + cr)
    for k in range(0, n, BLOCK):
        o = k + tl.arange(0, BLOCK)
        m = o < n
        b_a = tl.load(a_ptr + base + o, mask=m, other=0.0).to(tl.float32)
        b_b = tl.load(b_ptr + base + o, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + o, (k1 * b_a + k2 * b_b).to(out_ptr.dtype.element_ty), mask=m)


def _block(max_len: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(int(max_len), 1))))


def row_stats_fwd(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                  max_len: int) -> torch.Tensor:
    """``[C, R, 4]`` fp32 segment statistics of contiguous ``[C, P]`` inputs."""
    C, P = a.shape
    R = offsets.numel()
    out = torch.empty(C, R, 4, dtype=torch.float32, device=a.device)
    row_stats_kernel[(R, C)](a, b, out, offsets, lengths, P, R, BLOCK=_block(max_len))
    return out


def row_axpby_fwd(a, b, c1, c2, offsets, lengths, max_len: int, tiles: bool) -> torch.Tensor:
    """``out[c, seg r] = c1[c, r] a + c2[c, r] b``; zero outside the segments unless they
    ``tiles`` ``P`` (then every element is written and no zero-fill is needed)."""
    C, P = a.shape
    R = offsets.numel()
    out = torch.empty_like(a) if tiles else torch.zeros_like(a)
    row_axpby_kernel[(R, C)](a, b, c1, c2, out, offsets, lengths, P, R, BLOCK=_block(max_len))
    return out
