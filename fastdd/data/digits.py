"""The default data: scikit-learn's bundled 8x8 digits, split and standardized.

Nothing is downloaded: the 1,797 images ship inside scikit-learn.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Split(NamedTuple):
    X_train: torch.Tensor  # [N_train, 1, 8, 8] float32, standardized with train statistics
    y_train: torch.Tensor  # [N_train] int64 in [0, 10)
    X_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """Fixed stratified train/test split of the digits (75/25 by default).

    Pixels are standardized with the training set's mean and std. Needs scikit-learn.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn") from exc
    bunch = sk_load_digits()
    X = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    mean, std = X[tr].mean(), X[tr].std()
    X = (X - mean) / std
    return Split(X[tr], y[tr], X[te], y[te])


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train and test indices: each class shuffled by a fixed generator, a fraction to test.

    Every class of at least two samples keeps at least one on each side (a small class is
    never missing from the test split); a class of one sample stays in training. A split
    that would leave the test side empty is refused.
    """
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = min(max(1, int(round(len(idx) * test_fraction))), len(idx) - 1)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train, test = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    if len(test) == 0:
        raise ValueError(f"no class has two samples ({len(y)} samples in all), so nothing can be held out "
                         "for testing: give a test split (X_test, y_test) or more samples")
    return train, test


def make_blobs_images(n: int, num_classes: int = 10, channels: int = 1, size: int = 8, noise: float = 1.0,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images for scale tests: a random prototype per class plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, channels, size, size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    X = protos[y] + noise * torch.randn(n, channels, size, size, generator=gen)
    return X, y
