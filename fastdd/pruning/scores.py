"""Training-dynamics difficulty scores: EL2N, GraNd (through the gradient engine), forgetting."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import as_labels, as_samples, check_positive_int, compute_dtype
from ..distributed import all_gather_rows, shard
from ..grad import per_sample_grad_norms
from ..grad.per_sample_linear import acc_dtype
from ..train import predict, train_model

ModelFactory = Callable[[], nn.Module]


def _check_xy(X, y):
    """``(X, y)`` as tensors: X non-empty ``[N, ...]`` and finite, y integer labels ``[N]``."""
    X = as_samples(X, "X")
    return X, as_labels(y, "y", n=X.shape[0])


def _fresh(model_fn: ModelFactory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
    return model


def el2n_scores(model_fn: ModelFactory, X: torch.Tensor, y, epochs: int = 10, n_runs: int = 5,
                seed: int = 0, **train_options) -> torch.Tensor:
    """EL2N (Paul et al. 2021): ``||softmax(f(x)) - onehot(y)||_2`` after ``epochs`` of training,
    averaged over ``n_runs`` fresh models from ``model_fn()``. Larger is harder.

    ``train_options`` go to :func:`fastdd.train.train_model` (batch_size, lr, ...).
    Returns ``[N]`` scores in the models' output dtype (float64 for float64 models, else float32).
    """
    X, y = _check_xy(X, y)
    n_runs = check_positive_int(n_runs, "n_runs")
    total = None
    for run in range(n_runs):
        model = train_model(_fresh(model_fn, seed + run), X, y, epochs=epochs, seed=seed + run, **train_options)
        logits = predict(model, X)
        probs = F.softmax(logits.to(compute_dtype(logits)), dim=1)
        err = (probs - F.one_hot(y.to(probs.device), probs.shape[1]).to(probs.dtype)).norm(dim=1).cpu()
        total = err if total is None else total + err
    return total / n_runs


def grand_scores(model, X: torch.Tensor, y, n_models: int = 1, epochs: int = 0, batch_size: int = 512,
                 params=None, seed: int = 0, **train_options) -> torch.Tensor:
    """GraNd (Paul et al. 2021): the expected norm of each example's loss gradient.

    ``model`` is an ``nn.Module`` (scored as it is; ``n_models`` must be 1) or a factory
    ``() -> nn.Module`` whose ``n_models`` fresh models are trained ``epochs`` epochs and
    averaged. Norms come from the gradient engine without materializing per-sample
    gradients; under an initialized process group each rank scores a share of the
    batches and every rank gets all scores. Returns ``[N]`` scores in the norms' dtype
    (float64 for float64 parameters, else float32); larger is harder.
    """
    X, y = _check_xy(X, y)
    n_models = check_positive_int(n_models, "n_models")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(model, nn.Module):
        if n_models != 1 or epochs:
            raise ValueError("with a model instance, n_models must be 1 and epochs 0; pass a factory to average fresh models")
        models = [model]
    else:
        models = (train_model(_fresh(model, seed + i), X, y, epochs=epochs, seed=seed + i, **train_options)
                  if epochs else _fresh(model, seed + i).eval() for i in range(n_models))
    total = None
    starts = list(range(0, len(y), batch_size))
    mine = starts[shard(len(starts))]  # under torch.distributed: this rank's batches, in order
    for m in models:
        local = [per_sample_grad_norms(m, X[s:s + batch_size], y[s:s + batch_size], params=params) for s in mine]
        if not local:  # a rank with no batch still takes part in the gather, with the norms' dtype
            p0 = next(m.parameters())
            local = [torch.zeros(0, device=p0.device, dtype=acc_dtype(p0))]
        norms = all_gather_rows(torch.cat(local)).cpu()
        total = norms if total is None else total + norms
    return total / n_models


class ForgettingTracker:
    """Counts forgetting events (Toneva et al. 2019) during a user's training loop.

    A forgetting event is an example classified correctly at one presentation and
    wrongly at its next. Call :meth:`update` with each mini-batch's indices and
    predictions (or correctness)::

        tracker = ForgettingTracker(len(train_set))
        for idx, x, y in loader:
            logits = model(x)
            tracker.update(idx, logits.argmax(1) == y)
            ...

    ``scores()`` gives the counts, with never-learned examples ranked hardest
    (``never_learned`` = one more than the largest count, by default).
    """

    def __init__(self, n_samples: int):
        check_positive_int(n_samples, "n_samples")
        self.n_samples = n_samples
        self.forgetting = torch.zeros(n_samples, dtype=torch.long)
        self.last_correct = torch.zeros(n_samples, dtype=torch.bool)
        self.learned = torch.zeros(n_samples, dtype=torch.bool)
        self.presentations = torch.zeros(n_samples, dtype=torch.long)

    def update(self, indices, correct) -> None:
        """Record one presentation of ``indices [b]`` with ``correct [b]`` (bool)."""
        indices = torch.as_tensor(indices).long().flatten().cpu()
        correct = torch.as_tensor(correct).bool().flatten().cpu()
        if len(indices) != len(correct):
            raise ValueError(f"indices has {len(indices)} entries but correct has {len(correct)}")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_samples):
            raise ValueError(f"indices must lie in [0, {self.n_samples})")
        if len(torch.unique(indices)) != len(indices):
            raise ValueError("indices repeat within one update; record each presentation separately")
        seen = self.presentations[indices] > 0
        forgot = seen & self.last_correct[indices] & ~correct
        self.forgetting[indices] += forgot.long()
        self.last_correct[indices] = correct
        self.learned[indices] |= correct
        self.presentations[indices] += 1

    def unforgettable(self) -> torch.Tensor:
        """``[N]`` bool: learned at some presentation and never forgotten."""
        return self.learned & (self.forgetting == 0)

    def scores(self, never_learned: float | None = None) -> torch.Tensor:
        """``[N]`` fp32 forgetting counts; never-learned examples get ``never_learned``."""
        s = self.forgetting.float()
        fill = float(self.forgetting.max()) + 1 if never_learned is None else float(never_learned)
        s[~self.learned] = fill
        return s
