"""Meta-learning dataset distillation (DD, Wang et al. 2018).

Bi-level: from a freshly sampled initialization, ``inner_steps`` differentiable SGD steps
on the synthetic set with a learned learning rate (``exp(log_lr)``); the outer loss is
the cross-entropy of the resulting network on a real batch, minimized over the images
and the learning rate.

With ``max_unroll > inner_steps`` the inner run is truncated and randomized as in RaT-BPTT
(Feng et al. 2023): each iteration trains ``T ~ U[inner_steps, max_unroll]`` steps but
back-propagates only through the last ``inner_steps``, so the images are shaped by later
stages of training too, at the memory of ``inner_steps`` unrolled steps.

Defaults: the inner SGD is the evaluation's (momentum 0.9, weight decay 5e-4, lr from
0.01, learned), 20 differentiated steps after up to 80 untracked ones. Plain DD (2018:
plain SGD, every step unrolled) ends below random real images at 10 per class on digits
(84.9% against 94.0% for random subsets, ConvNet width 32); these defaults reach 96.4%
in 40 iterations, and 87% against 67% at 1 per class. ``momentum=0, weight_decay=0,
max_unroll=None, inner_steps=10, lr_init=0.02, lr_img=0.05`` is the 2018 method.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .._validate import check_positive_int
from ._base import Distiller


class MetaLearning(Distiller):
    """Distill ``(X, y)`` into ``ipc`` images per class with DD's unrolled bi-level optimization.

    Args:
        inner_steps: unrolled (differentiated) SGD steps on the synthetic set per iteration.
        init: ``"real"`` images of each class (default) or ``"noise"``.
        max_unroll: most inner steps in total (None: ``inner_steps``, every step unrolled); the
            steps before the last ``inner_steps`` run without a graph.
        batch_real: real images in each outer loss.
        lr_img, lr_lr: Adam rates of the images and of ``log_lr``; ``lr_init`` the starting inner lr.
        fixed_init: one initialization for every iteration (DD's "fixed" setting) instead of a
            fresh one each time.
        momentum, weight_decay: of the inner SGD (the 2018 DD: none). The evaluation's own
            (0.9, 5e-4) with a long ``max_unroll`` shape the images for the training they will get.
    """

    description = "meta-learning"

    def __init__(self, X: torch.Tensor, y, ipc: int, model: str = "convnet", model_options: dict | None = None,
                 inner_steps: int = 20, batch_real: int = 256, lr_img: float = 0.03, lr_lr: float = 0.01,
                 lr_init: float = 0.01, fixed_init: bool = False, max_unroll: int | None = 100, init: str = "real",
                 momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0):
        check_positive_int(inner_steps, "inner_steps")
        if max_unroll is not None and (isinstance(max_unroll, bool) or not isinstance(max_unroll, numbers.Integral)
                                       or max_unroll < inner_steps):
            raise ValueError(f"max_unroll must be an int >= inner_steps ({inner_steps}), got {max_unroll!r}; "
                             "None unrolls every inner step")
        if not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if not isinstance(weight_decay, numbers.Real) or not 0 <= weight_decay < float("inf"):
            raise ValueError(f"weight_decay must be a number in [0, inf), got {weight_decay!r}")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.max_unroll = max_unroll or inner_steps
        self._setup(X, y, ipc, model, model_options, seed)
        self.inner_steps, self.batch_real, self.fixed_init = inner_steps, batch_real, fixed_init
        self.init_seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        self.images = self._initial_images(init)
        self.log_lr = torch.tensor(float(torch.log(torch.tensor(lr_init))), device=X.device, requires_grad=True)
        self.opt = torch.optim.Adam([{"params": [self.images], "lr": lr_img}, {"params": [self.log_lr], "lr": lr_lr}])

    @property
    def lr(self) -> float:
        return float(self.log_lr.detach().exp())

    def _inner_step(self, net, params, velocity, images, lr, create_graph):
        """One SGD step on the synthetic set (torch.optim.SGD's rule: weight decay into the
        gradient, velocity = momentum * velocity + gradient), differentiable when asked."""
        loss = F.cross_entropy(functional_call(net, params, (images,)), self.labels)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        new_params, new_velocity = {}, {}
        for (n, p), g in zip(params.items(), grads):
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                g = new_velocity[n] = g if velocity is None else self.momentum * velocity[n] + g
            new_params[n] = p - lr * g
        if not create_graph:
            new_params = {n: p.detach().requires_grad_(True) for n, p in new_params.items()}
            new_velocity = {n: v.detach() for n, v in new_velocity.items()}
        return new_params, (new_velocity or None)

    def step(self) -> float:
        net = self._fresh_net(self.init_seed if self.fixed_init else None)
        params = {n: p.detach().requires_grad_(True) for n, p in net.named_parameters()}
        velocity = None
        lr = self.log_lr.exp()
        if self.max_unroll > self.inner_steps:  # the untracked head of a truncated unroll
            head = int(torch.randint(self.max_unroll - self.inner_steps + 1, (1,), generator=self.gen))
            for _ in range(head):
                params, velocity = self._inner_step(net, params, velocity, self.images.detach(), lr.detach(), False)
        for _ in range(self.inner_steps):
            params, velocity = self._inner_step(net, params, velocity, self.images, lr, True)
        idx = torch.randint(len(self.y), (min(self.batch_real, len(self.y)),), generator=self.gen)
        outer = F.cross_entropy(functional_call(net, params, (self.X[idx],)), self.y[idx])
        if not torch.isfinite(outer):
            raise FloatingPointError(f"non-finite meta-learning loss at iteration {self.iteration}")
        self.opt.zero_grad()
        outer.backward()
        self.opt.step()
        self.iteration += 1
        return float(outer.detach())

    def _learned(self) -> dict:
        return {"images": self.images, "log_lr": self.log_lr}
