"""Triton kernels for per-sample Linear gradients ``G_i^T A_i`` and their consumers.

Notation (DESIGN.md section 4): A ``[B, T, d]`` input activations, G ``[B, T, p]``
output gradients, V ``[K, p, d]`` fixed vectors. All kernels accumulate in fp32.
Each program owns one ``[BLOCK_P, BLOCK_D]`` tile of one sample's gradient and builds
it with ``tl.dot`` over blocks of T; the norm and dot kernels reduce that tile in
registers, so no per-sample gradient reaches memory.
"""
from __future__ import annotations

import torch

from ._triton import INTERPRET, tl, triton


@triton.jit
def _grad_tile(
    a_ptr, g_ptr, i_b, i_p, i_d, T, d, p,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The fp32 tile ``(G_b^T A_b)[i_p tile, i_d tile]``."""
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_p = o_p < p
    m_d = o_d < d
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        # G_b^T block [BLOCK_P, BLOCK_T], loaded transposed through its strides
        p_g = g_ptr + i_b * s_gb + o_t[None, :] * s_gt + o_p[:, None] * s_gp
        b_g = tl.load(p_g, mask=m_p[:, None] & m_t[None, :], other=0.0)
        # A_b block [BLOCK_T, BLOCK_D]
        p_a = a_ptr + i_b * s_ab + o_t[:, None] * s_at + o_d[None, :] * s_ad
        b_a = tl.load(p_a, mask=m_t[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b_g = b_g.to(tl.float32)
            b_a = b_a.to(tl.float32)
        acc = tl.dot(b_g, b_a, acc, input_precision=PRECISION)
    return acc


@triton.jit
def psg_linear_kernel(
    a_ptr,  # A [B, T, d], any strides
    g_ptr,  # G [B, T, p], any strides
    out_ptr,  # out [B, p, d], any strides; receives G_b^T A_b cast to its dtype
    T, d, p,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp, s_ob, s_op, s_od,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b] = G_b^T A_b."""
    i_b, i_p, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc = _grad_tile(a_ptr, g_ptr, i_b, i_p, i_d, T, d, p, s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
                     BLOCK_T, BLOCK_P, BLOCK_D, UPCAST, PRECISION)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    p_o = out_ptr + i_b * s_ob + o_p[:, None] * s_op + o_d[None, :] * s_od
    tl.store(p_o, acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=(o_p < p)[:, None] & (o_d < d)[None, :])


@triton.jit
def psg_linear_sqnorm_kernel(
    a_ptr,  # A [B, T, d]
    g_ptr,  # G [B, T, p]
    part_ptr,  # part [B, n_tiles] fp32, contiguous: this tile's share of ||G_b^T A_b||^2
    T, d, p,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[b, tile] = sum over the tile of (G_b^T A_b)^2."""
    i_b, i_p, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc = _grad_tile(a_ptr, g_ptr, i_b, i_p, i_d, T, d, p, s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
                     BLOCK_T, BLOCK_P, BLOCK_D, UPCAST, PRECISION)
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    tl.store(part_ptr + i_b * n_tiles + i_p * tl.num_programs(2) + i_d, tl.sum(acc * acc))


@triton.jit
def _gram_tile(x_ptr, o_t, o_s, T, n, s_t, s_n,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The fp32 tile ``(X X^T)[o_t, o_s]`` of one sample's X ``[T, n]`` (strides s_t, s_n)."""
    m_t = o_t < T
    m_s = o_s < T
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < n
        b_xt = tl.load(x_ptr + o_t[:, None] * s_t + o_k[None, :] * s_n, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_xs = tl.load(x_ptr + o_k[:, None] * s_n + o_s[None, :] * s_t, mask=m_k[:, None] & m_s[None, :], other=0.0)
        if UPCAST:
            b_xt = b_xt.to(tl.float32)
            b_xs = b_xs.to(tl.float32)
        acc = tl.dot(b_xt, b_xs, acc, input_precision=PRECISION)
    return acc


@triton.jit
def psg_linear_gram_sqnorm_kernel(
    a_ptr,  # A [B, T, d]
    g_ptr,  # G [B, T, p]
    part_ptr,  # part [B, n_tiles] fp32, contiguous: this (t, s) tile's share of <A A^T, G G^T>
    T, d, p,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[b, (t, s) tile] = sum_{t, s in tile} (a_t . a_s)(g_t . g_s): the Gram form, no T x T matrix stored."""
    i_b, i_t, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_s = i_s * BLOCK_T + tl.arange(0, BLOCK_T)
    b_aa = _gram_tile(a_ptr + i_b * s_ab, o_t, o_s, T, d, s_at, s_ad, BLOCK_T, BLOCK_K, UPCAST, PRECISION)
    b_gg = _gram_tile(g_ptr + i_b * s_gb, o_t, o_s, T, p, s_gt, s_gp, BLOCK_T, BLOCK_K, UPCAST, PRECISION)
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    tl.store(part_ptr + i_b * n_tiles + i_t * tl.num_programs(2) + i_s, tl.sum(b_aa * b_gg))


@triton.jit
def psg_linear_dot_kernel(
    a_ptr,  # A [B, T, d]
    g_ptr,  # G [B, T, p]
    v_ptr,  # V [K, p, d], any strides
    part_ptr,  # part [B, n_tiles, K] fp32, contiguous: this tile's share of <G_b^T A_b, V_k>
    T, d, p, K,
    s_ab, s_at, s_ad, s_gb, s_gt, s_gp, s_vk, s_vp, s_vd,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[b, tile, k] = sum over the tile of (G_b^T A_b) * V_k; the tile is built once for all K."""
    i_b, i_p, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    acc = _grad_tile(a_ptr, g_ptr, i_b, i_p, i_d, T, d, p, s_ab, s_at, s_ad, s_gb, s_gt, s_gp,
                     BLOCK_T, BLOCK_P, BLOCK_D, UPCAST, PRECISION)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_v = (o_p < p)[:, None] & (o_d < d)[None, :]
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    i_tile = i_p * tl.num_programs(2) + i_d
    for k in range(0, K):
        b_v = tl.load(v_ptr + k * s_vk + o_p[:, None] * s_vp + o_d[None, :] * s_vd, mask=m_v, other=0.0)
        tl.store(part_ptr + (i_b * n_tiles + i_tile) * K + k, tl.sum(acc * b_v.to(tl.float32)))


def _config(A: torch.Tensor) -> dict:
    # Small blocks under the interpreter keep CPU tests quick; 64x64 tiles on a GPU.
    upcast = INTERPRET or A.dtype == torch.float32
    block = 16 if INTERPRET else 64
    return dict(
        BLOCK_T=16 if INTERPRET else 32,
        BLOCK_P=block,
        BLOCK_D=block,
        UPCAST=upcast,
        # fp32 inputs: exact fp32 products (tf32 would differ from the reference by ~1e-3)
        PRECISION="ieee" if A.dtype == torch.float32 or INTERPRET else "tf32",
    )


def _grid(B: int, d: int, p: int, cfg: dict):
    # samples on axis 0: the only axis without a 65,535 limit on CUDA
    return (B, triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(d, cfg["BLOCK_D"]))


def psg_linear_fwd(A: torch.Tensor, G: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch ``psg_linear_kernel``: A ``[B, T, d]``, G ``[B, T, p]`` -> out ``[B, p, d]``."""
    B, T, d = A.shape
    p = G.shape[2]
    cfg = _config(A)
    # The interpreter truncates fp32 -> bf16/fp16 casts instead of rounding to nearest:
    # there, store fp32 and let torch round once.
    target = out if not INTERPRET or out.dtype == torch.float32 else torch.empty_like(out, dtype=torch.float32)
    psg_linear_kernel[_grid(B, d, p, cfg)](
        A, G, target, T, d, p, *A.stride(), *G.stride(), *target.stride(), **cfg
    )
    if target is not out:
        out.copy_(target)
    return out


def psg_linear_sqnorm_fwd(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Launch the cheaper of the tile and Gram norm kernels; returns fp32 ``[B]``."""
    from fastdd.grad.per_sample_linear import gram_is_cheaper

    B, T, d = A.shape
    p = G.shape[2]
    cfg = _config(A)
    if gram_is_cheaper(T, d, p):
        block_t = cfg["BLOCK_T"] if INTERPRET else 64
        n_t = triton.cdiv(T, block_t)
        part = torch.empty(B, n_t * n_t, dtype=torch.float32, device=A.device)
        psg_linear_gram_sqnorm_kernel[(B, n_t, n_t)](
            A, G, part, T, d, p, *A.stride(), *G.stride(),
            BLOCK_T=block_t, BLOCK_K=cfg["BLOCK_T"], UPCAST=cfg["UPCAST"], PRECISION=cfg["PRECISION"],
        )
        return part.sum(1)
    grid = _grid(B, d, p, cfg)
    part = torch.empty(B, grid[1] * grid[2], dtype=torch.float32, device=A.device)
    psg_linear_sqnorm_kernel[grid](A, G, part, T, d, p, *A.stride(), *G.stride(), **cfg)
    return part.sum(1)


def psg_linear_dot_fwd(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Launch ``psg_linear_dot_kernel``; returns fp32 ``[B, K]``."""
    B, T, d = A.shape
    p = G.shape[2]
    K = V.shape[0]
    cfg = _config(A)
    grid = _grid(B, d, p, cfg)
    part = torch.empty(B, grid[1] * grid[2], K, dtype=torch.float32, device=A.device)
    psg_linear_dot_kernel[grid](
        A, G, V, part, T, d, p, K, *A.stride(), *G.stride(), *V.stride(), **cfg
    )
    return part.sum(1)
