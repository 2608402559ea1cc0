"""Per-sample weight gradients of a convolution (Conv1d, Conv2d).

``conv_weight_grads(x, g, weight_shape, stride, padding, dilation, groups)`` gives
``[B, *weight_shape]`` from the layer input x and output gradient g (numeric zero padding;
rules.py makes module padding numeric first).

- torch path (the reference, and CPUs): one convolution backward with the batch folded
  into the groups, 3x faster than patches + bmm on a CPU for the DC ConvNet's inner layers;
  patches + bmm for one-channel inputs with small kernels (a grayscale first layer);
- Triton (CUDA tensors, one group): an implicit GEMM per sample (``kernels/conv_wgrad.py``)
  that gathers patches from x in registers; ``conv_weight_sqnorms`` reduces its tiles to
  squared norms in registers instead of writing them. cuDNN runs the batch-as-groups
  backward (this torch path's, and vmap's) as one kernel per sample; with the kernel the
  DC ConvNet's per-sample gradients ran 2.3x faster than vmap on an H200.
Conv1d goes through the 2-d kernel as a height-1 image. float64 stays on the torch path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend


def conv_weight_grads_ref(x, g, weight_shape, stride, padding, dilation, groups):
    """Per-sample weight gradients by one batch-as-groups convolution backward."""
    B = x.shape[0]
    x = x.reshape(1, -1, *x.shape[2:])
    g = g.reshape(1, -1, *g.shape[2:])
    # only the weight's shape matters for grad_weight: an untouched allocation serves
    weight_like = torch.empty((B * weight_shape[0], *weight_shape[1:]), dtype=g.dtype, device=g.device)
    nd = x.dim() - 2
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g, x.to(g.dtype), weight_like, None, stride, padding, dilation, False, (0,) * nd, groups * B,
        (False, True, False))
    return grad_w.view(B, *weight_shape)


def _use_kernel(x, g, groups) -> bool:
    if groups != 1 or x.dim() not in (3, 4):
        return False
    # ops without a CUDA-extension kernel take Triton wherever the extension would run
    return _backend.pick_for(g) in ("triton", "cuda") and _backend.triton_available()


def _as_2d(x, g, weight_shape, stride, padding, dilation):
    """The kernel's view of a Conv1d or Conv2d: 4-d tensors and 2-d geometry."""
    kernel, stride, padding, dilation = tuple(weight_shape[2:]), tuple(stride), tuple(padding), tuple(dilation)
    x = x.to(g.dtype)
    if x.dim() == 3:  # Conv1d as a height-1 Conv2d
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    return x, g, kernel, stride, padding, dilation


# patches at most this long (C_in/groups * prod(kernel)) go through unfold + bmm on a CPU: a
# grayscale image's first 3x3 conv (9) ran 1.3-1.5x faster that way than as batch-as-groups
# (the groups of one input channel are oneDNN's slow case); RGB 3x3 (27) and wider lost.
_UNFOLD_MAX_PATCH = 15


def conv_weight_grads_unfold(x, g, weight_shape, stride, padding, dilation):
    """Per-sample weight gradients (one group) by patches and one batched GEMM: ``[B, *weight_shape]``."""
    x, g, kernel, stride, padding, dilation = _as_2d(x, g, weight_shape, stride, padding, dilation)
    B = x.shape[0]
    A = F.unfold(x, kernel, dilation=dilation, stride=stride, padding=padding)  # [B, patch, L]
    res = torch.bmm(A, g.flatten(2).transpose(1, 2))  # [B, patch, C_out]: the cheaper operand order
    return res.transpose(1, 2).reshape(B, *weight_shape)


def conv_weight_grads(x, g, weight_shape, stride, padding, dilation, groups, out=None):
    """Per-sample weight gradients ``[B, *weight_shape]``, into ``out`` when given."""
    if not _use_kernel(x, g, groups):
        if groups == 1 and x.dim() in (3, 4) and math.prod(weight_shape[1:]) <= _UNFOLD_MAX_PATCH:
            res = conv_weight_grads_unfold(x, g, weight_shape, stride, padding, dilation)
        else:
            res = conv_weight_grads_ref(x, g, weight_shape, stride, padding, dilation, groups)
        return res if out is None else out.copy_(res)
    from ..kernels.conv_wgrad import psg_conv2d_wgrad_fwd

    B = x.shape[0]
    if out is None:
        out = torch.empty((B, *weight_shape), dtype=g.dtype, device=g.device)
    flat = out.view(B, weight_shape[0], -1) if out.is_contiguous() else torch.empty(
        (B, weight_shape[0], out[0, 0].numel()), dtype=out.dtype, device=out.device)
    psg_conv2d_wgrad_fwd(*_as_2d(x, g, weight_shape, stride, padding, dilation), flat)
    return out if flat.data_ptr() == out.data_ptr() else out.copy_(flat.view_as(out))


def conv_weight_sqnorms(x, g, weight_shape, stride, padding, dilation, groups):
    """Squared norms ``[B]`` (fp32) of the per-sample weight gradients by the fused Triton
    kernel (nothing per-sample reaches memory), or None where it does not apply (the caller
    then reduces materialized chunks or uses the Gram form)."""
    if not _use_kernel(x, g, groups):
        return None
    from ..kernels.conv_wgrad import psg_conv2d_wgrad_sqnorm_fwd

    return psg_conv2d_wgrad_sqnorm_fwd(*_as_2d(x, g, weight_shape, stride, padding, dilation))
