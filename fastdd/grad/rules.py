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

Rules default to norms and dots through chunked materialization; Linear, Conv and
Embedding override them with forms that never hold ``[B, *shape]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._chunking import chunks, rows_per_chunk
from .per_sample_linear import psg_linear, psg_linear_dot, psg_linear_sqnorm


class Rule:
    """Base rule: norms and dots from chunked materialization."""

    def materialize(self, m, x, g, out=None) -> dict[str, torch.Tensor]:
        """Per-sample gradients; ``out`` may offer buffers ``{name: [B, *shape]}`` to write into."""
        raise NotImplementedError

    def sq_norms(self, m, x, g, chunk_size=None) -> dict[str, torch.Tensor]:
        out = {}
        for s in _sample_chunks(m, x, chunk_size):
            for name, grad in self.materialize(m, x[s], g[s]).items():
                out.setdefault(name, []).append(grad.flatten(1).float().square().sum(1))
        return {name: torch.cat(parts) for name, parts in out.items()}

    def dots(self, m, x, g, vectors, chunk_size=None) -> torch.Tensor:
        parts = []
        for s in _sample_chunks(m, x, chunk_size):
            grads = self.materialize(m, x[s], g[s])
            parts.append(sum(grads[n].flatten(1).float() @ v.flatten(1).float().T for n, v in vectors.items()))
        return torch.cat(parts)

    def class_sums(self, m, x, g, labels, num_classes, chunk_size=None) -> dict[str, torch.Tensor]:
        out = {}
        for s in _sample_chunks(m, x, chunk_size):
            for name, grad in self.materialize(m, x[s], g[s]).items():
                if name not in out:
                    out[name] = grad.new_zeros((num_classes, *grad.shape[1:]), dtype=torch.float32)
                out[name].index_add_(0, labels[s], grad.float())
        return out


def _class_rows(labels, num_classes):
    """(class, sample indices) for each class present in labels."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    start = 0
    for c, n in enumerate(counts):
        if n:
            yield c, order[start:start + n]
        start += n


def _sample_chunks(m, x, chunk_size):
    numel = sum(p.numel() for p in m.parameters(recurse=False))
    return chunks(x.shape[0], rows_per_chunk(x.shape[0], 4 * numel, chunk_size))


class LinearRule(Rule):
    """nn.Linear over any leading dims: A [B, T, d], G [B, T, p]."""

    @staticmethod
    def _btd(m, x, g):
        B = x.shape[0]
        return x.reshape(B, -1, m.in_features), g.reshape(B, -1, m.out_features)

    def materialize(self, m, x, g, out=None):
        A, G = self._btd(m, x, g)
        buf = None if out is None else out.get("weight")
        res = {"weight": psg_linear(A, G, out=None if buf is None else buf.view(A.shape[0], *m.weight.shape))}
        if m.bias is not None:
            res["bias"] = G.sum(1)
        return res

    def sq_norms(self, m, x, g, chunk_size=None):
        A, G = self._btd(m, x, g)
        res = {"weight": psg_linear_sqnorm(A, G, chunk_size)}
        if m.bias is not None:
            res["bias"] = G.float().sum(1).square().sum(1)
        return res

    def class_sums(self, m, x, g, labels, num_classes, chunk_size=None):
        # per class one GEMM over all (sample, t) rows: B T d p flops, no [B, p, d]
        A, G = self._btd(m, x, g)
        W = A.new_zeros((num_classes, m.out_features, m.in_features), dtype=torch.float32)
        for c, rows in _class_rows(labels, num_classes):
            W[c] = psg_linear(A[rows].reshape(1, -1, A.shape[2]).float(), G[rows].reshape(1, -1, G.shape[2]).float())[0]
        res = {"weight": W}
        if m.bias is not None:
            res["bias"] = G.new_zeros((num_classes, m.out_features), dtype=torch.float32).index_add_(
                0, labels, G.float().sum(1))
        return res

    def dots(self, m, x, g, vectors, chunk_size=None):
        A, G = self._btd(m, x, g)
        total = 0
        if "weight" in vectors:
            total = total + psg_linear_dot(A, G, vectors["weight"].to(A.dtype), chunk_size)
        if "bias" in vectors:
            total = total + G.float().sum(1) @ vectors["bias"].float().T
        return total


def _conv_patches(m, x):
    """Input patches ``[B, groups, L, C_in/groups * prod(kernel)]`` and the 2d view of m.

    Conv1d runs as a 2d conv of height 1; padding (numeric, 'same', 'valid' or a
    non-zero padding_mode) is applied explicitly so that ``F.unfold`` sees none.
    """
    nd = x.dim() - 2
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if m.padding_mode != "zeros":
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
    elif isinstance(m.padding, str):
        if m.padding == "same":
            pads = []
            for k, dil in zip(reversed(kernel), reversed(dilation)):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
    elif any(m.padding):
        x = F.pad(x, [p for p in reversed(m.padding) for _ in range(2)])
    if nd == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    B, C = x.shape[:2]
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [B, C*k, L]
    gr = m.groups
    return cols.view(B, gr, cols.shape[1] // gr, cols.shape[2]).transpose(2, 3)


class ConvRule(Rule):
    """nn.Conv1d / nn.Conv2d (groups, stride, dilation, padding): a grouped Linear over patches."""

    @staticmethod
    def _pairs(m, x, g):
        A = _conv_patches(m, x)  # [B, gr, L, dg]
        B, gr, L, dg = A.shape
        G = g.reshape(B, gr, m.out_channels // gr, L).transpose(2, 3)  # [B, gr, L, pg]
        return A.reshape(B * gr, L, dg), G.reshape(B * gr, L, -1), B, gr

    def materialize(self, m, x, g, out=None):
        A, G, B, gr = self._pairs(m, x, g)
        buf = None if out is None else out.get("weight")
        if buf is not None:
            buf = buf.view(B * gr, G.shape[2], A.shape[2])
        res = {"weight": psg_linear(A, G, out=buf).view(B, *m.weight.shape)}
        if m.bias is not None:
            res["bias"] = g.flatten(2).sum(2)
        return res

    def sq_norms(self, m, x, g, chunk_size=None):
        A, G, B, gr = self._pairs(m, x, g)
        res = {"weight": psg_linear_sqnorm(A, G, chunk_size).view(B, gr).sum(1)}
        if m.bias is not None:
            res["bias"] = g.flatten(2).float().sum(2).square().sum(1)
        return res

    def class_sums(self, m, x, g, labels, num_classes, chunk_size=None):
        A, G, B, gr = self._pairs(m, x, g)
        A, G = A.view(B, gr, *A.shape[1:]), G.view(B, gr, *G.shape[1:])
        W = A.new_zeros((num_classes, *m.weight.shape), dtype=torch.float32)
        for c, rows in _class_rows(labels, num_classes):
            a = A[rows].transpose(0, 1).reshape(gr, -1, A.shape[3]).float()  # [gr, n L, dg]
            gg = G[rows].transpose(0, 1).reshape(gr, -1, G.shape[3]).float()
            W[c] = psg_linear(a, gg).view(m.weight.shape)
        res = {"weight": W}
        if m.bias is not None:
            res["bias"] = g.new_zeros((num_classes, m.out_channels), dtype=torch.float32).index_add_(
                0, labels, g.flatten(2).float().sum(2))
        return res

    def dots(self, m, x, g, vectors, chunk_size=None):
        if m.groups > 1:  # each group has its own slice of V: dot materialized chunks
            return super().dots(m, x, g, vectors, chunk_size)
        A, G, B, _ = self._pairs(m, x, g)
        total = 0
        if "weight" in vectors:
            V = vectors["weight"]
            total = total + psg_linear_dot(A, G, V.reshape(V.shape[0], m.out_channels, -1).to(A.dtype), chunk_size)
        if "bias" in vectors:
            total = total + g.flatten(2).float().sum(2) @ vectors["bias"].float().T
        return total


class EmbeddingRule(Rule):
    """nn.Embedding: indices [B, T] pick rows; padding_idx rows get no gradient."""

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
        out = torch.empty(B, dtype=torch.float32, device=G.device)
        for s in chunks(B, rows_per_chunk(B, 8 * T * T, chunk_size)):
            gs = G[s].float()
            same = idx[s].unsqueeze(2) == idx[s].unsqueeze(1)
            out[s] = (torch.bmm(gs, gs.transpose(1, 2)) * same).sum((1, 2))
        return {"weight": out}

    def dots(self, m, x, g, vectors, chunk_size=None):
        # sum_t g_t . V_k[idx_t]: gather rows of V (B T K D), never [B, N, D]
        idx, G = self._idx_grad(m, x, g)
        V = vectors["weight"].float()
        B, T = idx.shape
        K = V.shape[0]
        out = torch.empty(B, K, dtype=torch.float32, device=G.device)
        for s in chunks(B, rows_per_chunk(B, 4 * T * K * m.embedding_dim, chunk_size)):
            rows = V[:, idx[s]]  # [K, b, T, D]
            out[s] = torch.einsum("kbtd,btd->bk", rows, G[s].float())
        return out


class _AffineNormRule(Rule):
    """Norm layers with per-channel (or per-feature) affine parameters: y = x_hat * w + b.

    grad_w = sum over non-parameter dims of g * x_hat, grad_b = sum of g; [B, C] is small,
    so norms and dots use the materialized form.
    """

    def x_hat(self, m, x):
        raise NotImplementedError

    def reduce(self, m, t):
        """Sum t [B, ...] down to [B, *param_shape]."""
        return t.flatten(2).sum(2) if t.dim() > 2 else t

    def materialize(self, m, x, g, out=None):
        res = {}
        if getattr(m, "weight", None) is not None:
            res["weight"] = self.reduce(m, g.float() * self.x_hat(m, x.float())).to(g.dtype)
        if getattr(m, "bias", None) is not None:
            res["bias"] = self.reduce(m, g.float()).to(g.dtype)
        return res


class LayerNormRule(_AffineNormRule):
    def x_hat(self, m, x):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def reduce(self, m, t):
        return t.reshape(t.shape[0], -1, *m.normalized_shape).sum(1)


class GroupNormRule(_AffineNormRule):
    def x_hat(self, m, x):
        return F.group_norm(x, m.num_groups, None, None, m.eps)


class InstanceNormRule(_AffineNormRule):
    def x_hat(self, m, x):
        use_input_stats = m.training or not m.track_running_stats
        return F.instance_norm(x, m.running_mean, m.running_var, None, None, use_input_stats, 0.0, m.eps)


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
    forward was overridden (LoRA layers, quantized wrappers) goes to the fallback.
    """
    for base in type(m).__mro__:
        rule = _RULES.get(base)
        if rule is not None:
            if type(m).forward is not base.forward:
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
