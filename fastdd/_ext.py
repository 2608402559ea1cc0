"""Loads the CUDA extension: prebuilt (``fastdd._C``) or JIT-built from csrc/ with ninja.

The build happens once per machine (torch caches it under TORCH_EXTENSIONS_DIR) and
only when a CUDA device and a CUDA build of torch are present. ``FASTDD_NO_CUDA_EXT=1``
skips the extension entirely (Triton then serves CUDA tensors).
"""
from __future__ import annotations

import importlib.resources
import os

_module = None
_error: str | None = None


def source_files() -> list[str]:
    """Paths of the extension's sources: every .cu and .cpp under csrc/."""
    root = importlib.resources.files("fastdd.csrc")
    return sorted(str(f) for f in root.iterdir() if f.name.endswith((".cu", ".cpp")))


def load(raise_on_error: bool = False):
    """The extension module, or None (or an error) when it cannot be had here."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is None:
        _module, _error = _try_load()
    if _module is None and raise_on_error:
        raise RuntimeError(f"the fastdd CUDA extension is unavailable: {_error}")
    return _module


def _try_load():
    import torch

    if os.environ.get("FASTDD_NO_CUDA_EXT") == "1":
        return None, "FASTDD_NO_CUDA_EXT=1 is set"
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None, "no CUDA device, or torch is a CPU build (install a CUDA build of torch)"
    try:
        from fastdd import _C  # prebuilt by FASTDD_BUILD_CUDA=1 pip install .

        return _C, None
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import load as jit_load

        major, minor = torch.cuda.get_device_capability()
        module = jit_load(
            name="fastdd_cuda",
            sources=source_files(),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
            verbose=os.environ.get("FASTDD_VERBOSE_BUILD") == "1",
        )
        return module, None
    except Exception as exc:  # a failed build must not take the library down
        return None, f"JIT build failed ({type(exc).__name__}: {exc}); needs nvcc and ninja (pip install ninja)"
