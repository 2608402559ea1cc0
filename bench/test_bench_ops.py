"""pytest-benchmark: k-means against scikit-learn, KNN-Shapley at scale (float32, float64,
uncentred), SemDeDup on 60,000 embeddings, and the distillation ops (RBF MMD, class-wise gradient distance) per backend.
Workloads from bench/workloads.py, shared with bench_pruning.py and bench_valuation.py.

    pytest bench/test_bench_ops.py --benchmark-only
"""
import numpy as np
import pytest
import torch

from conftest import backends
from workloads import dedup_embeddings, kmeans_blobs, knn_problem


@pytest.mark.parametrize("impl", ["fastdd", "sklearn"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_kmeans(benchmark, impl, offset):
    from sklearn.cluster import KMeans

    from fastdd.pruning import kmeans

    benchmark.group = f"k-means 100,000 x 64, k=100, 10 iterations, offset {offset:g}"
    X = kmeans_blobs(offset)
    if impl == "fastdd":
        res = benchmark(lambda: kmeans(X, 100, n_init=1, max_iter=10, tol=0.0, seed=0))
        objective = res.objective
    else:
        Xn = X.numpy().astype(np.float32)
        objective = benchmark(lambda: KMeans(100, n_init=1, max_iter=10, tol=0.0, random_state=0,
                                             algorithm="lloyd").fit(Xn)).inertia_
    assert 6e6 < objective < 9e6  # about d = 64 per point: the blobs' own variance


@pytest.mark.parametrize("case", ["float32", "float32-uncentred", "float64"])
def test_knn_shapley(benchmark, case):
    from fastdd.valuation import knn_shapley

    benchmark.group = "KNN-Shapley 100,000 train x 1,000 test x 64"
    X, y, Xt, yt = knn_problem()
    if case == "float32-uncentred":
        X, Xt = X + 1e4, Xt + 1e4
    elif case == "float64":
        X, Xt = X.double(), Xt.double()
    values = benchmark(lambda: knn_shapley(X, y, Xt, yt, k=5))
    assert values.shape == (100_000,) and torch.isfinite(values).all()


def test_semdedup(benchmark):
    from fastdd.curation import semdedup

    benchmark.group = "SemDeDup 60,000 x 32 embeddings, k=245"
    E, planted = dedup_embeddings()
    res = benchmark(lambda: semdedup(E, eps=1e-4))
    assert len(res.removed()) == planted  # exactly the planted near-copies


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _embeddings(n_per, classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_per * classes, dim, generator=g).to(DEVICE), torch.full((classes,), n_per)


@pytest.mark.parametrize("backend", backends())
def test_rbf_mmd(benchmark, force_backend, backend):
    from fastdd.distill.mmd import class_mmd

    force_backend(backend)
    benchmark.group = "RBF MMD, 10 classes x (256 real, 10 synthetic) x 2048 features, forward + backward"
    real, rc = _embeddings(256, 10, 2048, 0)
    syn, sc = _embeddings(10, 10, 2048, 1)
    syn.requires_grad_(True)

    def step():
        loss = class_mmd(real, rc, syn, sc, kernel="rbf", gamma=1e-3).sum()
        (g,) = torch.autograd.grad(loss, syn)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return g

    assert torch.isfinite(benchmark(step)).all()


@pytest.mark.parametrize("backend", backends())
def test_grad_distance(benchmark, force_backend, backend):
    from fastdd.distill.grad_distance import SegmentLayout, classwise_grad_distance

    force_backend(backend)
    benchmark.group = "class-wise gradient distance ('ours'), 10 classes, ConvNet-128 layers, forward + backward"
    shapes = [(128, 3, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3), (10, 2048)]
    layout = SegmentLayout.of_shapes(shapes, DEVICE)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(10, layout.size, generator=g).to(DEVICE)
    syn = torch.randn(10, layout.size, generator=g).to(DEVICE).requires_grad_(True)

    def step():
        (grad,) = torch.autograd.grad(classwise_grad_distance(real, syn, layout).sum(), syn)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return grad

    assert torch.isfinite(benchmark(step)).all()


@pytest.mark.parametrize("impl", ["fastdd", "aten"])
@pytest.mark.parametrize("shape", [(256, 128, 28, 28), (128, 32, 28, 28), (100, 128, 7, 7)])
def test_avg_pool_2x2(benchmark, impl, shape):
    from fastdd.models.pool import avg_pool_2x2, avg_pool_2x2_ref

    benchmark.group = f"2x2 average pooling {list(shape)}, forward + backward ({DEVICE})"
    pool = avg_pool_2x2 if impl == "fastdd" else avg_pool_2x2_ref
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    g = torch.randn(*shape[:2], shape[2] // 2, shape[3] // 2, device=DEVICE)

    def step():
        (gx,) = torch.autograd.grad(pool(x), x, g)
        return gx

    gx = benchmark(step)
    # each output's gradient spread over its window: the same total
    assert gx.shape == x.shape and float(gx.sum()) == pytest.approx(float(g.sum()), rel=1e-4, abs=1e-1)
