"""Monte Carlo Data Shapley (TMC, Ghorbani & Zou 2019) and Data Banzhaf (MSR, Wang & Jia 2023).

Both call a utility ``U(indices) -> float`` (see ``fastdd.valuation.utility``), checkpoint
their running sums, and resume from a checkpoint to the same result as an uninterrupted
run with the same seed (the random generator's state is saved too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed import all_gather_rows, world
from .. import _checkpoint
from .._validate import check_positive_int

Utility = Callable[[torch.Tensor], float]


@dataclass
class ValuationResult:
    values: torch.Tensor  # [n]
    stderr: torch.Tensor  # [n] standard error of each value
    n_samples: int  # permutations (TMC) or subsets (MSR) used
    converged: bool


def _progress(total, desc, enabled, initial=0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial)


def tmc_shapley(utility: Utility, n: int, max_permutations: int = 500, truncation_tol: float = 0.01,
                convergence_tol: float = 0.05, min_permutations: int = 20, seed: int = 0,
                checkpoint: str | None = None, checkpoint_every: int = 10, progress: bool = False) -> ValuationResult:
    """Truncated Monte Carlo Shapley values of n data points.

    Each permutation adds points one by one and credits each with its marginal utility;
    once the running utility is within ``truncation_tol * |U(all)|`` of ``U(all)`` the rest
    of the permutation is credited zero (Ghorbani & Zou). Stops after ``max_permutations``
    or once, past ``min_permutations``, the mean standard error is below
    ``convergence_tol`` times the mean absolute value. With ``truncation_tol=0`` every
    permutation's marginals sum to ``U(all) - U(empty)`` exactly.

    Under a ``torch.distributed`` group each rank walks one permutation of every round of
    ``world_size`` and all ranks return the same values as one process would; rank 0 writes
    the checkpoint.

    Returns a :class:`ValuationResult` (values, stderr, permutations used, converged).
    """
    check_positive_int(n, "n")
    check_positive_int(max_permutations, "max_permutations")
    if truncation_tol < 0:
        raise ValueError(f"truncation_tol must be non-negative, got {truncation_tol}")
    identity = {"method": "tmc_shapley", "n": n, "seed": seed, "truncation_tol": truncation_tol}
    state = _checkpoint.load(checkpoint, identity)
    gen = torch.Generator().manual_seed(seed)
    if state is None:
        full, empty = float(utility(torch.arange(n))), float(utility(torch.empty(0, dtype=torch.long)))
        total, total_sq, done = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0
    else:
        full, empty, total, total_sq, done = state["full"], state["empty"], state["sum"], state["sum_sq"], state["done"]
        gen.set_state(state["rng"])
    bar = _progress(max_permutations, "TMC-Shapley permutations", progress, done)
    converged = False
    rank, size = world()

    def marginals(perm):
        marginal = torch.zeros(n, dtype=torch.float64)
        prev = empty
        for j in range(n):
            cur = float(utility(perm[:j + 1]))
            marginal[perm[j]] = cur - prev
            prev = cur
            if abs(full - cur) <= truncation_tol * abs(full):
                break  # the rest of the permutation adds (about) nothing
        return marginal

    while done < max_permutations and not converged:
        # a round: every rank draws the same permutations and walks its own; all ranks then
        # add all of them in order, so the sums match a single process's
        perms = [torch.randperm(n, generator=gen) for _ in range(min(size, max_permutations - done))]
        mine = marginals(perms[rank]).unsqueeze(0) if rank < len(perms) else torch.zeros(0, n, dtype=torch.float64)
        for marginal in all_gather_rows(mine):
            total += marginal
            total_sq += marginal.square()
            done += 1
            if bar is not None:
                bar.update(1)
            if checkpoint and rank == 0 and (done % checkpoint_every == 0 or done == max_permutations):
                _checkpoint.save(checkpoint, {"identity": identity, "full": full, "empty": empty, "sum": total,
                                              "sum_sq": total_sq, "done": done, "rng": gen.get_state()})
            if done >= min_permutations:
                values, stderr = _mean_stderr(total, total_sq, done)
                if stderr.mean() <= convergence_tol * values.abs().mean():
                    converged = True
                    break
    if bar is not None:
        bar.close()
    if checkpoint and rank == 0:
        _checkpoint.save(checkpoint, {"identity": identity, "full": full, "empty": empty, "sum": total,
                                      "sum_sq": total_sq, "done": done, "rng": gen.get_state()})
    values, stderr = _mean_stderr(total, total_sq, done)
    return ValuationResult(values.float(), stderr.float(), done, converged)


def _mean_stderr(total, total_sq, m):
    mean = total / m
    var = (total_sq / m - mean.square()).clamp_min(0) * (m / max(m - 1, 1))
    return mean, (var / m).sqrt()


def banzhaf_msr(utility: Utility, n: int, n_samples: int = 2000, seed: int = 0, checkpoint: str | None = None,
                checkpoint_every: int = 100, progress: bool = False) -> ValuationResult:
    """Data Banzhaf values by maximum sample reuse (Wang & Jia 2023).

    Draws subsets with each point in or out with probability 1/2; every utility
    evaluation serves every point: ``value_i = mean U(S : i in S) - mean U(S : i not in S)``.
    """
    check_positive_int(n, "n")
    check_positive_int(n_samples, "n_samples")
    identity = {"method": "banzhaf_msr", "n": n, "seed": seed}
    state = _checkpoint.load(checkpoint, identity)
    gen = torch.Generator().manual_seed(seed)
    names = ("sum_in", "sq_in", "cnt_in", "sum_out", "sq_out", "cnt_out")
    if state is None:
        acc = {k: torch.zeros(n, dtype=torch.float64) for k in names}
        done = 0
    else:
        acc, done = {k: state[k] for k in names}, state["done"]
        gen.set_state(state["rng"])
    bar = _progress(n_samples, "Banzhaf MSR subsets", progress, done)

    def snapshot():
        return {"identity": identity, "done": done, "rng": gen.get_state(), **acc}

    while done < n_samples:
        inside = torch.rand(n, generator=gen) < 0.5
        u = float(utility(torch.nonzero(inside).flatten()))
        w = inside.double()
        acc["sum_in"] += u * w
        acc["sq_in"] += u * u * w
        acc["cnt_in"] += w
        acc["sum_out"] += u * (1 - w)
        acc["sq_out"] += u * u * (1 - w)
        acc["cnt_out"] += 1 - w
        done += 1
        if bar is not None:
            bar.update(1)
        if checkpoint and done % checkpoint_every == 0:
            _checkpoint.save(checkpoint, snapshot())
    if bar is not None:
        bar.close()
    if checkpoint:
        _checkpoint.save(checkpoint, snapshot())
    c_in, c_out = acc["cnt_in"].clamp_min(1), acc["cnt_out"].clamp_min(1)
    m_in, m_out = acc["sum_in"] / c_in, acc["sum_out"] / c_out
    var_in = (acc["sq_in"] / c_in - m_in.square()).clamp_min(0)
    var_out = (acc["sq_out"] / c_out - m_out.square()).clamp_min(0)
    stderr = (var_in / c_in + var_out / c_out).sqrt()
    return ValuationResult((m_in - m_out).float(), stderr.float(), done, bool((acc["cnt_in"] > 0).all() and (acc["cnt_out"] > 0).all()))
