"""``distill()``: one entry point for every method, with checkpoints, and the ``SyntheticSet`` it returns."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch

from .. import _checkpoint
from .augment import DSA
from .dc import GradientMatching
from .dd import MetaLearning
from .dm import DistributionMatching
from .mtt import TrajectoryMatching, train_experts

METHODS = ("dd", "dc", "dsa", "dm", "mtt")
DEFAULT_ITERATIONS = {"dd": 200, "dc": 200, "dsa": 200, "dm": 200, "mtt": 200}


@dataclass
class SyntheticSet:
    """A distilled set: ``images [C*ipc, ...]``, ``labels [C*ipc]`` and, for DD and MTT, the learned lr."""

    images: torch.Tensor
    labels: torch.Tensor
    lr: float | None = None
    method: str = ""
    ipc: int = 0
    info: dict = field(default_factory=dict)

    def save(self, path: str) -> None:
        _checkpoint.save(path, {"identity": {"kind": "SyntheticSet"}, "images": self.images, "labels": self.labels,
                                "lr": self.lr, "method": self.method, "ipc": self.ipc, "info": self.info})

    @classmethod
    def load(cls, path: str) -> "SyntheticSet":
        if not os.path.exists(path):
            raise FileNotFoundError(f"no synthetic set at {path}")
        s = _checkpoint.load(path, {"kind": "SyntheticSet"})
        return cls(s["images"], s["labels"], s["lr"], s["method"], s["ipc"], s["info"])


CLASSES = {"dd": MetaLearning, "dc": GradientMatching, "dsa": GradientMatching, "dm": DistributionMatching,
           "mtt": TrajectoryMatching}


def method_options(method: str) -> list[str]:
    """The options ``distill(..., method, **options)`` takes for ``method`` (its class's keywords)."""
    params = inspect.signature(CLASSES[method].__init__).parameters
    names = [n for n in params if n not in ("self", "X", "y", "ipc", "model", "seed", "experts")]
    return names + (["experts", "expert_options"] if method == "mtt" else [])


def _make(method, X, y, ipc, model, seed, options):
    unknown = [k for k in options if k not in method_options(method)]
    if unknown:
        raise ValueError(f"method {method!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(method_options(method))}")
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


def distill(X: torch.Tensor, y, method: str, ipc: int, model: str = "convnet", iterations: int | None = None,
            seed: int = 0, checkpoint: str | None = None, checkpoint_every: int = 20, progress: bool = False,
            **options) -> SyntheticSet:
    """Distill ``(X [N, C, H, W], y [N])`` into ``ipc`` images per class with ``method``.

    Methods: ``"dd"`` (meta-learning), ``"dc"`` (gradient matching), ``"dsa"`` (gradient
    matching with differentiable siamese augmentation), ``"dm"`` (distribution matching),
    ``"mtt"`` (trajectory matching; pass ``experts=`` or let it train them, with
    ``expert_options=``). ``options`` go to the method's class (named after the papers:
    lr_img, outer_loop, inner_loop, syn_steps, expert_epochs, max_start_epoch, ...).
    With ``checkpoint`` the run saves its state every ``checkpoint_every`` iterations and a
    rerun resumes from it, ending where an uninterrupted run ends.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    iterations = iterations if iterations is not None else DEFAULT_ITERATIONS[method]
    engine = _make(method, X, y, ipc, model, seed, dict(options))
    identity = {"method": method, "ipc": ipc, "model": model, "seed": seed, "n": len(X)}
    state = _checkpoint.load(checkpoint, identity)
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
    return SyntheticSet(engine.images.detach().clone(), engine.labels.clone(), lr, method, ipc,
                        {"iterations": engine.iteration})
