"""Shared metrics, the digits data and the models."""
import pytest
import torch

from fastdd.data import load_digits, make_blobs_images
from fastdd.metrics import roc_auc
from fastdd.models import get_model


def test_roc_auc_matches_sklearn_with_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (200,), generator=gen).double()  # many ties
    labels = torch.rand(200, generator=gen) < 0.3
    assert abs(roc_auc(scores, labels) - sklearn_metrics.roc_auc_score(labels.numpy(), scores.numpy())) < 1e-12


def test_roc_auc_extremes_and_errors():
    labels = torch.tensor([0, 0, 1, 1]).bool()
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        roc_auc(torch.ones(3), torch.zeros(3).bool())


def test_digits_split_is_stratified_fixed_and_standardized():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)
    assert a.X_train.shape[1:] == (1, 8, 8) and len(a.y_train) + len(a.y_test) == 1797
    frac = torch.bincount(a.y_test, minlength=10).float() / torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=10)
    assert torch.all((frac - 0.25).abs() < 0.01)
    assert abs(a.X_train.mean().item()) < 1e-4 and abs(a.X_train.std().item() - 1) < 1e-3


@pytest.mark.parametrize("name", ["convnet", "mlp", "lenet"])
@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3)])
def test_models_take_their_inputs(name, size, channels):
    model = get_model(name, channels, 10, size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_get_model_rejects_unknown():
    with pytest.raises(ValueError, match="model must be one of convnet, convnetbn, mlp, lenet, alexnet"):
        get_model("resnet", 1, 10, 8)


def test_blobs_are_seeded():
    X1, y1 = make_blobs_images(50, seed=3)
    X2, y2 = make_blobs_images(50, seed=3)
    assert torch.equal(X1, X2) and torch.equal(y1, y2) and X1.shape == (50, 1, 8, 8)


def test_flops_per_sample_counts_a_linear_layer_exactly():
    from torch import nn

    from fastdd.cost import flops_per_sample, format_flops, training_flops

    model = nn.Linear(8, 4, bias=False)
    # forward x W^T: 2*8*4; backward: the weight gradient only (the input needs none): 2*8*4
    assert flops_per_sample(model, torch.randn(8)) == 4 * 8 * 4
    deeper = nn.Sequential(nn.Linear(8, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))
    # second layer: forward, weight gradient and input gradient (flows back to the first)
    assert flops_per_sample(deeper, torch.randn(8)) == 4 * 8 * 4 + 6 * 4 * 3
    assert training_flops(100, 3, 10) == 3000
    assert format_flops(2.5e12) == "2.5 TFLOP"
    assert model.weight.grad is None
