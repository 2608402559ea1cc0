"""The buffer pool behind plain per_sample_grads calls: memory a caller holds is never handed
out again; memory every reference to which is gone is reused, with the same results."""
import pytest
import torch

import fastdd
from fastdd.grad import buffers
from fastdd.models import MLP, ConvNet

from helpers import vmap_per_sample_grads


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch):
    monkeypatch.delenv("FASTDD_REUSE_BUFFERS", raising=False)
    buffers.release()
    yield
    buffers.release()


def _problem():
    torch.manual_seed(0)
    return MLP(6, 3, hidden=(5,)), torch.randn(7, 6), torch.randint(0, 3, (7,))


def _ptrs(grads):
    return {k: v.data_ptr() for k, v in grads.items()}


def test_held_results_are_never_overwritten():
    model, x, y = _problem()
    held = [fastdd.per_sample_grads(model, x * (i + 1), y) for i in range(5)]  # all alive at once
    for i, g in enumerate(held):
        expected = vmap_per_sample_grads(model, x * (i + 1), y)
        for k in g:
            torch.testing.assert_close(g[k], expected[k], atol=1e-6, rtol=1e-5)
    assert len({p for g in held for p in _ptrs(g).values()}) == 5 * len(held[0])


def test_dropped_results_are_reused_with_the_same_answer():
    model, x, y = _problem()
    first = fastdd.per_sample_grads(model, x, y)
    expected, ptrs = {k: v.clone() for k, v in first.items()}, _ptrs(first)
    del first
    again = fastdd.per_sample_grads(model, x, y)
    assert _ptrs(again) == ptrs  # the same memory
    assert all(torch.equal(again[k], expected[k]) for k in again) and not again["classifier.weight"]._is_view()
    # a loop that holds the previous result while computing the next alternates between two sets
    seen = set()
    g = None
    for i in range(6):
        g = fastdd.per_sample_grads(model, x * (i + 1), y)
        seen.add(g["classifier.weight"].data_ptr())
    assert len(seen) == 2


@pytest.mark.parametrize("keep", ["view", "numpy", "row"])
def test_anything_sharing_the_memory_blocks_reuse(keep):
    model, x, y = _problem()
    g = fastdd.per_sample_grads(model, x, y)
    w = g["classifier.weight"]
    kept = {"view": lambda: w[2:5], "numpy": lambda: w.numpy(), "row": lambda: w[3]}[keep]()
    snapshot = torch.as_tensor(kept).clone()
    del g, w
    for i in range(4):  # more calls than the pool keeps sets
        fastdd.per_sample_grads(model, x * (i + 2), y)
    assert torch.equal(torch.as_tensor(kept), snapshot)


def test_pool_off_and_release(monkeypatch):
    model, x, y = _problem()
    g = fastdd.per_sample_grads(model, x, y)
    assert buffers.pooled_bytes() > 0
    del g
    buffers.release()
    assert buffers.pooled_bytes() == 0
    monkeypatch.setenv("FASTDD_REUSE_BUFFERS", "0")
    fastdd.per_sample_grads(model, x, y)
    assert buffers.pooled_bytes() == 0
    monkeypatch.setenv("FASTDD_REUSE_BUFFERS", "yes")
    with pytest.raises(ValueError, match="FASTDD_REUSE_BUFFERS must be 0 or 1"):
        fastdd.per_sample_grads(model, x, y)


def test_pool_serves_fallback_layers_and_training_steps():
    torch.manual_seed(1)
    model = ConvNet(1, 3, 8, width=4, depth=1).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    expected = vmap_per_sample_grads(model, x, y)
    for _ in range(3):
        with fastdd.PerSampleGrads(model, loss_reduction="sum") as ps:
            torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            g = ps.grads()
        for k in g:
            torch.testing.assert_close(g[k], expected[k], atol=1e-5, rtol=1e-4)
        model.zero_grad()


def test_out_buffers_are_checked_by_name():
    model, x, y = _problem()
    shapes = {n: (7, *p.shape) for n, p in model.named_parameters()}
    name = "classifier.weight"
    good = {n: torch.empty(s) for n, s in shapes.items()}
    with pytest.raises(ValueError, match=rf"out\['{name}'\] must have shape \(7, 3, 5\)"):
        fastdd.per_sample_grads(model, x, y, out={**good, name: torch.empty(6, 3, 5)})
    with pytest.raises(ValueError, match=rf"out\['{name}'\] must be torch.float32 on cpu .*got torch.float64"):
        fastdd.per_sample_grads(model, x, y, out={**good, name: torch.empty(7, 3, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="'nope' which is not a selected parameter|'nope', which is not"):
        fastdd.per_sample_grads(model, x, y, out={**good, "nope": torch.empty(1)})
    got = fastdd.per_sample_grads(model, x, y, out=good)
    assert got[name].data_ptr() == good[name].data_ptr()
