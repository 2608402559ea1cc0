"""Semantic deduplication (SemDeDup, Abbas et al. 2023): near-duplicates by embedding cosine similarity.

Spherical k-means splits the embeddings into clusters; within a cluster the members are ordered
(by default the least prototypical, farthest from the centroid, first) and a member is a duplicate
when its cosine similarity to an earlier member exceeds ``1 - eps``. Each member's largest
similarity to the earlier ones is computed once, in column blocks of its cluster, so memory is
O(cluster size x block) and never N x N; any ``eps`` then reads off the same result.

    >>> res = semdedup(embeddings)                  # doctest: +SKIP
    >>> keep = res.kept(eps=0.05)                   # indices to keep, sorted   # doctest: +SKIP
    >>> res.removed_fraction(0.02), res.duplicate_of[i]                        # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._chunking import chunks
from .._validate import as_matrix, check_nonnegative, check_positive_int, compute_dtype

ORDERS = ("hard", "easy", "random")


@dataclass
class SemDeDupResult:
    """Per point: its cluster, its largest cosine similarity to an earlier member of its cluster
    (``-inf`` for a cluster's first member) and which member that is (-1 for none)."""

    clusters: torch.Tensor  # [N] cluster of each point
    max_similarity: torch.Tensor  # [N]
    duplicate_of: torch.Tensor  # [N] index of the most similar earlier member, -1 for none
    eps: float  # the default threshold of kept() / removed()

    def removed(self, eps: float | None = None) -> torch.Tensor:
        """Sorted indices of the duplicates at threshold ``eps`` (similarity > 1 - eps)."""
        eps = self.eps if eps is None else check_nonnegative(eps, "eps")
        return torch.nonzero(self.max_similarity > 1.0 - eps).flatten()

    def kept(self, eps: float | None = None) -> torch.Tensor:
        """Sorted indices of the points kept at threshold ``eps``."""
        eps = self.eps if eps is None else check_nonnegative(eps, "eps")
        return torch.nonzero(~(self.max_similarity > 1.0 - eps)).flatten()

    def removed_fraction(self, eps: float | None = None) -> float:
        return len(self.removed(eps)) / len(self.max_similarity)


def semdedup(embeddings, eps: float = 0.05, n_clusters: int | None = None, order: str = "hard", seed: int = 0,
             max_iter: int = 30, block: int = 1024) -> SemDeDupResult:
    """SemDeDup of ``embeddings [N, d]`` (cosine similarity of the rows as given: raw embeddings,
    as the paper uses them).

    Args:
        eps: duplicates have cosine similarity above ``1 - eps`` (the paper sweeps 0.0005 to 0.3);
            the default of :meth:`SemDeDupResult.kept`, which takes any other.
        n_clusters: k-means clusters (default ``round(sqrt(N))``: clusters of about sqrt(N) points).
        order: which member of a group of duplicates is kept: ``"hard"`` (farthest from the cluster
            centroid, the paper's default), ``"easy"`` (nearest) or ``"random"``.
        max_iter: Lloyd iterations of the (spherical) k-means.
        block: columns of a cluster's similarity computed at once (memory: cluster size x block).
    """
    from ..pruning.kmeans import kmeans

    E = as_matrix(embeddings, "embeddings")
    N = E.shape[0]
    eps = check_nonnegative(eps, "eps")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    block = check_positive_int(block, "block")
    if N > 1 and bool((E == E[0]).all()):
        raise ValueError(f"embeddings: all {N} rows are equal, so every point duplicates every other; "
                         "this is a broken embedding (an untrained or collapsed encoder?), not data to deduplicate")
    norms = E.norm(dim=1)
    if (norms == 0).any():
        raise ValueError(f"embeddings rows {torch.nonzero(norms == 0).flatten()[:5].tolist()} are zero: "
                         "cosine similarity is undefined for them")
    k = max(1, round(math.sqrt(N))) if n_clusters is None else check_positive_int(n_clusters, "n_clusters")
    if k > N:
        raise ValueError(f"n_clusters={k} is larger than the number of points ({N})")
    U = F.normalize(E.to(compute_dtype(E)), dim=1)
    res = kmeans(U, k, metric="cosine", n_init=1, max_iter=max_iter, seed=seed)
    clusters = res.assignments
    centroids = F.normalize(res.centroids.to(U.dtype), dim=1)
    max_sim = torch.full((N,), -math.inf, dtype=U.dtype, device=U.device)
    dup_of = torch.full((N,), -1, dtype=torch.long, device=U.device)
    gen = torch.Generator().manual_seed(seed)
    members_of = torch.argsort(clusters, stable=True)
    counts = torch.bincount(clusters, minlength=k).tolist()
    start = 0
    for c, m in enumerate(counts):
        rows = members_of[start:start + m]
        start += m
        if m < 2:
            continue
        if order == "random":
            rows = rows[torch.randperm(m, generator=gen)]
        else:  # farthest from the centroid first for "hard" (the lowest similarity to it)
            to_centroid = U[rows] @ centroids[c]
            rows = rows[torch.argsort(to_centroid, descending=(order == "easy"), stable=True)]
        V = U[rows]
        for s in chunks(m, block):
            cols = torch.arange(s.start, s.stop, device=U.device)
            sim = V[:s.stop] @ V[s].T  # [earlier members and this block, block]
            # only strictly earlier members count: row i < column j
            sim.masked_fill_(torch.arange(s.stop, device=U.device).unsqueeze(1) >= cols.unsqueeze(0), -math.inf)
            best, arg = sim.max(0)
            max_sim[rows[s]] = best
            dup_of[rows[s]] = torch.where(torch.isfinite(best), rows[arg], torch.full_like(arg, -1))
    return SemDeDupResult(clusters, max_sim, dup_of, eps)
