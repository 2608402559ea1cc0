"""Pruning: k-means, prototype scores, selection, GraNd, EL2N, forgetting, pruning curves."""

import math

import pytest
import torch

import fastdd
from fastdd.data import load_digits
from fastdd.metrics import roc_auc
from fastdd.models import MLP
from fastdd.pruning import (ForgettingTracker, el2n_scores, grand_scores, herding, kcenter_greedy, kmeans,
                            prototype_scores, pruning_curve, recommend_keep, select, self_supervised_embeddings)
from conftest import assert_close
from helpers import flat_sq_norms, vmap_per_sample_grads


def blobs(n=600, d=5, centers=6, seed=0, spread=0.5):
    gen = torch.Generator().manual_seed(seed)
    C = torch.randn(centers, d, generator=gen) * 5
    lab = torch.randint(0, centers, (n,), generator=gen)
    return C[lab] + spread * torch.randn(n, d, generator=gen), lab


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _corrupt(n, fraction=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bad = torch.randperm(n, generator=gen)[: int(fraction * n)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[bad] = True
    return bad, mask, gen


# ------------------------------------------------------------------ k-means
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_objective_never_increases(metric):
    X, _ = blobs(800, centers=8, spread=2.0)
    res = kmeans(X, 8, metric=metric, n_init=1, max_iter=50, tol=0.0, track_history=True)
    hist = torch.tensor(res.history, dtype=torch.float64)
    assert len(hist) > 2
    assert torch.all(hist[1:] <= hist[:-1] * (1 + 1e-6) + 1e-6), hist


def test_kmeans_matches_sklearn_objective():
    cluster = pytest.importorskip("sklearn.cluster")
    X, _ = blobs(2000, d=8, centers=10, spread=1.5)
    ours = kmeans(X, 10, n_init=3, seed=0)
    theirs = cluster.KMeans(10, n_init=3, random_state=0).fit(X.numpy())
    assert ours.objective <= theirs.inertia_ * 1.01, (ours.objective, theirs.inertia_)
    assert abs(ours.objective - theirs.inertia_) / theirs.inertia_ < 0.01


def test_kmeans_returns_centroids_and_assignments():
    X, _ = blobs(50)
    centroids, assignments = kmeans(X, 3)
    assert centroids.shape == (3, X.shape[1]) and assignments.shape == (50,)
    assert assignments.min() >= 0 and assignments.max() < 3


def _plain_lloyd(X, C, iters):
    for _ in range(iters):
        labels = torch.cdist(X.double(), C.double()).argmin(1)
        for c in range(len(C)):
            if (labels == c).any():
                C[c] = X[labels == c].mean(0)
    return C, torch.cdist(X.double(), C.double()).argmin(1)


def test_hamerly_bounds_give_plain_lloyd_assignments():
    from fastdd.pruning.kmeans import _kmeanspp, _lloyd

    X, _ = blobs(2000, d=6, centers=12, spread=2.5, seed=4)  # overlapping blobs: points do switch
    C0 = _kmeanspp(X, 12, torch.Generator().manual_seed(0), None)
    C_ref, labels_ref = _plain_lloyd(X, C0.clone(), 15)
    C, labels, _, _ = _lloyd(X, C0.clone(), X.square().sum(1), 15, 0.0, "euclidean", None, False)
    assert torch.equal(labels, labels_ref)
    assert_close(C, C_ref, atol=1e-4, rtol=1e-4, name="centroids")


def test_kmeans_chunked_assignment_is_identical():
    X, _ = blobs(300)
    a = kmeans(X, 6, seed=1)
    b = kmeans(X, 6, seed=1, chunk_size=7)
    assert torch.equal(a.assignments, b.assignments)
    assert_close(a.centroids, b.centroids, atol=1e-5, rtol=1e-5, name="centroids")


def test_kmeans_bad_input():
    X, _ = blobs(10)
    with pytest.raises(ValueError, match="k=11 is larger than the number of points"):
        kmeans(X, 11)
    X[3, 2] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN or inf.*first rows \\[3\\]"):
        kmeans(X, 2)
    with pytest.raises(ValueError, match="metric must be"):
        kmeans(torch.randn(5, 2), 2, metric="manhattan")


# ------------------------------------------------------------------ prototype scores
def test_prototype_scores_refuse_identical_embeddings():
    with pytest.raises(ValueError, match="all 6 rows are equal"):
        prototype_scores(torch.ones(6, 4), n_clusters=2)


def test_prototype_scores_outliers_are_hard():
    X, _ = blobs(500)
    gen = torch.Generator().manual_seed(3)
    outliers = torch.randn(25, X.shape[1], generator=gen) * 20  # far from every cluster
    E = torch.cat([X, outliers])
    mask = torch.zeros(len(E), dtype=torch.bool)
    mask[-25:] = True
    assert roc_auc(prototype_scores(E, 6), mask) > 0.9


def test_prototype_scores_flag_corrupted_digits(digits):
    X = digits.X_train.clone()
    bad, mask, gen = _corrupt(len(X))
    X[bad] = X[bad] + 1.5 * torch.randn(X[bad].shape, generator=gen)  # heavy pixel noise
    auc = roc_auc(prototype_scores(X.flatten(1), 10), mask)
    assert auc >= 0.8, auc


def test_prototype_scores_flag_mislabelled_digits_on_ssl_embeddings(digits):
    bad, mask, gen = _corrupt(len(digits.y_train), seed=1)
    y = digits.y_train.clone()
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=gen)) % 10
    E = self_supervised_embeddings(digits.X_train, epochs=8)
    auc = roc_auc(prototype_scores(E, 1, labels=y), mask)
    assert auc >= 0.8, auc


def test_self_supervised_embeddings_group_classes(digits):
    E = torch.nn.functional.normalize(self_supervised_embeddings(digits.X_train, epochs=5), dim=1)
    sim = E @ E.T
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(1)
    acc = (digits.y_train[nearest] == digits.y_train).float().mean().item()
    assert acc > 0.8, acc  # no labels were used; chance is 0.1


# ------------------------------------------------------------------ selection
@pytest.mark.parametrize("keep", ["hard", "easy", "random", "ccs", "moderate"])
@pytest.mark.parametrize("fraction", [0.1, 0.37, 1.0])
def test_select_exact_fraction_balance_and_determinism(keep, fraction):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(1000) % 10
    scores = torch.rand(1000, generator=gen)
    idx = select(scores, fraction, keep=keep, labels=labels, seed=5)
    assert len(idx) == round(fraction * 1000)
    assert len(torch.unique(idx)) == len(idx)
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.max() - counts.min() <= 1  # exact balance up to the remainder
    assert torch.equal(idx, select(scores, fraction, keep=keep, labels=labels, seed=5))
    if keep in ("hard", "easy") and fraction < 1:
        for c in range(10):  # within each class: all kept are harder (easier) than all dropped
            rows = torch.nonzero(labels == c).flatten()
            kept = torch.isin(rows, idx)
            if keep == "hard":
                assert scores[rows[kept]].min() >= scores[rows[~kept]].max()
            else:
                assert scores[rows[kept]].max() <= scores[rows[~kept]].min()


def test_select_without_labels_takes_global_extremes():
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert select(scores, 0.4, keep="hard").tolist() == [0, 2]
    assert select(scores, 0.4, keep="easy").tolist() == [1, 3]


def test_select_small_class_keeps_all_and_warns():
    labels = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    scores = torch.rand(103)
    with pytest.warns(UserWarning, match=r"classes \[0\] have fewer points \(\[3\]\)"):
        idx = select(scores, 0.5, keep="hard", labels=labels)
    counts = torch.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [3, 24, 25] or counts.tolist() == [3, 25, 24]
    assert len(idx) == round(0.5 * 103)


def test_select_bad_input():
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        select(torch.rand(5), 0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        select(torch.rand(5), 1.5)
    with pytest.raises(ValueError, match="labels has 4 entries, expected 5"):
        select(torch.rand(5), 0.5, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="scores contains NaN"):
        select(torch.tensor([1.0, float("nan")]), 0.5)


def test_ccs_fills_strata_evenly_and_never_keeps_the_cut():
    scores = torch.arange(1000, dtype=torch.float64)  # uniform: 10 strata of 100 points each
    idx = select(scores, 0.1, keep="ccs", strata=10, hard_cutoff=0.0)
    assert torch.bincount((scores[idx] // 100).long(), minlength=10).tolist() == [10] * 10
    # the hardest 30% are dropped first; the budget spreads over the rest evenly
    idx = select(scores, 0.1, keep="ccs", strata=7, hard_cutoff=0.3)
    assert len(idx) == 100 and scores[idx].max() < 700
    assert torch.bincount((scores[idx] // 100).long(), minlength=7).tolist() == [14, 14, 14, 14, 14, 15, 15] or \
        sorted(torch.bincount((scores[idx] // 100).long(), minlength=7).tolist()) == [14] * 5 + [15] * 2


def test_ccs_small_stratum_keeps_all_and_passes_its_share_on():
    # 95 easy points in [0, 1) and 5 hard ones in [9, 10): with two strata the small one keeps all 5
    gen = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.rand(95, generator=gen), 9 + torch.rand(5, generator=gen)])
    idx = select(scores, 0.2, keep="ccs", strata=2, hard_cutoff=0.0)
    assert len(idx) == 20 and set(range(95, 100)) <= set(idx.tolist())
    # score-only "hard" would take those 5 plus 15 of the easiest's top; "easy" none of them
    assert not set(range(95, 100)) & set(select(scores, 0.2, keep="easy").tolist())


def test_ccs_cuts_nothing_by_default_and_the_papers_cifar_cut_on_request():
    from fastdd.pruning.selection import ccs_hard_cutoff

    assert ccs_hard_cutoff(0.3) == 0.0 and ccs_hard_cutoff(0.9) == pytest.approx(0.3)
    scores = torch.arange(1000, dtype=torch.float64)
    assert select(scores, 0.1, keep="ccs", strata=10).max() >= 900  # coverage reaches the hardest stratum
    assert select(scores, 0.1, keep="ccs", hard_cutoff=ccs_hard_cutoff(0.9)).max() < 700  # the hardest 30% cut


def test_moderate_keeps_the_scores_nearest_the_class_median():
    scores = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 101, 102, 103, 104])
    labels = torch.tensor([0] * 11 + [1] * 5)
    assert select(scores[:11], 3 / 11, keep="moderate").tolist() == [4, 5, 6]
    idx = select(scores, 0.25, keep="moderate", labels=labels)  # 2 per class
    assert set(idx.tolist()) <= {4, 5, 6, 12, 13, 14} and 13 in idx.tolist()


@pytest.mark.parametrize("keep", ["hard", "ccs", "moderate"])
def test_select_says_equal_scores_fall_back_to_random(keep):
    with pytest.warns(UserWarning, match="all 50 scores are equal .* falls back to a seeded random subset"):
        idx = select(torch.ones(50), 0.2, keep=keep, seed=3)
    assert len(idx) == 10


def test_ccs_warns_for_a_class_smaller_than_the_strata():
    labels = torch.tensor([0] * 30 + [1] * 300)
    with pytest.warns(UserWarning, match=r"classes \[0\] have fewer points \(\[30\]\) than the 50 CCS strata"):
        idx = select(torch.rand(330), 0.1, keep="ccs", labels=labels)
    assert torch.bincount(labels[idx]).tolist() == [16, 17] or torch.bincount(labels[idx]).tolist() == [17, 16]


def test_ccs_bad_input():
    with pytest.raises(ValueError, match=r"hard_cutoff must be in \[0, 1\), got 1.0"):
        select(torch.rand(10), 0.5, keep="ccs", hard_cutoff=1.0)
    with pytest.raises(ValueError, match="hard_cutoff must be a non-negative number, got -0.1"):
        select(torch.rand(10), 0.5, keep="ccs", hard_cutoff=-0.1)
    with pytest.raises(ValueError, match="strata must be a positive integer, got 0"):
        select(torch.rand(10), 0.5, keep="ccs", strata=0)
    with pytest.raises(ValueError, match="keep must be one of 'hard', 'easy', 'random', 'ccs', 'moderate'"):
        select(torch.rand(10), 0.5, keep="middle")


# ------------------------------------------------------------------ the teacher-student phase transition
def test_phase_transition_in_the_teacher_student_perceptron():
    from fastdd.pruning.theory import phase_diagram

    diagram = phase_diagram(d=30, alphas=(0.5, 24), fractions=(0.1, 0.5), n_seeds=10)
    adv = diagram.advantage()  # error(easy) - error(hard)
    assert adv[0, 0] < -0.05  # scarce data, heavy pruning: keeping the easy examples wins clearly
    assert adv[1, 1] > 0  # abundant data, little pruning: keeping the hard ones wins
    assert diagram.best()[0][0] == "easy" and diagram.best()[1][1] == "hard"
    assert diagram.crossover_alpha() == [None, 24]
    full = phase_diagram(d=30, alphas=(24,), fractions=(1.0,), n_seeds=10)
    # every policy keeps everything at f = 1: the same student (up to the order of its examples)
    assert float(full.errors["easy"][0, 0]) == pytest.approx(float(full.errors["hard"][0, 0]), abs=1e-9)
    assert float(full.errors["random"][0, 0]) == pytest.approx(float(full.errors["hard"][0, 0]), abs=1e-9)


def test_phase_diagram_bad_input():
    from fastdd.pruning.theory import phase_diagram

    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\], got 1.5"):
        phase_diagram(d=5, alphas=(1,), fractions=(1.5,))
    with pytest.raises(ValueError, match="alphas must be positive"):
        phase_diagram(d=5, alphas=(0,), fractions=(0.5,))


def test_recommend_keep_follows_the_theory_boundary_and_says_so():
    scarce = recommend_keep(1347, 0.2, num_classes=10, dim=32)
    assert scarce.keep == "easy" and "teacher-student perceptron" in scarce.reason and "scarce" in scarce.reason
    abundant = recommend_keep(1_000_000, 0.8, num_classes=10, dim=32)
    assert abundant.keep == "hard" and "abundant" in abundant.reason and "extrapolated" in abundant.reason
    # the same data in a wider representation is scarcer: the theory's alpha is P / d
    assert recommend_keep(60_000, 0.4, num_classes=10, dim=16).keep == "hard"
    assert recommend_keep(60_000, 0.4, num_classes=10, dim=4096).keep == "easy"
    with pytest.raises(ValueError, match="needs a measured boundary .* or dim="):
        recommend_keep(1000, 0.5, num_classes=10)
    with pytest.raises(ValueError, match="boundary must be a KeepBoundary"):
        recommend_keep(1000, 0.5, num_classes=10, boundary="hard")


def test_keep_boundary_recovers_a_planted_line():
    from fastdd.pruning.boundary import KeepBoundary

    # advantage = log(n) + 4 f - 6: hard wins above the line log n = 6 - 4 f
    n = torch.tensor([10.0, 30, 100, 300, 1000, 3000]).repeat_interleave(5)
    f = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]).repeat(6)
    adv = n.log() + 4 * f - 6
    b = KeepBoundary.fit(n, f, adv, "a planted line")
    for frac in (0.1, 0.5, 0.9):
        assert b.crossover(frac) == pytest.approx(math.exp(6 - 4 * frac), rel=0.35)
    assert b.margin(3000, 0.9) > 0 > b.margin(10, 0.1)
    constant = KeepBoundary.fit([10, 100], [0.5, 0.5], [-0.1, -0.2], "easy everywhere")
    assert constant.margin(1e6, 1.0) < 0 and constant.crossover(0.5) is None
    with pytest.raises(ValueError, match="one length"):
        KeepBoundary.fit([1, 2], [0.5], [0.1, 0.2], "bad")


def test_pilot_boundary_measures_on_the_users_data():
    from fastdd.pruning.boundary import pilot_boundary
    from fastdd.train import train_model

    X, y = blobs(n=400, d=5, centers=4, spread=2.0)
    scores = torch.rand(len(y), generator=torch.Generator().manual_seed(0))
    trained = []

    def train_fn(Xs, ys, seed):
        trained.append(len(ys))
        torch.manual_seed(seed)
        return train_model(torch.nn.Linear(5, 4), Xs, ys, epochs=3, seed=seed)

    b = pilot_boundary(X, y, scores, train_fn=train_fn, sizes=[80, 320], fractions=(0.25, 0.75))
    assert len(trained) == 2 * 2 * 2 and len(b.measurements) == 4  # easy and hard per (size, fraction)
    assert "8 trainings" in b.source and "held-out" in b.source
    assert {round(m[0]) for m in b.measurements} == {20, 80}  # per class
    rec = recommend_keep(320, 0.5, num_classes=4, boundary=b)
    assert rec.keep in ("easy", "hard") and "pilot sweep" in rec.reason


def test_kcenter_greedy_covers_better_than_random():
    X, _ = blobs(400, centers=8, spread=0.3)
    idx = kcenter_greedy(X, 8, seed=0)
    assert len(torch.unique(idx)) == 8

    def radius(sel):
        return torch.cdist(X, X[sel]).min(1).values.max().item()

    gen = torch.Generator().manual_seed(0)
    random_radii = [radius(torch.randperm(400, generator=gen)[:8]) for _ in range(20)]
    assert radius(idx) < min(random_radii)
    # 2-approximation of the optimal covering radius: one point per blob covers within ~2 spreads
    assert radius(idx) < 4.0


def test_herding_tracks_the_mean_better_than_random():
    X, _ = blobs(500, spread=2.0)
    idx = herding(X, 20)
    assert len(torch.unique(idx)) == 20
    err = (X[idx].mean(0) - X.mean(0)).norm().item()
    gen = torch.Generator().manual_seed(0)
    random_errs = [(X[torch.randperm(500, generator=gen)[:20]].mean(0) - X.mean(0)).norm().item() for _ in range(50)]
    assert err < min(random_errs)


def test_set_selection_bad_input():
    with pytest.raises(ValueError, match="budget=11 is larger than the number of points"):
        kcenter_greedy(torch.randn(10, 2), 11)
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        herding(torch.tensor([[0.0, float("nan")]]), 1)


# ------------------------------------------------------------------ training-dynamics scores
def test_grand_equals_norms_of_materialized_grads():
    torch.manual_seed(0)
    model = MLP(20, 4, hidden=(16,))
    X, y = torch.randn(37, 20), torch.randint(0, 4, (37,))
    expected = flat_sq_norms(vmap_per_sample_grads(model, X, y)).sqrt()
    assert_close(grand_scores(model, X, y, batch_size=10), expected, atol=1e-5, rtol=1e-5, name="grand")


def test_grand_averages_fresh_models():
    X, y = torch.randn(12, 20), torch.randint(0, 4, (12,))
    factory = lambda: MLP(20, 4, hidden=(8,))  # noqa: E731
    avg = grand_scores(factory, X, y, n_models=3, seed=7)
    manual = 0
    for i in range(3):
        torch.manual_seed(7 + i)
        manual = manual + fastdd.per_sample_grad_norms(factory(), X, y)
    assert_close(avg, manual / 3, atol=1e-5, rtol=1e-5, name="grand average")


def test_el2n_flags_flipped_labels(digits):
    bad, mask, gen = _corrupt(len(digits.y_train), seed=2)
    y = digits.y_train.clone()
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=gen)) % 10
    scores = el2n_scores(lambda: MLP(64, 10, hidden=(64,)), digits.X_train, y, epochs=5, n_runs=2)
    assert scores.shape == (len(y),) and torch.all((scores >= 0) & (scores <= 2 ** 0.5 + 1e-6))
    assert roc_auc(scores, mask) > 0.9


def test_training_dynamics_on_a_scripted_sequence():
    from fastdd.pruning import TrainingDynamics

    dyn = TrainingDynamics(3, num_classes=3, el2n_epochs=[1])
    labels = torch.tensor([0, 1, 2])
    epoch0 = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [0.0, 0.0, 5.0]])  # right, wrong, right
    epoch1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 4.0, 1.0], [0.0, 0.0, 2.0]])  # wrong, right, right
    dyn.update([0, 1, 2], epoch0, labels, epoch=0)
    dyn.update([2, 0], epoch1[[2, 0]], labels[[2, 0]], epoch=1)  # any order, any subset
    dyn.update([1], epoch1[[1]], labels[[1]], epoch=1)
    # margins: sample 0: 1 then -1; sample 1: -2 then 3; sample 2: 5 then 2
    torch.testing.assert_close(dyn.aum(), torch.tensor([0.0, 0.5, 3.5], dtype=torch.float64))
    assert dyn.forgetting.forgetting.tolist() == [1, 0, 0]
    expected = (torch.softmax(epoch1.double(), 1) - torch.eye(3, dtype=torch.float64)).norm(dim=1)
    torch.testing.assert_close(dyn.el2n(epoch=1), expected)
    torch.testing.assert_close(dyn.el2n(), expected)  # only epoch 1 was recorded
    torch.testing.assert_close(dyn.scores("aum"), -dyn.aum())
    with pytest.raises(ValueError, match=r"no EL2N was recorded at epoch 0; recorded: \[1\]"):
        dyn.el2n(epoch=0)


def test_training_dynamics_aum_flags_flipped_labels_in_a_training_loop(digits):
    from fastdd.pruning import TrainingDynamics

    bad, mask, gen = _corrupt(len(digits.y_train), seed=3)
    y = digits.y_train.clone()
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=gen)) % 10
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dyn = TrainingDynamics(len(y), num_classes=10)
    for epoch in range(8):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            logits = model(digits.X_train[idx])
            dyn.update(idx, logits, y[idx], epoch=epoch)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(logits, y[idx]).backward()
            opt.step()
    assert roc_auc(dyn.scores("aum"), mask) > 0.9
    assert roc_auc(dyn.scores("el2n"), mask) > 0.9
    assert torch.isfinite(dyn.scores("forgetting")).all()


def test_training_dynamics_tdds_on_a_scripted_sequence():
    from fastdd.pruning import TrainingDynamics

    # sample 0 never changes; sample 1 changes by the same amount every epoch (no spread);
    # sample 2 changes once, late: the only one TDDS ranks above zero
    a, b = [2.0, 0.0], [0.0, 2.0]
    logits = [[a, a, a], [a, b, a], [a, a, a], [a, b, b]]
    dyn = TrainingDynamics(3, num_classes=2, tdds_window=3, tdds_decay=0.5)
    for e, rows in enumerate(logits):
        dyn.update([0, 1, 2], torch.tensor(rows), torch.tensor([0, 0, 0]), epoch=e)
    p = [torch.softmax(torch.tensor(rows, dtype=torch.float64), 1) for rows in logits]
    change = [(p[t] * ((p[t] + 1e-8).log() - (p[t - 1] + 1e-8).log())).abs().sum(1) for t in range(1, 4)]
    # two windows of 3 epochs (2 changes each), weights 0.5 * 0.5^1 and 0.5 * 0.5^0
    expected = sum(w * (torch.stack(change[k:k + 2]) - torch.stack(change[k:k + 2]).mean(0)).norm(dim=0)
                   for k, w in ((0, 0.25), (1, 0.5)))
    torch.testing.assert_close(dyn.scores("tdds"), expected)
    assert dyn.scores("tdds")[0] == 0 and dyn.scores("tdds")[1] == 0 and dyn.scores("tdds")[2] > 0
    short = TrainingDynamics(2, num_classes=2, tdds_window=5)
    short.update([0, 1], torch.zeros(2, 2), [0, 1], epoch=0)
    with pytest.raises(ValueError, match="needs at least 5 epochs"):
        short.scores("tdds")
    with pytest.raises(ValueError, match="TDDS was not recorded"):
        TrainingDynamics(2, num_classes=2).tdds()


def test_training_dynamics_bad_input():
    from fastdd.pruning import TrainingDynamics

    dyn = TrainingDynamics(4, num_classes=3)
    with pytest.raises(ValueError, match=r"logits must be \[b, num_classes\] = \[2, 3\], got \(2, 4\)"):
        dyn.update([0, 1], torch.zeros(2, 4), [0, 1])
    with pytest.raises(ValueError, match="indices has 3 entries but logits has 2 rows"):
        dyn.update([0, 1, 2], torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        dyn.update([0, 1], torch.zeros(2, 3), [0, 5])
    with pytest.raises(ValueError, match="labels must hold integer class indices"):
        dyn.update([0, 1], torch.zeros(2, 3), torch.tensor([0.5, 1.0]))
    dyn.update([0, 1], torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="2 samples were never presented"):
        dyn.scores("aum")
    with pytest.raises(ValueError, match="kind must be one of"):
        dyn.scores("grand")
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        TrainingDynamics(4, num_classes=1)
    dyn.update([2], torch.zeros(1, 3), [0], epoch=3)
    with pytest.raises(ValueError, match="epoch went back from 3 to 1"):
        dyn.update([3], torch.zeros(1, 3), [0], epoch=1)
    with pytest.raises(ValueError, match="tdds_window must be at least 2"):
        TrainingDynamics(4, num_classes=3, tdds_window=1)


def test_forgetting_counts_on_a_scripted_sequence():
    t = ForgettingTracker(4)
    # sample: 0 learned then forgotten twice; 1 always right; 2 never right; 3 right, wrong, right
    script = [
        ([0, 1, 2, 3], [1, 1, 0, 1]),
        ([0, 1, 2, 3], [0, 1, 0, 0]),
        ([0, 1, 2], [1, 1, 0]),
        ([3], [1]),
        ([0], [0]),
    ]
    for idx, correct in script:
        t.update(torch.tensor(idx), torch.tensor(correct).bool())
    assert t.forgetting.tolist() == [2, 0, 0, 1]
    assert t.unforgettable().tolist() == [False, True, False, False]
    assert t.scores().tolist() == [2.0, 0.0, 3.0, 1.0]  # never learned ranks hardest
    with pytest.raises(ValueError, match="indices must lie in"):
        t.update(torch.tensor([4]), torch.tensor([True]))


# ------------------------------------------------------------------ pruning curve
def test_pruning_curve_random_points_match_direct_training(digits):
    X, y = digits.X_train[:400], digits.y_train[:400]
    Xt, yt = digits.X_test[:200], digits.y_test[:200]
    scores = torch.rand(len(y), generator=torch.Generator().manual_seed(0))

    def train_fn(Xs, ys, seed):
        from fastdd.train import train_model

        torch.manual_seed(seed)
        return train_model(MLP(64, 10, hidden=(32,)), Xs, ys, epochs=5, seed=seed)

    curve = pruning_curve(X, y, Xt, yt, scores, fractions=(0.3, 1.0), n_seeds=2, train_fn=train_fn)
    from fastdd.train import accuracy

    for s in range(2):
        idx = select(scores, 0.3, keep="random", labels=y, seed=s)
        direct = accuracy(train_fn(X[idx], y[idx], s), Xt, yt)
        assert curve.accuracies["random"][0, s].item() == pytest.approx(direct, abs=1e-9)
    # at 100% every policy trains on everything
    assert torch.equal(curve.accuracies["easy"][1], curve.accuracies["hard"][1])
    assert "| 30% |" in curve.table()
