"""pytest-benchmark: the per-sample gradient engine against torch.func vmap, per consumer and
workload (groups "<consumer>: <workload>"). The workloads are bench/workloads.py's, shared with
bench_per_sample.py (which writes the markdown table with ratios and memory).

    pytest bench/test_bench_engine.py --benchmark-only [--benchmark-autosave]
"""
import pytest
import torch

import fastdd
from conftest import backends
from workloads import CLIP_METHODS, ENGINE, ce, clipped_step, dot_vectors, engine_workload, vmap_consumer

CONSUMERS = {"grads": ["mlp", "convnet", "linear_seq"], "norms": ["mlp", "convnet", "seq2"], "dots": ["mlp", "seq2"]}
# fastdd through every backend this machine has (CPU: the torch path), the public alternative
METHODS = [f"fastdd-{b}" for b in backends()] + ["fastdd-plain", "vmap"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(consumer, workload, method, force_backend):
    model, x, y, loss_fn = engine_workload(workload)
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    vectors = {n: v.to(DEVICE) for n, v in dot_vectors(model).items()} if consumer == "dots" else None
    if method == "vmap":
        return vmap_consumer(model, x, y, loss_fn, consumer, vectors)
    if method.startswith("fastdd-") and method != "fastdd-plain":
        force_backend(method.split("-", 1)[1])
    if consumer == "grads":
        if method == "fastdd-plain":  # no out=: what a plain call in a loop gets
            return lambda: fastdd.per_sample_grads(model, x, y, loss_fn=loss_fn)
        out = {n: torch.empty(x.shape[0], *p.shape, device=DEVICE) for n, p in model.named_parameters()}
        return lambda: fastdd.per_sample_grads(model, x, y, loss_fn=loss_fn, out=out)
    if consumer == "norms":
        return lambda: fastdd.per_sample_grad_norms(model, x, y, loss_fn=loss_fn)
    return lambda: fastdd.per_sample_grad_dots(model, x, y, vectors, loss_fn=loss_fn)


def _sync(fn):
    if DEVICE != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out
    return synced


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("consumer,workload", [(c, w) for c, ws in CONSUMERS.items() for w in ws])
def test_engine(benchmark, force_backend, consumer, workload, method):
    if consumer != "grads" and method == "fastdd-plain":
        pytest.skip("plain and out= differ only for materialized gradients")
    benchmark.group = f"{consumer}: {ENGINE[workload]}"
    fn = _sync(_case(consumer, workload, method, force_backend))
    result = benchmark(fn)
    B = engine_workload(workload)[1].shape[0]
    rows = next(iter(result.values())).shape[0] if isinstance(result, dict) else result.shape[0]
    assert rows == B  # each method returns one row per sample


@pytest.mark.parametrize("method", CLIP_METHODS)
@pytest.mark.parametrize("workload", ["mlp", "convnet"])
def test_clipped_step(benchmark, workload, method):
    """A training step with per-sample clipping (torch path) against the plain step and vmap."""
    benchmark.group = f"clipped step: {ENGINE[workload]}"
    model, x, y, loss_fn = engine_workload(workload)
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    step = _sync(clipped_step(model, x, y, loss_fn or ce, method))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    benchmark(step)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # it stepped


@pytest.mark.parametrize("path", ["in_place", "column_blocks", "torch_copy", "unweighted"])
def test_weighted_sum(benchmark, path):
    """A clipped step's per-layer op, sum_i w_i g_i a_i^T, on the MLP's first layer (784 -> 512, B=256):
    the rule scaling G's rows in place and back (the default on a CPU), its column blocks of a
    reweighted copy (G held outside autograd, or off the CPU), torch on a whole reweighted copy, and
    the unweighted GEMM (a plain step's weight gradient, the floor)."""
    from torch import nn

    from fastdd.grad.rules import LinearRule

    benchmark.group = "weighted sum: Linear 784 -> 512, B=256"
    g = torch.Generator().manual_seed(0)
    m = nn.Linear(784, 512).to(DEVICE)
    A = torch.randn(256, 784, generator=g).to(DEVICE)
    G = torch.randn(256, 512, generator=g).to(DEVICE)
    w = (torch.rand(256, generator=g) + 0.05).to(DEVICE)
    rule = LinearRule()
    if path == "torch_copy":
        fn = lambda: {"weight": (G * w[:, None]).T @ A}  # noqa: E731
    else:
        weights = None if path == "unweighted" else w
        fn = lambda: rule.batch_sum(m, A, G, weights=weights, g_shared=path == "column_blocks")  # noqa: E731
    got = benchmark(_sync(fn))["weight"]
    expected = (G * w[:, None]).T @ A if path != "unweighted" else G.T @ A
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
