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


# ------------------------------------------------------------------ SemDeDup
def _with_planted_duplicates(n=300, copies=40, d=16, noise=1e-3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=gen, dtype=torch.float64) + 3.0  # uncentred, as raw embeddings are
    src = torch.randperm(n, generator=gen)[:copies]
    dups = base[src] + noise * torch.randn(copies, d, generator=gen, dtype=torch.float64)
    return torch.cat([base, dups]).to(dtype), src


def test_semdedup_removes_exactly_one_of_each_planted_pair():
    from fastdd.curation import semdedup

    E, src = _with_planted_duplicates()
    res = semdedup(E, eps=1e-4, n_clusters=8)
    removed = res.removed().tolist()
    assert len(removed) == len(src)
    for j, i in enumerate(src.tolist()):  # of each pair (i, 300 + j) exactly one goes
        pair = {i, 300 + j}
        assert len(pair & set(removed)) == 1
        gone = (pair & set(removed)).pop()
        assert int(res.duplicate_of[gone]) == (pair - {gone}).pop()
    assert sorted(res.kept().tolist() + removed) == list(range(len(E)))
    assert res.removed_fraction(1e-4) == pytest.approx(len(src) / len(E))


def test_semdedup_matches_brute_force_within_clusters():
    from fastdd.curation import semdedup

    E, _ = _with_planted_duplicates(n=120, copies=10, dtype=torch.float64)
    res = semdedup(E, n_clusters=5, order="easy", block=7)  # blocks that split clusters unevenly
    assert res.max_similarity.dtype == torch.float64
    U = torch.nn.functional.normalize(E, dim=1)
    for c in torch.unique(res.clusters).tolist():
        rows = torch.nonzero(res.clusters == c).flatten()
        # "easy": nearest the centroid first; each member's best earlier similarity, all pairs at once
        centroid = torch.nn.functional.normalize(U[rows].mean(0), dim=0)
        first = res.max_similarity[rows] == -float("inf")
        assert first.sum() == 1
        order = rows[torch.argsort(U[rows] @ centroid, descending=True, stable=True)]
        S = U[order] @ U[order].T
        expected = torch.tensor([S[:j, j].max() if j else -float("inf") for j in range(len(order))],
                                dtype=torch.float64)
        torch.testing.assert_close(res.max_similarity[order], expected)
    same = semdedup(E, n_clusters=5, order="easy", block=4096)
    torch.testing.assert_close(same.max_similarity, res.max_similarity)


def test_semdedup_keeps_the_point_farthest_from_the_centroid_by_default():
    from fastdd.curation import semdedup

    E, src = _with_planted_duplicates(copies=20)
    hard, easy = semdedup(E, eps=1e-4, n_clusters=8), semdedup(E, eps=1e-4, n_clusters=8, order="easy")
    assert len(hard.removed()) == len(easy.removed()) == 20
    assert not torch.equal(hard.removed(), easy.removed())  # the pair member kept differs by order


def test_semdedup_bad_input():
    from fastdd.curation import semdedup

    with pytest.raises(ValueError, match="all 5 rows are equal"):
        semdedup(torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"rows \[1\] are zero"):
        semdedup(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="order must be one of"):
        semdedup(torch.randn(10, 3), order="middle")
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        semdedup(torch.randn(10, 3), eps=-1)
    with pytest.raises(ValueError, match="n_clusters=20 is larger than the number of points"):
        semdedup(torch.randn(10, 3), n_clusters=20)
