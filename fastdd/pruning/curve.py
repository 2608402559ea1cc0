"""Pruning curves: test accuracy after training on the kept subset, per kept fraction and policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .._validate import as_labels, as_samples, as_tensor, check_fraction, check_positive_int
from ..train import accuracy, train_model
from .selection import KEEPS, select

TrainFn = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]


def default_train_fn(epochs: int = 30, num_classes: int | None = None) -> TrainFn:
    """Train the DC ConvNet (width 32, depth 2) with SGD for ``epochs``, seeded.

    ``num_classes`` fixes the classifier's outputs (default: inferred from each subset,
    which misses classes a subset happens to lack).
    """

    def train(X, y, seed):
        from ..models import ConvNet

        torch.manual_seed(seed)
        classes = num_classes if num_classes is not None else int(y.max()) + 1
        model = ConvNet(X.shape[1], classes, X.shape[-1], width=32, depth=2)
        return train_model(model, X, y, epochs=epochs, seed=seed)

    return train


@dataclass
class PruningCurve:
    fractions: list
    keeps: list
    accuracies: dict = field(default_factory=dict)  # keep -> [n_fractions, n_seeds]

    def mean_std(self, keep: str) -> tuple[torch.Tensor, torch.Tensor]:
        acc = self.accuracies[keep]
        std = acc.std(1, unbiased=True) if acc.shape[1] > 1 else torch.zeros(acc.shape[0])
        return acc.mean(1), std

    def table(self) -> str:
        """Markdown: kept fraction x policy, mean ± std test accuracy (%)."""
        lines = ["| kept | " + " | ".join(self.keeps) + " |", "|---|" + "---|" * len(self.keeps)]
        stats = {k: self.mean_std(k) for k in self.keeps}
        for i, f in enumerate(self.fractions):
            cells = [f"{100 * stats[k][0][i]:.1f} ± {100 * stats[k][1][i]:.1f}" for k in self.keeps]
            lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str, title: str = "pruning curve") -> None:
        """Save the curves (mean ± std over seeds) as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for k in self.keeps:
            mean, std = self.mean_std(k)
            ax.errorbar([100 * f for f in self.fractions], (100 * mean).tolist(), yerr=(100 * std).tolist(),
                        marker="o", capsize=3, label=f"keep {k}")
        ax.set_xlabel("training data kept (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def pruning_curve(X: torch.Tensor, y, X_test: torch.Tensor, y_test, scores,
                  fractions=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0), keeps=("hard", "easy", "random"), n_seeds: int = 3,
                  train_fn: TrainFn | None = None, balanced: bool = True, progress: bool = False) -> PruningCurve:
    """Test accuracy after training on ``select(scores, fraction, keep, labels, seed)``.

    For each kept fraction and policy, ``n_seeds`` models are trained by
    ``train_fn(X_kept, y_kept, seed) -> model`` (default: the DC ConvNet, 30 epochs) and
    scored on the test set; seed s selects the subset (random policy) and seeds training.
    ``keeps``: any of ``select``'s policies (add ``"ccs"`` and ``"moderate"`` for high pruning
    rates). ``balanced`` splits each budget equally across classes. At 100% every policy keeps
    everything, so one set of models serves all of them.
    """
    X, X_test = as_samples(X, "X"), as_samples(X_test, "X_test")
    y = as_labels(y, "y", n=len(X))
    y_test = as_labels(y_test, "y_test", n=len(X_test))
    scores = as_tensor(scores, "scores")
    if len(scores) != len(y):
        raise ValueError(f"scores has {len(scores)} entries but y has {len(y)}")
    check_positive_int(n_seeds, "n_seeds")
    for k in keeps:
        if k not in KEEPS:
            raise ValueError(f"keeps must be among {KEEPS}, got {k!r}")
    train_fn = train_fn or default_train_fn(num_classes=int(torch.cat([y, y_test]).max()) + 1)
    fractions = [check_fraction(f, "fractions") for f in fractions]
    curve = PruningCurve(fractions, list(keeps), {k: torch.zeros(len(fractions), n_seeds) for k in keeps})
    jobs = [(i, f, s) for i, f in enumerate(fractions) for s in range(n_seeds)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="pruning curve", unit="fraction x seed")
    for i, f, s in jobs:
        done = None
        for k in keeps:
            if f >= 1.0 and done is not None:
                curve.accuracies[k][i, s] = done
                continue
            idx = select(scores, f, keep=k, labels=y if balanced else None, seed=s)
            acc = accuracy(train_fn(X[idx], y[idx], s), X_test, y_test)
            curve.accuracies[k][i, s] = acc
            done = acc
    return curve
