"""Trajectory matching (MTT, Cazenavette et al. 2022) and the expert trajectories it matches.

Experts: SGD on the real data, flat parameters saved every epoch. Each iteration starts a
student at a random expert epoch ``s < max_start_epoch``, takes ``syn_steps`` differentiable
SGD steps on the synthetic set with a learnable learning rate (``exp(log_lr)``: always
positive), and minimizes ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2`` with ``theta*``
the expert at epoch ``s + expert_epochs``.

``learn_labels=True`` also learns soft labels (DATM, Guo et al. 2024): per-image logits initialized
with the expert's logits at ``max_start_epoch`` on the initial images, trained by the same loss; the
student trains on ``softmax(logits)`` as cross-entropy targets, and the set carries them as
``soft_labels``.

``low_memory=True`` gives the same gradients with the memory of one student step instead
of ``syn_steps``: the student's parameters are kept after each step (a flat vector each),
and the backward walks the steps in reverse, recomputing each step's graph and carrying
the adjoint with a Hessian-vector product (as in TESLA, Cui et al. 2023). It costs one
more forward and backward per step.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .. import _checkpoint
from .._validate import as_labels, check_positive_int
from ..models import build, model_name
from ..train import train_model
from ._base import Distiller
from .augment import DSA


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_experts(X: torch.Tensor, y, n_experts: int = 5, epochs: int = 15, model: str = "convnet",
                  model_options: dict | None = None, lr: float = 0.01, batch_size: int = 256, save_dir: str | None = None,
                  fp16: bool = False, seed: int = 0, progress: bool = False) -> list[torch.Tensor]:
    """Expert trajectories ``[epochs + 1, P]`` (flat parameters at the start and after each epoch).

    Plain SGD (no momentum, no weight decay), as the MTT buffers. With ``save_dir`` each
    expert is saved as ``expert_{i}.pt`` and reused when present (same settings).
    """
    y = as_labels(y, "y", n=len(X))
    check_positive_int(n_experts, "n_experts")
    check_positive_int(epochs, "epochs")
    num_classes = int(y.max()) + 1
    identity = {"epochs": epochs, "model": model_name(model), "options": dict(model_options or {}), "lr": lr, "n": len(y)}
    trajectories = []
    it = range(n_experts)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="expert trajectories", unit="expert")
    for i in it:
        path = os.path.join(save_dir, f"expert_{i}.pt") if save_dir else None
        state = _checkpoint.load(path, {**identity, "seed": seed + i})
        if state is not None:
            trajectories.append(state["trajectory"].float())
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            net = build(model, X.shape[1], num_classes, tuple(X.shape[-2:]), model_options).to(X.device)
        snapshots = [_flat(net)]
        for e in range(epochs):
            train_model(net, X, y, epochs=1, batch_size=batch_size, lr=lr, momentum=0.0, weight_decay=0.0,
                        seed=seed * 1000 + i * 100 + e)
            snapshots.append(_flat(net))
        traj = torch.stack(snapshots)
        if path:
            _checkpoint.save(path, {"identity": {**identity, "seed": seed + i},
                                    "trajectory": traj.half() if fp16 else traj})
        trajectories.append(traj)
    return trajectories


class TrajectoryMatching(Distiller):
    """Distill ``(X, y)`` into ``ipc`` images per class by matching expert trajectories.

    Args:
        experts: trajectories from :func:`train_experts` (same model and options).
        syn_steps, expert_epochs, max_start_epoch: the paper's N, M and T+.
        lr_img, lr_lr: SGD rates of the images and of ``log_lr`` (defaults 100 and 0.01, set on
            standardized 8x8 digits); ``lr_init``: the starting synthetic learning rate (the
            experts' 0.01).
        init: ``"real"`` images of each class (default) or ``"noise"``.
        low_memory: recompute each student step in the backward instead of keeping all
            ``syn_steps`` graphs (same result; memory of one step).
        learn_labels, lr_label: learn soft labels (DATM) with SGD at ``lr_label`` (``momentum`` as
            the images); ``soft_labels`` holds them as class probabilities.
    """

    description = "trajectory matching"

    def __init__(self, X: torch.Tensor, y, ipc: int, experts: list, model: str = "convnet",
                 model_options: dict | None = None, syn_steps: int = 10, expert_epochs: int = 2,
                 max_start_epoch: int = 5, lr_img: float = 100.0, lr_lr: float = 0.01, lr_init: float = 0.01,
                 momentum: float = 0.5, dsa: DSA | None = None, low_memory: bool = False, init: str = "real",
                 learn_labels: bool = False, lr_label: float = 5.0, seed: int = 0):
        self._setup(X, y, ipc, model, model_options, seed)
        if not experts:
            raise ValueError("experts is empty: train them with train_experts()")
        T = experts[0].shape[0] - 1
        if max_start_epoch + expert_epochs > T:
            raise ValueError(f"max_start_epoch ({max_start_epoch}) + expert_epochs ({expert_epochs}) exceeds the "
                             f"{T} epochs the experts were trained for")
        self.experts, self.syn_steps, self.expert_epochs, self.max_start = experts, syn_steps, expert_epochs, max_start_epoch
        with torch.random.fork_rng(devices=[]):  # only the structure matters: parameters come from the experts
            self.net = build(model, X.shape[1], self.num_classes, tuple(X.shape[-2:]), model_options).to(X.device)
        self.names = [n for n, _ in self.net.named_parameters()]
        self.shapes = [p.shape for p in self.net.parameters()]
        self.sizes = [p.numel() for p in self.net.parameters()]
        if sum(self.sizes) != experts[0].shape[1]:
            raise ValueError(f"the experts have {experts[0].shape[1]} parameters but the model has {sum(self.sizes)}")
        self.images = self._initial_images(init)
        self.log_lr = torch.tensor(float(torch.log(torch.tensor(lr_init))), device=X.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)
        self.opt_lr = torch.optim.SGD([self.log_lr], lr=lr_lr, momentum=momentum)
        self.dsa, self.low_memory = dsa, low_memory
        self.label_logits = None
        if learn_labels:
            with torch.no_grad():
                logits = self._forward(experts[0].to(X.device).float()[max_start_epoch], self.images.detach())
            self.label_logits = logits.detach().clone().requires_grad_(True)
            self.opt_label = torch.optim.SGD([self.label_logits], lr=lr_label, momentum=momentum)

    @property
    def lr(self) -> float:
        return float(self.log_lr.detach().exp())

    @property
    def soft_labels(self) -> torch.Tensor | None:
        """The learned labels as class probabilities ``[n, C]`` (None without ``learn_labels``)."""
        return None if self.label_logits is None else torch.softmax(self.label_logits.detach(), 1)

    def _forward(self, flat, x):
        params = dict(zip(self.names, (t.view(s) for t, s in zip(torch.split(flat, self.sizes), self.shapes))))
        return functional_call(self.net, params, (x,))

    def step(self) -> float:
        e = int(torch.randint(len(self.experts), (1,), generator=self.gen))
        s = int(torch.randint(self.max_start, (1,), generator=self.gen))
        traj = self.experts[e].to(self.images.device).float()
        start, target = traj[s], traj[s + self.expert_epochs]
        for opt in self._optimizers().values():
            opt.zero_grad()
        augs = [self.dsa.sample(self.gen) if self.dsa is not None else None for _ in range(self.syn_steps)]
        match = (self._match_low_memory if self.low_memory else self._match_unrolled)(start, target, augs)
        if not torch.isfinite(match):
            raise FloatingPointError(f"non-finite trajectory-matching loss at iteration {self.iteration}")
        for opt in self._optimizers().values():
            opt.step()
        self.iteration += 1
        return float(match.detach())

    def _student_loss(self, theta, images, aug, targets):
        x = self.dsa.apply(images, aug) if aug is not None else images
        return F.cross_entropy(self._forward(theta, x), targets)

    def _targets(self, label_logits):
        return self.labels if label_logits is None else torch.softmax(label_logits, 1)

    def _match_unrolled(self, start, target, augs) -> torch.Tensor:
        """All student steps in one graph; backward fills the images', log_lr's (and labels') .grad."""
        theta, lr = start.clone().requires_grad_(True), self.log_lr.exp()
        targets = self._targets(self.label_logits)
        for aug in augs:
            (g,) = torch.autograd.grad(self._student_loss(theta, self.images, aug, targets), theta, create_graph=True)
            theta = theta - lr * g
        match = (theta - target).square().sum() / (start - target).square().sum().clamp_min(1e-12)
        if torch.isfinite(match):
            match.backward()
        return match.detach()

    def _match_low_memory(self, start, target, augs) -> torch.Tensor:
        """The same gradients by reverse recomputation: keep theta_k, rebuild one step at a time."""
        lr = float(self.log_lr.detach().exp())
        images = self.images.detach()
        learn_labels = self.label_logits is not None
        targets = self._targets(self.label_logits.detach() if learn_labels else None)
        thetas = [start]
        for aug in augs:  # forward: no graph kept beyond the step
            theta = thetas[-1].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._student_loss(theta, images, aug, targets), theta)
            thetas.append((theta - lr * g).detach())
        denom = (start - target).square().sum().clamp_min(1e-12)
        match = (thetas[-1] - target).square().sum() / denom
        if not torch.isfinite(match):
            return match
        adjoint = 2 * (thetas[-1] - target) / denom  # dJ/dtheta_N
        grad_images, grad_lr = torch.zeros_like(images), torch.zeros((), dtype=start.dtype, device=start.device)
        x = images.requires_grad_(True)
        logits = self.label_logits.detach().requires_grad_(True) if learn_labels else None
        inputs = (x, logits) if learn_labels else (x,)
        grad_logits = torch.zeros_like(logits) if learn_labels else None
        for k in reversed(range(len(augs))):
            theta = thetas[k].detach().requires_grad_(True)
            loss = self._student_loss(theta, x, augs[k], self._targets(logits))
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            # theta_{k+1} = theta_k - lr g(theta_k, x): pull the adjoint back through the step
            d_theta, *d_in = torch.autograd.grad(g, (theta, *inputs), grad_outputs=adjoint)
            grad_lr -= (adjoint * g.detach()).sum()
            grad_images -= lr * d_in[0]
            if learn_labels:
                grad_logits -= lr * d_in[1]
            adjoint = adjoint - lr * d_theta
        self.images.grad = grad_images
        if learn_labels:
            self.label_logits.grad = grad_logits
        self.log_lr.grad = (grad_lr * lr).to(self.log_lr.dtype)  # d/dlog_lr = lr d/dlr
        return match.detach()

    def _learned(self) -> dict:
        learned = {"images": self.images, "log_lr": self.log_lr}
        return learned if self.label_logits is None else {**learned, "label_logits": self.label_logits}

    def _optimizers(self) -> dict:
        opts = {"opt_img": self.opt_img, "opt_lr": self.opt_lr}
        return opts if self.label_logits is None else {**opts, "opt_label": self.opt_label}
