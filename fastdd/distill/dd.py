"""Meta-learning dataset distillation (DD, Wang et al. 2018).

Bi-level: from a freshly sampled initialization, ``inner_steps`` differentiable SGD steps
on the synthetic set with a learned learning rate (``exp(log_lr)``); the outer loss is
the cross-entropy of the resulting network on a real batch, minimized over the images
and the learning rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .._validate import as_labels, check_positive_int
from ..models import get_model


class MetaLearning:
    """Distill ``(X, y)`` into ``ipc`` images per class with DD's unrolled bi-level optimization.

    Args:
        inner_steps: unrolled SGD steps on the synthetic set per iteration.
        batch_real: real images in each outer loss.
        lr_img, lr_lr: Adam rates of the images and of ``log_lr``; ``lr_init`` the starting inner lr.
        fixed_init: one initialization for every iteration (DD's "fixed" setting) instead of a
            fresh one each time.
    """

    def __init__(self, X: torch.Tensor, y, ipc: int, model: str = "convnet", model_options: dict | None = None,
                 inner_steps: int = 10, batch_real: int = 256, lr_img: float = 0.05, lr_lr: float = 0.01,
                 lr_init: float = 0.02, fixed_init: bool = False, seed: int = 0):
        if X.dim() != 4:
            raise ValueError(f"X must be images [N, C, H, W], got shape {tuple(X.shape)}")
        self.y = as_labels(y, "y", n=len(X))
        check_positive_int(ipc, "ipc")
        check_positive_int(inner_steps, "inner_steps")
        self.num_classes = int(self.y.max()) + 1
        counts = torch.bincount(self.y, minlength=self.num_classes)
        if ipc > int(counts.min()):
            raise ValueError(f"ipc={ipc} is larger than the smallest class ({int(counts.min())} samples)")
        self.X, self.ipc, self.inner_steps, self.batch_real = X, ipc, inner_steps, batch_real
        self.model, self.model_options, self.fixed_init = model, dict(model_options or {}), fixed_init
        self.gen = torch.Generator().manual_seed(seed)
        self.init_seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        by_class = [torch.nonzero(self.y == c).flatten() for c in range(self.num_classes)]
        picks = torch.cat([rows[torch.randperm(len(rows), generator=self.gen)[:ipc]] for rows in by_class])
        self.images = X[picks].clone().requires_grad_(True)
        self.labels = torch.arange(self.num_classes, device=X.device).repeat_interleave(ipc)
        self.log_lr = torch.tensor(float(torch.log(torch.tensor(lr_init))), device=X.device, requires_grad=True)
        self.opt = torch.optim.Adam([{"params": [self.images], "lr": lr_img}, {"params": [self.log_lr], "lr": lr_lr}])
        self.iteration = 0

    @property
    def lr(self) -> float:
        return float(self.log_lr.detach().exp())

    def step(self) -> float:
        seed = self.init_seed if self.fixed_init else int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = get_model(self.model, self.X.shape[1], self.num_classes, self.X.shape[-1],
                            **self.model_options).to(self.X.device)
        params = {n: p.detach().requires_grad_(True) for n, p in net.named_parameters()}
        lr = self.log_lr.exp()
        for _ in range(self.inner_steps):
            loss = F.cross_entropy(functional_call(net, params, (self.images,)), self.labels)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        idx = torch.randint(len(self.y), (min(self.batch_real, len(self.y)),), generator=self.gen)
        outer = F.cross_entropy(functional_call(net, params, (self.X[idx],)), self.y[idx])
        if not torch.isfinite(outer):
            raise FloatingPointError(f"non-finite meta-learning loss at iteration {self.iteration}")
        self.opt.zero_grad()
        outer.backward()
        self.opt.step()
        self.iteration += 1
        return float(outer.detach())

    def run(self, iterations: int, progress: bool = False):
        it = range(self.iteration, iterations)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="meta-learning", unit="it")
        for _ in it:
            self.step()
        return self.images.detach().clone(), self.labels.clone()

    def state_dict(self) -> dict:
        return {"images": self.images.detach().clone(), "log_lr": self.log_lr.detach().clone(),
                "opt": self.opt.state_dict(), "rng": self.gen.get_state(), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.log_lr.copy_(state["log_lr"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["rng"])
        self.iteration = state["iteration"]
