"""Triton kernels for batched, class-wise MMD over embeddings.

Rows of an embedding matrix ``[N, D]`` are grouped by class into contiguous segments:
class ``c`` owns rows ``[seg[c], seg[c + 1])``. One launch serves every class.

- ``segment_mean``: per-class mean embeddings ``[C, D]`` (linear-kernel MMD, what DM
  uses) and its backward (each row receives its class's gradient over the class size);
- ``rbf_row_sums``: ``r_i = sum_j exp(-gamma ||q_i - k_j||^2)`` over the keys of q_i's own
  class, tile by tile, so the ``N x M`` kernel matrix never exists;
- ``rbf_grad_q``: the gradient of ``sum_ij w_i v_j exp(-gamma ||q_i - k_j||^2)`` with
  respect to ``q``: ``-2 gamma (q_i sum_j W_ij - sum_j W_ij k_j)``, again without the matrix
  (the distance tile is recomputed for each block of output columns).

Distances use ``|q|^2 + |k|^2 - 2 q.k`` with the dot products in full fp32 (no TF32).
"""
from __future__ import annotations

import torch

from ._triton import tl, triton


@triton.jit
def _class_columns(seg_ptr, D, BLOCK_D: tl.constexpr):
    """This program's class c, its column block (offsets and mask), its rows [lo, hi) and
    their count (at least 1, so an empty class divides safely)."""
    c = tl.program_id(0)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lo = tl.load(seg_ptr + c)
    hi = tl.load(seg_ptr + c + 1)
    return c, o_d, o_d < D, lo, hi, tl.maximum(hi - lo, 1).to(tl.float32)


@triton.jit
def segment_mean_kernel(x_ptr, seg_ptr, out_ptr, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[c, d-block] = mean of x over the rows of class c."""
    c, o_d, m_d, lo, hi, count = _class_columns(seg_ptr, D, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m = (o_n < hi)[:, None] & m_d[None, :]
        tile = tl.load(x_ptr + o_n[:, None].to(tl.int64) * D + o_d[None, :], mask=m, other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    tl.store(out_ptr + c * D + o_d, acc / count, mask=m_d)


@triton.jit
def segment_mean_bwd_kernel(g_ptr, seg_ptr, out_ptr, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[rows of c, d-block] = g[c, d-block] / |c|."""
    c, o_d, m_d, lo, hi, count = _class_columns(seg_ptr, D, BLOCK_D)
    g = tl.load(g_ptr + c * D + o_d, mask=m_d, other=0.0) / count
    for n0 in range(lo, hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m = (o_n < hi)[:, None] & m_d[None, :]
        tile = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32) + g[None, :]
        tl.store(out_ptr + o_n[:, None].to(tl.int64) * D + o_d[None, :], tile.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sq_dist_tile(q_ptr, k_ptr, o_q, o_k, m_q, m_k, D, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """[BLOCK_Q, BLOCK_K] squared distances between rows o_q of q and rows o_k of k."""
    dot = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
    qq = tl.zeros([BLOCK_Q], dtype=tl.float32)
    kk = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_q = tl.load(q_ptr + o_q[:, None].to(tl.int64) * D + o_d[None, :], mask=m_q[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32)
        b_k = tl.load(k_ptr + o_k[:, None].to(tl.int64) * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32)
        dot += tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        qq += tl.sum(b_q * b_q, axis=1)
        kk += tl.sum(b_k * b_k, axis=1)
    return tl.maximum(qq[:, None] + kk[None, :] - 2.0 * dot, 0.0)


@triton.jit
def _class_block(qseg_ptr, kseg_ptr, BLOCK_Q: tl.constexpr):
    """This program's block of query rows of its class (axis 0) and that class's key range."""
    c = tl.program_id(0)
    q_hi = tl.load(qseg_ptr + c + 1)
    first = tl.load(qseg_ptr + c) + tl.program_id(1) * BLOCK_Q
    o_q = first + tl.arange(0, BLOCK_Q)
    # the grid covers the largest class: blocks past this class's end do nothing
    return o_q, o_q < q_hi, first < q_hi, tl.load(kseg_ptr + c), tl.load(kseg_ptr + c + 1)


@triton.jit
def rbf_row_sums_kernel(
    q_ptr, k_ptr,  # [Nq, D], [Nk, D] contiguous
    qseg_ptr, kseg_ptr,  # [C + 1] int64 class segments of q and k
    out_ptr,  # [Nq] fp32
    D, gamma,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    o_q, m_q, active, k_lo, k_hi = _class_block(qseg_ptr, kseg_ptr, BLOCK_Q)
    if active:
        acc = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < k_hi
            dist = _sq_dist_tile(q_ptr, k_ptr, o_q, o_k, m_q, m_k, D, BLOCK_D, BLOCK_Q, BLOCK_K)
            w = tl.where(m_k[None, :], tl.exp(-gamma * dist), 0.0)
            acc += tl.sum(w, axis=1)
        tl.store(out_ptr + o_q, acc, mask=m_q)


@triton.jit
def rbf_grad_q_kernel(
    q_ptr, k_ptr,  # [Nq, D], [Nk, D] contiguous
    wq_ptr, wk_ptr,  # [Nq], [Nk] fp32 weights (the upstream gradient sits on one side)
    qseg_ptr, kseg_ptr,  # [C + 1] int64
    out_ptr,  # [Nq, D] fp32
    D, gamma,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    o_q, m_q, active, k_lo, k_hi = _class_block(qseg_ptr, kseg_ptr, BLOCK_Q)
    o_e = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's output columns
    m_e = o_e < D
    if active:
        w_q = tl.load(wq_ptr + o_q, mask=m_q, other=0.0)
        row = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < k_hi
            dist = _sq_dist_tile(q_ptr, k_ptr, o_q, o_k, m_q, m_k, D, BLOCK_D, BLOCK_Q, BLOCK_K)
            w_k = tl.load(wk_ptr + o_k, mask=m_k, other=0.0)
            w = tl.exp(-gamma * dist) * w_q[:, None] * w_k[None, :]
            row += tl.sum(w, axis=1)
            b_k = tl.load(k_ptr + o_k[:, None].to(tl.int64) * D + o_e[None, :], mask=m_k[:, None] & m_e[None, :],
                          other=0.0).to(tl.float32)
            acc += tl.dot(w, b_k, input_precision="ieee")
        b_q = tl.load(q_ptr + o_q[:, None].to(tl.int64) * D + o_e[None, :], mask=m_q[:, None] & m_e[None, :],
                      other=0.0).to(tl.float32)
        grad = -2.0 * gamma * (b_q * row[:, None] - acc)
        tl.store(out_ptr + o_q[:, None].to(tl.int64) * D + o_e[None, :], grad, mask=m_q[:, None] & m_e[None, :])


def _block_d(D: int) -> int:
    return max(16, min(64, triton.next_power_of_2(D)))


def segment_mean_fwd(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    C, D = seg.numel() - 1, x.shape[1]
    out = torch.empty(C, D, dtype=torch.float32, device=x.device)
    block_d = max(16, min(128, triton.next_power_of_2(D)))
    segment_mean_kernel[(C, triton.cdiv(D, block_d))](x, seg, out, D, BLOCK_N=32, BLOCK_D=block_d)
    return out


def segment_mean_bwd(g: torch.Tensor, seg: torch.Tensor, n_rows: int, dtype) -> torch.Tensor:
    C, D = g.shape
    out = torch.empty(n_rows, D, dtype=dtype, device=g.device)
    block_d = max(16, min(128, triton.next_power_of_2(D)))
    segment_mean_bwd_kernel[(C, triton.cdiv(D, block_d))](g, seg, out, D, BLOCK_N=32, BLOCK_D=block_d)
    return out


def rbf_row_sums_fwd(q, k, qseg, kseg, gamma: float, max_q: int) -> torch.Tensor:
    C, D = qseg.numel() - 1, q.shape[1]
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    grid = (C, max(1, triton.cdiv(max_q, 32)))
    rbf_row_sums_kernel[grid](q, k, qseg, kseg, out, D, float(gamma), BLOCK_Q=32, BLOCK_K=32, BLOCK_D=_block_d(D))
    return out


def rbf_grad_q_fwd(q, k, wq, wk, qseg, kseg, gamma: float, max_q: int) -> torch.Tensor:
    C, D = qseg.numel() - 1, q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    block_d = _block_d(D)
    grid = (C, max(1, triton.cdiv(max_q, 32)), triton.cdiv(D, block_d))
    rbf_grad_q_kernel[grid](q, k, wq, wk, qseg, kseg, out, D, float(gamma), BLOCK_Q=32, BLOCK_K=32, BLOCK_D=block_d)
    return out
