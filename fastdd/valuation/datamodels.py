"""The linear datamodeling score (LDS; Park et al. 2023) and the retraining that gives its targets.

An attribution method gives ``scores [n_train, n_test]``; it predicts that a model trained on a
subset S of the training data has output ``sum_{i in S} scores[i, j]`` on test point j (up to an
affine map). The LDS is the Spearman correlation, over many random subsets, between that
prediction and the output of a model actually retrained on S, averaged over test points.
The output is the classification margin ``logit_y - logsumexp(other logits)`` (TRAK's).

``datamodel_targets`` trains those models: many small models at once with ``torch.func``
(:class:`SubsetTrainer`: each model's loss masked to its own subset, one ``vmap`` over the
stacked parameters) or one after another through a ``train_fn`` of the user's.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from .. import _checkpoint
from .._validate import as_labels, as_samples, as_tensor, check_finite, check_fraction, check_positive_int


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit_y - logsumexp(logits without y)`` per row ``[N]`` (the output LDS and TRAK use)."""
    correct = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def margin_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`margins` as a per-sample ``loss_fn`` for the gradient engine (its gradient is TRAK's feature)."""
    return margins(outputs, targets)


@dataclass
class LDSResult:
    """``mean``: the LDS (mean over test points of the per-test Spearman correlations);
    ``per_test [n_test]`` (NaN where the outputs or predictions do not vary); ``stderr``."""

    mean: float
    per_test: torch.Tensor
    stderr: float

    def __float__(self):
        return self.mean

    def __repr__(self):
        return f"LDSResult(mean={self.mean:.4f} +- {self.stderr:.4f}, n_test={len(self.per_test)})"


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=0)


def lds(scores, subsets, outputs) -> LDSResult:
    """The linear datamodeling score of ``scores [n_train, n_test]``.

    Args:
        scores: attributions, larger = the training point raises that test output more.
        subsets: ``[S, n_train]`` boolean masks (or 0/1) of the retraining subsets.
        outputs: ``[S, n_test]`` the retrained models' outputs (margins) on the test points.

    >>> r = lds(scores, targets.subsets, targets.outputs); r.mean
    """
    scores = as_tensor(scores, "scores").double()
    subsets, outputs = as_tensor(subsets, "subsets"), as_tensor(outputs, "outputs").double()
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_train, n_test], got shape {tuple(scores.shape)}")
    if subsets.dim() != 2 or subsets.shape[1] != scores.shape[0]:
        raise ValueError(f"subsets must be [S, n_train] = [S, {scores.shape[0]}] masks, got {tuple(subsets.shape)}")
    if outputs.shape != (subsets.shape[0], scores.shape[1]):
        raise ValueError(f"outputs must be [S, n_test] = [{subsets.shape[0]}, {scores.shape[1]}], "
                         f"got {tuple(outputs.shape)}")
    if subsets.shape[0] < 3:
        raise ValueError(f"a rank correlation needs at least 3 subsets, got {subsets.shape[0]}")
    check_finite(scores, "scores")
    check_finite(outputs, "outputs")
    predicted = subsets.double() @ scores  # [S, n_test]
    rp, ro = _ranks(predicted.numpy()), _ranks(outputs.numpy())
    rp, ro = rp - rp.mean(0), ro - ro.mean(0)
    denom = np.sqrt((rp ** 2).sum(0) * (ro ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denom > 0, (rp * ro).sum(0) / np.where(denom > 0, denom, 1), np.nan)
    ok = rho[~np.isnan(rho)]
    if not len(ok):
        raise ValueError("no test point has varying outputs and predictions: the LDS is undefined")
    return LDSResult(float(ok.mean()), torch.from_numpy(rho), float(ok.std(ddof=1) / math.sqrt(len(ok))) if len(ok) > 1 else float("nan"))


# --------------------------------------------------------------------------- retraining
class SubsetTrainer:
    """Trains many copies of a small model at once, each on its own subset of the data.

    The models' parameters are stacked and one ``vmap`` computes every model's gradient: each
    model's loss is the mean cross-entropy over the samples of its subset within the shared
    minibatch (so each model sees its subset once per epoch). SGD with momentum and weight
    decay; ``batch_size=None`` trains full-batch (convex models: logistic regression converges
    to its unique optimum). ``model_fn(seed) -> nn.Module`` builds a freshly initialized model.

    >>> trainer = SubsetTrainer(lambda s: nn.Linear(784, 10), epochs=300, lr=1.0, batch_size=None, weight_decay=1e-3)
    """

    def __init__(self, model_fn: Callable[[int], nn.Module], epochs: int = 20, lr: float = 0.01,
                 batch_size: int | None = 128, momentum: float = 0.9, weight_decay: float = 5e-4):
        if not callable(model_fn):
            raise ValueError(f"model_fn must be a callable seed -> nn.Module, got {type(model_fn).__name__}")
        self.model_fn = model_fn
        self.epochs = check_positive_int(epochs, "epochs")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.batch_size = None if batch_size is None else check_positive_int(batch_size, "batch_size")

    def _models(self, seeds):
        models = []
        for s in seeds:
            torch.manual_seed(int(s))
            m = self.model_fn(int(s))
            if not isinstance(m, nn.Module):
                raise ValueError(f"model_fn must return an nn.Module, got {type(m).__name__}")
            models.append(m)
        return models

    def train(self, X: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, seeds, snapshots: list | None = None
              ) -> tuple[nn.Module, dict, dict]:
        """Train ``len(seeds)`` models, model k on ``masks[k]``; returns (base module, stacked
        parameters ``{name: [M, *shape]}``, buffers). ``snapshots``: a list that receives a copy
        of the stacked parameters after every epoch (TracIn's checkpoints)."""
        models = self._models(seeds)
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        w = masks.to(X.device, X.dtype)

        def loss(p, b, xb, yb, wb):
            out = functional_call(base, (p, b), (xb,))
            per = F.cross_entropy(out, yb, reduction="none")
            return (per * wb).sum() / wb.sum().clamp_min(1.0)

        step_grads = vmap(grad(loss), in_dims=(0, 0, None, None, 0))
        velocity = {k: torch.zeros_like(v) for k, v in params.items()}
        n = len(y)
        gen = torch.Generator().manual_seed(int(seeds[0]))
        with torch.no_grad():
            params = {k: v.detach() for k, v in params.items()}
            for _ in range(self.epochs):
                order = torch.randperm(n, generator=gen) if self.batch_size else torch.arange(n)
                for idx in order.split(self.batch_size or n):
                    with torch.enable_grad():
                        g = step_grads(params, buffers, X[idx], y[idx], w[:, idx])
                    for k in params:
                        d = g[k] + self.weight_decay * params[k]
                        velocity[k].mul_(self.momentum).add_(d)
                        params[k] -= self.lr * velocity[k]
                if snapshots is not None:
                    snapshots.append({k: v.clone() for k, v in params.items()})
        return base, params, buffers

    def module(self, params: dict, k: int, buffers: dict | None = None) -> nn.Module:
        """Model ``k`` of stacked ``params`` as an ordinary module (eval mode)."""
        m = self.model_fn(0)
        m.load_state_dict({**{n: t[k] for n, t in params.items()},
                           **{n: t[k] for n, t in (buffers or {}).items()}}, strict=buffers is not None)
        return m.eval()

    @staticmethod
    def logits(base, params, buffers, X_test) -> torch.Tensor:
        """``[M, n_test, C]`` outputs of every trained model."""
        with torch.no_grad():
            return vmap(lambda p, b: functional_call(base, (p, b), (X_test,)))(params, buffers)

    @staticmethod
    def outputs(base, params, buffers, X_test, y_test) -> torch.Tensor:
        """``[M, n_test]`` margins of every trained model on the test points."""
        logits = SubsetTrainer.logits(base, params, buffers, X_test)
        return margins(logits, y_test.expand(logits.shape[0], -1))


@dataclass
class DatamodelTargets:
    """``subsets [S, n_train]`` boolean masks and ``outputs [S, n_test]`` retrained margins
    (each averaged over ``repeats`` models with different seeds)."""

    subsets: torch.Tensor
    outputs: torch.Tensor


def datamodel_targets(trainer, X, y, X_test, y_test, n_subsets: int = 100, fraction: float = 0.5,
                      repeats: int = 1, seed: int = 0, models_at_once: int = 100, checkpoint: str | None = None,
                      progress: bool = False) -> DatamodelTargets:
    """Retrain on ``n_subsets`` random subsets of ``fraction`` of the training data and record the
    margins on the test points: the ground truth of :func:`lds`.

    Args:
        trainer: a :class:`SubsetTrainer` (many models at once, vectorized) or a callable
            ``train_fn(X_sub, y_sub, seed) -> nn.Module`` run once per model.
        repeats: models per subset (different seeds), averaged: lowers the noise of
            non-convex retraining.
        models_at_once: how many models a :class:`SubsetTrainer` trains in one vmap.
        checkpoint: a file the finished subsets are saved to after each group; a rerun with the
            same arguments resumes from it (another run's file is refused).
    """
    X, X_test = as_samples(X, "X"), as_samples(X_test, "X_test")
    y, y_test = as_labels(y, "y", len(X)), as_labels(y_test, "y_test", len(X_test))
    n_subsets = check_positive_int(n_subsets, "n_subsets")
    fraction = check_fraction(fraction)
    repeats, models_at_once = check_positive_int(repeats, "repeats"), check_positive_int(models_at_once, "models_at_once")
    vectorized = isinstance(trainer, SubsetTrainer)
    if not vectorized and not callable(trainer):
        raise ValueError("trainer must be a SubsetTrainer or a callable train_fn(X_sub, y_sub, seed) -> nn.Module")
    n, k = len(y), max(1, round(fraction * len(y)))
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for s in range(n_subsets):
        masks[s, torch.randperm(n, generator=gen)[:k]] = True
    identity = dict(kind="datamodel_targets", n_subsets=n_subsets, fraction=fraction, repeats=repeats, seed=seed,
                    trainer=trainer, X=X, y=y, X_test=X_test, y_test=y_test)
    outputs = torch.zeros(n_subsets * repeats, len(y_test), dtype=torch.float64)
    state = _checkpoint.load(checkpoint, identity)
    done = 0
    if state is not None:
        done = int(state["done"])
        outputs[:done] = state["outputs"][:done]
    jobs = [(s, r) for s in range(n_subsets) for r in range(repeats)]  # row s * repeats + r
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=done, desc="retraining", unit="model")
    step = models_at_once if vectorized else max(1, models_at_once // 10)
    while done < len(jobs):
        group = jobs[done:done + step]
        seeds = [seed * 1_000_003 + s * repeats + r + 1 for s, r in group]
        if vectorized:
            base, params, buffers = trainer.train(X, y, masks[[s for s, _ in group]], seeds)
            out = trainer.outputs(base, params, buffers, X_test, y_test)
        else:
            out = []
            for (s, _), sd in zip(group, seeds):
                torch.manual_seed(sd)
                model = trainer(X[masks[s]], y[masks[s]], sd)
                if not isinstance(model, nn.Module):
                    raise ValueError(f"train_fn must return the trained nn.Module, got {type(model).__name__}")
                model.eval()
                with torch.no_grad():
                    out.append(margins(model(X_test), y_test))
            out = torch.stack(out)
        outputs[done:done + len(group)] = out.double()
        done += len(group)
        if checkpoint:
            _checkpoint.save(checkpoint, {"identity": _checkpoint.fingerprint(identity), "done": done,
                                          "outputs": outputs[:done].clone()})
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return DatamodelTargets(masks, outputs.view(n_subsets, repeats, -1).mean(1))


# --------------------------------------------------------------------------- point removal
@dataclass
class RemovalCurve:
    """Test accuracy after removing the ``removed[k]`` highest-valued training points of each method
    (mean over seeds): a method that finds the points the model needs drops fastest."""

    removed: list
    accuracy: dict  # method -> [accuracy per entry of removed]

    def table(self) -> str:
        head = "| method | " + " | ".join(f"{k} removed" for k in self.removed) + " |"
        rows = [head, "|---|" + "---|" * len(self.removed)]
        for name, acc in self.accuracy.items():
            rows.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " |")
        return "\n".join(rows)

    def plot(self, path: str, title: str = "removing the most valuable training points") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, acc in self.accuracy.items():
            ax.plot(self.removed, [100 * a for a in acc], marker="o", label=name,
                    ls=":" if name == "random" else "-", color="gray" if name == "random" else None)
        ax.set_xlabel("training points removed (highest value first)")
        ax.set_ylabel("test accuracy of the retrained model (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def removal_curve(values: dict, trainer: SubsetTrainer, X, y, X_test, y_test, removed=(0, 50, 100, 200, 400),
                  seeds: int = 1, random_seeds: int = 3, seed: int = 0) -> RemovalCurve:
    """Retrain without the highest-valued points of each method (and random points) and report test
    accuracy: every (method, count, seed) model is trained at once by ``trainer``.

    Args:
        values: ``{method: [n_train]}``, larger = more valuable (e.g. attributions summed over
            the test points).
        removed: how many points to remove, each.
        seeds: models per (method, count) (convex full-batch trainers need 1); ``random_seeds``:
            random removals per count, averaged.
    """
    X, X_test = as_samples(X, "X"), as_samples(X_test, "X_test")
    y, y_test = as_labels(y, "y", len(X)), as_labels(y_test, "y_test", len(X_test))
    n = len(y)
    removed = [int(k) for k in removed]
    if any(k < 0 or k >= n for k in removed):
        raise ValueError(f"removed counts must lie in [0, {n}), got {removed}")
    gen = torch.Generator().manual_seed(seed)
    jobs = []  # (method, k, mask)
    for name, v in values.items():
        v = as_tensor(v, f"values[{name!r}]").reshape(-1)
        if len(v) != n:
            raise ValueError(f"values[{name!r}] has {len(v)} entries for {n} training points")
        order = torch.argsort(v.double(), descending=True)
        for k in removed:
            mask = torch.ones(n, dtype=torch.bool)
            mask[order[:k]] = False
            jobs += [(name, k, mask)] * seeds
    for _ in range(random_seeds):
        perm = torch.randperm(n, generator=gen)
        for k in removed:
            mask = torch.ones(n, dtype=torch.bool)
            mask[perm[:k]] = False
            jobs.append(("random", k, mask))
    masks = torch.stack([m for *_, m in jobs])
    base, params, buffers = trainer.train(X, y, masks, [seed * 7919 + i + 1 for i in range(len(jobs))])
    correct = (SubsetTrainer.logits(base, params, buffers, X_test).argmax(-1) == y_test).double().mean(1)
    acc: dict = {}
    for (name, k, _), a in zip(jobs, correct.tolist()):
        acc.setdefault(name, {}).setdefault(k, []).append(a)
    return RemovalCurve(removed, {name: [float(np.mean(by_k[k])) for k in removed] for name, by_k in acc.items()})
