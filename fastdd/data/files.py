"""A user's data set from a file: ``.npz`` (numpy) or ``.pt`` (torch) holding ``X`` and ``y``.

Format: ``X`` images ``[N, C, H, W]`` (``[N, H, W]`` gets a channel), or features ``[N, D]``;
``y`` integer labels ``[N]`` in ``[0, num_classes)``. Optional ``X_test`` / ``y_test`` give
the evaluation split; without them a stratified 25% of ``(X, y)`` is held out. Values are
used as given (standardize them first): float64 stays float64 (valuation then computes in
it), any other type becomes float32. Save one with::

    numpy.savez("data.npz", X=images, y=labels)      # or torch.save({"X": ..., "y": ...}, "data.pt")
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .digits import Split, stratified_split


class DataFileError(ValueError):
    """A data file that is missing, unreadable, or not in the documented format."""


def _tensor(value, key: str, path: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    except Exception as exc:  # object arrays and the like
        raise DataFileError(f"{path}: {key} is not a numeric array ({exc})") from exc


def _check_pair(X: torch.Tensor, y: torch.Tensor, path: str, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() not in (2, 4):
        raise DataFileError(f"{path}: X{suffix} must be images [N, C, H, W] / [N, H, W] or features [N, D], "
                            f"got shape {tuple(X.shape)}")
    if y.dim() != 1 or y.dtype.is_floating_point and not torch.equal(y, y.round()):
        raise DataFileError(f"{path}: y{suffix} must be integer class labels [N], got {y.dtype} {tuple(y.shape)}")
    if len(X) != len(y):
        raise DataFileError(f"{path}: X{suffix} has {len(X)} rows but y{suffix} has {len(y)}")
    if len(y) == 0:
        raise DataFileError(f"{path}: X{suffix} and y{suffix} have no samples")
    if len(y) and int(y.min()) < 0:
        raise DataFileError(f"{path}: y{suffix} has negative labels; use classes 0..C-1")
    if not torch.isfinite(X.float()).all():
        raise DataFileError(f"{path}: X{suffix} has NaN or infinite values")
    return (X if X.dtype == torch.float64 else X.float()), y.long()  # float64 stays float64


def load_data_file(path: str, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The train/test :class:`~fastdd.data.digits.Split` of a ``.npz`` / ``.pt`` file (see module doc)."""
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        elif ext in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataFileError(f"{path}: expected a .npz or .pt file, got {ext or 'no extension'}")
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or "X" not in data or "y" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataFileError(f"{path}: needs arrays named X and y, found {keys}")
    X, y = _check_pair(_tensor(data["X"], "X", path), _tensor(data["y"], "y", path), path)
    if ("X_test" in data) != ("y_test" in data):
        raise DataFileError(f"{path}: give both X_test and y_test, or neither")
    if "X_test" in data:
        Xt, yt = _check_pair(_tensor(data["X_test"], "X_test", path), _tensor(data["y_test"], "y_test", path),
                             path, "_test")
        if Xt.shape[1:] != X.shape[1:]:
            raise DataFileError(f"{path}: X_test rows have shape {tuple(Xt.shape[1:])}, X rows {tuple(X.shape[1:])}")
        return Split(X, y, Xt, yt)
    try:
        tr, te = stratified_split(y, test_fraction, seed)
    except ValueError as exc:
        raise DataFileError(f"{path}: {exc}") from None
    return Split(X[tr], y[tr], X[te], y[te])
