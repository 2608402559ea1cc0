"""KNN-Shapley, TMC-Shapley, Data Banzhaf, leave-one-out and TracIn against exact oracles."""
import pytest
import torch
import torch.nn.functional as F

from fastdd.data import load_digits
from fastdd.metrics import roc_auc
from fastdd.models import MLP
from fastdd.valuation import (KNNUtility, ModelUtility, banzhaf_msr, exact_banzhaf, exact_shapley, knn_shapley,
                              leave_one_out, tmc_shapley, tracin)
from conftest import assert_close
from helpers import vmap_per_sample_grads


@pytest.fixture(scope="module")
def noisy_digits():
    d = load_digits()
    n = 150
    X, y = d.X_train[:n].flatten(1), d.y_train[:n].clone()
    gen = torch.Generator().manual_seed(0)
    bad = torch.randperm(n, generator=gen)[: n // 10]
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=gen)) % 10
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[bad] = True
    return X, y, d.X_test.flatten(1), d.y_test, flipped


def _knn_utility_oracle(Xtr, ytr, xte, yte, K):
    """Jia et al.'s KNN utility, written plainly: sort the subset by (distance, index)."""
    def U(S):
        if len(S) == 0:
            return 0.0
        d = ((Xtr[S] - xte) ** 2).sum(1)
        order = sorted(range(len(S)), key=lambda j: (d[j].item(), int(S[j])))
        return sum(float(ytr[S[j]] == yte) for j in order[:K]) / K
    return U


@pytest.mark.parametrize("K", [1, 3, 9])
def test_knn_shapley_equals_enumeration(K):
    gen = torch.Generator().manual_seed(K)
    Xtr, ytr = torch.randn(9, 3, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    Xte, yte = torch.randn(3, 3, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    exact = sum(exact_shapley(_knn_utility_oracle(Xtr, ytr, Xte[t], yte[t], K), 9) for t in range(3)) / 3
    values, per_test = knn_shapley(Xtr, ytr, Xte, yte, k=K, chunk_size=2, return_per_test=True)
    assert_close(values, exact, atol=1e-6, rtol=1e-6, name="knn shapley")
    assert_close(per_test.mean(0), values, atol=1e-6, rtol=1e-6, name="per-test mean")
    # efficiency: values sum to U(D) - U(empty) per test point
    full = torch.tensor([_knn_utility_oracle(Xtr, ytr, Xte[t], yte[t], K)(torch.arange(9)) for t in range(3)])
    assert_close(per_test.sum(1), full, atol=1e-6, rtol=1e-6, name="efficiency")


def test_knn_shapley_flags_flipped_labels_on_all_of_digits():
    d = load_digits()
    y = d.y_train.clone()
    gen = torch.Generator().manual_seed(0)
    bad = torch.randperm(len(y), generator=gen)[: len(y) // 10]
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=gen)) % 10
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[bad] = True
    values = knn_shapley(d.X_train.flatten(1), y, d.X_test.flatten(1), d.y_test, k=5)
    assert roc_auc(-values, flipped) >= 0.9


def test_knn_shapley_bad_input():
    X, y = torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="k=6 is larger than the training set"):
        knn_shapley(X, y, X, y, k=6)
    with pytest.raises(ValueError, match="y_train has 4 entries, expected 5"):
        knn_shapley(X, y[:4], X, y)
    with pytest.raises(ValueError, match="y_test has negative labels"):
        knn_shapley(X, y, X, -y - 1)
    bad = X.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="X_test contains NaN or inf"):
        knn_shapley(X, y, bad, y)


def _toy_utility():
    w = torch.tensor([0.5, -0.2, 0.9, 0.1, 0.3, -0.4], dtype=torch.float64)

    def U(S):  # non-additive: interactions through a saturating function
        return float(torch.tanh(w[S].sum()) + 0.1 * (len(S) >= 3))
    return U


def test_tmc_shapley_matches_enumeration_and_efficiency():
    U = _toy_utility()
    exact = exact_shapley(U, 6)
    res = tmc_shapley(U, 6, max_permutations=3000, truncation_tol=0.0, convergence_tol=0.0, seed=1)
    assert res.n_samples == 3000
    assert torch.all((res.values.double() - exact).abs() <= 4 * res.stderr.double() + 1e-3), (res.values, exact)
    full, empty = U(torch.arange(6)), U(torch.empty(0, dtype=torch.long))
    assert res.values.double().sum().item() == pytest.approx(full - empty, abs=1e-5)


def test_banzhaf_msr_matches_enumeration():
    U = _toy_utility()
    exact = exact_banzhaf(U, 6)
    res = banzhaf_msr(U, 6, n_samples=20000, seed=2)
    assert torch.all((res.values.double() - exact).abs() <= 4 * res.stderr.double() + 1e-3), (res.values, exact)


def test_tmc_shapley_flags_flipped_labels(noisy_digits):
    X, y, Xt, yt, flipped = noisy_digits
    U = KNNUtility(X, y, Xt[:150], yt[:150], k=1)
    res = tmc_shapley(U, len(y), max_permutations=150, truncation_tol=0.01, min_permutations=150)
    assert roc_auc(-res.values, flipped) >= 0.9


@pytest.mark.parametrize("method", ["tmc", "banzhaf"])
def test_sampling_resumes_to_the_same_result(tmp_path, method):
    U = _toy_utility()
    ck = str(tmp_path / "run.pt")
    if method == "tmc":
        full = tmc_shapley(U, 6, max_permutations=40, truncation_tol=0.0, convergence_tol=0.0, seed=3)
        tmc_shapley(U, 6, max_permutations=15, truncation_tol=0.0, convergence_tol=0.0, seed=3,
                    checkpoint=ck, checkpoint_every=5)  # an interrupted run: stops at 15
        resumed = tmc_shapley(U, 6, max_permutations=40, truncation_tol=0.0, convergence_tol=0.0, seed=3,
                              checkpoint=ck, checkpoint_every=5)
    else:
        full = banzhaf_msr(U, 6, n_samples=300, seed=3)
        banzhaf_msr(U, 6, n_samples=120, seed=3, checkpoint=ck, checkpoint_every=40)
        resumed = banzhaf_msr(U, 6, n_samples=300, seed=3, checkpoint=ck, checkpoint_every=40)
    assert torch.equal(full.values, resumed.values) and full.n_samples == resumed.n_samples
    with pytest.raises(ValueError, match="belongs to another run: seed: checkpoint 3, this run 4; delete it"):
        (tmc_shapley(U, 6, max_permutations=40, seed=4, truncation_tol=0.0, convergence_tol=0.0, checkpoint=ck)
         if method == "tmc"
         else banzhaf_msr(U, 6, n_samples=300, seed=4, checkpoint=ck))


def test_model_utility_learns(noisy_digits):
    X, y, Xt, yt, _ = noisy_digits
    U = ModelUtility(X, y, Xt[:200], yt[:200])
    assert U(torch.arange(len(y))) > 0.7 > U(torch.tensor([0]))
    assert U(torch.empty(0, dtype=torch.long)) == 0.0
    net = ModelUtility(X, y, Xt[:200], yt[:200], model_fn=lambda: MLP(64, 10, hidden=(32,)), epochs=20)
    full = net(torch.arange(len(y)))
    assert full > 0.7 and full == net(torch.arange(len(y)))  # seeded: the same subset, the same score


def _ridge_train_fn(X, y, init=None):
    """Deterministic 'training': ridge regression onto one-hot targets, as a Linear module."""
    Xa = torch.cat([X, torch.ones(len(X), 1)], 1).double()
    Y = F.one_hot(y, 10).double()
    W = torch.linalg.solve(Xa.T @ Xa + 1.0 * torch.eye(Xa.shape[1], dtype=torch.float64), Xa.T @ Y)
    m = torch.nn.Linear(X.shape[1], 10)
    with torch.no_grad():
        m.weight.copy_(W[:-1].T)
        m.bias.copy_(W[-1])
    return m


def test_leave_one_out_is_exact_retraining_and_resumes(tmp_path, noisy_digits):
    X, y, Xt, yt, _ = noisy_digits
    X, y = X[:60], y[:60]
    idx = torch.tensor([0, 5, 17, 33, 59])
    ck = str(tmp_path / "loo.pt")
    res = leave_one_out(_ridge_train_fn, X, y, Xt[:7], yt[:7], indices=idx)
    base = F.cross_entropy(_ridge_train_fn(X, y)(Xt[:7]), yt[:7], reduction="none")
    for row, i in enumerate(idx.tolist()):
        keep = torch.arange(60) != i
        direct = F.cross_entropy(_ridge_train_fn(X[keep], y[keep])(Xt[:7]), yt[:7], reduction="none") - base
        assert_close(res[row], direct, atol=1e-5, rtol=1e-5, name=f"loo {i}")

    calls = {"n": 0}

    def flaky(Xs, ys, init=None):  # dies on the 4th retraining: an interrupted run
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return _ridge_train_fn(Xs, ys, init)

    with pytest.raises(KeyboardInterrupt):
        leave_one_out(flaky, X, y, Xt[:7], yt[:7], indices=idx, checkpoint=ck, checkpoint_every=1)
    resumed = leave_one_out(_ridge_train_fn, X, y, Xt[:7], yt[:7], indices=idx, checkpoint=ck)
    assert torch.equal(resumed, res)


def test_tracin_equals_materialized_gradient_dots():
    torch.manual_seed(0)
    X, y = torch.randn(11, 6), torch.randint(0, 3, (11,))
    Xt, yt = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ckpts = [MLP(6, 3, hidden=(5,)) for _ in range(2)]
    lrs = [0.1, 0.05]
    got = tracin(ckpts, lrs, X, y, Xt, yt, batch_size=4, test_chunk=3)
    expected = 0
    for m, lr in zip(ckpts, lrs):
        gtr = vmap_per_sample_grads(m, X, y)
        gte = vmap_per_sample_grads(m, Xt, yt)
        expected = expected + lr * sum(gtr[n].flatten(1) @ gte[n].flatten(1).T for n in gtr)
    assert_close(got, expected, atol=1e-5, rtol=1e-4, name="tracin")
    with pytest.raises(ValueError, match="one learning rate per checkpoint"):
        tracin(ckpts, [0.1], X, y, Xt, yt)
