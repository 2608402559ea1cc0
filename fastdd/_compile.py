"""``torch.compile`` where it pays and can run, eager everywhere else.

Compiling a network fuses its memory-bound layers (norms, activations, pooling) into the
convolutions' epilogues; on a CPU, compiling the frozen ConvNet-3 forward of DM's real batch
took a DM iteration at MNIST's 28x28, ipc 10, from 2.43 s to 1.72 s. Compiling costs seconds once per process and input shape and
needs inductor's toolchain (a C++ compiler on a CPU, Triton on a GPU), so the choice is
``"auto"`` by default: compile on a CPU where images are large enough for the per-iteration
saving to repay the compile within a run, and fall back to eager code, with one warning, where
the compile fails.
"""
from __future__ import annotations

import functools
import importlib.util
import shutil
import warnings

import torch

# images of at least this many pixels (16x16) compile under "auto": at 8x8 a frozen ConvNet's
# forward is milliseconds, and the compile's seconds never pay back in a run
AUTO_MIN_PIXELS = 256


def check_compile(value, name: str = "compile"):
    """``True``, ``False`` or ``"auto"``, else a ValueError naming the option."""
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")


@functools.lru_cache(maxsize=None)
def compile_available(device_type: str) -> bool:
    """Whether inductor can build kernels for ``device_type`` here: a C++ compiler on a CPU,
    Triton on a GPU."""
    if not hasattr(torch, "compile"):
        return False
    if device_type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def wants_compile(choice, device: torch.device, image_shape) -> bool:
    """Resolve ``True | False | "auto"`` for work on ``device`` with images of ``image_shape``
    (``[C, H, W]``); ``True`` where the toolchain is missing is refused with what to install."""
    if choice is False:
        return False
    available = compile_available(device.type)
    if choice is True and not available:
        raise ValueError(f"compile=True needs torch.compile's inductor toolchain on {device.type} (a C++ compiler "
                         "such as g++ on the PATH on a CPU, Triton on a GPU); pass compile=False or 'auto'")
    pixels = int(image_shape[-1]) * int(image_shape[-2]) if len(image_shape) >= 2 else 0
    # "auto" compiles on a CPU only: that is where the gain was measured; a GPU's fused cuDNN
    # layers leave less to fuse, and its compile is untimed here (compile=True asks for it)
    return available and (choice is True or (device.type == "cpu" and pixels >= AUTO_MIN_PIXELS))


class CompiledCall:
    """``fn`` through ``torch.compile``; if compiling or running the compiled code fails, one
    warning names the reason and this call and every later one run ``fn`` eagerly."""

    def __init__(self, fn, what: str):
        self.fn, self.what = fn, what
        self.compiled = torch.compile(fn)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # a toolchain or tracing failure: the eager code still runs
                self.failed = True
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                warnings.warn(f"torch.compile of {self.what} failed ({type(e).__name__}: {reason[:200]}); "
                              "running it eagerly from now on", RuntimeWarning, stacklevel=2)
        return self.fn(*args)
