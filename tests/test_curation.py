"""Quality filter: a few labelled examples teach it to rank the rest."""
import pytest
import torch

from fastdd.curation import QualityFilter
from fastdd.data import load_digits
from fastdd.metrics import roc_auc


def test_quality_filter_ranks_corrupted_digits_low():
    d = load_digits()
    X = d.X_train.flatten(1).clone()
    gen = torch.Generator().manual_seed(0)
    n = len(X)
    bad = torch.randperm(n, generator=gen)[: n // 5]
    X[bad] = X[bad][:, torch.randperm(64, generator=gen)]  # scrambled pixels: low quality
    high = torch.ones(n, dtype=torch.long)
    high[bad] = 0
    labelled = torch.randperm(n, generator=gen)[:60]  # a few labelled examples
    qf = QualityFilter().fit(X[labelled], high[labelled])
    rest = torch.ones(n, dtype=torch.bool)
    rest[labelled] = False
    scores = qf.score(X[rest])
    assert roc_auc(scores, high[rest].bool()) > 0.9
    keep = qf.select(X, 0.5)
    assert len(keep) == round(0.5 * n)
    assert high[keep].float().mean() > 0.97  # the kept half is nearly all high quality


def test_quality_filter_bad_input():
    with pytest.raises(ValueError, match="both high"):
        QualityFilter().fit(torch.randn(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="quality has 3 entries but embeddings has 4 rows"):
        QualityFilter().fit(torch.randn(4, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="call fit"):
        QualityFilter().score(torch.randn(2, 3))
    qf = QualityFilter().fit(torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="fitted on 3"):
        qf.score(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        qf.select(torch.randn(2, 3), 0.0)
