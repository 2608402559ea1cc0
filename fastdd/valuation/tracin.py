"""TracInCP (Pruthi et al. 2020): sum over checkpoints of lr x gradient dot products."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..grad import per_sample_grad_dots, per_sample_grads
from ..grad.engine import select_params
from .._validate import as_samples, as_tensor, check_positive_int


def tracin(checkpoints: Sequence[nn.Module], learning_rates: Sequence[float], X, y, X_test, y_test,
           loss_fn: Callable | None = None, params=None, batch_size: int = 512, test_chunk: int = 64) -> torch.Tensor:
    """TracInCP scores ``[n_train, n_test]``: ``sum_c lr_c <grad L(z_i; theta_c), grad L(z_test_j; theta_c)>``.

    ``checkpoints`` are models saved during training (e.g. each epoch), ``learning_rates``
    the learning rate in force after each. Training gradients enter only through dots
    with the test gradients (the engine's dot consumer): never ``n_train x P`` memory.
    Positive: the training point pushed the test loss down (a proponent). Scores are float64
    for float64 models, else float32.
    """
    if len(checkpoints) != len(learning_rates) or not checkpoints:
        raise ValueError(f"need one learning rate per checkpoint: {len(checkpoints)} checkpoints, "
                         f"{len(learning_rates)} learning rates")
    X, X_test = as_samples(X, "X"), as_samples(X_test, "X_test")
    y, y_test = as_tensor(y, "y"), as_tensor(y_test, "y_test")
    if len(X) != len(y) or len(X_test) != len(y_test):
        raise ValueError(f"X/y and X_test/y_test must have matching lengths, got {len(X)}/{len(y)} and "
                         f"{len(X_test)}/{len(y_test)}")
    batch_size, test_chunk = check_positive_int(batch_size, "batch_size"), check_positive_int(test_chunk, "test_chunk")
    scores = None  # in the dots' dtype: float64 for float64 models
    for model, lr in zip(checkpoints, learning_rates):
        names = list(select_params(model, params))
        for s in range(0, len(y_test), test_chunk):
            vectors = per_sample_grads(model, X_test[s:s + test_chunk], y_test[s:s + test_chunk],
                                       loss_fn=loss_fn, params=names)
            for b in range(0, len(y), batch_size):
                dots = per_sample_grad_dots(model, X[b:b + batch_size], y[b:b + batch_size], vectors, loss_fn=loss_fn)
                if scores is None:
                    scores = torch.zeros(len(y), len(y_test), dtype=dots.dtype)
                scores[b:b + batch_size, s:s + test_chunk] += float(lr) * dots.cpu()
    return scores
