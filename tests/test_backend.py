"""Backend choice, forced backends and lazy imports."""
import subprocess
import sys

import pytest
import torch

from fastdd import _backend


def test_cpu_tensors_use_torch(monkeypatch):
    monkeypatch.delenv("FASTDD_BACKEND", raising=False)
    assert _backend.pick("cpu") == "torch"


@pytest.mark.parametrize("ext, triton, triton_first, expected", [
    (True, True, False, "cuda"), (True, True, True, "triton"), (True, False, True, "cuda"),
    (False, True, False, "triton"), (False, False, True, "torch"),
])
def test_automatic_order_on_cuda_tensors(monkeypatch, ext, triton, triton_first, expected):
    """CUDA extension, then Triton, then torch; ops that ask put Triton first; a forced backend wins."""
    monkeypatch.delenv("FASTDD_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda: ext)
    monkeypatch.setattr(_backend, "triton_available", lambda: triton)
    assert _backend.pick("cuda", triton_first=triton_first) == expected
    monkeypatch.setenv("FASTDD_BACKEND", "torch")
    assert _backend.pick("cuda", triton_first=triton_first) == "torch"


def test_forced_backend_names(monkeypatch):
    monkeypatch.setenv("FASTDD_BACKEND", "torch")
    assert _backend.pick("cpu") == "torch"
    monkeypatch.setenv("FASTDD_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTDD_BACKEND='tpu' is not a backend"):
        _backend.pick("cpu")


def test_forced_cuda_on_cpu_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("FASTDD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        _backend.pick("cpu")


def test_forced_triton_without_interpreter_says_what_to_set(monkeypatch):
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.pick("cpu")


def test_extension_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from fastdd import _ext

    assert _ext.load() is None
    with pytest.raises(RuntimeError, match="CUDA extension is unavailable"):
        _ext.load(raise_on_error=True)


def test_import_is_lazy():
    """import fastdd loads neither triton, the extension, scikit-learn nor matplotlib."""
    code = (
        "import sys, fastdd; heavy = [m for m in ('triton', 'sklearn', 'matplotlib', 'fastdd._C', 'fastdd.kernels') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
