"""Triton kernels for the fused batched-CG update over K right-hand sides.

Vectors are ``[P, K]`` (P unknowns, K columns), contiguous. Per column k:

- ``cg_update_xr``: ``x += alpha_k p``, ``r -= alpha_k Ap``, ``z = r * inv_diag`` (Jacobi, or
  ``z = r``), and the partial sums of ``r . z`` for the next step's beta;
- ``cg_update_p``: ``p = z + beta_k p``.

Two launches per iteration: beta needs the global reduction of ``r . z``.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton


@triton.jit
def _tile(i_p, i_k, P, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets and masks of the [BLOCK_P, BLOCK_K] tile (i_p, i_k) of a contiguous [P, K] array."""
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_p = o_p < P
    m_k = o_k < K
    return o_p, o_k, m_p, m_k, m_p[:, None] & m_k[None, :], o_p[:, None] * K + o_k[None, :]


@triton.jit
def cg_update_xr_kernel(
    x_ptr, r_ptr, p_ptr, ap_ptr,  # [P, K] contiguous: iterate, residual, direction, A @ direction
    alpha_ptr,  # [K] fp32 step sizes
    inv_diag_ptr,  # [P] fp32 inverse Jacobi preconditioner (unused unless HAS_DIAG)
    part_ptr,  # [n_blocks_p, K] fp32: this block's share of r . z per column
    P, K,
    HAS_DIAG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x += alpha p; r -= alpha Ap; part[block, k] = sum over the block of r_k z_k."""
    i_p = tl.program_id(0)
    o_p, o_k, m_p, m_k, m, offs = _tile(i_p, tl.program_id(1), P, K, BLOCK_P, BLOCK_K)
    b_alpha = tl.load(alpha_ptr + o_k, mask=m_k, other=0.0)
    b_x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b_r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b_p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b_ap = tl.load(ap_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b_x += b_alpha[None, :] * b_p
    b_r -= b_alpha[None, :] * b_ap
    tl.store(x_ptr + offs, b_x.to(x_ptr.dtype.element_ty), mask=m)
    tl.store(r_ptr + offs, b_r.to(r_ptr.dtype.element_ty), mask=m)
    if HAS_DIAG:
        b_d = tl.load(inv_diag_ptr + o_p, mask=m_p, other=0.0)
        b_z = b_r * b_d[:, None]
    else:
        b_z = b_r
    tl.store(part_ptr + i_p * K + o_k, tl.sum(b_r * b_z, axis=0), mask=m_k)


@triton.jit
def cg_update_p_kernel(
    p_ptr, r_ptr,  # [P, K] contiguous: direction (updated in place), residual
    beta_ptr,  # [K] fp32
    inv_diag_ptr,  # [P] fp32 (unused unless HAS_DIAG)
    P, K,
    HAS_DIAG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """p = z + beta p, z = r * inv_diag (or r)."""
    i_p = tl.program_id(0)
    o_p, o_k, m_p, m_k, m, offs = _tile(i_p, tl.program_id(1), P, K, BLOCK_P, BLOCK_K)
    b_beta = tl.load(beta_ptr + o_k, mask=m_k, other=0.0)
    b_r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b_p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_DIAG:
        b_d = tl.load(inv_diag_ptr + o_p, mask=m_p, other=0.0)
        b_r = b_r * b_d[:, None]
    tl.store(p_ptr + offs, (b_r + b_beta[None, :] * b_p).to(p_ptr.dtype.element_ty), mask=m)


def _blocks(P, K):
    block_k = min(64, triton.next_power_of_2(max(K, 1)))
    block_p = max(16, 4096 // block_k)
    return block_p, block_k


def cg_update_xr_fwd(x, r, p, ap, alpha, inv_diag=None) -> torch.Tensor:
    """Launch ``cg_update_xr_kernel``; returns fp32 ``[K]`` of ``r . z``."""
    P, K = x.shape
    block_p, block_k = _blocks(P, K)
    n_p = triton.cdiv(P, block_p)
    part = torch.empty(n_p, K, dtype=torch.float32, device=x.device)
    diag = inv_diag if inv_diag is not None else alpha  # any fp32 pointer; not read
    cg_update_xr_kernel[(n_p, triton.cdiv(K, block_k))](
        x, r, p, ap, alpha, diag, part, P, K,
        HAS_DIAG=inv_diag is not None, BLOCK_P=block_p, BLOCK_K=block_k)
    return part.sum(0)


def cg_update_p_fwd(p, r, beta, inv_diag=None) -> torch.Tensor:
    """Launch ``cg_update_p_kernel`` (p updated in place)."""
    P, K = p.shape
    block_p, block_k = _blocks(P, K)
    diag = inv_diag if inv_diag is not None else beta
    cg_update_p_kernel[(triton.cdiv(P, block_p), triton.cdiv(K, block_k))](
        p, r, beta, diag, P, K, HAS_DIAG=inv_diag is not None, BLOCK_P=block_p, BLOCK_K=block_k)
    return p
