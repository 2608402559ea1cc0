"""Where keeping the hard examples starts to beat keeping the easy ones: a boundary in the plane of
(examples per class, kept fraction), fitted to measurements (Sorscher et al. 2022).

A :class:`KeepBoundary` is the line ``w0 + w1 log(n) + w2 f = 0`` (``n`` examples per class before
pruning, ``f`` the kept fraction; keep hard on the positive side) fitted by weighted logistic
regression to measured advantages ``accuracy(hard) - accuracy(easy)``. It comes from

- :func:`pilot_boundary`: a small sweep on the user's own data and model (its cost is recorded);
- :meth:`KeepBoundary.from_diagram`: the teacher-student perceptron's phase diagram, where ``n`` is
  measured in units of the representation's dimension (``alpha = P / d``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .._validate import as_labels, as_samples, as_tensor, check_fraction, check_positive_int


@dataclass
class KeepBoundary:
    """``margin(n, f) = w0 + w1 log(n) + w2 f``: positive where keeping the hard examples wins."""

    coef: tuple  # (w0, w1, w2)
    source: str  # what was measured, in words
    n_range: tuple  # (smallest, largest) n measured: the boundary is extrapolated outside it
    measurements: list  # (n, f, advantage) it was fitted to
    unit: str = "examples per class"

    def margin(self, n: float, fraction: float) -> float:
        w0, w1, w2 = self.coef
        return w0 + w1 * math.log(max(n, 1e-12)) + w2 * fraction

    def crossover(self, fraction: float) -> float | None:
        """The ``n`` at which the policies swap at kept ``fraction`` (None if the fit has no ``n`` term)."""
        w0, w1, w2 = self.coef
        if abs(w1) < 1e-12:
            return None
        return math.exp(-(w0 + w2 * fraction) / w1)

    @classmethod
    def fit(cls, n, fractions, advantage, source: str, unit: str = "examples per class") -> "KeepBoundary":
        """Weighted logistic regression of ``advantage > 0`` on ``[1, log n, f]`` (weights
        ``|advantage|``: near-ties say little); all of one sign gives a constant boundary."""
        n = torch.as_tensor(n, dtype=torch.float64).flatten()
        f = torch.as_tensor(fractions, dtype=torch.float64).flatten()
        a = torch.as_tensor(advantage, dtype=torch.float64).flatten()
        if not (len(n) == len(f) == len(a)) or len(n) == 0:
            raise ValueError(f"n, fractions and advantage must be non-empty and of one length, got "
                             f"{len(n)}, {len(f)}, {len(a)}")
        if (n <= 0).any() or (f <= 0).any() or (f > 1).any() or not torch.isfinite(a).all():
            raise ValueError("n must be positive, fractions in (0, 1] and advantages finite")
        measurements = [(float(x), float(y), float(z)) for x, y, z in zip(n, f, a)]
        n_range = (float(n.min()), float(n.max()))
        t = (a > 0).double()
        if t.min() == t.max():  # one policy won everywhere that was measured
            return cls((1.0 if t[0] > 0 else -1.0, 0.0, 0.0), source, n_range, measurements, unit)
        X = torch.stack([torch.ones_like(n), n.log(), f], 1)
        mu, sd = X[:, 1:].mean(0), X[:, 1:].std(0).clamp_min(1e-12)
        Z = torch.cat([X[:, :1], (X[:, 1:] - mu) / sd], 1)
        w = a.abs() / a.abs().sum() * len(a) + 1e-3
        theta = torch.zeros(3, dtype=torch.float64)
        ridge = 1e-2
        for _ in range(50):  # Newton on the weighted log-loss + ridge (separable grids stay finite)
            p = torch.sigmoid(Z @ theta)
            grad = Z.T @ (w * (p - t)) + ridge * theta
            H = (Z * (w * p * (1 - p)).unsqueeze(1)).T @ Z + ridge * torch.eye(3, dtype=torch.float64)
            step = torch.linalg.solve(H, grad)
            theta -= step
            if float(step.abs().max()) < 1e-10:
                break
        # back to the raw features [1, log n, f]
        w1, w2 = float(theta[1] / sd[0]), float(theta[2] / sd[1])
        w0 = float(theta[0] - theta[1] * mu[0] / sd[0] - theta[2] * mu[1] / sd[1])
        return cls((w0, w1, w2), source, n_range, measurements, unit)

    @classmethod
    def from_diagram(cls, diagram) -> "KeepBoundary":
        """The boundary of a teacher-student :class:`~fastdd.pruning.theory.PhaseDiagram` (``n`` in
        units of alpha = P / d, examples per dimension of the representation)."""
        adv = diagram.advantage()
        n, f, a = [], [], []
        for i, alpha in enumerate(diagram.alphas):
            for j, frac in enumerate(diagram.fractions):
                if frac < 1.0:
                    n.append(alpha)
                    f.append(frac)
                    a.append(float(adv[i, j]))
        return cls.fit(n, f, a, f"the teacher-student perceptron (d={diagram.d}, {diagram.n_seeds} seeds)",
                       unit="alpha = training examples per dimension")


_THEORY: KeepBoundary | None = None


def theory_boundary() -> KeepBoundary:
    """The perceptron's boundary over alpha 0.5-32 and kept 10-80% (computed once per process, ~2 s)."""
    global _THEORY
    if _THEORY is None:
        from .theory import phase_diagram

        _THEORY = KeepBoundary.from_diagram(phase_diagram(d=50, alphas=(0.5, 1, 2, 4, 8, 16, 32),
                                                          fractions=(0.1, 0.2, 0.4, 0.6, 0.8), n_seeds=6))
    return _THEORY


def pilot_boundary(X, y, scores, train_fn=None, sizes=None, fractions=(0.2, 0.5, 0.8), n_seeds: int = 1,
                   X_val=None, y_val=None, seed: int = 0, progress: bool = False) -> KeepBoundary:
    """Measure the boundary on the user's data: for training sets of ``sizes`` (default the full
    set and its halves down to ~10 per class) and kept ``fractions``, train ``train_fn`` on the
    easy and on the hard ``select`` of ``scores`` and compare accuracy on ``(X_val, y_val)`` (default:
    a stratified fifth of ``X`` held out). Costs ``2 x len(sizes) x len(fractions) x n_seeds``
    trainings, recorded in the boundary's ``source``."""
    from ..data.digits import stratified_split
    from ..train import accuracy
    from .curve import default_train_fn
    from .selection import select

    X = as_samples(X, "X")
    y = as_labels(y, "y", n=len(X))
    scores = as_tensor(scores, "scores")
    if len(scores) != len(y):
        raise ValueError(f"scores has {len(scores)} entries but y has {len(y)}")
    n_seeds = check_positive_int(n_seeds, "n_seeds")
    fractions = [check_fraction(f, "fractions") for f in fractions]
    if X_val is None:
        tr, va = stratified_split(y, 0.2, seed)
        X, y, scores, X_val, y_val = X[tr], y[tr], scores[tr], X[va], y[va]
    else:
        X_val = as_samples(X_val, "X_val")
        y_val = as_labels(y_val, "y_val", n=len(X_val))
    num_classes = int(torch.cat([y, y_val]).max()) + 1
    train_fn = train_fn or default_train_fn(num_classes=num_classes)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if sizes is None:
        sizes, s = [], len(y)
        while s >= 10 * num_classes and len(sizes) < 4:
            sizes.append(s)
            s //= 2
        sizes = sizes[::-1] or [len(y)]
    sizes = [min(check_positive_int(s, "sizes"), len(y)) for s in sizes]
    jobs = [(s, f, k) for s in sizes for f in fractions for k in range(n_seeds)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="pilot sweep", unit="(size, fraction, seed)")
    t0 = time.perf_counter()
    n, f_out, adv = [], [], []
    for size, frac, k in jobs:
        rows = order[:size]
        accs = {}
        for policy in ("easy", "hard"):
            idx = rows[select(scores[rows], frac, keep=policy, labels=y[rows], seed=seed + k)]
            accs[policy] = accuracy(train_fn(X[idx], y[idx], seed + k), X_val, y_val)
        n.append(size / num_classes)
        f_out.append(frac)
        adv.append(accs["hard"] - accs["easy"])
    seconds = time.perf_counter() - t0
    source = (f"a pilot sweep on your data: {2 * len(jobs)} trainings ({seconds:.0f} s), sizes {sizes}, "
              f"kept {fractions}, {n_seeds} seed(s), accuracy on {len(y_val)} held-out examples")
    return KeepBoundary.fit(n, f_out, adv, source)
