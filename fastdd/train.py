"""A plain supervised training loop and accuracy, shared by pruning, demos and evaluation."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def train_model(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int = 30, batch_size: int = 64,
                lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
                on_step: Callable[[int, torch.Tensor], None] | None = None, progress: str | None = None) -> nn.Module:
    """SGD with cross-entropy on ``X [N, ...]``, ``y [N]``; returns the model (trained in place).

    ``on_step(epoch, indices)`` runs after each backward and before the optimizer step
    (per-sample statistics read there share the step's backward). Seeded: the same
    seed gives the same shuffles.
    """
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} samples but y has {len(y)}")
    if len(X) == 0:
        raise ValueError("cannot train on an empty set")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    epochs_iter = range(epochs)
    if progress:
        from tqdm import tqdm

        epochs_iter = tqdm(epochs_iter, desc=progress, unit="epoch")
    model.train()
    for epoch in epochs_iter:
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            if on_step is not None:
                on_step(epoch, idx)
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits ``[N, C]`` in eval mode, in batches."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(X[i:i + batch_size]) for i in range(0, len(X), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``X`` classified as ``y``."""
    return (predict(model, X).argmax(1) == y).float().mean().item()
