"""pytest-benchmark suites: ``pytest bench/ --benchmark-only`` times them (grouped by op and
shape), ``--benchmark-autosave`` / ``--benchmark-compare`` keep and compare runs, and
``--benchmark-disable`` runs each once as a test (CI does, so the suites cannot rot).
Threads: ``FASTDD_BENCH_THREADS`` (default 2); run benches alone on a shared machine."""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FASTDD_BENCH_THREADS", "2")))


def backends():
    """The backends of the accelerated ops this machine has: torch always, Triton and the CUDA
    extension on a GPU (on a CPU, Triton runs only in its interpreter, too slow to time)."""
    found = ["torch"]
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401

            found.append("triton")
        except ImportError:
            pass
        from fastdd import _ext

        if _ext.load() is not None:
            found.append("cuda")
    return found


@pytest.fixture
def force_backend(monkeypatch):
    """``force_backend(name)`` sets FASTDD_BACKEND for one benchmark."""
    def force(name):
        monkeypatch.setenv("FASTDD_BACKEND", name)
    return force
