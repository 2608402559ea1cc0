"""Right answers on real data (uncentred, float64), estimators that are what they say, resume
that cannot mix runs, safe loading, and nothing destroyed or silent (one test per instance)."""
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdd
from fastdd import _checkpoint
from fastdd.cli import main
from fastdd.distill import SyntheticSet, distill, evaluate
from fastdd.distill.evaluate import herding_subset, kmeans_subset
from fastdd.distill.mmd import class_mmd
from fastdd.models import ConvNet, MLP
from fastdd.pruning import el2n_scores, grand_scores, herding, kcenter_greedy, kmeans, prototype_scores, select
from fastdd.valuation import (InfluenceFunction, KNNUtility, ModelUtility, banzhaf_msr, knn_shapley,
                              leave_one_out, tmc_shapley, tracin)


def _clusters(n_per=40, k=5, d=6, spread=0.3, seed=0, dtype=torch.float64):
    """k well-separated Gaussian clusters: points, true labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen, dtype=torch.float64) * 4
    labels = torch.arange(k).repeat_interleave(n_per)
    X = centres[labels] + spread * torch.randn(len(labels), d, generator=gen, dtype=torch.float64)
    return X.to(dtype), labels


def _ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a.numpy(), b.numpy())


# =========================================================================== 1. distances and dtypes
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_kmeans_is_shift_invariant_and_keeps_float64(offset):
    X, truth = _clusters()
    res = kmeans(X + offset, 5, seed=0)
    assert res.centroids.dtype == torch.float64
    assert _ari(res.assignments, truth) == 1.0
    exact = float((X + offset - res.centroids[res.assignments]).square().sum())
    assert math.isclose(res.objective, exact, rel_tol=1e-9), (res.objective, exact)
    plain = kmeans(X, 5, seed=0)
    assert math.isclose(res.objective, plain.objective, rel_tol=1e-6)
    torch.testing.assert_close(res.centroids - offset, plain.centroids, atol=1e-8, rtol=0)


def test_kmeans_float32_on_uncentred_data():
    X, truth = _clusters(dtype=torch.float32)
    res = kmeans(X + 1e4, 5, seed=0)
    assert res.centroids.dtype == torch.float32 and _ari(res.assignments, truth) == 1.0
    exact = float((((X + 1e4).double() - res.centroids.double()[res.assignments])).square().sum())
    assert math.isclose(res.objective, exact, rel_tol=1e-3), (res.objective, exact)


def _knn_shapley_exact(X_train, y_train, X_test, y_test, k):
    """The closed form of Jia et al., one test point at a time, distances from differences (float64)."""
    N = len(y_train)
    total = torch.zeros(N, dtype=torch.float64)
    for x, yt in zip(X_test.double(), y_test):
        d = (X_train.double() - x).square().sum(1)
        order = torch.argsort(d, stable=True).tolist()
        m = [float(y_train[j] == yt) for j in order]
        s = [0.0] * N
        s[N - 1] = m[N - 1] / N
        for i in range(N - 2, -1, -1):  # 0-based i is rank i + 1
            s[i] = s[i + 1] + (m[i] - m[i + 1]) / k * min(k, i + 1) / (i + 1)
        for rank, j in enumerate(order):
            total[j] += s[rank]
    return total / len(y_test)


def test_knn_shapley_is_shift_invariant_in_float64():
    X, y = _clusters(n_per=30, k=3, spread=2.0, seed=1)
    Xt, yt = _clusters(n_per=5, k=3, spread=2.0, seed=2)
    plain = knn_shapley(X, y, Xt, yt, k=5)
    shifted = knn_shapley(X + 1e4, y, Xt + 1e4, yt, k=5)
    assert shifted.dtype == torch.float64
    torch.testing.assert_close(shifted, plain, atol=1e-14, rtol=0)
    torch.testing.assert_close(plain, _knn_shapley_exact(X, y, Xt, yt, 5), atol=1e-14, rtol=0)


def test_knn_shapley_float32_uncentred_matches_exact_reference():
    X, y = _clusters(n_per=30, k=3, spread=2.0, seed=1, dtype=torch.float32)
    Xt, yt = _clusters(n_per=5, k=3, spread=2.0, seed=2, dtype=torch.float32)
    X, Xt = X + 1e4, Xt + 1e4  # the data as float32 holds it; the reference ranks those values exactly
    got = knn_shapley(X, y, Xt, yt, k=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _knn_shapley_exact(X, y, Xt, yt, 5), atol=1e-6, rtol=0)


def test_knn_shapley_resolves_float64_near_ties():
    # training points whose distances to the test point differ by 1e-9 at an offset of 1000
    X = torch.tensor([[1000.0 + 3e-9], [1000.0 + 1e-9], [1000.0 + 2e-9], [1000.0 + 4e-9]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    Xt, yt = torch.tensor([[1000.0]], dtype=torch.float64), torch.tensor([1])
    torch.testing.assert_close(knn_shapley(X, y, Xt, yt, k=1), _knn_shapley_exact(X, y, Xt, yt, 1), atol=1e-15, rtol=0)


def test_knn_utility_is_shift_invariant():
    X, y = _clusters(n_per=20, k=3, spread=2.0, seed=3)
    Xv, yv = _clusters(n_per=10, k=3, spread=2.0, seed=4)
    plain, shifted = KNNUtility(X, y, Xv, yv, k=3), KNNUtility(X + 1e4, y, Xv + 1e4, yv, k=3)
    assert torch.equal(plain.order, shifted.order)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        subset = torch.randperm(len(y), generator=gen)[:15]
        assert plain(subset) == shifted(subset)


def _kcenter_exact(E, first, budget):
    E = E.double()
    chosen, min_d = [first], (E - E[first]).square().sum(1)
    min_d[first] = -1
    while len(chosen) < budget:
        i = int(min_d.argmax())
        chosen.append(i)
        min_d = torch.minimum(min_d, (E - E[i]).square().sum(1))
        min_d[chosen] = -1
    return chosen


def _herding_exact(E, budget):
    E = E.double()
    mu, chosen, total = E.mean(0), [], torch.zeros(E.shape[1], dtype=torch.float64)
    for t in range(1, budget + 1):
        cost = ((total + E) / t - mu).square().sum(1)
        cost[chosen] = float("inf")
        i = int(cost.argmin())
        chosen.append(i)
        total += E[i]
    return chosen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kcenter_and_herding_pick_as_exact_greedy_at_an_offset(dtype):
    gen = torch.Generator().manual_seed(0)
    E = (torch.randn(300, 8, generator=gen, dtype=torch.float64) + 1000).to(dtype)
    picks = kcenter_greedy(E, 30, initial=[5]).tolist()
    assert picks == _kcenter_exact(E, 5, 30)
    assert herding(E, 30).tolist() == _herding_exact(E, 30)


def test_kcenter_never_picks_an_index_twice():
    E = torch.randn(5, 4).repeat(4, 1)  # every point four times
    picks = kcenter_greedy(E, 20)
    assert len(set(picks.tolist())) == 20


def test_select_keeps_float64_near_ties_apart():
    scores = torch.tensor([1, 1 + 1e-12, 1 + 2e-12, 0], dtype=torch.float64)
    assert select(scores, 0.25, keep="hard").tolist() == [2]
    assert select(scores, 0.25, keep="easy").tolist() == [3]
    assert select(scores.numpy(), np.float32(0.5), keep="hard").tolist() == [1, 2]  # numpy in


def test_prototype_scores_keep_float64():
    X, _ = _clusters(n_per=20, k=3, seed=5)
    s64 = prototype_scores(X, 3)
    s32 = prototype_scores(X.float(), 3)
    assert s64.dtype == torch.float64 and s32.dtype == torch.float32
    torch.testing.assert_close(s64.float(), s32, atol=1e-5, rtol=0)
    assert prototype_scores(X, 3, labels=torch.arange(60) % 2).dtype == torch.float64


def test_subset_baselines_are_shift_invariant():
    X, y = _clusters(n_per=20, k=3, spread=1.0, seed=6)
    assert torch.equal(herding_subset(X + 1e4, y, 4), herding_subset(X, y, 4))
    # (at ipc 3 one cluster here holds two points, equidistant from its centroid: a tie that rounding breaks)
    for ipc in (2, 4):
        assert torch.equal(kmeans_subset(X + 1e4, y, ipc), kmeans_subset(X, y, ipc))


def test_rbf_mmd_is_shift_invariant():
    gen = torch.Generator().manual_seed(0)
    real, syn = torch.randn(12, 5, generator=gen), torch.randn(4, 5, generator=gen) + 0.5
    counts_r, counts_s = torch.tensor([5, 7]), torch.tensor([2, 2])
    plain = class_mmd(real, counts_r, syn, counts_s, kernel="rbf", gamma=0.3)
    shifted = class_mmd(real + 1e3, counts_r, syn + 1e3, counts_s, kernel="rbf", gamma=0.3)
    torch.testing.assert_close(shifted, plain, atol=2e-4, rtol=0)


def _mlp64():
    torch.manual_seed(0)
    return MLP(5, 3, hidden=(4,)).double().eval()


def test_gradient_scores_keep_float64():
    model, X, y = _mlp64(), torch.randn(10, 5, dtype=torch.float64), torch.arange(10) % 3
    assert grand_scores(model, X, y).dtype == torch.float64
    assert tracin([model], [0.1], X, y, X[:3], y[:3]).dtype == torch.float64
    assert el2n_scores(_mlp64, X, y, epochs=1, n_runs=1).dtype == torch.float64
    assert grand_scores(model.float(), X.float(), y).dtype == torch.float32


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_norm_layer_per_sample_grads_hold_on_uncentred_activations(norm):
    # the GroupNorm/InstanceNorm rule reduces r (g . x - mu sum g) as torch's own backward does:
    # activations at an offset of 1000 std stay within float32's reach of the exact answer
    torch.manual_seed(0)
    layer = nn.GroupNorm(2, 4) if norm == "group" else nn.InstanceNorm2d(4, affine=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = 1000 + torch.randn(6, 4, 5, 5)
    y = torch.randint(0, 3, (6,))
    got = fastdd.per_sample_grads(model, x, y)
    exact = fastdd.per_sample_grads(model.double(), x.double(), y)
    for name in ("0.weight", "0.bias"):
        err = (got[name].double() - exact[name]).abs().max() / exact[name].abs().max()
        assert err < 2e-3, (name, float(err))


def test_model_utility_fits_float64():
    X, y = _clusters(n_per=10, k=3, seed=7)
    U = ModelUtility(X + 1e4, y, X + 1e4, y)
    assert U.X.dtype == torch.float64 and U(torch.arange(len(y))) == 1.0


# =========================================================================== 2. estimators
def _game(S):
    """U(S) = 1 if S in {(0,), (0, 2), (0, 1, 2)} else 0: exact Shapley values [5/6, -1/6, 1/3]."""
    return float(tuple(sorted(int(i) for i in S)) in {(0,), (0, 2), (0, 1, 2)})


def _exact_shapley(utility, n):
    values = torch.zeros(n, dtype=torch.float64)
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        for j in range(n):
            values[perm[j]] += utility(list(perm[:j + 1])) - utility(list(perm[:j]))
    return values / len(perms)


def test_tmc_without_truncation_converges_to_exact_shapley():
    exact = _exact_shapley(_game, 3)
    torch.testing.assert_close(exact, torch.tensor([5 / 6, -1 / 6, 1 / 3], dtype=torch.float64))
    errors = {}
    for m in (100, 1600):
        errs = [(tmc_shapley(_game, 3, max_permutations=m, truncation_tol=0, convergence_tol=0, seed=s).values
                 - exact).square().mean().sqrt() for s in range(8)]
        errors[m] = float(torch.stack(errs).mean())
    # root-mean-square error falls like 1 / sqrt(permutations): 16x the permutations, about 1/4 the error
    assert errors[1600] < 0.4 * errors[100] and errors[1600] < 0.03, errors
    res = tmc_shapley(_game, 3, max_permutations=4000, truncation_tol=0, convergence_tol=0, seed=0)
    assert res.n_samples == 4000 and abs(float(res.values[1]) + 1 / 6) < 0.03  # not the truncated 0.0


def test_converged_tmc_rerun_reloads_as_finished(tmp_path):
    ck = str(tmp_path / "tmc.pt")
    first = tmc_shapley(_game, 3, max_permutations=500, convergence_tol=0.2, min_permutations=20, checkpoint=ck)
    assert first.converged and first.n_samples < 500
    again = tmc_shapley(_game, 3, max_permutations=500, convergence_tol=0.2, min_permutations=20, checkpoint=ck)
    assert again.converged and again.n_samples == first.n_samples and torch.equal(again.values, first.values)


# =========================================================================== 3. resume cannot mix runs
@pytest.fixture(scope="module")
def small_images():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    X = torch.randn(40, 1, 8, 8, generator=gen) * 0.3 + 2 * y[:, None, None, None].float()
    return X, y


DM = dict(model_options=dict(width=4, depth=1), batch_real=8)


@pytest.mark.parametrize("change,differs", [
    (dict(model_options=dict(width=6, depth=1)), "options.model_options.width"),
    (dict(model_options=dict(width=4, depth=2)), "options.model_options.depth"),
    (dict(lr_img=0.5), "options.lr_img"),
    (dict(init="noise"), "options.init"),
    (dict(kernel="rbf"), "options.kernel"),
    (dict(data="other"), "X: checkpoint"),
])
def test_distill_resume_refuses_another_run(tmp_path, small_images, change, differs):
    X, y = small_images
    ck = str(tmp_path / "ck.pt")
    distill(X, y, "dm", 2, iterations=2, checkpoint=ck, **DM)
    options = {**DM, **{k: v for k, v in change.items() if k != "data"}}
    if "data" in change:
        X = X.flip(0).contiguous()  # other data of the same size
    with pytest.raises(ValueError, match=f"belongs to another run: .*{differs}"):
        distill(X, y, "dm", 2, iterations=4, checkpoint=ck, **options)


def test_distill_resume_accepts_the_same_run_and_refuses_fewer_iterations(tmp_path, small_images):
    X, y = small_images
    ck = str(tmp_path / "ck.pt")
    distill(X, y, "dm", 2, iterations=3, checkpoint=ck, **DM)
    with pytest.raises(ValueError, match="already holds 3 iterations, more than the 2 asked for"):
        distill(X, y, "dm", 2, iterations=2, checkpoint=ck, **DM)
    resumed = distill(X.clone(), y.clone(), "dm", 2, iterations=4, checkpoint=ck, **DM)  # equal data, new tensors
    assert torch.equal(resumed.images, distill(X, y, "dm", 2, iterations=4, **DM).images)


def test_tmc_and_banzhaf_resume_refuse_another_utility(tmp_path):
    X, y = _clusters(n_per=6, k=2, spread=2.0, seed=8, dtype=torch.float32)
    ck = str(tmp_path / "tmc.pt")
    tmc_shapley(KNNUtility(X, y, X, y, k=3), 12, max_permutations=4, checkpoint=ck)
    with pytest.raises(ValueError, match="utility.fields.k: checkpoint 3, this run 1"):
        tmc_shapley(KNNUtility(X, y, X, y, k=1), 12, max_permutations=8, checkpoint=ck)
    with pytest.raises(ValueError, match="belongs to another run: utility"):
        tmc_shapley(ModelUtility(X, y, X, y), 12, max_permutations=8, checkpoint=ck)
    with pytest.raises(ValueError, match="already holds 4 permutations, more than the 2"):
        tmc_shapley(KNNUtility(X, y, X, y, k=3), 12, max_permutations=2, checkpoint=ck)
    ck2 = str(tmp_path / "msr.pt")
    banzhaf_msr(KNNUtility(X, y, X, y, k=3), 12, n_samples=10, checkpoint=ck2)
    with pytest.raises(ValueError, match="utility.fields"):
        banzhaf_msr(KNNUtility(X.flip(0), y, X, y, k=3), 12, n_samples=20, checkpoint=ck2)


def _ridge(X, y, init=None):
    model = nn.Linear(X.shape[1], 2)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=50)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y) + 1e-2 * model.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def test_leave_one_out_refuses_other_data_of_the_same_size(tmp_path):
    X, y = _clusters(n_per=6, k=2, seed=9, dtype=torch.float32)
    ck = str(tmp_path / "loo.pt")
    leave_one_out(_ridge, X, y, X[:3], y[:3], indices=[0, 1], checkpoint=ck)
    with pytest.raises(ValueError, match="belongs to another run: X: checkpoint"):
        leave_one_out(_ridge, X + 1, y, X[:3], y[:3], indices=[0, 1], checkpoint=ck)
    with pytest.raises(ValueError, match="y_test"):
        leave_one_out(_ridge, X, y, X[:3], 1 - y[:3], indices=[0, 1], checkpoint=ck)


def _bad_files(tmp_path):
    """Checkpoint-like files that are not usable: name -> path."""
    good = str(tmp_path / "good.pt")
    _checkpoint.save(good, {"identity": {"method": "dm"}, "x": torch.zeros(3)})
    raw = open(good, "rb").read()
    paths = {"corrupt": tmp_path / "corrupt.pt", "truncated": tmp_path / "truncated.pt",
             "wrong_kind": tmp_path / "wrong.pt", "directory": tmp_path / "folder.pt"}
    paths["corrupt"].write_bytes(b"\x00garbage" * 50)
    paths["truncated"].write_bytes(raw[:len(raw) // 2])
    torch.save([1, 2, 3], paths["wrong_kind"])
    paths["directory"].mkdir()
    return {k: str(v) for k, v in paths.items()}


def test_unusable_checkpoints_give_one_line_naming_the_file(tmp_path, small_images):
    X, y = small_images
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ValueError) as exc:
            distill(X, y, "dm", 2, iterations=1, checkpoint=path, **DM)
        assert path in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))
        with pytest.raises(ValueError) as exc:
            SyntheticSet.load(path)
        assert path in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))
    tmc_file = str(tmp_path / "tmc.pt")
    tmc_shapley(_game, 3, max_permutations=3, checkpoint=tmc_file)
    with pytest.raises(ValueError, match="is not a synthetic set"):
        SyntheticSet.load(tmc_file)


def test_cli_unusable_checkpoint_exits_2(tmp_path, capsys):
    data = tmp_path / "d.npz"
    _image_file(data)
    for name, path in _bad_files(tmp_path).items():
        args = ["distill", "--data", str(data), "--iterations", "1", "--width", "4", "--ipc", "1", "--no-progress",
                "--out", str(tmp_path / f"{name}.out.pt"), "--checkpoint", path, "--resume"]
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path in err, (name, err)


def test_saves_clean_up_temporaries(tmp_path, monkeypatch):
    path = str(tmp_path / "w.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{path}.tmp{int(dead.stdout)}"  # a write interrupted by a kill: its process is gone
    open(stale, "wb").write(b"x" * 1000)
    _checkpoint.save(path, {"identity": {}, "a": 1})
    assert not os.path.exists(stale) and os.path.exists(path)

    def failing_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _checkpoint.save(path, {"identity": {}, "a": 2})
    assert sorted(os.listdir(tmp_path)) == ["w.pt"]  # the old file stands, no temporary left


# =========================================================================== 4. security
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_files_are_refused_without_running(tmp_path, small_images):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pt")
    torch.save({"identity": {"kind": "SyntheticSet"}, "images": _Payload(marker), "labels": torch.zeros(1)}, evil)
    with pytest.raises(ValueError, match="refused: loading it could run code"):
        SyntheticSet.load(evil)
    X, y = small_images
    with pytest.raises(ValueError, match="cannot be read"):
        distill(X, y, "dm", 2, iterations=1, checkpoint=evil, **DM)
    with pytest.raises(ValueError, match="cannot be read"):
        tmc_shapley(_game, 3, max_permutations=3, checkpoint=evil)
    assert not marker.exists()


# =========================================================================== 5. nothing destroyed, nothing silent
def _image_file(path, n=20, per_class_test=True):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    X = torch.randn(n, 1, 8, 8, generator=gen) + 2 * y[:, None, None, None].float()
    np.savez(path, X=X.numpy(), y=y.numpy())
    return X, y


def _exit_code(args):
    """main()'s status, or the one argparse exits with for a malformed command line."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def test_cli_out_never_overwrites_an_input(tmp_path, capsys):
    data = tmp_path / "d.npz"
    _image_file(data)
    before = data.read_bytes()
    common = ["distill", "--data", str(data), "--iterations", "1", "--width", "4", "--ipc", "1", "--no-progress"]
    assert main(common + ["--out", str(data)]) == 2
    data_pt = tmp_path / "d.pt"
    torch.save({"X": torch.zeros(4, 1, 8, 8), "y": torch.tensor([0, 1, 0, 1])}, data_pt)
    pt_before = data_pt.read_bytes()
    assert main(["distill", "--data", str(data_pt), "--iterations", "1", "--width", "4", "--ipc", "1",
                 "--no-progress", "--out", str(data_pt), "--overwrite"]) == 2
    assert "is the --data of this run" in capsys.readouterr().err
    ck = tmp_path / "ck.pt"
    assert main(common + ["--checkpoint", str(ck), "--out", str(ck)]) == 2
    assert data.read_bytes() == before and data_pt.read_bytes() == pt_before and not ck.exists()
    out = tmp_path / "s.pt"
    assert main(common + ["--out", str(out)]) == 0
    assert main(common + ["--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(common + ["--out", str(out), "--overwrite"]) == 0


def test_value_with_tiny_classes_keeps_a_test_point_per_class(tmp_path, capsys):
    data, out = tmp_path / "d.npz", tmp_path / "v.npy"
    X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    np.savez(data, X=X, y=np.array([0, 0, 1, 1, 2, 2]))  # two per class: 25% rounds to none
    assert main(["value", "--data", str(data), "--method", "knn", "--k", "1", "--out", str(out)]) == 0
    assert np.isfinite(np.load(out)).all()
    assert main(["value", "--data", str(data), "--method", "tmc", "--k", "1", "--permutations", "3",
                 "--no-progress", "--out", str(tmp_path / "t.npy")]) == 0
    np.savez(data, X=X[:3], y=np.array([0, 1, 2]))  # one per class: nothing can be held out
    assert main(["value", "--data", str(data), "--method", "knn", "--out", str(tmp_path / "w.npy")]) == 2
    assert "nothing can be held out" in capsys.readouterr().err


def test_non_finite_inputs_are_refused_by_name():
    X, y = torch.randn(8, 5), torch.arange(8) % 3
    X[5, 2] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN or inf .*first bad index 5"):
        el2n_scores(lambda: MLP(5, 3, hidden=(4,)), X, y, epochs=1, n_runs=1)
    with pytest.raises(ValueError, match="X contains NaN or inf .*first bad index 5"):
        grand_scores(MLP(5, 3, hidden=(4,)), X, y)
    images = torch.randn(4, 1, 8, 8)
    images[2, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="images contains NaN or inf .*first bad index 2"):
        evaluate(images, torch.tensor([0, 1, 0, 1]), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), n_models=1)
    with pytest.raises(ValueError, match="X_test contains NaN"):
        evaluate(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), images, torch.tensor([0, 1, 0, 1]), n_models=1)
    with pytest.raises(ValueError, match="X contains NaN"):
        distill(images, torch.tensor([0, 1, 0, 1]), "dm", 1, iterations=1)


def test_numpy_inputs_and_scalars_are_accepted():
    X, y = _clusters(n_per=10, k=2, seed=10, dtype=torch.float32)
    model = nn.Linear(6, 2)
    inf = InfluenceFunction(model, damping=0.1, solver="direct").fit(X.numpy(), y.numpy())
    assert inf.scores(X[:2].numpy(), y[:2].numpy()).shape == (20, 2)
    assert knn_shapley(X.numpy(), y.numpy(), X.numpy(), y.numpy(), k=np.int64(3)).shape == (20,)
    assert kmeans(X.numpy(), np.int32(2)).centroids.shape == (2, 6)
    assert len(kcenter_greedy(X.numpy(), np.int64(4))) == 4
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(8, 1, 8, 8, generator=gen)
    syn = distill(imgs.numpy(), (torch.arange(8) % 2).numpy(), "dm", np.int64(1), iterations=np.int64(1),
                  model_options=dict(width=4, depth=1))
    assert syn.images.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.uint8])
def test_distill_names_the_image_dtype(small_images, dtype):
    X, y = small_images
    with pytest.raises(ValueError, match=f"X must be float32 images .*got {dtype}"):
        distill(X.to(dtype), y, "dm", 1, iterations=1, **DM)


def test_empty_inputs_say_no_samples():
    empty, none = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="no samples"):
        knn_shapley(empty, none, torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        knn_shapley(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), empty, none)
    with pytest.raises(ValueError, match="no samples"):
        kmeans(empty, 1)
    with pytest.raises(ValueError, match="no samples"):
        kcenter_greedy(empty, 1)
    with pytest.raises(ValueError, match="no samples"):
        select(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match="no samples"):
        distill(torch.zeros(0, 1, 8, 8), none, "dm", 1)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(torch.zeros(0, 1, 8, 8), none, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        el2n_scores(lambda: nn.Linear(4, 2), empty, none)
    with pytest.raises(ValueError, match="no samples"):
        tmc_shapley(_game, 0)
    with pytest.raises(ValueError, match="no samples"):
        InfluenceFunction(nn.Linear(4, 2)).fit(empty, none)


def test_influence_refuses_batchnorm_in_training_mode():
    torch.manual_seed(0)
    model = ConvNet(1, 2, 8, width=4, depth=1, norm="batchnorm").train()
    before = model.features[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"BatchNorm2d 'features.1' .*training mode.*model.eval\(\)"):
        InfluenceFunction(model, damping=0.1).fit(torch.randn(6, 1, 8, 8), torch.arange(6) % 2)
    assert torch.equal(model.features[1].running_mean, before)  # running statistics untouched


@pytest.mark.parametrize("extra,message", [
    (["--set", "lr_img=abc"], "--set: lr_img must be a number >= 0, got 'abc'"),
    (["--set", "gamma=-1"], "gamma must be a number > 0 or None, got -1"),
    (["--iterations", "-1"], "argument --iterations: must be at least 0, got -1"),
    (["--evaluate", "-1"], "argument --evaluate: must be at least 0, got -1"),
    (["--ipc", "x"], "argument --ipc: expected a whole number, got 'x'"),
    (["--out-dir"], "is a directory"),
    (["--empty"], "needs arrays named X and y"),
])
def test_cli_distill_errors_are_one_line_before_any_work(tmp_path, capsys, extra, message):
    data = tmp_path / "d.npz"
    _image_file(data)
    out = tmp_path / "s.pt"
    if extra == ["--out-dir"]:
        out.mkdir()
        extra = []
    elif extra == ["--empty"]:
        np.savez(data)
        extra = []
    args = ["distill", "--data", str(data), "--method", "dm", "--no-progress", "--width", "4", "--out", str(out)] + extra
    assert _exit_code(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert out.is_dir() or not out.exists()


def test_cli_checkpoint_where_a_method_does_not_checkpoint(tmp_path, capsys):
    data = tmp_path / "d.npz"
    _image_file(data)
    for method in ("knn", "influence"):
        assert main(["value", "--data", str(data), "--method", method, "--checkpoint", str(tmp_path / "c.pt"),
                     "--out", str(tmp_path / "v.npy")]) == 2
        err = capsys.readouterr().err
        assert f"{method} runs in one go and does not checkpoint" in err and err.count("\n") == 1


def test_cli_value_tmc_resume_refuses_other_options(tmp_path, capsys):
    data, ck = tmp_path / "d.npz", tmp_path / "tmc.pt"
    _image_file(data)
    common = ["value", "--data", str(data), "--method", "tmc", "--no-progress", "--checkpoint", str(ck)]
    assert main(common + ["--permutations", "2", "--out", str(tmp_path / "a.npy")]) == 0
    assert main(common + ["--resume", "--k", "3", "--permutations", "4", "--out", str(tmp_path / "b.npy")]) == 2
    assert "utility.fields.k: checkpoint 5, this run 3" in capsys.readouterr().err
    assert main(common + ["--resume", "--utility", "logreg", "--permutations", "4", "--out", str(tmp_path / "c.npy")]) == 2
    assert "belongs to another run: utility" in capsys.readouterr().err


def test_conv_norms_and_class_means_stay_float64():
    """Per-sample conv norms (materialized-chunk path: a large map, a narrow layer) and class
    means of conv gradients are computed in float64 for a float64 model."""
    from helpers import flat_sq_norms, vmap_per_sample_grads

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 3)).double()
    x, y = torch.randn(6, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    ref = vmap_per_sample_grads(model, x, y)
    norms = fastdd.per_sample_grad_norms(model, x, y)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, flat_sq_norms(ref).sqrt(), atol=1e-13, rtol=1e-12)
    means = fastdd.classwise_grads(model, x, y, num_classes=3)
    expected = torch.stack([ref["0.weight"][y == c].mean(0) for c in range(3)])
    assert means["0.weight"].dtype == torch.float64
    torch.testing.assert_close(means["0.weight"], expected, atol=1e-13, rtol=1e-12)


def test_float64_data_files_are_valued_in_float64(tmp_path, capsys):
    """A float64 file stays float64 through the loader, so `fastdd value` ranks near-ties a float32
    cast would merge; distill and prune still get float32 for their networks."""
    from fastdd.data import load_data_file

    gen = np.random.default_rng(0)
    X = 1e4 + gen.normal(size=(40, 3)) * 1e-4  # float32 would quantize these to about 1e-3
    y = np.arange(40) % 2
    path = tmp_path / "d.npz"
    np.savez(path, X=X, y=y, X_test=X[:10] + 1e-5, y_test=y[:10])
    split = load_data_file(str(path))
    assert split.X_train.dtype == torch.float64
    out = tmp_path / "v.npy"
    assert main(["value", "--data", str(path), "--method", "knn", "--k", "3", "--out", str(out)]) == 0
    expected = knn_shapley(torch.tensor(X), torch.tensor(y), torch.tensor(X[:10] + 1e-5), torch.tensor(y[:10]), k=3)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=0, atol=1e-12)
    assert main(["value", "--data", str(path), "--method", "influence", "--epochs", "2",
                 "--out", str(tmp_path / "i.npy")]) == 0
    images = tmp_path / "img.npz"
    np.savez(images, X=gen.normal(size=(20, 1, 8, 8)), y=np.arange(20) % 2)  # float64 images
    assert main(["distill", "--data", str(images), "--iterations", "1", "--width", "4", "--ipc", "1",
                 "--no-progress", "--out", str(tmp_path / "s.pt")]) == 0
    assert main(["prune", "--data", str(images), "--score", "el2n", "--epochs", "1", "--keep", "0.5",
                 "--no-progress", "--out", str(tmp_path / "k.npy")]) == 0
