"""Triton kernels for per-sample Conv2d weight gradients by implicit GEMM, and their norms.

For input x ``[B, C, H, W]`` and output gradient g ``[B, O, Ho, Wo]`` of a convolution
with one group, sample b's weight gradient is ``G_b @ X_b``: G_b ``[O, P]`` its output
gradient over the P = Ho * Wo positions and X_b ``[P, K]`` its patches (im2col, K =
C * kh * kw). Each program owns one ``[BLOCK_O, BLOCK_K]`` tile of one sample's gradient
and gathers the patch blocks straight from x by index arithmetic, so the ``[B, K, P]``
patches never reach memory (unfold + bmm writes them: 1.2 GB for a 128-channel 32x32
layer at B = 256, and ran slower than the grouped convolution it was meant to replace).
cuDNN's batch-as-groups convolution backward, the torch path, launches one small
kernel per sample; this is one launch for the batch. The norm kernel reduces each tile
to its sum of squares in registers, so per-sample norms never write a gradient.
"""
from __future__ import annotations

import torch

from ._triton import INTERPRET, tl, triton


@triton.jit
def _wgrad_tile(
    x_ptr, g_ptr, i_b, i_o, i_k,
    C, H, W, O, Wo, P, K,
    s_xb, s_xc, s_xh, s_xw, s_gb, s_go, s_gh, s_gw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The fp32 tile ``(G_b @ X_b)[i_o tile, i_k tile]``."""
    o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_o = o_o < O
    m_k = o_k < K
    # patch entry k is input channel c at kernel offset (ki, kj)
    c = o_k // (KH * KW)
    ki = (o_k // KW) % KH
    kj = o_k % KW
    x_b = x_ptr + i_b * s_xb
    g_b = g_ptr + i_b * s_gb
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < P
        oh = o_p // Wo
        ow = o_p % Wo
        # G_b block [BLOCK_O, BLOCK_P]
        p_g = g_b + o_o[:, None] * s_go + oh[None, :] * s_gh + ow[None, :] * s_gw
        b_g = tl.load(p_g, mask=m_o[:, None] & m_p[None, :], other=0.0)
        # X_b block, gathered transposed [BLOCK_K, BLOCK_P] so neighbouring positions are
        # neighbouring addresses; zero padding is the mask
        ih = oh[None, :] * stride_h - pad_h + ki[:, None] * dil_h
        iw = ow[None, :] * stride_w - pad_w + kj[:, None] * dil_w
        m_x = m_k[:, None] & m_p[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b_xt = tl.load(x_b + c[:, None] * s_xc + ih * s_xh + iw * s_xw, mask=m_x, other=0.0)
        if UPCAST:
            b_g = b_g.to(tl.float32)
            b_xt = b_xt.to(tl.float32)
        acc = tl.dot(b_g, tl.trans(b_xt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def psg_conv2d_wgrad_kernel(
    x_ptr,  # x [B, C, H, W], any strides
    g_ptr,  # g [B, O, Ho, Wo], any strides
    out_ptr,  # out [B, O, K] with K = C * KH * KW in (c, i, j) order, any strides
    C, H, W, O, Wo, P, K,
    s_xb, s_xc, s_xh, s_xw, s_gb, s_go, s_gh, s_gw, s_ob, s_oo, s_ok,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b] = G_b @ X_b, one [BLOCK_O, BLOCK_K] tile per program."""
    i_b = tl.program_id(0).to(tl.int64)  # sample offsets pass 2^31 elements at large B
    i_o, i_k = tl.program_id(1), tl.program_id(2)
    acc = _wgrad_tile(x_ptr, g_ptr, i_b, i_o, i_k, C, H, W, O, Wo, P, K,
                      s_xb, s_xc, s_xh, s_xw, s_gb, s_go, s_gh, s_gw,
                      stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                      KH, KW, BLOCK_O, BLOCK_K, BLOCK_P, UPCAST, PRECISION)
    o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    p_out = out_ptr + i_b * s_ob + o_o[:, None] * s_oo + o_k[None, :] * s_ok
    tl.store(p_out, acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=(o_o < O)[:, None] & (o_k < K)[None, :])


@triton.jit
def psg_conv2d_wgrad_sqnorm_kernel(
    x_ptr, g_ptr,
    part_ptr,  # part [B, n_tiles] fp32, contiguous: this tile's share of ||G_b @ X_b||^2
    C, H, W, O, Wo, P, K,
    s_xb, s_xc, s_xh, s_xw, s_gb, s_go, s_gh, s_gw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[b, tile] = sum over the tile of (G_b @ X_b)^2: the gradient never reaches memory."""
    i_b = tl.program_id(0).to(tl.int64)
    i_o, i_k = tl.program_id(1), tl.program_id(2)
    acc = _wgrad_tile(x_ptr, g_ptr, i_b, i_o, i_k, C, H, W, O, Wo, P, K,
                      s_xb, s_xc, s_xh, s_xw, s_gb, s_go, s_gh, s_gw,
                      stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                      KH, KW, BLOCK_O, BLOCK_K, BLOCK_P, UPCAST, PRECISION)
    n_tiles = tl.num_programs(1) * tl.num_programs(2)
    tl.store(part_ptr + i_b * n_tiles + i_o * tl.num_programs(2) + i_k, tl.sum(acc * acc))


def _block(n: int, largest: int) -> int:
    """The smallest power of two >= n, between 16 (tl.dot's minimum) and ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(n)))


def _setup(x, g, kernel_size, stride, padding, dilation, config: dict):
    """(grid, shape and geometry arguments, launch options) shared by both kernels."""
    B, C, H, W = x.shape
    O, Ho, Wo = g.shape[1:]
    kh, kw = kernel_size
    K = C * kh * kw
    if x.dtype == torch.float32 and not INTERPRET:
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    else:
        precision = "ieee" if INTERPRET else "tf32"  # bf16/fp16 operands: exact products on tensor cores
    # 128 x 128 tiles on 8 warps where both sides fill them: on the H200, 16% (fp32, TF32) to
    # 30% (bf16) faster than 64 x 64 on 4 warps for the 128-channel layers of the DC ConvNet
    big = not INTERPRET and O >= 128 and K >= 128
    largest = 16 if INTERPRET else 128 if big else 64
    cfg = dict(
        KH=kh, KW=kw, BLOCK_O=_block(O, largest), BLOCK_K=_block(K, largest), BLOCK_P=16 if INTERPRET else 32,
        UPCAST=INTERPRET and x.dtype != torch.float32, PRECISION=precision, num_warps=8 if big else 4,
    )
    cfg.update(config)
    grid = (B, triton.cdiv(O, cfg["BLOCK_O"]), triton.cdiv(K, cfg["BLOCK_K"]))
    geometry = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    return grid, (C, H, W, O, Wo, Ho * Wo, K), geometry, cfg


def psg_conv2d_wgrad_fwd(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation,
                         out: torch.Tensor, **config) -> torch.Tensor:
    """Per-sample weight gradients of a one-group Conv2d into ``out`` ``[B, O, C * kh * kw]``.

    ``padding`` is numeric (zero padding); ``x`` and ``g`` share a dtype (fp32, bf16, fp16).
    fp32 runs the dot in IEEE fp32 unless torch allows cuDNN TF32 (its default), which is
    what a convolution does with the same tensors. ``config`` overrides block sizes and
    launch options (BLOCK_O, BLOCK_K, BLOCK_P, num_warps, num_stages: the benchmark's sweep).
    """
    grid, shape, geometry, cfg = _setup(x, g, kernel_size, stride, padding, dilation, config)
    psg_conv2d_wgrad_kernel[grid](x, g, out, *shape, *x.stride(), *g.stride(), *out.stride(), *geometry, **cfg)
    return out


def psg_conv2d_wgrad_sqnorm_fwd(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation,
                                **config) -> torch.Tensor:
    """Squared norms ``[B]`` (fp32) of the per-sample weight gradients, without writing them."""
    grid, shape, geometry, cfg = _setup(x, g, kernel_size, stride, padding, dilation, config)
    part = torch.empty(grid[0], grid[1] * grid[2], dtype=torch.float32, device=x.device)
    psg_conv2d_wgrad_sqnorm_kernel[grid](x, g, part, *shape, *x.stride(), *g.stride(), *geometry, **cfg)
    return part.sum(1)
