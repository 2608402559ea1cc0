"""In-run valuation: first-order In-Run Data Shapley (Wang et al. 2024), i.e. TracIn-online.

Over a user's own training run, every training point i in the batch of step t earns
``lr_t * <grad l(z_i; theta_t), grad L_val(theta_t)>``: how much that step's update along its
gradient lowered the validation loss, to first order. Summed over the run this values each point
for the model actually trained, with nothing retrained and no checkpoint kept.

Each step runs one forward and one backward over the training batch with a validation batch
appended: the engine captures every row's layer inputs and output gradients, writes the mean
training gradient into ``.grad`` (so the optimizer takes exactly the step it would have taken),
and takes the dots with the validation gradient as ghost dot products where layers allow
(Linear: ``(a_i . a_j)(g_i . g_j)``), never forming a per-sample gradient there.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch import nn

from .._validate import as_labels, as_samples, check_positive_int
from ..grad.api import _check_devices, _per_sample_losses
from ..grad.engine import _Capture, _Engine, select_params


class InRunValuation:
    """Values of training points accumulated over a training loop.

    Replace ``loss.backward()`` by ``valuer.backward(x, y, indices, lr)``::

        valuer = InRunValuation(model, X_val, y_val, n_train=len(X))
        for idx in loader_indices:
            opt.zero_grad()
            loss = valuer.backward(X[idx], y[idx], idx, lr=opt.param_groups[0]["lr"])
            opt.step()                       # the same step a plain loss.backward() gives
        valuer.values                        # [n_train]: positive = lowered the validation loss

    The validation rows go through the model in its current mode (with dropout in training
    mode, their gradient is that of a dropped-out network, as the training rows' is).

    Args:
        model: the model being trained (no BatchNorm in training mode: samples would interact).
        X_val, y_val: validation data whose loss defines value.
        n_train: the size of the training set (``indices`` index into it).
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (default cross-entropy);
            the training loss is their mean, as ``F.cross_entropy`` gives.
        val_batch_size: validation rows appended to each step: all of them when the set is at
            most this size, else a fresh random batch per step, drawn with replacement (an unbiased
            estimate of the full validation gradient; the overhead grows with it).
    """

    def __init__(self, model: nn.Module, X_val, y_val, n_train: int, loss_fn: Callable | None = None,
                 val_batch_size: int = 32, params=None, seed: int = 0):
        self.model, self.loss_fn = model, loss_fn
        self.X_val = as_samples(X_val, "X_val")
        self.y_val = as_labels(y_val, "y_val", len(self.X_val)) if loss_fn is None else torch.as_tensor(y_val)
        self.n_train = check_positive_int(n_train, "n_train")
        self.val_batch_size = check_positive_int(val_batch_size, "val_batch_size")
        self.selected = select_params(model, params)
        _check_devices((self.X_val,), self.selected)
        self.values = torch.zeros(self.n_train, dtype=torch.float64)
        self.steps = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._step_rows = None  # (key, x, t): the [B + m] rows of the last step, reused when shapes repeat
        self._capture = _Capture(model, self.selected, grad_hooks=False)  # hooks go on for each step only

    def _val_rows(self):
        """The validation rows of this step: all of them, or a batch drawn with replacement (an
        unbiased estimate of the full validation gradient either way)."""
        n = len(self.X_val)
        if n <= self.val_batch_size:
            return None
        return torch.randint(0, n, (self.val_batch_size,), generator=self._gen)

    def _step_batch(self, inputs, targets):
        """``[B + m]`` inputs and targets: the training batch, then the validation rows, written into
        buffers kept from the last step when the shapes repeat (a training loop's steps): no fresh
        concatenation per step, and a full validation set is copied in once."""
        rows = self._val_rows()
        rows = None if rows is None else rows.to(inputs.device)
        key = (inputs.shape, inputs.dtype, inputs.device, targets.shape, targets.dtype, targets.device)
        if self._step_rows is not None and self._step_rows[0] == key and not inputs.requires_grad:
            _, x, t = self._step_rows
            B = len(inputs)
            with torch.no_grad():
                x[:B].copy_(inputs)
                t[:B].copy_(targets)
                if rows is not None:
                    torch.index_select(self._val_cast[0], 0, rows, out=x[B:])
                    torch.index_select(self._val_cast[1], 0, rows, out=t[B:])
            return x, t
        # the validation set in the training batch's dtype and device, once
        self._val_cast = (self.X_val.to(inputs.device, inputs.dtype), self.y_val.to(targets.device, targets.dtype))
        xv, yv = self._val_cast if rows is None else (self._val_cast[0][rows], self._val_cast[1][rows])
        x, t = torch.cat([inputs, xv]), torch.cat([targets, yv])  # (cat checks that the shapes agree)
        self._step_rows = None if inputs.requires_grad else (key, x, t)
        return x, t

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor, indices, lr: float) -> torch.Tensor:
        """The step's backward: writes the mean training loss's gradient into ``.grad`` (as
        ``loss.backward()`` would, accumulating into existing ``.grad``), adds
        ``lr * <g_i, g_val>`` to ``values[indices]`` and returns the mean training loss (detached)."""
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise ValueError(f"lr must be a number (the step's learning rate), got {lr!r}")
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        B = len(inputs)
        if len(indices) != B or len(targets) != B:
            raise ValueError(f"inputs, targets and indices must have one row per sample: {B}, {len(targets)}, "
                             f"{len(indices)}")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_train):
            raise ValueError(f"indices must lie in [0, {self.n_train}), got [{int(indices.min())}, {int(indices.max())}]")
        x, t = self._step_batch(inputs, targets)
        m = len(x) - B
        cap = self._capture
        cap.clear()
        with cap, torch.enable_grad():
            cap.check_batch_statistics()
            losses = _per_sample_losses(self.loss_fn, self.model(x), t, B + m)
            cap.backward(losses.sum())
        # the mean training gradient and each row's dot with the validation rows' mean gradient,
        # layer by layer from the captured rows (Linear: one pass for both)
        grads, dots = _Engine(cap).mean_and_cross_dots(B)
        for name, p in self.selected.items():
            g = grads[name].to(p.dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.values.index_add_(0, indices.cpu(), dots.detach().double().cpu().mul_(float(lr)))
        cap.clear()  # let go of the step's activations
        self.steps += 1
        return losses[:B].detach().mean()
