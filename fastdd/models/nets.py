"""Models used across fastdd: the DC ConvNet, an MLP, LeNet, and the reference code's AlexNet, VGG11 and
ResNet18 (with BatchNorm variants) for 28x28 and 32x32 images of any channel count."""
from __future__ import annotations

import torch
from torch import nn

from .pool import AvgPool2x2


def _hw(image_size) -> tuple[int, int]:
    """``(H, W)`` of an ``image_size`` given as ``H = W`` or ``(H, W)``."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


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
        return AvgPool2x2()  # nn.AvgPool2d(2, 2), fast on a CPU
    if kind == "maxpooling":
        return nn.MaxPool2d(2, 2)
    if kind in ("none", None):
        return nn.Identity()
    raise ValueError(f"pooling must be 'avgpooling', 'maxpooling' or 'none', got {kind!r}")


def _norm_maps(h: int, w: int, depth: int, pooling) -> list[tuple[int, int]]:
    """The map size each block's norm layer sees."""
    sizes = []
    for _ in range(depth):
        sizes.append((h, w))
        if pooling not in ("none", None) and min(h, w) >= 2:
            h, w = h // 2, w // 2
    return sizes


def default_depth(h: int, w: int, pooling="avgpooling") -> int:
    """The ConvNet depth for ``h x w`` images: 3, or fewer so that every norm layer sees at least 4x4."""
    for depth in (3, 2):
        if min(min(s) for s in _norm_maps(h, w, depth, pooling)) >= 4:
            return depth
    return 1


def _check_norm_maps(h, w, depth, norm, pooling) -> None:
    if norm in ("none", None, "batchnorm"):
        return
    maps = list(enumerate(_norm_maps(h, w, depth, pooling), 1))
    for block, (mh, mw) in maps:
        if mh * mw == 1 and norm == "instancenorm":
            raise ValueError(f"ConvNet depth {depth} on {h}x{w} images puts block {block}'s instance norm on a 1x1 "
                             f"map, which maps every feature to its bias; use depth <= {default_depth(h, w, pooling)} "
                             "(the default for this size) or norm='none' / 'batchnorm'")
    for block, (mh, mw) in maps:
        if mh * mw < 8:
            import warnings

            warnings.warn(f"ConvNet depth {depth} on {h}x{w} images normalizes block {block} over a {mh}x{mw} map "
                          f"({mh * mw} values per statistic), which discards most of its signal; depth "
                          f"{default_depth(h, w, pooling)} is the default for this size", stacklevel=3)
            return


class _Classifier(nn.Module):
    """``features`` (images -> flat features ``[B, feature_dim]``) then a Linear ``classifier``."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features ``[B, feature_dim]`` before the classifier."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ConvNet(_Classifier):
    """The ConvNet of the dataset-condensation papers (Zhao et al. 2021).

    ``depth`` blocks of conv 3x3 (padding 1) -> norm -> ReLU -> pool 2, then a Linear
    classifier. Defaults: width 128, instance norm (GroupNorm(C, C)), average pooling, and the
    depth by image size: 3 (the papers' ConvNet-3) where every norm layer sees a map of at least
    4x4 (28x28, 32x32 and up), fewer blocks on smaller images (2 on 8x8 digits). A norm layer
    on a 1x1 map is refused for instance norm (it maps every feature to its bias) and warned
    about on a 2x2 map (4 values per statistic). Input ``[B, in_channels, H, W]``; pooling stops
    once the map is 1x1.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple = 32, width: int = 128,
                 depth: int | None = None, norm: str = "instancenorm", pooling: str = "avgpooling"):
        super().__init__()
        h, w = _hw(image_size)
        if depth is None:
            depth = default_depth(h, w, pooling)
        if min(h, w) < 1 or in_channels < 1 or num_classes < 1 or width < 1 or depth < 1:
            raise ValueError(f"ConvNet needs positive sizes, got in_channels={in_channels}, "
                             f"num_classes={num_classes}, image_size={image_size}, width={width}, depth={depth}")
        _check_norm_maps(h, w, depth, norm, pooling)
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
        return self.features(x).flatten(1)  # features keep the map (state_dicts of saved models)


class MLP(_Classifier):
    """Fully connected net: flatten -> (Linear -> ReLU) per hidden width -> Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (512, 256)):
        super().__init__()
        dims = [in_features, *hidden]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.classifier = nn.Linear(dims[-1], num_classes)


class LeNet(_Classifier):
    """LeNet-5 style: two conv 5x5 (padding 2) + max-pool blocks, then 120-84-classes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple = 28):
        super().__init__()
        h, w = _hw(image_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(84, num_classes)


def _first_padding(h: int, w: int, kernel: int, target: int) -> int:
    """Padding of the first conv that brings a smaller image (MNIST's 28x28) up to the ``target``
    size the reference architecture was built for (32x32), as the reference code pads MNIST."""
    if min(h, w) >= target:
        return kernel // 2
    return kernel // 2 + (target - min(h, w)) // 2


class AlexNet(_Classifier):
    """The dataset-condensation papers' AlexNet for 32x32 inputs (28x28 are padded up to 32 by the
    first conv): five convs 128-192-256-192-192 with ReLU and three max-pools, then a Linear.
    ``norm="batchnorm"`` is their AlexNetBN."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple = 32, norm: str = "none"):
        super().__init__()
        h, w = _hw(image_size)
        if min(h, w) < 8:
            raise ValueError(f"alexnet needs images of at least 8x8, got {h}x{w}")
        pad = _first_padding(h, w, 5, 32)
        widths = [(in_channels, 128, 5, pad), (128, 192, 5, 2), (192, 256, 3, 1), (256, 192, 3, 1), (192, 192, 3, 1)]
        layers = []
        for i, (cin, cout, k, p) in enumerate(widths):
            layers += [nn.Conv2d(cin, cout, k, padding=p), _norm(norm, cout), nn.ReLU(inplace=True)]
            if i in (0, 1, 4):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            self.feature_dim = self.features(torch.zeros(1, in_channels, h, w)).shape[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)


class VGG11(_Classifier):
    """VGG11 for 32x32 inputs (28x28 padded up by the first conv), with instance norm by default as
    in the dataset-condensation code (``norm="batchnorm"``: their VGG11BN), then a Linear on 512."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple = 32, norm: str = "instancenorm"):
        super().__init__()
        h, w = _hw(image_size)
        if min(h, w) < 16:
            raise ValueError(f"vgg11 needs images of at least 16x16, got {h}x{w}")
        layers, c, first = [], in_channels, True
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c, v, 3, padding=_first_padding(h, w, 3, 32) if first else 1), _norm(norm, v),
                       nn.ReLU(inplace=True)]
            c, first = v, False
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(_Classifier):
    """The CIFAR-style ResNet-18 of the dataset-condensation code: a 3x3 stem at full resolution,
    four stages of two basic blocks (64-128-256-512, stride 2 from the second), global average
    pooling and a Linear; instance norm by default (``norm="batchnorm"``: their ResNet18BN)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple = 32, norm: str = "instancenorm"):
        super().__init__()
        h, w = _hw(image_size)
        if min(h, w) < 8:
            raise ValueError(f"resnet18 needs images of at least 8x8, got {h}x{w}")
        stages, c = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages += [_BasicBlock(c, width, stride, norm), _BasicBlock(width, width, 1, norm)]
            c = width
        self.features = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), _norm(norm, 64),
                                      nn.ReLU(inplace=True), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)


# name -> (class, fixed options): the reference code's names, BatchNorm variants included
ZOO = {
    "convnet": (ConvNet, {}), "convnetbn": (ConvNet, {"norm": "batchnorm"}),
    "mlp": (None, {}), "lenet": (LeNet, {}),
    "alexnet": (AlexNet, {}), "alexnetbn": (AlexNet, {"norm": "batchnorm"}),
    "vgg11": (VGG11, {}), "vgg11bn": (VGG11, {"norm": "batchnorm"}),
    "resnet18": (ResNet18, {}), "resnet18bn": (ResNet18, {"norm": "batchnorm"}),
}


def get_model(name: str, in_channels: int, num_classes: int, image_size: int | tuple = 32, **options) -> nn.Module:
    """Build a model of :data:`ZOO` by name (``convnet``, ``convnetbn``, ``mlp``, ``lenet``,
    ``alexnet(bn)``, ``vgg11(bn)``, ``resnet18(bn)``) for ``[B, in_channels, H, W]`` inputs,
    ``image_size`` being ``H = W`` or ``(H, W)``; ``options`` go to its constructor."""
    key = name.lower()
    if key not in ZOO:
        raise ValueError(f"model must be one of {', '.join(ZOO)}, got {name!r}")
    h, w = _hw(image_size)
    cls, fixed = ZOO[key]
    if key == "mlp":
        return MLP(in_channels * h * w, num_classes, **options)
    if key == "lenet" and min(h, w) < 4:
        raise ValueError(f"lenet needs images of at least 4x4, got {h}x{w}")
    return cls(in_channels, num_classes, image_size, **{**fixed, **options})


def model_name(model) -> str:
    """A model argument in words: its name, or the callable's qualified name."""
    if isinstance(model, str):
        return model
    return f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__name__)}"


def model_identity(model, in_channels: int, num_classes: int, image_size) -> str:
    """What a checkpoint records of ``model``: a zoo name as it is; for a callable, its qualified name
    and a digest of the module tree it builds (layer types and sizes), so a resumed run refuses a
    checkpoint made with another architecture under the same name (two lambdas, an edited class)."""
    if isinstance(model, str):
        return model
    import hashlib

    with torch.random.fork_rng(devices=[]):
        net = build(model, in_channels, num_classes, image_size)
    shapes = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
    digest = hashlib.sha1((repr(net) + repr(shapes)).encode()).hexdigest()[:12]
    return f"{model_name(model)} [{digest}]"


def build(model, in_channels: int, num_classes: int, image_size, options: dict | None = None) -> nn.Module:
    """A fresh network from ``model``: a :data:`ZOO` name (with ``options``), or a callable
    returning a fresh ``nn.Module`` (the user's own architecture; ``options`` must then be empty)."""
    if isinstance(model, str):
        return get_model(model, in_channels, num_classes, image_size, **(options or {}))
    if not callable(model):
        raise ValueError(f"model must be a model name ({', '.join(ZOO)}) or a callable returning a fresh "
                         f"nn.Module, got {type(model).__name__}")
    if options:
        raise ValueError(f"model_options {sorted(options)} are for named models; a callable builds its own "
                         f"network ({model_name(model)})")
    net = model()
    if not isinstance(net, nn.Module):
        raise ValueError(f"the model callable {model_name(model)} returned a {type(net).__name__}, "
                         "not a torch.nn.Module")
    return net


def check_logits(net: nn.Module, x: torch.Tensor, num_classes: int, what) -> None:
    """Run ``net`` on ``x`` (no grad, RNG untouched) and refuse an output that is not ``[B, num_classes]``."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        out = net(x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {model_name(what)} must map [B, C, H, W] images to logits [B, num_classes] = "
                         f"[{x.shape[0]}, {num_classes}], got {got}")


def embedding_fn(net: nn.Module):
    """``f(x) -> [B, D]`` features of ``net`` before its classifier: ``net.embed`` where the model has
    one (the zoo's do), else the input of its last ``nn.Linear`` (captured by a forward pre-hook)."""
    if callable(getattr(net, "embed", None)):
        return net.embed
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(net).__name__} has no embed() method and no nn.Linear classifier: "
                         "distribution matching needs the features before the classifier")
    head = last[-1]

    def embed(x):
        seen = []
        handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            net(x)
        finally:
            handle.remove()
        return seen[-1].flatten(1)

    return embed
