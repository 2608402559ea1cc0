"""CPU kernels in plain C (``csrc/cpu_stream.c``), compiled at first use and called through ctypes.

Built once per machine with the system C compiler (``$CC``, else ``cc``) and ``-march=native``,
into ``$FASTDD_CACHE_DIR`` (default ``~/.cache/fastdd``) under a name keyed by the source, the
compiler flags and this CPU's model and flags, so a cache shared between machines never runs
code built for another CPU. Without a compiler, without streaming stores (no AVX), or with
``FASTDD_CPU_KERNELS=0``, :func:`load` returns None and callers keep torch's own path.
Each call releases the GIL (ctypes), so a batch is split over ``torch.get_num_threads()``
Python threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
STREAM_MIN_BYTES = 32 << 20  # outputs below this stay cache-resident: ordinary stores win there

_lock = threading.Lock()
_lib = None
_error: str | None = None
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (the pid that made it, its threads, the pool)


def _cpu_signature() -> str:
    """This CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def _build() -> str:
    source = importlib.resources.files("fastdd.csrc").joinpath("cpu_stream.c")
    code = source.read_bytes()
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r}) on the PATH")
    key = hashlib.sha256(code + " ".join([cc, *_FLAGS]).encode() + _cpu_signature().encode()).hexdigest()[:16]
    cache = os.environ.get("FASTDD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastdd")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"cpu_stream_{key}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = os.path.join(tmp, "cpu_stream.c")
        with open(src, "wb") as f:
            f.write(code)
        out = os.path.join(tmp, "cpu_stream.so")
        res = subprocess.run([cc, *_FLAGS, src, "-o", out], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
        os.replace(out, path)  # atomic: a process building beside this one sees all of it or none
    return path


def _self_test(lib) -> None:
    g, a = torch.randn(3, 5), torch.randn(3, 37)
    out = torch.empty(3, 5, 37)
    lib.fastdd_outer_stream(g.data_ptr(), a.data_ptr(), out.data_ptr(), 0, 3, 5, 37)
    if not torch.equal(out, g[:, :, None] * a[:, None, :]):
        raise RuntimeError("the built kernel disagrees with torch on its self-test")


def load():
    """The compiled library, or None where it cannot be had (the reason: :func:`unavailable_reason`)."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        if os.environ.get("FASTDD_CPU_KERNELS") == "0":
            _error = "FASTDD_CPU_KERNELS=0 is set"
            return None
        try:
            lib = ctypes.CDLL(_build())
            lib.fastdd_stream_bits.restype = ctypes.c_int
            lib.fastdd_outer_stream.restype = None
            lib.fastdd_outer_stream.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
            if lib.fastdd_stream_bits() == 0:
                raise RuntimeError("this CPU has no vector streaming stores (AVX)")
            _self_test(lib)
            _lib = lib
        except Exception as e:  # no compiler, a failed build, an old CPU: torch's path serves
            _error = str(e)
    return _lib


def unavailable_reason() -> str | None:
    """Why :func:`load` returned None (None once it loaded, or before it was tried)."""
    return _error


def _run_split(fn, B: int) -> None:
    """``fn(i0, i1)`` over ``[0, B)`` split between torch's thread count of Python threads."""
    global _pool
    n = max(1, min(torch.get_num_threads(), B))
    if n == 1:
        fn(0, B)
        return
    if _pool is None or _pool[0] != os.getpid() or _pool[1] < n:
        # (a forked child inherits the pool object but none of its threads: a pool of its own)
        _pool = (os.getpid(), n, ThreadPoolExecutor(n, thread_name_prefix="fastdd-cpu"))
    cuts = [B * k // n for k in range(n + 1)]
    for f in [_pool[2].submit(fn, cuts[k], cuts[k + 1]) for k in range(n)]:
        f.result()


def outer_stream_into(G: torch.Tensor, A: torch.Tensor, out: torch.Tensor) -> bool:
    """``out[i] = outer(G[i], A[i])`` (G ``[B, p]``, A ``[B, d]``, out ``[B, p, d]``) with streaming
    stores; False (nothing written) where the kernel does not apply: not a CPU, not contiguous fp32,
    an output small enough to stay in cache, or no kernel here."""
    if not (out.device.type == G.device.type == A.device.type == "cpu"
            and out.dtype == G.dtype == A.dtype == torch.float32
            and out.is_contiguous() and G.is_contiguous() and A.is_contiguous()
            and out.numel() * 4 >= STREAM_MIN_BYTES):
        return False
    lib = load()
    if lib is None:
        return False
    B, p = G.shape
    d = A.shape[1]
    g_ptr, a_ptr, o_ptr = G.data_ptr(), A.data_ptr(), out.data_ptr()
    _run_split(lambda i0, i1: lib.fastdd_outer_stream(g_ptr, a_ptr, o_ptr, i0, i1, p, d), B)
    return True
