"""``check``: the engine against ``torch.func`` on the user's own model and batch.

The first thing to run on a new architecture: it says, per parameter, which path served
it (a hand-written rule, ``torch.func`` on the module that owns it, or ``torch.func`` on
the whole model for parameters used outside their module), the largest difference from
``vmap(grad(...))`` of each sample's own loss, and the time of both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .api import _as_tuple, _capture_backward, _per_sample_losses
from .engine import LossFn, _parameters_restored, _RuleSource, select_params


@dataclass
class ParamCheck:
    name: str
    path: str  # "rule (Linear)", "module fallback (LSTM 'rnn')", "whole-model fallback", ...
    max_abs_error: float
    max_rel_error: float  # largest |error| over the largest |reference| value (at least 1e-3 of the model's)
    ok: bool


@dataclass
class CheckReport:
    """What :func:`check` found: per-parameter rows, both times (one warm call each), and
    whether all agree. The reference is torch.func's vmap, or a per-sample autograd loop
    where vmap cannot run the model."""

    params: list[ParamCheck] = field(default_factory=list)
    engine_seconds: float = 0.0
    reference_seconds: float = 0.0
    rtol: float = 0.0
    reference: str = "torch.func vmap"  # what the engine was compared with

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.params)

    def __str__(self) -> str:
        width = max([len(p.name) for p in self.params] + [9])
        lines = [f"{'parameter':<{width}}  {'path':<40}  {'max |err|':>10}  {'rel':>9}",
                 "-" * (width + 66)]
        for p in self.params:
            flag = "" if p.ok else "  MISMATCH"
            lines.append(f"{p.name:<{width}}  {p.path:<40}  {p.max_abs_error:>10.3g}  {p.max_rel_error:>9.2g}{flag}")
        lines.append(f"fastdd {1e3 * self.engine_seconds:.1f} ms, {self.reference} {1e3 * self.reference_seconds:.1f} ms; "
                     f"{'all parameters agree' if self.ok else 'MISMATCH'} (rtol {self.rtol:g} of each "
                     "parameter's largest reference value)")
        return "\n".join(lines)


def _path(src, model, module_names) -> str:
    module = src.call.module
    if isinstance(src, _RuleSource):
        return f"rule ({type(module).__name__})"
    if module is model:  # used outside its module's forward (e.g. a tied weight used directly)
        return "whole-model fallback (torch.func)"
    return f"module fallback ({type(module).__name__} '{module_names.get(module, '?')}')"


def _reference(model, inputs, targets, loss_fn, names):
    """``vmap(grad(...))`` of each sample's own loss: ``{name: [B, *shape]}``."""
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    buffers = dict(model.named_buffers())

    def loss_one(p, *sample):
        *xs, t = sample
        out = functional_call(model, {**p, **frozen, **buffers}, tuple(x.unsqueeze(0) for x in xs))
        return _per_sample_losses(loss_fn, out, t.unsqueeze(0), 1)[0]

    with _parameters_restored(model):
        return vmap(grad(loss_one), in_dims=(None, *[0] * (len(inputs) + 1)), randomness="same")(
            params, *inputs, targets)


def _reference_loop(model, inputs, targets, loss_fn, names):
    """The definition, one sample at a time: each sample's own loss and ``autograd.grad``."""
    params = [(k, v) for k, v in model.named_parameters() if k in names]
    rows = []
    for i in range(targets.shape[0]):
        xs = tuple(x[i:i + 1] if isinstance(x, torch.Tensor) else x for x in inputs)
        loss = _per_sample_losses(loss_fn, model(*xs), targets[i:i + 1], 1)[0]
        rows.append(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))
    return {k: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
            for j, (k, p) in enumerate(params)}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def check(model: nn.Module, inputs, targets, loss_fn: LossFn | None = None, params: Iterable[str] | None = None,
          rtol: float | None = None, print_report: bool = False) -> CheckReport:
    """Compare ``per_sample_grads`` with ``torch.func`` on ``model`` and one batch.

    Args:
        model, inputs, targets, loss_fn, params: as for :func:`fastdd.per_sample_grads`
            (``loss_fn(outputs, targets) -> [B]``; default cross-entropy).
        rtol: a parameter agrees when its largest difference is at most ``rtol`` times its
            largest reference value, or 1e-3 of the model's if that is larger (a gradient
            that is zero in exact arithmetic); default 1e-4 for float32, 1e-10 for float64.
        print_report: also print the table.

    Returns:
        a :class:`CheckReport` (``.ok``, ``.params`` rows, both times; ``str()`` is a table).

    >>> report = check(model, x[:32], y[:32])     # doctest: +SKIP
    >>> print(report)                             # which path served each parameter, errors, times
    """
    inputs = _as_tuple(inputs)
    selected = select_params(model, params)
    names = list(selected)
    dtype = next(iter(selected.values())).dtype
    rtol = (1e-10 if dtype == torch.float64 else 1e-4) if rtol is None else float(rtol)

    def run_engine():
        engine = _capture_backward(model, inputs, targets, loss_fn, names)
        return engine, {k: v.detach() for k, v in engine.grads().items()}

    engine, got = run_engine()  # the first call also warms up (fallback vmaps, kernels)
    engine_seconds = _seconds(run_engine)
    targets = torch.as_tensor(targets)
    reference, reference_name = _reference, "torch.func vmap"
    try:
        expected = reference(model, inputs, targets, loss_fn, set(names))
    except RuntimeError:  # vmap has no batching rule for something here (nn.GRU): the definition, sample by sample
        reference, reference_name = _reference_loop, "a per-sample autograd loop (torch.func could not vmap the model)"
        expected = reference(model, inputs, targets, loss_fn, set(names))
    reference_seconds = _seconds(lambda: reference(model, inputs, targets, loss_fn, set(names)))
    # a gradient that is zero in exact arithmetic (a conv bias before a norm layer) is judged
    # against the model's gradient scale, not its own rounding noise
    overall = max((float(e.abs().max()) for e in expected.values() if e.numel()), default=0.0)
    module_names = engine.capture.module_names
    report = CheckReport(engine_seconds=engine_seconds, reference_seconds=reference_seconds, rtol=rtol,
                         reference=reference_name)
    for name in names:
        srcs = engine.sources[name]
        if not srcs:
            path = "unused (zero gradient)"
        elif len(srcs) == 1:
            path = _path(srcs[0], model, module_names)
        else:
            path = f"{len(srcs)} uses: " + ", ".join(sorted({_path(s, model, module_names) for s in srcs}))
        diff = (got[name].double() - expected[name].double()).abs()
        scale = max(float(expected[name].abs().max()) if expected[name].numel() else 0.0, 1e-3 * overall)
        err = float(diff.max()) if diff.numel() else 0.0
        rel = err / scale if scale > 0 else err
        report.params.append(ParamCheck(name, path, err, rel, rel <= rtol))
    if print_report:
        print(report)
    return report
