"""Training-dynamics difficulty scores: EL2N, GraNd (through the gradient engine), forgetting."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import as_labels, as_samples, check_positive_int, compute_dtype
from ..distributed import all_gather_rows, shard
from ..grad import per_sample_grad_norms
from ..grad.per_sample_linear import acc_dtype
from ..train import predict, train_model

ModelFactory = Callable[[], nn.Module]


def _check_xy(X, y):
    """``(X, y)`` as tensors: X non-empty ``[N, ...]`` and finite, y integer labels ``[N]``."""
    X = as_samples(X, "X")
    return X, as_labels(y, "y", n=X.shape[0])


def _fresh(model_fn: ModelFactory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
    return model


def el2n_scores(model_fn: ModelFactory, X: torch.Tensor, y, epochs: int = 10, n_runs: int = 5,
                seed: int = 0, **train_options) -> torch.Tensor:
    """EL2N (Paul et al. 2021): ``||softmax(f(x)) - onehot(y)||_2`` after ``epochs`` of training,
    averaged over ``n_runs`` fresh models from ``model_fn()``. Larger is harder.

    ``train_options`` go to :func:`fastdd.train.train_model` (batch_size, lr, ...).
    Returns ``[N]`` scores in the models' output dtype (float64 for float64 models, else float32).
    """
    X, y = _check_xy(X, y)
    n_runs = check_positive_int(n_runs, "n_runs")
    total = None
    for run in range(n_runs):
        model = train_model(_fresh(model_fn, seed + run), X, y, epochs=epochs, seed=seed + run, **train_options)
        logits = predict(model, X)
        probs = F.softmax(logits.to(compute_dtype(logits)), dim=1)
        err = (probs - F.one_hot(y.to(probs.device), probs.shape[1]).to(probs.dtype)).norm(dim=1).cpu()
        total = err if total is None else total + err
    return total / n_runs


def grand_scores(model, X: torch.Tensor, y, n_models: int = 1, epochs: int = 0, batch_size: int = 512,
                 params=None, seed: int = 0, **train_options) -> torch.Tensor:
    """GraNd (Paul et al. 2021): the expected norm of each example's loss gradient.

    ``model`` is an ``nn.Module`` (scored as it is; ``n_models`` must be 1) or a factory
    ``() -> nn.Module`` whose ``n_models`` fresh models are trained ``epochs`` epochs and
    averaged. Norms come from the gradient engine without materializing per-sample
    gradients; under an initialized process group each rank scores a share of the
    batches and every rank gets all scores. Returns ``[N]`` scores in the norms' dtype
    (float64 for float64 parameters, else float32); larger is harder.
    """
    X, y = _check_xy(X, y)
    n_models = check_positive_int(n_models, "n_models")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(model, nn.Module):
        if n_models != 1 or epochs:
            raise ValueError("with a model instance, n_models must be 1 and epochs 0; pass a factory to average fresh models")
        models = [model]
    else:
        models = (train_model(_fresh(model, seed + i), X, y, epochs=epochs, seed=seed + i, **train_options)
                  if epochs else _fresh(model, seed + i).eval() for i in range(n_models))
    total = None
    starts = list(range(0, len(y), batch_size))
    mine = starts[shard(len(starts))]  # under torch.distributed: this rank's batches, in order
    for m in models:
        local = [per_sample_grad_norms(m, X[s:s + batch_size], y[s:s + batch_size], params=params) for s in mine]
        if not local:  # a rank with no batch still takes part in the gather, with the norms' dtype
            p0 = next(m.parameters())
            local = [torch.zeros(0, device=p0.device, dtype=acc_dtype(p0))]
        norms = all_gather_rows(torch.cat(local)).cpu()
        total = norms if total is None else total + norms
    return total / n_models


class ForgettingTracker:
    """Counts forgetting events (Toneva et al. 2019) during a user's training loop.

    A forgetting event is an example classified correctly at one presentation and
    wrongly at its next. Call :meth:`update` with each mini-batch's indices and
    predictions (or correctness)::

        tracker = ForgettingTracker(len(train_set))
        for idx, x, y in loader:
            logits = model(x)
            tracker.update(idx, logits.argmax(1) == y)
            ...

    ``scores()`` gives the counts, with never-learned examples ranked hardest
    (``never_learned`` = one more than the largest count, by default).
    """

    def __init__(self, n_samples: int):
        check_positive_int(n_samples, "n_samples")
        self.n_samples = n_samples
        self.forgetting = torch.zeros(n_samples, dtype=torch.long)
        self.last_correct = torch.zeros(n_samples, dtype=torch.bool)
        self.learned = torch.zeros(n_samples, dtype=torch.bool)
        self.presentations = torch.zeros(n_samples, dtype=torch.long)

    def update(self, indices, correct) -> None:
        """Record one presentation of ``indices [b]`` with ``correct [b]`` (bool)."""
        indices = torch.as_tensor(indices).long().flatten().cpu()
        correct = torch.as_tensor(correct).bool().flatten().cpu()
        if len(indices) != len(correct):
            raise ValueError(f"indices has {len(indices)} entries but correct has {len(correct)}")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_samples):
            raise ValueError(f"indices must lie in [0, {self.n_samples})")
        if len(torch.unique(indices)) != len(indices):
            raise ValueError("indices repeat within one update; record each presentation separately")
        seen = self.presentations[indices] > 0
        forgot = seen & self.last_correct[indices] & ~correct
        self.forgetting[indices] += forgot.long()
        self.last_correct[indices] = correct
        self.learned[indices] |= correct
        self.presentations[indices] += 1

    def unforgettable(self) -> torch.Tensor:
        """``[N]`` bool: learned at some presentation and never forgotten."""
        return self.learned & (self.forgetting == 0)

    def scores(self, never_learned: float | None = None) -> torch.Tensor:
        """``[N]`` fp32 forgetting counts; never-learned examples get ``never_learned``."""
        s = self.forgetting.float()
        fill = float(self.forgetting.max()) + 1 if never_learned is None else float(never_learned)
        s[~self.learned] = fill
        return s


class TrainingDynamics:
    """Difficulty scores streamed from a user's own training loop, from the logits each step already
    computed (nothing is re-run): forgetting events (Toneva et al. 2019), the area under the margin
    (AUM, Pleiss et al. 2020: the mean over presentations of the true-class logit minus the largest
    other one) and EL2N (Paul et al. 2021: ``||softmax - onehot||`` at the chosen epochs)::

        dynamics = TrainingDynamics(len(train_set), num_classes=10)
        for epoch in range(epochs):
            for idx, x, y in loader:
                logits = model(x)
                dynamics.update(idx, logits, y, epoch=epoch)
                F.cross_entropy(logits, y).backward(); ...
        keep = select(dynamics.scores("aum"), 0.3, keep="ccs", labels=labels)

    ``el2n_epochs``: epochs whose EL2N is kept (default every epoch; the paper reads it early, e.g.
    the first 10% of training). ``tdds_window``: also score TDDS (Zhang et al. 2024): per epoch the
    change of each sample's prediction, ``sum_c |p_t (log p_t - log p_{t-1})|``; per window of
    ``tdds_window`` epochs the spread of those changes (their deviation from the window's mean,
    L2), summed over windows with weights ``decay (1 - decay)^(age)`` (recent windows count most):
    memory one ``[N, C]`` of probabilities and ``[N]`` per epoch. ``scores(kind)`` is larger-is-harder
    for every kind (AUM negated; TDDS large = informative, kept by ``keep="hard"``).
    """

    KINDS = ("forgetting", "aum", "el2n", "tdds")

    def __init__(self, n_samples: int, num_classes: int, el2n_epochs=None, tdds_window: int | None = None,
                 tdds_decay: float = 0.9):
        self.n_samples = check_positive_int(n_samples, "n_samples")
        self.num_classes = check_positive_int(num_classes, "num_classes")
        if num_classes < 2:
            raise ValueError("num_classes must be at least 2: a margin needs another class")
        self.el2n_epochs = None if el2n_epochs is None else {int(e) for e in el2n_epochs}
        self.forgetting = ForgettingTracker(n_samples)
        self.margin_sum = torch.zeros(n_samples, dtype=torch.float64)
        self.presentations = torch.zeros(n_samples, dtype=torch.long)
        self._el2n_sum = torch.zeros(n_samples, dtype=torch.float64)  # over the recorded epochs
        self._el2n_count = torch.zeros(n_samples, dtype=torch.long)
        self._el2n_epoch: dict[int, torch.Tensor] = {}  # epoch -> [N] (NaN where not presented)
        self._epoch = 0
        self.tdds_window = None if tdds_window is None else check_positive_int(tdds_window, "tdds_window")
        if self.tdds_window is not None and self.tdds_window < 2:
            raise ValueError("tdds_window must be at least 2 epochs (a window holds changes between epochs)")
        if not 0.0 < float(tdds_decay) < 1.0:
            raise ValueError(f"tdds_decay must be in (0, 1), got {tdds_decay!r}")
        self.tdds_decay = float(tdds_decay)
        self._probs = {}  # epoch -> [N, C] probabilities at the epoch's last presentation (the last two kept)
        self._changes: list[torch.Tensor] = []  # [N] per closed pair of consecutive epochs

    def end_epoch(self) -> None:
        """Start the next epoch (for loops that do not pass ``epoch`` to :meth:`update`)."""
        self._set_epoch(self._epoch + 1)

    def _set_epoch(self, epoch: int) -> None:
        if epoch < self._epoch:
            raise ValueError(f"epoch went back from {self._epoch} to {epoch}: epochs must not decrease")
        if epoch != self._epoch and self.tdds_window is not None and self._epoch in self._probs:
            # close the finished epoch: its change from the one before (skipped epochs count as none)
            prev = self._probs.get(self._epoch - 1)
            if prev is not None:
                self._changes.append(_prediction_change(prev, self._probs[self._epoch]))
            self._probs = {self._epoch: self._probs[self._epoch]}
        self._epoch = epoch

    def update(self, indices, logits: torch.Tensor, labels, epoch: int | None = None) -> None:
        """Record one presentation of the samples ``indices [b]`` with their ``logits [b, C]``
        (detached here) and ``labels [b]``."""
        indices = torch.as_tensor(indices).long().flatten().cpu()
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must be [b, num_classes] = [{len(indices)}, {self.num_classes}], got {shape}")
        if logits.shape[0] != len(indices):
            raise ValueError(f"indices has {len(indices)} entries but logits has {logits.shape[0]} rows")
        labels = as_labels(labels, "labels", n=len(indices)).cpu()
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if epoch is not None:
            self._set_epoch(int(epoch))
        z = logits.detach().to(torch.float64).cpu()
        self.forgetting.update(indices, z.argmax(1) == labels)  # checks the indices too
        true = z.gather(1, labels.unsqueeze(1)).squeeze(1)
        other = z.scatter(1, labels.unsqueeze(1), float("-inf")).amax(1)
        self.margin_sum[indices] += true - other
        self.presentations[indices] += 1
        probs = F.softmax(z, dim=1)
        if self.el2n_epochs is None or self._epoch in self.el2n_epochs:
            err = (probs - F.one_hot(labels, self.num_classes).to(z.dtype)).norm(dim=1)
            row = self._el2n_epoch.setdefault(self._epoch, torch.full((self.n_samples,), float("nan"),
                                                                      dtype=torch.float64))
            row[indices] = err
            self._el2n_sum[indices] += err
            self._el2n_count[indices] += 1
        if self.tdds_window is not None:
            epoch_probs = self._probs.setdefault(self._epoch, torch.full((self.n_samples, self.num_classes),
                                                                         float("nan"), dtype=torch.float32))
            epoch_probs[indices] = probs.float()

    def aum(self) -> torch.Tensor:
        """``[N]`` area under the margin (low: mislabelled or ambiguous); NaN for samples never seen."""
        out = self.margin_sum / self.presentations.clamp_min(1)
        out[self.presentations == 0] = float("nan")
        return out

    def el2n(self, epoch: int | None = None) -> torch.Tensor:
        """``[N]`` EL2N at ``epoch``, or averaged over the recorded epochs (NaN where never recorded)."""
        if epoch is not None:
            if int(epoch) not in self._el2n_epoch:
                raise ValueError(f"no EL2N was recorded at epoch {epoch}; recorded: {sorted(self._el2n_epoch)}")
            return self._el2n_epoch[int(epoch)].clone()
        out = self._el2n_sum / self._el2n_count.clamp_min(1)
        out[self._el2n_count == 0] = float("nan")
        return out

    def tdds(self) -> torch.Tensor:
        """``[N]`` TDDS scores over the epochs seen so far (the current one included)."""
        if self.tdds_window is None:
            raise ValueError("TDDS was not recorded: pass tdds_window= (e.g. 10) to TrainingDynamics")
        changes = list(self._changes)
        prev, cur = self._probs.get(self._epoch - 1), self._probs.get(self._epoch)
        if prev is not None and cur is not None:
            changes.append(_prediction_change(prev, cur))
        W = self.tdds_window
        T = len(changes) + 1  # epochs
        if T < W:
            raise ValueError(f"TDDS with tdds_window={W} needs at least {W} epochs of consecutive records, "
                             f"got {T}")
        D = torch.stack(changes)  # [T - 1, N]
        score = torch.zeros(self.n_samples, dtype=torch.float64)
        for k in range(T - W + 1):
            window = D[k:k + W - 1]
            spread = (window - window.mean(0)).norm(dim=0)
            score += spread * self.tdds_decay * (1 - self.tdds_decay) ** (T - W - k)
        return score

    def scores(self, kind: str = "aum") -> torch.Tensor:
        """``[N]`` larger-is-harder scores for :func:`select`: forgetting counts, ``-aum``, EL2N or TDDS."""
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if kind == "forgetting":
            return self.forgetting.scores().double()
        if kind == "tdds":
            out = self.tdds()
            if torch.isnan(out).any():
                raise ValueError(f"{int(torch.isnan(out).sum())} samples miss a presentation in some epoch: TDDS "
                                 "compares every epoch with the one before")
            return out
        unseen = self.presentations == 0
        if unseen.any():
            raise ValueError(f"{int(unseen.sum())} samples were never presented (e.g. index "
                             f"{int(torch.nonzero(unseen)[0])}): their {kind} is undefined")
        return -self.aum() if kind == "aum" else self.el2n()


def _prediction_change(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """TDDS's change of prediction between two epochs: ``sum_c |p_t (log p_t - log p_{t-1})|`` per
    sample (``[N]`` float64; NaN where a sample was not presented in one of them)."""
    eps = 1e-8
    cur, prev = cur.double(), prev.double()
    return (cur * ((cur + eps).log() - (prev + eps).log())).abs().sum(1)
