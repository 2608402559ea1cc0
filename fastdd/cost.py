"""Training cost of a (reduced) data set, counted rather than estimated.

``compute = #data x #epochs x (forward + backward FLOPs per sample)``, with the FLOPs of
one sample's forward and backward counted by ``torch.utils.flop_counter.FlopCounterMode``
(matrix products and convolutions, which dominate; elementwise ops are not counted).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def flops_per_sample(model: nn.Module, sample: torch.Tensor) -> int:
    """Counted FLOPs of one forward and backward (cross-entropy) pass of ``sample`` (one item, no batch dim).

    The model's parameters and buffers are left as they were (the gradients go nowhere).
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    x = sample.unsqueeze(0)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        target = torch.zeros(1, dtype=torch.long, device=out.device)
        torch.autograd.grad(F.cross_entropy(out, target), params)
    return int(counter.get_total_flops())


def training_flops(n_data: int, epochs: int, per_sample: int) -> int:
    """``n_data x epochs x per_sample``: the compute of training on a set of ``n_data`` items."""
    return int(n_data) * int(epochs) * int(per_sample)


def format_flops(flops: float) -> str:
    """``1.2 TFLOP``-style text."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} FLOP"
