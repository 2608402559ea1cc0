"""Monte Carlo Data Shapley (TMC, Ghorbani & Zou 2019) and Data Banzhaf (MSR, Wang & Jia 2023).

Both call a utility ``U(indices) -> float`` (see ``fastdd.valuation.utility``), checkpoint
their running sums, and resume from a checkpoint to the same result as an uninterrupted
run with the same seed (the random generator's state is saved too).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed import all_gather_rows, world
from .. import _checkpoint
from .._validate import check_nonnegative, check_positive_int

Utility = Callable[[torch.Tensor], float]


@dataclass
class ValuationResult:
    values: torch.Tensor  # [n] float64 (utilities are Python floats)
    stderr: torch.Tensor  # [n] float64 standard error of each value
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
    ``convergence_tol`` times the mean absolute value (``convergence_tol=0``: never early).
    ``truncation_tol=0`` means no truncation: plain permutation sampling, an unbiased
    estimate of the Shapley values whose error falls like ``1 / sqrt(permutations)``, and
    every permutation's marginals sum to ``U(all) - U(empty)`` exactly.

    With ``checkpoint`` the sums, the generator and whether the run finished are saved; a
    rerun with the same options resumes (or, if it had finished, returns the same result
    without more permutations). The run's identity covers ``n``, the seed, the tolerances
    and a fingerprint of ``utility`` (its class, options and data), so a checkpoint of
    another run is refused; ``max_permutations`` may grow between runs, not shrink below
    what is done.

    Under a ``torch.distributed`` group each rank walks one permutation of every round of
    ``world_size`` and all ranks return the same values as one process would; rank 0 writes
    the checkpoint.

    Returns a :class:`ValuationResult` (values, stderr, permutations used, converged).
    """
    n = _check_players(n)
    max_permutations = check_positive_int(max_permutations, "max_permutations")
    truncation_tol = check_nonnegative(truncation_tol, "truncation_tol")
    convergence_tol = check_nonnegative(convergence_tol, "convergence_tol")
    min_permutations = check_positive_int(min_permutations, "min_permutations")
    identity = _checkpoint.fingerprint({
        "method": "tmc_shapley", "n": n, "seed": seed, "truncation_tol": truncation_tol,
        "convergence_tol": convergence_tol, "min_permutations": min_permutations, "utility": utility})
    state = _checkpoint.load(checkpoint, identity)
    gen = torch.Generator().manual_seed(seed)
    converged = False
    if state is None:
        full, empty = float(utility(torch.arange(n))), float(utility(torch.empty(0, dtype=torch.long)))
        total, total_sq, done = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0
    else:
        full, empty, total, total_sq, done = state["full"], state["empty"], state["sum"], state["sum_sq"], state["done"]
        _checkpoint.check_progress(checkpoint, done, max_permutations, "permutations")
        converged = bool(state["converged"])
        gen.set_state(state["rng"])
    bar = _progress(max_permutations, "TMC-Shapley permutations", progress, done)
    rank, size = world()

    def snapshot():
        return {"identity": identity, "full": full, "empty": empty, "sum": total, "sum_sq": total_sq, "done": done,
                "converged": converged, "rng": gen.get_state()}

    def marginals(perm):
        marginal = torch.zeros(n, dtype=torch.float64)
        prev = empty
        for j in range(n):
            cur = float(utility(perm[:j + 1]))
            marginal[perm[j]] = cur - prev
            prev = cur
            if truncation_tol > 0 and abs(full - cur) <= truncation_tol * abs(full):
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
            if done >= min_permutations and convergence_tol > 0:
                values, stderr = _mean_stderr(total, total_sq, done)
                converged = bool(stderr.mean() <= convergence_tol * values.abs().mean())
            if checkpoint and rank == 0 and done % checkpoint_every == 0:
                _checkpoint.save(checkpoint, snapshot())
            if converged:
                break
    if bar is not None:
        bar.close()
    if checkpoint and rank == 0:
        _checkpoint.save(checkpoint, snapshot())
    values, stderr = _mean_stderr(total, total_sq, done)
    return ValuationResult(values, stderr, done, converged)


def _check_players(n) -> int:
    if isinstance(n, numbers.Integral) and not isinstance(n, bool) and n == 0:
        raise ValueError("n=0: no samples to value")
    return check_positive_int(n, "n")


def _mean_stderr(total, total_sq, m):
    mean = total / m
    var = (total_sq / m - mean.square()).clamp_min(0) * (m / max(m - 1, 1))
    return mean, (var / m).sqrt()


def banzhaf_msr(utility: Utility, n: int, n_samples: int = 2000, seed: int = 0, checkpoint: str | None = None,
                checkpoint_every: int = 100, progress: bool = False) -> ValuationResult:
    """Data Banzhaf values by maximum sample reuse (Wang & Jia 2023).

    Draws subsets with each point in or out with probability 1/2; every utility
    evaluation serves every point: ``value_i = mean U(S : i in S) - mean U(S : i not in S)``.
    Checkpoints and resumes as :func:`tmc_shapley` does (identity: n, seed, utility).
    """
    n = _check_players(n)
    n_samples = check_positive_int(n_samples, "n_samples")
    identity = _checkpoint.fingerprint({"method": "banzhaf_msr", "n": n, "seed": seed, "utility": utility})
    state = _checkpoint.load(checkpoint, identity)
    gen = torch.Generator().manual_seed(seed)
    names = ("sum_in", "sq_in", "cnt_in", "sum_out", "sq_out", "cnt_out")
    if state is None:
        acc = {k: torch.zeros(n, dtype=torch.float64) for k in names}
        done = 0
    else:
        acc, done = {k: state[k] for k in names}, state["done"]
        _checkpoint.check_progress(checkpoint, done, n_samples, "subsets")
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
    return ValuationResult(m_in - m_out, stderr, done, bool((acc["cnt_in"] > 0).all() and (acc["cnt_out"] > 0).all()))
