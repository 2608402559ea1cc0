"""Input checks shared by the public functions: errors name the argument and what was expected."""
from __future__ import annotations

import torch


def as_matrix(x, name: str) -> torch.Tensor:
    """A finite floating ``[N, d]`` tensor (numpy arrays accepted)."""
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d array [N, d], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        x = x.float()
    check_finite(x, name)
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).flatten()[:5].tolist() if x.dim() else []
        raise ValueError(f"{name} contains NaN or inf ({int(bad.sum())} values; first rows {rows})")


def as_labels(y, name: str, n: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Integer class labels ``[N]``, optionally of length n and within [0, num_classes)."""
    y = torch.as_tensor(y)
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-d [N], got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {y.dtype}")
    y = y.long()
    if n is not None and len(y) != n:
        raise ValueError(f"{name} has {len(y)} entries, expected {n}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{name} has negative labels (min {int(y.min())})")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got max {int(y.max())}")
    return y


def check_fraction(fraction: float, name: str = "fraction") -> float:
    if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}")
    return float(fraction)


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
