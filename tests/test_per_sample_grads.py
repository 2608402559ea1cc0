"""The gradient engine against torch.func vmap(grad(...)) on every kind of model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdd
from fastdd.models import ConvNet, MLP
from conftest import assert_close
from helpers import flat_sq_norms, vmap_per_sample_grads

TOL = dict(atol=1e-5, rtol=1e-4)


class SeqModel(nn.Module):
    """Embedding -> LayerNorm -> Linear over [B, T, d] -> token logits; output tied to the embedding."""

    def __init__(self, vocab=11, dim=8, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.norm(self.embed(idx)))))


def seq_loss(outputs, targets):  # per-sample: sum of token losses
    return F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").sum(1)


class DirectTie(nn.Module):
    """Uses the embedding matrix directly (outside nn.Embedding's forward) as the output layer."""

    def __init__(self, vocab=9, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, idx):
        h = torch.relu(self.mix(self.embed(idx)))
        return h @ self.embed.weight.T


class NoRule(nn.Module):
    """Layers without hand-written rules: a bare parameter, PReLU, Conv3d-free attention."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6))
        self.act = nn.PReLU(4)  # channels are dim 1 of [B, 4, 6]
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(x * self.scale)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.out(h.mean(1))


def conv_model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same", padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(6, 6, (2, 3), groups=6, stride=(1, 2), bias=False),
        nn.Flatten(), nn.LazyLinear(3),
    )


def conv1d_model():
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, padding="same", dilation=2), nn.InstanceNorm1d(4, affine=True), nn.ReLU(),
        nn.Conv1d(4, 4, 2, stride=3, groups=2, padding=1, padding_mode="circular"),
        nn.Flatten(), nn.LazyLinear(3),
    )


def norm_model():
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
        nn.InstanceNorm2d(4, affine=True), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(5),
    )
    return m


CASES = {
    "mlp": (lambda: MLP(20, 5, hidden=(16, 12)), lambda B: torch.randn(B, 20), lambda B: torch.randint(0, 5, (B,)), None),
    "convnet8": (lambda: ConvNet(1, 10, 8, width=8), lambda B: torch.randn(B, 1, 8, 8), lambda B: torch.randint(0, 10, (B,)), None),
    "convnet28": (lambda: ConvNet(1, 10, 28, width=6), lambda B: torch.randn(B, 1, 28, 28), lambda B: torch.randint(0, 10, (B,)), None),
    "conv_groups_stride_dilation": (conv_model, lambda B: torch.randn(B, 2, 11, 13), lambda B: torch.randint(0, 3, (B,)), None),
    "conv1d": (conv1d_model, lambda B: torch.randn(B, 3, 17), lambda B: torch.randint(0, 3, (B,)), None),
    "norms_eval": (norm_model, lambda B: torch.randn(B, 1, 9, 9), lambda B: torch.randint(0, 5, (B,)), None),
    "sequence_tied": (SeqModel, lambda B: torch.randint(0, 11, (B, 7)), lambda B: torch.randint(0, 11, (B, 7)), seq_loss),
    "direct_tie": (DirectTie, lambda B: torch.randint(0, 9, (B, 5)), lambda B: torch.randint(0, 9, (B, 5)), seq_loss),
    "fallback": (NoRule, lambda B: torch.randn(B, 4, 6), lambda B: torch.randint(0, 3, (B,)), None),
}


def build(case, B=5):
    make_model, make_x, make_y, loss = CASES[case]
    model = make_model()
    x, y = make_x(B), make_y(B)
    model(x[:1])  # initialize lazy layers
    if case == "norms_eval":
        model.train()
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(16, 1, 9, 9) * 2 + 1)
        model.eval()
    return model, x, y, loss


def oracle(model, x, y, loss, names=None):
    from helpers import ce_losses

    return vmap_per_sample_grads(model, x, y, loss or ce_losses, names)


@pytest.mark.parametrize("case", list(CASES))
def test_grads_match_vmap(case):
    model, x, y, loss = build(case)
    expected = oracle(model, x, y, loss)
    got = fastdd.per_sample_grads(model, x, y, loss_fn=loss)
    assert set(got) == set(expected)
    for name in expected:
        assert_close(got[name], expected[name], name=f"{case}:{name}", **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_norms_match_materialized(case):
    model, x, y, loss = build(case)
    expected = flat_sq_norms(oracle(model, x, y, loss)).sqrt()
    got = fastdd.per_sample_grad_norms(model, x, y, loss_fn=loss)
    assert got.shape == (x.shape[0],)
    assert_close(got, expected, name=case, **TOL)


def padded_conv_model():
    """One-group convs whose padding the rules apply to the input first: reflect, and an
    asymmetric 'same' (even kernel), then strided and dilated ones."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(3, 4, (2, 4), padding="same"), nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, dilation=2, padding=2), nn.Flatten(), nn.LazyLinear(3),
    )


@pytest.mark.parametrize("case", ["convnet8", "conv_groups_stride_dilation", "conv1d", "norms_eval", "padded"])
def test_conv_kernel_inside_the_engine(monkeypatch, case):
    """With the Triton backend (the interpreter here) the per-sample conv weight gradients and
    their fused norms come from kernels/conv_wgrad.py: the engine still matches vmap."""
    pytest.importorskip("triton")
    if case == "padded":
        model, x, y, loss = padded_conv_model(), torch.randn(4, 2, 9, 10), torch.randint(0, 3, (4,)), None
        model(x[:1])
    else:
        model, x, y, loss = build(case, B=4)
    expected = oracle(model, x, y, loss)
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    got = fastdd.per_sample_grads(model, x, y, loss_fn=loss)
    for name in expected:
        assert_close(got[name], expected[name], name=f"{case}:{name}", **TOL)
    norms = fastdd.per_sample_grad_norms(model, x, y, loss_fn=loss)
    assert_close(norms, flat_sq_norms(expected).sqrt(), name=f"{case}: norms", **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_dots_match_materialized(case):
    model, x, y, loss = build(case)
    grads = oracle(model, x, y, loss)
    K = 3
    vectors = {n: torch.randn(K, *g.shape[1:]) for n, g in grads.items()}
    expected = sum(g.flatten(1).double() @ vectors[n].flatten(1).double().T for n, g in grads.items())
    got = fastdd.per_sample_grad_dots(model, x, y, vectors, loss_fn=loss)
    assert got.shape == (x.shape[0], K)
    assert_close(got, expected, atol=1e-4, rtol=1e-4, name=case)


@pytest.mark.parametrize("case", ["mlp", "convnet8", "conv_groups_stride_dilation", "sequence_tied", "fallback"])
def test_classwise_is_mean_of_class_members(case):
    model, x, y, loss = build(case, B=9)
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 0, 0, 2])
    grads = oracle(model, x, y, loss)
    got = fastdd.classwise_grads(model, x, y, num_classes=4, loss_fn=loss, labels=labels)
    for name, g in grads.items():
        for c in range(4):
            rows = labels == c
            expected = g[rows].mean(0) if rows.any() else torch.zeros_like(g[0])
            assert_close(got[name][c], expected, name=f"{case}:{name}:class{c}", **TOL)


def test_subset_of_params_and_chunking():
    model, x, y, loss = build("convnet8", B=7)
    names = ["features.0.weight", "classifier.bias"]
    expected = oracle(model, x, y, loss, names)
    got = fastdd.per_sample_grads(model, x, y, params=names, chunk_size=2)
    assert list(got) == names
    for n in names:
        assert_close(got[n], expected[n], name=n, **TOL)
    norms = fastdd.per_sample_grad_norms(model, x, y, params=names, chunk_size=3)
    assert_close(norms, flat_sq_norms(expected).sqrt(), name="norms", **TOL)


def test_sequence_norm_choices_agree():
    """Gram form and materialization give the same norms (the choice is only about cost)."""
    from fastdd.grad.per_sample_linear import gram_is_cheaper, psg_linear_ref, psg_linear_sqnorm_ref

    for T, d, p in [(5, 40, 40), (40, 5, 6)]:
        A, G = torch.randn(3, T, d), torch.randn(3, T, p)
        expected = psg_linear_ref(A, G).square().sum((1, 2))
        assert_close(psg_linear_sqnorm_ref(A, G), expected, atol=1e-3, rtol=1e-5, name=f"T={T}")
    assert gram_is_cheaper(5, 40, 40) and not gram_is_cheaper(40, 5, 6)


def test_batch_of_one_and_noncontiguous_inputs():
    model = MLP(12, 4, hidden=(9,))
    x = torch.randn(12, 6).T  # [6, 12], not contiguous
    assert not x.is_contiguous()
    y = torch.randint(0, 4, (6,))
    expected = oracle(model, x.contiguous(), y, None)
    got = fastdd.per_sample_grads(model, x, y)
    for n in expected:
        assert_close(got[n], expected[n], name=n, **TOL)
    one = fastdd.per_sample_grads(model, x[:1], y[:1])
    for n in expected:
        assert_close(one[n], expected[n][:1], name=n, **TOL)


def test_model_left_as_it_was():
    model, x, y, _ = build("convnet8")
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    fastdd.per_sample_grad_norms(model, x, y)
    fastdd.per_sample_grads(model, x, y)
    assert model.training
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_context_manager_matches_functional(reduction):
    model, x, y, _ = build("convnet8", B=6)
    fallback_model, fx, fy, _ = build("fallback", B=6)
    for m, xx, yy in [(model, x, y), (fallback_model, fx, fy)]:
        expected = fastdd.per_sample_grads(m, xx, yy)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        with fastdd.PerSampleGrads(m, loss_reduction=reduction) as ps:
            for _ in range(2):  # a second step replaces the first
                opt.zero_grad()
                loss = F.cross_entropy(m(xx), yy, reduction=reduction)
                loss.backward()
                grads = ps.grads()
                norms = ps.norms()
                vecs = {n: torch.randn(2, *p.shape) for n, p in m.named_parameters()}
                dots = ps.dots(vecs)
        for n in expected:
            assert_close(grads[n], expected[n], name=n, **TOL)
        assert_close(norms, flat_sq_norms(expected).sqrt(), name="norms", **TOL)
        expected_dots = sum(expected[n].flatten(1) @ vecs[n].flatten(1).T for n in vecs)
        assert_close(dots, expected_dots, atol=1e-4, rtol=1e-4, name="dots")
        # the ordinary .grad of the step is the user's, and equals the mean of per-sample grads
        scale = 1 / 6 if reduction == "mean" else 1.0
        for n, p in m.named_parameters():
            assert_close(p.grad, expected[n].sum(0) * scale, name=f"grad {n}", **TOL)
        assert all(len(mod._forward_hooks) == 0 for mod in m.modules())


@pytest.mark.parametrize("param_grads", [True, False])
@pytest.mark.parametrize("eager", [False, True])
def test_a_training_loop_frees_each_step_without_the_garbage_collector(param_grads, eager):
    """A step's recorded calls, their inputs and output gradients go as soon as the next forward
    replaces them, by reference counting alone: a hook that held its call strongly made a cycle
    through autograd's nodes that kept about 1 MB of activations per MLP step alive."""
    import gc
    import weakref

    model, x, y, _ = build("convnet8", B=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    gc.collect()
    gc.disable()
    try:
        with fastdd.PerSampleGrads(model, param_grads=param_grads, eager=eager) as ps:
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                ps.clipped_grad(1.0, write_grad=True)
                opt.step()
                calls = ps._capture.calls
                seen.append([weakref.ref(c) for c in calls] + [weakref.ref(g) for c in calls for g in c.grads
                                                                if g is not None])
            assert all(r() is not None for r in seen[-1])  # the last step is still there to read
            gone = [r() is None for step in seen[:-1] for r in step]
    finally:
        gc.enable()
    assert len(gone) > 8 and all(gone)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_context_entered_without_grad_mode(monkeypatch, mode):
    """Entering the context measures, once, how many references autograd's own output gradient has
    inside a hook; under inference_mode or no_grad that measurement still runs (and nothing is recorded)."""
    from fastdd.grad import engine

    monkeypatch.setattr(engine, "_PRIVATE_GRAD_REFS", None)  # measured on the next entry
    model, x, y, _ = build("mlp")
    with getattr(torch, mode)():
        with fastdd.PerSampleGrads(model) as ps:
            model(x)
            assert ps._capture.calls == []  # no graph, nothing recorded
    assert isinstance(engine._PRIVATE_GRAD_REFS, int) and engine._PRIVATE_GRAD_REFS >= 2
    with fastdd.PerSampleGrads(model) as ps:  # and a step afterwards as usual
        F.cross_entropy(model(x), y).backward()
        assert ps.norms().shape == (x.shape[0],)


def test_context_manager_requires_backward():
    model, x, y, _ = build("mlp")
    with fastdd.PerSampleGrads(model) as ps:
        model(x)
        with pytest.raises(RuntimeError, match="no backward"):
            ps.norms()


def test_reused_output_buffer():
    model, x, y, _ = build("mlp", B=4)
    out = {n: torch.empty(4, *p.shape) for n, p in model.named_parameters()}
    got = fastdd.per_sample_grads(model, x, y, out=out)
    expected = oracle(model, x, y, None)
    for n in expected:
        assert got[n].data_ptr() == out[n].data_ptr()
        assert_close(out[n], expected[n], name=n, **TOL)


def test_module_reused_twice_sums_contributions():
    lin = nn.Linear(5, 5)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(4, 5), torch.randint(0, 2, (4,))
    expected = oracle(model, x, y, None)
    got = fastdd.per_sample_grads(model, x, y)
    for n in expected:
        assert_close(got[n], expected[n], name=n, **TOL)


def test_fallback_chunks_give_the_same_answer():
    model, x, y, loss = build("fallback", B=7)
    expected = oracle(model, x, y, loss)
    for chunk in (1, 3, None):
        got = fastdd.per_sample_grads(model, x, y, chunk_size=chunk)
        for n in expected:
            assert_close(got[n], expected[n], name=f"chunk={chunk}:{n}", **TOL)


def test_layer_called_with_keyword_input():
    class KwNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(input=x)

    model = KwNet()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    expected = oracle(model, x, y, None)
    got = fastdd.per_sample_grads(model, x, y)
    for n in expected:
        assert_close(got[n], expected[n], name=n, **TOL)


def test_bfloat16_model_errs_no_more_than_vmap_in_bfloat16():
    """STYLE.md: in low precision, at most about twice the error of torch's own path."""
    model = ConvNet(1, 10, 8, width=8, depth=2)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    expected = oracle(model, x, y, None)  # fp32
    model16, x16 = model.to(torch.bfloat16), x.bfloat16()
    got = fastdd.per_sample_grads(model16, x16, y)
    torch_bf16 = oracle(model16, x16, y, None)
    for n in expected:
        assert got[n].dtype == torch.bfloat16
        err = (got[n].float() - expected[n]).abs().max().item()
        err_torch = (torch_bf16[n].float() - expected[n]).abs().max().item()
        assert err <= 2 * err_torch + 1e-3, (n, err, err_torch)


def test_mixed_dtype_activations_and_gradients():
    from fastdd.grad.per_sample_linear import psg_linear, psg_linear_sqnorm

    A, G = torch.randn(3, 4, 5), torch.randn(3, 4, 2).bfloat16()
    expected = torch.bmm(G.float().transpose(1, 2), A)
    assert_close(psg_linear(A, G), expected, atol=1e-5, rtol=1e-5, name="mixed")
    assert_close(psg_linear_sqnorm(A, G), expected.square().sum((1, 2)), atol=1e-4, rtol=1e-5, name="mixed norms")


@pytest.mark.parametrize("case", ["mlp", "convnet8", "sequence_tied", "fallback"])
def test_float64_models_stay_float64(case):
    """Reductions of float64 models run in float64: agreement far below fp32 rounding."""
    model, x, y, loss = build(case)
    model = model.double()
    x = x.double() if x.dtype.is_floating_point else x
    grads = oracle(model, x, y, loss)
    norms = fastdd.per_sample_grad_norms(model, x, y, loss_fn=loss)
    assert norms.dtype == torch.float64
    assert_close(norms, flat_sq_norms(grads).sqrt(), atol=1e-12, rtol=1e-10, name="norms")
    vectors = {n: torch.randn(2, *g.shape[1:], dtype=torch.float64) for n, g in grads.items()}
    dots = fastdd.per_sample_grad_dots(model, x, y, vectors, loss_fn=loss)
    expected = sum(g.flatten(1) @ vectors[n].flatten(1).T for n, g in grads.items())
    assert dots.dtype == torch.float64
    assert_close(dots, expected, atol=1e-11, rtol=1e-10, name="dots")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("net", ["mlp", "convnet28"])
def test_engine_on_gpu(monkeypatch, backend, net):
    """The whole engine on CUDA tensors, per backend, against vmap on the same device."""
    if backend == "cuda":
        from fastdd import _ext

        if _ext.load() is None:
            pytest.skip("CUDA extension unavailable")
    monkeypatch.setenv("FASTDD_BACKEND", backend)
    # cuDNN convolutions default to TF32 (1e-3 relative error) in vmap and in the engine alike
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    if net == "mlp":
        model, x = MLP(64, 10, hidden=(128, 64)), torch.randn(48, 64)
    else:
        model, x = ConvNet(1, 10, 28, width=16), torch.randn(48, 1, 28, 28)
    model, x, y = model.cuda(), x.cuda(), torch.randint(0, 10, (48,), device="cuda")
    expected = vmap_per_sample_grads(model, x, y)
    got = fastdd.per_sample_grads(model, x, y)
    # one scale for all parameters: a conv bias before instance norm has a true gradient of 0
    scale = max(g.abs().max().item() for g in expected.values())
    for n in expected:
        assert_close(got[n], expected[n], atol=1e-5 * scale, rtol=1e-3, name=n)
    norms = fastdd.per_sample_grad_norms(model, x, y)
    assert_close(norms.double(), flat_sq_norms(expected).sqrt(), atol=1e-4, rtol=1e-3, name="norms")


@pytest.mark.parametrize("case", ["convnet8", "conv_groups_stride_dilation", "conv1d"])
def test_dots_with_one_vector_through_the_convolution(case):
    # K = 1 takes the conv path: <G_i^T A_i, V> as the layer's convolution with V, times g_i
    model, x, y, loss = build(case)
    grads = oracle(model, x, y, loss)
    vectors = {n: torch.randn(1, *g.shape[1:]) for n, g in grads.items()}
    expected = sum(g.flatten(1).double() @ vectors[n].flatten(1).double().T for n, g in grads.items())
    got = fastdd.per_sample_grad_dots(model, x, y, vectors, loss_fn=loss)
    assert_close(got, expected, atol=1e-4, rtol=1e-4, name=case)


@pytest.mark.parametrize("dtype,offset", [(torch.float64, 0.0), (torch.float32, 0.0), (torch.float32, 100.0)])
def test_group_norm_reuses_the_forwards_statistics(monkeypatch, dtype, offset):
    """GroupNorm's per-sample gradients from the forward's own (mean, rstd) equal those from
    recomputed statistics and vmap's, on uncentred inputs too; a norm layer of another kind recomputes."""
    from fastdd.grad import engine, rules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 4)).to(dtype)
    x, y = torch.randn(7, 2, 7, 7, dtype=dtype) + offset, torch.randint(0, 4, (7,))
    seen = []
    real = rules._GroupStatsRule.saved_stats
    monkeypatch.setattr(rules._GroupStatsRule, "saved_stats",
                        lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    reused = fastdd.per_sample_grads(model, x, y)
    assert len(seen) == 1 and seen[0] is not None and seen[0][0].shape == (7, 3)
    monkeypatch.setattr(engine, "_stats_kw", lambda call, s=slice(None): {})
    recomputed = fastdd.per_sample_grads(model, x, y)
    ref = vmap_per_sample_grads(model, x, y)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    for name in ("1.weight", "1.bias"):
        assert_close(reused[name], recomputed[name], name=name, **tol)
        assert_close(reused[name], ref[name], name=name, **tol)
    inst = nn.Sequential(nn.InstanceNorm2d(2, affine=True), nn.Flatten(), nn.Linear(2 * 7 * 7, 4)).to(dtype)
    with torch.enable_grad():
        assert rules._GroupStatsRule.saved_stats(rules.rule_for(inst[0]), inst[0], x, inst[0](x)) is None


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_group_norm_in_bfloat16_converts_a_chunk_of_samples_at_a_time(monkeypatch, norm):
    """A bf16 batch's per-sample GroupNorm/InstanceNorm gradients equal the fp32 computation on the
    same values, and no fp32 tensor the size of the whole batch's activation is ever made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdd.grad import rules

    torch.manual_seed(0)
    layer = nn.GroupNorm(4, 8) if norm == "group" else nn.InstanceNorm2d(8, affine=True)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(64, 8, 16, 16) * 3 + 2).bfloat16()  # uncentred
    g = torch.randn(64, 8, 16, 16).bfloat16()
    rule = rules.rule_for(layer)
    monkeypatch.setattr(rules, "_norm_chunks", lambda t: [slice(i, i + 5) for i in range(0, t.shape[0], 5)])
    sizes = []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                sizes.append(out.numel())
            return out

    with Largest():
        got = rule.materialize(layer.bfloat16(), x, g)
    assert max(sizes) <= 5 * x[0].numel()  # a chunk's worth, never the batch's
    expected = rule.materialize(layer.float(), x.float(), g.float())
    for name in ("weight", "bias"):
        assert got[name].dtype == torch.bfloat16
        assert_close(got[name].float(), expected[name], name=name, atol=0.02, rtol=0.01)
