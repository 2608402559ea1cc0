"""Distribution matching (DM, Zhao & Bilen 2023).

Each iteration draws a fresh randomly initialized ConvNet and freezes it; for every
class the loss is ``||mean phi(real_c) - mean phi(syn_c)||^2`` (linear-kernel MMD of
the embeddings) with the same DSA draw on both sides; the synthetic images move by
SGD (lr 1, momentum 0.5). All classes go through the network in one batch, and the
per-class means are segment sums, so there is no Python loop over classes.
"""
from __future__ import annotations

import torch

from .._validate import as_labels, check_positive_int
from ..models import get_model
from .augment import DSA


class DistributionMatching:
    """Distill ``(X, y)`` into ``ipc`` synthetic images per class by distribution matching.

    Args:
        X, y: real images ``[N, C, H, W]`` and labels ``[N]``.
        ipc: synthetic images per class (at most the smallest class).
        model, model_options: the random embedding network (``fastdd.models.get_model``).
        batch_real: real images per class per iteration.
        lr_img, momentum: SGD on the synthetic images.
        dsa: a :class:`DSA` (default all families) or None for no augmentation.
        init: ``"real"`` (random real samples of each class) or ``"noise"``.
        seed: seeds the initialization, the networks, the batches and the augmentations.

    ``step()`` runs one iteration and returns its loss; ``state_dict()`` /
    ``load_state_dict()`` resume a run exactly.
    """

    def __init__(self, X: torch.Tensor, y, ipc: int, model: str = "convnet", model_options: dict | None = None,
                 batch_real: int = 256, lr_img: float = 1.0, momentum: float = 0.5, dsa: DSA | None = DSA(),
                 init: str = "real", seed: int = 0):
        if X.dim() != 4:
            raise ValueError(f"X must be images [N, C, H, W], got shape {tuple(X.shape)}")
        self.y = as_labels(y, "y", n=len(X))
        check_positive_int(ipc, "ipc")
        self.classes = torch.unique(self.y)
        self.num_classes = int(self.y.max()) + 1
        counts = torch.bincount(self.y, minlength=self.num_classes)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples; relabel to consecutive classes")
        if ipc > int(counts.min()):
            raise ValueError(f"ipc={ipc} is larger than the smallest class ({int(counts.min())} samples)")
        if init not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {init!r}")
        self.X, self.ipc, self.batch_real = X, ipc, batch_real
        self.model, self.model_options, self.dsa = model, dict(model_options or {}), dsa
        self.gen = torch.Generator().manual_seed(seed)
        self.by_class = [torch.nonzero(self.y == c).flatten() for c in range(self.num_classes)]
        if init == "real":
            picks = torch.cat([rows[torch.randperm(len(rows), generator=self.gen)[:ipc]] for rows in self.by_class])
            images = X[picks].clone()
        else:
            images = torch.randn((self.num_classes * ipc, *X.shape[1:]), generator=self.gen).to(X)
        self.images = images.requires_grad_(True)
        self.labels = torch.arange(self.num_classes, device=X.device).repeat_interleave(ipc)
        self.opt = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)
        self.iteration = 0

    def _embedder(self):
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):  # a fresh random net without touching the caller's RNG
            torch.manual_seed(seed)
            net = get_model(self.model, self.X.shape[1], self.num_classes, self.X.shape[-1], **self.model_options)
        net = net.to(self.X.device).train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net.embed

    def step(self) -> float:
        """One iteration: fresh frozen network, per-class mean-embedding distances, one SGD step."""
        embed = self._embedder()
        real_idx = torch.cat([rows[torch.randint(len(rows), (min(self.batch_real, len(rows)),), generator=self.gen)]
                              for rows in self.by_class])
        real, real_labels = self.X[real_idx], self.y[real_idx]
        syn = self.images
        if self.dsa is not None:
            real, syn = self.dsa(real, syn, self.gen)  # one draw for both sides
        with torch.no_grad():
            f_real = embed(real)
        f_syn = embed(syn)
        C, D = self.num_classes, f_syn.shape[1]
        mean_real = torch.zeros(C, D, device=f_real.device).index_add_(0, real_labels, f_real)
        mean_real /= torch.bincount(real_labels, minlength=C).clamp_min(1).unsqueeze(1)
        mean_syn = torch.zeros(C, D, device=f_syn.device).index_add(0, self.labels, f_syn) / self.ipc
        loss = (mean_real - mean_syn).square().sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite DM loss at iteration {self.iteration}; the images are left as "
                                     "they were before this step")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.iteration += 1
        return float(loss.detach())

    def run(self, iterations: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run until ``iterations`` in total; returns ``(images, labels)``."""
        it = range(self.iteration, iterations)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="distribution matching", unit="it")
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
