"""Small evaluation metrics shared across fastdd (no scikit-learn needed)."""
from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for finding ``positives`` (bool ``[N]``).

    The Mann-Whitney statistic with average ranks for ties: the probability that a
    random positive scores above a random negative (ties count one half).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positives = torch.as_tensor(positives).flatten().bool()
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must match")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_pos = int(positives.sum())
    n_neg = positives.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
