"""The C kernels of fastdd._cpu (streaming stores for materialized per-sample gradients) against
torch, where this machine can build them; the fallbacks where it cannot."""
import pytest
import torch
from torch import nn

import fastdd
from fastdd import _cpu
from fastdd.grad import buffers
from fastdd.grad.per_sample_linear import psg_linear, psg_linear_ref

needs_kernel = pytest.mark.skipif(_cpu.load() is None, reason=f"no CPU kernel here: {_cpu.unavailable_reason()}")


@pytest.fixture
def stream_everything(monkeypatch):
    monkeypatch.setattr(_cpu, "STREAM_MIN_BYTES", 0)  # test shapes are far smaller than a cache
    monkeypatch.setenv("FASTDD_REUSE_BUFFERS", "1")  # the pool, which tells written memory from new


@needs_kernel
@pytest.mark.parametrize("B,p,d", [(3, 5, 37), (1, 1, 1), (4, 2, 16), (7, 3, 64), (2, 9, 100)])
@pytest.mark.parametrize("offset", [0, 3])  # a destination that starts off a 64-byte boundary
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_outer_stream_equals_torch(stream_everything, B, p, d, offset, threads):
    torch.manual_seed(0)
    G, A = torch.randn(B, p), torch.randn(B, d)
    big = torch.full((offset + B * p * d + 5,), float("nan"))
    out = big[offset:offset + B * p * d].view(B, p, d)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _cpu.outer_stream_into(G, A, out)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(out, G[:, :, None] * A[:, None, :])
    assert big[:offset].isnan().all() and big[offset + B * p * d:].isnan().all()  # nothing written outside


@needs_kernel
def test_outer_stream_declines_what_it_does_not_serve(monkeypatch):
    G, A = torch.randn(4, 3), torch.randn(4, 8)
    assert not _cpu.outer_stream_into(G, A, torch.empty(4, 3, 8))  # small: ordinary stores win in cache
    monkeypatch.setattr(_cpu, "STREAM_MIN_BYTES", 0)
    assert not _cpu.outer_stream_into(G.double(), A.double(), torch.empty(4, 3, 8, dtype=torch.float64))
    assert not _cpu.outer_stream_into(G, A, torch.empty(4, 8, 3).transpose(1, 2))  # not contiguous
    assert not _cpu.outer_stream_into(G.T.contiguous().T, A, torch.empty(4, 3, 8))


@needs_kernel
def test_psg_linear_streams_into_written_memory_only(stream_everything, monkeypatch):
    calls = []
    real = _cpu.outer_stream_into
    monkeypatch.setattr(_cpu, "outer_stream_into", lambda *a: calls.append(1) or real(*a))
    A, G = torch.randn(6, 1, 10), torch.randn(6, 1, 4)
    buffers.release()
    fresh = buffers.take((6, 4, 10), torch.float32, torch.device("cpu"))
    assert torch.equal(psg_linear(A, G, out=fresh), psg_linear_ref(A, G))
    assert calls == []  # first write into new pages: torch's ordinary stores
    assert torch.equal(psg_linear(A * 2, G, out=fresh), psg_linear_ref(A * 2, G))
    assert calls == [1]  # written before: streamed
    psg_linear(A, G)  # no out: a fresh result, never streamed
    assert calls == [1]
    buffers.release()


@needs_kernel
def test_per_sample_grads_in_a_loop_equal_vmap_when_streamed(stream_everything, monkeypatch):
    from helpers import vmap_per_sample_grads

    streamed = []
    real = _cpu.outer_stream_into
    monkeypatch.setattr(_cpu, "outer_stream_into", lambda *a: streamed.append(real(*a)) or streamed[-1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    x, y = torch.randn(5, 3, 4), torch.randint(0, 3, (5,))
    buffers.release()
    held = None
    for step in range(5):  # pooled memory: fresh, fresh again (the previous result held), then reused
        xs = x * (step + 1)
        g = fastdd.per_sample_grads(model, xs, y)
        ref = vmap_per_sample_grads(model, xs, y)
        for n in ref:
            torch.testing.assert_close(g[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
        if held is not None:  # a result still held is never written over
            torch.testing.assert_close(held[0], held[1])
        held = (g["1.weight"], g["1.weight"].clone())
    assert streamed and all(streamed)  # the reused buffers went through the kernel
    buffers.release()


def test_switched_off_or_without_a_compiler_torch_serves(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu, "_lib", None)
    monkeypatch.setattr(_cpu, "_error", None)
    monkeypatch.setenv("FASTDD_CPU_KERNELS", "0")
    assert _cpu.load() is None and "FASTDD_CPU_KERNELS=0" in _cpu.unavailable_reason()
    monkeypatch.setattr(_cpu, "_error", None)
    monkeypatch.delenv("FASTDD_CPU_KERNELS")
    monkeypatch.setenv("CC", "no-such-compiler-fastdd")
    monkeypatch.setenv("FASTDD_CACHE_DIR", str(tmp_path))
    assert _cpu.load() is None and "no C compiler" in _cpu.unavailable_reason()
    monkeypatch.setattr(_cpu, "STREAM_MIN_BYTES", 0)
    A, G = torch.randn(3, 7), torch.randn(3, 2)
    out = torch.empty(3, 2, 7)
    assert not _cpu.outer_stream_into(G, A, out)
    assert torch.equal(psg_linear(A, G, out=out), psg_linear_ref(A, G))


def test_the_kernel_builds_where_a_compiler_and_avx_exist():
    # a failed build or self-test turns the kernels off quietly for users; here it must not pass unseen
    import os
    import shutil

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if shutil.which(os.environ.get("CC") or "cc") is None or " avx" not in flags:
        pytest.skip("no C compiler or no AVX here")
    if os.environ.get("FASTDD_CPU_KERNELS") == "0":
        pytest.skip("switched off by FASTDD_CPU_KERNELS=0")
    assert _cpu.load() is not None, _cpu.unavailable_reason()


@needs_kernel
def test_a_forked_child_streams_too(stream_everything):
    import multiprocessing as mp

    G, A = torch.randn(4, 3), torch.randn(4, 40)
    out = torch.empty(4, 3, 40)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _cpu.outer_stream_into(G, A, out)  # the parent's pool exists now
        ctx = mp.get_context("fork")
        child = ctx.Process(target=_stream_in_child, args=(G, A))
        child.start()
        child.join(timeout=60)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive and child.exitcode == 0
    finally:
        torch.set_num_threads(saved)


def _stream_in_child(G, A):
    _cpu.STREAM_MIN_BYTES = 0
    out = torch.empty(4, 3, 40)
    torch.set_num_threads(2)
    ok = _cpu.outer_stream_into(G, A, out) and torch.equal(out, G[:, :, None] * A[:, None, :])
    raise SystemExit(0 if ok else 1)


@needs_kernel
def test_with_the_pool_off_nothing_is_tracked_and_nothing_streamed(stream_everything, monkeypatch):
    # FASTDD_REUSE_BUFFERS=0: every buffer is new, and no record of buffers is kept to tell otherwise
    monkeypatch.setenv("FASTDD_REUSE_BUFFERS", "0")
    calls = []
    real = _cpu.outer_stream_into
    monkeypatch.setattr(_cpu, "outer_stream_into", lambda *a: calls.append(1) or real(*a))
    A, G = torch.randn(6, 1, 10), torch.randn(6, 1, 4)
    before = len(buffers._unwritten)
    out = buffers.take((6, 4, 10), torch.float32, torch.device("cpu"))
    assert len(buffers._unwritten) == before
    for _ in range(2):
        assert torch.equal(psg_linear(A, G, out=out), psg_linear_ref(A, G))
    assert calls == []
