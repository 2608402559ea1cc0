"""The command line: outputs, resume, data files and the errors a person can act on."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdd.cli import main
from fastdd.distill import SyntheticSet


def _blobs(path, n=60, flip=None, images=False):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    X = torch.randn(n, 4, generator=gen) * 0.3 + 3 * y[:, None].float()
    if flip is not None:
        y[flip] = 1 - y[flip]
    if images:
        X = torch.randn(n, 1, 8, 8, generator=gen) * 0.3 + 2 * y[:, None, None, None].float()
    np.savez(path, X=X.numpy(), y=y.numpy(), X_test=X.numpy(), y_test=(torch.arange(n) % 2).numpy())
    return X, y


def test_value_knn_ranks_a_flipped_label_lowest(tmp_path, capsys):
    data, out = tmp_path / "d.npz", tmp_path / "v.csv"
    _blobs(data, flip=7)
    assert main(["value", "--data", str(data), "--method", "knn", "--out", str(out)]) == 0
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert table.shape == (60, 2) and (table[:, 0] == np.arange(60)).all()
    assert int(table[:, 1].argmin()) == 7
    assert "lowest-valued training points: [7" in capsys.readouterr().out


def test_prune_keeps_the_fraction(tmp_path):
    data, out = tmp_path / "d.npz", tmp_path / "k.npy"
    _blobs(data, n=80)
    assert main(["prune", "--data", str(data), "--score", "el2n", "--keep", "0.25", "--epochs", "2",
                 "--out", str(out), "--no-progress"]) == 0
    kept = np.load(out)
    assert len(kept) == 20 and len(set(kept.tolist())) == 20 and kept.max() < 80


def test_prune_ccs_policy_keeps_the_fraction(tmp_path):
    data, out = tmp_path / "d.npz", tmp_path / "k.npy"
    _blobs(data, n=200)
    assert main(["prune", "--data", str(data), "--score", "el2n", "--keep", "0.1", "--epochs", "2",
                 "--policy", "ccs", "--out", str(out), "--no-progress"]) == 0
    kept = np.load(out)
    assert len(kept) == 20 and len(set(kept.tolist())) == 20


def test_distill_resume_equals_uninterrupted(tmp_path):
    data = tmp_path / "d.npz"
    _blobs(data, n=40, images=True)
    common = ["distill", "--data", str(data), "--method", "dm", "--ipc", "2", "--width", "8", "--no-progress"]
    ck, a, b = tmp_path / "ck.pt", tmp_path / "a.pt", tmp_path / "b.pt"
    assert main(common + ["--iterations", "2", "--checkpoint", str(ck), "--out", str(a)]) == 0
    assert main(common + ["--iterations", "4", "--checkpoint", str(ck), "--resume", "--out", str(a)]) == 2  # a exists
    assert main(common + ["--iterations", "4", "--checkpoint", str(ck), "--resume", "--out", str(a), "--overwrite"]) == 0
    assert main(common + ["--iterations", "4", "--out", str(b)]) == 0
    resumed, straight = SyntheticSet.load(str(a)), SyntheticSet.load(str(b))
    assert torch.equal(resumed.images, straight.images) and resumed.info["iterations"] == 4
    one_real, one_noise = tmp_path / "r1.pt", tmp_path / "n1.pt"
    assert main(common + ["--iterations", "1", "--out", str(one_real)]) == 0
    assert main(common + ["--iterations", "1", "--init", "noise", "--out", str(one_noise)]) == 0
    gap = (SyntheticSet.load(str(one_noise)).images - SyntheticSet.load(str(one_real)).images).abs().mean()
    assert gap > 0.5  # noise, not the real images the default starts from


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("no_y", "needs arrays named X and y"),
    ("features", "distill needs images"),
    ("big_ipc", "larger than the smallest class"),
    ("checkpoint_exists", "pass --resume"),
    ("bad_out", "does not exist"),
    ("unknown_option", "takes no option 'inner_steps'; its options: model_options, batch_real"),
    ("option_form", "expected KEY=VALUE"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, case, message):
    data = tmp_path / "d.npz"
    _blobs(data, n=20, images=case != "features")
    args = ["distill", "--data", str(data), "--iterations", "1", "--no-progress", "--out", str(tmp_path / "s.pt")]
    if case == "missing":
        args[2] = str(tmp_path / "nope.npz")
    elif case == "no_y":
        np.savez(data, X=np.zeros((3, 4)))
    elif case == "big_ipc":
        args += ["--ipc", "50"]
    elif case == "checkpoint_exists":
        (tmp_path / "ck.pt").write_bytes(b"x")
        args += ["--checkpoint", str(tmp_path / "ck.pt")]
    elif case == "bad_out":
        args[-1] = str(tmp_path / "no" / "such" / "s.pt")
    elif case == "unknown_option":  # an option of another method
        args += ["--set", "inner_steps=5"]
    elif case == "option_form":
        args += ["--set", "lr_img"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_distill_set_reaches_the_method(tmp_path):
    """--set passes method options: DM with lr_img=0 leaves the images where they started,
    and a string value (DC's metric) is taken as a string."""
    data = tmp_path / "d.npz"
    _blobs(data, n=40, images=True)
    common = ["distill", "--data", str(data), "--method", "dm", "--ipc", "2", "--width", "8", "--no-progress"]
    start, frozen, moved = tmp_path / "s.pt", tmp_path / "f.pt", tmp_path / "m.pt"
    assert main(common + ["--iterations", "0", "--out", str(start)]) == 0
    assert main(common + ["--iterations", "2", "--set", "lr_img=0.0", "--set", "batch_real=8", "--out", str(frozen)]) == 0
    assert main(common + ["--iterations", "2", "--out", str(moved)]) == 0
    images = {p: SyntheticSet.load(str(p)).images for p in (start, frozen, moved)}
    assert torch.equal(images[frozen], images[start]) and not torch.equal(images[moved], images[start])
    dc = ["distill", "--data", str(data), "--method", "dc", "--ipc", "1", "--width", "8", "--no-progress",
          "--iterations", "1", "--set", "metric=cos", "--set", "outer_loop=1", "--out", str(tmp_path / "dc.pt")]
    assert main(dc) == 0


def test_help_shows_every_option_with_its_default(capsys):
    for sub in ("distill", "value", "prune"):
        with pytest.raises(SystemExit) as exc:
            main([sub, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--data" in text and "--seed" in text and "(default: 0)" in text, sub
        if sub == "distill":  # and the options --set passes, per method
            assert "  dd: model_options, inner_steps," in text and "  mtt: " in text and "expert_options" in text


def test_python_dash_m_runs():
    res = subprocess.run([sys.executable, "-m", "fastdd", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "distill" in res.stdout and "value" in res.stdout


def test_value_influence_finds_a_flipped_label_and_tmc_resumes(tmp_path):
    data = tmp_path / "d.npz"
    _blobs(data, n=40, flip=11)
    out = tmp_path / "self.npy"
    assert main(["value", "--data", str(data), "--method", "influence", "--influence", "self", "--epochs", "30",
                 "--out", str(out)]) == 0
    assert int(np.load(out).argmax()) == 11  # the mislabelled point is the one the model bends to
    ek = tmp_path / "self_ekfac.npy"
    assert main(["value", "--data", str(data), "--method", "influence", "--influence", "self", "--epochs", "30",
                 "--hessian", "ekfac", "--out", str(ek)]) == 0
    assert int(np.load(ek).argmax()) == 11  # so does EK-FAC curvature
    ck, tmc = tmp_path / "tmc.pt", tmp_path / "tmc.npy"
    common = ["value", "--data", str(data), "--method", "tmc", "--no-progress", "--out", str(tmc)]
    assert main(common + ["--permutations", "3", "--checkpoint", str(ck)]) == 0
    assert main(common + ["--permutations", "6", "--checkpoint", str(ck), "--resume", "--overwrite"]) == 0
    resumed = np.load(tmc)
    assert main(common + ["--permutations", "6", "--overwrite"]) == 0
    np.testing.assert_allclose(resumed, np.load(tmc), rtol=1e-6)  # resumed = uninterrupted
    assert np.abs(resumed).max() > 0
