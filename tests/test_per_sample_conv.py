"""Per-sample convolution weight gradients: the Triton implicit GEMM (interpreter here,
native on a GPU) and the batch-as-groups torch path against per-sample autograd."""
import pytest
import torch
import torch.nn.functional as F

from fastdd.grad import per_sample_conv
from fastdd.grad.per_sample_conv import conv_weight_grads, conv_weight_grads_ref, conv_weight_sqnorms
from conftest import assert_close

# (B, C, O, spatial, kernel, stride, padding, dilation): odd sizes, strides, dilation,
# 1x1 and non-square kernels, more patch entries than one block, Conv1d
CONFIGS = [
    (2, 3, 5, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 2, 17, (9, 6), (3, 2), (2, 1), (0, 1), (1, 1)),
    (2, 4, 3, (8, 8), (3, 3), (1, 1), (2, 2), (2, 2)),
    (1, 20, 6, (5, 5), (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 3, 4, (11,), (5,), (2,), (2,), (1,)),
]


def _inputs(B, C, O, spatial, kernel, stride, padding, dilation, dtype=torch.float32, device="cpu"):
    conv = F.conv2d if len(spatial) == 2 else F.conv1d
    x = torch.randn(B, C, *spatial, device=device)
    w = torch.randn(O, C, *kernel, device=device)
    out_shape = conv(x, w, None, stride, padding, dilation).shape
    g = torch.randn(out_shape, device=device)
    return x.to(dtype), g.to(dtype), tuple(w.shape)


def _autograd_oracle(x, g, weight_shape, stride, padding, dilation):
    """Per-sample weight gradients in float64 by one autograd call per sample."""
    conv = F.conv2d if x.dim() == 4 else F.conv1d
    rows = []
    for xi, gi in zip(x.double(), g.double()):
        w = torch.zeros(weight_shape, dtype=torch.float64, device=x.device, requires_grad=True)
        (conv(xi[None], w, None, stride, padding, dilation) * gi[None]).sum().backward()
        rows.append(w.grad)
    return torch.stack(rows)


@pytest.mark.parametrize("config", CONFIGS)
def test_torch_path_matches_autograd(config):
    _, _, _, _, _, stride, padding, dilation = config
    x, g, shape = _inputs(*config)
    got = conv_weight_grads_ref(x, g, shape, stride, padding, dilation, 1)
    assert_close(got, _autograd_oracle(x, g, shape, stride, padding, dilation), atol=1e-4, rtol=1e-5)


# patches short enough for the CPU's unfold + bmm path: one input channel, strides, dilation, Conv1d
SMALL_PATCH_CONFIGS = [
    (3, 1, 7, (9, 8), (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 1, 4, (10, 7), (3, 2), (2, 1), (0, 1), (2, 1)),
    (2, 1, 5, (12,), (5,), (2,), (2,), (1,)),
]


@pytest.mark.parametrize("config", SMALL_PATCH_CONFIGS)
def test_unfold_path_matches_autograd(monkeypatch, config):
    _, _, _, _, _, stride, padding, dilation = config
    x, g, shape = _inputs(*config)
    calls = []
    unfold = per_sample_conv.conv_weight_grads_unfold
    monkeypatch.setattr(per_sample_conv, "conv_weight_grads_unfold", lambda *a: calls.append(1) or unfold(*a))
    out = torch.full((x.shape[0], *shape), float("nan"))
    got = conv_weight_grads(x, g, shape, stride, padding, dilation, 1, out=out)
    assert calls, "a patch this short takes the unfold path on a CPU"
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, _autograd_oracle(x, g, shape, stride, padding, dilation), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_triton_kernel_matches_autograd(monkeypatch, config, layout):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    _, _, _, _, _, stride, padding, dilation = config
    x, g, shape = _inputs(*config)
    if layout == "strided":  # channels-last storage and a sliced batch
        x = torch.cat([x, x]).transpose(1, -1).contiguous().transpose(1, -1)[::2]
        g = torch.cat([g, g])[::2]
    got = conv_weight_grads(x, g, shape, stride, padding, dilation, 1)
    assert_close(got, _autograd_oracle(x, g, shape, stride, padding, dilation), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_squared_norms_match_autograd(monkeypatch, config):
    """The norm kernel reduces the same tiles in registers: ||grad_b||^2 without writing it."""
    pytest.importorskip("triton")
    _, _, _, _, _, stride, padding, dilation = config
    x, g, shape = _inputs(*config)
    assert conv_weight_sqnorms(x, g, shape, stride, padding, dilation, 1) is None  # CPU tensors: torch path
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    got = conv_weight_sqnorms(x, g, shape, stride, padding, dilation, 1)
    expected = _autograd_oracle(x, g, shape, stride, padding, dilation).flatten(1).square().sum(1)
    assert got.dtype == torch.float32
    assert_close(got, expected, atol=1e-3, rtol=1e-5)


def test_triton_kernel_low_precision(monkeypatch):
    """bf16 inputs: the kernel errs at most about twice the torch path in the same dtype
    (STYLE.md), and an fp32 buffer receives fp32 sums of the bf16 products."""
    pytest.importorskip("triton")
    config = CONFIGS[1]
    _, _, _, _, _, stride, padding, dilation = config
    x, g, shape = _inputs(*config, dtype=torch.bfloat16)
    oracle = _autograd_oracle(x, g, shape, stride, padding, dilation)
    err_torch = (conv_weight_grads_ref(x, g, shape, stride, padding, dilation, 1).double() - oracle).abs().max()
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    got = conv_weight_grads(x, g, shape, stride, padding, dilation, 1)
    assert got.dtype == torch.bfloat16
    assert (got.double() - oracle).abs().max() <= 2 * err_torch + 1e-6
    buf = torch.full((x.shape[0], *shape), float("nan"))
    out = conv_weight_grads(x, g, shape, stride, padding, dilation, 1, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert_close(buf, oracle, atol=1e-4, rtol=1e-5, name="fp32 buffer")


def test_groups_stay_on_torch_path(monkeypatch):
    """Grouped convolutions are not the kernel's: they go through the torch path, still right."""
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(6, 2, 3, 3)
    g = torch.randn(F.conv2d(x, w, None, 1, 1, 1, 2).shape)
    got = conv_weight_grads(x, g, tuple(w.shape), (1, 1), (1, 1), (1, 1), 2)
    rows = []
    for xi, gi in zip(x, g):
        wi = torch.zeros_like(w, requires_grad=True)
        (F.conv2d(xi[None], wi, None, 1, 1, 1, 2) * gi[None]).sum().backward()
        rows.append(wi.grad)
    assert_close(got, torch.stack(rows), atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS + [
    (64, 128, 128, (16, 16), (3, 3), (1, 1), (1, 1), (1, 1)),  # a DC ConvNet layer
    (8, 3, 64, (32, 32), (3, 3), (1, 1), (1, 1), (1, 1)),
])
def test_gpu_kernel(monkeypatch, dtype, config):
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _, _, _, _, _, stride, padding, dilation = config
    x, g, shape = _inputs(*config, dtype=dtype, device="cuda")
    oracle = _autograd_oracle(x, g, shape, stride, padding, dilation)
    got = conv_weight_grads(x, g, shape, stride, padding, dilation, 1)
    scale = oracle.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(got, oracle, atol=tol * scale, rtol=tol)
    norms = conv_weight_sqnorms(x, g, shape, stride, padding, dilation, 1)
    expected = oracle.flatten(1).square().sum(1)
    assert_close(norms, expected, atol=tol * expected.max().item(), rtol=10 * tol, name="squared norms")
