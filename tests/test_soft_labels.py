"""Soft labels: evaluation on class probabilities, a teacher's labels, and MTT's learned labels (DATM)."""
import pytest
import torch
from torch import nn

from conftest import assert_close
from fastdd.data import load_digits
from fastdd.distill import SyntheticSet, distill, evaluate, train_experts

EV = dict(model="mlp", n_models=1, epochs=30, augment="none")


def _blobs(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + (2 * y - 1).float().view(-1, 1, 1, 1)
    return X, y


def test_evaluate_trains_on_the_soft_labels():
    """One-hot probabilities train as the hard labels do; probabilities on the other class train the
    models to answer it (a method that ignored soft labels would score the same on both)."""
    X, y = _blobs()
    Xt, yt = _blobs(seed=1)
    one_hot = torch.nn.functional.one_hot(y, 2).float()
    hard = evaluate(X, y, Xt, yt, **EV)[0]
    assert hard > 0.95
    assert evaluate(X, one_hot, Xt, yt, **EV)[0] == pytest.approx(hard, abs=0.05)
    assert evaluate(X, one_hot.flip(1), Xt, yt, **EV)[0] < 0.05
    swapped = SyntheticSet(X, y, None, "mtt", 20, soft_labels=one_hot.flip(1))  # the set's soft labels win
    assert evaluate(swapped, Xt, yt, **EV)[0] < 0.05


def test_soft_labels_are_validated():
    X, y = _blobs()
    Xt, yt = _blobs(seed=1)
    p = torch.full((40, 2), 0.5)
    with pytest.raises(ValueError, match="row 0 sums to 1.5"):
        evaluate(X, torch.cat([p[:1] + 0.25, p[1:]]), Xt, yt, **EV)
    with pytest.raises(ValueError, match="finite and non-negative"):
        evaluate(X, torch.tensor([[1.5, -0.5]]).repeat(40, 1), Xt, yt, **EV)
    with pytest.raises(ValueError, match="labels has 39 rows, expected 40"):
        evaluate(X, p[:39], Xt, yt, **EV)
    with pytest.raises(ValueError, match="soft labels cover 2 classes"):
        evaluate(X, p, Xt, yt + 1, **EV)
    with pytest.raises(ValueError, match=r"class probabilities \[N, num_classes\]"):
        evaluate(X, torch.ones(40, 2, dtype=torch.long), Xt, yt, **EV)


def test_teacher_labels_and_a_round_trip(tmp_path):
    X, y = _blobs()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    syn = SyntheticSet(X[:6], y[:6], 0.02, "dm", 3)
    for T in (1.0, 3.0):
        soft = syn.with_teacher_labels(teacher, temperature=T).soft_labels
        with torch.no_grad():
            assert_close(soft, torch.softmax(teacher(X[:6]) / T, 1), atol=1e-6, rtol=1e-5, name="soft labels")
    assert (syn.with_teacher_labels(teacher, 1e6).soft_labels - 0.5).abs().max() < 1e-4  # hot: uniform
    labelled = syn.with_teacher_labels(teacher, 2.0)
    assert syn.soft_labels is None and labelled.info["soft_labels"] == "teacher, temperature 2"
    labelled.save(str(tmp_path / "s.pt"))
    back = SyntheticSet.load(str(tmp_path / "s.pt"))
    assert torch.equal(back.soft_labels, labelled.soft_labels) and torch.equal(back.labels, syn.labels)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        syn.with_teacher_labels(teacher, 0)
    with pytest.raises(ValueError, match="teacher must be an nn.Module"):
        syn.with_teacher_labels(lambda x: x, 1.0)
    with pytest.raises(ValueError, match=r"logits \[n, num_classes\] covering the set's 2 classes"):
        syn.with_teacher_labels(nn.Sequential(nn.Flatten(), nn.Linear(64, 1)), 1.0)


@pytest.fixture(scope="module")
def digits_experts():
    d = load_digits()
    experts = train_experts(d.X_train, d.y_train, n_experts=1, epochs=4, model_options=dict(width=16, depth=2),
                            batch_size=64)
    return d, experts


def test_mtt_learned_labels_through_distill_resume_exactly(digits_experts, tmp_path):
    d, experts = digits_experts
    kw = dict(experts=experts, model_options=dict(width=16, depth=2), syn_steps=3, expert_epochs=1,
              max_start_epoch=2, learn_labels=True, lr_label=50.0)
    full = distill(d.X_train, d.y_train, "mtt", 1, iterations=4, **kw)
    assert full.soft_labels.shape == (10, 10)
    assert_close(full.soft_labels.sum(1), torch.ones(10), atol=1e-5, rtol=0, name="rows")
    start = distill(d.X_train, d.y_train, "mtt", 1, iterations=0, **kw).soft_labels
    assert (full.soft_labels - start).abs().max() > 1e-3  # they learned
    ck = str(tmp_path / "ck.pt")
    distill(d.X_train, d.y_train, "mtt", 1, iterations=2, checkpoint=ck, **kw)
    resumed = distill(d.X_train, d.y_train, "mtt", 1, iterations=4, checkpoint=ck, **kw)
    assert torch.equal(resumed.soft_labels, full.soft_labels) and torch.equal(resumed.images, full.images)
    assert distill(d.X_train, d.y_train, "mtt", 1, iterations=1, **{**kw, "learn_labels": False}).soft_labels is None
    with pytest.raises(ValueError, match="learn_labels must be True or False"):
        distill(d.X_train, d.y_train, "mtt", 1, iterations=1, **{**kw, "learn_labels": 1})
