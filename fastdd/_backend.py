"""Backend choice for accelerated ops: cuda | triton | torch, per call.

CUDA tensors use the CUDA extension when it loads, else Triton, else torch; an op whose
Triton kernels measured faster asks for Triton first (``pick(device, triton_first=True)``:
the per-sample Linear ops). CPU tensors use the torch path.
``FASTDD_BACKEND=torch|triton|cuda`` forces one, and a forced backend that cannot run
raises an error naming the missing piece.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) Triton kernels run on
CPU tensors through Triton's interpreter, which is how CPU machines test them.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")


def triton_interpret() -> bool:
    """True when Triton kernels run through the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def cuda_ext_available() -> bool:
    """Whether the CUDA extension is built or can be built and loaded."""
    from . import _ext

    return _ext.load(raise_on_error=False) is not None


def forced_backend() -> str | None:
    """The backend named by FASTDD_BACKEND, or None for automatic choice."""
    value = os.environ.get("FASTDD_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"FASTDD_BACKEND={value!r} is not a backend; expected one of {', '.join(BACKENDS)} or auto"
        )
    return value


def _check_usable(backend: str, device: torch.device) -> None:
    if backend == "torch":
        return
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("FASTDD_BACKEND=triton but triton is not installed: pip install triton")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"FASTDD_BACKEND=triton with tensors on {device}: Triton needs CUDA tensors, "
                "or TRITON_INTERPRET=1 set before triton is imported to run on the CPU"
            )
        return
    if device.type != "cuda":
        raise RuntimeError(
            f"FASTDD_BACKEND=cuda with tensors on {device}: the CUDA extension needs CUDA tensors"
        )
    from . import _ext

    _ext.load(raise_on_error=True)


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_stream(t: torch.Tensor) -> int:
    """The handle of the current CUDA stream on ``t``'s device, as the CUDA launchers take it."""
    return torch.cuda.current_stream(t.device).cuda_stream


def pick_for(t: torch.Tensor) -> str:
    """:func:`pick` for an op on ``t``, falling back to torch for dtypes the kernels do not
    take (float64 stays on the exact reference path)."""
    backend = pick(t.device)
    return "torch" if backend != "torch" and t.dtype not in KERNEL_DTYPES else backend


def pick(device: torch.device | str, triton_first: bool = False) -> str:
    """The backend for an op whose tensors live on ``device``; ``triton_first`` puts Triton
    before the CUDA extension (a forced backend still wins)."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        _check_usable(forced, device)
        return forced
    if device.type == "cuda":
        if triton_first and triton_available():
            return "triton"
        if cuda_ext_available():
            return "cuda"
        if triton_available():
            return "triton"
    return "torch"
