"""Distribution matching (DM, Zhao & Bilen 2023).

Each iteration draws a fresh randomly initialized ConvNet and freezes it; for every
class the loss is ``||mean phi(real_c) - mean phi(syn_c)||^2`` (linear-kernel MMD of
the embeddings) with the same DSA draw on both sides; the synthetic images move by
SGD (lr 1, momentum 0.5). The per-class MMDs come from one fused op
(:func:`fastdd.distill.mmd.class_mmd`: segment sums for the linear kernel, fused kernel sums for
``kernel="rbf"``), with no loop over classes. The real batch, the bulk of the work, goes through
the frozen network without a graph, compiled (``compile="auto"``: on a CPU, images of 16x16 and
up, where inductor runs), class by class on a CPU (batches of 256 stay in cache, and their
activations are a tenth of the whole batch's).
"""
from __future__ import annotations

import functools

import torch

from .._compile import CompiledCall, check_compile, wants_compile
from ..distributed import all_gather_rows, shard
from ..models import embedding_fn
from ._base import Distiller
from .augment import DSA
from .mmd import check_kernel, class_mmd


class DistributionMatching(Distiller):
    """Distill ``(X, y)`` into ``ipc`` synthetic images per class by distribution matching.

    Args:
        X, y: real images ``[N, C, H, W]`` and labels ``[N]``.
        ipc: synthetic images per class (at most the smallest class).
        model, model_options: the random embedding network (``fastdd.models.get_model``).
        batch_real: real images per class per iteration.
        lr_img, momentum: SGD on the synthetic images.
        dsa: a :class:`DSA` (default all families) or None for no augmentation.
        kernel: ``"linear"`` (DM: distance of the mean embeddings) or ``"rbf"`` (Gaussian-kernel
            MMD, bandwidth by the median heuristic on each real batch unless ``gamma`` is given).
        init: ``"real"`` (random real samples of each class) or ``"noise"``.
        compile: ``torch.compile`` the frozen network's forward of the real batch: ``"auto"``
            (on a CPU, images of 16x16 and up, where inductor's toolchain is installed), True or False.
            The first iteration pays the compile (seconds); on 28x28 MNIST (ipc 10, CPU) an
            iteration then takes 1.72 s instead of 2.43 s. Zoo networks and models with an ``embed()`` method compile;
            others run eagerly.
        seed: seeds the initialization, the networks, the batches and the augmentations.

    ``step()`` runs one iteration and returns its loss; ``state_dict()`` /
    ``load_state_dict()`` resume a run exactly.
    """

    description = "distribution matching"

    def __init__(self, X: torch.Tensor, y, ipc: int, model: str = "convnet", model_options: dict | None = None,
                 batch_real: int = 256, lr_img: float = 1.0, momentum: float = 0.5, dsa: DSA | None = DSA(),
                 init: str = "real", kernel: str = "linear", gamma: float | None = None, compile="auto",
                 seed: int = 0):
        check_kernel(kernel)
        self.compile = check_compile(compile)
        self.kernel, self.gamma = kernel, gamma
        self._setup(X, y, ipc, model, model_options, seed)
        self.batch_real, self.dsa = batch_real, dsa
        self.images = self._initial_images(init)
        self.opt = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)
        # resolved once (compile=True without the toolchain is refused here, before any work)
        self._use_compile = wants_compile(self.compile, self.X.device, self.X.shape[1:])
        self._compiled_embed = None  # built on the first iteration that uses it

    def _frozen_net(self):
        net = self._fresh_net().train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def _embed_real(self, net, embed, real, labels) -> list[torch.Tensor]:
        """Embeddings of the real batch (no graph), in class order; ``embed`` is ``net``'s eager one."""
        # compiled: the zoo's nets (an embed() method; a hook-based embedding does not trace). Class
        # by class either way on a CPU: one call over all classes held 1.9 GB of activations at
        # MNIST's shapes (ipc 10) against 0.2 GB, for a few percent of speed
        if self._use_compile and callable(getattr(net, "embed", None)):
            if self._compiled_embed is None:
                self._compiled_embed = CompiledCall(lambda n, x: n.embed(x), "DM's frozen embedding network")
            embed = functools.partial(self._compiled_embed, net)
        return [embed(real[rows]) for rows in self._class_slices(labels)]

    def step(self) -> float:
        """One iteration: fresh frozen network, per-class mean-embedding distances, one SGD step."""
        net = self._frozen_net()
        embed = embedding_fn(net)
        real, real_labels = self._real_batch(self.batch_real)
        syn = self.images
        if self.dsa is not None:
            real, syn = self.dsa(real, syn, self.gen)  # one draw for both sides
        mine = shard(len(real))  # under torch.distributed each rank embeds a share of the real batch
        with torch.no_grad():
            f_mine = self._embed_real(net, embed, real[mine], real_labels[mine])
        # the synthetic images' graph after the real pass: alive during it, it made the real pass
        # 20% slower on MNIST shapes (ipc 10, CPU: 3.03 s -> 2.50 s per iteration)
        f_syn = embed(syn)
        f_real = all_gather_rows(torch.cat(f_mine) if f_mine else f_syn.new_zeros(0, f_syn.shape[1]))
        real_counts = torch.bincount(real_labels, minlength=self.num_classes)  # rows come grouped by class
        syn_counts = torch.full((self.num_classes,), self.ipc)
        loss = class_mmd(f_real, real_counts, f_syn, syn_counts, self.kernel, self.gamma).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite DM loss at iteration {self.iteration}; the images are left as "
                                     "they were before this step")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.iteration += 1
        return float(loss.detach())
