"""The fused class-wise gradient distance and the batched MMD: every backend against the
torch reference, forward and backward (Triton under the interpreter here, natively on a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from fastdd.distill.grad_distance import (SegmentLayout, classwise_grad_distance, classwise_grad_distance_ref,
                                          pack)
from fastdd.distill.mmd import (class_mmd, rbf_row_sums, rbf_row_sums_ref, segment_mean, segment_mean_ref,
                                segments)
from conftest import assert_close

# per-class layer shapes: conv (out, in, kh, kw), linear (out, in), a 1-wide conv, a long row
LAYER_SHAPES = [[(4, 3, 3, 3), (10, 20)], [(1, 1, 3, 3), (3, 7), (2, 1500)]]


def _backend(monkeypatch, backend, device="cpu"):
    if backend == "cuda":
        from fastdd import _ext

        if _ext.load() is None:
            pytest.skip("CUDA extension unavailable")
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTDD_BACKEND", backend)


def _grad_layers(C, shapes, device, seed):
    gen = torch.Generator().manual_seed(seed)
    real = [torch.randn(C, *s, generator=gen).to(device) for s in shapes]
    syn = [(0.5 * r.cpu() + torch.randn(r.shape, generator=gen)).to(device) for r in real]
    return real, syn


def _check_grad_distance(C, shapes, metric, device):
    real, syn = _grad_layers(C, shapes, device, seed=C + len(shapes))
    real = [r.requires_grad_(True) for r in real]
    syn = [s.requires_grad_(True) for s in syn]
    expected = classwise_grad_distance_ref(real, syn, metric)
    exp_grads = torch.autograd.grad(expected.sum(), real + syn)
    layout = SegmentLayout.of_shapes([s for s in shapes], device)
    got = classwise_grad_distance(pack(real), pack(syn), layout, metric)
    got_grads = torch.autograd.grad(got.sum(), real + syn)
    assert_close(got, expected, atol=1e-4, rtol=1e-4, name=f"{metric} distance")
    for i, (g, e) in enumerate(zip(got_grads, exp_grads)):
        assert_close(g, e, atol=1e-5, rtol=1e-3, name=f"{metric} grad {i}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("metric", ["ours", "cos", "mse"])
@pytest.mark.parametrize("shapes", LAYER_SHAPES)
@pytest.mark.parametrize("C", [1, 3])
def test_grad_distance_matches_reference(monkeypatch, backend, metric, shapes, C):
    _backend(monkeypatch, backend)
    _check_grad_distance(C, shapes, metric, "cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_distance_low_precision_and_strided_inputs(monkeypatch, backend, dtype):
    """bf16/fp16 gradients (accumulated in fp32) and strided views give the fp32 answer on the same values."""
    _backend(monkeypatch, backend)
    shapes = LAYER_SHAPES[1]
    real, syn = _grad_layers(3, shapes, "cpu", seed=7)
    layout = SegmentLayout.of_shapes(shapes, "cpu")
    wide = torch.stack([pack(real), pack(syn)], dim=2).to(dtype)  # [C, P, 2]: each side is a strided view
    a, b = wide[..., 0].requires_grad_(False), wide[..., 1].clone().requires_grad_(True)
    assert not wide[..., 0].is_contiguous()
    got = classwise_grad_distance(a, b, layout, "ours")
    (g_got,) = torch.autograd.grad(got.sum(), b)
    b32 = b.detach().float().requires_grad_(True)
    expected = classwise_grad_distance(a.float(), b32, layout, "ours")
    (g_exp,) = torch.autograd.grad(expected.sum(), b32)
    assert g_got.dtype == dtype
    assert_close(got, expected, atol=1e-4, rtol=1e-4, name="distance")
    assert_close(g_got, g_exp, atol=2e-3 * g_exp.abs().max().item(), rtol=1e-2, name="grad")  # one rounding to dtype


def test_grad_distance_is_zero_for_equal_gradients_and_orders_mismatch():
    real, _ = _grad_layers(2, LAYER_SHAPES[0], "cpu", seed=1)
    layout = SegmentLayout.of_shapes(LAYER_SHAPES[0], "cpu")
    a = pack(real)
    for metric in ("ours", "cos", "mse"):
        assert classwise_grad_distance(a, a.clone(), layout, metric).abs().max() < 1e-5
        near = classwise_grad_distance(a, a + 0.01 * torch.randn_like(a), layout, metric)
        far = classwise_grad_distance(a, a + 1.0 * torch.randn_like(a), layout, metric)
        assert (near < far).all(), metric


def test_grad_distance_backward_is_finite_where_a_gradient_row_is_zero():
    # a dead ReLU unit gives an all-zero row of the synthetic gradient: its cosine is 0, and the
    # backward must stay finite (it was NaN: sqrt's derivative at 0)
    real, _ = _grad_layers(2, LAYER_SHAPES[0], "cpu", seed=2)
    layout = SegmentLayout.of_shapes(LAYER_SHAPES[0], "cpu")
    a = pack(real)
    b = a.clone() + 0.1
    b[:, :27] = 0.0  # the first segment (output channel 0 of the 4 x 3 x 3 x 3 layer) is zero
    b.requires_grad_(True)
    for metric in ("ours", "cos"):
        (g,) = torch.autograd.grad(classwise_grad_distance(a, b, layout, metric).sum(), b)
        assert torch.isfinite(g).all(), metric


def test_grad_distance_bad_input():
    layout = SegmentLayout.of_shapes([(2, 3)], "cpu")
    with pytest.raises(ValueError, match="metric must be"):
        classwise_grad_distance(torch.zeros(1, 6), torch.zeros(1, 6), layout, "l1")
    with pytest.raises(ValueError, match="layout covers 6"):
        classwise_grad_distance(torch.zeros(1, 5), torch.zeros(1, 5), layout)
    with pytest.raises(ValueError, match="at least 2 dims"):
        SegmentLayout.of_shapes([(4,)], "cpu")


# --------------------------------------------------------------------------- MMD
def _embeddings(counts, D, device, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(int(sum(counts)), D, generator=gen) + shift).to(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("counts,D", [([3, 1, 5], 7), ([40, 33], 70), ([1], 1)])
def test_segment_mean_matches_reference(monkeypatch, backend, counts, D):
    _backend(monkeypatch, backend)
    x = _embeddings(counts, D, "cpu", seed=D).requires_grad_(True)
    seg = segments(torch.tensor(counts))
    w = torch.randn(len(counts), D)
    got = segment_mean(x, seg)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    expected = torch.stack([x[a:b].mean(0) for a, b in zip(seg[:-1].tolist(), seg[1:].tolist())])
    (g_exp,) = torch.autograd.grad((expected * w).sum(), x)
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="means")
    assert_close(g_got, g_exp, atol=1e-6, rtol=1e-5, name="grad")
    assert_close(segment_mean_ref(x, seg), expected, atol=1e-5, rtol=1e-5, name="ref")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("qc,kc,D", [([3, 1, 5], [2, 4, 1], 7), ([40, 33], [10, 65], 70), ([1], [1], 1)])
def test_rbf_row_sums_match_dense_kernel(monkeypatch, backend, qc, kc, D):
    _backend(monkeypatch, backend)
    q = _embeddings(qc, D, "cpu", seed=1).requires_grad_(True)
    k = _embeddings(kc, D, "cpu", seed=2, shift=0.3).requires_grad_(True)
    qseg, kseg = segments(torch.tensor(qc)), segments(torch.tensor(kc))
    gamma = 0.5 / D
    wq = torch.randn(q.shape[0])
    got = rbf_row_sums(q, k, qseg, kseg, gamma)
    g_got = torch.autograd.grad((got * wq).sum(), (q, k))
    # oracle: the dense kernel of each class from torch.cdist
    rows = []
    for c in range(len(qc)):
        Kc = torch.exp(-gamma * torch.cdist(q[qseg[c]:qseg[c + 1]], k[kseg[c]:kseg[c + 1]]).square())
        rows.append(Kc.sum(1))
    expected = torch.cat(rows)
    g_exp = torch.autograd.grad((expected * wq).sum(), (q, k))
    assert_close(got, expected, atol=1e-4, rtol=1e-4, name="row sums")
    for name, g, e in zip(("grad q", "grad k"), g_got, g_exp):
        assert_close(g, e, atol=1e-4, rtol=1e-3, name=name)
    assert_close(rbf_row_sums_ref(q, k, qseg, kseg, gamma), expected, atol=1e-4, rtol=1e-4, name="ref")


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_class_mmd_closed_forms(kernel):
    counts_r, counts_s = torch.tensor([30, 20]), torch.tensor([4, 4])
    real = _embeddings(counts_r.tolist(), 5, "cpu", seed=3)
    syn = _embeddings(counts_s.tolist(), 5, "cpu", seed=4, shift=1.0).requires_grad_(True)
    got = class_mmd(real, counts_r, syn, counts_s, kernel=kernel, gamma=0.1)
    rs, ss = segments(counts_r).tolist(), segments(counts_s).tolist()
    for c in range(2):
        x, y = real[rs[c]:rs[c + 1]], syn[ss[c]:ss[c + 1]]
        if kernel == "linear":
            expected = (x.mean(0) - y.mean(0)).square().sum()
        else:
            k = lambda a, b: torch.exp(-0.1 * torch.cdist(a, b).square()).mean()  # noqa: E731
            expected = k(x, x) + k(y, y) - 2 * k(x, y)
        assert_close(got[c], expected, atol=1e-5, rtol=1e-4, name=f"class {c}")
    assert (got > 0).all()
    # moving syn onto the real data lowers the MMD: the gradient points the right way
    (g,) = torch.autograd.grad(got.sum(), syn)
    with torch.no_grad():
        assert (class_mmd(real, counts_r, syn - 0.5 * g, counts_s, kernel=kernel, gamma=0.1) < got).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_class_mmd_bf16_matches_fp32_on_the_same_values(monkeypatch, backend, kernel):
    _backend(monkeypatch, backend)
    counts_r, counts_s = torch.tensor([9, 17]), torch.tensor([3, 3])
    real = _embeddings(counts_r.tolist(), 6, "cpu", seed=8).bfloat16()
    syn = _embeddings(counts_s.tolist(), 6, "cpu", seed=9, shift=0.5).bfloat16().requires_grad_(True)
    got = class_mmd(real, counts_r, syn, counts_s, kernel=kernel, gamma=0.2)
    (g,) = torch.autograd.grad(got.sum(), syn)
    syn32 = syn.detach().float().requires_grad_(True)
    expected = class_mmd(real.float(), counts_r, syn32, counts_s, kernel=kernel, gamma=0.2)
    (g_exp,) = torch.autograd.grad(expected.sum(), syn32)
    assert g.dtype == torch.bfloat16
    assert_close(got, expected, atol=1e-5, rtol=1e-4, name="mmd")
    assert_close(g, g_exp, atol=1e-2 * g_exp.abs().max().item(), rtol=1e-2, name="grad")


def test_class_mmd_bad_input():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="kernel must be"):
        class_mmd(x, torch.tensor([4]), x, torch.tensor([4]), kernel="poly")
    with pytest.raises(ValueError, match="add up"):
        class_mmd(x, torch.tensor([3]), x, torch.tensor([4]))
    with pytest.raises(ValueError, match=r"\[N, D\] and \[M, D\]"):
        class_mmd(x, torch.tensor([4]), torch.zeros(4, 2), torch.tensor([4]))


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("metric", ["ours", "cos", "mse"])
def test_grad_distance_gpu(monkeypatch, backend, metric):
    _backend(monkeypatch, backend)
    # the DC ConvNet at 32x32 with width 128: 3 convs and the classifier, 10 classes
    shapes = [(128, 3, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3), (10, 2048)]
    _check_grad_distance(10, shapes, metric, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("D", [128, 2048, 3000])  # 3000: the CUDA RBF kernel hands over to Triton
def test_mmd_gpu(monkeypatch, backend, D):
    _backend(monkeypatch, backend)
    counts_r, counts_s = [256] * 10, [10] * 10
    real = _embeddings(counts_r, D, "cuda", seed=5)
    syn = _embeddings(counts_s, D, "cuda", seed=6, shift=0.2).requires_grad_(True)
    for kernel in ("linear", "rbf"):
        got = class_mmd(real, torch.tensor(counts_r), syn, torch.tensor(counts_s), kernel=kernel, gamma=1.0 / D)
        (g,) = torch.autograd.grad(got.sum(), syn)
        monkeypatch.setenv("FASTDD_BACKEND", "torch")
        expected = class_mmd(real, torch.tensor(counts_r), syn, torch.tensor(counts_s), kernel=kernel, gamma=1.0 / D)
        (g_exp,) = torch.autograd.grad(expected.sum(), syn)
        monkeypatch.setenv("FASTDD_BACKEND", backend)
        assert_close(got, expected, atol=1e-4, rtol=1e-3, name=f"{kernel} mmd")
        assert_close(g, g_exp, atol=1e-5, rtol=1e-3, name=f"{kernel} grad")


def test_cosine_matches_torch():
    a, b = torch.randn(5, 9), torch.randn(5, 9)
    layout = SegmentLayout.of_shapes([(5, 9)], "cpu")
    got = classwise_grad_distance(a.reshape(1, -1), b.reshape(1, -1), layout, "ours")
    assert_close(got[0], (1 - F.cosine_similarity(a, b, dim=1)).sum(), atol=1e-5, rtol=1e-5, name="ours")
