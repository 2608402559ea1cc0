"""Real data sets the way users hold them: one loader for files, image folders and torch Datasets.

``load(source)`` takes

- a ``.npz`` / ``.pt`` file with ``X``, ``y`` (optional ``X_test``, ``y_test``) or ``X_train``,
  ``y_train``, ``X_test``, ``y_test`` (optional ``classes``: the class names);
- a folder in torchvision's ``ImageFolder`` layout, ``root/train/<class>/*.png|jpg|...`` and
  ``root/test/<class>/...``, or ``root/<class>/...`` (then a stratified fifth is held out), read
  with Pillow (``pip install pillow``);
- a map-style ``torch.utils.data.Dataset`` whose items are ``(image, label)`` (an image as a
  tensor, an array or a PIL image), e.g. ``torchvision.datasets.MNIST``; ``test=`` takes the test
  split in the same form.

uint8 images (``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``) are scaled to [0, 1] and
standardized per channel with the training split's statistics, which the returned
:class:`Dataset` records (``normalization``): ``to_pixels`` maps any tensor in that space (a
synthetic set, say) back to [0, 1] for showing. Floating data is used as given (float64 stays
float64). A set whose float32 copy would not fit in the memory available is refused, naming its size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .digits import stratified_split
from .files import DataFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class Normalization:
    """Per-channel ``mean`` and ``std`` (in [0, 1] pixel units) the images were standardized with."""

    mean: list
    std: list

    def _stats(self, X):
        """``(mean, std)`` shaped to broadcast over ``X [N, C, ...]``, in its dtype and device."""
        shape = (1, -1) + (1,) * (X.dim() - 2)
        return tuple(torch.tensor(v, dtype=X.dtype, device=X.device).view(shape) for v in (self.mean, self.std))

    def to_pixels(self, X: torch.Tensor) -> torch.Tensor:
        """``X [N, C, H, W]`` standardized -> [0, 1] pixels (clipped)."""
        mean, std = self._stats(X)
        return (X * std + mean).clamp(0, 1)

    def from_pixels(self, X: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the standardized space."""
        mean, std = self._stats(X)
        return (X - mean) / std

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass
class Dataset:
    """Train and test tensors (images ``[N, C, H, W]`` or features ``[N, D]``), integer labels, the
    class names and the normalization applied (None when the data was used as given)."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    classes: list = field(default_factory=list)
    normalization: Normalization | None = None
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_pixels(self, X: torch.Tensor) -> torch.Tensor:
        if self.normalization is None:
            raise ValueError(f"{self.source or 'this data set'} was used as given (not uint8 pixels): "
                             "there is no recorded normalization to undo")
        return self.normalization.to_pixels(X)

    def __repr__(self):
        shape = tuple(self.X_train.shape[1:])
        return (f"Dataset({self.source!r}: {len(self.y_train):,} train / {len(self.y_test):,} test, "
                f"{shape}, {self.num_classes} classes)")


def available_bytes() -> int:
    """Memory available to this process (``MemAvailable`` of /proc/meminfo, else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_fits(n: int, per_item: int, what: str, limit: int | None = None) -> None:
    need = 4 * n * per_item  # the float32 copy the library trains on
    limit = int(0.8 * available_bytes()) if limit is None else limit
    if need > limit:
        raise DataFileError(f"{what}: {n:,} items of {per_item:,} values take {need / 2**30:.1f} GiB as float32, "
                            f"more than the {limit / 2**30:.1f} GiB of memory available; use a subset "
                            "(a torch Dataset over part of it) or a machine with more memory")


def _channels_first(X: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 images in any common layout -> ``[N, C, H, W]``."""
    if X.dim() == 3:
        return X.unsqueeze(1)
    if X.dim() == 4:
        # grey or RGB channels first, else channels last (RGBA too), else 4 channels first
        if X.shape[1] in (1, 3):
            return X
        if X.shape[3] in (1, 3, 4):
            return X.permute(0, 3, 1, 2).contiguous()
        if X.shape[1] == 4:
            return X
        raise DataFileError(f"{what}: images of shape {tuple(X.shape[1:])} have no channel dim of 1, 3 or 4 "
                            "(expected [N, H, W], [N, H, W, C] or [N, C, H, W])")
    raise DataFileError(f"{what}: uint8 images must be [N, H, W], [N, H, W, C] or [N, C, H, W], "
                        f"got shape {tuple(X.shape)}")


def _standardize(X_train: torch.Tensor, X_test: torch.Tensor, what: str):
    """uint8 images -> float32 [0, 1] standardized per channel with the training statistics."""
    X_train, X_test = _channels_first(X_train, what), _channels_first(X_test, what)
    if X_train.shape[1:] != X_test.shape[1:]:
        raise DataFileError(f"{what}: test images {tuple(X_test.shape[1:])} differ from training images "
                            f"{tuple(X_train.shape[1:])}")
    C = X_train.shape[1]
    # statistics in float64 over a view per channel, without a float copy of the whole set
    flat = X_train.transpose(0, 1).reshape(C, -1)
    mean = torch.stack([row.double().mean() for row in flat]) / 255.0
    var = torch.stack([(row.double() / 255.0 - m).square().mean() for row, m in zip(flat, mean)])
    std = var.sqrt().clamp_min(1e-12)
    shape = (1, C, 1, 1)
    scale = (1.0 / (255.0 * std)).float().view(shape)
    shift = (mean / std).float().view(shape)

    def apply(X):
        out = torch.empty(X.shape, dtype=torch.float32)
        for s in range(0, len(X), 8192):  # chunks: no float64 temporary of the whole set
            torch.sub(X[s:s + 8192].float() * scale, shift, out=out[s:s + 8192])
        return out

    return apply(X_train), apply(X_test), Normalization(mean.tolist(), std.tolist())


def _as_labels(y, what: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
    if y.dim() != 1 or (y.dtype.is_floating_point and not torch.equal(y, y.round())) or y.dtype == torch.bool:
        raise DataFileError(f"{what}: labels must be integer class labels [N], got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    if len(y) and int(y.min()) < 0:
        raise DataFileError(f"{what}: labels are negative; use classes 0..C-1")
    return y


def _finish(X, y, Xt, yt, classes, what, test_fraction, seed, normalize) -> Dataset:
    """Split if needed, standardize uint8 images, check everything, name the classes."""
    y = _as_labels(y, what)
    if len(X) != len(y):
        raise DataFileError(f"{what}: {len(X)} images but {len(y)} labels")
    if len(y) == 0:
        raise DataFileError(f"{what}: no samples")
    if Xt is None:
        try:
            tr, te = stratified_split(y, test_fraction, seed)
        except ValueError as exc:
            raise DataFileError(f"{what}: {exc}") from None
        X, Xt, y, yt = X[tr], X[te], y[tr], y[te]
    else:
        yt = _as_labels(yt, what + " (test)")
        if len(Xt) != len(yt):
            raise DataFileError(f"{what}: {len(Xt)} test images but {len(yt)} test labels")
    norm = None
    if X.dtype == torch.uint8 and normalize:
        X, Xt, norm = _standardize(X, Xt, what)
    else:
        if X.dim() == 3:
            X, Xt = X.unsqueeze(1), Xt.unsqueeze(1)
        X = X if X.dtype == torch.float64 else X.float()
        Xt = Xt.to(X.dtype)
        for name, t in (("X", X), ("X_test", Xt)):
            if not torch.isfinite(t).all():
                raise DataFileError(f"{what}: {name} has NaN or infinite values")
    if X.dim() not in (2, 4):
        raise DataFileError(f"{what}: images must be [N, C, H, W] / [N, H, W] or features [N, D], "
                            f"got {tuple(X.shape)}")
    num_classes = int(torch.cat([y, yt]).max()) + 1
    classes = [str(c) for c in classes] if classes is not None else [str(c) for c in range(num_classes)]
    if len(classes) < num_classes:
        raise DataFileError(f"{what}: {len(classes)} class names for labels up to {num_classes - 1}")
    return Dataset(X, y, Xt, yt, classes, norm, what)


def _load_file(path, test_fraction, seed, normalize) -> Dataset:
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        elif ext in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataFileError(f"{path}: expected a .npz or .pt file or an image folder, got {ext or 'no extension'}")
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise DataFileError(f"{path}: expected named arrays, found a {type(data).__name__}")
    keys = ("X_train", "y_train") if "X_train" in data else ("X", "y")
    if not set(keys) <= set(data):
        raise DataFileError(f"{path}: needs arrays named X and y (or X_train and y_train), found {sorted(data)}")
    if ("X_test" in data) != ("y_test" in data):
        raise DataFileError(f"{path}: give both X_test and y_test, or neither")

    def tensor(key):
        v = data[key]
        try:
            return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
        except Exception as exc:
            raise DataFileError(f"{path}: {key} is not a numeric array ({exc})") from exc

    X = tensor(keys[0])
    _check_fits(len(X) + (len(data["X_test"]) if "X_test" in data else 0), int(np.prod(X.shape[1:])), path)
    classes = [str(c) for c in np.asarray(data["classes"]).tolist()] if "classes" in data else None
    Xt, yt = (tensor("X_test"), tensor("y_test")) if "X_test" in data else (None, None)
    return _finish(X, tensor(keys[1]), Xt, yt, classes, path, test_fraction, seed, normalize)


def _image_files(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, f)))


def _read_folder(root, what, classes=None):
    """``(uint8 [N, H, W, C], labels, class names)`` of ``root/<class>/*``."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from exc
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not found:
        raise DataFileError(f"{what}: no class subfolders (expected {root}/<class>/<image files>, the ImageFolder "
                            "layout, with train/ and test/ splits or without)")
    classes = classes or found
    missing = [c for c in found if c not in classes]
    if missing:
        raise DataFileError(f"{what}: classes {missing} are not among the training classes {classes}")
    files = [(os.path.join(root, c, f), classes.index(c)) for c in found for f in _image_files(os.path.join(root, c))]
    if not files:
        raise DataFileError(f"{what}: the class subfolders {found[:5]} hold no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
    images, first = [], None
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
        except Exception as exc:
            raise DataFileError(f"{path}: cannot read this image ({type(exc).__name__}: {exc})") from exc
        if arr.dtype != np.uint8:
            raise DataFileError(f"{path}: {arr.dtype} pixels; fastdd reads 8-bit images (convert it to 8-bit)")
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if first is None:
            first = (path, arr.shape)
            _check_fits(len(files), int(np.prod(arr.shape)), what)
        elif arr.shape != first[1]:
            raise DataFileError(f"{what}: images differ in size or channels: {first[0]} is "
                                f"{first[1][1]}x{first[1][0]} with {first[1][2]} channel(s), {path} is "
                                f"{arr.shape[1]}x{arr.shape[0]} with {arr.shape[2]}; resize them to one shape")
        images.append(arr)
    X = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # files are H x W x C
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    return X, y, classes


def _load_folder(root, test_fraction, seed, normalize) -> Dataset:
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train):
        X, y, classes = _read_folder(train, train)
        Xt = yt = None
        if os.path.isdir(test):
            Xt, yt, _ = _read_folder(test, test, classes)
            if Xt.shape[1:] != X.shape[1:]:
                raise DataFileError(f"{root}: test images are {tuple(Xt.shape[1:])}, training images "
                                    f"{tuple(X.shape[1:])} (C, H, W)")
    else:
        X, y, classes = _read_folder(root, root)
        Xt = yt = None
    return _finish(X, y, Xt, yt, classes, root, test_fraction, seed, normalize)


def _item_image(img, what, i):
    if isinstance(img, torch.Tensor):
        return img
    if isinstance(img, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(img))
    if hasattr(img, "mode") and hasattr(img, "size"):  # a PIL image: H x W (x C) -> C x H x W
        arr = np.array(img)
        return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
    raise DataFileError(f"{what}: item {i}'s image is a {type(img).__name__}; expected a tensor, an array or a "
                        "PIL image")


def _read_dataset(ds, what):
    try:
        n = len(ds)
    except TypeError:
        raise DataFileError(f"{what}: a map-style torch Dataset (with __len__ and __getitem__) is needed; "
                            f"{type(ds).__name__} has no length (an IterableDataset?)") from None
    if n == 0:
        raise DataFileError(f"{what}: the Dataset is empty")
    images, labels, first = [], [], None
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataFileError(f"{what}: item {i} is a {type(item).__name__}"
                                f"{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}; "
                                "expected (image, label)")
        img, label = item
        img = _item_image(img, what, i)
        if isinstance(label, torch.Tensor):
            label = label.item() if label.numel() == 1 else label
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            if isinstance(label, (float, np.floating)) and float(label).is_integer():
                label = int(label)
            else:
                raise DataFileError(f"{what}: item {i}'s label is {label!r} ({type(label).__name__}); "
                                    "labels must be integer class indices")
        if first is None:
            first = (img.shape, img.dtype)
            _check_fits(n, img.numel(), what)
        elif img.shape != first[0] or img.dtype != first[1]:
            raise DataFileError(f"{what}: item {i} is a {img.dtype} image of shape {tuple(img.shape)}, item 0 "
                                f"{first[1]} {tuple(first[0])}: every item must have one shape")
        images.append(img)
        labels.append(int(label))
    X = torch.stack(images)
    if X.dtype != torch.uint8 and X.dim() == 4 and X.shape[1] not in (1, 3, 4) and X.shape[3] in (1, 3, 4):
        X = X.permute(0, 3, 1, 2).contiguous()
    classes = list(getattr(ds, "classes", []) or []) or None
    return X, torch.tensor(labels, dtype=torch.long), classes


def load(source, test=None, test_fraction: float = 0.2, seed: int = 0, normalize: bool = True) -> Dataset:
    """A :class:`Dataset` from a file, an image folder or a torch Dataset (see the module doc).

    Args:
        source: a path (``.npz`` / ``.pt`` file, or an ``ImageFolder``-layout folder) or a map-style
            ``torch.utils.data.Dataset`` of ``(image, label)``.
        test: the test split as a torch Dataset, when ``source`` is one (files and folders carry
            their own); without a test split a stratified ``test_fraction`` is held out.
        normalize: scale uint8 images to [0, 1] and standardize them per channel (training
            statistics, recorded); ``False`` keeps the raw values (as float32).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if test is not None:
            raise ValueError("test= is for torch Datasets; a file or folder carries its own test split")
        if os.path.isdir(path):
            return _load_folder(path, test_fraction, seed, normalize)
        if not os.path.isfile(path):
            raise DataFileError(f"{path}: no such file or folder")
        return _load_file(path, test_fraction, seed, normalize)
    if hasattr(source, "__getitem__"):
        what = type(source).__name__
        X, y, classes = _read_dataset(source, what)
        Xt = yt = None
        if test is not None:
            Xt, yt, _ = _read_dataset(test, f"{type(test).__name__} (test)")
        return _finish(X, y, Xt, yt, classes, what, test_fraction, seed, normalize)
    raise ValueError(f"source must be a path or a torch Dataset of (image, label), got {type(source).__name__}")
