"""Valuation at scale: the linear datamodeling score and its retraining harness, K-FAC / EK-FAC
influence against explicit curvature, TRAK against its formula, the gradient store."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdd
from fastdd._checkpoint import CheckpointError
from fastdd.data import load_digits
from fastdd.valuation import (TRAK, GradientStore, InfluenceFunction, SubsetTrainer, datamodel_targets, lds,
                              margin_fn, margins, tracin)
from conftest import assert_close


# --------------------------------------------------------------------------- LDS
def test_lds_is_one_for_a_true_linear_datamodel_and_zero_for_noise():
    gen = torch.Generator().manual_seed(0)
    n, n_test, S = 60, 20, 80
    truth = torch.randn(n, n_test, generator=gen, dtype=torch.float64)
    subsets = torch.rand(S, n, generator=gen) < 0.5
    outputs = subsets.double() @ truth + 0.01 * torch.randn(S, n_test, generator=gen, dtype=torch.float64)
    assert lds(truth, subsets, outputs).mean > 0.99
    assert lds(-truth, subsets, outputs).mean < -0.99
    assert abs(lds(torch.randn(n, n_test, generator=gen), subsets, outputs).mean) < 0.1
    # a positive scale of the scores does not matter (a rank correlation)
    assert lds(3 * truth, subsets, outputs).mean == pytest.approx(lds(truth, subsets, outputs).mean)


def test_lds_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"subsets must be \[S, n_train\] = \[S, 5\]"):
        lds(torch.zeros(5, 2), torch.ones(4, 6, dtype=torch.bool), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"outputs must be \[S, n_test\] = \[4, 2\]"):
        lds(torch.zeros(5, 2), torch.ones(4, 5, dtype=torch.bool), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="at least 3 subsets"):
        lds(torch.zeros(5, 2), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 2))


def test_margins_are_the_correct_logit_minus_logsumexp_of_the_others():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 1])
    want = torch.stack([2.0 - torch.logsumexp(torch.tensor([0.0, -1.0]), 0),
                        0.5 - torch.logsumexp(torch.tensor([0.5, 3.0]), 0)])
    assert_close(margins(logits, y), want, atol=1e-6, rtol=1e-6, name="margins")


def _digits(n=400, n_test=60, dtype=torch.float64):
    d = load_digits()
    return (d.X_train.flatten(1)[:n].to(dtype), d.y_train[:n], d.X_test.flatten(1)[:n_test].to(dtype), d.y_test[:n_test])


def test_subset_trainer_trains_each_model_as_if_alone():
    X, y, _, _ = _digits(200)
    trainer = SubsetTrainer(lambda s: nn.Linear(64, 10).double(), epochs=5, lr=0.1, batch_size=None)
    masks = torch.rand(3, len(y), generator=torch.Generator().manual_seed(1)) < 0.5
    _, together, _ = trainer.train(X, y, masks, [7, 8, 9])
    for k, seed in enumerate([7, 8, 9]):
        _, alone, _ = trainer.train(X, y, masks[k:k + 1], [seed])
        for name in together:
            assert_close(together[name][k], alone[name][0], atol=1e-10, rtol=1e-10, name=f"model {k} {name}")
        # and as a plain full-batch SGD loop on the subset would train it
        torch.manual_seed(seed)
        m = nn.Linear(64, 10).double()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(m(X[masks[k]]), y[masks[k]]).backward()
            opt.step()
        assert_close(together["weight"][k], m.weight, atol=1e-10, rtol=1e-10, name=f"model {k} vs a plain loop")
    assert (together["weight"][0] - together["weight"][1]).abs().max() > 1e-3


def test_datamodel_targets_resume_and_refuse_another_run(tmp_path):
    X, y, Xt, yt = _digits(120, 10)
    trainer = SubsetTrainer(lambda s: nn.Linear(64, 10).double(), epochs=20, lr=0.1, batch_size=None)
    ck = str(tmp_path / "targets.pt")
    full = datamodel_targets(trainer, X, y, Xt, yt, n_subsets=6, models_at_once=2, checkpoint=ck)
    again = datamodel_targets(trainer, X, y, Xt, yt, n_subsets=6, models_at_once=2, checkpoint=ck)
    assert torch.equal(full.outputs, again.outputs) and torch.equal(full.subsets, again.subsets)
    assert full.subsets.sum(1).eq(60).all()
    # a partial checkpoint resumes to the same answer
    import fastdd._checkpoint as cp

    state = cp.read(ck)
    state["done"], state["outputs"] = 2, state["outputs"][:2]
    cp.save(ck, state)
    resumed = datamodel_targets(trainer, X, y, Xt, yt, n_subsets=6, models_at_once=2, checkpoint=ck)
    assert torch.allclose(resumed.outputs, full.outputs)
    with pytest.raises(CheckpointError, match="fraction"):
        datamodel_targets(trainer, X, y, Xt, yt, n_subsets=6, fraction=0.4, checkpoint=ck)


def test_a_train_fn_gives_the_targets_the_vectorized_trainer_gives():
    X, y, Xt, yt = _digits(100, 8)
    trainer = SubsetTrainer(lambda s: nn.Linear(64, 10).double(), epochs=10, lr=0.1, batch_size=None)

    def train_fn(X_sub, y_sub, seed):  # the same recipe, one model at a time (seeded by the caller)
        m = nn.Linear(64, 10).double()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(10):
            opt.zero_grad()
            F.cross_entropy(m(X_sub), y_sub).backward()
            opt.step()
        return m

    vec = datamodel_targets(trainer, X, y, Xt, yt, n_subsets=4)
    seq = datamodel_targets(train_fn, X, y, Xt, yt, n_subsets=4)
    assert torch.equal(vec.subsets, seq.subsets)
    assert_close(seq.outputs, vec.outputs, atol=1e-9, rtol=1e-9, name="targets")
    with pytest.raises(ValueError, match="trainer must be a SubsetTrainer or a callable"):
        datamodel_targets("sgd", X, y, Xt, yt)


@pytest.fixture(scope="module")
def digits_lr():
    """Logistic regression on 400 digits, converged with weight decay, and LDS targets on 60 test digits."""
    torch.manual_seed(0)
    X, y, Xt, yt = _digits()
    wd = 1e-2
    trainer = SubsetTrainer(lambda s: nn.Linear(64, 10).double(), epochs=300, lr=0.5, batch_size=None,
                            weight_decay=wd)
    targets = datamodel_targets(trainer, X, y, Xt, yt, n_subsets=40, models_at_once=40)
    _, params, _ = trainer.train(X, y, torch.ones(1, len(y), dtype=torch.bool), [0])
    return trainer.module(params, 0), wd, X, y, Xt, yt, targets


def test_influence_predicts_retraining_on_logistic_regression(digits_lr):
    model, wd, X, y, Xt, yt, targets = digits_lr
    exact = InfluenceFunction(model, damping=wd, solver="direct").fit(X, y).scores(Xt, yt, test_fn=margin_fn)
    r = lds(exact, targets.subsets, targets.outputs)
    assert r.mean > 0.9, r
    # a gradient dot product ignores the curvature: clearly worse; the wrong sign is anti-correlated
    dot = lds(tracin([model], [1.0], X, y, Xt, yt), targets.subsets, targets.outputs).mean
    assert dot < r.mean - 0.2
    assert lds(-exact, targets.subsets, targets.outputs).mean < -0.9


def test_ekfac_and_trak_beat_the_gradient_dot_product(digits_lr):
    model, wd, X, y, Xt, yt, targets = digits_lr
    dot = lds(tracin([model], [1.0], X, y, Xt, yt), targets.subsets, targets.outputs).mean
    ek = InfluenceFunction(model, hessian="ekfac").fit(X, y).scores(Xt, yt, test_fn=margin_fn)
    assert lds(ek, targets.subsets, targets.outputs).mean > max(0.75, dot + 0.2)
    trak = TRAK(model, dim=256, kind="jl").fit(X, y).scores(Xt, yt)
    assert trak.dtype == torch.float64  # a float64 model keeps float64 features and scores
    assert lds(trak, targets.subsets, targets.outputs).mean > dot + 0.15


# --------------------------------------------------------------------------- K-FAC / EK-FAC
def test_kfac_equals_the_gauss_newton_matrix_for_one_linear_output():
    torch.manual_seed(0)
    X, yv = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    m = nn.Linear(5, 1).double()
    mse = lambda o, t: ((o - t) ** 2).sum(1)  # noqa: E731
    ggn = InfluenceFunction(m, loss_fn=mse, damping=0.1, solver="direct", hessian="gauss-newton").fit(X, yv)
    V = torch.randn(6, 3, dtype=torch.float64)
    for hessian in ("kfac", "ekfac"):
        kf = InfluenceFunction(m, loss_fn=mse, damping=0.1, hessian=hessian, fisher="ggn").fit(X, yv)
        assert_close(kf.solve(V), ggn.solve(V), atol=1e-12, rtol=1e-10, name=hessian)


class _ConvMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def _rotated_second_moment(f, W):
    """mean_n (Q_G^T W_n Q_A)^2 for per-sample gradient matrices W [N, p, d_aug]."""
    return (f.Q_G.T @ W @ f.Q_A).square().mean(0)


def test_ekfac_eigenvalues_are_the_per_sample_gradients_second_moment_in_the_kronecker_basis():
    torch.manual_seed(0)
    model = _ConvMLP().double()
    X, y = torch.randn(30, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (30,))
    inf = InfluenceFunction(model, hessian="ekfac", fisher="empirical", damping=0.1, batch_size=8).fit(X, y)
    g = fastdd.per_sample_grads(model, X, y)
    for f in inf.factors:
        W = g[f.weight].reshape(30, g[f.weight].shape[1], -1)
        if f.bias is not None:
            W = torch.cat([W, g[f.bias].unsqueeze(2)], 2)
        assert_close(f.lam, _rotated_second_moment(f, W), atol=1e-12, rtol=1e-9, name=f"lambda of {f.name}")


def test_ekfac_ggn_fisher_is_the_expectation_over_labels():
    # one Linear layer with cross-entropy: the expected Fisher is mean_n (diag(p) - p p^T) (x) a a^T
    torch.manual_seed(0)
    m = nn.Linear(4, 3).double()
    X, y = torch.randn(25, 4, dtype=torch.float64), torch.randint(0, 3, (25,))
    inf = InfluenceFunction(m, hessian="ekfac", fisher="ggn", damping=0.1).fit(X, y)
    f = inf.factors[0]
    p = torch.softmax(m(X), 1).detach()
    Hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    A = torch.cat([X, torch.ones(25, 1, dtype=torch.float64)], 1)
    Fisher = torch.einsum("npq,nd,ne->pdqe", Hout, A, A).reshape(15, 15) / 25
    Q = torch.kron(f.Q_G, f.Q_A)
    want = (Q.T @ Fisher @ Q).diagonal().reshape(3, 5)
    assert_close(f.lam, want, atol=1e-12, rtol=1e-9, name="EK-FAC eigenvalues (ggn)")


def test_ekfac_influence_agrees_with_exact_gauss_newton_influence():
    torch.manual_seed(0)
    X, y, Xt, yt = _digits(300, 20)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    fastdd.train.train_model(model, X, y, epochs=30, lr=0.05)
    # damping 0.1, 20x the mean eigenvalue (measured: mean Spearman 0.84; at 0.01, where the smallest
    # directions dominate, the Kronecker approximation of even the last layer alone gives 0.58)
    exact = InfluenceFunction(model, hessian="gauss-newton", damping=0.1, solver="direct").fit(X, y).scores(Xt, yt)
    ek = InfluenceFunction(model, hessian="ekfac", fisher="ggn", damping=0.1).fit(X, y).scores(Xt, yt)
    from scipy.stats import spearmanr

    rho = np.mean([spearmanr(exact[:, j], ek[:, j])[0] for j in range(20)])
    assert rho > 0.8, rho


def test_ekfac_names_the_layers_it_leaves_out():
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    X, y = torch.randn(20, 8, dtype=torch.float64), torch.randint(0, 3, (20,))
    with pytest.warns(UserWarning, match=r"'1' \(LayerNorm: 1.weight, 1.bias\).*left out of the scores"):
        inf = InfluenceFunction(model, hessian="ekfac").fit(X, y)
    assert inf.flat.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert inf.scores(X[:3], y[:3]).shape == (20, 3)
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm"):
        InfluenceFunction(model, hessian="ekfac", strict=True).fit(X, y)
    with pytest.raises(ValueError, match="fisher='sampled' draws labels"):
        InfluenceFunction(model, hessian="ekfac", loss_fn=lambda o, t: (o - t).square().sum(1))
    with pytest.raises(ValueError, match="hessian must be one of"):
        InfluenceFunction(model, hessian="diag")


# --------------------------------------------------------------------------- TRAK and the store
def test_trak_scores_follow_their_formula_and_topk_matches_the_full_matrix():
    torch.manual_seed(0)
    X, y, Xt, yt = _digits(150, 12, torch.float32)
    models = [nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)) for _ in range(2)]
    for k, m in enumerate(models):
        fastdd.train.train_model(m, X, y, epochs=5, seed=k)
    assert TRAK(models, dim=64).kind == "jl"  # auto: the dense matrix (850 x 64) fits the cache
    trak = TRAK(models, dim=64, damping=0.5, kind="factorized").fit(X, y)
    S = trak.scores(Xt, yt)
    want = 0
    Q = 0
    for m in models:
        Phi = fastdd.grad.api.per_sample_grad_projections(m, X, y, 64, loss_fn=margin_fn).double()
        phi = fastdd.grad.api.per_sample_grad_projections(m, Xt, yt, 64, loss_fn=margin_fn).double()
        K = Phi.T @ Phi + 0.5 * torch.eye(64, dtype=torch.float64)
        want = want + Phi @ torch.linalg.solve(K, phi.T) / 2
        Q = Q + (1 - torch.softmax(m(X).double(), 1).gather(1, y[:, None]).squeeze(1)) / 2
    assert_close(S, want * Q[:, None], atol=1e-4, rtol=1e-3, name="TRAK scores")
    values, index = trak.scores(Xt, yt, topk=5, train_tile=40)
    top = S.topk(5, dim=0)
    assert_close(values, top.values, atol=1e-6, rtol=1e-6, name="top-k values")
    assert torch.equal(index, top.indices)


def test_trak_store_resumes_and_refuses_another_model(tmp_path):
    torch.manual_seed(0)
    X, y, Xt, yt = _digits(100, 5, torch.float32)
    model = nn.Sequential(nn.Linear(64, 10))
    prefix = str(tmp_path / "feats")
    in_memory = TRAK(model, dim=32).fit(X, y).scores(Xt, yt)
    stored = TRAK(model, dim=32, store=prefix, batch_size=10).fit(X, y).scores(Xt, yt)
    assert_close(stored, in_memory, atol=1e-5, rtol=1e-5, name="stored features")
    # an interrupted store (half the rows recorded) resumes to the same rows
    import fastdd._checkpoint as cp

    meta = cp.read(prefix + ".0.npy.meta")
    meta["done"] = 50
    cp.save(prefix + ".0.npy.meta", meta)
    np.load(prefix + ".0.npy", mmap_mode="r+")[50:] = 0
    resumed = TRAK(model, dim=32, store=prefix, batch_size=10).fit(X, y).scores(Xt, yt)
    assert_close(resumed, in_memory, atol=1e-5, rtol=1e-5, name="resumed store")
    other = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(CheckpointError, match="belongs to another run"):
        TRAK(other, dim=32, store=prefix).fit(X, y)
    with pytest.raises(CheckpointError, match="projection"):
        TRAK(model, dim=32, seed=1, store=prefix).fit(X, y)


def test_gradient_store_writes_in_order(tmp_path):
    store = GradientStore(str(tmp_path / "g.npy"), n=10, dim=3, identity={"what": "test"})
    with pytest.raises(ValueError, match="in order"):
        store.write(slice(5, 10), torch.zeros(5, 3))
    with pytest.raises(RuntimeError, match="holds 0 of 10 rows"):
        store.rows()
    for s in store.missing(4):
        store.write(s, torch.full((s.stop - s.start, 3), float(s.start)))
    assert store.complete and store.rows()[9, 0] == 8.0
    with pytest.raises(ValueError, match=r"\.npy file"):
        GradientStore(str(tmp_path / "g.bin"), n=10, dim=3, identity={})


# --------------------------------------------------------------------------- in-run valuation
def _plain_step_with_inrun_values(model, opt, x, y, xv, yv, idx, lr, values):
    """The reference: add ``lr <g_i, mean_j g_val_j>`` (explicit per-sample gradients) to
    ``values[idx]``, then take a plain training step."""
    g = fastdd.per_sample_grads(model, x, y)
    gv = fastdd.per_sample_grads(model, xv, yv)
    flat = torch.cat([t.flatten(1) for t in g.values()], 1)
    val = torch.cat([t.flatten(1) for t in gv.values()], 1).mean(0)
    values.index_add_(0, idx, lr * flat @ val)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_inrun_values_are_lr_times_dots_with_the_validation_gradient_and_the_step_is_unchanged():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    plain = copy.deepcopy(model)
    X, y = torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (20,))
    Xv, yv = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    from fastdd.valuation import InRunValuation

    valuer = InRunValuation(model, Xv, yv, n_train=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    expected = torch.zeros(20, dtype=torch.float64)
    for _ in range(3):
        idx = torch.randperm(20)[:8]
        _plain_step_with_inrun_values(plain, opt_plain, X[idx], y[idx], Xv, yv, idx, 0.1, expected)
        opt.zero_grad()
        loss = valuer.backward(X[idx], y[idx], idx, lr=0.1)
        opt.step()
        assert loss.ndim == 0
    assert_close(valuer.values, expected, atol=1e-12, rtol=1e-9, name="in-run values")
    for p, q in zip(model.parameters(), plain.parameters()):
        assert_close(p, q, atol=1e-12, rtol=1e-10, name="parameters after the steps")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 20\)"):
        valuer.backward(X[:2], y[:2], [0, 20], lr=0.1)


class _Tied(nn.Module):
    """A Linear used twice (its parameters' cross terms go through the validation gradient)."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize("case", ["tied", "no_bias", "bias_only", "weight_only"])
def test_inrun_values_match_explicit_dots_on_tied_bias_less_and_partial_layers(case):
    torch.manual_seed(1)
    model = (_Tied() if case == "tied" else
             nn.Sequential(nn.Linear(6, 5, bias=case != "no_bias"), nn.Tanh(), nn.Linear(5, 4))).double()
    params = {"bias_only": ["0.bias", "2.bias"], "weight_only": ["0.weight", "2.weight"]}.get(case)
    X, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    Xv, yv = torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 4, (3,))
    from fastdd.valuation import InRunValuation

    valuer = InRunValuation(model, Xv, yv, n_train=12, params=params)
    model.zero_grad()
    valuer.backward(X, y, torch.arange(12), lr=0.5)
    g = fastdd.per_sample_grads(model, X, y, params=params)
    gv = fastdd.per_sample_grads(model, Xv, yv, params=params)
    flat = torch.cat([t.flatten(1) for t in g.values()], 1)
    val = torch.cat([t.flatten(1) for t in gv.values()], 1).mean(0)
    assert_close(valuer.values, 0.5 * flat @ val, atol=1e-12, rtol=1e-9, name="in-run values")
    for name, p in model.named_parameters():
        if name in g:  # the selected parameters' .grad: the training rows' mean gradient
            assert_close(p.grad, g[name].mean(0), atol=1e-12, rtol=1e-10, name=f"{name}.grad")


def test_inrun_draws_a_fresh_validation_batch_each_step_from_its_seed():
    # steps reuse one buffer for the training and validation rows: each step's values must use that
    # step's inputs and its own validation draw (seeded: Generator(seed), val_batch_size rows a step)
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    plain = copy.deepcopy(model)
    X, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    Xv, yv = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    from fastdd.valuation import InRunValuation

    valuer = InRunValuation(model, Xv, yv, n_train=16, val_batch_size=4, seed=3)
    draws = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.2)
    expected = torch.zeros(16, dtype=torch.float64)
    for step in range(4):
        idx = torch.arange(4 * step, 4 * step + 4)
        rows = torch.randint(0, 12, (4,), generator=draws)
        _plain_step_with_inrun_values(plain, opt_plain, X[idx], y[idx], Xv[rows], yv[rows], idx, 0.2, expected)
        opt.zero_grad()
        valuer.backward(X[idx], y[idx], idx, lr=0.2)
        opt.step()
    assert_close(valuer.values, expected, atol=1e-12, rtol=1e-9, name="in-run values with drawn validation rows")


def test_inrun_values_flag_mislabelled_points():
    # a point whose label was flipped pushes the model away from the validation data
    torch.manual_seed(0)
    X, y, Xt, yt = _digits(300, 100, torch.float32)
    noisy = y.clone()
    flipped = torch.arange(0, 300, 10)
    noisy[flipped] = (noisy[flipped] + 3) % 10
    from fastdd.valuation import InRunValuation

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    valuer = InRunValuation(model, Xt, yt, n_train=300, val_batch_size=100)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        for idx in torch.randperm(300, generator=gen).split(32):
            opt.zero_grad()
            valuer.backward(X[idx], noisy[idx], idx, lr=0.05)
            opt.step()
    lowest = valuer.values.argsort()[:30]
    caught = np.isin(lowest.numpy(), flipped.numpy()).mean()
    assert caught > 0.6, caught  # 10% of points are flipped: chance is 0.1


def test_removing_the_highest_influence_points_hurts_more_than_random_removal(digits_lr):
    from fastdd.valuation import removal_curve

    model, wd, X, y, Xt, yt, _ = digits_lr
    helpful = InfluenceFunction(model, damping=wd, solver="direct").fit(X, y).scores(Xt, yt, test_fn=margin_fn).sum(1)
    trainer = SubsetTrainer(lambda s: nn.Linear(64, 10).double(), epochs=200, lr=0.5, batch_size=None, weight_decay=wd)
    curve = removal_curve({"influence": helpful, "least helpful first": -helpful}, trainer, X, y, Xt, yt,
                          removed=(0, 40, 120))
    inf, rand, worst = curve.accuracy["influence"], curve.accuracy["random"], curve.accuracy["least helpful first"]
    assert inf[0] == rand[0] == worst[0]
    assert inf[2] < rand[2] - 0.05  # 120 of 400 removed
    assert worst[2] >= rand[2] - 0.02  # removing the least helpful costs nothing
    assert "| influence |" in curve.table()
