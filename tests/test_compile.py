"""torch.compile where it pays: DM's compiled real pass equals the eager one; choices and fallbacks."""
import pytest
import torch

from fastdd import _compile
from fastdd.distill import DistributionMatching, distill

from conftest import assert_close


def _images(n_per_class=12, classes=3, size=16):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n_per_class * classes, 1, size, size, generator=gen)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return X + y.view(-1, 1, 1, 1).float(), y  # classes apart, so the embeddings differ per class


@pytest.mark.skipif(not _compile.compile_available("cpu"), reason="no C++ compiler for inductor")
def test_dm_compiled_real_pass_takes_the_eager_step():
    X, y = _images()
    kw = dict(ipc=2, model_options=dict(width=8, depth=2), batch_real=8, seed=0)
    eager = DistributionMatching(X, y, compile=False, **kw)
    compiled = DistributionMatching(X, y, compile=True, **kw)
    assert compiled._use_compile and not eager._use_compile
    for _ in range(2):
        loss_e, loss_c = eager.step(), compiled.step()
        assert abs(loss_e - loss_c) <= 1e-5 * abs(loss_e), (loss_e, loss_c)
    assert compiled._compiled_embed is not None and not compiled._compiled_embed.failed
    assert_close(compiled.images, eager.images, atol=1e-5, rtol=1e-5, name="images after two compiled steps")


def test_auto_compiles_large_images_only_where_the_toolchain_is(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(_compile, "compile_available", lambda device_type: True)
    assert _compile.wants_compile("auto", cpu, (1, 28, 28))
    assert not _compile.wants_compile("auto", cpu, (1, 8, 8))  # digits: the compile never pays back
    assert _compile.wants_compile(True, cpu, (1, 8, 8))
    assert not _compile.wants_compile(False, cpu, (1, 28, 28))
    assert not _compile.wants_compile("auto", torch.device("cuda"), (1, 28, 28))  # measured on a CPU only
    assert _compile.wants_compile(True, torch.device("cuda"), (1, 28, 28))
    monkeypatch.setattr(_compile, "compile_available", lambda device_type: False)
    assert not _compile.wants_compile("auto", cpu, (1, 28, 28))
    with pytest.raises(ValueError, match="compile=True needs torch.compile's inductor toolchain"):
        _compile.wants_compile(True, cpu, (1, 28, 28))


def test_bad_compile_option_is_refused_by_name():
    X, y = _images(size=8)
    with pytest.raises(ValueError, match=r"compile must be True, False or 'auto', got 'yes'"):
        distill(X, y, "dm", ipc=1, iterations=1, compile="yes")


def test_a_failed_compile_warns_once_and_runs_eagerly():
    call = _compile.CompiledCall(lambda x: x * 2, "a doubling")

    def broken(*args):
        raise RuntimeError("inductor could not find a compiler\nmore detail")

    call.compiled = broken
    with pytest.warns(RuntimeWarning, match=r"torch.compile of a doubling failed \(RuntimeError: inductor could not"):
        assert call(torch.tensor(3.0)).item() == 6.0
    assert call.failed
    assert call(torch.tensor(4.0)).item() == 8.0  # eager from now on, no second warning


def test_a_checkpoint_resumes_whatever_the_compile_choice(tmp_path):
    # compile changes how the steps run, not which run: it is not part of the checkpoint's identity
    X, y = _images(size=8)
    kw = dict(ipc=1, model_options=dict(width=8, depth=2), batch_real=8, seed=0)
    path = str(tmp_path / "dm.pt")
    distill(X, y, "dm", iterations=2, checkpoint=path, compile=False, **kw)
    resumed = distill(X, y, "dm", iterations=3, checkpoint=path, compile="auto", **kw)  # 8x8: auto runs eagerly
    whole = distill(X, y, "dm", iterations=3, compile=False, **kw)
    assert_close(resumed.images, whole.images, atol=0, rtol=0, name="resumed across compile choices")
