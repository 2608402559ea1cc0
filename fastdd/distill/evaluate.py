"""The evaluation protocol of dataset distillation, and the coreset baselines at the same size.

``evaluate`` trains fresh models on a (synthetic or selected) set with a fixed schedule
and reports the test accuracy at the *final* epoch (never the best over test
evaluations), mean ± std over ``n_models``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import as_images, as_labels, as_samples, as_soft_labels, as_tensor, centred, check_positive_int, compute_dtype
from ..models import build, check_logits
from ..pruning.kmeans import assign, kmeans
from ..pruning.selection import herding
from ..train import accuracy
from .augment import DSA, DCAugment


def paper_augmentation(method: str | None, image_shape) -> DSA | DCAugment | None:
    """The augmentation the papers train evaluation models of a ``method``'s set with: DSA for
    DSA, DM and MTT sets; DC's crop/scale/rotate for DC sets of 1 x 28 x 28 images (the reference
    uses it on MNIST only); none for DD sets and for plain subsets (``method`` None)."""
    if method in ("dsa", "dm", "mtt"):
        return DSA()
    if method == "dc" and tuple(image_shape) == (1, 28, 28):
        return DCAugment()
    return None


def _augmentation(augment, method, image_shape):
    """``evaluate``'s ``augment`` argument resolved to an object with ``augment(x, gen)`` or None."""
    named = {"auto": lambda: paper_augmentation(method, image_shape), "dsa": DSA, "dc": DCAugment,
             "none": lambda: None}
    if isinstance(augment, str) and augment in named:
        augment = named[augment]()
    elif augment is not None and not callable(getattr(augment, "augment", None)):
        raise ValueError(f"augment must be 'auto', 'dsa', 'dc', 'none', None or an object with "
                         f"augment(x, generator), got {augment!r}")
    return augment


def evaluate(images, labels=None, X_test=None, y_test=None, model="convnet", n_models: int = 5,
             epochs: int | None = None, lr: float | None = None, batch_size: int = 256, augment="auto",
             seed: int = 0, model_options: dict | None = None, progress: bool = False) -> tuple[float, float]:
    """Final-epoch test accuracy of ``n_models`` fresh models trained on ``(images, labels)``, or on a
    :class:`~fastdd.distill.SyntheticSet`: ``evaluate(syn, X_test, y_test, ...)``.

    The papers' protocol by default. Schedule: SGD, momentum 0.9, weight decay 5e-4, ``lr``
    divided by 10 at half of ``epochs``; ``lr`` defaults to a synthetic set's learned lr (MTT, DD)
    and to 0.01 otherwise. ``augment``: ``"auto"`` (default) trains on a synthetic set with the
    augmentation its method's paper evaluates with (:func:`paper_augmentation`: DSA for DSA/DM/MTT,
    DC's for DC on MNIST-shaped images) and on plain tensors without; ``"dsa"``, ``"dc"``,
    ``"none"``/None, or an object with ``augment(x, generator) -> x`` (:class:`~fastdd.distill.DSA`,
    :class:`~fastdd.distill.augment.DCAugment`), applied to each training batch with fresh draws.
    ``epochs`` defaults to 1000 with augmentation and 300 without (the reference code's rule).
    ``labels``: class indices ``[n]`` or soft labels ``[n, num_classes]`` (class probabilities; the
    models train on them as cross-entropy targets); a synthetic set's ``soft_labels`` are used when
    it has them. ``model``: a zoo name or a callable returning a fresh ``nn.Module``. Returns ``(mean, std)``
    accuracy in [0, 1].
    """
    from .api import SyntheticSet

    method = None
    if isinstance(images, SyntheticSet):
        if y_test is None:  # evaluate(syn, X_test, y_test)
            X_test, y_test = labels, X_test
        method = images.method or None
        soft = images.soft_labels
        images, labels, learned = images.images.detach(), images.labels if soft is None else soft, images.lr
        if lr is None and learned is not None:
            lr = float(learned)
    if lr is None:
        lr = 0.01
    if labels is None or X_test is None or y_test is None:
        raise ValueError("evaluate needs (images, labels, X_test, y_test) or (synthetic_set, X_test, y_test)")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    images = as_images(images, "images")
    X_test = as_images(X_test, "X_test")
    if X_test.shape[1:] != images.shape[1:]:
        raise ValueError(f"X_test images are {tuple(X_test.shape[1:])}, the training images {tuple(images.shape[1:])}")
    labels = as_tensor(labels, "labels")
    soft = labels.dim() == 2
    if soft:  # class probabilities per image: the models train on them as targets
        labels = as_soft_labels(labels, "labels", n=len(images)).to(images)
    else:
        labels = as_labels(labels, "labels", n=len(images)).to(images.device)
    y_test = as_labels(y_test, "y_test", n=len(X_test)).to(X_test.device)
    n_models = check_positive_int(n_models, "n_models")
    augment = _augmentation(augment, method, tuple(images.shape[1:]))
    epochs = check_positive_int(epochs if epochs is not None else (300 if augment is None else 1000), "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    if soft:
        num_classes = labels.shape[1]
        if int(y_test.max()) >= num_classes:
            raise ValueError(f"y_test has class {int(y_test.max())}, but the soft labels cover {num_classes} classes")
    else:
        num_classes = int(max(labels.max(), y_test.max())) + 1
    accs = []
    runs = range(n_models)
    if progress:
        from tqdm import tqdm

        runs = tqdm(runs, desc="evaluating", unit="model")
    for r in runs:
        torch.manual_seed(seed + r)
        gen = torch.Generator().manual_seed(seed + r)
        net = build(model, images.shape[1], num_classes, tuple(images.shape[-2:]), model_options).to(images.device)
        if r == 0:
            check_logits(net, images[:2], num_classes, model)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2], gamma=0.1)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
                x = images[idx]
                if augment is not None:
                    x = augment.augment(x, gen)
                opt.zero_grad()
                F.cross_entropy(net(x), labels[idx]).backward()
                opt.step()
            sched.step()
        accs.append(accuracy(net, X_test, y_test))
    accs_t = torch.tensor(accs)
    return float(accs_t.mean()), float(accs_t.std()) if n_models > 1 else 0.0


def _per_class(y, ipc):
    y = as_labels(y, "y")
    check_positive_int(ipc, "ipc")
    classes = torch.unique(y)
    for c in classes.tolist():
        n = int((y == c).sum())
        if n < ipc:
            raise ValueError(f"ipc={ipc} is larger than class {c}, which has {n} samples")
    return y, classes


def _features(X, features):
    """Flattened selection features (default: the inputs) in the compute dtype (float64 stays float64)."""
    feats = as_samples(features if features is not None else X, "features" if features is not None else "X").flatten(1)
    return feats.to(compute_dtype(feats))


def random_subset(X, y, ipc: int, seed: int = 0) -> torch.Tensor:
    """``ipc`` random samples per class; sorted indices."""
    y, classes = _per_class(y, ipc)
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=gen)[:ipc]]
             for c in classes.tolist()]
    return torch.sort(torch.cat(picks)).values


def herding_subset(X, y, ipc: int, features: torch.Tensor | None = None) -> torch.Tensor:
    """Per class, the ``ipc`` samples that herding picks on ``features`` (default: flattened inputs)."""
    y, classes = _per_class(y, ipc)
    feats = _features(X, features)
    picks = []
    for c in classes.tolist():
        rows = torch.nonzero(y == c).flatten()
        picks.append(rows[herding(feats[rows], ipc)])
    return torch.sort(torch.cat(picks)).values


def kmeans_subset(X, y, ipc: int, features: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Per class, the real sample nearest to each of ``ipc`` k-means centroids."""
    y, classes = _per_class(y, ipc)
    feats = centred(_features(X, features))[0]  # assign() and cdist expand ||x - c||^2: centred, it cannot cancel
    picks = []
    for c in classes.tolist():
        rows = torch.nonzero(y == c).flatten()
        centroids, _ = kmeans(feats[rows], ipc, seed=seed)
        nearest, _ = assign(centroids, feats[rows])  # for each centroid, its nearest sample
        chosen = list(dict.fromkeys(nearest.tolist()))
        if len(chosen) < ipc:  # two centroids share a nearest sample: fill with the next-nearest unused
            d = torch.cdist(centroids, feats[rows])
            for j in d.min(0).values.argsort().tolist():
                if j not in chosen:
                    chosen.append(j)
                if len(chosen) == ipc:
                    break
        picks.append(rows[torch.tensor(chosen[:ipc])])
    return torch.sort(torch.cat(picks)).values
