"""Input checks shared by the public functions: errors name the argument and what was expected.

Arrays come in as torch tensors or numpy arrays; counts and fractions as Python or numpy
scalars. Floating inputs keep their dtype (float64 stays float64); :func:`compute_dtype`
says what a computation on them runs in.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch


def as_tensor(x, name: str) -> torch.Tensor:
    """``x`` as a tensor (numpy arrays and nested lists accepted; a tensor is returned as it is)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple, np.generic)):
        try:
            return torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a numeric array, got {type(x).__name__} ({exc})") from None
    raise ValueError(f"{name} must be a tensor or a numpy array, got {type(x).__name__}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The floating dtype to compute in for ``x``: float64 stays float64, everything else runs
    (and half precision accumulates) in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def centred(reference: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``reference`` and ``others`` in their common compute dtype (on ``reference``'s device), each
    minus ``reference``'s mean: the ``||x||^2 - 2 x.y + ||y||^2`` expansion cancels on uncentred
    data, and a common shift changes no distance."""
    dtype = compute_dtype(reference)
    for t in others:
        dtype = torch.promote_types(dtype, compute_dtype(t))
    reference = reference.to(dtype)
    offset = reference.mean(0)
    return (reference - offset, *(t.to(device=reference.device, dtype=dtype) - offset for t in others))


def check_nonempty(x: torch.Tensor, name: str) -> None:
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} has no samples (shape {tuple(x.shape)})")


def as_matrix(x, name: str) -> torch.Tensor:
    """A finite, non-empty floating ``[N, d]`` tensor (numpy arrays accepted; integers become float32)."""
    x = as_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d array [N, d], got shape {tuple(x.shape)}")
    check_nonempty(x, name)
    if not x.dtype.is_floating_point:
        x = x.float()
    check_finite(x, name)
    return x


def as_samples(x, name: str) -> torch.Tensor:
    """A non-empty tensor ``[N, ...]`` of at least two dims, finite where floating."""
    x = as_tensor(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must be an array [N, ...] of at least 2 dims, got shape {tuple(x.shape)}")
    check_nonempty(x, name)
    if x.dtype.is_floating_point:
        check_finite(x, name)
    return x


def as_images(x, name: str) -> torch.Tensor:
    """Finite, non-empty float32 images ``[N, C, H, W]`` (numpy accepted); other dtypes get a message
    saying how to convert them rather than an error from deep inside a network."""
    x = as_tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W] (images), got shape {tuple(x.shape)}")
    check_nonempty(x, name)
    if x.dtype != torch.float32:
        hint = ("scale to [0, 1] and standardize first (fastdd.data.load does both)"
                if not x.dtype.is_floating_point else "convert with .float()")
        raise ValueError(f"{name} must be float32 images (the networks' dtype), got {x.dtype}: {hint}")
    check_finite(x, name)
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """Refuse NaN or inf in ``x``, naming the first bad sample (row)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        if x.dim():
            rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).flatten()[:5].tolist()
            where = f"first bad index {rows[0]}; first rows {rows}"
        else:
            where = "a scalar"
        raise ValueError(f"{name} contains NaN or inf ({int(bad.sum())} values, {where})")


def as_labels(y, name: str, n: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Integer class labels ``[N]``, optionally of length n and within [0, num_classes)."""
    y = as_tensor(y, name)
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-d [N], got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {y.dtype}")
    y = y.long()
    if n is not None and len(y) != n:
        raise ValueError(f"{name} has {len(y)} entries, expected {n}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{name} has negative labels (min {int(y.min())})")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got max {int(y.max())}")
    return y


def as_soft_labels(t, name: str, n: int | None = None) -> torch.Tensor:
    """Soft labels ``[N, K]``: per-row class probabilities (float, finite, >= 0, each row summing to 1)."""
    t = as_tensor(t, name)
    if t.dim() != 2 or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be float class probabilities [N, num_classes], got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    if n is not None and len(t) != n:
        raise ValueError(f"{name} has {len(t)} rows, expected {n}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative (probabilities)")
    sums = t.sum(1)
    if len(t) and float((sums - 1).abs().max()) > 1e-3:
        worst = int((sums - 1).abs().argmax())
        raise ValueError(f"each row of {name} must sum to 1 (probabilities; softmax logits first): row {worst} "
                         f"sums to {float(sums[worst]):.4g}")
    return t


def check_fraction(fraction, name: str = "fraction") -> float:
    """A number in (0, 1] (Python or numpy scalar), as a float."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}")
    return float(fraction)


def check_positive_int(value, name: str) -> int:
    """A whole number >= 1 (Python or numpy integer), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative(value, name: str) -> float:
    """A finite real number >= 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < float("inf"):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)
