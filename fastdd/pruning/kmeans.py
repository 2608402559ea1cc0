"""k-means (k-means++ seeding, Lloyd iterations) and self-supervised prototype scores.

Assignments are computed a chunk of rows at a time (``||x||^2 - 2 x.c + ||c||^2``
through one GEMM per chunk), so no more than ``chunk x k`` distances ever exist. That
expansion cancels catastrophically on uncentred data, so the Euclidean metric runs on
data centred at its mean (distances do not change) and centroids are shifted back.
float64 data is clustered in float64; other dtypes in float32. Works on any device the
data lives on.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from .._chunking import chunks
from .._validate import as_labels, as_matrix, check_positive_int, compute_dtype

METRICS = ("euclidean", "cosine")


class KMeansResult(tuple):
    """``(centroids, assignments)``, with ``objective``, ``n_iter`` and ``history`` as attributes.

    centroids ``[k, d]`` (unit norm for the cosine metric); assignments ``[N]`` int64;
    objective: sum of squared distances (euclidean) or of 1 - cos (cosine); history: the
    objective after each assignment step of the best run.
    """

    def __new__(cls, centroids, assignments, objective: float, n_iter: int, history: list):
        self = super().__new__(cls, (centroids, assignments))
        self.objective, self.n_iter, self.history = objective, n_iter, history
        return self

    @property
    def centroids(self) -> torch.Tensor:
        return self[0]

    @property
    def assignments(self) -> torch.Tensor:
        return self[1]


def _prepare(X, metric):
    """The rows to cluster, in the compute dtype, and the offset removed from them: unit rows
    for the cosine metric (offset 0), rows centred at their mean for the Euclidean one."""
    if metric not in METRICS:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    X = X.to(compute_dtype(X))
    if metric == "cosine":
        norms = X.norm(dim=1)
        if (norms == 0).any():
            raise ValueError(f"the cosine metric needs non-zero rows; rows {torch.nonzero(norms == 0).flatten()[:5].tolist()} are zero")
        return X / norms.unsqueeze(1), None
    offset = X.mean(0)
    return X - offset, offset


def assign(X: torch.Tensor, C: torch.Tensor, chunk_size: int | None = None, x_sq: torch.Tensor | None = None,
           second: bool = False):
    """Nearest centroid and squared distance to it for each row: ``([N], [N])``, plus the
    squared distance to the second nearest (``[N]``; equal to the first on a tie) if ``second``.

    Rows go in cache-sized chunks (about 4 MB of distances). ``min(dim=1)`` with indices
    is slow on the CPU for a short inner dim, so the minimum comes from ``amin`` and its
    index from an equality mask times ``[0..k)`` (a GEMV); exact ties fall back to argmin.
    """
    N, k = X.shape[0], C.shape[0]
    c_sq = C.square().sum(1)
    if x_sq is None:
        x_sq = X.square().sum(1)
    # about 4 MB of distances per chunk, a power of two of rows (odd GEMM sizes run up to 2x slower here)
    step = chunk_size if chunk_size is not None else 1 << max(8, ((4 << 20) // (4 * k)).bit_length() - 1)
    idx = torch.empty(N, dtype=torch.long, device=X.device)
    dist = torch.empty(N, dtype=X.dtype, device=X.device)
    dist2 = torch.empty(N, dtype=X.dtype, device=X.device) if second else None
    index_and_one = torch.stack([torch.arange(k, device=X.device, dtype=X.dtype), torch.ones(k, device=X.device, dtype=X.dtype)], 1)
    for s in chunks(N, max(1, min(N, step))):
        d = torch.addmm(c_sq.unsqueeze(0), X[s], C.T, alpha=-2.0)  # ||c||^2 - 2 x.c  [rows, k]
        best = d.amin(1)
        hits = (d == best.unsqueeze(1)).to(X.dtype) @ index_and_one  # [rows, 2]: index sum, count
        arg = hits[:, 0].long()
        tie = hits[:, 1] != 1
        if tie.any():
            arg[tie] = d[tie].argmin(1)
        idx[s] = arg
        dist[s] = (best + x_sq[s]).clamp_min_(0)
        if second:
            runner_up = d.masked_fill(d == best.unsqueeze(1), float("inf")).amin(1)
            runner_up = torch.where(tie, best, runner_up) if k > 1 else torch.full_like(best, float("inf"))
            dist2[s] = (runner_up + x_sq[s]).clamp_min_(0)
    return (idx, dist, dist2) if second else (idx, dist)


def _kmeanspp(X, k, gen, chunk_size):
    """Greedy k-means++ (2 + log k candidates per step, the best kept), as scikit-learn seeds."""
    N = X.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(N, (1,), generator=gen))
    C = X.new_empty(k, X.shape[1])
    C[0] = X[first]
    x_sq = X.square().sum(1)
    closest = (x_sq - 2 * X @ C[0] + C[0].square().sum()).clamp_min_(0)
    for j in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: repeat existing ones
            cand = torch.randint(N, (trials,), generator=gen)
        else:
            cand = torch.multinomial((closest / total).cpu(), trials, replacement=True, generator=gen)
        cand = cand.to(X.device)
        d = (x_sq.unsqueeze(1) - 2 * X @ X[cand].T + x_sq[cand].unsqueeze(0)).clamp_min_(0)  # [N, trials]
        new_closest = torch.minimum(closest.unsqueeze(1), d)
        best = int(new_closest.sum(0).argmin())
        C[j] = X[cand[best]]
        closest = new_closest[:, best].contiguous()
    return C


def kmeans(X, k: int, metric: str = "euclidean", n_init: int = 3, max_iter: int = 100, tol: float = 1e-4,
           seed: int = 0, chunk_size: int | None = None, track_history: bool = False) -> KMeansResult:
    """k-means of the rows of ``X [N, d]`` into ``k`` clusters.

    k-means++ seeding (greedy, as scikit-learn), Lloyd iterations (with Hamerly's bounds
    skipping points that cannot change cluster) until the centroids move less than
    ``tol`` times the mean per-feature variance (scikit-learn's rule), the best of
    ``n_init`` seeds. ``metric="cosine"`` runs spherical k-means on unit-norm rows
    (centroids renormalized; objective sum of 1 - cos). An emptied cluster keeps its
    centroid, so the objective never increases.

    Returns ``(centroids [k, d], assignments [N])`` as a :class:`KMeansResult`, which also
    carries ``objective`` (computed from the differences ``x - c``, exactly), ``n_iter`` and,
    with ``track_history``, the objective after each assignment step of the best run.
    Centroids are float64 for float64 ``X``, else float32; the result does not change when
    every point is shifted by the same vector (beyond rounding of the input).

    >>> res = kmeans(torch.randn(100, 4), k=3)
    >>> res.centroids.shape, res.assignments.shape
    (torch.Size([3, 4]), torch.Size([100]))
    """
    X = as_matrix(X, "X")
    k = check_positive_int(k, "k")
    if k > X.shape[0]:
        raise ValueError(f"k={k} is larger than the number of points ({X.shape[0]})")
    n_init = check_positive_int(n_init, "n_init")
    max_iter = check_positive_int(max_iter, "max_iter")
    Xw, offset = _prepare(X, metric)
    threshold = tol * Xw.var(0, unbiased=False).mean().item() if Xw.shape[0] > 1 else 0.0
    x_sq = Xw.square().sum(1)
    gen = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        C = _kmeanspp(Xw, k, gen, chunk_size)
        C, labels, it, history = _lloyd(Xw, C, x_sq, max_iter, threshold, metric, chunk_size, track_history)
        labels, _ = assign(Xw, C, chunk_size, x_sq)
        obj = _objective(_sq_dist_to(Xw, C, labels, chunk_size), metric)
        if track_history:
            history.append(obj)
        if best is None or obj < best.objective:
            best = KMeansResult(C, labels, obj, it, history)
    if offset is not None:
        best = KMeansResult(best.centroids + offset, best.assignments, best.objective, best.n_iter, best.history)
    return best


def _sq_dist_to(X, C, labels, chunk_size=None):
    """``||x_i - c_{labels_i}||^2`` from the differences (no cancellation), a chunk of rows at a time."""
    out = torch.empty(X.shape[0], dtype=X.dtype, device=X.device)
    for s in chunks(X.shape[0], chunk_size or 1 << 16):
        out[s] = (X[s] - C[labels[s]]).square().sum(1)
    return out


def _lloyd(X, C, x_sq, max_iter, threshold, metric, chunk_size, track_history):
    """Lloyd iterations with Hamerly's bounds: the same assignments as plain Lloyd, but a
    point is re-examined only when its upper bound (distance to its centroid) exceeds its
    lower bound (distance to any other); late iterations touch few points."""
    k = C.shape[0]
    labels, d1, d2 = assign(X, C, chunk_size, x_sq, second=True)
    upper, lower = d1.sqrt(), d2.sqrt()
    # distances from the expansion ||x||^2 - 2 x.c + ||c||^2 (on centred data): keep a safety margin
    margin = (1e-4 if X.dtype != torch.float64 else 1e-10) * float(x_sq.mean().sqrt()) + 1e-12
    history = []
    it = 0
    for it in range(1, max_iter + 1):
        if track_history:  # the objective of this assignment, exactly
            history.append(_objective(_sq_dist_to(X, C, labels, chunk_size), metric))
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        counts = torch.bincount(labels, minlength=k)
        nonempty = counts > 0
        C_new = C.clone()
        C_new[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(X.dtype)
        if metric == "cosine":
            C_new[nonempty] = F.normalize(C_new[nonempty], dim=1)
        moved = (C_new - C).norm(dim=1)
        C = C_new
        if float(moved.square().sum()) <= threshold:
            break
        upper += moved[labels]
        lower -= moved.max()
        rows = torch.nonzero(upper + margin > lower).flatten()
        if len(rows):
            # tighten the upper bound first: often that alone clears the point
            exact = (X[rows] - C[labels[rows]]).norm(dim=1)
            upper[rows] = exact
            rows = rows[exact + margin > lower[rows]]
        if len(rows):
            lab, r1, r2 = assign(X[rows], C, chunk_size, x_sq[rows], second=True)
            labels[rows], upper[rows], lower[rows] = lab, r1.sqrt(), r2.sqrt()
    return C, labels, it, history


def _objective(sq_dist, metric):
    # for unit vectors ||x - c||^2 = 2 (1 - cos)
    return float(sq_dist.sum() / 2) if metric == "cosine" else float(sq_dist.sum())


def prototype_scores(embeddings, n_clusters: int, labels=None, n_init: int = 3, max_iter: int = 100,
                     seed: int = 0, chunk_size: int | None = None) -> torch.Tensor:
    """Difficulty of each example: cosine distance to its nearest k-means centroid.

    The self-supervised prototype metric of Sorscher et al. (2022): cluster the
    (ideally self-supervised) embeddings ``[N, d]`` with spherical k-means; prototypical
    examples sit near a centroid (easy), atypical ones far from every centroid (hard).
    With ``labels``, each class is clustered on its own (``min(n_clusters, class size)``
    clusters), which also makes mislabelled examples far from their class score hard.

    Returns ``[N]`` scores in [0, 2] (float64 for float64 embeddings, else float32); larger is harder.
    """
    E = as_matrix(embeddings, "embeddings")
    n_clusters = check_positive_int(n_clusters, "n_clusters")
    if E.shape[0] > 1 and bool((E == E[0]).all()):
        raise ValueError(f"embeddings: all {E.shape[0]} rows are equal, so no example is more prototypical than "
                         "another; this is a broken embedding (an untrained or collapsed encoder?)")
    if labels is None:
        if n_clusters > E.shape[0]:
            raise ValueError(f"n_clusters={n_clusters} is larger than the number of points ({E.shape[0]})")
        res = kmeans(E, n_clusters, metric="cosine", n_init=n_init, max_iter=max_iter, seed=seed, chunk_size=chunk_size)
        return _cosine_distance_to_nearest(E, res.centroids)
    labels = as_labels(labels, "labels", n=E.shape[0])
    scores = torch.empty(E.shape[0], dtype=compute_dtype(E), device=E.device)
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        res = kmeans(E[rows], min(n_clusters, len(rows)), metric="cosine", n_init=n_init, max_iter=max_iter,
                     seed=seed, chunk_size=chunk_size)
        scores[rows] = _cosine_distance_to_nearest(E[rows], res.centroids)
    return scores


def _cosine_distance_to_nearest(E, centroids):
    U = F.normalize(E.to(centroids.dtype), dim=1)
    labels, _ = assign(U, centroids)
    return _sq_dist_to(U, centroids, labels) / 2  # 1 - cos for unit vectors
