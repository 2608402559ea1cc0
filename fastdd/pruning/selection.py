"""Picking what to keep: by score (easy / hard / random, class-balanced), or as a set
(k-center greedy coreset, herding), and the Sorscher et al. rule for which end to keep."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .._validate import as_labels, as_matrix, as_tensor, centred, check_finite, check_fraction, check_positive_int

KEEPS = ("hard", "easy", "random")


def _budget(n: int, fraction: float) -> int:
    return max(1, int(round(fraction * n)))


def _order(scores: torch.Tensor, keep: str, gen: torch.Generator) -> torch.Tensor:
    """Indices in the order they are kept; ties broken by a seeded shuffle."""
    perm = torch.randperm(len(scores), generator=gen)
    if keep == "random":
        return perm
    s = scores[perm]
    order = torch.argsort(s, descending=(keep == "hard"), stable=True)
    return perm[order]


def class_quotas(counts: list[int], budget: int) -> list[int]:
    """Equal share of ``budget`` per class; what a small class cannot fill goes to the others.

    Water-filling: classes smaller than the equal share keep all their points and the
    remainder is split among the rest, the largest remainders getting one more.
    """
    quotas = [0] * len(counts)
    open_classes = [c for c, n in enumerate(counts) if n > 0]
    left = budget
    while open_classes and left > 0:
        share, extra = divmod(left, len(open_classes))
        short = [c for c in open_classes if counts[c] - quotas[c] <= share]
        if short:
            for c in short:
                left -= counts[c] - quotas[c]
                quotas[c] = counts[c]
            open_classes = [c for c in open_classes if c not in short]
            continue
        for i, c in enumerate(sorted(open_classes, key=lambda c: -(counts[c] - quotas[c]))):
            quotas[c] += share + (1 if i < extra else 0)
        left = 0
    return quotas


def select(scores, fraction: float, keep: str = "hard", labels=None, seed: int = 0) -> torch.Tensor:
    """Indices of the ``round(fraction * N)`` examples to keep (at least one), sorted.

    Args:
        scores: ``[N]`` difficulty scores (larger is harder); ignored for ``keep="random"``
            except for its length.
        fraction: kept fraction in (0, 1].
        keep: ``"hard"`` (highest scores), ``"easy"`` (lowest) or ``"random"``.
        labels: ``[N]`` class labels; when given the budget is split equally across classes
            (a class with fewer points than its share keeps all of them and the rest is
            shared among the other classes, with a warning saying so).
        seed: breaks ties and draws the random subset.
    """
    scores = as_tensor(scores, "scores")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-d [N], got shape {tuple(scores.shape)}")
    if keep not in KEEPS:
        raise ValueError(f"keep must be 'hard', 'easy' or 'random', got {keep!r}")
    fraction = check_fraction(fraction)
    # ranked in the scores' own precision (float64 near-ties stay apart); integers exactly
    scores = scores.cpu() if scores.dtype in (torch.float64, torch.float32) else scores.double().cpu()
    if keep != "random":
        check_finite(scores, "scores")
    N = len(scores)
    if N == 0:
        raise ValueError("scores has no samples (it is empty)")
    gen = torch.Generator().manual_seed(seed)
    budget = _budget(N, fraction)
    if labels is None:
        return torch.sort(_order(scores, keep, gen)[:budget]).values
    labels = as_labels(labels, "labels", n=N).cpu()
    classes = torch.unique(labels)
    counts = [int((labels == c).sum()) for c in classes]
    quotas = class_quotas(counts, budget)
    equal = budget / len(classes)
    short = [(int(c), n) for c, n in zip(classes, counts) if n < equal]
    if short and budget < N:  # (keeping everything needs no word)
        warnings.warn(
            f"classes {[c for c, _ in short]} have fewer points ({[n for _, n in short]}) than the equal "
            f"share of {equal:.1f}: they keep all their points and the other classes share the rest",
            stacklevel=2)
    kept = []
    for c, q in zip(classes, quotas):
        rows = torch.nonzero(labels == c).flatten()
        kept.append(rows[_order(scores[rows], keep, gen)[:q]])
    return torch.sort(torch.cat(kept)).values


class Recommendation(NamedTuple):
    keep: str  # "easy" or "hard"
    reason: str


def recommend_keep(n_samples: int, fraction: float, num_classes: int = 1, abundant_per_class: int = 1000) -> Recommendation:
    """Which end of a difficulty ranking to keep (Sorscher et al. 2022).

    Their analysis: with scarce data the best pruning keeps the *easy* examples (the
    model still needs the prototypes of each class); with abundant data it keeps the
    *hard* ones (the easy ones are redundant). "Abundant" is judged by the examples per
    class that survive pruning, against ``abundant_per_class`` (a heuristic threshold;
    the crossover depends on the task and model).
    """
    check_positive_int(n_samples, "n_samples")
    fraction = check_fraction(fraction)
    check_positive_int(num_classes, "num_classes")
    kept_per_class = n_samples * fraction / num_classes
    if kept_per_class >= abundant_per_class:
        return Recommendation("hard", f"{kept_per_class:.0f} examples per class remain (>= {abundant_per_class}): "
                                      "data is abundant, so easy examples are redundant; keep the hard ones")
    return Recommendation("easy", f"only {kept_per_class:.0f} examples per class remain (< {abundant_per_class}): "
                                  "data is scarce, so keep the easy, prototypical examples")


def _centred(embeddings) -> torch.Tensor:
    """Embeddings in the compute dtype, centred at their mean: both greedy rules use the expansion
    ``||x||^2 - 2 x.c + ||c||^2``, which cancels on uncentred data, and a common shift changes no pick."""
    return centred(as_matrix(embeddings, "embeddings"))[0]


def kcenter_greedy(embeddings, budget: int, seed: int = 0, initial=None) -> torch.Tensor:
    """Greedy k-center coreset (Sener & Savarese 2018): each pick is the point farthest from
    those already picked. O(N) memory (one distance per point), never budget x N.

    ``initial``: indices already in the set (default: one seeded random point).
    Returns ``[budget]`` indices in the order picked.
    """
    E = _centred(embeddings)
    N = E.shape[0]
    budget = check_positive_int(budget, "budget")
    if budget > N:
        raise ValueError(f"budget={budget} is larger than the number of points ({N})")
    if initial is None:
        gen = torch.Generator().manual_seed(seed)
        picked = [int(torch.randint(N, (1,), generator=gen))]
    else:
        picked = [int(i) for i in torch.as_tensor(initial).flatten()]
        if not picked or min(picked) < 0 or max(picked) >= N:
            raise ValueError(f"initial must hold indices in [0, {N}), got {picked[:5]}")
    sq = E.square().sum(1)
    min_dist = torch.full((N,), float("inf"), dtype=E.dtype, device=E.device)
    chosen = list(dict.fromkeys(picked))
    for i in chosen:
        min_dist = torch.minimum(min_dist, sq - 2 * E @ E[i] + sq[i])
    # a picked point is never picked again, whatever its distance (duplicates have distance 0 too)
    min_dist[chosen] = -float("inf")
    while len(chosen) < budget:
        i = int(min_dist.argmax())
        chosen.append(i)
        min_dist = torch.minimum(min_dist, sq - 2 * E @ E[i] + sq[i])
        min_dist[i] = -float("inf")  # stays -inf: minimum() never raises it
    return torch.tensor(chosen[:budget], dtype=torch.long)


def herding(embeddings, budget: int) -> torch.Tensor:
    """Herding (Welling 2009, as in iCaRL): each pick brings the mean of the picked set
    closest to the mean of all points. O(N) memory. Returns ``[budget]`` indices in order.
    """
    E = _centred(embeddings)
    N = E.shape[0]
    budget = check_positive_int(budget, "budget")
    if budget > N:
        raise ValueError(f"budget={budget} is larger than the number of points ({N})")
    mu = E.mean(0)
    sq = E.square().sum(1)
    picked_sum = torch.zeros_like(mu)
    available = torch.ones(N, dtype=torch.bool, device=E.device)
    chosen = []
    for t in range(1, budget + 1):
        # ||t mu - (sum + x)||^2 = const - 2 <t mu - sum, x> + ||x||^2
        cost = sq - 2 * E @ (t * mu - picked_sum)
        cost[~available] = float("inf")
        i = int(cost.argmin())
        chosen.append(i)
        available[i] = False
        picked_sum += E[i]
    return torch.tensor(chosen, dtype=torch.long)
