"""Hand-written per-sample gradient rules, one per layer type (DESIGN.md section 4).

A rule turns what hooks captured in one ordinary forward and backward, the layer's
input ``x`` and output gradient ``g`` (per sample: the gradient of that sample's own
loss), into three consumers for the layer's own parameters:

- ``materialize(m, x, g)``: ``{name: [B, *shape]}``;
- ``sq_norms(m, x, g)``: ``{name: [B]}`` squared norms (ghost norms where the layer allows);
- ``dots(m, x, g, vectors)``: ``[B, K]`` summed over the layer's parameters, with
  ``vectors = {name: [K, *shape]}`` for the parameters being dotted;
- ``class_sums(m, x, g, labels, num_classes)``: ``{name: [C, *shape]}``, the sum of the
  per-sample gradients of each class.

Rules default to norms and dots through chunked materialization (``FASTDD_CHUNK_MB``
bounds a chunk); Linear and Embedding override them with forms that never materialize
per-sample gradients, and Conv norms use the Gram form over patches where it is cheaper.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .._chunking import chunks, rows_per_chunk
from . import per_sample_conv
from .per_sample_conv import conv_weight_grads, conv_weight_sqnorms
from .per_sample_linear import acc, acc_dtype, gram_is_cheaper, psg_linear, psg_linear_dot, psg_linear_sqnorm


class Rule:
    """Base rule: norms and dots from chunked materialization."""

    def saved_stats(self, m, x, output):
        """What the rule reuses from the layer's forward (its input ``x`` and ``output``, taken when the
        engine records the call), handed back to ``materialize`` and ``sq_norms`` as ``stats=``; None:
        nothing (the rule's methods are then called without ``stats``)."""
        return None

    def materialize(self, m, x, g, out=None) -> dict[str, torch.Tensor]:
        """Per-sample gradients; ``out`` may offer buffers ``{name: [B, *shape]}`` to write into."""
        raise NotImplementedError

    def sq_norms(self, m, x, g, chunk_size=None) -> dict[str, torch.Tensor]:
        out = {}
        for s in _sample_chunks(m, x, chunk_size):
            for name, grad in self.materialize(m, x[s], g[s]).items():
                out.setdefault(name, []).append(acc(grad.flatten(1)).square().sum(1))
        return {name: torch.cat(parts) for name, parts in out.items()}

    def dots(self, m, x, g, vectors, chunk_size=None) -> torch.Tensor:
        parts = []
        for s in _sample_chunks(m, x, chunk_size):
            grads = self.materialize(m, x[s], g[s])
            parts.append(sum(acc(grads[n].flatten(1)) @ acc(v.flatten(1)).T for n, v in vectors.items()))
        return torch.cat(parts)

    def norms_materialize(self, m, x, g) -> bool:
        """Whether ``sq_norms`` forms the per-sample gradients (so a clipped sum may reuse them)."""
        return True

    def batch_sum(self, m, x, g, chunk_size=None, out=None, scale: float = 1.0,
                  weights: torch.Tensor | None = None, g_shared: bool = False) -> dict[str, torch.Tensor]:
        """``scale`` times the sum over the batch of the per-sample gradients, each weighted by
        ``weights [B]`` where given (a clipped gradient), in the accumulation dtype; ``out`` may offer
        tensors ``{name: shape of the parameter}`` to write into (rules that can, do). ``g_shared``:
        ``g`` is also held outside autograd (never scaled in place, not even for a moment)."""
        one_class = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        with _weighting(g, weights, g_shared) as gw:
            return {k: v[0] * scale for k, v in self.class_sums(m, x, gw, one_class, 1, chunk_size).items()}

    def class_sums(self, m, x, g, labels, num_classes, chunk_size=None) -> dict[str, torch.Tensor]:
        out = {}
        for s in _sample_chunks(m, x, chunk_size):
            for name, grad in self.materialize(m, x[s], g[s]).items():
                if name not in out:
                    out[name] = grad.new_zeros((num_classes, *grad.shape[1:]), dtype=acc_dtype(grad))
                out[name].index_add_(0, labels[s], acc(grad))
        return out


@contextlib.contextmanager
def _weighting(g: torch.Tensor, weights: torch.Tensor | None, g_shared: bool = False):
    """The captured output gradient ``g [B, ...]`` with sample i's entries scaled by ``weights[i]``
    while the block runs: ``g`` itself where no weights, scaled in place where that is safe (see
    :func:`_rows_scaled_in_place`), else a reweighted copy."""
    if weights is None:
        yield g
        return
    with _rows_scaled_in_place(g, weights, g, g_shared) as scaled:
        yield g if scaled else g * weights.to(g.dtype).view(-1, *[1] * (g.dim() - 1))


_UNDOABLE = (2.0 ** -60, 2.0 ** 60)  # weights an in-place scaling may take and divide back


@contextlib.contextmanager
def _rows_scaled_in_place(t: torch.Tensor, weights: torch.Tensor, captured: torch.Tensor,
                          captured_shared: bool = False):
    """While the block runs, sample i's entries of ``t`` (``[B, ...]``, or ``[B * T, ...]`` with each
    sample's T rows together) are multiplied by ``weights[i]``; after it, where ``t`` shares memory with
    the ``captured`` output gradient, they are divided back (``g * w / w``: within an ulp), so a weighted
    sum needs no reweighted copy of an activation-sized tensor. Yields False and changes nothing where
    that is not safe: off the CPU (the checks would wait on a device), ``t`` not contiguous (entries
    sharing memory) or in a graph, a captured tensor in half precision (an ulp of bf16 is 0.4%) or
    held outside autograd too (``captured_shared``: the user's own tensor), or a weight outside
    ``[2^-60, 2^60]`` (zero, negative, infinite or NaN: the division could not undo it)."""
    shared = t.untyped_storage().data_ptr() == captured.untyped_storage().data_ptr()
    ok = t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad and t.numel() > 0
    w = weights.to(t.dtype)
    if ok and shared:  # the division must put g back, and nobody else may see it scaled
        ok = t.dtype in (torch.float32, torch.float64) and not captured_shared
        if ok:  # within 2^+-60 neither g * w nor its division leaves the normal range for any g that
            # is not already negligible (NaN compares false)
            low, high = torch.aminmax(w)
            ok = _UNDOABLE[0] <= low.item() and high.item() <= _UNDOABLE[1]
    if not ok:
        yield False
        return
    rows = t.view(weights.shape[0], -1)
    w = w[:, None]
    rows.mul_(w)
    try:
        yield True
    finally:
        if shared:
            rows.div_(w)


def _class_rows(labels, num_classes):
    """(class, sample indices) for each class present in labels."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    start = 0
    for c, n in enumerate(counts):
        if n:
            yield c, order[start:start + n]
        start += n


def own_numel(m: nn.Module) -> int:
    """The number of entries of a module's own parameters (read from ``_parameters``: the public
    iterator costs tens of microseconds per call, paid per layer on every step of a training loop)."""
    return sum(p.numel() for p in m._parameters.values() if p is not None)


def _sample_chunks(m, x, chunk_size):
    numel = own_numel(m)
    return chunks(x.shape[0], rows_per_chunk(x.shape[0], 4 * numel, chunk_size))


class LinearRule(Rule):
    """nn.Linear over any leading dims: A [B, T, d], G [B, T, p]."""

    @staticmethod
    def _btd(m, x, g):
        B = x.shape[0]
        return x.reshape(B, -1, m.in_features), g.reshape(B, -1, m.out_features)

    @staticmethod
    def _rows(m, x, g):
        """``(A [B*T, d], G [B*T, p], T)``: every (sample, position) row, sample by sample; a
        ``[B, d]`` call as it is (no reshapes to dispatch on every step of a training loop)."""
        if x.dim() == 2 and g.dim() == 2:
            return x, g, 1
        A, G = x.reshape(-1, m.in_features), g.reshape(-1, m.out_features)
        return A, G, A.shape[0] // max(x.shape[0], 1)

    def materialize(self, m, x, g, out=None):
        A, G = self._btd(m, x, g)
        buf = None if out is None else out.get("weight")
        res = {"weight": psg_linear(A, G, out=None if buf is None else buf.view(A.shape[0], *m.weight.shape))}
        if m.bias is not None:
            res["bias"] = G.sum(1)
        return res

    def sq_norms(self, m, x, g, chunk_size=None):
        A, G, T = self._rows(m, x, g)
        if T == 1 and A.device.type == "cpu":
            # ||g a^T||^2 = ||a||^2 ||g||^2 and the bias's ||g||^2: two reductions without a squared
            # copy (on a CPU the copies' fresh pages cost more than the sums: 1.1 ms of the MLP's
            # clipped step)
            g_sq = torch.linalg.vector_norm(acc(G), dim=1).square_()
            res = {"weight": torch.linalg.vector_norm(acc(A), dim=1).square_().mul_(g_sq)}
            if m.bias is not None:
                res["bias"] = g_sq
            return res
        A, G = self._btd(m, x, g)
        res = {"weight": psg_linear_sqnorm(A, G, chunk_size)}
        if m.bias is not None:
            res["bias"] = acc(G).sum(1).square().sum(1)
        return res

    def norms_materialize(self, m, x, g):
        T = self._rows(m, x, g)[2]
        return T > 1 and not gram_is_cheaper(T, m.in_features, m.out_features)

    def batch_sum(self, m, x, g, chunk_size=None, out=None, scale: float = 1.0, weights=None, g_shared=False):
        # one GEMM over all (sample, t) rows, as the layer's own weight gradient (into out's .grad
        # where it is offered in the accumulation dtype: no second weight-sized tensor), scaled by
        # the GEMM itself (alpha) rather than a pass over its result
        A, G, T = self._rows(m, x, g)
        A, G = acc(A), acc(G)
        buf = None if out is None else out.get("weight")
        if buf is None or buf.dtype != A.dtype or not buf.is_contiguous():
            buf = A.new_empty((m.out_features, m.in_features))
        if weights is None:
            res = {"weight": torch.addmm(buf, G.T, A, beta=0, alpha=scale, out=buf)}
            if m.bias is not None:
                res["bias"] = G.sum(0) if scale == 1.0 else G.sum(0).mul_(scale)
            return res
        res = {"weight": buf}
        with _rows_scaled_in_place(G, weights, g, g_shared) as scaled:
            if scaled:  # one GEMM, as the layer's own weight gradient (8 column blocks cost the MLP's
                # clipped step 0.5 ms on this CPU)
                torch.addmm(buf, G.T, A, beta=0, alpha=scale, out=buf)
                if m.bias is not None:
                    res["bias"] = G.sum(0) if scale == 1.0 else G.sum(0).mul_(scale)
                return res
        # G reweighted an eighth of its columns at a time, each block's rows of the weight gradient
        # one GEMM over all rows: a clipped step holds every layer's A and G already, and a
        # reweighted copy of a whole G would add to that peak (row blocks would instead pass over
        # the whole weight gradient once per block)
        w = weights.to(A.dtype)
        w = w.repeat_interleave(T) if T > 1 else w
        step = max(16, -(-G.shape[1] // 8))
        for j in range(0, G.shape[1], step):
            block = buf[j:j + step]
            torch.addmm(block, (G[:, j:j + step] * w[:, None]).T, A, beta=0, alpha=scale, out=block)
        if m.bias is not None:
            res["bias"] = torch.mv(G.T, w).mul_(scale) if scale != 1.0 else torch.mv(G.T, w)
        return res

    def class_sums(self, m, x, g, labels, num_classes, chunk_size=None):
        # per class one GEMM over all (sample, t) rows: B T d p flops, no [B, p, d]
        A, G = self._btd(m, x, g)
        W = A.new_zeros((num_classes, m.out_features, m.in_features), dtype=acc_dtype(A))
        for c, rows in _class_rows(labels, num_classes):
            W[c] = psg_linear(acc(A[rows].reshape(1, -1, A.shape[2])), acc(G[rows].reshape(1, -1, G.shape[2])))[0]
        res = {"weight": W}
        if m.bias is not None:
            res["bias"] = G.new_zeros((num_classes, m.out_features), dtype=acc_dtype(G)).index_add_(
                0, labels, acc(G).sum(1))
        return res

    def dots(self, m, x, g, vectors, chunk_size=None):
        A, G = self._btd(m, x, g)
        total = 0
        if "weight" in vectors:
            total = total + psg_linear_dot(A, G, vectors["weight"].to(A.dtype), chunk_size)
        if "bias" in vectors:
            total = total + acc(G).sum(1) @ acc(vectors["bias"]).T
        return total


def _conv_padding(m, x):
    """(input, padding) with the module's padding made numeric: non-zero padding modes
    and asymmetric 'same' padding are applied to the input, the rest passed to the conv."""
    nd = x.dim() - 2
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0,) * nd
    if m.padding == "valid":
        return x, (0,) * nd
    if m.padding == "same":
        totals = [dil * (k - 1) for k, dil in zip(m.kernel_size, m.dilation)]
        if all(t % 2 == 0 for t in totals):
            return x, tuple(t // 2 for t in totals)
        pads = []
        for t in reversed(totals):
            pads += [t // 2, t - t // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(m.padding)


def _conv_patches(m, x):
    """Input patches ``[B, groups, L, C_in/groups * prod(kernel)]`` (Conv1d as height-1 2d)."""
    x, padding = _conv_padding(m, x)
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if x.dim() == 3:
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    B = x.shape[0]
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride, padding=padding)  # [B, C*k, L]
    gr = m.groups
    return cols.view(B, gr, cols.shape[1] // gr, cols.shape[2]).transpose(2, 3)


def _conv_weight_grad(m, x, g, groups_per_sample: bool = True, out=None):
    """Weight gradient of a conv from input x and output gradient g: per sample
    ``[B, *weight.shape]`` (``per_sample_conv``), or with ``groups_per_sample=False`` the
    ordinary sum over the batch."""
    x, padding = _conv_padding(m, x)
    if groups_per_sample:
        return conv_weight_grads(x, g, m.weight.shape, m.stride, padding, m.dilation, m.groups, out=out)
    weight_like = torch.empty(m.weight.shape, dtype=g.dtype, device=g.device)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g, x.to(g.dtype), weight_like, None, m.stride, padding, m.dilation, False, (0,) * (x.dim() - 2), m.groups,
        (False, True, False))
    return grad_w


class ConvRule(Rule):
    """nn.Conv1d / nn.Conv2d (groups, stride, dilation, padding).

    Materialized gradients come from ``per_sample_conv`` (a Triton implicit GEMM on a GPU,
    one batch-as-groups convolution backward otherwise);
    norms use the Gram form over patches when it costs fewer flops (small maps, wide
    layers), else chunks of materialized gradients.
    """

    def materialize(self, m, x, g, out=None):
        res = {"weight": _conv_weight_grad(m, x, g, out=None if out is None else out.get("weight"))}
        if m.bias is not None:
            res["bias"] = g.flatten(2).sum(2)
        return res

    def sq_norms(self, m, x, g, chunk_size=None):
        B = x.shape[0]
        L = g[0, 0].numel()
        dg, pg = m.weight[0].numel(), m.out_channels // m.groups
        if gram_is_cheaper(L, dg, pg):
            A = _conv_patches(m, x)
            G = g.reshape(B, m.groups, pg, L).transpose(2, 3)
            w = psg_linear_sqnorm(A.reshape(B * m.groups, L, dg), G.reshape(B * m.groups, L, pg), chunk_size)
            w = w.view(B, m.groups).sum(1)
        else:  # the fused kernel on a GPU, else chunks of materialized gradients
            xp, padding = _conv_padding(m, x)  # once, for either path
            geometry = (m.weight.shape, m.stride, padding, m.dilation, m.groups)
            w = conv_weight_sqnorms(xp, g, *geometry)
            if w is None:
                w = torch.empty(B, dtype=acc_dtype(g), device=g.device)
                for s in chunks(B, rows_per_chunk(B, 4 * m.weight.numel(), chunk_size)):
                    w[s] = acc(conv_weight_grads(xp[s], g[s], *geometry).flatten(1)).square().sum(1)
        res = {"weight": w}
        if m.bias is not None:
            res["bias"] = acc(g.flatten(2)).sum(2).square().sum(1)
        return res

    def norms_materialize(self, m, x, g):
        L, dg, pg = g[0, 0].numel(), m.weight[0].numel(), m.out_channels // m.groups
        return not gram_is_cheaper(L, dg, pg) and not per_sample_conv._use_kernel(x, g, m.groups)

    def dots(self, m, x, g, vectors, chunk_size=None):
        # one vector: <G_i^T A_i, V> = sum over output positions of g_i * conv(x_i, V), the layer's
        # own convolution with V as its weight (B L d p flops, as materializing, without [B, *shape]);
        # several vectors: materialize a chunk once and take K dots (K convolutions would cost K x)
        V = vectors.get("weight")
        if V is not None and V.shape[0] != 1:
            return super().dots(m, x, g, vectors, chunk_size)
        total = 0
        if V is not None:
            xp, padding = _conv_padding(m, x)
            conv = F.conv1d if x.dim() == 3 else F.conv2d
            out = conv(acc(xp), acc(V[0]), None, m.stride, padding, m.dilation, m.groups)
            total = (out * acc(g)).flatten(1).sum(1, keepdim=True)
        if "bias" in vectors:
            total = total + acc(g.flatten(2)).sum(2) @ acc(vectors["bias"]).T
        return total

    def batch_sum(self, m, x, g, chunk_size=None, out=None, scale: float = 1.0, weights=None, g_shared=False):
        # one convolution backward for the weight, as the layer's own weight gradient
        with _weighting(g, weights, g_shared) as gw:
            res = {"weight": acc(_conv_weight_grad(m, x, gw, groups_per_sample=False))}
            if m.bias is not None:
                res["bias"] = acc(gw.flatten(2)).sum((0, 2))
        if scale != 1.0:
            for t in res.values():
                t.mul_(scale)
        return res

    def class_sums(self, m, x, g, labels, num_classes, chunk_size=None):
        W = g.new_zeros((num_classes, *m.weight.shape), dtype=acc_dtype(g))
        for c, rows in _class_rows(labels, num_classes):
            W[c] = acc(_conv_weight_grad(m, x[rows], g[rows], groups_per_sample=False))
        res = {"weight": W}
        if m.bias is not None:
            res["bias"] = g.new_zeros((num_classes, m.out_channels), dtype=acc_dtype(g)).index_add_(
                0, labels, acc(g.flatten(2)).sum(2))
        return res


class EmbeddingRule(Rule):
    """nn.Embedding: indices [B, T] pick rows; padding_idx rows get no gradient."""

    def norms_materialize(self, m, x, g):
        return False  # norms from g . g over equal indices: [B, N, D] is never formed

    @staticmethod
    def _idx_grad(m, x, g):
        B = x.shape[0]
        idx = x.reshape(B, -1)
        G = g.reshape(B, idx.shape[1], m.embedding_dim)
        if m.padding_idx is not None:
            G = G.masked_fill((idx == m.padding_idx).unsqueeze(-1), 0)
        return idx, G

    def materialize(self, m, x, g, out=None):
        idx, G = self._idx_grad(m, x, g)
        B, N = idx.shape[0], m.num_embeddings
        out = torch.zeros(B * N, m.embedding_dim, dtype=G.dtype, device=G.device)
        rows = (idx + N * torch.arange(B, device=idx.device).unsqueeze(1)).reshape(-1)
        out.index_add_(0, rows, G.reshape(-1, m.embedding_dim))
        return {"weight": out.view(B, N, m.embedding_dim)}

    def sq_norms(self, m, x, g, chunk_size=None):
        # ||sum_t e_{idx_t} g_t^T||^2 = sum_{t,s: idx_t = idx_s} g_t . g_s  (B T^2 D, no B N D)
        idx, G = self._idx_grad(m, x, g)
        B, T = idx.shape
        out = torch.empty(B, dtype=acc_dtype(G), device=G.device)
        for s in chunks(B, rows_per_chunk(B, 8 * T * T, chunk_size)):
            gs = acc(G[s])
            same = idx[s].unsqueeze(2) == idx[s].unsqueeze(1)
            out[s] = (torch.bmm(gs, gs.transpose(1, 2)) * same).sum((1, 2))
        return {"weight": out}

    def class_sums(self, m, x, g, labels, num_classes, chunk_size=None):
        # scatter each (sample, t) row into row (class, idx) of [C * N, D]: never [B, N, D]
        idx, G = self._idx_grad(m, x, g)
        N, D = m.num_embeddings, m.embedding_dim
        out = G.new_zeros((num_classes * N, D), dtype=acc_dtype(G))
        out.index_add_(0, (idx + N * labels.unsqueeze(1)).reshape(-1), acc(G.reshape(-1, D)))
        return {"weight": out.view(num_classes, N, D)}

    def dots(self, m, x, g, vectors, chunk_size=None):
        # sum_t g_t . V_k[idx_t]: gather rows of V (B T K D), never [B, N, D]
        idx, G = self._idx_grad(m, x, g)
        V = acc(vectors["weight"])
        B, T = idx.shape
        K = V.shape[0]
        out = torch.empty(B, K, dtype=acc_dtype(G), device=G.device)
        for s in chunks(B, rows_per_chunk(B, 4 * T * K * m.embedding_dim, chunk_size)):
            rows = V[:, idx[s]]  # [K, b, T, D]
            out[s] = torch.einsum("kbtd,btd->bk", rows, acc(G[s]))
        return out


def _norm_chunks(x):
    """Chunks of samples for a norm layer's rule. On a CPU cache-sized (about 1 MB: no large
    temporary to fault in, and a chunk stays in cache across the ops on it); on a GPU chunks that
    small are launch-bound (128 of them at 32x32 x 128 channels doubled the ConvNet's per-sample
    gradient time on an H200): the memory budget."""
    B = x.shape[0]
    if x.is_cuda:
        return chunks(B, rows_per_chunk(B, 8 * x[0].numel()))
    return chunks(B, max(1, min(B, (1 << 18) // max(1, x[0].numel()))))


class _AffineNormRule(Rule):
    """Norm layers with per-channel (or per-feature) affine parameters: y = x_hat * w + b.

    grad_w = sum over non-parameter dims of g * x_hat, grad_b = sum of g; [B, C] is small,
    so norms and dots use the materialized form.
    """

    def x_hat(self, m, x):
        raise NotImplementedError

    def split(self, m, t):
        """View t [B, ...] as [B, C, S]: parameter entries C, summed positions S."""
        return t.reshape(t.shape[0], t.shape[1], -1)

    def unsplit(self, m, t):
        return t

    def materialize(self, m, x, g, out=None):
        res = {}
        if getattr(m, "weight", None) is not None:
            # x_hat a chunk of samples at a time (_norm_chunks), reduced by vecdot (einsum's batched
            # dot became a bmm of [B*C] 1 x S by S x 1 products, 3.4x slower at 32 channels x 28x28)
            parts = [torch.linalg.vecdot(self.split(m, acc(g[s])), self.split(m, self.x_hat(m, acc(x[s]))))
                     for s in _norm_chunks(x)]
            res["weight"] = self.unsplit(m, torch.cat(parts)).to(g.dtype)
        if getattr(m, "bias", None) is not None:
            res["bias"] = self.unsplit(m, self.split(m, acc(g)).sum(2)).to(g.dtype)
        return res


class LayerNormRule(_AffineNormRule):
    def x_hat(self, m, x):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def split(self, m, t):  # [B, ..., *normalized_shape] -> [B, prod(normalized_shape), positions]
        n = m.weight.numel() if m.weight is not None else m.bias.numel()
        return t.reshape(t.shape[0], -1, n).transpose(1, 2)

    def unsplit(self, m, t):
        return t.view(t.shape[0], *m.normalized_shape)


class _GroupStatsRule(_AffineNormRule):
    """Norms over groups of channels of each sample (GroupNorm; InstanceNorm on its own statistics).

    The weight gradient comes from each sample's group statistics instead of a recomputed x_hat:
    ``sum_s g (x - mu) r = r (sum_s g x - mu sum_s g)``, reduced by torch's own GroupNorm backward
    (so as exact as the layer's batch gradient) with the batch seen as one sample of ``B * C``
    channels; the statistics are the forward's where the engine captured them.
    """

    def groups(self, m) -> int | None:
        """Channels per statistic group, or None where the layer does not normalize per sample."""
        raise NotImplementedError

    def saved_stats(self, m, x, output):
        """The forward's own group statistics ``(mean, rstd)`` ``[B, groups]``, from the output's
        autograd node where torch's GroupNorm kernel made it in the accumulation dtype (fp32,
        float64); None elsewhere (the rule then recomputes them). Taken at forward time: the
        backward frees the node's saved tensors."""
        node = getattr(output, "grad_fn", None)
        if type(node).__name__ != "NativeGroupNormBackward0" or x.dtype != acc_dtype(x):
            return None
        try:
            return node._saved_result1.detach(), node._saved_result2.detach()
        except (AttributeError, RuntimeError):  # another torch's node layout: recompute
            return None

    def sq_norms(self, m, x, g, chunk_size=None, stats=None):
        # [B, C] per-sample gradients are small: formed whole (materialize chunks its passes over x)
        return {k: acc(t.flatten(1)).square().sum(1) for k, t in self.materialize(m, x, g, stats=stats).items()}

    def materialize(self, m, x, g, out=None, stats=None):
        groups = self.groups(m)
        if groups is None or getattr(m, "weight", None) is None:
            return super().materialize(m, x, g, out)
        B, C = x.shape[0], x.shape[1]
        xs, gs = self.split(m, x), self.split(m, g)  # [B, C, S]
        # a batch in half precision is converted a chunk of samples at a time (no fp32 copy of the
        # whole activation and output gradient); an fp32/float64 one goes through in one pass
        converts = xs.dtype != acc_dtype(xs) or gs.dtype != acc_dtype(gs)
        weight = xs.new_empty((B, C), dtype=acc_dtype(xs))
        bias = torch.empty_like(weight)
        for s in (_norm_chunks(x) if converts else [slice(0, B)]):
            xc, gc = acc(xs[s]), acc(gs[s])
            n, S = xc.shape[0], xc.shape[2]
            if stats is None:  # torch's own statistics kernel, a cache-sized chunk of samples at a time
                # (its normalized output is discarded; var_mean is 15x slower on a CPU)
                parts = [torch.native_group_norm(xc[c], None, None, xc[c].shape[0], C, S, groups, m.eps)[1:]
                         for c in (_norm_chunks(xc) if not converts else [slice(0, n)])]
                mean, rstd = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            else:
                mean, rstd = stats[0][s], stats[1][s]
            mean, rstd = mean.to(xc.dtype).reshape(1, n * groups), rstd.to(xc.dtype).reshape(1, n * groups)
            # torch's GroupNorm backward over the chunk seen as one sample of n*C channels in
            # n*groups groups: its weight and bias gradients are then each sample's own, from one
            # fused pass over x and g (3x faster on a CPU than a dot and a sum per chunk)
            _, w, bi = torch.ops.aten.native_group_norm_backward(
                gc.reshape(1, n * C, S), xc.reshape(1, n * C, S), mean, rstd, xc.new_ones(n * C), 1, n * C, S,
                n * groups, [False, True, True])
            weight[s], bias[s] = w.view(n, C), bi.view(n, C)
        res = {"weight": weight.to(g.dtype)}
        if getattr(m, "bias", None) is not None:
            res["bias"] = bias.to(g.dtype)
        return res


class GroupNormRule(_GroupStatsRule):
    def groups(self, m):
        return m.num_groups


class InstanceNormRule(_GroupStatsRule):
    def groups(self, m):
        use_input_stats = m.training or not m.track_running_stats
        return m.num_features if use_input_stats else None  # running statistics: x_hat from them

    def x_hat(self, m, x):  # only with running statistics: groups() serves the rest
        return F.instance_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


class BatchNormEvalRule(_AffineNormRule):
    """BatchNorm with running statistics (eval mode); batch statistics are rejected earlier."""

    def x_hat(self, m, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)


_RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.InstanceNorm1d: InstanceNormRule(),
    nn.InstanceNorm2d: InstanceNormRule(),
    nn.BatchNorm1d: BatchNormEvalRule(),
    nn.BatchNorm2d: BatchNormEvalRule(),
}


def rule_for(m: nn.Module) -> Rule | None:
    """The rule for module m, or None when m needs the torch.func fallback.

    Subclasses qualify only when they keep their base class's forward; a module whose
    forward was overridden (LoRA layers, quantized wrappers) goes to the fallback, and so does one
    whose own parameters are not its ``weight`` and ``bias`` (``torch.nn.utils.weight_norm`` keeps
    ``weight_g`` and ``weight_v`` and computes ``weight`` from them before each forward).
    """
    own = {k for k, p in m._parameters.items() if p is not None}
    for base in type(m).__mro__:
        rule = _RULES.get(base)
        if rule is not None:
            if type(m).forward is not base.forward or not own <= {"weight", "bias"}:
                return None
            if isinstance(m, nn.Embedding) and m.scale_grad_by_freq:
                return None  # the gradient depends on counts within the batch
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
                return None  # batch statistics: rejected by the engine's checks
            return rule
    return None


def uses_batch_statistics(m: nn.Module) -> bool:
    """Whether m normalizes with statistics of the whole batch (samples then interact)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.training or m.running_mean is None
    return False
