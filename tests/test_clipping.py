"""Per-sample clipping (ghost clipping) against materialize-then-clip, on every layer with a
rule, a fallback layer and tied weights; inside a training step it replaces .grad."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdd
from fastdd.grad import clipped_grad

from helpers import vmap_per_sample_grads


class Tokens(nn.Module):
    """Embedding, LayerNorm, a Linear over [B, T, d], PReLU (no rule: torch.func), mean over T."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.act = nn.PReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        return self.head(self.act(self.mix(self.norm(self.emb(idx)))).mean(1))


class Convs(nn.Module):
    """Grouped strided Conv2d, GroupNorm, padded Conv2d, InstanceNorm, eval BatchNorm, Conv1d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.bn = nn.BatchNorm2d(4)
        self.c3 = nn.Conv1d(4, 2, 3, dilation=2)
        self.fc = nn.Linear(2 * 5, 3)

    def forward(self, x):
        h = self.bn(self.inorm(self.c2(F.relu(self.gn(self.c1(x))))))  # [B, 4, 4, 4]
        h = self.c3(h.flatten(2)[:, :, :9])  # [B, 2, 5]
        return self.fc(h.flatten(1))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return self.out(h @ self.enc.weight)  # enc.weight used inside and outside its module


def _reference(model, x, y, max_norm):
    grads = vmap_per_sample_grads(model, x, y)
    norms = sum(g.flatten(1).double().square().sum(1) for g in grads.values()).sqrt()
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.tensordot(factors, g.double(), dims=1) for k, g in grads.items()}, norms


def _problem(kind):
    torch.manual_seed(0)
    if kind == "tokens":
        return Tokens(), torch.randint(0, 20, (9, 5)), torch.randint(0, 3, (9,))
    if kind == "convs":
        model = Convs()
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        return model.eval(), torch.randn(9, 2, 9, 9), torch.randint(0, 3, (9,))
    return Tied(), torch.randn(9, 5), torch.randint(0, 3, (9,))


@pytest.mark.parametrize("budget_mb", ["256", "0.0001"])  # per-sample gradients of the norms reused / not kept
@pytest.mark.parametrize("kind", ["tokens", "convs", "tied"])
def test_clipped_grad_equals_materialize_then_clip(kind, budget_mb, monkeypatch):
    monkeypatch.setenv("FASTDD_CHUNK_MB", budget_mb)
    model, x, y = _problem(kind)
    for_norms = _reference(model, x, y, 1.0)[1]
    max_norm = float(for_norms.median())  # about half the samples clipped
    expected, norms = _reference(model, x, y, max_norm)
    assert (norms > max_norm).any() and (norms < max_norm).any()
    got = clipped_grad(model, x, y, max_norm)
    assert set(got) == set(expected)
    for k in got:
        torch.testing.assert_close(got[k].double(), expected[k], atol=1e-5, rtol=1e-4, msg=k)


def test_clipped_grad_float64_is_exact():
    model, x, y = _problem("convs")
    model = model.double()
    expected, norms = _reference(model, x.double(), y, 0.3)
    got = clipped_grad(model, x.double(), y, 0.3)
    for k in got:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], expected[k], atol=1e-12, rtol=1e-10, msg=k)


def test_clipped_grad_in_a_training_step_replaces_the_mean_gradient():
    model, x, y = _problem("tokens")
    expected, _ = _reference(model, x, y, 0.5)
    with fastdd.PerSampleGrads(model) as ps:  # loss_reduction="mean", the usual training loss
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        unclipped = {n: p.grad.clone() for n, p in model.named_parameters()}
        got = ps.clipped_grad(0.5, write_grad=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[n] / len(y), atol=1e-6, rtol=1e-4, msg=n)
        assert torch.equal(p.grad, got[n])
    assert any(not torch.allclose(unclipped[n], got[n]) for n in got)  # clipping changed something
    huge = None
    with fastdd.PerSampleGrads(model, loss_reduction="sum") as ps:
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        huge = ps.clipped_grad(1e9)  # nothing clipped: the plain summed gradient
        for n, p in model.named_parameters():
            torch.testing.assert_close(huge[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1", True])
def test_max_norm_must_be_positive(bad):
    model, x, y = _problem("tied")
    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        clipped_grad(model, x, y, bad)


def test_norms_materialized_anyway_are_reused_for_the_clipped_sum(monkeypatch):
    """Conv and norm layers form per-sample gradients for their norms: within the chunk budget the
    clipped sum reuses them (no second convolution backward); Linear at T=1 never forms them."""
    from fastdd.grad import rules

    calls = []
    for cls in (rules.ConvRule, rules.LinearRule, rules.GroupNormRule):
        original = cls.batch_sum
        monkeypatch.setattr(cls, "batch_sum", lambda self, *a, _o=original, **k: calls.append(type(self)) or _o(self, *a, **k))
    model, x, y = _problem("convs")
    clipped_grad(model, x, y, 0.5)
    assert calls == [rules.LinearRule]  # the classifier (T=1): ghost norm, then one GEMM
    calls.clear()
    monkeypatch.setenv("FASTDD_CHUNK_MB", "0.0001")  # nothing fits: every layer's batch_sum runs
    clipped_grad(model, x, y, 0.5)
    assert rules.ConvRule in calls and rules.GroupNormRule in calls


@pytest.mark.parametrize("kind", ["convs", "tied", "tokens"])
def test_eager_capture_serves_every_consumer_as_the_deferred_one(kind):
    # eager: conv and norm layers form their per-sample gradients in the backward and drop their
    # activations and output gradients; every consumer must read the same numbers as deferred
    model, x, y = _problem(kind)
    vectors = {n: torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(1))
               for n, p in model.named_parameters()}
    results = {}
    for eager in (False, True):
        with fastdd.PerSampleGrads(model, eager=eager) as ps:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            results[eager] = (ps.grads(), ps.norms(), ps.dots(vectors), ps.clipped_grad(0.5),
                              ps._engine().class_sums(y, 3))
            formed = [c for c in ps._capture.calls if c.formed is not None]
            if eager and kind == "convs":
                assert formed and all(c.args == () for c in formed)  # activations let go of
            if not eager:
                assert not formed
    (g0, n0, d0, c0, s0), (g1, n1, d1, c1, s1) = results[False], results[True]
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k)
        torch.testing.assert_close(c1[k], c0[k], msg=k)
        torch.testing.assert_close(s1[k], s0[k], msg=k)
    torch.testing.assert_close(n1, n0)
    torch.testing.assert_close(d1, d0)


def test_eager_capture_refuses_a_second_backward_through_the_same_forward():
    model, x, y = _problem("convs")
    with fastdd.PerSampleGrads(model) as ps:
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward .* eager=False"):
            loss.backward()
    with fastdd.PerSampleGrads(model, eager=False) as ps:  # deferred: the last backward's statistics
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
        assert ps.norms().shape == (9,)


class FirstLayerInPlace(nn.Module):
    """A Linear on the raw input followed by an in-place ReLU: the output the capture hands an
    autograd node of its own (its input needs no gradient, its parameters run detached) is then
    modified in place."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


class Reused(nn.Module):
    """One Linear called twice in a forward, and a weight tied across two Linear modules."""

    def __init__(self):
        super().__init__()
        self.l, self.h, self.h2 = nn.Linear(5, 5), nn.Linear(5, 3), nn.Linear(5, 3)
        self.h2.weight = self.h.weight

    def forward(self, x):
        return self.h(torch.tanh(self.l(torch.tanh(self.l(x))))) + self.h2(x)


def _problem_or_first_in_place(kind):
    torch.manual_seed(0)
    if kind == "first_in_place":
        return FirstLayerInPlace(), torch.randn(9, 6), torch.randint(0, 3, (9,))
    if kind == "reused":
        return Reused(), torch.randn(9, 5), torch.randint(0, 3, (9,))
    return _problem(kind)


@pytest.mark.parametrize("eager", [True, False])
@pytest.mark.parametrize("kind", ["tokens", "convs", "tied", "first_in_place", "reused"])
def test_a_step_without_parameter_gradients_clips_the_same(kind, eager):
    # param_grads=False: the user's backward computes no weight gradient for rule layers (their
    # .grad stays None), yet every statistic and the clipped gradient are those of a full backward
    model, x, y = _problem_or_first_in_place(kind)
    expected, _ = _reference(model, x, y, 0.5)
    vectors = {n: torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(1))
               for n, p in model.named_parameters()}
    results = {}
    for param_grads in (True, False):
        with fastdd.PerSampleGrads(model, eager=eager, param_grads=param_grads) as ps:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            skipped = {n for n, p in model.named_parameters() if p.grad is None}
            results[param_grads] = (ps.grads(), ps.norms(), ps.dots(vectors))
            clipped = ps.clipped_grad(0.5, write_grad=True)
        assert all(type(p) is nn.Parameter for p in model.parameters())  # lent parameters are back
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad.double(), expected[n] / len(y), atol=1e-6, rtol=1e-4, msg=n)
            assert torch.equal(p.grad, clipped[n])
        if param_grads:
            assert not skipped
        else:  # every Linear/Conv/norm parameter skipped; PReLU (torch.func) and a tied weight's outside use not
            assert skipped, kind
            assert not any(n.startswith("act.") for n in skipped)
            assert "enc.weight" not in skipped
    (g0, n0, d0), (g1, n1, d1) = results[True], results[False]
    torch.testing.assert_close(n1, n0)
    torch.testing.assert_close(d1, d0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k)


def test_a_training_loop_without_parameter_gradients_follows_the_same_path():
    # the optimizer holds the real Parameters: lent ones must be back, updated, every step
    trajectories = []
    for param_grads in (True, False):
        model, x, y = _problem("convs")
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        with fastdd.PerSampleGrads(model, param_grads=param_grads) as ps:
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                ps.clipped_grad(0.2, write_grad=True)
                opt.step()
        trajectories.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in trajectories[0]:
        torch.testing.assert_close(trajectories[1][n], trajectories[0][n], msg=n)
    assert not torch.equal(trajectories[0]["c1.weight"], _problem("convs")[0].c1.weight)  # it trained


def test_lent_parameters_come_back_when_the_forward_raises_or_runs_without_grad():
    model, x, y = _problem("tied")
    with fastdd.PerSampleGrads(model, param_grads=False) as ps:
        with pytest.raises(RuntimeError):
            model(torch.randn(9, 4))  # enc expects 5 features
        assert type(model.enc._parameters["weight"]) is nn.Parameter
        with torch.no_grad():
            model(x)
        assert type(model.enc._parameters["weight"]) is nn.Parameter
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        assert ps.norms().shape == (9,)
    with pytest.raises(ValueError, match="param_grads must be True or False"):
        fastdd.PerSampleGrads(model, param_grads=None)


def _count_gemms(monkeypatch):
    calls = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or addmm(*a, **k))
    return calls


# (in place: G's rows scaled, one GEMM, divided back; blocks: a zero weight, which no division could
# undo, sends the sum to column blocks of a reweighted copy)
@pytest.mark.parametrize("path", ["in_place", "blocks"])
@pytest.mark.parametrize("shape", [(300, 6), (70, 3, 6)])  # several row chunks; T > 1 rows per sample
def test_linear_weighted_batch_sum_is_the_reweighted_sum_and_leaves_g_as_it_was(shape, path, monkeypatch):
    from fastdd.grad.rules import LinearRule

    torch.manual_seed(0)
    m = nn.Linear(6, 40).double()
    x = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn(*shape[:-1], 40, dtype=torch.float64)
    w = torch.rand(shape[0], dtype=torch.float64)
    w[::3] = 1.0  # unclipped samples
    if path == "blocks":
        w[1] = 0.0
    g_before = g.clone()
    gemms = _count_gemms(monkeypatch)
    got = LinearRule().batch_sum(m, x, g, scale=0.5, weights=w)
    assert len(gemms) == (1 if path == "in_place" else 3)  # (40 columns: blocks of 16)
    gw = g_before * w.view(-1, *[1] * (g.dim() - 1))
    expected_w = 0.5 * torch.einsum("...p,...d->pd", gw, x)
    torch.testing.assert_close(got["weight"], expected_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got["bias"], 0.5 * gw.reshape(-1, 40).sum(0), atol=1e-12, rtol=1e-12)
    # the captured gradient is as it was: exactly for unit weights (and off the in-place path),
    # within an ulp where a weight scaled it and a division put it back
    assert torch.equal(g[::3], g_before[::3])
    if path == "blocks":
        assert torch.equal(g, g_before)
    torch.testing.assert_close(g, g_before, atol=0, rtol=2 * torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan"), -1.0, 1e-30, 1e30])
def test_weighted_sums_never_scale_in_place_what_a_division_cannot_undo(bad):
    from fastdd.grad.rules import _rows_scaled_in_place

    g = torch.randn(5, 3)
    w = torch.rand(5) + 0.5
    w[2] = bad
    with _rows_scaled_in_place(g, w, g) as scaled:
        assert not scaled
    half = g.bfloat16()  # an ulp of bf16 is 0.4%: a captured bf16 G is never scaled in place
    with _rows_scaled_in_place(half, torch.rand(5) + 0.5, half) as scaled:
        assert not scaled
    own = half.float()  # a conversion the rule made is its own to scale, and stays scaled
    with _rows_scaled_in_place(own, torch.full((5,), 0.5), half) as scaled:
        assert scaled and torch.equal(own, half.float() * 0.5)
    assert torch.equal(own, half.float() * 0.5)


def test_rows_scaled_in_place_are_put_back_when_the_block_raises():
    from fastdd.grad.rules import _rows_scaled_in_place

    torch.manual_seed(0)
    g = torch.randn(6, 2, 3)
    before = g.clone()
    with pytest.raises(KeyError), _rows_scaled_in_place(g, torch.rand(6) + 0.1, g) as scaled:
        assert scaled and not torch.equal(g, before)
        raise KeyError("a failure inside the block")
    torch.testing.assert_close(g, before, atol=0, rtol=2 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_weighted_batch_sum_is_the_reweighted_sum_and_leaves_g_as_it_was(dtype):
    from fastdd.grad.rules import ConvRule

    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3, padding=1).to(dtype)
    x = torch.randn(5, 3, 6, 6).to(dtype)
    g = torch.randn(5, 4, 6, 6).to(dtype)
    w = torch.rand(5) + 0.05
    g_before = g.clone()
    got = ConvRule().batch_sum(m, x, g, scale=2.0, weights=w)
    gw = (g_before.double() * w.double().view(-1, 1, 1, 1))
    expected = torch.nn.grad.conv2d_weight(x.double(), m.weight.shape, gw, padding=1)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.15, rtol=0.03)
    torch.testing.assert_close(got["weight"].double(), 2.0 * expected, **tol)
    torch.testing.assert_close(got["bias"].double(), 2.0 * gw.sum((0, 2, 3)), **tol)
    if dtype == torch.bfloat16:
        assert torch.equal(g, g_before)  # a copy, never an in-place bf16 round trip
    else:
        torch.testing.assert_close(g, g_before, atol=0, rtol=2 * torch.finfo(dtype).eps)


class SharedGradients(nn.Module):
    """Layers whose output gradients share memory: a sum hands both Linears the same gradient
    tensor, and a residual hands the trunk's gradient on to the layer before it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 6)
        self.res = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x) + self.b(x)
        h = h + self.res(torch.tanh(h))
        return self.head(h)


@pytest.mark.parametrize("param_grads", [True, False])
def test_clipping_layers_whose_output_gradients_share_memory(param_grads):
    torch.manual_seed(0)
    model, x, y = SharedGradients().double(), torch.randn(9, 5, dtype=torch.float64) + 3.0, torch.randint(0, 3, (9,))
    expected, norms = _reference(model, x, y, 0.5)
    assert (norms > 0.5).sum() >= 3  # most samples clipped: their rows are scaled and put back
    with fastdd.PerSampleGrads(model, loss_reduction="sum", param_grads=param_grads) as ps:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        before = ps.norms()
        got = ps.clipped_grad(0.5, write_grad=True)
        after = ps.norms()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], expected[n], atol=1e-12, rtol=1e-10, msg=n)
        assert torch.equal(p.grad, got[n])
    torch.testing.assert_close(after, before, atol=0, rtol=1e-14)


@pytest.mark.parametrize("how", ["backward_gradient", "kept_by_a_hook"])
def test_an_output_gradient_the_user_holds_is_never_scaled_in_place(how, monkeypatch):
    """``out.backward(gradient)`` hands the last layer the user's own tensor as its output gradient,
    and a tensor hook may keep it: clipping must leave it bitwise as it was, and clip as well."""
    import fastdd.grad.rules as rules

    import contextlib

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    x = torch.randn(40, 6) + 2.0
    scaled_in_place = []
    real = rules._rows_scaled_in_place

    @contextlib.contextmanager
    def spy(*args):
        with real(*args) as scaled:
            scaled_in_place.append(scaled)
            yield scaled

    monkeypatch.setattr(rules, "_rows_scaled_in_place", spy)
    with fastdd.PerSampleGrads(model, loss_reduction="sum", param_grads=False) as ps:
        F.cross_entropy(model(x), torch.randint(0, 5, (40,)), reduction="sum").backward()
        ps.clipped_grad(0.3)
        assert scaled_in_place == [True, True]  # an ordinary step: both layers' G are autograd's own
        scaled_in_place.clear()
        out = model(x)
        user = torch.randn(40, 5)
        kept = []
        if how == "backward_gradient":
            out.backward(user)
        else:
            out.register_hook(lambda g: kept.append(g))
            (out * user).sum().backward()
            user = kept[0]
        before = user.clone()
        norms = ps.norms()
        assert (norms > 0.3).sum() > 30  # nearly every row scaled
        got = ps.clipped_grad(0.3)
    assert torch.equal(user, before)
    assert scaled_in_place == [True, False]  # the first layer's G is autograd's; the last one's, the user's
    ref = vmap_per_sample_grads(model, x, user, loss_fn=lambda o, u: (o * u).sum(-1))
    factors = (0.3 / (norms.double() + 1e-6)).clamp(max=1.0)
    for n, g in ref.items():
        torch.testing.assert_close(got[n].double(), torch.tensordot(factors, g.double(), dims=1), atol=1e-5, rtol=1e-4)


def test_where_autograd_references_cannot_be_measured_every_gradient_counts_as_shared(monkeypatch):
    from fastdd.grad import engine

    def refuse(*a, **k):
        raise RuntimeError("no such measurement here")

    monkeypatch.setattr(engine, "_PRIVATE_GRAD_REFS", None)
    with monkeypatch.context() as m:
        m.setattr(torch, "ones", refuse)
        assert engine._private_grad_refs() == 0
    model, x, y = _problem("tied")
    expected, _ = _reference(model, x, y, 0.5)
    with fastdd.PerSampleGrads(model, loss_reduction="sum", param_grads=False) as ps:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        assert all(c.grads_shared == {0} for c in ps._capture.calls if c.grads[0] is not None)
        got = ps.clipped_grad(0.5)
    for n in expected:
        torch.testing.assert_close(got[n].double(), expected[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["convs", "tokens"])
def test_consumers_after_a_clipped_sum_read_the_step_as_before(kind):
    model, x, y = _problem(kind)
    with fastdd.PerSampleGrads(model, param_grads=False) as ps:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        norms, grads = ps.norms(), ps.grads()
        ps.clipped_grad(0.05, write_grad=True)  # most samples clipped
        torch.testing.assert_close(ps.norms(), norms, atol=0, rtol=1e-6)
        again = ps.grads()
    for n in grads:
        torch.testing.assert_close(again[n], grads[n], atol=1e-7, rtol=1e-6, msg=n)


def test_a_float64_step_without_parameter_gradients_is_exact():
    model, x, y = _problem("convs")
    model, x = model.double(), x.double() + 50.0  # float64, uncentred inputs
    expected, _ = _reference(model, x, y, 0.3)
    with fastdd.PerSampleGrads(model, loss_reduction="sum", param_grads=False) as ps:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        got = ps.clipped_grad(0.3, write_grad=True)
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float64
        torch.testing.assert_close(got[n], expected[n], atol=1e-12, rtol=1e-10, msg=n)
