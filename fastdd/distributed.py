"""Data parallelism under ``torch.distributed``: shard the work, gather the results.

Nothing here starts a process group: when the user has initialized one (``torchrun``, or
``torch.distributed.init_process_group``) with more than one rank, the valuation and
distillation routines that support it split their data across ranks and combine the
results, so every rank ends with the same answer a single process would give (up to
the order of floating-point sums). Without a group every helper is the identity.

    torchrun --nproc-per-node 4 my_script.py     # the script calls fastdd as usual

Supported: ``knn_shapley`` (test points sharded), ``tmc_shapley`` (permutations),
``InfluenceFunction.scores`` and ``.self_influence`` (training batches sharded),
``grand_scores`` (per-sample gradient norms, batches sharded), ``DistributionMatching``
(real embeddings sharded) and ``GradientMatching`` (real-side class gradients sharded).
"""
from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_parallel() -> bool:
    """Whether an initialized process group has more than one rank."""
    return world()[1] > 1


def shard(n: int) -> slice:
    """This rank's contiguous share of ``range(n)`` (the first ranks take one more when uneven)."""
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (in place; returned)."""
    if is_parallel():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same trailing shape, any number of rows) concatenated in rank order."""
    if not is_parallel():
        return t
    import torch.distributed as dist

    _, size = world()
    n = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    rows = max(int(c) for c in counts)
    padded = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)])
