"""Exact KNN-Shapley (Jia et al. 2019): closed form, vectorized over training points and
batched over test points.

For one test point with training points sorted by distance (nearest first)
``a_1 .. a_N`` and ``m_i = 1[y_{a_i} = y_test]``, the Shapley values of the KNN utility
``U(S) = (1/K) sum_{k <= min(K, |S|)} m_{a_k(S)}`` are

    s_{a_N} = m_N / N,
    s_{a_i} = s_{a_{i+1}} + (m_i - m_{i+1}) / K * min(K, i) / i,

i.e. a reversed cumulative sum after one sort. Values are averaged over test points.

Distances come from one GEMM per chunk (``||x_tr||^2 - 2 x.x_tr``) on data centred at the
training mean: the ranking does not change under a common shift, and the expansion does
not cancel on uncentred data. float64 inputs are ranked in float64.
"""
from __future__ import annotations

import torch

from .._chunking import chunks, rows_per_chunk
from ..distributed import all_gather_rows, all_sum, shard
from .._validate import as_labels, as_matrix, centred, check_positive_int


def knn_shapley(X_train, y_train, X_test, y_test, k: int = 5, chunk_size: int | None = None,
                return_per_test: bool = False) -> torch.Tensor:
    """Exact Shapley values ``[n_train]`` of each training point for the KNN classifier utility.

    Args:
        X_train: ``[N, d]`` features or embeddings; y_train ``[N]`` labels.
        X_test: ``[T, d]``; y_test ``[T]``.
        k: neighbours of the KNN utility (at most N).
        chunk_size: test points per chunk (default: what fits ``FASTDD_CHUNK_MB``); memory is
            ``O(chunk x N)``, never ``T x N`` unless asked for.
        return_per_test: also return the ``[T, N]`` matrix of per-test values.

    Returns:
        ``[N]`` values averaged over test points (and the ``[T, N]`` matrix if asked), float64
        for float64 features, else float32. Larger is more helpful; mislabelled points get
        negative values.

    Under an initialized ``torch.distributed`` group the test points are split across ranks
    and every rank returns the full result (:mod:`fastdd.distributed`).
    """
    X_train = as_matrix(X_train, "X_train")
    X_test = as_matrix(X_test, "X_test")
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"X_train has {X_train.shape[1]} features but X_test has {X_test.shape[1]}")
    N, T = X_train.shape[0], X_test.shape[0]
    y_train = as_labels(y_train, "y_train", n=N).to(X_train.device)
    y_test = as_labels(y_test, "y_test", n=T).to(X_train.device)
    k = check_positive_int(k, "k")
    if k > N:
        raise ValueError(f"k={k} is larger than the training set ({N} points)")
    X_train, X_test = centred(X_train, X_test)  # the expansion below then keeps its precision
    dtype = X_train.dtype
    tr_sq = X_train.square().sum(1)
    i = torch.arange(1, N, device=X_train.device, dtype=dtype)  # 1-indexed ranks 1..N-1
    weight = torch.clamp(i, max=k) / (i * k)  # min(K, i) / (i K)
    total = torch.zeros(N, dtype=torch.float64, device=X_train.device)
    mine = shard(T)  # this rank's test points (all of them without a process group)
    T_mine = mine.stop - mine.start
    per_test = torch.empty(T_mine, N, dtype=dtype, device=X_train.device) if return_per_test else None
    # a chunk holds distances, sort order and values: about 4 x 4 bytes per (test, train) pair
    for local in chunks(T_mine, rows_per_chunk(T_mine, 16 * N, chunk_size)):
        s = slice(mine.start + local.start, mine.start + local.stop)
        xt = X_test[s]
        dist = torch.addmm(tr_sq.unsqueeze(0), xt, X_train.T, alpha=-2.0)  # ||x_tr||^2 - 2 x.x_tr
        order = torch.argsort(dist, dim=1, stable=True)  # ties: lower index first
        match = (y_train[order] == y_test[s].unsqueeze(1)).to(dtype)  # [c, N] in sorted order
        diffs = (match[:, :-1] - match[:, 1:]) * weight  # [c, N-1]
        vals = torch.empty_like(match)
        vals[:, -1] = match[:, -1] / N
        # s_i = s_N + sum_{j >= i} d_j: reversed cumulative sum
        vals[:, :-1] = vals[:, -1:] + diffs.flip(1).cumsum(1).flip(1)
        total.index_add_(0, order.reshape(-1), vals.reshape(-1).double())
        if per_test is not None:
            per_test[local] = torch.empty_like(vals).scatter_(1, order, vals)
    values = (all_sum(total) / T).to(dtype)
    return (values, all_gather_rows(per_test)) if return_per_test else values
