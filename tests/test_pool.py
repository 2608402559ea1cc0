"""The ConvNet's 2x2 average pooling (fastdd.models.pool) against ATen's avg_pool2d."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from conftest import assert_close
from fastdd.grad import per_sample_grads
from fastdd.models import ConvNet
from fastdd.models.pool import AvgPool2x2, _fast_path, avg_pool_2x2, avg_pool_2x2_ref

SHAPES = [(1, 1, 2, 2), (2, 3, 7, 5), (3, 2, 8, 9), (4, 5, 28, 28), (2, 3, 6, 7)]
DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.float64, 1e-12, 1e-12), (torch.bfloat16, 2e-2, 2e-2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_pool_and_its_gradient_equal_aten(shape, dtype, atol, rtol):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    assert _fast_path(x)
    out, ref = avg_pool_2x2(x), avg_pool_2x2_ref(x)
    assert_close(out, ref, atol, rtol, "forward")
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    assert_close(gx, gx_ref, atol, rtol, "backward")  # odd sizes: zeros on the row / column left out


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 2, 4, 4)])
def test_pool_is_twice_differentiable_and_has_forward_mode(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(avg_pool_2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool_2x2, (x,))  # DC's matching differentiates the backward
    t = torch.randn_like(x)
    with fwAD.dual_level():
        _, tangent = fwAD.unpack_dual(avg_pool_2x2(fwAD.make_dual(x.detach(), t)))
    assert_close(tangent, avg_pool_2x2_ref(t), 1e-12, 1e-12, "jvp")


def test_other_layouts_take_atens_kernel_and_transforms_the_fast_one():
    x = torch.randn(2, 3, 8, 8)
    cl = x.to(memory_format=torch.channels_last)
    assert not _fast_path(cl) and not _fast_path(x[:, :, :, ::2]) and not _fast_path(x[0])
    assert_close(avg_pool_2x2(cl), avg_pool_2x2_ref(x), 1e-6, 1e-6, "channels-last")
    assert_close(avg_pool_2x2(x[:, :, :, ::2]), avg_pool_2x2_ref(x[:, :, :, ::2]), 1e-6, 1e-6, "strided")
    # torch.func: per-sample pooling and its per-sample gradient through the row ops, batched
    one = lambda s: avg_pool_2x2(s.unsqueeze(0)).squeeze(0)  # noqa: E731
    assert_close(torch.func.vmap(one)(x), avg_pool_2x2_ref(x), 1e-6, 1e-6, "vmap")
    per_sample = torch.func.vmap(torch.func.grad(lambda s: one(s).square().sum()))(x)
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(avg_pool_2x2_ref(xr).square().sum(), xr)
    assert_close(per_sample, ref, 1e-6, 1e-6, "vmap of grad")
    t = torch.randn_like(x)
    assert_close(torch.func.jvp(avg_pool_2x2, (x,), (t,))[1], avg_pool_2x2_ref(t), 1e-6, 1e-6, "func.jvp")


def test_convnet_pools_with_it_and_keeps_its_repr_and_per_sample_gradients():
    net = ConvNet(1, 10, 28, width=8)
    pools = [m for m in net.modules() if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 3 and all(isinstance(m, AvgPool2x2) for m in pools)
    assert "AvgPool2d(kernel_size=2, stride=2, padding=0)" in repr(net)
    # the engine's rules and torch.func's vmap (ATen's kernel per sample) agree through it
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    grads = per_sample_grads(net, x, y)
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(net, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    ref = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for name in params:
        assert_close(grads[name], ref[name], 1e-5, 1e-4, name)
