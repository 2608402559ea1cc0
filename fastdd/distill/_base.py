"""What every distillation method shares: input checks, real-image initialization, fresh
random networks, ``run`` with a progress bar, and exact ``state_dict`` / ``load_state_dict``."""
from __future__ import annotations

import torch

from .._validate import as_labels, check_positive_int
from ..models import build, check_logits, model_name


class Distiller:
    """Base of DD, DC/DSA, DM and MTT. Subclasses call :meth:`_setup`, create ``self.images``
    (``_initial_images``), list their learnable tensors in ``_learned`` and optimizers in
    ``_optimizers``, and implement ``step()``."""

    description = "distilling"

    def _setup(self, X: torch.Tensor, y, ipc: int, model: str, model_options: dict | None, seed: int) -> None:
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
        self.X, self.ipc = X, ipc
        self.model, self.model_options = model, dict(model_options or {})
        self._check_model_takes(X[:1])
        self.gen = torch.Generator().manual_seed(seed)
        self.by_class = [torch.nonzero(self.y == c).flatten() for c in range(self.num_classes)]
        self.labels = torch.arange(self.num_classes, device=X.device).repeat_interleave(ipc)
        self.iteration = 0

    def _check_model_takes(self, image: torch.Tensor) -> None:
        """A clear error, before any work, when the network cannot take images of this size."""
        try:
            with torch.random.fork_rng(devices=[]):
                net = build(self.model, image.shape[1], self.num_classes, tuple(image.shape[-2:]), self.model_options)
            check_logits(net.to(image.device), image, self.num_classes, self.model)
        except (RuntimeError, ValueError) as exc:
            C, H, W = image.shape[1:]
            raise ValueError(f"images of {C} x {H} x {W} do not fit model {model_name(self.model)!r} with "
                             f"{self.model_options or 'default options'}: {exc}") from exc

    def _initial_images(self, init: str = "real") -> torch.Tensor:
        """The synthetic images to optimize, as a leaf: ``ipc`` random real images of each class
        (``"real"``) or standard Gaussian noise (``"noise"``)."""
        if init == "real":
            picks = torch.cat([rows[torch.randperm(len(rows), generator=self.gen)[:self.ipc]] for rows in self.by_class])
            return self.X[picks].clone().requires_grad_(True)
        if init == "noise":
            shape = (self.num_classes * self.ipc, *self.X.shape[1:])
            return torch.randn(shape, generator=self.gen).to(self.X).requires_grad_(True)
        raise ValueError(f"init must be 'real' or 'noise', got {init!r}")

    def _fresh_net(self, seed: int | None = None):
        """A randomly initialized network (seeded from the run's generator; the caller's RNG is untouched)."""
        if seed is None:
            seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build(self.model, self.X.shape[1], self.num_classes, tuple(self.X.shape[-2:]), self.model_options)
        return net.to(self.X.device)

    def _real_batch(self, per_class: int):
        """``per_class`` random real images of every class (with replacement) and their labels."""
        idx = torch.cat([rows[torch.randint(len(rows), (min(per_class, len(rows)),), generator=self.gen)]
                         for rows in self.by_class])
        return self.X[idx], self.y[idx]

    def _class_slices(self, labels: torch.Tensor) -> list[slice]:
        """Row ranges of each class in a class-grouped batch, for work done batch by batch on a CPU.

        On a CPU one pass over all classes' real images at once is slower than a pass per
        class (a 2560-image batch of the digits ConvNet runs 2.4x slower per image than
        batches of 256, which stay in cache); on a GPU the whole batch is one slice.
        """
        if labels.device.type == "cuda":
            return [slice(0, len(labels))]
        ends = torch.cumsum(torch.bincount(labels, minlength=self.num_classes), 0).tolist()
        return [slice(a, b) for a, b in zip([0] + ends[:-1], ends) if b > a]

    def _learned(self) -> dict:
        return {"images": self.images}

    def _optimizers(self) -> dict:
        return {"opt": self.opt}

    def step(self) -> float:
        raise NotImplementedError

    def run(self, iterations: int, progress: bool = False):
        """Step until ``iterations`` in total; returns ``(images, labels)``."""
        it = range(self.iteration, iterations)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=self.description, unit="it")
        for _ in it:
            self.step()
        return self.images.detach().clone(), self.labels.clone()

    def state_dict(self) -> dict:
        return {"learned": {k: t.detach().clone() for k, t in self._learned().items()},
                "optimizers": {k: o.state_dict() for k, o in self._optimizers().items()},
                "rng": self.gen.get_state(), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, t in self._learned().items():
                t.copy_(state["learned"][k])
        for k, o in self._optimizers().items():
            o.load_state_dict(state["optimizers"][k])
        self.gen.set_state(state["rng"])
        self.iteration = state["iteration"]
