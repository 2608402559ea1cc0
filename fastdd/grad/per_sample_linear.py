"""Per-sample gradients of a Linear layer: materialize, fused squared norm, dots.

For input activations A ``[B, T, d]`` and output gradients G ``[B, T, p]`` the
per-sample weight gradient is ``G_i^T A_i`` (``[p, d]``). Three consumers, each with a
pure-PyTorch reference (``*_ref``: the test oracle and the CPU path) and a dispatcher
that picks the Triton or CUDA kernel for CUDA tensors (``fastdd._backend``):

- ``psg_linear``: materialize ``[B, p, d]`` (into a reused buffer when ``out`` is given);
- ``psg_linear_sqnorm``: ``||G_i^T A_i||_F^2`` without writing the per-sample gradient;
- ``psg_linear_dot``: ``<G_i^T A_i, V_k>`` for K vectors ``V [K, p, d]``.

Every path accumulates in fp32 (float64 inputs: float64) and returns norms and dots in
that dtype; ``psg_linear`` returns the dtype of ``out`` (default: the input dtype).
"""
from __future__ import annotations

import torch

from .. import _backend, _cpu
from . import buffers
from .._chunking import chunks, rows_per_chunk

_F32 = 4  # bytes of the fp32 temporaries used to size chunks


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype reductions accumulate in: float64 stays float64, everything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (see :func:`acc_dtype`): ``t`` itself when it is already
    (checked here: a no-op ``.to`` still costs a dispatch, several per layer and step)."""
    return t if t.dtype in _ACC_DTYPES else t.to(acc_dtype(t))


_ACC_DTYPES = (torch.float32, torch.float64)


def _pick(device: torch.device, dtype: torch.dtype, triton_first: bool = True) -> str:
    # the kernels take fp32, bf16 and fp16; float64 stays on the exact torch path. Triton
    # first: on the H200 it beat the (SIMT) CUDA kernels in 20 of 24 shape x dtype x
    # consumer cases, up to 10x on large bf16 shapes (bench/measured/h200-2026-11-28-conv);
    # the exceptions were fp32 norms, where the caller passes triton_first=False
    return "torch" if dtype == torch.float64 else _backend.pick(device, triton_first=triton_first)


def _as_btd(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, d] or [B, T, d], got shape {tuple(x.shape)}")
    return x


def _check_pair(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A, G = _as_btd(A, "A"), _as_btd(G, "G")
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(
            f"A {tuple(A.shape)} and G {tuple(G.shape)} must agree on [B, T]"
        )
    if A.device != G.device:
        raise ValueError(f"A is on {A.device} but G is on {G.device}")
    if A.dtype != G.dtype:  # e.g. under autocast: bf16 output gradients of fp32 activations
        common = torch.promote_types(A.dtype, G.dtype)
        A, G = A.to(common), G.to(common)
    return A, G


# --------------------------------------------------------------------------- materialize
def psg_linear_ref(A: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weight gradients ``G_i^T A_i``: A ``[B, T, d]``, G ``[B, T, p]`` -> ``[B, p, d]``."""
    A, G = _check_pair(A, G)
    B, T, d = A.shape
    p = G.shape[2]
    if out is None:
        out = torch.empty(B, p, d, dtype=A.dtype, device=A.device)
    if T == 1 and out.dtype == A.dtype == G.dtype:
        # An outer product per sample: one broadcast multiply writes the result once.
        torch.mul(G.transpose(1, 2), A, out=out)
    elif out.dtype == A.dtype == G.dtype == torch.float32:
        torch.bmm(G.transpose(1, 2), A, out=out)
    else:  # low precision: accumulate in fp32, cast once on store
        out.copy_(torch.bmm(acc(G.transpose(1, 2)), acc(A)))
    return out


def psg_linear(A: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weight gradients ``[B, p, d]`` of a Linear layer (dispatching).

    A: ``[B, T, d]`` (or ``[B, d]``) input activations; G: ``[B, T, p]`` output gradients;
    out: optional ``[B, p, d]`` buffer to write into (reused across calls).

    >>> A, G = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    >>> psg_linear(A, G).shape
    torch.Size([4, 2, 5])
    """
    A, G = _check_pair(A, G)
    B, _, d = A.shape
    p = G.shape[2]
    if out is not None and (tuple(out.shape) != (B, p, d) or out.device != A.device):
        raise ValueError(f"out must be [B, p, d] = {(B, p, d)} on {A.device}, got {tuple(out.shape)} on {out.device}")
    backend = _pick(A.device, A.dtype)
    if backend == "torch":
        # an outer product per sample, larger than the cache, into memory written before (a
        # caller's reused buffer, the pool's memory of an earlier result): streamed past the
        # cache (fastdd._cpu). Not into fresh pages, which the kernel's zeroing leaves in cache:
        # there ordinary stores win (MLP 784-512-256-10, B=256: 72-130 against 171-193 ms a call)
        if (A.shape[1] == 1 and out is not None and A.device.type == "cpu" and A.dtype == torch.float32
                and not buffers.first_write(out) and _cpu.outer_stream_into(G[:, 0], A[:, 0], out)):
            return out
        return psg_linear_ref(A, G, out)
    if out is None:
        out = torch.empty(B, p, d, dtype=A.dtype, device=A.device)
    if backend == "triton":
        from ..kernels.per_sample_linear import psg_linear_fwd

        return psg_linear_fwd(A, G, out)
    from .. import _ext

    _ext.load(raise_on_error=True).psg_linear(A, G, out, _backend.cuda_stream(A))
    return out


# --------------------------------------------------------------------------- squared norm
def gram_is_cheaper(T: int, d: int, p: int) -> bool:
    """Whether <A A^T, G G^T> (B T^2 (d+p) flops) beats materializing (B T d p)."""
    return T > 1 and T * (d + p) < d * p


def psg_linear_sqnorm_ref(A: torch.Tensor, G: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``||G_i^T A_i||_F^2`` per sample, fp32 ``[B]``; never more than a chunk of temporaries."""
    A, G = _check_pair(A, G)
    B, T, d = A.shape
    p = G.shape[2]
    if T == 1:  # ||g a^T||^2 = ||a||^2 ||g||^2
        return acc(A).square().sum((1, 2)) * acc(G).square().sum((1, 2))
    out = torch.empty(B, dtype=acc_dtype(A), device=A.device)
    if gram_is_cheaper(T, d, p):
        step = rows_per_chunk(B, 2 * T * T * _F32, chunk_size)
        for s in chunks(B, step):
            a, g = acc(A[s]), acc(G[s])
            out[s] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    else:
        step = rows_per_chunk(B, p * d * _F32, chunk_size)
        for s in chunks(B, step):
            out[s] = torch.bmm(acc(G[s].transpose(1, 2)), acc(A[s])).square().sum((1, 2))
    return out


def psg_linear_sqnorm(A: torch.Tensor, G: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Squared Frobenius norms ``[B]`` of per-sample Linear weight gradients (dispatching).

    A: ``[B, T, d]``; G: ``[B, T, p]``. The kernels never write ``[B, p, d]``.
    """
    A, G = _check_pair(A, G)
    # fp32 norms: the CUDA kernels won 2 of 4 shapes on the H200 and the DC ConvNet's norms
    # (6.8 ms vs 7.6 with Triton)
    backend = _pick(A.device, A.dtype, triton_first=A.dtype != torch.float32)
    if backend == "torch":
        return psg_linear_sqnorm_ref(A, G, chunk_size)
    if backend == "triton":
        from ..kernels.per_sample_linear import psg_linear_sqnorm_fwd

        return psg_linear_sqnorm_fwd(A, G)
    from .. import _ext

    B = A.shape[0]
    out = torch.zeros(B, dtype=torch.float32, device=A.device)
    _ext.load(raise_on_error=True).psg_linear_sqnorm(A, G, out, _backend.cuda_stream(A))
    return out


# --------------------------------------------------------------------------- dots with V
def psg_linear_dot_ref(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``<G_i^T A_i, V_k>`` per sample and vector, fp32 ``[B, K]``; V is ``[K, p, d]``."""
    A, G = _check_pair(A, G)
    B, T, d = A.shape
    p = G.shape[2]
    K = V.shape[0]
    Vf = acc(V)
    out = torch.empty(B, K, dtype=acc_dtype(A), device=A.device)
    # sum_t g_t^T V_k a_t: project G through V (B T K d flops, B T K d temporaries) when
    # T K <= T + K, else materialize a chunk of G_i^T A_i and take K dots (B T p d + B K p d).
    if T * K <= T + K:
        Vp = Vf.permute(1, 0, 2).reshape(p, K * d)
        step = rows_per_chunk(B, T * K * d * _F32, chunk_size)
        for s in chunks(B, step):
            b = s.stop - s.start
            proj = (acc(G[s]).reshape(b * T, p) @ Vp).view(b, T, K, d)
            out[s] = torch.einsum("btkd,btd->bk", proj, acc(A[s]))
    else:
        Vflat = Vf.reshape(K, p * d)
        step = rows_per_chunk(B, p * d * _F32, chunk_size)
        for s in chunks(B, step):
            grads = torch.bmm(acc(G[s].transpose(1, 2)), acc(A[s]))
            out[s] = grads.reshape(grads.shape[0], p * d) @ Vflat.T
    return out


def psg_linear_dot(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Dots ``[B, K]`` of per-sample Linear weight gradients with K vectors (dispatching).

    A: ``[B, T, d]``; G: ``[B, T, p]``; V: ``[K, p, d]``. Never writes ``[B, p, d]``.
    """
    A, G = _check_pair(A, G)
    p, d = G.shape[2], A.shape[2]
    if V.dim() != 3 or tuple(V.shape[1:]) != (p, d):
        raise ValueError(f"V must be [K, p, d] = [K, {p}, {d}], got {tuple(V.shape)}")
    backend = _pick(A.device, A.dtype)
    if backend == "torch":
        return psg_linear_dot_ref(A, G, V, chunk_size)
    if backend == "triton":
        from ..kernels.per_sample_linear import psg_linear_dot_fwd

        return psg_linear_dot_fwd(A, G, V)
    from .. import _ext

    out = torch.zeros(A.shape[0], V.shape[0], dtype=torch.float32, device=A.device)
    _ext.load(raise_on_error=True).psg_linear_dot(A, G, V.contiguous(), out, _backend.cuda_stream(A))
    return out
