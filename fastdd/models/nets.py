"""Models used across fastdd: the DC ConvNet, an MLP and LeNet."""
from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":  # DC's instance norm: GroupNorm with one channel per group
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(min(32, channels), channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind in ("none", None):
        return nn.Identity()
    raise ValueError(f"norm must be 'instancenorm', 'groupnorm', 'batchnorm' or 'none', got {kind!r}")


def _pool(kind: str) -> nn.Module:
    if kind == "avgpooling":
        return nn.AvgPool2d(2, 2)
    if kind == "maxpooling":
        return nn.MaxPool2d(2, 2)
    if kind in ("none", None):
        return nn.Identity()
    raise ValueError(f"pooling must be 'avgpooling', 'maxpooling' or 'none', got {kind!r}")


class ConvNet(nn.Module):
    """The ConvNet of the dataset-condensation papers (Zhao et al. 2021).

    ``depth`` blocks of conv 3x3 (padding 1) -> norm -> ReLU -> pool 2, then a Linear
    classifier. Defaults: width 128, depth 3, instance norm (GroupNorm(C, C)), average
    pooling. Input ``[B, in_channels, H, W]``; pooling stops once the map is 1x1, so
    8x8 digits, 28x28 and 32x32 inputs all work.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple = 32, width: int = 128,
                 depth: int = 3, norm: str = "instancenorm", pooling: str = "avgpooling"):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if min(h, w) < 1 or in_channels < 1 or num_classes < 1 or width < 1 or depth < 1:
            raise ValueError(f"ConvNet needs positive sizes, got in_channels={in_channels}, "
                             f"num_classes={num_classes}, image_size={image_size}, width={width}, depth={depth}")
        layers, c = [], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True)]
            if pooling not in ("none", None) and min(h, w) >= 2:
                layers.append(_pool(pooling))
                h, w = h // 2, w // 2
            c = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features ``[B, feature_dim]`` before the classifier."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    """Fully connected net: flatten -> (Linear -> ReLU) per hidden width -> Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (512, 256)):
        super().__init__()
        dims = [in_features, *hidden]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.classifier = nn.Linear(dims[-1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """LeNet-5 style: two conv 5x5 (padding 2) + max-pool blocks, then 120-84-classes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple = 28):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x):
        return self.features(x)

    def forward(self, x):
        return self.classifier(self.embed(x))


def get_model(name: str, in_channels: int, num_classes: int, image_size: int | tuple = 32, **options) -> nn.Module:
    """Build ``"convnet"``, ``"mlp"`` or ``"lenet"`` for ``[B, in_channels, H, W]`` inputs,
    ``image_size`` being ``H = W`` or ``(H, W)``."""
    name = name.lower()
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if name == "convnet":
        return ConvNet(in_channels, num_classes, image_size, **options)
    if name == "mlp":
        return MLP(in_channels * h * w, num_classes, **options)
    if name == "lenet":
        if min(h, w) < 4:
            raise ValueError(f"lenet needs images of at least 4x4, got {h}x{w}")
        return LeNet(in_channels, num_classes, image_size, **options)
    raise ValueError(f"model must be 'convnet', 'mlp' or 'lenet', got {name!r}")
