"""Batched (block) conjugate gradients: solve ``A X = B`` for K right-hand sides at once.

Each column runs its own CG recurrence (its own alpha and beta), all in lockstep, so
every iteration costs one batched matrix-vector product ``A @ P`` (``[P, K]``) and the
answer equals K separate solves. The per-iteration vector work is one fused update
(``cg_update_xr`` then ``cg_update_p``): a Triton or CUDA kernel for CUDA tensors, the
torch reference on the CPU. Optional Jacobi preconditioning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _backend


# --------------------------------------------------------------------------- the fused update
def cg_update_xr_ref(x, r, p, ap, alpha, inv_diag=None) -> torch.Tensor:
    """In place: ``x += alpha p``, ``r -= alpha Ap`` (per column); returns ``[K]`` of ``r . z``."""
    x.addcmul_(p, alpha.to(x.dtype))
    r.addcmul_(ap, -alpha.to(r.dtype))
    z = r if inv_diag is None else r * inv_diag.unsqueeze(1)
    return (r * z).sum(0, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)


def cg_update_p_ref(p, r, beta, inv_diag=None) -> torch.Tensor:
    """In place: ``p = z + beta p``, ``z = r * inv_diag`` (or r)."""
    z = r if inv_diag is None else r * inv_diag.unsqueeze(1)
    return p.mul_(beta.to(p.dtype)).add_(z)


def _fast_path(x) -> str:
    backend = _backend.pick(x.device)
    if backend != "torch" and (x.dtype != torch.float32 or not x.is_contiguous()):
        return "torch"  # the kernels take contiguous fp32 [P, K]
    return backend


def cg_update_xr(x, r, p, ap, alpha, inv_diag=None) -> torch.Tensor:
    """Dispatching fused update; see :func:`cg_update_xr_ref`. Vectors ``[P, K]``, alpha ``[K]``."""
    backend = _fast_path(x)
    if backend == "torch":
        return cg_update_xr_ref(x, r, p, ap, alpha, inv_diag)
    alpha = alpha.float().contiguous()
    if backend == "triton":
        from ..kernels.cg_update import cg_update_xr_fwd

        return cg_update_xr_fwd(x, r, p, ap.contiguous(), alpha, inv_diag)
    from .. import _ext

    return _ext.load(raise_on_error=True).cg_update_xr(
        x, r, p, ap.contiguous(), alpha, inv_diag, _backend.cuda_stream(x))


def cg_update_p(p, r, beta, inv_diag=None) -> torch.Tensor:
    """Dispatching direction update; see :func:`cg_update_p_ref`."""
    backend = _fast_path(p)
    if backend == "torch":
        return cg_update_p_ref(p, r, beta, inv_diag)
    beta = beta.float().contiguous()
    if backend == "triton":
        from ..kernels.cg_update import cg_update_p_fwd

        return cg_update_p_fwd(p, r, beta, inv_diag)
    from .. import _ext

    _ext.load(raise_on_error=True).cg_update_p(p, r, beta, inv_diag, _backend.cuda_stream(p))
    return p


# --------------------------------------------------------------------------- the solver
@dataclass
class SolveInfo:
    """How a solve went: iterations run, final relative residual per column, convergence."""

    iterations: int
    residuals: torch.Tensor  # [K] ||b - A x|| / ||b||
    converged: bool
    solver: str = "cg"


def block_cg(matvec: Callable[[torch.Tensor], torch.Tensor], B: torch.Tensor, tol: float = 1e-6,
             max_iter: int | None = None, inv_diag: torch.Tensor | None = None,
             warn: bool = True) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``A X = B`` (A symmetric positive definite) for all columns of ``B [P, K]``.

    Args:
        matvec: ``V [P, K] -> A @ V [P, K]`` (e.g. batched Hessian-vector products).
        B: right-hand sides, one per column.
        tol: stop when every column's ``||b - A x|| / ||b||`` is at most tol.
        max_iter: at most this many iterations (default ``min(P, 1000)``).
        inv_diag: ``[P]`` inverse of A's diagonal for Jacobi preconditioning.
        warn: warn when some column has not converged.

    Returns:
        ``(X [P, K], SolveInfo)``.
    """
    if B.dim() != 2:
        raise ValueError(f"B must be [P, K], got shape {tuple(B.shape)}")
    P, K = B.shape
    max_iter = max_iter if max_iter is not None else min(P, 1000)
    X = torch.zeros_like(B)
    R = B.clone()
    Pdir = R.clone() if inv_diag is None else R * inv_diag.unsqueeze(1)
    rz = (R * Pdir).sum(0)
    b_norm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    res = R.norm(dim=0) / b_norm
    it = 0
    while it < max_iter and bool((res > tol).any()):
        AP = matvec(Pdir)
        active = res > tol
        pAp = (Pdir * AP).sum(0)
        if bool((pAp[active] <= 0).any()):
            raise ValueError("the operator is not positive definite along a CG direction "
                             "(p^T A p <= 0): add damping")
        alpha = torch.where(active, rz / pAp.where(active, torch.ones_like(pAp)), torch.zeros_like(rz))
        rz_new = cg_update_xr(X, R, Pdir, AP, alpha, inv_diag).to(rz.dtype)
        it += 1
        res = R.norm(dim=0) / b_norm
        beta = torch.where(active, rz_new / rz.where(active, torch.ones_like(rz)), torch.zeros_like(rz))
        rz = torch.where(active, rz_new, rz)
        cg_update_p(Pdir, R, beta, inv_diag)
    converged = bool((res <= tol).all())
    if warn and not converged:
        warnings.warn(f"block CG stopped after {it} iterations with {int((res > tol).sum())} of {K} columns "
                      f"above tol={tol:g} (worst relative residual {res.max().item():.3g}); raise max_iter or damping",
                      stacklevel=2)
    return X, SolveInfo(it, res.detach().cpu(), converged, "cg")
