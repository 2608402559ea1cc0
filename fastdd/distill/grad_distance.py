"""Fused class-wise gradient distance: DC's matching loss over all layers and classes at once.

The gradients of the matched layers (the ones with at least 2 dims; bias and norm
parameters are ignored, as in DC) are packed per class into ``[C, P]``. Each layer splits
into segments, one per output channel, that tile ``P``. One fused reduction gives, per
(class, segment), ``[a.b, a.a, b.b, |a - b|^2]``; every metric is a few flops on those:

- ``"ours"`` (DC): sum over segments of ``1 - cos``;
- ``"cos"``: ``1 - cos`` of each class's whole concatenated vector;
- ``"mse"``: sum of squared differences.

Cosines follow ``F.cosine_similarity``: ``a.b / (max(|a|, eps) max(|b|, eps))``, eps 1e-6.
The backward is one more pass: ``grad = c1 a + c2 b`` per segment. Backends: Triton
(``kernels/grad_distance.py``), CUDA (``csrc/grad_distance.cu``), torch (the reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _backend

METRICS = ("ours", "cos", "mse")
EPS = 1e-6


@dataclass(frozen=True)
class SegmentLayout:
    """Where each segment (one output channel of one layer) lies in the packed ``[C, P]``."""

    offsets: torch.Tensor  # [R] int64
    lengths: torch.Tensor  # [R] int64
    size: int  # P
    max_len: int
    # per layer (first element, first segment, segments, segment length): the torch path
    # reduces each layer as a [C, segments, length] view
    layers: tuple

    @staticmethod
    def of_shapes(shapes: list[tuple[int, ...]], device) -> "SegmentLayout":
        """Segments for layers of the given per-class shapes ``(out_channels, *rest)``."""
        lengths, layers, start = [], [], 0
        for shape in shapes:
            if len(shape) < 2:
                raise ValueError(f"matched layers need at least 2 dims (out_channels, ...), got shape {shape}")
            row = 1
            for s in shape[1:]:
                row *= int(s)
            layers.append((start, len(lengths), int(shape[0]), row))
            start += row * int(shape[0])
            lengths += [row] * int(shape[0])
        lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
        offsets = torch.cumsum(lengths_t, 0) - lengths_t
        return SegmentLayout(offsets, lengths_t, int(lengths_t.sum()), max(lengths), tuple(layers))


def pack(grads: list[torch.Tensor]) -> torch.Tensor:
    """``[C, P]``: each class's layer gradients ``[C, out, ...]`` flattened and concatenated."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


# --------------------------------------------------------------------------- the torch path
def row_stats_ref(a: torch.Tensor, b: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """``[C, R, 4]`` fp32: per (class, segment) ``[a.b, a.a, b.b, |a - b|^2]``."""
    a, b = a.float(), b.float()
    C = a.shape[0]
    out = []
    for start, _, rows, length in layout.layers:
        x = a[:, start:start + rows * length].view(C, rows, length)
        y = b[:, start:start + rows * length].view(C, rows, length)
        out.append(torch.stack([(x * y).sum(-1), x.square().sum(-1), y.square().sum(-1), (x - y).square().sum(-1)],
                               dim=-1))
    return torch.cat(out, dim=1)


def row_axpby_ref(a, b, c1, c2, layout: SegmentLayout) -> torch.Tensor:
    """``c1[c, seg] a + c2[c, seg] b`` elementwise over each segment."""
    C = a.shape[0]
    out = []
    for start, first, rows, length in layout.layers:
        x = a[:, start:start + rows * length].view(C, rows, length).float()
        y = b[:, start:start + rows * length].view(C, rows, length).float()
        out.append((c1[:, first:first + rows, None] * x + c2[:, first:first + rows, None] * y).reshape(C, -1))
    return torch.cat(out, dim=1).to(a.dtype)


# --------------------------------------------------------------------------- dispatch
def row_stats(a: torch.Tensor, b: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Dispatching :func:`row_stats_ref`."""
    backend = _backend.pick_for(a)
    if backend == "torch":
        return row_stats_ref(a, b, layout)
    a, b = a.contiguous(), b.contiguous()
    if backend == "triton":
        from ..kernels.grad_distance import row_stats_fwd

        return row_stats_fwd(a, b, layout.offsets, layout.lengths, layout.max_len)
    from .. import _ext

    out = torch.empty(a.shape[0], layout.offsets.numel(), 4, dtype=torch.float32, device=a.device)
    _ext.load(raise_on_error=True).row_stats(a.float(), b.float(), layout.offsets, layout.lengths, out,
                                             _backend.cuda_stream(a))
    return out


def row_axpby(a, b, c1, c2, layout: SegmentLayout) -> torch.Tensor:
    """Dispatching :func:`row_axpby_ref`."""
    backend = _backend.pick_for(a)
    if backend == "torch":
        return row_axpby_ref(a, b, c1, c2, layout)
    a, b, c1, c2 = a.contiguous(), b.contiguous(), c1.float().contiguous(), c2.float().contiguous()
    tiles = layout.size == a.shape[1]
    if backend == "triton":
        from ..kernels.grad_distance import row_axpby_fwd

        return row_axpby_fwd(a, b, c1, c2, layout.offsets, layout.lengths, layout.max_len, tiles)
    from .. import _ext

    out = torch.empty_like(a, dtype=torch.float32) if tiles else torch.zeros_like(a, dtype=torch.float32)
    _ext.load(raise_on_error=True).row_axpby(a.float(), b.float(), c1, c2, layout.offsets, layout.lengths, out,
                                             _backend.cuda_stream(a))
    return out.to(a.dtype)


class _RowStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, layout):
        ctx.save_for_backward(a, b)
        ctx.layout = layout
        return row_stats(a, b, layout)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        layout = ctx.layout
        g_ab, g_aa, g_bb, g_dd = g.unbind(-1)
        cross = g_ab - 2 * g_dd  # the coefficient of the other side
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = row_axpby(a, b, 2 * (g_aa + g_dd), cross, layout)
        if ctx.needs_input_grad[1]:
            grad_b = row_axpby(a, b, cross, 2 * (g_bb + g_dd), layout)
        return grad_a, grad_b, None


def _cos(ab, aa, bb):
    # clamp the squared norms before the root: sqrt'(0) is inf, and a row whose gradient is exactly
    # zero (a dead ReLU unit) made the backward NaN; the values are those of sqrt(.).clamp_min(EPS)
    return ab / (aa.clamp_min(EPS * EPS).sqrt() * bb.clamp_min(EPS * EPS).sqrt())


def check_metric(metric: str) -> None:
    """A ValueError naming the metrics unless ``metric`` is one of them."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def distance_from_stats(stats: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-class distance ``[C]`` from the ``[C, R, 4]`` segment statistics (``metric``
    already checked by :func:`classwise_grad_distance`)."""
    if metric == "ours":
        return (1 - _cos(stats[..., 0], stats[..., 1], stats[..., 2])).sum(1)
    if metric == "cos":
        s = stats.sum(1)
        return 1 - _cos(s[:, 0], s[:, 1], s[:, 2])
    return stats[..., 3].sum(1)  # mse


def classwise_grad_distance(real: torch.Tensor, syn: torch.Tensor, layout: SegmentLayout,
                            metric: str = "ours") -> torch.Tensor:
    """Distances ``[C]`` between packed real and synthetic gradients ``[C, P]`` (see module doc).

    Differentiable in both inputs (one fused backward pass per input that needs it)::

        layers = [p for p in net.parameters() if p.dim() > 1]             # bias/norm ignored
        layout = SegmentLayout.of_shapes([tuple(p.shape) for p in layers], device)
        real = pack([g_real[n] for n in names])                          # [C, P] from [C, *shape]
        loss = classwise_grad_distance(real, pack(syn_grads), layout).sum()
    """
    check_metric(metric)  # before any kernel runs
    if real.shape != syn.shape or real.dim() != 2:
        raise ValueError(f"real and syn must both be packed [C, P], got {tuple(real.shape)} and {tuple(syn.shape)}")
    if real.shape[1] != layout.size:
        raise ValueError(f"the layout covers {layout.size} values per class, the inputs have {real.shape[1]}")
    return distance_from_stats(_RowStats.apply(real, syn, layout), metric)


def classwise_grad_distance_ref(real_layers: list[torch.Tensor], syn_layers: list[torch.Tensor],
                                metric: str = "ours") -> torch.Tensor:
    """The per-class, per-layer loop of the DC reference code (the oracle): ``[C]``."""
    import torch.nn.functional as F

    C = real_layers[0].shape[0]
    out = []
    for c in range(C):
        if metric == "ours":
            d = 0
            for gr, gs in zip(real_layers, syn_layers):
                a, b = gr[c].reshape(gr.shape[1], -1), gs[c].reshape(gs.shape[1], -1)
                d = d + (1 - F.cosine_similarity(a, b, dim=1, eps=EPS)).sum()
        else:
            a = torch.cat([g[c].flatten() for g in real_layers])
            b = torch.cat([g[c].flatten() for g in syn_layers])
            d = (a - b).square().sum() if metric == "mse" else 1 - F.cosine_similarity(a, b, dim=0, eps=EPS)
        out.append(d)
    return torch.stack(out)
