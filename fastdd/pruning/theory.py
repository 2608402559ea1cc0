"""The teacher-student perceptron of Sorscher et al. (2022), where pruning's phase transition is exact.

A random teacher ``w*`` in ``d`` dimensions labels Gaussian inputs by ``sign(w* . x)``; an example's
difficulty is its distance to the teacher's boundary, ``|w* . x|`` (the ideal pruning metric, or
a probe's noisy copy of it). A student (logistic regression, which on separable data tends to the
max-margin perceptron the paper analyses) trains on the kept fraction ``f`` of ``P = alpha * d``
examples, and its test error is exact for Gaussian inputs: ``angle(w, w*) / pi``.

The paper's finding, which :func:`phase_diagram` reproduces: with little data (small ``alpha``)
keeping the *easy* examples (far from the boundary) wins; with abundant data keeping the *hard*
ones wins, the more so the more is kept; the crossover is a line in the ``(alpha, f)`` plane.

    >>> diagram = phase_diagram(d=50, alphas=(0.5, 2, 8), fractions=(0.2, 0.5, 0.8), n_seeds=2)  # doctest: +SKIP
    >>> diagram.advantage()     # error(keep easy) - error(keep hard): > 0 where hard wins   # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validate import check_fraction, check_nonnegative, check_positive_int

POLICIES = ("easy", "hard", "random")


@dataclass
class PhaseDiagram:
    """Student test error per policy over the ``(alpha, f)`` grid, mean over seeds."""

    d: int
    alphas: list
    fractions: list
    errors: dict  # policy -> [len(alphas), len(fractions)] mean test error
    n_seeds: int
    probe_noise: float

    def advantage(self) -> torch.Tensor:
        """``error(easy) - error(hard)`` ``[len(alphas), len(fractions)]``: positive where keeping the
        hard examples wins."""
        return self.errors["easy"] - self.errors["hard"]

    def best(self) -> list[list[str]]:
        """The winning policy at each grid point."""
        stacked = torch.stack([self.errors[p] for p in POLICIES])
        return [[POLICIES[int(k)] for k in row] for row in stacked.argmin(0)]

    def crossover_alpha(self) -> list:
        """Per kept fraction, the smallest ``alpha`` of the grid from which keeping hard beats
        keeping easy at every larger ``alpha`` (None where it never does)."""
        adv = self.advantage()
        out = []
        for j in range(len(self.fractions)):
            col = adv[:, j] > 0
            idx = None
            for i in range(len(self.alphas) - 1, -1, -1):
                if not col[i]:
                    break
                idx = i
            out.append(None if idx is None else self.alphas[idx])
        return out

    def table(self) -> str:
        """Markdown: rows alpha, columns kept fraction; each cell error(easy) - error(hard) in points
        of test error % and the winning policy."""
        adv, best = self.advantage(), self.best()
        head = "| alpha = P/d | " + " | ".join(f"keep {f:.0%}" for f in self.fractions) + " |"
        lines = [head, "|---|" + "---|" * len(self.fractions)]
        for i, a in enumerate(self.alphas):
            cells = [f"{100 * float(adv[i, j]):+.1f} ({best[i][j]})" for j in range(len(self.fractions))]
            lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str, title: str | None = None) -> None:
        """Heat map of ``error(easy) - error(hard)`` (red: keep hard wins, blue: keep easy wins)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        adv = 100 * self.advantage().numpy()
        lim = max(1e-9, float(abs(adv).max()))
        fig, ax = plt.subplots(figsize=(6, 4.5))
        im = ax.imshow(adv.T, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(self.alphas)), [f"{a:g}" for a in self.alphas])
        ax.set_yticks(range(len(self.fractions)), [f"{f:.0%}" for f in self.fractions])
        ax.set_xlabel("training set size alpha = P / d")
        ax.set_ylabel("fraction of data kept")
        ax.set_title(title or f"teacher-student perceptron, d={self.d}: error(easy) - error(hard)")
        fig.colorbar(im, ax=ax, label="test error points (red: keep hard wins)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _fit_logistic(X: torch.Tensor, y: torch.Tensor, ridge: float, iterations: int = 25) -> torch.Tensor:
    """Batched ridge-regularized logistic regression by Newton's method: ``X [S, n, d]``, ``y [S, n]``
    in {-1, +1} -> ``w [S, d]`` (no bias: the teacher's boundary goes through the origin)."""
    S, n, d = X.shape
    w = X.new_zeros(S, d)
    eye = torch.eye(d, dtype=X.dtype)
    for _ in range(iterations):
        margins = y * torch.einsum("snd,sd->sn", X, w)
        p = torch.sigmoid(-margins)  # d loss / d margin = -p
        grad = -torch.einsum("sn,snd->sd", p * y, X) + ridge * w
        curv = p * (1 - p)
        H = torch.einsum("sn,snd,sne->sde", curv, X, X) + ridge * eye
        step = torch.linalg.solve(H, grad.unsqueeze(-1)).squeeze(-1)
        w = w - step
        if float(step.norm(dim=1).max()) < 1e-8 * (1 + float(w.norm(dim=1).max())):
            break
    return w


def student_error(d: int, alpha: float, fraction: float, keep: str, n_seeds: int = 5, probe_noise: float = 0.0,
                  ridge: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """Test errors ``[n_seeds]`` of students trained on the kept fraction of ``alpha * d`` examples.

    ``probe_noise``: difficulty is measured by a probe at angle ``theta`` from the teacher with
    ``tan(theta) = probe_noise`` (0: the teacher's own margin, the ideal metric).
    """
    if keep not in POLICIES:
        raise ValueError(f"keep must be one of {POLICIES}, got {keep!r}")
    P = max(1, int(round(alpha * d)))
    kept = max(1, int(round(fraction * P)))
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_seeds, d, generator=gen, dtype=torch.float64)
    teacher = teacher / teacher.norm(dim=1, keepdim=True)
    noise = torch.randn(n_seeds, d, generator=gen, dtype=torch.float64)
    noise = noise - (noise * teacher).sum(1, keepdim=True) * teacher
    noise = noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
    probe = teacher + probe_noise * noise
    X = torch.randn(n_seeds, P, d, generator=gen, dtype=torch.float64)
    y = torch.sign(torch.einsum("spd,sd->sp", X, teacher))
    y[y == 0] = 1
    difficulty = -torch.einsum("spd,sd->sp", X, probe).abs()  # larger is harder (nearer the boundary)
    if keep == "random":
        order = torch.stack([torch.randperm(P, generator=gen) for _ in range(n_seeds)])
    else:
        order = torch.argsort(difficulty, dim=1, descending=(keep == "hard"))
    idx = order[:, :kept]
    Xk = torch.gather(X, 1, idx.unsqueeze(-1).expand(-1, -1, d))
    yk = torch.gather(y, 1, idx)
    w = _fit_logistic(Xk, yk, ridge * kept)
    cos = (w * teacher).sum(1) / w.norm(dim=1).clamp_min(1e-300)
    return torch.arccos(cos.clamp(-1, 1)) / math.pi


def phase_diagram(d: int = 100, alphas=(0.5, 1, 2, 4, 8, 16), fractions=(0.1, 0.2, 0.4, 0.6, 0.8),
                  n_seeds: int = 5, probe_noise: float = 0.0, ridge: float = 1e-3, seed: int = 0,
                  progress: bool = False) -> PhaseDiagram:
    """Student test error for keep easy / hard / random over ``alphas x fractions`` (Sorscher et al.
    Fig. 1). ``alphas``: training-set sizes in units of ``d``; ``fractions`` in (0, 1]."""
    d = check_positive_int(d, "d")
    n_seeds = check_positive_int(n_seeds, "n_seeds")
    probe_noise = check_nonnegative(probe_noise, "probe_noise")
    alphas = [check_nonnegative(a, "alphas") for a in alphas]
    if not alphas or min(alphas) <= 0:
        raise ValueError(f"alphas must be positive training-set sizes in units of d, got {alphas}")
    fractions = [check_fraction(f, "fractions") for f in fractions]
    errors = {p: torch.zeros(len(alphas), len(fractions), dtype=torch.float64) for p in POLICIES}
    jobs = [(i, a, j, f) for i, a in enumerate(alphas) for j, f in enumerate(fractions)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="phase diagram", unit="grid point")
    for i, a, j, f in jobs:
        for k, p in enumerate(POLICIES):
            # the same teachers and inputs for every policy at a grid point: differences are the policy's
            errors[p][i, j] = student_error(d, a, f, p, n_seeds, probe_noise, ridge, seed + 1000 * i + j).mean()
    return PhaseDiagram(d, alphas, fractions, errors, n_seeds, probe_noise)
