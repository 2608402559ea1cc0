"""Gradient matching (DC, Zhao et al. 2021; with DSA, Zhao & Bilen 2021).

Each iteration draws a fresh random ConvNet; ``outer_loop`` times it matches, class by
class, the gradient of the loss on real images with the gradient on the synthetic
images (differentiable in the images), steps the images by SGD (lr 0.1, momentum 0.5),
and trains the network ``inner_loop`` steps on the synthetic set. Real-side gradients
of all classes come from one backward (``fastdd.classwise_grads``), and the distance over
all layers and classes is one fused reduction (:mod:`fastdd.distill.grad_distance`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import all_sum, shard
from ..grad import classwise_grads
from ._base import Distiller
from .augment import DSA
from .grad_distance import SegmentLayout, check_metric, classwise_grad_distance, pack

LOOPS_BY_IPC = {1: (1, 1), 10: (10, 50), 50: (50, 10)}  # ipc -> (outer_loop, inner_loop), DC paper


def match_distance(g_real: dict, g_syn: dict, metric: str = "ours") -> torch.Tensor:
    """Distance between two sets of layer gradients ``{name: tensor}`` (one class).

    ``"ours"`` (DC): per layer, rows = output channels, sum of ``1 - cos``; bias and
    norm parameters (1-d) are ignored. ``"mse"``: squared error over all of them;
    ``"cos"``: ``1 - cos`` of the concatenated vectors. The fused op over many classes is
    :func:`fastdd.distill.grad_distance.classwise_grad_distance`.
    """
    check_metric(metric)
    names = [n for n in g_real if g_real[n].dim() > 1]
    layout = SegmentLayout.of_shapes([tuple(g_real[n].shape) for n in names], g_real[names[0]].device)
    real = pack([g_real[n].unsqueeze(0) for n in names])
    syn = pack([g_syn[n].unsqueeze(0) for n in names])
    return classwise_grad_distance(real, syn, layout, metric)[0]


def synthetic_class_grads(net: torch.nn.Module, names: list[str], images: torch.Tensor, labels: torch.Tensor,
                          num_classes: int, batched: bool = True) -> torch.Tensor:
    """Packed ``[C, P]`` gradient of each class's synthetic loss, differentiable in ``images``.

    ``images [C * ipc, ...]`` and ``labels`` are grouped by class. ``batched``: one
    ``vmap(grad)`` over the classes (1.8x faster than a loop of ``create_graph`` backwards
    for the digits ConvNet on 2 CPU threads, and one launch sequence instead of C on a GPU);
    networks with BatchNorm (batch statistics, running buffers) take the per-class loop.
    """
    named = dict(net.named_parameters())
    if batched and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        from torch.func import functional_call, grad, vmap

        selected = {n: named[n] for n in names}
        fixed = {**{n: p for n, p in named.items() if n not in selected}, **dict(net.named_buffers())}

        def loss(p, x, y):
            return F.cross_entropy(functional_call(net, {**p, **fixed}, (x,)), y)

        by_class = images.reshape(num_classes, -1, *images.shape[1:])
        g = vmap(grad(loss), in_dims=(None, 0, 0))(selected, by_class, labels.view(num_classes, -1))
        return pack([g[n] for n in names])
    params, ipc = [named[n] for n in names], len(labels) // num_classes
    per_class = []
    for c in range(num_classes):
        rows = slice(c * ipc, (c + 1) * ipc)
        grads = torch.autograd.grad(F.cross_entropy(net(images[rows]), labels[rows]), params, create_graph=True)
        per_class.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(per_class)


class GradientMatching(Distiller):
    """Distill ``(X, y)`` into ``ipc`` images per class by gradient matching (DC, or DSA with ``dsa``).

    ``outer_loop``/``inner_loop`` default to the paper's by ipc (1: 1/1, 10: 10/50, 50: 50/10;
    others 10/10). ``init``: ``"real"`` images of each class (default) or ``"noise"``.
    ``step()`` runs one iteration (a fresh network); ``state_dict()`` /
    ``load_state_dict()`` resume exactly.
    """

    description = "gradient matching"

    def __init__(self, X: torch.Tensor, y, ipc: int, model: str = "convnet", model_options: dict | None = None,
                 batch_real: int = 256, lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01,
                 outer_loop: int | None = None, inner_loop: int | None = None, metric: str = "ours",
                 dsa: DSA | None = None, init: str = "real", seed: int = 0):
        check_metric(metric)
        self._setup(X, y, ipc, model, model_options, seed)
        outer, inner = LOOPS_BY_IPC.get(ipc, (10, 10))
        self.outer_loop, self.inner_loop = outer_loop or outer, inner_loop if inner_loop is not None else inner
        self.batch_real, self.lr_net, self.metric, self.dsa = batch_real, lr_net, metric, dsa
        self.images = self._initial_images(init)
        self.opt = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)

    def _real_grads(self, net, names, params, real, labels) -> torch.Tensor:
        """Packed ``[C, P]`` mean gradient of each class's real images (no graph kept).

        On a GPU one backward through the whole batch (``classwise_grads``); on a CPU a
        backward per class, whose batches stay in cache (see ``_class_slices``). Under
        ``torch.distributed`` each rank takes a share of the classes and the sums are reduced.
        """
        out = torch.zeros(self.num_classes, sum(p.numel() for p in params), device=real.device)
        classes = shard(self.num_classes)
        ends = [0] + torch.cumsum(torch.bincount(labels, minlength=self.num_classes), 0).tolist()
        real, labels = real[ends[classes.start]:ends[classes.stop]], labels[ends[classes.start]:ends[classes.stop]]
        if len(labels) == 0:
            return all_sum(out)
        slices = self._class_slices(labels)
        if len(slices) == 1 and real.device.type == "cuda":
            g = classwise_grads(net, real, labels, self.num_classes, params=names)
            return all_sum(pack([g[n] for n in names]))
        for rows in slices:
            c = int(labels[rows.start])
            grads = torch.autograd.grad(F.cross_entropy(net(real[rows]), labels[rows]), params)
            out[c] = torch.cat([g.flatten() for g in grads])
        return all_sum(out)

    def step(self) -> float:
        net = self._fresh_net()
        names = [n for n, p in net.named_parameters() if p.dim() > 1]  # bias/norm ignored by "ours"
        params = [dict(net.named_parameters())[n] for n in names]
        net_opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        layout = SegmentLayout.of_shapes([tuple(p.shape) for p in params], self.images.device)
        last = 0.0
        for outer in range(self.outer_loop):
            real, real_labels = self._real_batch(self.batch_real)
            syn = self.images
            if self.dsa is not None:
                real, syn = self.dsa(real, syn, self.gen)
            g_real = self._real_grads(net, names, params, real, real_labels)
            g_syn = synthetic_class_grads(net, names, syn, self.labels, self.num_classes)
            loss = classwise_grad_distance(g_real, g_syn, layout, self.metric).sum()
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
