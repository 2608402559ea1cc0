"""Exact leave-one-out: retrain without each point and measure the change in test loss."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import _checkpoint
from .._validate import as_samples, as_tensor
from .influence import _ce


def _test_losses(model, X_test, y_test, loss_fn):
    with torch.no_grad():
        out = loss_fn(model(X_test), y_test)
    if out.shape != (len(y_test),):
        raise ValueError(f"loss_fn must return per-sample losses [{len(y_test)}], got {tuple(out.shape)}")
    return out.double().cpu()


def leave_one_out(train_fn: Callable[..., nn.Module], X, y, X_test, y_test, indices=None, warm_start: bool = True,
                  loss_fn: Callable | None = None, checkpoint: str | None = None, checkpoint_every: int = 10,
                  progress: bool = False) -> torch.Tensor:
    """Change in each test point's loss when each training point is left out: ``[len(indices), n_test]``.

    Args:
        train_fn: ``train_fn(X, y, init=None) -> model``. With ``warm_start`` the full-data
            model is passed as ``init`` (copy it before training in place); retraining then
            starts near the answer.
        indices: training points to leave out (default all).
        loss_fn: ``loss_fn(outputs, targets) -> [n]`` (default cross-entropy).
        checkpoint: a file to save finished rows to; a rerun with the same file resumes. Its
            identity covers the data (fingerprints of X, y, X_test, y_test), the indices and
            ``warm_start``; a checkpoint of another run is refused. ``train_fn`` and
            ``loss_fn`` are code, which no fingerprint sees whole: keep them the same.

    Positive entries: the test loss rises without the point (the point helps that test point).
    """
    X, X_test = as_samples(X, "X"), as_samples(X_test, "X_test")
    y, y_test = as_tensor(y, "y"), as_tensor(y_test, "y_test")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    if len(X_test) != len(y_test):
        raise ValueError(f"X_test has {len(X_test)} rows but y_test has {len(y_test)}")
    n = len(y)
    indices = torch.arange(n) if indices is None else as_tensor(indices, "indices").long().flatten()
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"indices must lie in [0, {n})")
    loss_fn = loss_fn or _ce
    # a checkpoint of other data (even of the same size) is refused
    identity = _checkpoint.fingerprint({
        "method": "leave_one_out", "X": X, "y": y, "X_test": X_test, "y_test": y_test, "indices": indices,
        "warm_start": warm_start})
    state = _checkpoint.load(checkpoint, identity)
    result = torch.full((len(indices), len(y_test)), float("nan"), dtype=torch.float64)
    done = torch.zeros(len(indices), dtype=torch.bool)
    if state is not None:
        result, done = state["result"], state["done"]
    base_model = train_fn(X, y, init=None)
    base = _test_losses(base_model, X_test, y_test, loss_fn)
    todo = torch.nonzero(~done).flatten().tolist()
    it = todo
    if progress:
        from tqdm import tqdm

        it = tqdm(todo, desc="leave-one-out retraining", initial=int(done.sum()), total=len(indices))
    for count, row in enumerate(it, 1):
        i = int(indices[row])
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        model = train_fn(X[keep], y[keep], init=base_model if warm_start else None)
        result[row] = _test_losses(model, X_test, y_test, loss_fn) - base
        done[row] = True
        if checkpoint and (count % checkpoint_every == 0 or count == len(todo)):
            _checkpoint.save(checkpoint, {"identity": identity, "result": result, "done": done})
    return result if X.dtype == torch.float64 else result.float()
