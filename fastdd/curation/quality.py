"""Quality filter (the phi-1 recipe): a classifier over embeddings, fitted on a few
labelled examples of high and low quality, scores every other example."""
from __future__ import annotations

import torch

from .._validate import as_matrix, check_fraction


class QualityFilter:
    """L2-regularized logistic regression on standardized embeddings.

    >>> qf = QualityFilter().fit(labelled_embeddings, is_high_quality)   # doctest: +SKIP
    >>> keep = qf.select(all_embeddings, fraction=0.5)                     # doctest: +SKIP

    Args:
        l2: weight of ``||w||^2 / 2`` added to the mean log-loss.
        max_iter: L-BFGS iterations.
    """

    def __init__(self, l2: float = 1e-2, max_iter: int = 200):
        if l2 < 0:
            raise ValueError(f"l2 must be non-negative, got {l2}")
        self.l2 = l2
        self.max_iter = max_iter
        self.weight = None
        self.bias = None

    def fit(self, embeddings, quality) -> "QualityFilter":
        """Fit on ``embeddings [n, d]`` with ``quality [n]`` (1/True = high quality)."""
        E = as_matrix(embeddings, "embeddings").double()
        q = torch.as_tensor(quality).flatten()
        if len(q) != E.shape[0]:
            raise ValueError(f"quality has {len(q)} entries but embeddings has {E.shape[0]} rows")
        if not torch.all((q == 0) | (q == 1)):
            raise ValueError("quality must be binary: 1 (or True) for high quality, 0 for low")
        q = q.double()
        if q.min() == q.max():
            raise ValueError("quality needs examples of both high (1) and low (0) quality")
        self.mean = E.mean(0)
        self.std = E.std(0).clamp_min(1e-8) if E.shape[0] > 1 else torch.ones(E.shape[1], dtype=E.dtype, device=E.device)
        Z = (E - self.mean) / self.std
        w = torch.zeros(Z.shape[1], dtype=Z.dtype, device=Z.device, requires_grad=True)
        b = torch.zeros((), dtype=Z.dtype, device=Z.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, q) + 0.5 * self.l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def score(self, embeddings) -> torch.Tensor:
        """``[N]`` fp32 probability that each example is of high quality."""
        if self.weight is None:
            raise RuntimeError("call fit() before score()")
        E = as_matrix(embeddings, "embeddings").double()
        if E.shape[1] != self.weight.shape[0]:
            raise ValueError(f"embeddings have {E.shape[1]} features; the filter was fitted on {self.weight.shape[0]}")
        return torch.sigmoid(((E - self.mean) / self.std) @ self.weight + self.bias).float()

    def select(self, embeddings, fraction: float) -> torch.Tensor:
        """Sorted indices of the top ``round(fraction * N)`` examples by score."""
        fraction = check_fraction(fraction)
        s = self.score(embeddings)
        k = max(1, int(round(fraction * len(s))))
        return torch.sort(torch.topk(s, k).indices).values
