"""Two gloo processes give what one process gives (fastdd.distributed)."""
import pytest
import torch
import torch.multiprocessing as mp

from conftest import assert_close
from dist_worker import compute, run
from fastdd.distributed import shard, world


def test_helpers_are_identities_without_a_process_group():
    assert world() == (0, 1)
    assert shard(7) == slice(0, 7)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    torch.distributed.is_available() or pytest.skip("torch.distributed unavailable")
    mp.spawn(run, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    single = compute()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.pop("world") == (rank, 2) and got.pop("shard_of_13") == [slice(0, 7), slice(7, 13)][rank]
        for key, expected in single.items():
            assert_close(got[key], expected, atol=1e-5, rtol=1e-4, name=f"rank {rank} {key}")
