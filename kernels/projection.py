"""Triton kernels for projected per-sample Linear gradients (DESIGN.md section 4).

A ``[B, T, d]`` inputs, G ``[B, T, p]`` output gradients. The projection matrices are
Rademacher signs generated in registers from a counter hash (``fastdd.grad.projection``:
``sign bit of fmix32(fmix32(row + key) ^ fmix32(col * GOLD + COL))``), never stored, and
the same as the torch path's. Both kernels accumulate in fp32.

- ``jl_linear_kernel`` (TRAK): ``out[b] = vec(G_b^T A_b) R / sqrt(dim)``; a program builds the
  per-sample gradient tile of BLOCK_B samples in registers (sum over t of outer products)
  and multiplies it by the matching tile of R with ``tl.dot``: the gradient never reaches memory.
- ``factorized_linear_kernel`` (LoGra): ``out[b] = vec((G_b P_G)^T (A_b [1]) P_A)[:dim] / sqrt(dim)``;
  a program projects a block of T rows of A and G through its tiles of P_A and P_G and adds
  their outer products over t.
"""
from __future__ import annotations

import math

import torch

from ._triton import INTERPRET, tl, triton


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finalizer (uint32 arithmetic wraps)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _signs(key, o_r, o_c):
    """fp32 Rademacher block ``[len(o_r), len(o_c)]`` of the sign matrix with ``key`` (uint32)."""
    r = _fmix32(o_r.to(tl.uint32) + key)
    c = _fmix32(o_c.to(tl.uint32) * 0x9E3779B9 + 0x632BE5AB)
    h = _fmix32(r[:, None] ^ c[None, :])
    return 1.0 - 2.0 * (h >> 31).to(tl.float32)


@triton.jit
def _side(key, o_r, o_c, IDENTITY: tl.constexpr):
    """A block of one side's projection: the identity, or its sign matrix."""
    if IDENTITY:
        return tl.where(o_r[:, None] == o_c[None, :], 1.0, 0.0)
    return _signs(key, o_r, o_c)


@triton.jit
def _projected_rows(ptr, i_b, o_t, m_t, n, s_b, s_t, s_c, key, o_k, IDENTITY: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Rows ``o_t`` of sample ``i_b`` of a ``[B, T, n]`` tensor times columns ``o_k`` of one side's
    projection ``[n, k]``: an fp32 ``[BLOCK_T, BLOCK_K]`` block."""
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, n, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        b_x = tl.load(ptr + i_b * s_b + o_t[:, None] * s_t + o_c[None, :] * s_c,
                      mask=m_t[:, None] & (o_c < n)[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(b_x, _side(key, o_c, o_k, IDENTITY), acc, input_precision=PRECISION)
    return acc


@triton.jit
def jl_linear_kernel(
    a_ptr,  # A [B, T, d], any strides
    g_ptr,  # G [B, T, p], any strides
    out_ptr,  # out [B, dim] fp32, contiguous
    key,  # the matrix's 32-bit key, passed as a signed int32
    row_w, row_b,  # first row of R for the weight (row_w + o * d + c) and the bias (row_b + o)
    B, T, d, p, dim, inv_sqrt_dim,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[b, j] = (sum_{o,c} (G_b^T A_b)[o, c] R[row_w + o d + c, j] + sum_o (sum_t G_b)[o] R[row_b + o, j]) / sqrt(dim)."""
    i_b, i_j = tl.program_id(0), tl.program_id(1)
    ukey = key.to(tl.uint32, bitcast=True)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_b = o_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for p0 in range(0, p, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < p
        for d0 in range(0, d, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < d
            # the per-sample gradient tile [BLOCK_B, BLOCK_P, BLOCK_D] in registers
            b_w = tl.zeros((BLOCK_B, BLOCK_P, BLOCK_D), dtype=tl.float32)
            for t in range(0, T):
                b_g = tl.load(g_ptr + o_b[:, None] * s_gb + t * s_gt + o_p[None, :] * s_gp,
                              mask=m_b[:, None] & m_p[None, :], other=0.0).to(tl.float32)
                b_a = tl.load(a_ptr + o_b[:, None] * s_ab + t * s_at + o_d[None, :] * s_ad,
                              mask=m_b[:, None] & m_d[None, :], other=0.0).to(tl.float32)
                b_w += b_g[:, :, None] * b_a[:, None, :]
            rows = tl.reshape(row_w + o_p[:, None] * d + o_d[None, :], (BLOCK_P * BLOCK_D,))
            b_r = _signs(ukey, rows, o_j)  # entries of masked (o, c) meet zeros of b_w
            acc = tl.dot(tl.reshape(b_w, (BLOCK_B, BLOCK_P * BLOCK_D)), b_r, acc, input_precision=PRECISION)
        if HAS_BIAS:
            b_s = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
            for t in range(0, T):
                b_s += tl.load(g_ptr + o_b[:, None] * s_gb + t * s_gt + o_p[None, :] * s_gp,
                               mask=m_b[:, None] & m_p[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(b_s, _signs(ukey, row_b + o_p, o_j), acc, input_precision=PRECISION)
    p_o = out_ptr + o_b[:, None] * dim + o_j[None, :]
    tl.store(p_o, acc * inv_sqrt_dim, mask=m_b[:, None] & (o_j < dim)[None, :])


@triton.jit
def factorized_linear_kernel(
    a_ptr,  # A [B, T, d], any strides
    g_ptr,  # G [B, T, p], any strides
    out_ptr,  # out [B, dim] fp32, contiguous
    key_a, key_g,  # 32-bit keys of P_A [d + HAS_BIAS, k_a] and P_G [p, k_g], as signed int32
    T, d, p, k_a, k_g, dim, scale,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
    HAS_BIAS: tl.constexpr, ID_A: tl.constexpr, ID_G: tl.constexpr,  # ID_*: that side is the identity
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_KG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[b, i k_a + j] = scale * sum_t (G_b P_G)[t, i] ((A_b [1]) P_A)[t, j], for i k_a + j < dim."""
    i_b, i_g, i_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ukey_a = key_a.to(tl.uint32, bitcast=True)
    ukey_g = key_g.to(tl.uint32, bitcast=True)
    o_ka = i_a * BLOCK_KA + tl.arange(0, BLOCK_KA)
    o_kg = i_g * BLOCK_KG + tl.arange(0, BLOCK_KG)
    acc = tl.zeros((BLOCK_KG, BLOCK_KA), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        b_ap = _projected_rows(a_ptr, i_b, o_t, m_t, d, s_ab, s_at, s_ad, ukey_a, o_ka, ID_A,
                               BLOCK_T, BLOCK_D, BLOCK_KA, PRECISION)
        if HAS_BIAS:  # the bias is input column d, a column of ones
            b_one = _side(ukey_a, d + tl.arange(0, 1), o_ka, ID_A)  # [1, BLOCK_KA]
            b_ap += tl.where(m_t[:, None], b_one, 0.0)
        b_gp = _projected_rows(g_ptr, i_b, o_t, m_t, p, s_gb, s_gt, s_gp, ukey_g, o_kg, ID_G,
                               BLOCK_T, BLOCK_D, BLOCK_KG, PRECISION)
        acc = tl.dot(tl.trans(b_gp), b_ap, acc, input_precision=PRECISION)
    cols = o_kg[:, None] * k_a + o_ka[None, :]
    m = (o_kg < k_g)[:, None] & (o_ka < k_a)[None, :] & (cols < dim)
    tl.store(out_ptr + i_b * dim + cols, acc * scale, mask=m)


def _signed32(key: int) -> int:
    """A 32-bit key as the int32 Triton passes (the kernel bitcasts it back to uint32)."""
    return key - (1 << 32) if key >= (1 << 31) else key


def _precision(A: torch.Tensor) -> str:
    # fp32 inputs: exact fp32 products (tf32 would differ from the reference by ~1e-3)
    return "ieee" if A.dtype == torch.float32 or INTERPRET else "tf32"


def jl_linear_fwd(A: torch.Tensor, G: torch.Tensor, key: int, row_w: int, row_b: int | None, dim: int) -> torch.Tensor:
    """Launch ``jl_linear_kernel``: A ``[B, T, d]``, G ``[B, T, p]`` -> fp32 ``[B, dim]``."""
    B, T, d = A.shape
    p = G.shape[2]
    out = torch.empty(B, dim, dtype=torch.float32, device=A.device)
    # 16 samples x a 16x16 gradient tile = a [16, 256] x [256, BLOCK_J] dot per step
    cfg = dict(BLOCK_B=16, BLOCK_P=16, BLOCK_D=16, BLOCK_J=16 if INTERPRET else 64)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(dim, cfg["BLOCK_J"]))
    jl_linear_kernel[grid](A, G, out, _signed32(key), row_w, row_b or 0, B, T, d, p, dim, 1.0 / math.sqrt(dim),
                           *A.stride(), *G.stride(), HAS_BIAS=row_b is not None, PRECISION=_precision(A), **cfg)
    return out


def factorized_linear_fwd(A: torch.Tensor, G: torch.Tensor, key_a: int, key_g: int, k_a: int, k_g: int, dim: int,
                          has_bias: bool, scale: float | None = None, id_a: bool = False,
                          id_g: bool = False) -> torch.Tensor:
    """Launch ``factorized_linear_kernel``: A ``[B, T, d]``, G ``[B, T, p]`` -> fp32 ``[B, dim]``."""
    B, T, d = A.shape
    p = G.shape[2]
    out = torch.empty(B, dim, dtype=torch.float32, device=A.device)
    block_k = 16 if INTERPRET else 64
    cfg = dict(BLOCK_T=16 if INTERPRET else 32, BLOCK_D=16 if INTERPRET else 64, BLOCK_KA=block_k, BLOCK_KG=block_k)
    grid = (B, triton.cdiv(k_g, block_k), triton.cdiv(k_a, block_k))
    factorized_linear_kernel[grid](A, G, out, _signed32(key_a), _signed32(key_g), T, d, p, k_a, k_g, dim,
                                   1.0 / math.sqrt(dim) if scale is None else scale, *A.stride(), *G.stride(),
                                   HAS_BIAS=has_bias, ID_A=id_a, ID_G=id_g, PRECISION=_precision(A), **cfg)
    return out
