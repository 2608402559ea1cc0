"""Random projections of per-sample gradients (DESIGN.md section 4): TRAK's dense JL and
LoGra's factorized projection, with matrices generated from a counter-based hash.

Every entry of every projection matrix is a Rademacher sign ``+-1`` computed from
``(seed, stream, row, column)`` by the murmur3 finalizer on 32-bit words, so the matrices
are the same on every backend (this torch path, the Triton kernels) and are never
stored by the kernels: a kernel computes the entries it needs in registers.

- ``kind="jl"``: one dense ``[P, dim]`` matrix R over the whole flattened gradient
  (parameters in the model's order); ``<R^T g_i, R^T g_j> -> g_i . g_j`` with error
  ``~ ||g_i|| ||g_j|| / sqrt(dim)``. Cost ``B P dim``: for small models and GPUs.
- ``kind="factorized"``: per Linear / Conv layer with weight ``[p, d]`` (bias: one more
  input column of ones), ``(G_i P_G)^T (A_i P_A)`` with ``P_A [d, k_a]``, ``P_G [p, k_g]``:
  ``B T (d k_a + p k_g) + B k_a k_g`` flops, never ``B d p``. ``k_g k_a`` is the smallest
  near-square product covering the layer's share of ``dim``; the first columns are kept
  and rescaled, which keeps inner products unbiased. A side that a square split would not
  shrink (a 10-class head's G) is kept exactly (identity) and the layer takes whole
  multiples of its size. On a T = 1 layer (rank-one gradients)
  the estimate is a product of two JL estimates of about ``sqrt(dim)`` dims each, so its error
  falls like ``dim^(-1/4)``, not ``dim^(-1/2)``: the price of never forming ``B d p``. Other
  layers get a dense block of their own.

The output dims are split evenly across layers, none given more than its gradient's size, and
what a layer with an exact side cannot use goes to the others; the few columns left over stay
zero (factorized). ``jl`` gives all of them to its one dense block. ``Projector`` holds the
layout; the engine's sources call it.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from .._chunking import budget_bytes, chunks, rows_per_chunk
from .per_sample_linear import acc

KINDS = ("factorized", "jl")
M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 constants
_GOLD, _COL = 0x9E3779B9, 0x632BE5AB


# --------------------------------------------------------------------------- the hash
def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``h * c mod 2^32`` for int64 ``h`` in [0, 2^32) without int64 overflow (two 16-bit halves)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    h &= M32
    h ^= h >> 16
    h = (h * _C1) & M32
    h ^= h >> 13
    h = (h * _C2) & M32
    return h ^ (h >> 16)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of one projection matrix (a seed and a stream id), computed on the host."""
    return _fmix32_int(_fmix32_int(seed * _GOLD + 0x27D4EB2F) ^ _fmix32_int(stream * _C2 + 0x165667B1))


def hash_signs(key: int, rows: torch.Tensor, cols: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Rademacher entries ``[len(rows), len(cols)]`` of the matrix with ``key``: the sign bit of
    ``fmix32(fmix32(row + key) ^ fmix32(col * GOLD + COL))``. Rows and cols are int64 indices."""
    r = fmix32((rows.to(torch.int64) + key) & M32)
    c = fmix32((_mul32(cols.to(torch.int64) & M32, _GOLD) + _COL) & M32)
    h = fmix32(r[:, None] ^ c[None, :])
    return (1 - 2 * (h >> 31)).to(dtype)


def hash_matrix(key: int, n_rows: int, n_cols: int, row0: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Rows ``row0 .. row0 + n_rows`` of the sign matrix with ``key``, ``[n_rows, n_cols]``."""
    rows = torch.arange(row0, row0 + n_rows, device=device)
    return hash_signs(key, rows, torch.arange(n_cols, device=device), dtype)


# --------------------------------------------------------------------------- layout
def _water_fill(total: int, caps: list[int]) -> list[int]:
    """An even split of ``total`` over slots capped at ``caps`` (what a slot cannot take goes to
    the others); sums to ``min(total, sum(caps))``."""
    share = [0] * len(caps)
    open_ = [i for i, c in enumerate(caps) if c > 0]
    left = total
    while left > 0 and open_:
        base, extra = divmod(left, len(open_))
        for j, i in enumerate(open_):
            give = min(caps[i] - share[i], base + (j < extra))
            share[i] += give
            left -= give
        open_ = [i for i in open_ if share[i] < caps[i]]
    return share


def factor_dims(share: int, p: int, d: int) -> tuple[int, int, bool, bool]:
    """``(k_g, k_a, id_g, id_a)`` for a ``[p, d]`` layer given ``share`` columns: both sides random
    and near-square (the first ``share`` of the ``k_g k_a`` products kept), or the side that a
    square split would not shrink (``sqrt(share) >= p``, or ``share / k_g >= d``) exact (identity),
    the other random with ``floor(share / size)`` columns. Uses ``k_g k_a`` (exact sides) or
    ``share`` (both random) columns."""
    if share >= p * d:
        return p, d, True, True
    k_g = max(1, math.isqrt(share))
    if k_g >= p:
        return p, max(1, share // p), True, False
    k_a = -(-share // k_g)
    if k_a >= d:
        return max(1, share // d), d, False, True
    return k_g, k_a, False, False


@dataclass
class Unit:
    """One block of output columns: a layer's parameters projected together.

    factorized: ``weight`` ``[p, d]`` (conv weights flattened past dim 0) and an optional bias
    as input column ``d`` (so ``d_aug = d + has_bias``); dense: the flattened parameters, row
    offsets ``rows[name]`` into the matrix with ``key``.
    """

    kind: str
    names: list[str]
    offset: int  # first output column
    dim: int  # output columns
    key: int = 0  # dense: the matrix's key
    rows: dict = field(default_factory=dict)  # dense: name -> first row of that parameter
    p: int = 0
    d: int = 0
    has_bias: bool = False
    k_g: int = 0
    k_a: int = 0
    key_a: int = 0
    key_g: int = 0
    id_g: bool = False  # P_G is the identity (k_g = p): the G side is kept exactly
    id_a: bool = False  # P_A is the identity (k_a = d + has_bias)

    @property
    def d_aug(self) -> int:
        return self.d + self.has_bias

    @property
    def scale(self) -> float:
        """Each output column is a sum of +-1-weighted gradient entries whose expected product
        over two samples is their inner product (dense: independent signs; factorized: products
        of an A-side and a G-side sign, uncorrelated across distinct entries), so ``1/sqrt(n)``,
        n the random columns per exact coordinate (``dim``, or ``k_a`` when G is exact, ...),
        makes ``<proj_i, proj_j>`` an unbiased estimate of ``g_i . g_j``."""
        exact = (self.p if self.id_g else 1) * (self.d_aug if self.id_a else 1)
        return 1.0 / math.sqrt(self.dim / exact)


class _Layer:
    """A module's selected parameters as one block of the factorized layout: a ``[p, d_aug]`` weight
    matrix (Linear / Conv weight, bias as input column ``d``) or a dense block."""

    def __init__(self, module: nn.Module, local: dict[str, str], selected: dict):
        self.factorized = _factorizable(module, local)
        self.names = [local[x] for x in ("weight", "bias") if x in local] if self.factorized else list(local.values())
        self.cap = sum(selected[n].numel() for n in self.names)  # more columns than entries: pointless
        if self.factorized:
            w = selected[local["weight"]]
            self.has_bias = "bias" in local
            self.p, self.d_aug = w.shape[0], w[0].numel() + self.has_bias

    def cols(self, share: int) -> int:
        """Columns this layer fills given ``share`` (an exact side takes whole multiples of its size)."""
        if not self.factorized or share == 0:
            return share
        k_g, k_a, id_g, id_a = factor_dims(share, self.p, self.d_aug)
        return k_g * k_a if (id_g or id_a) else share

    def flexible(self, share: int) -> bool:
        """Whether it takes any number of further columns (dense, or both sides random)."""
        if share >= self.cap:
            return False
        return not self.factorized or not any(factor_dims(max(share, 1), self.p, self.d_aug)[2:])


def _factorizable(module: nn.Module, local: dict[str, str]) -> bool:
    """A Linear or Conv whose weight is selected (bias optional): a [p, d] weight matrix."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and "weight" in local \
        and set(local) <= {"weight", "bias"}


class Projector:
    """The projection of a model's selected parameters to ``dim`` columns (see the module doc).

    Built from the parameter layout only (names, shapes, owning module types), ``kind`` and
    ``seed``: two models of the same architecture get the same matrices, and one projector
    serves both (it holds no reference to a model).
    """

    def __init__(self, model: nn.Module, selected: dict[str, nn.Parameter], dim: int, kind: str = "factorized",
                 seed: int = 0):
        self.dim, self.kind, self.seed = dim, kind, seed
        self.units: list[Unit] = []
        self.unit_of: dict[str, Unit] = {}  # full parameter name -> its unit (no module is held)
        self._cache: OrderedDict = OrderedDict()
        if kind == "jl":
            rows, r0 = {}, 0
            for n, p in selected.items():
                rows[n], r0 = r0, r0 + p.numel()
            self._add(Unit("dense", list(selected), 0, dim, key=stream_key(seed, 0), rows=rows))
            self.used_dim = dim
            return
        layers = [_Layer(module, local, selected) for module, local in _owner_groups(model, selected)]
        shares = _water_fill(dim, [ly.cap for ly in layers])
        # a factorized layer with an exact side takes whole multiples of that side's size; what it
        # leaves goes to layers that take any number of columns (both sides random, or dense)
        for _ in range(8):
            used = [ly.cols(sh) for ly, sh in zip(layers, shares)]
            left = sum(shares) - sum(used)
            takers = [i for i, ly in enumerate(layers) if ly.flexible(shares[i])]
            if not left or not takers:
                break
            shares = used
            for i, extra in zip(takers, _water_fill(left, [layers[i].cap - used[i] for i in takers])):
                shares[i] += extra
        offset = 0
        for i, (ly, sh) in enumerate(zip(layers, shares)):
            if sh == 0:
                continue
            if ly.factorized:
                k_g, k_a, id_g, id_a = factor_dims(sh, ly.p, ly.d_aug)
                u = Unit("factorized", ly.names, offset, ly.cols(sh), p=ly.p, d=ly.d_aug - ly.has_bias,
                         has_bias=ly.has_bias, k_g=k_g, k_a=k_a, key_a=stream_key(seed, 2 * i + 1),
                         key_g=stream_key(seed, 2 * i + 2), id_g=id_g, id_a=id_a)
            else:
                rows, r0 = {}, 0
                for n in ly.names:
                    rows[n], r0 = r0, r0 + selected[n].numel()
                u = Unit("dense", ly.names, offset, sh, key=stream_key(seed, 2 * i + 1), rows=rows)
            self._add(u)
            offset += u.dim
        # columns no layer could fill exactly stay zero (fewer than one exact side's size)
        self.used_dim = offset

    def _add(self, unit: Unit):
        self.units.append(unit)
        for n in unit.names:
            self.unit_of[n] = unit

    # -- matrices (generated once per projector, small for factorized units)
    def _matrix(self, key: int, n_rows: int, n_cols: int, row0: int, dtype, device) -> torch.Tensor:
        """Rows of a sign matrix, cached (oldest dropped first) within four chunk budgets."""
        ck = (key, n_rows, n_cols, row0, dtype, str(device))
        m = self._cache.get(ck)
        if m is None:
            m = hash_matrix(key, n_rows, n_cols, row0, dtype, device)
            self._cache[ck] = m
            # up to 4 chunk budgets (1 GB by default): a TRAK-sized R is generated once, not per batch
            while sum(t.numel() * t.element_size() for t in self._cache.values()) > 4 * budget_bytes() \
                    and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return m

    def factors(self, u: Unit, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_A [d + has_bias, k_a]`` and ``P_G [p, k_g]`` of a factorized unit (signs, or the
        identity on an exact side)."""
        P_A = torch.eye(u.d_aug, dtype=dtype, device=device) if u.id_a else \
            self._matrix(u.key_a, u.d_aug, u.k_a, 0, dtype, device)
        P_G = torch.eye(u.p, dtype=dtype, device=device) if u.id_g else \
            self._matrix(u.key_g, u.p, u.k_g, 0, dtype, device)
        return P_A, P_G

    # -- the general path: project materialized per-sample gradients
    def project_grads(self, grads: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Add the projections of materialized per-sample gradients ``{name: [b, *shape]}``
        to ``out [b, dim]`` (names may be any subset; missing ones count as zero)."""
        b = out.shape[0]
        for u in {id(self.unit_of[n]): self.unit_of[n] for n in grads if n in self.unit_of}.values():
            cols = slice(u.offset, u.offset + u.dim)
            dt = out.dtype
            if u.kind == "factorized":
                P_A, P_G = self.factors(u, dt, out.device)
                W = grads.get(u.names[0])
                W = torch.zeros(b, u.p, u.d, dtype=dt, device=out.device) if W is None else acc(W).reshape(b, u.p, u.d)
                F_ = (P_G.T @ W) @ P_A[:u.d]  # [b, k_g, k_a]
                if u.has_bias and u.names[1] in grads:
                    F_ = F_ + (acc(grads[u.names[1]]) @ P_G)[:, :, None] * P_A[u.d][None, None, :]
                out[:, cols] += F_.reshape(b, -1)[:, :u.dim] * u.scale
            else:
                for n in u.names:
                    if n not in grads:
                        continue
                    flat = acc(grads[n]).reshape(b, -1)
                    # row blocks of R sized to the chunk budget: never all of [numel, dim] at once
                    step = rows_per_chunk(flat.shape[1], 4 * u.dim)
                    for s in chunks(flat.shape[1], step):
                        R = self._matrix(u.key, s.stop - s.start, u.dim, u.rows[n] + s.start, dt, out.device)
                        out[:, cols] += (flat[:, s] @ R) * u.scale
        return out

    # -- the fast path: a factorized Linear/Conv layer from its captured input and output gradient
    def project_layer(self, module: nn.Module, local: dict[str, str], x: torch.Tensor, g: torch.Tensor,
                      out: torch.Tensor, scale: float = 1.0) -> bool:
        """Add ``scale`` times a layer's projections, from its input ``x`` and output gradient
        ``g``, to ``out [B, dim]`` without forming per-sample gradients in memory: factorized
        Linear and (one-group) Conv units, and Linear layers of the dense JL matrix on a GPU
        (the fused kernel). ``local``: {local name: full name} of the parameters the caller
        serves. False where this path does not serve the layer: the caller then materializes."""
        u = self.unit_of.get(next(iter(local.values()))) if local else None
        if u is None:
            return False
        linear = isinstance(module, nn.Linear)
        if linear:
            B = x.shape[0]
            A, G = x.reshape(B, -1, module.in_features), g.reshape(B, -1, module.out_features)
        if u.kind == "dense":
            fused = linear and "weight" in local and x.dtype != torch.float64 \
                and _backend.pick(x.device, triton_first=True) != "torch"
            if not fused:
                return False
            row_b = u.rows[local["bias"]] if "bias" in local else None
            out[:, u.offset:u.offset + u.dim] += scale * jl_linear(A, G, u.key, u.rows[local["weight"]], row_b, u.dim)
            return True
        # a factorized unit: this call must serve all of it, as the layer it was laid out for
        if set(u.names) != set(local.values()) or local.get("weight") != u.names[0]:
            return False
        if linear and (module.out_features, module.in_features) == (u.p, u.d):
            out[:, u.offset:u.offset + u.dim] += scale * factorized_linear(A, G, u, self, out.dtype)
            return True
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and module.weight[0].numel() == u.d:
            return self._project_conv(module, x, g, u, out, scale)
        return False

    def _project_conv(self, m, x, g, u: Unit, out, scale: float) -> bool:
        from .rules import _conv_padding

        dt = out.dtype
        P_A, P_G = self.factors(u, dt, out.device)
        xp, padding = _conv_padding(m, x)
        # A_i P_A for every position is a convolution of x with the k_a columns of P_A as
        # filters: [B, k_a, L] without unfolding the patches
        filt = P_A[:u.d].T.reshape(P_A.shape[1], *m.weight.shape[1:])
        conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
        AP = conv(xp.to(dt), filt, None, m.stride, padding, m.dilation).flatten(2)
        if u.has_bias:
            AP = AP + P_A[u.d].view(1, -1, 1)
        B = x.shape[0]
        GP = torch.matmul(P_G.T, acc(g).reshape(B, m.out_channels, -1))  # [B, k_g, L]
        Fm = torch.bmm(GP, AP.transpose(1, 2))  # [B, k_g, k_a]
        out[:, u.offset:u.offset + u.dim] += Fm.reshape(B, -1)[:, :u.dim] * (u.scale * scale)
        return True


def _owner_groups(model: nn.Module, selected: dict[str, nn.Parameter]) -> list[tuple[nn.Module, dict[str, str]]]:
    """(module, {local: full}) for each module owning selected parameters, in the order of the
    model's parameters; a parameter owned by two modules (tied) counts for the first."""
    by_id = {id(p): n for n, p in selected.items()}
    seen: set[str] = set()
    groups = []
    for _, m in model.named_modules():
        local = {}
        for ln, p in m.named_parameters(recurse=False):
            full = by_id.get(id(p))
            if full is not None and full not in seen:
                local[ln] = full
                seen.add(full)
        if local:
            groups.append((m, local))
    return groups


# --------------------------------------------------------------------------- Linear op (four layers)
def factorized_linear_ref(A: torch.Tensor, G: torch.Tensor, P_A: torch.Tensor, P_G: torch.Tensor, dim: int,
                          has_bias: bool, scale: float | None = None) -> torch.Tensor:
    """``vec((G_i P_G)^T (A_i [1]) P_A)[:dim] * scale`` (default ``1/sqrt(dim)``): A ``[B, T, d]``,
    G ``[B, T, p]``, P_A ``[d + has_bias, k_a]``, P_G ``[p, k_g]`` -> ``[B, dim]`` (accumulation dtype)."""
    A, G = acc(A), acc(G)
    d = A.shape[2]
    AP = A @ P_A[:d]
    if has_bias:
        AP = AP + P_A[d]
    GP = G @ P_G
    Fm = torch.bmm(GP.transpose(1, 2), AP)
    return Fm.reshape(A.shape[0], -1)[:, :dim] * (1 / math.sqrt(dim) if scale is None else scale)


def factorized_linear(A, G, u: Unit, proj: Projector, dtype) -> torch.Tensor:
    """The factorized projection of a Linear layer's per-sample gradients (dispatching): the
    Triton kernel for CUDA tensors (matrices generated in-kernel), else the torch path."""
    backend = "torch" if A.dtype == torch.float64 else _backend.pick(A.device, triton_first=True)
    if backend != "torch" and _backend.triton_available():
        from ..kernels.projection import factorized_linear_fwd

        return factorized_linear_fwd(A, G, u.key_a, u.key_g, u.k_a, u.k_g, u.dim, u.has_bias, u.scale,
                                     u.id_a, u.id_g).to(dtype)
    P_A, P_G = proj.factors(u, dtype, A.device)
    return factorized_linear_ref(A, G, P_A, P_G, u.dim, u.has_bias, u.scale)


def jl_linear_ref(A: torch.Tensor, G: torch.Tensor, key: int, row_w: int, row_b: int | None, dim: int,
                  chunk_size: int | None = None) -> torch.Tensor:
    """``[B, dim]``: ``(vec(G_i^T A_i) R[row_w:] + (sum_t G_i) R[row_b:]) / sqrt(dim)`` with R the
    sign matrix of ``key`` (bias rows only when ``row_b`` is given): chunks of materialized
    gradients times generated row blocks of R (the reference of the fused kernel)."""
    A, G = acc(A), acc(G)
    B, _, d = A.shape
    p = G.shape[2]
    out = torch.zeros(B, dim, dtype=A.dtype, device=A.device)
    R_w = hash_matrix(key, p * d, dim, row_w, A.dtype, A.device)
    for s in chunks(B, rows_per_chunk(B, 4 * p * d, chunk_size)):
        out[s] = torch.bmm(G[s].transpose(1, 2), A[s]).reshape(-1, p * d) @ R_w
    if row_b is not None:
        out += G.sum(1) @ hash_matrix(key, p, dim, row_b, A.dtype, A.device)
    return out / math.sqrt(dim)



def jl_linear(A, G, key: int, row_w: int, row_b: int | None, dim: int) -> torch.Tensor:
    """The dense JL projection of a Linear layer's per-sample gradients (dispatching): the fused
    Triton kernel for CUDA tensors (gradient tiles and R in registers), else the torch path."""
    backend = "torch" if A.dtype == torch.float64 else _backend.pick(A.device, triton_first=True)
    if backend != "torch" and _backend.triton_available():
        from ..kernels.projection import jl_linear_fwd

        return jl_linear_fwd(A, G, key, row_w, row_b, dim)
    return jl_linear_ref(A, G, key, row_w, row_b, dim)
