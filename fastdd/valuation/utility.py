"""Utilities ``U(indices) -> float`` for Shapley and Banzhaf values: a model trained on a
subset of the training data, scored on validation data."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import as_labels, as_matrix, as_samples, centred, check_positive_int, compute_dtype


class KNNUtility:
    """Validation accuracy of a k-nearest-neighbour classifier fitted on the subset.

    Distances are computed once; each call is a masked walk down each validation point's
    sorted neighbour list (``O(n_val x N)``), so thousands of calls per second are cheap.
    An empty subset scores ``empty_score``.
    """

    def __init__(self, X_train, y_train, X_val, y_val, k: int = 5, empty_score: float = 0.0):
        X_train, X_val = as_matrix(X_train, "X_train"), as_matrix(X_val, "X_val")
        if X_train.shape[1] != X_val.shape[1]:
            raise ValueError(f"X_train has {X_train.shape[1]} features but X_val has {X_val.shape[1]}")
        X_train, X_val = centred(X_train, X_val)  # cdist's GEMM expansion cancels on uncentred data
        self.y_train = as_labels(y_train, "y_train", n=len(X_train))
        self.y_val = as_labels(y_val, "y_val", n=len(X_val))
        self.k = check_positive_int(k, "k")
        self.num_classes = int(max(self.y_train.max(), self.y_val.max())) + 1
        self.n = len(X_train)
        self.order = torch.argsort(torch.cdist(X_val, X_train), dim=1, stable=True)  # [V, N], on the data's device
        self.y_val = self.y_val.to(self.order.device)
        self.labels_sorted = self.y_train.to(self.order.device)[self.order]
        self.empty_score = empty_score

    def __call__(self, indices) -> float:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) == 0:
            return self.empty_score
        member = torch.zeros(self.n, dtype=torch.bool, device=self.order.device)
        member[indices.to(member.device)] = True
        m = member[self.order]  # [V, N] in each point's neighbour order
        chosen = m & (torch.cumsum(m, 1) <= self.k)
        votes = torch.zeros(len(self.y_val), self.num_classes, device=m.device)
        votes.scatter_add_(1, self.labels_sorted, chosen.float())
        return (votes.argmax(1) == self.y_val).float().mean().item()


class ModelUtility:
    """Validation accuracy of a model trained on the subset.

    Default: L2-regularized multinomial logistic regression on flattened features,
    full-batch L-BFGS from zero (deterministic). With ``model_fn`` (a factory
    ``() -> nn.Module`` taking the inputs as given), a fresh model is trained by
    :func:`fastdd.train.train_model` for ``epochs`` with ``seed`` (same seed, same model).
    A subset with one class predicts that class; an empty subset scores ``empty_score``.
    """

    def __init__(self, X_train, y_train, X_val, y_val, l2: float = 1e-2, max_iter: int = 100,
                 empty_score: float = 0.0, model_fn=None, epochs: int = 30, seed: int = 0, **train_options):
        self.model_fn, self.epochs, self.seed, self.train_options = model_fn, epochs, seed, train_options
        self.X_raw, self.Xv_raw = as_samples(X_train, "X_train"), as_samples(X_val, "X_val")
        dtype = compute_dtype(self.X_raw)  # float64 data is fitted in float64
        self.X = self.X_raw.flatten(1).to(dtype)
        self.Xv = self.Xv_raw.flatten(1).to(dtype)
        self.y = as_labels(y_train, "y_train", n=len(self.X))
        self.yv = as_labels(y_val, "y_val", n=len(self.Xv))
        self.num_classes = int(max(self.y.max(), self.yv.max())) + 1
        self.l2, self.max_iter, self.empty_score = l2, max_iter, empty_score

    def __call__(self, indices) -> float:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) == 0:
            return self.empty_score
        X, y = self.X[indices], self.y[indices]
        if bool((y == y[0]).all()):
            return (self.yv == y[0]).float().mean().item()
        if self.model_fn is not None:
            from ..train import accuracy, train_model

            torch.manual_seed(self.seed)
            model = train_model(self.model_fn(), self.X_raw[indices], y, epochs=self.epochs, seed=self.seed,
                                **self.train_options)
            return accuracy(model, self.Xv_raw, self.yv)
        W = torch.zeros(X.shape[1] + 1, self.num_classes, device=X.device, dtype=X.dtype, requires_grad=True)
        Xa = torch.cat([X, X.new_ones(len(X), 1)], 1)
        opt = torch.optim.LBFGS([W], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(Xa @ W, y) + 0.5 * self.l2 * W[:-1].square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            pred = (torch.cat([self.Xv, self.Xv.new_ones(len(self.Xv), 1)], 1) @ W).argmax(1)
        return (pred == self.yv).float().mean().item()
