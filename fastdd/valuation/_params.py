"""Flat parameter vectors for the valuation solvers: one ordering of the selected parameters."""
from __future__ import annotations

import torch
from torch import nn

from ..grad.engine import select_params


class FlatParams:
    """The selected parameters of a model as one vector ``[P]``, and back."""

    def __init__(self, model: nn.Module, params=None):
        self.model = model
        self.named = select_params(model, params)
        self.names = list(self.named)
        self.shapes = [p.shape for p in self.named.values()]
        self.sizes = [p.numel() for p in self.named.values()]
        self.numel = sum(self.sizes)

    def vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.named.values()])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[P]`` -> {name: shape}; ``[K, P]`` -> {name: [K, *shape]}."""
        lead = vec.shape[:-1]
        parts = torch.split(vec, self.sizes, dim=-1)
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
        """{name: [*lead, *shape]} -> ``[*lead, P]``."""
        return torch.cat([tensors[n].reshape(*tensors[n].shape[:lead], -1) for n in self.names], dim=-1)
