"""Picking what to keep: by score (easy / hard / random / coverage-centric CCS / Moderate-DS,
class-balanced), or as a set (k-center greedy coreset, herding), and the Sorscher et al. rule for
which end to keep."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .._validate import (as_labels, as_matrix, as_tensor, centred, check_finite, check_fraction, check_nonnegative,
                         check_positive_int)

KEEPS = ("hard", "easy", "random", "ccs", "moderate")
CCS_STRATA = 50  # the CCS paper's number of score strata


def _budget(n: int, fraction: float) -> int:
    return max(1, int(round(fraction * n)))


def _order(scores: torch.Tensor, keep: str, gen: torch.Generator) -> torch.Tensor:
    """Indices in the order they are kept (hard, easy, moderate, random); ties broken by a
    seeded shuffle."""
    perm = torch.randperm(len(scores), generator=gen)
    if keep == "random":
        return perm
    s = scores[perm]
    if keep == "moderate":  # Moderate-DS: nearest the median score first
        s = (s - s.median()).abs()
    order = torch.argsort(s, descending=(keep == "hard"), stable=True)
    return perm[order]


def ccs_hard_cutoff(pruned: float) -> float:
    """The CCS paper's CIFAR-10 choice of the hardest fraction to drop, by the fraction ``pruned``:
    0.3 at 90% pruned (its released command line), none at low rates, linear between 50% and 90%
    (a stated interpolation). Pass it as ``select(..., keep="ccs", hard_cutoff=ccs_hard_cutoff(0.9))``
    for data whose hardest examples are mostly label noise; the default cut is 0 (see ``select``).
    """
    return float(min(0.3, max(0.0, 0.3 * (pruned - 0.5) / 0.4)))


def _ccs(scores: torch.Tensor, budget: int, hard_cutoff: float, strata: int, gen: torch.Generator):
    """Coverage-centric coreset selection (Zheng et al. 2023): drop the hardest ``hard_cutoff``
    fraction, split the rest into ``strata`` equal-width score bins, and fill the budget from the
    smallest bin up, each taking an equal share of what is left (a bin with fewer points keeps all
    of them and passes its unused share on), sampled at random within a bin."""
    N = len(scores)
    perm = torch.randperm(N, generator=gen)
    order = perm[torch.argsort(scores[perm], descending=True, stable=True)]
    # the cut never leaves fewer points than the budget
    drop = min(int(hard_cutoff * N), N - budget)
    rest = order[drop:]
    s = scores[rest].double()
    lo, hi = float(s.min()), float(s.max())
    if hi > lo:
        bins = ((s - lo) / (hi - lo) * strata).long().clamp_(max=strata - 1)
    else:
        bins = torch.zeros(len(s), dtype=torch.long)
    members = [rest[bins == b] for b in range(strata)]
    members = sorted((m for m in members if len(m)), key=len)
    kept, left = [], budget
    for i, m in enumerate(members):
        take = min(len(m), left // (len(members) - i))
        kept.append(m[torch.randperm(len(m), generator=gen)[:take]])
        left -= take
    return torch.cat(kept) if kept else rest[:0]


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


def select(scores, fraction: float, keep: str = "hard", labels=None, seed: int = 0,
           hard_cutoff: float | None = None, strata: int = CCS_STRATA) -> torch.Tensor:
    """Indices of the ``round(fraction * N)`` examples to keep (at least one), sorted.

    Args:
        scores: ``[N]`` difficulty scores (larger is harder: EL2N, GraNd, forgetting counts,
            prototype distances; pass ``-aum`` for the area under the margin); ignored for
            ``keep="random"`` except for its length.
        fraction: kept fraction in (0, 1].
        keep: ``"hard"`` (highest scores), ``"easy"`` (lowest), ``"random"``, ``"ccs"``
            (coverage-centric, Zheng et al. 2023: drop the hardest ``hard_cutoff`` fraction, then
            sample the budget evenly across ``strata`` score bins; it holds at high pruning rates,
            where score-only policies collapse) or ``"moderate"`` (Moderate-DS, Xia et al. 2023:
            the scores nearest the median, within each class when ``labels`` are given).
        labels: ``[N]`` class labels; when given the budget is split equally across classes
            (a class with fewer points than its share keeps all of them and the rest is
            shared among the other classes, with a warning saying so), and every policy
            ranks within each class.
        seed: breaks ties and draws the random subset (and CCS's samples within a bin).
        hard_cutoff: ``keep="ccs"`` only: the fraction of hardest examples dropped first (default
            0: pure coverage). The paper tunes it per data set; its CIFAR-10 value at 90% pruned
            (0.3, :func:`ccs_hard_cutoff`) cost 2.1 points on MNIST (60,000 images, EL2N scores,
            90% pruned: 96.7% against 98.8% without the cut; random 98.2%), where the hardest
            examples are informative rather than mislabelled.
        strata: ``keep="ccs"`` only: the number of score bins (default 50, the paper's).
    """
    scores = as_tensor(scores, "scores")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-d [N], got shape {tuple(scores.shape)}")
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {', '.join(repr(k) for k in KEEPS)}, got {keep!r}")
    fraction = check_fraction(fraction)
    if keep == "ccs":
        if hard_cutoff is None:
            hard_cutoff = 0.0
        elif check_nonnegative(hard_cutoff, "hard_cutoff") >= 1.0:
            raise ValueError(f"hard_cutoff must be in [0, 1), got {hard_cutoff!r}")
        strata = check_positive_int(strata, "strata")
    # ranked in the scores' own precision (float64 near-ties stay apart); integers exactly
    scores = scores.cpu() if scores.dtype in (torch.float64, torch.float32) else scores.double().cpu()
    if keep != "random":
        check_finite(scores, "scores")
    N = len(scores)
    if N == 0:
        raise ValueError("scores has no samples (it is empty)")
    gen = torch.Generator().manual_seed(seed)
    budget = _budget(N, fraction)
    ties_only = bool((scores == scores[0]).all())
    if keep != "random" and budget < N and N > 1 and ties_only:
        warnings.warn(f"all {N} scores are equal ({float(scores[0]):g}): keep={keep!r} has nothing to rank by, "
                      "so the selection falls back to a seeded random subset", stacklevel=2)

    sparse = []  # (class, size) of the groups with fewer points than CCS strata

    def pick(rows_scores, quota, group=None):
        if keep != "ccs":
            return _order(rows_scores, keep, gen)[:quota]
        if len(rows_scores) < strata and quota < len(rows_scores) and not ties_only:
            sparse.append((group, len(rows_scores)))
        return _ccs(rows_scores, quota, hard_cutoff, strata, gen)

    def say_sparse():
        if not sparse:
            return
        what = (f"the data has {sparse[0][1]} points, fewer" if sparse[0][0] is None else
                f"classes {[c for c, _ in sparse]} have fewer points ({[n for _, n in sparse]})")
        warnings.warn(f"{what} than the {strata} CCS strata: most score bins hold one point or none, so CCS "
                      "samples nearly uniformly across the score range there (pass strata= to change)", stacklevel=3)

    if labels is None:
        kept = pick(scores, budget)
        say_sparse()
        return torch.sort(kept).values
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
        kept.append(rows[pick(scores[rows], q, int(c))])
    say_sparse()
    return torch.sort(torch.cat(kept)).values


class Recommendation(NamedTuple):
    keep: str  # "easy" or "hard"
    reason: str


def recommend_keep(n_samples: int, fraction: float, num_classes: int = 1, boundary=None,
                   dim: int | None = None) -> Recommendation:
    """Which end of a difficulty ranking to keep (Sorscher et al. 2022), from a measured boundary.

    With scarce data (or heavy pruning) keeping the *easy* examples wins; with abundant data (and
    light pruning) keeping the *hard* ones does; where the line between lies depends on the data,
    the model and the metric, so it is measured, not assumed:

    - ``boundary``: a :class:`~fastdd.pruning.boundary.KeepBoundary` measured on your data
      (:func:`~fastdd.pruning.boundary.pilot_boundary`, a small sweep whose cost it states);
    - else ``dim``: the dimension of the representation the difficulty lives in (the embedding's
      width for prototype scores): the teacher-student perceptron's measured boundary, with the
      training set in units of ``alpha = (2 n_samples / num_classes) / dim`` (the theory's P / d for
      its two classes).

    The reason says what was measured and how far the point lies from the boundary.
    """
    from .boundary import KeepBoundary, theory_boundary

    check_positive_int(n_samples, "n_samples")
    fraction = check_fraction(fraction)
    check_positive_int(num_classes, "num_classes")
    if boundary is None:
        if dim is None:
            raise ValueError("recommend_keep needs a measured boundary (boundary=pilot_boundary(X, y, scores) on "
                             "your data) or dim=, the dimension of the representation the scores come from, for "
                             "the teacher-student theory's boundary")
        dim = check_positive_int(dim, "dim")
        boundary = theory_boundary()
        n = 2 * n_samples / num_classes / dim
        where = f"alpha = 2 x {n_samples} / {num_classes} classes / {dim} dims = {n:.3g}"
    else:
        if not isinstance(boundary, KeepBoundary):
            raise ValueError(f"boundary must be a KeepBoundary (from pilot_boundary), got {type(boundary).__name__}")
        n = n_samples / num_classes
        where = f"{n:.0f} {boundary.unit}"
    margin = boundary.margin(n, fraction)
    keep = "hard" if margin > 0 else "easy"
    lo, hi = boundary.n_range
    outside = "" if lo <= n <= hi else f" (outside the measured range {lo:.3g}-{hi:.3g}: extrapolated)"
    cross = boundary.crossover(fraction)
    line = "" if cross is None else f"; at {fraction:.0%} kept the policies swap near {cross:.3g}"
    why = ("data is abundant for this kept fraction: the easy examples are redundant" if keep == "hard" else
           "data is scarce for this kept fraction: the model still needs the prototypical examples")
    return Recommendation(keep, f"{where}{outside}, {fraction:.0%} kept, lies on the keep-{keep} side of the "
                                f"boundary measured by {boundary.source} (margin {margin:+.2f}{line}): {why}")


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
