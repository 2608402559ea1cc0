"""``distill()``: one entry point for every method, with checkpoints, and the ``SyntheticSet`` it returns."""
from __future__ import annotations

import inspect
import math
import numbers
import os
from dataclasses import dataclass, field

import torch

from .. import _checkpoint
from .._compile import check_compile
from .._validate import as_images, as_labels, check_positive_int
from ..models import model_identity
from .augment import DSA
from .dc import GradientMatching
from .dd import MetaLearning
from .dm import DistributionMatching
from .mtt import TrajectoryMatching, train_experts

METHODS = ("dd", "dc", "dsa", "dm", "mtt")
DEFAULT_ITERATIONS = {"dd": 200, "dc": 200, "dsa": 200, "dm": 200, "mtt": 200}


@dataclass
class SyntheticSet:
    """A distilled set: ``images [C*ipc, ...]``, ``labels [C*ipc]`` (each image's class) and, for DD
    and MTT, the learned lr. ``soft_labels [C*ipc, C]``: class probabilities the set trains with
    instead of ``labels`` when present (MTT with ``learn_labels=True``, or :meth:`with_teacher_labels`)."""

    images: torch.Tensor
    labels: torch.Tensor
    lr: float | None = None
    method: str = ""
    ipc: int = 0
    info: dict = field(default_factory=dict)
    soft_labels: torch.Tensor | None = None

    def save(self, path: str) -> None:
        """Write the set to ``path`` (plain tensors, numbers and strings; atomically)."""
        _checkpoint.save(path, {"identity": {"kind": "SyntheticSet"}, "images": self.images, "labels": self.labels,
                                "lr": self.lr, "method": self.method, "ipc": self.ipc, "info": self.info,
                                "soft_labels": self.soft_labels})

    def with_teacher_labels(self, teacher, temperature: float = 1.0, batch_size: int = 1024) -> "SyntheticSet":
        """A copy whose soft labels are ``softmax(teacher(images) / temperature)`` (the teacher in eval
        mode): the baseline a learned-label set is compared with, or soft labels for any set."""
        from ..train import predict

        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not isinstance(teacher, torch.nn.Module):
            raise ValueError(f"teacher must be an nn.Module mapping images to logits, got {type(teacher).__name__}")
        logits = predict(teacher, self.images.detach(), batch_size)
        if logits.dim() != 2 or logits.shape[1] <= int(self.labels.max()):
            raise ValueError(f"the teacher's output must be logits [n, num_classes] covering the set's "
                             f"{int(self.labels.max()) + 1} classes, got shape {tuple(logits.shape)}")
        soft = torch.softmax(logits.float() / temperature, dim=1).to(self.images.dtype)
        info = {**self.info, "soft_labels": f"teacher, temperature {temperature:g}"}
        return SyntheticSet(self.images, self.labels, self.lr, self.method, self.ipc, info, soft)

    def to_pixels(self, normalization=None) -> torch.Tensor:
        """The images in [0, 1] pixel space, undoing the standardization the real data had
        (``normalization``: a :class:`fastdd.data.Normalization` or its dict; default the one
        recorded in ``info["normalization"]``, which ``fastdd distill`` and ``Dataset`` loads set)."""
        from ..data import Normalization

        norm = normalization if normalization is not None else self.info.get("normalization")
        if norm is None:
            raise ValueError("this synthetic set records no normalization of its real data: pass "
                             "normalization= (e.g. fastdd.data.load(...).normalization)")
        if isinstance(norm, dict):
            norm = Normalization(norm["mean"], norm["std"])
        if self.images.dim() != 4 or self.images.shape[1] != len(norm.mean):
            raise ValueError(f"images of shape {tuple(self.images.shape)} do not match a normalization of "
                             f"{len(norm.mean)} channel(s)")
        return norm.to_pixels(self.images.detach().float())

    @classmethod
    def load(cls, path: str) -> "SyntheticSet":
        """The set saved at ``path``, read without running code (``weights_only``); a
        :class:`~fastdd._checkpoint.CheckpointError` (a ``ValueError``) names the file when it is
        missing, unreadable, or not a synthetic set."""
        if not os.path.lexists(path):
            raise FileNotFoundError(f"no synthetic set at {path}")
        s = _checkpoint.read(path, "synthetic set")
        if s["identity"].get("kind") != "SyntheticSet" or not {"images", "labels"} <= set(s):
            raise _checkpoint.CheckpointError(f"{path} is not a synthetic set (it is a "
                                              f"{s['identity'].get('method', 'other')} checkpoint)")
        return cls(s["images"], s["labels"], s.get("lr"), s.get("method", ""), s.get("ipc", 0), s.get("info", {}),
                   s.get("soft_labels"))


CLASSES = {"dd": MetaLearning, "dc": GradientMatching, "dsa": GradientMatching, "dm": DistributionMatching,
           "mtt": TrajectoryMatching}


def method_options(method: str) -> list[str]:
    """The options ``distill(..., method, **options)`` takes for ``method`` (its class's keywords)."""
    params = inspect.signature(CLASSES[method].__init__).parameters
    names = [n for n in params if n not in ("self", "X", "y", "ipc", "model", "seed", "experts")]
    return names + (["experts", "expert_options"] if method == "mtt" else [])


def _number(low=None, high=None, low_open=False, high_open=False, integer=False, none_ok=False):
    """A checker for a numeric option: ``check(name, value)`` raises a ValueError naming it."""
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    want = f"{kind}{' ' + ' and '.join(bounds) if bounds else ''}{' or None' if none_ok else ''}"

    def check(name, value):
        if value is None and none_ok:
            return
        ok = not isinstance(value, bool) and isinstance(value, numbers.Integral if integer else numbers.Real)
        ok = ok and math.isfinite(float(value))
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value!r}")
    return check


def _of_type(types, what):
    def check(name, value):
        if not isinstance(value, types):
            raise ValueError(f"{name} must be {what}, got {value!r}")
    return check


# what each method option may hold; checked up front by distill(), before any work
OPTION_CHECKS = {
    "lr_img": _number(0), "lr_net": _number(0), "lr_init": _number(0, low_open=True),
    "lr_lr": _number(0), "momentum": _number(0, 1, high_open=True), "weight_decay": _number(0),
    "gamma": _number(0, low_open=True, none_ok=True), "batch_real": _number(1, integer=True),
    "outer_loop": _number(1, integer=True, none_ok=True), "inner_loop": _number(0, integer=True, none_ok=True),
    "inner_steps": _number(1, integer=True), "syn_steps": _number(1, integer=True),
    "expert_epochs": _number(1, integer=True), "max_start_epoch": _number(0, integer=True),
    "max_unroll": _number(1, integer=True, none_ok=True), "init": _of_type((str,), "'real' or 'noise'"),
    "kernel": _of_type((str,), "a kernel name"), "metric": _of_type((str,), "a metric name"),
    "low_memory": _of_type((bool,), "True or False"), "fixed_init": _of_type((bool,), "True or False"),
    "learn_labels": _of_type((bool,), "True or False"), "lr_label": _number(0),
    "model_options": _of_type((dict, type(None)), "a dict of model keywords"),
    "dsa": _of_type((DSA, type(None)), "a fastdd.distill.augment.DSA or None"),
    "expert_options": _of_type((dict,), "a dict of train_experts keywords"),
    "experts": _of_type((list, tuple), "a list of expert trajectories [epochs + 1, P]"),
    "compile": lambda name, value: check_compile(value, name),
}


def check_options(method: str, options: dict) -> None:
    """Refuse an option ``method`` does not take, or a value of the wrong type or range, naming it
    (what ``distill`` checks before any work; the CLI checks ``--set`` with it before reading data)."""
    unknown = [k for k in options if k not in method_options(method)]
    if unknown:
        raise ValueError(f"method {method!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(method_options(method))}")
    for name, value in options.items():
        if name in OPTION_CHECKS:
            OPTION_CHECKS[name](name, value)


def _resolved_options(method, options) -> dict:
    """Every option of the method's class with the value this run uses (given, else the default)."""
    params = inspect.signature(CLASSES[method].__init__).parameters
    resolved = {n: options.get(n, params[n].default) for n in method_options(method)
                if n in params and n != "experts"}
    resolved["model_options"] = resolved.get("model_options") or {}  # None and {} are one run
    resolved.pop("compile", None)  # how the steps run, not which run: a checkpoint resumes either way
    if method == "dsa" and "dsa" not in options:
        resolved["dsa"] = DSA()  # as _make sets it
    if method == "mtt":
        if options.get("experts") is not None:
            resolved["experts"] = options["experts"]
        else:  # trained here: what trains them is part of the run
            ep = inspect.signature(train_experts).parameters
            given = options.get("expert_options", {})
            resolved["expert_options"] = {n: given.get(n, p.default) for n, p in ep.items()
                                          if n not in ("X", "y", "model", "model_options", "seed", "progress")}
    return resolved


def _iterations(iterations, method) -> int:
    if iterations is None:
        return DEFAULT_ITERATIONS[method]
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    return int(iterations)


def _make(method, X, y, ipc, model, seed, options):
    if method == "dd":
        return MetaLearning(X, y, ipc, model=model, seed=seed, **options)
    if method in ("dc", "dsa"):
        if method == "dsa":
            options.setdefault("dsa", DSA())
        return GradientMatching(X, y, ipc, model=model, seed=seed, **options)
    if method == "dm":
        return DistributionMatching(X, y, ipc, model=model, seed=seed, **options)
    experts = options.pop("experts", None)
    expert_options = options.pop("expert_options", {})
    if experts is None:
        experts = train_experts(X, y, model=model, model_options=options.get("model_options"), seed=seed,
                                **expert_options)
    return TrajectoryMatching(X, y, ipc, experts, model=model, seed=seed, **options)


def distill(X: torch.Tensor, y, method: str, ipc: int, model="convnet", iterations: int | None = None,
            seed: int = 0, checkpoint: str | None = None, checkpoint_every: int = 20, progress: bool = False,
            **options) -> SyntheticSet:
    """Distill ``(X [N, C, H, W], y [N])`` into ``ipc`` images per class with ``method``.

    Methods: ``"dd"`` (meta-learning), ``"dc"`` (gradient matching), ``"dsa"`` (gradient
    matching with differentiable siamese augmentation), ``"dm"`` (distribution matching),
    ``"mtt"`` (trajectory matching; pass ``experts=`` or let it train them, with
    ``expert_options=``). ``options`` go to the method's class (named after the papers:
    lr_img, outer_loop, inner_loop, syn_steps, expert_epochs, max_start_epoch, ...).
    With ``checkpoint`` the run saves its state every ``checkpoint_every`` iterations and a
    rerun resumes from it, ending where an uninterrupted run ends. The run's identity is
    the method, ipc, model, seed, every option's value (defaults included) and a
    fingerprint of ``X`` and ``y``: a checkpoint that differs in any of them is refused,
    naming what differs, and so is one already past ``iterations``.

    ``model``: a name of :data:`fastdd.models.ZOO` (``model_options=`` its keywords) or a callable
    returning a fresh ``nn.Module`` mapping images to logits ``[B, num_classes]`` (your own
    architecture; a checkpoint's identity then holds its qualified name and a digest of the module
    tree it builds).

    ``X`` must be float32 images (numpy accepted), finite; ``y`` integer labels.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    X = as_images(X, "X")
    y = as_labels(y, "y", n=len(X))
    ipc = check_positive_int(ipc, "ipc")
    iterations = _iterations(iterations, method)
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    check_options(method, options)
    num_classes = int(y.max()) + 1
    identity = _checkpoint.fingerprint({"method": method, "ipc": ipc, "seed": seed,
                                        "model": model_identity(model, X.shape[1], num_classes, tuple(X.shape[-2:])),
                                        "X": X, "y": y,
                                        "options": _resolved_options(method, options)})
    state = _checkpoint.load(checkpoint, identity)
    if state is not None:
        _checkpoint.check_progress(checkpoint, state["engine"]["iteration"], iterations, "iterations")
    engine = _make(method, X, y, ipc, model, seed, dict(options))
    if state is not None:
        engine.load_state_dict(state["engine"])
    it = range(engine.iteration, iterations)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"distilling ({method}, ipc {ipc})", unit="it", initial=engine.iteration, total=iterations)
    for _ in it:
        last_good = engine.state_dict() if checkpoint else None
        try:
            engine.step()
        except FloatingPointError as exc:
            if checkpoint:
                _checkpoint.save(checkpoint, {"identity": identity, "engine": last_good})
            raise FloatingPointError(f"{exc}; the last good state is in {checkpoint}" if checkpoint else str(exc)) from exc
        if checkpoint and (engine.iteration % checkpoint_every == 0 or engine.iteration == iterations):
            _checkpoint.save(checkpoint, {"identity": identity, "engine": engine.state_dict()})
    lr = engine.lr if hasattr(engine, "lr") else None
    soft = getattr(engine, "soft_labels", None)  # a fresh tensor (the property computes it)
    return SyntheticSet(engine.images.detach().clone(), engine.labels.clone(), lr, method, ipc,
                        {"iterations": engine.iteration}, soft)
