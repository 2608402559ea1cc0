"""Influence functions against exact leave-one-out retraining; solvers against each other;
block CG against separate solves; the fused CG update kernels against the torch path."""
import pytest
import torch
import torch.nn.functional as F

from fastdd.data import load_digits
from fastdd.metrics import roc_auc
from fastdd.valuation import InfluenceFunction, block_cg
from fastdd.valuation.block_cg import cg_update_p, cg_update_p_ref, cg_update_xr, cg_update_xr_ref
from conftest import assert_close

LAM = 1e-2


class LogReg:
    """L2-regularized multinomial logistic regression in float64: objective
    (1/n) sum_i CE_i + LAM/2 ||theta||^2, trained by Newton to a gradient norm below 1e-12."""

    def __init__(self, X, y):
        self.n = len(y)
        self.Xa = torch.cat([X, torch.ones(self.n, 1, dtype=X.dtype)], 1)
        self.Y = F.one_hot(y, 10).double()
        self.theta = self.newton(torch.zeros(10 * self.Xa.shape[1], dtype=torch.float64), torch.ones(self.n, dtype=torch.float64))

    def grad(self, t, keep):
        p = F.softmax(self.Xa @ t.view(10, -1).T, 1)
        return (((p - self.Y) * keep[:, None]).T @ self.Xa / self.n).reshape(-1) + LAM * t

    def hess(self, t):
        p = F.softmax(self.Xa @ t.view(10, -1).T, 1)
        A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        P = t.numel()
        return torch.einsum("nab,ni,nj->aibj", A, self.Xa, self.Xa).reshape(P, P) / self.n + LAM * torch.eye(P, dtype=t.dtype)

    def newton(self, t, keep):
        for _ in range(50):
            g = self.grad(t, keep)
            if g.norm() < 1e-12:
                return t
            t = t - torch.linalg.solve(self.hess(t), g)
        raise AssertionError(f"Newton did not converge: |g| = {g.norm().item():.3g}")

    def leave_one_out(self, i):
        """Exact retraining without point i (same 1/n normalization: epsilon = -1/n)."""
        keep = torch.ones(self.n, dtype=torch.float64)
        keep[i] = 0
        L = torch.linalg.cholesky(self.hess(self.theta))
        t = self.theta.clone()
        for _ in range(100):  # Newton-like steps with the full-data Hessian: converges fast
            g = self.grad(t, keep)
            if g.norm() < 1e-12:
                return t
            t = t - torch.cholesky_solve(g[:, None], L)[:, 0]
        raise AssertionError("leave-one-out retraining did not converge")

    def module(self):
        m = torch.nn.Linear(self.Xa.shape[1] - 1, 10).double()
        with torch.no_grad():
            W = self.theta.view(10, -1)
            m.weight.copy_(W[:, :-1])
            m.bias.copy_(W[:, -1])
        return m


@pytest.fixture(scope="module")
def problem():
    d = load_digits()
    X, y = d.X_train.flatten(1).double(), d.y_train
    return LogReg(X, y), X, y, d.X_test[:4].flatten(1).double(), d.y_test[:4]


def test_influence_predicts_leave_one_out(problem):
    lr, X, y, Xt, yt = problem
    n_removed = 100

    def test_losses(t):
        Xta = torch.cat([Xt, torch.ones(len(Xt), 1, dtype=Xt.dtype)], 1)
        return F.cross_entropy(Xta @ t.view(10, -1).T, yt, reduction="none")

    base = test_losses(lr.theta)
    actual = torch.stack([test_losses(lr.leave_one_out(i)) - base for i in range(n_removed)])
    inf = InfluenceFunction(lr.module(), damping=LAM, solver="cg", tol=1e-10).fit(X, y)
    predicted = -inf.scores(Xt, yt)[:n_removed] / lr.n  # removing z = upweighting by -1/n
    corr = [torch.corrcoef(torch.stack([predicted[:, j], actual[:, j]]))[0, 1].item() for j in range(len(yt))]
    assert sum(c >= 0.99 for c in corr) >= 3, corr
    assert inf.info[-1].converged and inf.info[-1].residuals.max() <= 1e-10


def test_solvers_agree_with_direct(problem):
    lr, X, y, Xt, yt = problem
    model = lr.module()
    direct = InfluenceFunction(model, damping=0.5, solver="direct").fit(X[:300], y[:300]).scores(Xt, yt)
    cg = InfluenceFunction(model, damping=0.5, solver="cg", tol=1e-8).fit(X[:300], y[:300]).scores(Xt, yt)
    pcg = InfluenceFunction(model, damping=0.5, solver="cg", tol=1e-8, preconditioner="jacobi").fit(X[:300], y[:300])
    lissa = InfluenceFunction(model, damping=0.5, solver="lissa", tol=1e-9, max_iter=5000).fit(X[:300], y[:300])
    scale = direct.abs().max().item()
    assert (cg - direct).abs().max().item() <= 1e-4 * scale
    assert (pcg.scores(Xt, yt) - direct).abs().max().item() <= 1e-4 * scale
    assert (lissa.scores(Xt, yt) - direct).abs().max().item() <= 1e-3 * scale
    assert lissa.info[-1].converged


def test_gauss_newton_equals_exact_hessian_for_linear_models(problem):
    lr, X, y, Xt, yt = problem
    exact = InfluenceFunction(lr.module(), damping=0.1, solver="direct").fit(X[:200], y[:200])
    gn = InfluenceFunction(lr.module(), damping=0.1, solver="direct", hessian="gauss-newton").fit(X[:200], y[:200])
    assert_close(gn.H, exact.H, atol=1e-10, rtol=1e-8, name="GGN = Hessian for a linear model + CE")


def test_direct_solver_needs_damping_when_singular():
    model = torch.nn.Linear(4, 3).double()
    X, y = torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1])  # 2 points, 15 parameters: singular
    inf = InfluenceFunction(model, damping=0.0, solver="direct").fit(X, y)
    with pytest.raises(ValueError, match="not positive definite.*add damping"):
        inf.scores(X, y)


def test_dataloader_fit_equals_tensors(problem):
    lr, X, y, Xt, yt = problem
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:200], y[:200]), batch_size=64)
    a = InfluenceFunction(lr.module(), damping=0.1, solver="direct").fit(X[:200], y[:200]).scores(Xt, yt)
    b = InfluenceFunction(lr.module(), damping=0.1, solver="direct").fit(loader).scores(Xt, yt)
    assert_close(b, a, atol=1e-10, rtol=1e-8, name="DataLoader vs tensors")


def test_influence_bad_input(problem):
    lr, X, y, Xt, yt = problem
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 10\)"):
        InfluenceFunction(lr.module(), damping=0.1).fit(X[:20], y[:20] + 10)
    with pytest.raises(ValueError, match="y must be a tensor with one target per row of X"):
        InfluenceFunction(lr.module(), damping=0.1).fit(X[:20], y[:19])
    bad = X[:20].clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"X contains NaN or inf.*\[3\]"):
        InfluenceFunction(lr.module(), damping=0.1).fit(bad, y[:20])
    inf = InfluenceFunction(lr.module(), damping=0.1, solver="direct").fit(X[:20], y[:20])
    bad_test = Xt.clone()
    bad_test[1, 5] = float("inf")
    with pytest.raises(ValueError, match=r"X_test contains NaN or inf .*first bad index 1"):
        inf.scores(bad_test, yt)
    with pytest.raises(ValueError, match="solver must be one of"):
        InfluenceFunction(lr.module(), solver="newton")
    with pytest.raises(RuntimeError, match="call fit"):
        InfluenceFunction(lr.module()).scores(Xt, yt)


def test_default_damping_follows_the_spectrum(problem):
    lr, X, y, _, _ = problem
    inf = InfluenceFunction(lr.module(), solver="cg").fit(X[:200], y[:200])
    direct = InfluenceFunction(lr.module(), damping=0.0, solver="direct").fit(X[:200], y[:200])
    lam_max = torch.linalg.eigvalsh(direct.H).max().item()
    assert inf.damping == pytest.approx(1e-3 * lam_max, rel=1e-3)


def test_self_influence_flags_flipped_labels():
    d = load_digits()
    X, y = d.X_train.flatten(1).double(), d.y_train.clone()
    gen = torch.Generator().manual_seed(0)
    bad = torch.randperm(len(y), generator=gen)[: len(y) // 10]
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=gen)) % 10
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[bad] = True
    lr = LogReg(X, y)
    si = InfluenceFunction(lr.module(), damping=LAM, solver="direct").fit(X, y).self_influence()
    assert si.shape == (len(y),) and bool((si > 0).all())
    assert roc_auc(si, flipped) >= 0.9


def test_block_cg_equals_separate_solves():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    A = M @ M.T + 40 * torch.eye(40, dtype=torch.float64)
    B = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    X, info = block_cg(lambda V: A @ V, B, tol=1e-12, max_iter=200)
    assert info.converged
    assert_close(X, torch.linalg.solve(A, B), atol=1e-9, rtol=1e-9, name="block CG vs solve")
    for k in range(6):
        xk, _ = block_cg(lambda V: A @ V, B[:, k:k + 1], tol=1e-12, max_iter=200)
        assert_close(X[:, k], xk[:, 0], atol=1e-10, rtol=1e-10, name=f"column {k}")


def test_block_cg_warns_when_not_converged():
    A = torch.diag(torch.logspace(0, 6, 50, dtype=torch.float64))
    with pytest.warns(UserWarning, match="block CG stopped after 3 iterations"):
        _, info = block_cg(lambda V: A @ V, torch.ones(50, 2, dtype=torch.float64), tol=1e-12, max_iter=3)
    assert not info.converged and info.iterations == 3


@pytest.mark.parametrize("P,K", [(1, 1), (7, 3), (33, 17), (257, 5)])
@pytest.mark.parametrize("jacobi", [False, True])
def test_cg_update_kernels_interpreted(monkeypatch, P, K, jacobi):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    gen = torch.Generator().manual_seed(P * K)
    x, r, p, ap = (torch.randn(P, K, generator=gen) for _ in range(4))
    alpha, beta = torch.rand(K, generator=gen), torch.rand(K, generator=gen)
    inv_diag = torch.rand(P, generator=gen) + 0.5 if jacobi else None
    xr, rr, pr = x.clone(), r.clone(), p.clone()
    rz_ref = cg_update_xr_ref(xr, rr, pr, ap, alpha, inv_diag)
    rz = cg_update_xr(x, r, p, ap, alpha, inv_diag)
    assert_close(x, xr, atol=1e-6, rtol=1e-6, name="x")
    assert_close(r, rr, atol=1e-6, rtol=1e-6, name="r")
    assert_close(rz, rz_ref, atol=1e-4, rtol=1e-5, name="r.z")
    cg_update_p_ref(pr, rr, beta, inv_diag)
    cg_update_p(p, r, beta, inv_diag)
    assert_close(p, pr, atol=1e-6, rtol=1e-6, name="p")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cg_update_gpu(monkeypatch, backend):
    if backend == "cuda":
        from fastdd import _ext

        if _ext.load() is None:
            pytest.skip("CUDA extension unavailable")
    monkeypatch.setenv("FASTDD_BACKEND", backend)
    x, r, p, ap = (torch.randn(10_001, 37, device="cuda") for _ in range(4))
    alpha, beta, inv_diag = torch.rand(37, device="cuda"), torch.rand(37, device="cuda"), torch.rand(10_001, device="cuda") + 0.5
    xr, rr, pr = x.clone(), r.clone(), p.clone()
    rz_ref = cg_update_xr_ref(xr, rr, pr, ap, alpha, inv_diag)
    rz = cg_update_xr(x, r, p, ap, alpha, inv_diag)
    assert_close(x, xr, atol=1e-5, rtol=1e-5, name="x")
    assert_close(rz, rz_ref, atol=1e-2, rtol=1e-4, name="r.z")
    cg_update_p_ref(pr, rr, beta, inv_diag)
    cg_update_p(p, r, beta, inv_diag)
    assert_close(p, pr, atol=1e-5, rtol=1e-5, name="p")
