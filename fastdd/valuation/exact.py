"""Exact Shapley and Banzhaf values by enumerating every subset (tiny problems: the oracles)."""
from __future__ import annotations

import math
from typing import Callable

import torch

Utility = Callable[[torch.Tensor], float]


def _subset_utilities(utility: Utility, n: int) -> dict:
    if n > 16:
        raise ValueError(f"exact enumeration needs 2^n utility calls; n={n} is too large (at most 16)")
    return {mask: float(utility(torch.tensor([i for i in range(n) if mask >> i & 1], dtype=torch.long)))
            for mask in range(1 << n)}


def exact_shapley(utility: Utility, n: int) -> torch.Tensor:
    """Shapley values ``[n]``: sum over subsets S not containing i of |S|!(n-|S|-1)!/n! (U(S+i) - U(S))."""
    U = _subset_utilities(utility, n)
    values = torch.zeros(n, dtype=torch.float64)
    for mask, u in U.items():
        size = bin(mask).count("1")
        for i in range(n):
            if not mask >> i & 1:
                w = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                values[i] += w * (U[mask | 1 << i] - u)
    return values


def exact_banzhaf(utility: Utility, n: int) -> torch.Tensor:
    """Banzhaf values ``[n]``: the mean over subsets S not containing i of U(S+i) - U(S)."""
    U = _subset_utilities(utility, n)
    values = torch.zeros(n, dtype=torch.float64)
    for mask, u in U.items():
        for i in range(n):
            if not mask >> i & 1:
                values[i] += U[mask | 1 << i] - u
    return values / (1 << (n - 1))
