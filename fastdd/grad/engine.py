"""The per-sample gradient engine (DESIGN.md section 4).

One ordinary forward and backward with module hooks captures, for every call of a
module that owns selected parameters, its inputs and the gradient of the summed
per-sample losses with respect to its outputs (the gradient edge captured at forward
time, so later in-place ops do not disturb it). Each parameter is then served by:

- the hand-written rule of its module (``rules.py``), when it has one;
- ``torch.func`` otherwise: ``vmap`` over samples of a ``vjp`` through that module's
  own forward (``functional_call``), with the captured output gradient;
- the same ``vmap``/``vjp`` through the whole model, when the parameter is also used
  outside the forward of the module that owns it (tied weights used directly, say).
  A walk over the autograd graph counts each parameter's uses to find these.

The model is left as it was: hooks removed, ``.grad`` untouched, train/eval mode kept.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._chunking import budget_bytes, chunks, rows_per_chunk
from . import buffers
from .per_sample_linear import acc, acc_dtype
from .rules import LinearRule, Rule, _sample_chunks, own_numel, rule_for, uses_batch_statistics


# --------------------------------------------------------------------------- capture
def refuse_batch_statistics(named_modules, what: str = "per-sample gradients are") -> None:
    """Refuse a BatchNorm that normalizes with batch statistics: samples interact through them
    (and a forward in training mode would also update the running statistics)."""
    for name, m in named_modules:
        if uses_batch_statistics(m):
            raise ValueError(
                f"{type(m).__name__} '{name}' normalizes with batch statistics "
                f"({'training mode' if m.training else 'track_running_stats=False'}): "
                f"samples interact, so {what} undefined; call model.eval() "
                "or use GroupNorm/LayerNorm instead"
            )


@dataclass(eq=False)
class _Call:
    """One call of a hooked module during the captured forward."""

    module: nn.Module
    args: tuple
    kwargs: dict
    batch_size: int
    out_leaves: list  # the differentiable output tensors' positions in the flattened output
    edges: list  # GradientEdge of each differentiable output
    grads: list = field(default_factory=list)  # gradient at each edge (None: no gradient flowed)
    root_call: int = 0  # index of the root call this call belongs to
    out_shapes: list = field(default_factory=list)  # shape of each differentiable output
    input_nodes: set = field(default_factory=set)  # autograd nodes that produced the inputs (fallback modules)
    use_rule: bool = False  # served by the module's hand-written rule (else torch.func)
    formed: dict | None = None  # per-sample gradients formed in the backward (eager capture), unscaled
    params_lent: bool = False  # its parameters ran detached: the graph has no edges to them
    stats: tuple | None = None  # the forward's per-sample statistics a rule reuses (GroupNorm's mean, rstd)
    # the edges whose output gradient something outside autograd also held when it arrived (a tensor
    # the user passed to backward(gradient=...), or kept from a hook of theirs): a weighted sum must
    # then not scale it in place, even for a moment
    grads_shared: set = field(default_factory=set)

    @property
    def x(self) -> torch.Tensor:
        """The layer input: the first positional argument, or the first tensor keyword one."""
        if self.args:
            return self.args[0]
        return next(v for v in self.kwargs.values() if isinstance(v, torch.Tensor))


def _batch_size(args, kwargs) -> int | None:
    if not kwargs and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return args[0].shape[0]  # the common call, model(x), without a pytree walk (every step pays it)
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def batch_dim(module: nn.Module, shape, B: int, output: int | None = None) -> int | None:
    """The dim of a tensor of ``shape`` (None: not a tensor) that indexes the batch's samples
    (of size ``B``), or None if none does.

    Dim 0 as a rule, dim 1 where dim 0 is not the batch (sequence-first tensors, an RNN's
    hidden state ``[layers, B, H]``). Modules that say ``batch_first=False`` (RNNs,
    MultiheadAttention) put their batch at dim 1 even when dim 0 has the same size; an RNN's
    hidden-state outputs (``output`` index >= 1) always do.
    """
    if not shape:
        return None
    seq_first = getattr(module, "batch_first", True) is False
    if isinstance(module, nn.RNNBase) and output is not None and output >= 1:
        seq_first = True  # h_n / c_n: [layers * directions, B, H] whatever batch_first says
    for d in ((1, 0) if seq_first else (0, 1)):
        if d < len(shape) and shape[d] == B:
            return d
    return None


def _count_param_uses(roots: Iterable, stop: set, params: dict[int, str]) -> Counter:
    """How many graph edges reach each tracked parameter's AccumulateGrad from ``roots``.

    Walks ``next_functions`` without entering nodes in ``stop``; every use of a
    parameter by an op is one edge into its AccumulateGrad node.
    """
    uses: Counter = Counter()
    seen = set()
    stack = [n for n in roots if n is not None]
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in params:
                    uses[params[id(var)]] += 1
            else:
                stack.append(nxt)
    return uses


class _Attach(torch.autograd.Function):
    """Gives an output that no gradient would otherwise reach (a layer whose input needs none and
    whose parameters ran detached) a node of its own, so the capture still receives its output
    gradient; nothing flows further back. In place (``mark_dirty``): no copy, and the output
    stays an ordinary tensor that later in-place ops (``ReLU(inplace=True)``) may modify."""

    @staticmethod
    def forward(ctx, output, anchor):
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, grad):
        return None, None


_ANCHOR = torch.zeros((), requires_grad=True)  # _Attach's input that needs a gradient (never receives one)


class _Capture:
    """Hooks on a model that record module calls and their output gradients."""

    def __init__(self, model: nn.Module, selected: dict[str, nn.Parameter], grad_hooks: bool, eager: bool = False,
                 param_grads: bool = True):
        self.model = model
        self.selected = selected  # full name -> parameter
        self.grad_hooks = grad_hooks  # context mode: collect G with node pre-hooks
        self.eager = eager and grad_hooks  # form rule layers' per-sample gradients as each G arrives
        # context mode without parameter gradients: rule layers run with their selected parameters
        # detached, so the user's backward computes no weight gradient (a clipped step replaces them)
        self.lend = grad_hooks and not param_grads
        self._lent: dict[nn.Module, dict[str, torch.Tensor]] = {}  # module -> its parameters while lent
        self.active = True
        self.calls: list[_Call] = []
        self.root_calls: list[_Call] = []
        self.orphans: list[set[str]] = []  # per root call: names used outside their owners
        self.backward_seen = False
        self.batch: int | None = None  # the batch size of the forward being recorded
        self._handles = []
        # Owners: every (module, local name) holding a selected parameter, ties included.
        self.owned: dict[nn.Module, dict[str, str]] = {}
        self.module_names: dict[nn.Module, str] = {}
        by_id = {id(p): n for n, p in selected.items()}
        for mname, m in model.named_modules(remove_duplicate=False):
            self.module_names.setdefault(m, mname)
            for local, p in m.named_parameters(recurse=False, remove_duplicate=False):
                if id(p) in by_id:
                    self.owned.setdefault(m, {})[local] = by_id[id(p)]
        self.param_ids = by_id
        self.rules = {m: rule_for(m) for m in self.owned}
        self.batch_stat_modules = [
            (n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]

    def __enter__(self):
        if self.grad_hooks:
            _private_grad_refs()  # measured now: the backward's hooks compare against it
        for m in self.owned:
            if m is self.model:
                continue
            if self.lend and self.rules[m] is not None:
                self._handles.append(m.register_forward_pre_hook(self._lend_pre_hook))
                # always_call: the parameters go back even when the forward raises
                self._handles.append(m.register_forward_hook(self._lent_hook, with_kwargs=True, always_call=True))
            else:
                self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
        self._handles.append(self.model.register_forward_hook(self._root_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    # -- hooks
    def check_batch_statistics(self):
        refuse_batch_statistics(self.batch_stat_modules)

    def _root_pre_hook(self, module, args):
        if not (self.active and torch.is_grad_enabled()):
            return
        self.check_batch_statistics()
        if self.backward_seen:  # a new step in the user's loop: forget the last one
            self.clear()
        self.batch = _batch_size(args, {})  # the model's inputs are [B, ...]: every call's batch size

    def clear(self):
        self.calls.clear()
        self.root_calls.clear()
        self.orphans.clear()
        self.backward_seen = False

    def _record(self, module, args, kwargs, output) -> _Call | None:
        if not (self.active and torch.is_grad_enabled()):
            return None
        B = self.batch if self.batch is not None else _batch_size(args, kwargs)
        leaves = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
        pos = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if B is None or not pos:
            return None
        detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
        # a rule takes dim 0 of its input as the batch; a call that has it elsewhere (a
        # sequence-first Linear) goes to torch.func, which finds each tensor's batch dim
        in_leaves = list(args) if not kwargs and all(isinstance(a, torch.Tensor) for a in args) \
            else tree_flatten((args, kwargs))[0]  # (the common case without a pytree walk)
        first = next((t for t in in_leaves if isinstance(t, torch.Tensor)), None)
        rule = self.rules.get(module)
        use_rule = rule is not None and first is not None and first.dim() > 0 and first.shape[0] == B
        if not use_rule and not any(isinstance(t, torch.Tensor) and batch_dim(module, tuple(t.shape), B) is not None
                                    for t in in_leaves):
            # a call that sees no sample (a parametrization computing a weight): what it returns is
            # shared by every sample, so its parameters' uses count as uses outside their owner and
            # the whole model serves them
            return None
        input_nodes = set()
        if not use_rule:
            for leaf in in_leaves:
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    input_nodes.add(get_gradient_edge(leaf).node)
        call = _Call(
            module=module,
            args=tuple(detach(a) for a in args),
            kwargs={k: detach(v) for k, v in kwargs.items()},
            batch_size=B,
            out_leaves=pos,
            edges=[get_gradient_edge(leaves[i]) for i in pos],
            root_call=len(self.root_calls),
            out_shapes=[leaves[i].shape for i in pos],
            input_nodes=input_nodes,
            use_rule=use_rule,
        )
        call.grads = [None] * len(pos)
        if use_rule:
            call.stats = rule.saved_stats(module, first, output)
        if self.grad_hooks:
            for j, edge in enumerate(call.edges):
                edge.node.register_prehook(self._grad_catcher(call, j, edge.output_nr))
        self.calls.append(call)
        return call

    def _grad_catcher(self, call, j, output_nr):
        # the call weakly: it holds the node (its edges) that holds this hook, a reference cycle
        # that only Python's cyclic collector frees, at its own pace: in a training loop the
        # steps' calls and their activations piled up (RSS 747 -> 2136 MB over 1800 MLP steps)
        call_ref = weakref.ref(call)

        def hook(grad_outputs):
            call = call_ref()
            if call is None:  # a backward through a forward the capture has forgotten
                return
            g = grad_outputs[output_nr]
            if g is not None and sys.getrefcount(g) > _PRIVATE_GRAD_REFS:
                call.grads_shared.add(j)
            call.grads[j] = g
            self.backward_seen = True
            if self.eager and g is not None:
                self._form(call, g)

        return hook

    def _form(self, call: _Call, g: torch.Tensor) -> None:
        """Eager capture: where the rule forms a layer's per-sample gradients for its norms anyway
        (conv and norm layers on a CPU) and they fit the chunk budget, form them now, while G is
        fresh in cache, and let go of the layer's input and G: what a later consumer needs is then
        those gradients alone, not every layer's activations and output gradients at once."""
        m = call.module
        rule = self.rules.get(m)
        if call.formed is not None:  # a second backward through the same forward: its input is gone
            raise RuntimeError(
                f"a second backward reached '{self.module_names.get(m, type(m).__name__)}' through the same "
                "forward, whose per-sample gradients PerSampleGrads(eager=True) already formed and whose input "
                "it let go of; use PerSampleGrads(..., eager=False) to read statistics of repeated backwards")
        if not call.use_rule or rule is None or m is self.model or not _worth_forming(rule, m, call.x, g):
            return
        with torch.no_grad():
            call.formed = rule.materialize(m, call.x, g, **_stats_kw(call))
        call.args, call.kwargs, call.grads = (), {}, [None]

    def _hook(self, module, args, kwargs, output):
        self._record(module, args, kwargs, output)

    def _lend_pre_hook(self, module, args):
        if not (self.active and torch.is_grad_enabled()) or module in self._lent:
            return
        params = module._parameters
        lent = {k: params[k] for k in self.owned[module] if params.get(k) is not None}
        self._lent[module] = lent
        for k, p in lent.items():
            params[k] = p.detach()

    def _lent_hook(self, module, args, kwargs, output):
        lent = self._lent.pop(module, None)
        if lent is None:  # not lent (hooks paused, no grad mode, a nested call of the same module)
            if output is not None:
                self._record(module, args, kwargs, output)
            return None
        module._parameters.update(lent)
        if output is None:  # the forward raised (always_call): parameters are back, nothing to record
            return None
        if isinstance(output, torch.Tensor) and not output.requires_grad and output.is_floating_point():
            output = _Attach.apply(output.clone() if output._is_view() else output, _ANCHOR)
        call = self._record(module, args, kwargs, output)
        if call is not None:
            call.params_lent = True
        return output

    def _root_hook(self, module, args, kwargs, output):
        call = self._record(module, args, kwargs, output)
        if call is None:
            return
        call.root_call = len(self.root_calls)
        self.root_calls.append(call)
        self.orphans.append(self._find_orphans(call))

    def _find_orphans(self, root: _Call) -> set[str]:
        """Selected parameters with uses outside the hooked calls of their owners."""
        mine = [c for c in self.calls if c.root_call == root.root_call]
        total = _count_param_uses([e.node for e in root.edges], set(), self.param_ids)
        accounted: Counter = Counter()
        for c in mine:
            names = self.owned.get(c.module)
            if not names:
                continue
            if c.params_lent:  # ran detached: no edge to its parameters in the graph
                continue
            if c.use_rule:  # a rule module uses each parameter once
                accounted.update(set(names.values()))
            else:
                inside = _count_param_uses([e.node for e in c.edges], c.input_nodes, self.param_ids)
                accounted.update({n: inside[n] for n in set(names.values())})
        return {n for n, k in total.items() if k > accounted[n]}

    # -- backward (functional API)
    def backward(self, loss: torch.Tensor):
        edges = [e for c in self.calls for e in c.edges]
        grads = torch.autograd.grad(loss, edges, allow_unused=True)
        it = iter(grads)
        for c in self.calls:
            c.grads = [next(it) for _ in c.edges]
        self.backward_seen = True

    @contextlib.contextmanager
    def paused(self):
        """Hooks off: the fallback's functional calls must not be recorded."""
        self.active = False
        try:
            yield
        finally:
            self.active = True


# --------------------------------------------------------------------------- sources
class _RuleSource:
    """Parameters of one call of a module with a hand-written rule.

    ``scale`` multiplies the output gradient g (a mean-reduced loss divided it by B); every
    consumer is linear in g, so its results are scaled instead: a scaled copy of g would be a
    fresh activation-sized tensor per layer, and on a CPU faulting its pages in cost more
    than the rule itself (20 ms of the DC ConvNet's clipped step at 28x28).
    """

    def __init__(self, call: _Call, rule: Rule, names: dict[str, str], g: torch.Tensor | None, scale: float = 1.0,
                 shared: bool = False):
        self.call, self.rule, self.names, self.g = call, rule, names, g  # names: local -> full
        self.scale = scale
        self.shared = shared  # g is also held outside autograd: never scaled in place
        # per-sample gradients (unscaled) formed in the backward (eager capture) or for the norms
        # (sq_norms with keep): every consumer then reads them
        self.formed = None if call.formed is None else self._pick(call.formed)

    def _pick(self, res: dict, factor: float = 1.0) -> dict:
        return {self.names[k]: (v * factor if factor != 1.0 else v) for k, v in res.items() if k in self.names}

    def materialize(self, s=slice(None), out=None):
        if self.formed is not None:
            res = {}
            for f, t in self.formed.items():
                buf = None if out is None else out.get(f)
                res[f] = torch.mul(t[s], self.scale, out=buf) if buf is not None else t[s] * self.scale
            return res
        local_out = None if out is None else {k: out[f] for k, f in self.names.items() if f in out}
        res = self._pick(self.rule.materialize(self.call.module, self.call.x[s], self.g[s], out=local_out,
                                               **_stats_kw(self.call, s)))
        if self.scale != 1.0:
            for t in res.values():
                t.mul_(self.scale)  # fresh results of the rule (or the caller's out= buffers)
        return res

    def materialize_full(self, out=None, chunk_size=None):
        return self.materialize(out=out)

    def sq_norms(self, chunk_size, keep: bool = False):
        """Squared norms per parameter; with ``keep``, where the rule would form the per-sample
        gradients anyway and they fit the chunk budget, form them once and keep them for
        :meth:`weighted_sums` (a clipped sum then costs a tensordot, not a second backward)."""
        if self.formed is None:  # (formed in the backward, the layer's input is gone)
            m, x, g = self.call.module, self.call.x, self.g
            if not (keep and _worth_forming(self.rule, m, x, g)):
                return self._pick(self.rule.sq_norms(m, x, g, chunk_size, **_stats_kw(self.call)), self.scale ** 2)
            self.formed = self._pick(self.rule.materialize(m, x, g, **_stats_kw(self.call)))
        return {f: acc(t.flatten(1)).square().sum(1) * self.scale ** 2 for f, t in self.formed.items()}

    def dots(self, vectors, chunk_size):
        if self.formed is not None:
            return self.scale * sum(acc(t.flatten(1)) @ acc(vectors[f].flatten(1)).T
                                    for f, t in self.formed.items() if f in vectors)
        local = {k: vectors[f] for k, f in self.names.items() if f in vectors}
        res = self.rule.dots(self.call.module, self.call.x, self.g, local, chunk_size)
        return res * self.scale if self.scale != 1.0 else res

    def class_sums(self, labels, num_classes, chunk_size):
        if self.formed is not None:
            return {f: t.new_zeros((num_classes, *t.shape[1:]), dtype=acc_dtype(t)).index_add_(0, labels, acc(t))
                    * self.scale for f, t in self.formed.items()}
        res = self.rule.class_sums(self.call.module, self.call.x, self.g, labels, num_classes, chunk_size)
        return self._pick(res, self.scale)

    def project(self, proj, out, chunk_size):
        """Add this source's projected per-sample gradients to ``out [B, dim]`` (``proj``: a
        :class:`~fastdd.grad.projection.Projector`): from the captured input and output gradient
        where the projection has a layer path, else from chunks of materialized gradients."""
        if self.formed is not None:
            proj.project_grads({f: t * self.scale for f, t in self.formed.items()}, out)
            return
        if proj.project_layer(self.call.module, self.names, self.call.x, self.g, out, self.scale):
            return
        m = self.call.module
        for s in _sample_chunks(m, self.call.x, chunk_size):
            grads = self._pick(self.rule.materialize(m, self.call.x[s], self.g[s]), self.scale)
            proj.project_grads(grads, out[s])

    def mean_and_cross_dots(self, n: int):
        """For rows ``i < n`` (training) and the ``m`` rows after them (validation), in one pass over a
        Linear's captured ``[B, d]`` input A and output gradient G: ``({name: mean_{i<n} g_i}, [n]:
        mean_j <g_i, g_{n+j}>)``, the dots as ghost dot products ``(a_i . a_j + 1)(g_i . g_j)``
        (``n m (d + p)`` flops, no per-sample gradient); None for other layers."""
        if self.formed is not None or not isinstance(self.rule, LinearRule):
            return None
        A, G, T = LinearRule._rows(self.call.module, self.call.x, self.g)
        if T != 1:
            return None
        A, G = acc(A), acc(G)
        m = len(G) - n
        local = set(self.names)
        with torch.no_grad():
            grads = {}
            if "weight" in local:  # the layer's own weight gradient over the training rows, scaled by the GEMM
                grads["weight"] = torch.addmm(G.new_zeros(()), G[:n].T, A[:n], beta=0, alpha=self.scale / n)
            if "bias" in local:
                grads["bias"] = G[:n].sum(0).mul_(self.scale / n)
            K = G[:n] @ G[n:].T  # [n, m]: g_i . g_j
            if "weight" in local:  # (a_i . a_j + 1): weight and bias at once
                K.mul_(torch.addmm(A.new_ones(()) if "bias" in local else A.new_zeros(()), A[:n], A[n:].T))
            dots = K.sum(1).mul_(self.scale ** 2 / m)
        return self._pick(grads), dots

    def weighted_sums(self, weights, chunk_size, into=None):
        """``sum_i w_i g_i``: the rule's batch sum over the output gradient scaled per sample (the
        batch gradient of a reweighted loss, from the captured A and G: no per-sample gradient),
        written into ``into``'s tensors where the rule can."""
        with torch.no_grad():  # captured inputs can be part of the graph (a tied weight's use)
            if self.formed is not None:  # formed in the backward or for the norms (unscaled)
                return _weighted(self.formed, weights * self.scale)
            local = None if not into else {k: into[f] for k, f in self.names.items() if f in into}
            return self._pick(self.rule.batch_sum(self.call.module, self.call.x, self.g, chunk_size, out=local,
                                                  scale=self.scale, weights=weights, g_shared=self.shared))

    def row_sums(self, rows: slice, factor: float, chunk_size):
        """``factor * sum_{i in rows} g_i``: the rule's batch sum over those rows, scaled once
        (no reweighted copy of the output gradient)."""
        with torch.no_grad():
            if self.formed is not None:
                return {f: acc(t[rows]).sum(0) * (factor * self.scale) for f, t in self.formed.items()}
            return self._pick(self.rule.batch_sum(self.call.module, self.call.x[rows], self.g[rows], chunk_size,
                                                  scale=factor * self.scale))


def _private_grad_refs() -> int:
    """The Python references an output gradient that only autograd holds has inside a node
    pre-hook (the hook's argument tuple, its local, ``getrefcount``'s argument, the caller's),
    measured once on a gradient autograd made itself: this torch's count, whatever its version."""
    global _PRIVATE_GRAD_REFS
    if _PRIVATE_GRAD_REFS is None:
        counts = []

        def hook(grad_outputs):
            g = grad_outputs[0]
            counts.append(sys.getrefcount(g))

        try:
            with torch.inference_mode(False), torch.enable_grad():  # (entered under no_grad or inference_mode too)
                leaf = torch.ones(2, requires_grad=True)
                out = leaf * 2.0
                out.grad_fn.register_prehook(hook)
                (out * out).sum().backward()  # the gradient reaching out's node: a fresh product, autograd's own
            _PRIVATE_GRAD_REFS = counts[0]
        except Exception:  # a torch where this cannot be measured: every gradient counts as shared
            _PRIVATE_GRAD_REFS = 0  # (weighted sums then take the copy paths: slower, never wrong)
    return _PRIVATE_GRAD_REFS


_PRIVATE_GRAD_REFS: int | None = None


def _stats_kw(call: _Call, s=slice(None)) -> dict:
    """The keyword that hands a rule the forward's statistics of samples ``s``, where they were captured."""
    return {} if call.stats is None else {"stats": tuple(t[s] for t in call.stats)}


def _fits(numel: int, dtype: torch.dtype) -> bool:
    """Whether ``numel`` values of ``dtype`` fit the chunk budget (per-sample gradients worth keeping)."""
    return numel * dtype.itemsize <= budget_bytes()


def _worth_forming(rule: Rule, m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a rule layer's per-sample gradients are worth forming and holding: its norms form
    them anyway and the whole batch's fit the chunk budget."""
    return rule.norms_materialize(m, x, g) and _fits(g.shape[0] * own_numel(m), g.dtype)


def _weighted(grads: dict, weights: torch.Tensor) -> dict:
    """``{name: sum_i weights_i * grads[name][i]}`` in the accumulation dtype."""
    return {f: torch.tensordot(weights.to(acc_dtype(t)), acc(t), dims=1) for f, t in grads.items()}


_NO_VMAP: set = set()  # module types torch.func's vmap failed on: served by a loop over samples


class _FuncSource:
    """Parameters served by torch.func: vmap over samples of a vjp through a module's forward.

    ``names`` maps names relative to the call's module (local names, or dotted paths when
    the module is the root) to full names.
    """

    def __init__(self, call: _Call, names: dict[str, str], params: dict[str, torch.Tensor],
                 grads: list, capture: _Capture, module_name: str):
        self.call, self.names, self.capture = call, names, capture
        self.params = {rel: params[full].detach() for rel, full in names.items()}
        self._kept = None  # per-sample gradients formed for the norms, for a clipped sum
        B, module = call.batch_size, call.module
        # each output's batch dim (vmap's out_dims), found as for the inputs
        self.out_dims = []
        for j, shape in zip(call.out_leaves, call.out_shapes):
            d = batch_dim(module, tuple(shape), B, output=j)
            if d is None:
                raise ValueError(
                    f"module '{module_name}' ({type(module).__name__}) has no hand-written rule and "
                    f"returns an output of shape {tuple(shape)} without the batch dimension {B} (at dim 0 or 1): "
                    "its parameters' per-sample gradients cannot be separated"
                )
            self.out_dims.append(d)
        self.grads = [torch.zeros(s, dtype=self.any_dtype(), device=self.any_device()) if g is None else g
                      for g, s in zip(grads, call.out_shapes)]
        leaves, self.spec = tree_flatten((call.args, call.kwargs))
        self.leaves = leaves
        # (position, batch dim) of each batched input leaf; the rest are shared by all samples
        self.batched = [(i, d) for i, t in enumerate(leaves)
                        if isinstance(t, torch.Tensor) and (d := batch_dim(module, tuple(t.shape), B)) is not None]

    def any_dtype(self):
        return next(iter(self.params.values())).dtype

    def any_device(self):
        return next(iter(self.params.values())).device

    def materialize(self, s=slice(None), out=None):
        call, spec, leaves, batched = self.call, self.spec, self.leaves, self.batched
        module, out_dims = call.module, self.out_dims

        def one_sample(params, xs, gs):
            full = list(leaves)
            for (i, d), v in zip(batched, xs):
                full[i] = v.unsqueeze(d)  # a batch of one, its batch dim where the module expects it
            args, kwargs = tree_unflatten(full, spec)

            def forward(p):
                outs = tree_flatten(torch.func.functional_call(module, p, args, kwargs))[0]
                return tuple(outs[i] for i in call.out_leaves)

            _, pull = torch.func.vjp(forward, params)
            return pull(tuple(g.unsqueeze(d) for g, d in zip(gs, out_dims)))[0]

        def rows(t, d):  # samples s of t along its batch dim d
            return t[s] if d == 0 else t[(slice(None),) * d + (s,)]

        xs = [rows(leaves[i], d) for i, d in batched]
        gs = [rows(g, d) for g, d in zip(self.grads, out_dims)]
        with self.capture.paused(), _parameters_restored(module):
            if type(module) not in _NO_VMAP:
                try:
                    res = torch.func.vmap(one_sample, in_dims=(None, [d for _, d in batched], list(out_dims)),
                                          randomness="different")(self.params, xs, gs)
                except RuntimeError as exc:  # e.g. nn.GRU's in-place kernels have no batching rule
                    _NO_VMAP.add(type(module))
                    warnings.warn(f"torch.func cannot vmap {type(module).__name__} ({str(exc).splitlines()[0]}); "
                                  "its per-sample gradients come from a loop over samples (same answer, slower)",
                                  stacklevel=2)
            if type(module) in _NO_VMAP:
                n = len(range(*s.indices(call.batch_size)))
                per = [one_sample(self.params, [x.select(d, k) for x, (_, d) in zip(xs, batched)],
                                  [g.select(d, k) for g, d in zip(gs, out_dims)]) for k in range(n)]
                res = {name: torch.stack([p[name] for p in per]) for name in self.params}
        return {self.names[k]: v for k, v in res.items()}

    def _chunks(self, chunk_size):
        numel = sum(p.numel() for p in self.params.values())
        return chunks(self.call.batch_size, rows_per_chunk(self.call.batch_size, 12 * numel, chunk_size))

    def materialize_full(self, out=None, chunk_size=None):
        """All samples, a chunk of vmap at a time (bounds the vmap's temporaries)."""
        B = self.call.batch_size
        result = {}
        for s in self._chunks(chunk_size):
            for name, grad in self.materialize(s).items():
                if name not in result:
                    buf = None if out is None else out.get(name)
                    result[name] = buf if buf is not None else grad.new_empty((B, *grad.shape[1:]))
                result[name][s] = grad
        return result

    def sq_norms(self, chunk_size, keep: bool = False):
        """Squared norms from chunks of materialized gradients; with ``keep`` and the whole batch
        within the chunk budget, the gradients are kept for :meth:`weighted_sums` (no second vmap)."""
        numel = sum(p.numel() for p in self.params.values())
        kept = {} if keep and _fits(self.call.batch_size * numel, self.any_dtype()) else None
        out = {}
        for s in self._chunks(chunk_size):
            for name, grad in self.materialize(s).items():
                out.setdefault(name, []).append(acc(grad.flatten(1)).square().sum(1))
                if kept is not None:
                    kept.setdefault(name, []).append(grad)
        if kept is not None:
            self._kept = {k: torch.cat(v) for k, v in kept.items()}
        return {k: torch.cat(v) for k, v in out.items()}

    def dots(self, vectors, chunk_size):
        parts = []
        for s in self._chunks(chunk_size):
            grads = self.materialize(s)
            parts.append(sum(acc(grads[f].flatten(1)) @ acc(vectors[f].flatten(1)).T
                             for f in grads if f in vectors))
        return torch.cat(parts)

    def class_sums(self, labels, num_classes, chunk_size):
        out = {}
        for s in self._chunks(chunk_size):
            for name, grad in self.materialize(s).items():
                if name not in out:
                    out[name] = grad.new_zeros((num_classes, *grad.shape[1:]), dtype=acc_dtype(grad))
                out[name].index_add_(0, labels[s], acc(grad))
        return out

    def mean_and_cross_dots(self, n):
        return None  # no layer structure to use: the engine goes through a vector

    def project(self, proj, out, chunk_size):
        """Add projections of chunks of materialized per-sample gradients to ``out [B, dim]``."""
        for s in self._chunks(chunk_size):
            proj.project_grads(self.materialize(s), out[s])

    def row_sums(self, rows: slice, factor: float, chunk_size):
        weights = torch.zeros(self.call.batch_size, dtype=acc_dtype(self.grads[0]), device=self.any_device())
        weights[rows] = factor
        return self.weighted_sums(weights, chunk_size)

    def weighted_sums(self, weights, chunk_size, into=None):
        """``sum_i w_i g_i``: from the gradients kept for the norms, else from chunks of
        materialized per-sample gradients (no rule here)."""
        if self._kept is not None:
            return _weighted(self._kept, weights)
        out = {}
        for s in self._chunks(chunk_size):
            for name, grad in self.materialize(s).items():
                part = torch.tensordot(weights[s].to(acc_dtype(grad)), acc(grad), dims=1)
                out[name] = part if name not in out else out[name] + part
        return out


@contextlib.contextmanager
def _parameters_restored(module: nn.Module):
    """Put every parameter back afterwards: torch's functional_call can leave a plain
    tensor in place of a Parameter when one submodule appears at two paths."""
    saved = [(m, n, p) for m in module.modules() for n, p in m._parameters.items()]
    try:
        yield
    finally:
        for m, n, p in saved:
            if m._parameters.get(n) is not p:
                m._parameters[n] = p


# --------------------------------------------------------------------------- the engine
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def select_params(model: nn.Module, params: Iterable[str] | None) -> dict[str, nn.Parameter]:
    """Named trainable parameters of ``model``, all of them or those named in ``params``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
    else:
        if isinstance(params, str):
            params = [params]
        params = list(params)
        missing = [n for n in params if n not in named]
        if missing:
            known = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise ValueError(f"params names {missing} are not parameters of the model; it has: {known}")
        frozen = [n for n in params if not named[n].requires_grad]
        if frozen:
            raise ValueError(f"params {frozen} have requires_grad=False; per-sample gradients need trainable parameters")
        selected = {n: named[n] for n in params}
    if not selected:
        raise ValueError("no trainable parameters selected: the model has none with requires_grad=True"
                         if params is None else "params is empty: name at least one parameter")
    return selected


class _Engine:
    """Captured calls of one forward/backward and the consumers built on them."""

    def __init__(self, capture: _Capture, scale_by_batch: bool = False):
        self.capture = capture
        self.selected = capture.selected
        self.acc = acc_dtype(next(iter(self.selected.values())))  # float64 models reduce in float64
        self.sources: dict[str, list] = {n: [] for n in self.selected}
        # forwards without a backward (stale) have no gradients and serve nothing
        live = [i for i, root in enumerate(capture.root_calls) if any(g is not None for g in root.grads)]
        if not live:
            raise RuntimeError("no backward pass was captured: run the forward and backward inside the context")
        sizes = {capture.root_calls[i].batch_size for i in live}
        if len(sizes) > 1:
            raise ValueError(f"the captured forwards have batch sizes {sorted(sizes)}; "
                             "per-sample statistics need one batch size per backward")
        self.batch_size = sizes.pop()
        # a mean-reduced loss scaled each sample's gradient by 1/B
        scale = float(self.batch_size) if scale_by_batch else 1.0
        for idx in live:
            root = capture.root_calls[idx]
            orphans = capture.orphans[idx]
            for call in capture.calls:
                if call.root_call != idx:
                    continue
                names = {k: f for k, f in capture.owned.get(call.module, {}).items() if f not in orphans}
                if not names or (call.formed is None and all(g is None for g in call.grads)):
                    continue
                if call.use_rule:
                    src = _RuleSource(call, capture.rules[call.module], names, call.grads[0], scale,
                                      shared=0 in call.grads_shared)
                else:
                    src = _FuncSource(call, names, self.selected, _scaled(call.grads, scale), capture,
                                      capture.module_names[call.module])
                for f in set(names.values()):
                    self.sources[f].append(src)
            if orphans:
                src = _FuncSource(root, {f: f for f in orphans}, self.selected, _scaled(root.grads, scale), capture,
                                  "<model>")
                for f in orphans:
                    self.sources[f].append(src)

    def _zeros(self, name, lead, dtype=None):
        p = self.selected[name]
        return torch.zeros((*lead, *p.shape), dtype=dtype or p.dtype, device=p.device)

    def grads(self, out: dict | None = None, chunk_size=None) -> dict[str, torch.Tensor]:
        B = self.batch_size
        for name, buf in (out or {}).items():
            self._check_out(name, buf)
        if out is None:  # memory of earlier results the caller has dropped, else new (fastdd.grad.buffers)
            out = {n: buffers.take((B, *p.shape), p.dtype, p.device) for n, p in self.selected.items()}
        result = {}
        done = set()
        for name, srcs in self.sources.items():
            if len(srcs) == 1:
                src = srcs[0]
                if id(src) in done:
                    continue
                done.add(id(src))
                # one source may serve several parameters (weight and bias of a layer)
                res = src.materialize_full(out=out, chunk_size=chunk_size)
                for f, t in res.items():
                    if len(self.sources[f]) == 1:
                        result[f] = _into(out, f, t)
                continue
            total = None
            for src in srcs:
                t = src.materialize_full(chunk_size=chunk_size)[name]
                total = t.clone() if total is None else total.add_(t)
            result[name] = _into(out, name, total if total is not None else self._zeros(name, (B,)))
        for name in self.sources:
            if name not in result:
                result[name] = _into(out, name, self._zeros(name, (B,)))
        return {n: result[n] for n in self.selected}

    def _check_out(self, name, buf):
        """An ``out=`` buffer: a tensor of the parameter's per-sample shape, dtype and device."""
        if name not in self.selected:
            raise ValueError(f"out has a buffer for {name!r}, which is not a selected parameter "
                             f"(selected: {', '.join(self.selected)})")
        p, want = self.selected[name], (self.batch_size, *self.selected[name].shape)
        if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != want:
            raise ValueError(f"out[{name!r}] must have shape {want}, got "
                             f"{tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__}")
        if buf.dtype != p.dtype or buf.device != p.device:
            raise ValueError(f"out[{name!r}] must be {p.dtype} on {p.device} like the parameter, "
                             f"got {buf.dtype} on {buf.device}")

    def sq_norms(self, chunk_size=None, keep: bool = False) -> torch.Tensor:
        """Per-sample squared norms ``[B]``; ``keep``: sources keep per-sample gradients they form
        anyway (within the chunk budget) for a following :meth:`weighted_sums`."""
        B = self.batch_size
        device = next(iter(self.selected.values())).device
        total = torch.zeros(B, dtype=self.acc, device=device)
        single = {}
        for name, srcs in self.sources.items():
            if len(srcs) == 1:
                single.setdefault(id(srcs[0]), (srcs[0], []))[1].append(name)
            elif srcs:  # tied: the per-sample gradient is a sum of uses; sum chunks, then norm
                numel = self.selected[name].numel()
                for s in chunks(B, rows_per_chunk(B, 8 * numel, chunk_size)):
                    summed = None
                    for src in srcs:
                        t = acc(src.materialize(s)[name])
                        summed = t if summed is None else summed + t
                    total[s] += summed.flatten(1).square().sum(1)
        for src, names in single.values():
            norms = src.sq_norms(chunk_size, keep=keep)
            for n in names:
                total += norms[n]
        return total

    def dots(self, vectors: dict[str, torch.Tensor], chunk_size=None) -> torch.Tensor:
        unknown = [n for n in vectors if n not in self.selected]
        if unknown:
            raise ValueError(f"vectors name parameters that are not selected: {unknown}")
        device = next(iter(self.selected.values())).device
        vectors = {n: v.to(device) for n, v in vectors.items()}
        K = next(iter(vectors.values())).shape[0]
        total = torch.zeros(self.batch_size, K, dtype=self.acc, device=device)
        for src in self._distinct_sources(vectors):
            total += src.dots(vectors, chunk_size)
        return total

    def projections(self, proj, chunk_size=None) -> torch.Tensor:
        """``[B, dim]`` projected per-sample gradients (``proj``: a Projector of the selected
        parameters), in the accumulation dtype; tied parameters' uses add up (projections are linear)."""
        device = next(iter(self.selected.values())).device
        out = torch.zeros(self.batch_size, proj.dim, dtype=self.acc, device=device)
        for src in self._distinct_sources(self.sources):
            src.project(proj, out, chunk_size)
        return out

    def mean_and_cross_dots(self, n: int, chunk_size=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """For a batch of ``n`` training rows followed by ``m`` validation rows captured in one backward
        (in-run valuation's step): ``({name: mean_{i<n} g_i}, [n]: mean_j <g_i, g_{n+j}>)``. Linear
        layers give both in one pass (ghost dot products); other sources give the training rows' sum,
        and their dots go through the validation rows' mean gradient V, ``<g_i, V>`` (tied parameters
        always: their uses' cross terms count)."""
        m = self.batch_size - n
        total = torch.zeros(n, dtype=self.acc, device=next(iter(self.selected.values())).device)
        grads: dict = {}
        pending = set()  # parameters whose dots go through V

        def add(part):
            for f, t in part.items():
                grads[f] = t if f not in grads else grads[f] + t  # a tied parameter's uses add up

        for src in self._distinct_sources(self.sources):
            single = all(len(self.sources[f]) == 1 for f in _served(src))
            fused = src.mean_and_cross_dots(n) if single else None
            if fused is None:
                add(src.row_sums(slice(0, n), 1.0 / n, chunk_size))
                pending.update(_served(src))
            else:
                add(fused[0])
                total += fused[1]
        if pending:  # V = mean_j g_{n+j} over every use, then <g_i, V> over every use
            V: dict = {}
            for src in self._distinct_sources(pending):
                for f, t in src.row_sums(slice(n, n + m), 1.0 / m, chunk_size).items():
                    if f in pending:
                        V[f] = t if f not in V else V[f] + t
            for src in self._distinct_sources(pending):
                mine = {f: V[f].unsqueeze(0) for f in _served(src) if f in V}
                total += src.dots(mine, chunk_size)[:n, 0]
        grads = {name: grads[name] if name in grads else self._zeros(name, (), self.acc) for name in self.selected}
        return grads, total

    def class_sums(self, labels, num_classes, chunk_size=None) -> dict[str, torch.Tensor]:
        out = {n: self._zeros(n, (num_classes,), self.acc) for n in self.selected}
        for src in self._distinct_sources(self.sources):
            for f, t in src.class_sums(labels, num_classes, chunk_size).items():
                out[f] += t
        return out

    def weighted_sums(self, weights: torch.Tensor, chunk_size=None, into: dict | None = None) -> dict[str, torch.Tensor]:
        """``{name: sum_i weights_i * g_i}`` (accumulated in fp32 or float64, in the parameter's
        dtype), from each source's captured inputs and output gradients. ``into``: tensors of the
        parameters' shapes (their ``.grad``) that receive the result source by source, so no
        second gradient-sized set exists at once."""
        into = into or {}
        out = {}
        for src in self._distinct_sources(self.sources):
            # a source may write straight into a .grad no earlier source has written
            fresh = {f: t for f, t in into.items() if f not in out}
            for f, t in src.weighted_sums(weights, chunk_size, into=fresh).items():
                if f not in into:
                    out[f] = t if f not in out else out[f] + t  # several sources: a tied parameter's uses
                    continue
                if f in out:  # a tied parameter's uses add up in its .grad
                    into[f].add_(t.to(into[f].dtype))
                elif t.data_ptr() != into[f].data_ptr():  # (else the source wrote it there)
                    into[f].copy_(t)
                out[f] = into[f]
        res = {}
        for n, p in self.selected.items():
            if n in out:
                res[n] = out[n] if n in into else out[n].to(p.dtype)
            elif n in into:
                res[n] = into[n].zero_()
            else:
                res[n] = self._zeros(n, ())
        return res

    def _distinct_sources(self, names):
        """Each source serving any of ``names``, once (a source may serve several parameters)."""
        seen = set()
        for name in names:
            for src in self.sources[name]:
                if id(src) not in seen:
                    seen.add(id(src))
                    yield src


def _served(src) -> set:
    """Full names of the parameters a source serves."""
    return set(src.names.values())


def _scaled(grads: list, scale: float) -> list:
    if scale == 1.0:
        return grads
    return [None if g is None else g * scale for g in grads]


def _into(out, name, t):
    if out is None or name not in out:
        return t
    if out[name].data_ptr() != t.data_ptr():
        out[name].copy_(t)
    return out[name]
