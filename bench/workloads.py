"""The benchmark workloads, defined once: the ratio scripts (bench_*.py, markdown tables) and
the pytest-benchmark suites (test_bench_*.py) both build them from here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- the gradient engine
ENGINE = {
    "mlp": "MLP 784-512-256-10, B=256",
    "convnet": "ConvNet width 32, depth 3, 28x28, B=128",
    "linear_seq": "Linear 512->512 over [32, 128, 512]",
    "seq2": "Linear 512->512, GELU, Linear 512->16 over [32, 128, 512]",
}


def engine_workload(name: str):
    """``(model, x, y, loss_fn)`` of an engine workload (``loss_fn`` None: cross-entropy)."""
    from fastdd.models import MLP, ConvNet

    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        model = MLP(784, 10, hidden=(512, 256))
        x, y = torch.randn(256, 1, 28, 28, generator=g), torch.randint(0, 10, (256,), generator=g)
        return model, x, y, None
    if name == "convnet":
        model = ConvNet(1, 10, 28, width=32, depth=3)
        x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
        return model, x, y, None
    if name not in ENGINE:
        raise ValueError(f"unknown engine workload {name!r}; one of {sorted(ENGINE)}")
    layers = [nn.Linear(512, 512)] if name == "linear_seq" else [nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 16)]
    model = nn.Sequential(*layers)
    x = torch.randn(32, 128, 512, generator=g)
    y = torch.randn(32, 128, 512 if name == "linear_seq" else 16, generator=g)
    return model, x, y, sequence_loss


def sequence_loss(o, t):
    return (o - t).square().flatten(1).sum(1)


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def dot_vectors(model, k: int = 8) -> dict:
    """``k`` fixed random vectors per parameter, for the dot consumer."""
    g = torch.Generator().manual_seed(1)
    return {n: torch.randn(k, *p.shape, generator=g) for n, p in model.named_parameters()}


def vmap_per_sample(model, loss_fn=None):
    """The public alternative: ``per_sample(params, x, y) -> {name: [B, *shape]}`` by torch.func's
    vmap(grad) of each sample's own loss (``loss_fn`` per-sample, default cross-entropy)."""
    from torch.func import functional_call, grad, vmap

    loss_fn = loss_fn or ce

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]

    return vmap(grad(one), in_dims=(None, 0, 0))


def vmap_consumer(model, x, y, loss_fn, consumer: str, vectors=None):
    """vmap per-sample gradients (:func:`vmap_per_sample`), then the consumer."""
    detached = {n: p.detach() for n, p in model.named_parameters()}
    per_sample = vmap_per_sample(model, loss_fn)
    if consumer == "grads":
        return lambda: per_sample(detached, x, y)
    if consumer == "norms":
        return lambda: sum(g.flatten(1).square().sum(1) for g in per_sample(detached, x, y).values()).sqrt()
    return lambda: sum(g.flatten(1) @ vectors[n].flatten(1).T for n, g in per_sample(detached, x, y).items())


CLIP_METHODS = ["plain", "fastdd", "fastdd_param_grads", "fastdd_functional", "vmap"]


def clipped_step(model, x, y, loss_fn, method: str, max_norm: float = 1.0):
    """A zero-argument SGD training step with each sample's gradient clipped to ``max_norm``:
    unclipped (plain, the baseline), ghost clipping in the user's step (fastdd:
    ``PerSampleGrads(param_grads=False)``; fastdd_param_grads: the same with the step's full
    backward), ``fastdd.grad.clipped_grad`` doing the forward and an output-only backward itself
    (fastdd_functional), or vmap per-sample gradients clipped and summed (vmap, the non-ghost way).
    ``loss_fn`` gives per-sample losses."""
    import fastdd

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    params = dict(model.named_parameters())
    B = x.shape[0]

    def plain():
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()

    if method == "plain":
        return plain
    if method in ("fastdd", "fastdd_param_grads"):
        ps = fastdd.PerSampleGrads(model, loss_reduction="mean", param_grads=method == "fastdd_param_grads")
        ps.__enter__()  # hooks stay on for the life of the benchmark process

        def in_step():
            opt.zero_grad()
            loss_fn(model(x), y).mean().backward()
            ps.clipped_grad(max_norm, write_grad=True)
            opt.step()

        return in_step
    if method == "fastdd_functional":
        def functional():
            opt.zero_grad()
            fastdd.grad.clipped_grad(model, x, y, max_norm, loss_fn=loss_fn, reduction="mean", write_grad=True)
            opt.step()

        return functional
    if method != "vmap":
        raise ValueError(f"unknown clipping method {method!r}; one of {CLIP_METHODS}")
    detached = {n: p.detach() for n, p in params.items()}  # share memory: see each step's update
    per_sample = vmap_per_sample(model, loss_fn)

    def vmap_clipped():
        grads = per_sample(detached, x, y)
        norms = sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt()
        factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for n, p in params.items():
            p.grad = torch.tensordot(factors, grads[n], dims=1) / B
        opt.step()

    return vmap_clipped


# --------------------------------------------------------------------------- pruning and valuation
def kmeans_blobs(offset: float = 0.0):
    """100,000 x 64 points around 100 centres (optionally all shifted by ``offset``)."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(100, 64, generator=gen) * 4
    X = centers[torch.randint(0, 100, (100_000,), generator=gen)] + torch.randn(100_000, 64, generator=gen)
    return X + offset


def knn_problem(n_train: int = 100_000, n_test: int = 1000, d: int = 64):
    """Random features and labels for KNN-Shapley at scale: ``(X, y, X_test, y_test)``."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n_train, d, generator=g), torch.randint(0, 10, (n_train,), generator=g)
    Xt, yt = torch.randn(n_test, d, generator=g), torch.randint(0, 10, (n_test,), generator=g)
    return X, y, Xt, yt


def dedup_embeddings(n: int = 60_000, d: int = 32, duplicates: float = 0.05):
    """``n`` embeddings (an SSL encoder's size for MNIST) around 200 centres, uncentred, the last
    ``duplicates`` fraction near-copies (cosine > 0.9999) of random earlier rows: ``(E, n_planted)``."""
    gen = torch.Generator().manual_seed(0)
    n_dup = int(duplicates * n)
    centers = torch.randn(200, d, generator=gen) * 3
    base = centers[torch.randint(0, 200, (n - n_dup,), generator=gen)] + torch.randn(n - n_dup, d, generator=gen) + 2
    src = torch.randint(0, n - n_dup, (n_dup,), generator=gen)
    dups = base[src] + 1e-3 * torch.randn(n_dup, d, generator=gen)
    return torch.cat([base, dups]), n_dup


def with_aten_pooling(net):
    """``net`` with ATen's ``nn.AvgPool2d`` in place of every fastdd ``AvgPool2x2`` (the same
    computation): the reference code's ConvNet, for comparisons with it."""
    from fastdd.models.pool import AvgPool2x2

    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, AvgPool2x2):
                setattr(module, name, nn.AvgPool2d(2, 2))
    return net
