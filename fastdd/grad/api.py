"""Public per-sample gradient functions and the in-loop context manager."""
from __future__ import annotations

import numbers

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .engine import LossFn, _Capture, _Engine, select_params


def _as_tuple(inputs) -> tuple:
    """The model's positional inputs; numpy arrays become tensors."""
    items = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in items)


def _batch_of(inputs: tuple) -> int:
    first = inputs[0] if inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("inputs must be a tensor [B, ...] (or a tuple whose first item is one)")
    if first.shape[0] == 0:
        raise ValueError(f"inputs have no samples (shape {tuple(first.shape)})")
    return first.shape[0]


def _per_sample_losses(loss_fn: LossFn | None, outputs, targets, B: int) -> torch.Tensor:
    if loss_fn is None:
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(
                f"the default loss is cross-entropy over logits [B, C], but the model returned {shape}; "
                "pass loss_fn(outputs, targets) returning per-sample losses [B]")
        losses = F.cross_entropy(outputs, targets, reduction="none")
    else:
        losses = loss_fn(outputs, targets)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (B,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-sample losses of shape [B] = [{B}], got {shape} "
            "(use reduction='none', and reduce any other dims per sample)")
    return losses


def _check_devices(inputs: tuple, selected: dict) -> None:
    """Inputs on the parameters' device, said up front and naming both (not deep in a kernel)."""
    name, p = next(iter(selected.items()))
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.device != p.device:
            which = "inputs" if len(inputs) == 1 else f"inputs[{i}]"
            raise ValueError(f"{which} are on {t.device} but the model's parameters (e.g. {name!r}) are on "
                             f"{p.device}: move one to the other (model.to(x.device) or x.to(...))")


def _check_max_norm(max_norm) -> float:
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not 0 < float(max_norm) < float("inf"):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    return float(max_norm)


def _capture_backward(model, inputs, targets, loss_fn, params) -> _Engine:
    inputs = _as_tuple(inputs)
    B = _batch_of(inputs)
    if isinstance(targets, np.ndarray):
        targets = torch.from_numpy(targets)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor [B, ...], got {type(targets).__name__}")
    if targets.dim() == 0 or targets.shape[0] != B:
        raise ValueError(
            f"inputs and targets must have the same batch size: inputs have {B}, "
            f"targets have shape {tuple(targets.shape)}")
    selected = select_params(model, params)
    _check_devices(inputs, selected)
    with _Capture(model, selected, grad_hooks=False) as cap, torch.enable_grad():
        cap.check_batch_statistics()
        outputs = model(*inputs)
        losses = _per_sample_losses(loss_fn, outputs, targets, B)
        cap.backward(losses.sum())
    return _Engine(cap)


def per_sample_grads(model: nn.Module, inputs, targets: torch.Tensor, loss_fn: LossFn | None = None,
                     params: Iterable[str] | None = None, chunk_size: int | None = None,
                     out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gradient of each sample's own loss, for every selected parameter.

    Args:
        model: any ``nn.Module``; Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm,
            InstanceNorm and eval-mode BatchNorm have hand-written rules, anything else
            falls back to ``torch.func`` with the same answer.
        inputs: ``[B, ...]`` (or a tuple of model arguments whose first is ``[B, ...]``).
        targets: ``[B, ...]``.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses; default
            cross-entropy with ``reduction="none"``.
        params: names of the parameters to differentiate (default: all trainable).
        chunk_size: samples per chunk where a fallback or a reduction needs temporaries.
        out: optional buffers ``{name: [B, *shape]}`` to write into (reused across calls).

    Returns:
        ``{name: Tensor[B, *param.shape]}``.

    >>> model = nn.Linear(4, 3)
    >>> g = per_sample_grads(model, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> g["weight"].shape
    torch.Size([8, 3, 4])
    """
    return _capture_backward(model, inputs, targets, loss_fn, params).grads(out, chunk_size)


def clipped_grad(model: nn.Module, inputs, targets: torch.Tensor, max_norm: float, loss_fn: LossFn | None = None,
                 params: Iterable[str] | None = None, reduction: str = "sum", write_grad: bool = False,
                 chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """``{name: sum_i g_i * min(1, max_norm / ||g_i||)}``: the batch's gradient with each sample's
    gradient (over the selected parameters) clipped to ``max_norm``, by ghost clipping (see
    :meth:`PerSampleGrads.clipped_grad`, which does the same inside a user's training step).

    It runs the forward and a backward of its own, to the layers' outputs only: no
    parameter gradient is computed that clipping would throw away, so a clipped step
    costs about a plain step plus the norms (one GEMM more per Linear layer)::

        opt.zero_grad()
        fastdd.grad.clipped_grad(model, x, y, max_norm=1.0, reduction="mean", write_grad=True)
        opt.step()

    ``reduction="mean"`` divides by the batch size; ``write_grad=True`` sets each parameter's
    ``.grad`` to the result.
    """
    max_norm = _check_max_norm(max_norm)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    engine = _capture_backward(model, inputs, targets, loss_fn, params)
    return _clip(engine, max_norm, reduction == "mean", write_grad, chunk_size)


def _clip(engine: _Engine, max_norm: float, mean: bool, write_grad: bool, chunk_size) -> dict[str, torch.Tensor]:
    """Ghost clipping on a captured step: norms, factors ``min(1, C / ||g_i||)`` (over B when
    ``mean``), the reweighted sums, and optionally ``.grad``."""
    norms = engine.sq_norms(chunk_size, keep=True).sqrt()
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # 1e-6: Opacus' guard for a zero gradient
    if mean:
        factors = factors / engine.batch_size
    into = {}
    if write_grad:  # into the .grad the step's backward made, as it comes (no second gradient set)
        for name, p in engine.selected.items():
            g = p.grad
            if g is not None and g.shape == p.shape and g.dtype == p.dtype and g.device == p.device and not g.is_sparse:
                into[name] = g.detach()
    clipped = engine.weighted_sums(factors, chunk_size, into=into)
    if write_grad:
        for name, p in engine.selected.items():
            if name not in into:
                p.grad = clipped[name]
    return clipped


def per_sample_grad_norms(model: nn.Module, inputs, targets: torch.Tensor, loss_fn: LossFn | None = None,
                          params: Iterable[str] | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """L2 norm ``[B]`` (fp32) of each sample's gradient over the selected parameters.

    Layers with rules never materialize per-sample gradients: ``||a_i|| ||g_i||`` for
    Linear on ``[B, d]``; for sequences ``<A A^T, G G^T>`` or a chunked materialization,
    whichever costs fewer flops per layer. Arguments as in :func:`per_sample_grads`.
    """
    return _capture_backward(model, inputs, targets, loss_fn, params).sq_norms(chunk_size).sqrt()


def _check_vectors(model: nn.Module, vectors: dict[str, torch.Tensor]) -> int:
    if not isinstance(vectors, dict) or not vectors:
        raise ValueError("vectors must be a non-empty dict {param name: Tensor[K, *param.shape]}")
    named = dict(model.named_parameters())
    K = None
    for name, v in vectors.items():
        if name not in named:
            raise ValueError(f"vectors[{name!r}]: the model has no parameter {name!r}")
        shape = tuple(named[name].shape)
        if not isinstance(v, torch.Tensor) or tuple(v.shape[1:]) != shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"vectors[{name!r}] must be [K, {', '.join(map(str, shape))}], got {got}")
        if K is None:
            K = v.shape[0]
        elif v.shape[0] != K:
            raise ValueError(f"every vector needs the same K: vectors[{name!r}] has {v.shape[0]}, others {K}")
    return K


def per_sample_grad_dots(model: nn.Module, inputs, targets: torch.Tensor, vectors: dict[str, torch.Tensor],
                         loss_fn: LossFn | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Dot products ``[B, K]`` (fp32) of each sample's gradient with K parameter-shaped vectors.

    ``vectors = {name: Tensor[K, *param.shape]}`` selects the parameters; the result is
    ``sum over names of <grad_i[name], vectors[name][k]>``. Linear (``sum_t g_t^T V_k a_t``
    or chunks, by cost) and Embedding layers never hold ``[B, *shape]``; other layers
    work a chunk of samples at a time. This is what influence scores and TracIn consume.
    """
    _check_vectors(model, vectors)
    engine = _capture_backward(model, inputs, targets, loss_fn, list(vectors))
    return engine.dots(vectors, chunk_size)


_PROJECTORS: dict = {}  # the last two projectors by layout: their generated matrices are reused


def release_projections() -> None:
    """Drop the cached projectors and the matrices they generated (a dense JL matrix can hold up to
    four chunk budgets, 1 GB by default); the next call regenerates what it needs."""
    _PROJECTORS.clear()


def projector_for(model: nn.Module, selected: dict, dim, kind: str = "factorized", seed=0):
    """The :class:`~fastdd.grad.projection.Projector` of ``selected`` parameters (validated
    arguments; the same object for the same layout, kind, dim and seed, so matrices it generated
    are reused across calls)."""
    from .._validate import check_positive_int
    from .projection import KINDS, Projector, _owner_groups

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dim = check_positive_int(dim, "dim")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    numel = sum(p.numel() for p in selected.values())
    if dim >= numel:
        raise ValueError(f"dim={dim} is not smaller than the gradient's size ({numel} parameters): a projection "
                         "would only add noise and cost; use per_sample_grads and flatten them")
    layout = tuple((n, tuple(selected[n].shape), type(m).__name__)
                   for m, local in _owner_groups(model, selected) for n in local.values())
    key = (layout, dim, kind, int(seed))
    proj = _PROJECTORS.get(key)
    if proj is None:
        proj = Projector(model, selected, dim, kind, int(seed))
        if len(_PROJECTORS) >= 2:
            _PROJECTORS.pop(next(iter(_PROJECTORS)))
        _PROJECTORS[key] = proj
    return proj


def per_sample_grad_projections(model: nn.Module, inputs, targets: torch.Tensor, dim: int,
                                kind: str = "factorized", seed: int = 0, loss_fn: LossFn | None = None,
                                params: Iterable[str] | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Random projections ``[B, dim]`` of each sample's gradient (fp32; float64 models: float64).

    ``kind="factorized"`` (LoGra): per Linear/Conv layer ``(G_i P_G)^T (A_i P_A)``, never a
    per-sample gradient; ``kind="jl"`` (TRAK): one dense Rademacher matrix over the whole
    flattened gradient, ``B x P x dim`` flops (small models, GPUs). Matrices come from a
    counter-based hash of ``seed``: the same on every backend and for every model of the
    same architecture; ``<proj_i, proj_j>`` estimates ``g_i . g_j`` without bias, with error
    falling like ``1/sqrt(dim)``. Other arguments as in :func:`per_sample_grads`.

    >>> model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> per_sample_grad_projections(model, torch.randn(8, 20), torch.randint(0, 3, (8,)), dim=64).shape
    torch.Size([8, 64])
    """
    engine = _capture_backward(model, inputs, targets, loss_fn, params)
    proj = projector_for(model, engine.selected, dim, kind, seed)
    return _checked_projections(engine, proj, chunk_size)


def _checked_projections(engine: _Engine, proj, chunk_size) -> torch.Tensor:
    out = engine.projections(proj, chunk_size)
    bad = ~torch.isfinite(out)
    if bad.any():
        col = int(torch.nonzero(bad)[0, 1])
        unit = next(u for u in proj.units if u.offset <= col < u.offset + u.dim)
        raise ValueError(f"projected gradients are not finite (first at sample {int(torch.nonzero(bad)[0, 0])}), "
                         f"in the block of parameters {unit.names}: check the loss and that layer's inputs")
    return out


def classwise_grads(model: nn.Module, inputs, targets: torch.Tensor, num_classes: int,
                    loss_fn: LossFn | None = None, params: Iterable[str] | None = None,
                    labels: torch.Tensor | None = None, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Mean gradient of each class: ``{name: Tensor[C, *param.shape]}`` (fp32).

    ``labels`` (default: ``targets``) gives each sample's class in ``[0, num_classes)``; a
    class without samples gets zeros. One forward and backward; Linear and Conv layers
    reduce each class with one GEMM, never holding ``[B, *shape]``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    labels = targets if labels is None else labels
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer class indices [B], got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    engine = _capture_backward(model, inputs, targets, loss_fn, params)
    if labels.shape[0] != engine.batch_size:
        raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {engine.batch_size}")
    labels = labels.to(next(iter(engine.selected.values())).device)
    sums = engine.class_sums(labels, num_classes, chunk_size)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()
    return {n: t / counts.view(-1, *[1] * (t.dim() - 1)) for n, t in sums.items()}


class PerSampleGrads:
    """Per-sample statistics from the backward of a user's own training step.

    Hooks record activations in each forward and output gradients in each backward;
    ``norms()``, ``grads()`` and ``dots(vectors)`` then use that same pass, so the
    optimizer step and the statistics share one forward and backward::

        with fastdd.PerSampleGrads(model, loss_reduction="mean") as ps:
            for x, y in loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)   # mean over the batch
                loss.backward()
                norms = ps.norms()                     # [B]: each sample's own-loss gradient norm
                opt.step()

    ``loss_reduction`` says how the loss reduced its per-sample terms: ``"mean"``
    (gradients are scaled by B to undo the 1/B) or ``"sum"``. A loss that scales
    samples otherwise scales the statistics alike. A forward after a backward starts
    a new step and lets go of the last one: between steps the context holds one step's layer
    inputs and output gradients (``clear()`` lets go of them sooner). Parameters served by the
    ``torch.func`` fallback re-run their module per sample, with fresh dropout masks
    in training mode. Hooks are removed on exit; ``.grad`` is the user's as usual.

    ``eager`` (default): layers whose norms need their per-sample gradients anyway (conv and
    norm layers on a CPU, within the chunk budget) form them during the backward, while each
    output gradient is fresh in cache, and the step then holds those gradients instead of the
    layer's activations and output gradients (on the DC ConvNet at 28x28: the memory of a plain
    step plus the per-sample gradients). ``eager=False`` defers all work to the consumer call,
    for loops that read statistics only on some steps.

    ``param_grads=False``: for a step whose gradient :meth:`clipped_grad` replaces. Layers with
    rules run their selected parameters detached, so the step's backward only carries output
    gradients through them and computes none of the weight gradients that clipping would throw
    away (on the ConvNet at 28x28 about a sixth of a step). Their ``.grad`` is then left as it
    was (None after ``zero_grad()``) until ``clipped_grad(..., write_grad=True)`` fills it;
    parameters served by ``torch.func`` get their gradient from the backward as usual.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", params: Iterable[str] | None = None,
                 chunk_size: int | None = None, eager: bool = True, param_grads: bool = True):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(eager, bool):
            raise ValueError(f"eager must be True or False, got {eager!r}")
        if not isinstance(param_grads, bool):
            raise ValueError(f"param_grads must be True or False, got {param_grads!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.chunk_size = chunk_size
        self._capture = _Capture(model, select_params(model, params), grad_hooks=True, eager=eager,
                                 param_grads=param_grads)
        self._entered = False

    def __enter__(self):
        self._capture.__enter__()
        self._entered = True
        return self

    def __exit__(self, *exc):
        self._entered = False
        self._capture.__exit__(*exc)
        self._capture.clear()
        return False

    def clear(self) -> None:
        """Forget the recorded forward(s) and backward."""
        self._capture.clear()

    def _engine(self) -> _Engine:
        if not self._entered:
            raise RuntimeError("use PerSampleGrads as a context manager around the forward and backward")
        return _Engine(self._capture, scale_by_batch=self.loss_reduction == "mean")

    def grads(self, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{name: [B, *shape]}`` per-sample gradients of the last step."""
        return self._engine().grads(out, self.chunk_size)

    def norms(self) -> torch.Tensor:
        """``[B]`` per-sample gradient norms of the last step (fp32)."""
        return self._engine().sq_norms(self.chunk_size).sqrt()

    def dots(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, K]`` dots of the last step's per-sample gradients with ``vectors``."""
        _check_vectors(self.model, vectors)
        return self._engine().dots(vectors, self.chunk_size)

    def projections(self, dim: int, kind: str = "factorized", seed: int = 0) -> torch.Tensor:
        """``[B, dim]`` random projections of the last step's per-sample gradients (see
        :func:`per_sample_grad_projections`): a gradient store filled from the training loop."""
        engine = self._engine()
        return _checked_projections(engine, projector_for(self.model, engine.selected, dim, kind, seed),
                                    self.chunk_size)

    def clipped_grad(self, max_norm: float, write_grad: bool = False) -> dict[str, torch.Tensor]:
        """The last step's gradient with each sample's gradient clipped to ``max_norm``.

        ``sum_i g_i * min(1, max_norm / ||g_i||)`` over the batch (divided by B when
        ``loss_reduction="mean"``, so that it replaces the step's own mean gradient), with
        ``g_i`` the gradient of sample i's own loss over the selected parameters. Ghost
        clipping: the norms come from the captured layer inputs and output gradients, and
        so does the reweighted sum: one GEMM per Linear layer (whose norms at T = 1 form no
        per-sample gradient), and where the norms form per-sample gradients anyway (conv and
        norm layers on a CPU, within the chunk budget) a weighted sum of those.
        ``write_grad=True`` also writes it into each parameter's ``.grad`` (replacing what
        the backward put there, in place where it exists: the returned tensors are then the
        ``.grad`` themselves), ready for ``optimizer.step()``; ``param_grads=False`` spares the
        backward the weight gradients this replaces::

            with fastdd.PerSampleGrads(model, param_grads=False) as ps:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                ps.clipped_grad(1.0, write_grad=True)   # robust / DP-style clipped step
                opt.step()
        """
        max_norm = _check_max_norm(max_norm)
        return _clip(self._engine(), max_norm, self.loss_reduction == "mean", write_grad, self.chunk_size)
