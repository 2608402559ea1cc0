"""The model zoo (the reference code's architectures for 28x28 and 32x32) and user model callables."""
import pytest
import torch
from torch import nn

from fastdd.distill import SyntheticSet, distill, evaluate
from fastdd.models import ZOO, get_model


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_zoo_maps_images_to_logits(name, channels, size):
    torch.manual_seed(0)
    net = get_model(name, channels, 10, size)
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert has_bn == name.endswith("bn")


def test_zoo_parameter_counts_match_the_reference_architectures():
    # the DC ConvNet on CIFAR-10 has 320k parameters, VGG11 9.2M, ResNet-18 11.2M
    counts = {n: sum(p.numel() for p in get_model(n, 3, 10, 32).parameters()) for n in ("convnet", "vgg11", "resnet18")}
    assert counts["convnet"] == 320_010
    assert 9.2e6 < counts["vgg11"] < 9.25e6 and 11.1e6 < counts["resnet18"] < 11.2e6


def test_get_model_bad_input():
    with pytest.raises(ValueError, match="model must be one of convnet, convnetbn"):
        get_model("transformer", 1, 10, 28)
    with pytest.raises(ValueError, match="vgg11 needs images of at least 16x16"):
        get_model("vgg11", 1, 10, 8)


def _blobs(n=40, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, 1, size, size, generator=g) * 0.5 + (2 * y - 1).float().view(-1, 1, 1, 1)
    return X, y


class _NoEmbed(nn.Module):
    """A user's architecture without fastdd's embed(): DM takes its last Linear layer's input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 16),
                                  nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("method", ["dm", "dc"])
def test_distill_and_evaluate_take_a_model_callable(method):
    X, y = _blobs()
    syn = distill(X, y, method, ipc=2, model=_NoEmbed, iterations=3)
    assert syn.images.shape == (4, 1, 8, 8)
    mean, _ = evaluate(syn, X, y, model=_NoEmbed, n_models=1, epochs=20)
    assert mean > 0.9  # two well separated blobs, from 2 images per class


def test_evaluate_trains_a_synthetic_set_with_its_learned_lr(monkeypatch):
    X, y = _blobs()
    seen = []
    real_sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda params, lr, **kw: seen.append(lr) or real_sgd(params, lr, **kw))
    syn = SyntheticSet(X[:4], y[:4], lr=0.037, method="mtt", ipc=2)
    evaluate(syn, X, y, model="mlp", n_models=1, epochs=2)
    evaluate(syn, X, y, model="mlp", n_models=1, epochs=2, lr=0.2)  # an explicit lr wins
    evaluate(SyntheticSet(X[:4], y[:4], method="dm", ipc=2), X, y, model="mlp", n_models=1, epochs=2)
    assert seen == [0.037, 0.2, 0.01]


def test_model_callable_bad_input():
    X, y = _blobs()
    with pytest.raises(ValueError, match="returned a str, not a torch.nn.Module"):
        distill(X, y, "dm", ipc=1, model=lambda: "convnet", iterations=1)
    with pytest.raises(ValueError, match=r"logits \[B, num_classes\] = \[1, 2\], got \(1, 5\)"):
        distill(X, y, "dm", ipc=1, model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), iterations=1)
    with pytest.raises(ValueError, match=r"logits \[B, num_classes\] = \[2, 2\], got \(2, 3\)"):
        evaluate(X[:4], y[:4], X, y, model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), n_models=1,
                 epochs=1)
    with pytest.raises(ValueError, match="model_options .* are for named models"):
        distill(X, y, "dm", ipc=1, model=_NoEmbed, iterations=1, model_options={"width": 8})
    with pytest.raises(ValueError, match="evaluate needs"):
        evaluate(X, y)


def test_a_checkpoint_of_another_architecture_under_the_same_name_is_refused(tmp_path):
    X, y = _blobs()
    ck = str(tmp_path / "ck.pt")
    small = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))  # noqa: E731
    distill(X, y, "dm", ipc=1, model=small, iterations=2, checkpoint=ck)
    wide = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))  # noqa: E731
    with pytest.raises(ValueError, match="model"):
        distill(X, y, "dm", ipc=1, model=wide, iterations=4, checkpoint=ck)
    assert distill(X, y, "dm", ipc=1, model=small, iterations=4, checkpoint=ck).info["iterations"] == 4
