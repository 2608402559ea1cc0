"""Gradient matching (DC, Zhao et al. 2021; with DSA, Zhao & Bilen 2021).

Each iteration draws a fresh random ConvNet; ``outer_loop`` times it matches, class by
class, the gradient of the loss on real images with the gradient on the synthetic
images (differentiable in the images), steps the images by SGD (lr 0.1, momentum 0.5),
and trains the network ``inner_loop`` steps on the synthetic set. Real-side gradients
of all classes come from one backward (``fastdd.classwise_grads``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import as_labels, check_positive_int
from ..grad import classwise_grads
from ..models import get_model
from .augment import DSA

LOOPS_BY_IPC = {1: (1, 1), 10: (10, 50), 50: (50, 10)}  # ipc -> (outer_loop, inner_loop), DC paper


def match_distance(g_real: dict, g_syn: dict, metric: str = "ours") -> torch.Tensor:
    """Distance between two sets of layer gradients ``{name: tensor}``.

    ``"ours"`` (DC): per layer, rows = output channels, sum of ``1 - cos``; bias and
    norm parameters (1-d) are ignored. ``"mse"``: squared error over all of them;
    ``"cos"``: ``1 - cos`` of the concatenated vectors.
    """
    names = [n for n in g_real if g_real[n].dim() > 1]
    if metric == "ours":
        total = 0
        for n in names:
            a, b = g_real[n].reshape(g_real[n].shape[0], -1), g_syn[n].reshape(g_syn[n].shape[0], -1)
            total = total + (1 - F.cosine_similarity(a, b, dim=1, eps=1e-6)).sum()
        return total
    a = torch.cat([g_real[n].flatten() for n in names])
    b = torch.cat([g_syn[n].flatten() for n in names])
    if metric == "mse":
        return (a - b).square().sum()
    if metric == "cos":
        return 1 - F.cosine_similarity(a, b, dim=0, eps=1e-6)
    raise ValueError(f"metric must be 'ours', 'mse' or 'cos', got {metric!r}")


class GradientMatching:
    """Distill ``(X, y)`` into ``ipc`` images per class by gradient matching (DC, or DSA with ``dsa``).

    ``outer_loop``/``inner_loop`` default to the paper's by ipc (1: 1/1, 10: 10/50, 50: 50/10;
    others 10/10). ``step()`` runs one iteration (a fresh network); ``state_dict()`` /
    ``load_state_dict()`` resume exactly.
    """

    def __init__(self, X: torch.Tensor, y, ipc: int, model: str = "convnet", model_options: dict | None = None,
                 batch_real: int = 256, lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01,
                 outer_loop: int | None = None, inner_loop: int | None = None, metric: str = "ours",
                 dsa: DSA | None = None, seed: int = 0):
        if X.dim() != 4:
            raise ValueError(f"X must be images [N, C, H, W], got shape {tuple(X.shape)}")
        self.y = as_labels(y, "y", n=len(X))
        check_positive_int(ipc, "ipc")
        self.num_classes = int(self.y.max()) + 1
        counts = torch.bincount(self.y, minlength=self.num_classes)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples; relabel to consecutive classes")
        if ipc > int(counts.min()):
            raise ValueError(f"ipc={ipc} is larger than the smallest class ({int(counts.min())} samples)")
        match_distance({"w": torch.ones(1, 1)}, {"w": torch.ones(1, 1)}, metric)  # validates metric
        outer, inner = LOOPS_BY_IPC.get(ipc, (10, 10))
        self.outer_loop, self.inner_loop = outer_loop or outer, inner_loop if inner_loop is not None else inner
        self.X, self.ipc, self.batch_real, self.lr_net, self.metric, self.dsa = X, ipc, batch_real, lr_net, metric, dsa
        self.model, self.model_options = model, dict(model_options or {})
        self.gen = torch.Generator().manual_seed(seed)
        self.by_class = [torch.nonzero(self.y == c).flatten() for c in range(self.num_classes)]
        picks = torch.cat([rows[torch.randperm(len(rows), generator=self.gen)[:ipc]] for rows in self.by_class])
        self.images = X[picks].clone().requires_grad_(True)
        self.labels = torch.arange(self.num_classes, device=X.device).repeat_interleave(ipc)
        self.opt = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)
        self.iteration = 0

    def _net(self):
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_model(self.model, self.X.shape[1], self.num_classes, self.X.shape[-1],
                             **self.model_options).to(self.X.device)

    def step(self) -> float:
        net = self._net()
        names = [n for n, p in net.named_parameters() if p.dim() > 1]  # bias/norm ignored by "ours"
        params = [dict(net.named_parameters())[n] for n in names]
        net_opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        last = 0.0
        for outer in range(self.outer_loop):
            real_idx = torch.cat([rows[torch.randint(len(rows), (min(self.batch_real, len(rows)),), generator=self.gen)]
                                  for rows in self.by_class])
            real, real_labels = self.X[real_idx], self.y[real_idx]
            syn = self.images
            if self.dsa is not None:
                real, syn = self.dsa(real, syn, self.gen)
            g_real = classwise_grads(net, real, real_labels, self.num_classes, params=names)
            loss = 0
            for c in range(self.num_classes):  # synthetic side: differentiable in the images
                rows = slice(c * self.ipc, (c + 1) * self.ipc)
                l_syn = F.cross_entropy(net(syn[rows]), self.labels[rows])
                g_syn = torch.autograd.grad(l_syn, params, create_graph=True)
                loss = loss + match_distance({n: g_real[n][c] for n in names}, dict(zip(names, g_syn)), self.metric)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite gradient-matching loss at iteration {self.iteration}")
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            last = float(loss.detach())
            if outer == self.outer_loop - 1:
                break
            for _ in range(self.inner_loop):  # train the network on the (detached) synthetic set
                net_opt.zero_grad()
                F.cross_entropy(net(self.images.detach()), self.labels).backward()
                net_opt.step()
        self.iteration += 1
        return last

    def run(self, iterations: int, progress: bool = False):
        it = range(self.iteration, iterations)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="gradient matching", unit="it")
        for _ in it:
            self.step()
        return self.images.detach().clone(), self.labels.clone()

    def state_dict(self) -> dict:
        return {"images": self.images.detach().clone(), "opt": self.opt.state_dict(),
                "rng": self.gen.get_state(), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["rng"])
        self.iteration = state["iteration"]
