"""Batched class-wise MMD between real and synthetic embeddings (distribution matching).

Rows are grouped by class (``segments(counts)`` gives the class boundaries), and every
class is handled in one launch:

- linear kernel (what DM uses): ``||mean phi(real_c) - mean phi(syn_c)||^2`` from per-class
  mean embeddings (:func:`segment_mean`, segment sums);
- RBF kernel ``k(x, y) = exp(-gamma ||x - y||^2)``: ``MMD_c^2 = mean k(x, x') + mean k(y, y')
  - 2 mean k(x, y)`` with the kernel sums fused (:func:`rbf_row_sums`): the ``N x M`` kernel
  matrix is never formed, in the forward or the backward.

Backends: Triton (``kernels/mmd.py``), CUDA (``csrc/mmd.cu``), torch (the reference, which
forms each class's kernel block).
"""
from __future__ import annotations

import torch

from .. import _backend

KERNELS = ("linear", "rbf")
CUDA_RBF_MAX_D = 2048  # csrc/mmd.h RBF_MAX_D


def check_kernel(kernel: str) -> None:
    """A ValueError naming the kernels unless ``kernel`` is one of them."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def segments(counts: torch.Tensor) -> torch.Tensor:
    """``[C + 1]`` int64 class boundaries of class-grouped rows with ``counts[c]`` rows each."""
    counts = counts.to(torch.int64)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _row_classes(seg: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(seg.numel() - 1, device=seg.device), seg.diff())


# --------------------------------------------------------------------------- per-class means
def segment_mean_ref(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``[C, D]`` fp32 mean row of each class (zeros for an empty class)."""
    C = seg.numel() - 1
    sums = torch.zeros(C, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, _row_classes(seg), x.float())
    return sums / seg.diff().clamp_min(1).unsqueeze(1)


class _SegmentMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seg):
        ctx.save_for_backward(seg)
        ctx.n_rows, ctx.dtype = x.shape[0], x.dtype
        backend = _backend.pick_for(x)
        if backend == "torch":
            return segment_mean_ref(x, seg)
        x = x.contiguous()
        if backend == "triton":
            from ..kernels.mmd import segment_mean_fwd

            return segment_mean_fwd(x, seg)
        from .. import _ext

        out = torch.empty(seg.numel() - 1, x.shape[1], dtype=torch.float32, device=x.device)
        _ext.load(raise_on_error=True).segment_mean(x.float(), seg, out, _backend.cuda_stream(x))
        return out

    @staticmethod
    def backward(ctx, g):
        (seg,) = ctx.saved_tensors
        g = g.float().contiguous()
        backend = _backend.pick_for(g)
        if backend == "torch":
            grad = (g / seg.diff().clamp_min(1).unsqueeze(1))[_row_classes(seg)]
        elif backend == "triton":
            from ..kernels.mmd import segment_mean_bwd

            grad = segment_mean_bwd(g, seg, ctx.n_rows, torch.float32)
        else:
            from .. import _ext

            grad = torch.empty(ctx.n_rows, g.shape[1], dtype=torch.float32, device=g.device)
            _ext.load(raise_on_error=True).segment_mean_bwd(g, seg, grad, _backend.cuda_stream(g))
        return grad.to(ctx.dtype), None


def segment_mean(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Per-class mean rows ``[C, D]`` (fp32) of class-grouped ``x [N, D]``; differentiable."""
    return _SegmentMean.apply(x, seg.to(device=x.device, dtype=torch.int64).contiguous())


# --------------------------------------------------------------------------- RBF kernel sums
def _sq_dists(q, k):
    return (q.square().sum(1, keepdim=True) + k.square().sum(1) - 2 * q @ k.T).clamp_min(0)


def rbf_row_sums_ref(q, k, qseg, kseg, gamma: float) -> torch.Tensor:
    """``[Nq]``: ``sum_j exp(-gamma |q_i - k_j|^2)`` over the keys of q_i's class."""
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    q, k = q.float(), k.float()
    for c in range(qseg.numel() - 1):  # classes, not samples: each block is [n_c, m_c]
        qa, qb, ka, kb = int(qseg[c]), int(qseg[c + 1]), int(kseg[c]), int(kseg[c + 1])
        if qb > qa and kb > ka:
            out[qa:qb] = torch.exp(-gamma * _sq_dists(q[qa:qb], k[ka:kb])).sum(1)
    return out


def rbf_grad_q_ref(q, k, wq, wk, qseg, kseg, gamma: float) -> torch.Tensor:
    """Gradient in ``q`` of ``sum_ij wq_i wk_j exp(-gamma |q_i - k_j|^2)`` (within classes)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    q, k = q.float(), k.float()
    for c in range(qseg.numel() - 1):
        qa, qb, ka, kb = int(qseg[c]), int(qseg[c + 1]), int(kseg[c]), int(kseg[c + 1])
        if qb > qa and kb > ka:
            W = torch.exp(-gamma * _sq_dists(q[qa:qb], k[ka:kb])) * wq[qa:qb, None] * wk[None, ka:kb]
            out[qa:qb] = -2 * gamma * (q[qa:qb] * W.sum(1, keepdim=True) - W @ k[ka:kb])
    return out


def _rbf_backend(x):
    backend = _backend.pick_for(x)
    if backend == "cuda" and x.shape[1] > CUDA_RBF_MAX_D:
        return "triton"  # the CUDA kernel keeps a row in shared memory
    return backend


def _rbf_sums(q, k, qseg, kseg, gamma):
    backend = _rbf_backend(q)
    if backend == "torch":
        return rbf_row_sums_ref(q, k, qseg, kseg, gamma)
    q, k = q.float().contiguous(), k.float().contiguous()
    if backend == "triton":
        from ..kernels.mmd import rbf_row_sums_fwd

        return rbf_row_sums_fwd(q, k, qseg, kseg, gamma, int(qseg.diff().max()))
    from .. import _ext

    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    _ext.load(raise_on_error=True).rbf(q, k, _row_classes(qseg), kseg, None, None, out, gamma, _backend.cuda_stream(q))
    return out


def _rbf_grad(q, k, wq, wk, qseg, kseg, gamma):
    backend = _rbf_backend(q)
    if backend == "torch":
        return rbf_grad_q_ref(q, k, wq, wk, qseg, kseg, gamma)
    q, k = q.float().contiguous(), k.float().contiguous()
    wq, wk = wq.float().contiguous(), wk.float().contiguous()
    if backend == "triton":
        from ..kernels.mmd import rbf_grad_q_fwd

        return rbf_grad_q_fwd(q, k, wq, wk, qseg, kseg, gamma, int(qseg.diff().max()))
    from .. import _ext

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    _ext.load(raise_on_error=True).rbf(q, k, _row_classes(qseg), kseg, wq, wk, out, gamma, _backend.cuda_stream(q))
    return out


class _RBFRowSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qseg, kseg, gamma):
        ctx.save_for_backward(q, k, qseg, kseg)
        ctx.gamma = gamma
        return _rbf_sums(q, k, qseg, kseg, gamma)

    @staticmethod
    def backward(ctx, g):
        q, k, qseg, kseg = ctx.saved_tensors
        g = g.float().contiguous()
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_q = _rbf_grad(q, k, g, torch.ones(k.shape[0], device=k.device), qseg, kseg, ctx.gamma).to(q.dtype)
        if ctx.needs_input_grad[1]:  # the same sums seen from the keys' side
            grad_k = _rbf_grad(k, q, torch.ones(k.shape[0], device=k.device), g, kseg, qseg, ctx.gamma).to(k.dtype)
        return grad_q, grad_k, None, None, None


def rbf_row_sums(q, k, qseg, kseg, gamma: float) -> torch.Tensor:
    """``[Nq]`` within-class RBF kernel row sums, differentiable in ``q`` and ``k``."""
    qseg = qseg.to(device=q.device, dtype=torch.int64).contiguous()
    kseg = kseg.to(device=q.device, dtype=torch.int64).contiguous()
    return _RBFRowSums.apply(q, k, qseg, kseg, float(gamma))


def median_gamma(x: torch.Tensor, max_rows: int = 512) -> float:
    """``1 / median squared pairwise distance`` of (at most ``max_rows``) rows: the median heuristic."""
    x = x.detach().float()[:max_rows]
    x = x - x.mean(0)  # the distance expansion cancels on uncentred rows (ReLU features are)
    d = _sq_dists(x, x)
    off_diag = d[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    med = float(off_diag.median()) if off_diag.numel() else 1.0
    return 1.0 / max(med, 1e-12)


# --------------------------------------------------------------------------- the loss
def class_mmd(real: torch.Tensor, real_counts: torch.Tensor, syn: torch.Tensor, syn_counts: torch.Tensor,
              kernel: str = "linear", gamma: float | None = None) -> torch.Tensor:
    """Per-class squared MMD ``[C]`` between class-grouped embeddings ``real [N, D]`` and ``syn [M, D]``.

    ``real_counts`` / ``syn_counts`` give each class's number of rows (rows sorted by class).
    ``kernel="linear"`` is DM's ``||mean_real - mean_syn||^2``; ``"rbf"`` uses
    ``exp(-gamma ||x - y||^2)`` with ``gamma`` by the median heuristic on ``real`` when None::

        f_real, f_syn = embed(real_images), embed(syn_images)          # rows grouped by class
        loss = class_mmd(f_real, torch.bincount(real_labels), f_syn, torch.full((C,), ipc)).sum()
    """
    check_kernel(kernel)
    if real.dim() != 2 or syn.dim() != 2 or real.shape[1] != syn.shape[1]:
        raise ValueError(f"real and syn must be [N, D] and [M, D] with one D, got {tuple(real.shape)} and {tuple(syn.shape)}")
    rseg, sseg = segments(real_counts).to(real.device), segments(syn_counts).to(real.device)
    if int(rseg[-1]) != real.shape[0] or int(sseg[-1]) != syn.shape[0]:
        raise ValueError("the class counts must add up to the number of rows of real and syn")
    if kernel == "linear":
        return (segment_mean(real, rseg) - segment_mean(syn, sseg)).square().sum(1)
    if gamma is None:
        gamma = median_gamma(real)
    # RBF distances are shift invariant, and the kernels expand ||x - y||^2, which cancels on
    # uncentred embeddings: subtract one constant (detached) mean from both sides
    offset = real.detach().float().mean(0)
    real, syn = real.float() - offset, syn.float() - offset  # in fp32: bf16 would round the shift
    C = rseg.numel() - 1
    n, m = rseg.diff().clamp_min(1).float(), sseg.diff().clamp_min(1).float()

    def class_sums(q, qseg, k, kseg):
        rows = rbf_row_sums(q, k, qseg, kseg, gamma)
        return torch.zeros(C, device=q.device, dtype=torch.float32).index_add(0, _row_classes(qseg), rows)

    s_xx = class_sums(real, rseg, real, rseg)
    s_yy = class_sums(syn, sseg, syn, sseg)
    s_xy = class_sums(syn, sseg, real, rseg)
    return s_xx / n**2 + s_yy / m**2 - 2 * s_xy / (n * m)
