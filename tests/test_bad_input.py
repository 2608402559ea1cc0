"""Bad input gets an error that names the argument and what was expected."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdd
from fastdd.models import ConvNet, MLP

from helpers import loop_per_sample_grads


@pytest.fixture
def mlp():
    return MLP(6, 3, hidden=(5,))


def test_batch_sizes_differ(mlp):
    with pytest.raises(ValueError, match="same batch size: inputs have 4"):
        fastdd.per_sample_grads(mlp, torch.randn(4, 6), torch.zeros(5, dtype=torch.long))


def test_loss_fn_not_per_sample(mlp):
    with pytest.raises(ValueError, match=r"loss_fn must return per-sample losses of shape \[B\] = \[4\]"):
        fastdd.per_sample_grads(mlp, torch.randn(4, 6), torch.zeros(4, dtype=torch.long),
                                loss_fn=lambda o, t: F.cross_entropy(o, t))


def test_default_loss_needs_logits():
    model = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="pass loss_fn"):
        fastdd.per_sample_grads(model, torch.randn(4, 2, 6), torch.zeros(4, dtype=torch.long))


def test_no_trainable_parameters(mlp):
    for p in mlp.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters selected"):
        fastdd.per_sample_grad_norms(mlp, torch.randn(4, 6), torch.zeros(4, dtype=torch.long))


def test_unknown_param_name(mlp):
    with pytest.raises(ValueError, match=r"\['nope.weight'\] are not parameters of the model"):
        fastdd.per_sample_grads(mlp, torch.randn(4, 6), torch.zeros(4, dtype=torch.long), params=["nope.weight"])


def test_frozen_param_named(mlp):
    mlp.classifier.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        fastdd.per_sample_grads(mlp, torch.randn(4, 6), torch.zeros(4, dtype=torch.long), params=["classifier.bias"])


def test_batchnorm_in_training_mode():
    model = ConvNet(1, 3, 8, width=4, depth=1, norm="batchnorm").train()
    x, y = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"BatchNorm2d 'features.1' .*training mode.*model.eval\(\) or use GroupNorm"):
        fastdd.per_sample_grad_norms(model, x, y)
    with pytest.raises(ValueError, match="batch statistics"):
        with fastdd.PerSampleGrads(model):
            model(x)
    model.eval()
    assert fastdd.per_sample_grad_norms(model, x, y).shape == (4,)


def test_vectors_validated(mlp):
    x, y = torch.randn(4, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"vectors\['classifier.weight'\] must be \[K, 3, 5\]"):
        fastdd.per_sample_grad_dots(mlp, x, y, {"classifier.weight": torch.randn(2, 5, 3)})
    with pytest.raises(ValueError, match="same K"):
        fastdd.per_sample_grad_dots(mlp, x, y, {"classifier.weight": torch.randn(2, 3, 5),
                                                "classifier.bias": torch.randn(3, 3)})
    with pytest.raises(ValueError, match="no parameter 'x'"):
        fastdd.per_sample_grad_dots(mlp, x, y, {"x": torch.randn(2, 3)})


def test_classwise_labels_validated(mlp):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fastdd.classwise_grads(mlp, x, torch.tensor([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        fastdd.classwise_grads(mlp, x, torch.tensor([0, 1, 2, 0]), num_classes=0)


def test_loss_reduction_validated(mlp):
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'sum'"):
        fastdd.PerSampleGrads(mlp, loss_reduction="batchmean")


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastdd.per_sample_grads(lambda x: x, torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_fallback_module_without_batch_dim_is_named():
    class Summary(nn.Module):  # returns a batch-level statistic: samples cannot be separated
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x * self.w).mean(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.summary = Summary()
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x + self.summary(x))

    with pytest.raises(ValueError, match="module 'summary' .*without the batch dimension"):
        fastdd.per_sample_grads(Net(), torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_inputs_on_another_device_are_named(mlp):
    x = torch.randn(4, 6, device="meta")  # any device but the parameters' (cpu here)
    with pytest.raises(ValueError, match=r"inputs are on meta but the model's parameters \(e.g. 'features.1.weight'\) "
                                         r"are on cpu"):
        fastdd.per_sample_grads(mlp, x, torch.zeros(4, dtype=torch.long))


def test_tuple_output_needs_a_loss_fn():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    model, x, y = TwoHeads(), torch.randn(4, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="the model returned tuple; pass loss_fn"):
        fastdd.per_sample_grads(model, x, y)
    g = fastdd.per_sample_grads(model, x, y, loss_fn=lambda o, t: F.cross_entropy(o[0], t, reduction="none"))
    assert g["a.weight"].shape == (4, 3, 6) and not g["b.weight"].any()  # the unused head gets zero


def test_a_parameter_shared_by_modules_of_different_kinds_sums_both_uses():
    """A language model's tied embedding and output head: one parameter, an Embedding and a Linear."""
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.emb(idx)).mean(1))

    torch.manual_seed(0)
    model, x, y = TiedLM(), torch.randint(0, 11, (5, 3)), torch.randint(0, 11, (5,))
    got = fastdd.per_sample_grads(model, x, y)["emb.weight"]
    torch.testing.assert_close(got, loop_per_sample_grads(model, x, y)["emb.weight"], atol=1e-6, rtol=1e-5)
    report = fastdd.grad.check(model, x, y)
    assert report.ok and report.params[0].path == "2 uses: rule (Embedding), rule (Linear)"
