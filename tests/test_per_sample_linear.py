"""Per-sample Linear kernels (Triton under TRITON_INTERPRET=1, CUDA on a GPU) against the torch path."""
import pytest
import torch

from fastdd.grad import per_sample_linear as psl
from conftest import assert_close

SHAPES = [  # (B, T, d, p): odd sizes, T=1, and both sides of the Gram/materialize choice
    (1, 1, 7, 5),
    (3, 7, 33, 17),
    (2, 33, 5, 40),
    (2, 20, 70, 70),
    (4, 1, 127, 3),
]
# (dtype, atol, rtol) for outputs relative to an fp32 reference
DTYPES = [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, None, None)]


def _inputs(B, T, d, p, dtype, device="cpu", noncontiguous=False):
    if noncontiguous:  # transposed storage: stride 1 along T instead of the feature dim
        A = torch.randn(B, d, T, device=device).to(dtype).transpose(1, 2)
        G = torch.randn(B, p, T, device=device).to(dtype).transpose(1, 2)
    else:
        A = torch.randn(B, T, d, device=device).to(dtype)
        G = torch.randn(B, T, p, device=device).to(dtype)
    V = torch.randn(3, p, d, device=device).to(dtype)
    return A, G, V


def _low_precision_tol(reference_err):
    # STYLE.md: in low precision the kernel may err at most about twice the torch path
    return 2 * reference_err + 1e-6


def _run_kernels(A, G, V, backend):
    if backend == "triton":
        from fastdd.kernels.per_sample_linear import psg_linear_dot_fwd, psg_linear_fwd, psg_linear_sqnorm_fwd

        out = torch.empty(A.shape[0], G.shape[2], A.shape[2], dtype=A.dtype, device=A.device)
        return psg_linear_fwd(A, G, out), psg_linear_sqnorm_fwd(A, G), psg_linear_dot_fwd(A, G, V)
    return psl.psg_linear(A, G), psl.psg_linear_sqnorm(A, G), psl.psg_linear_dot(A, G, V)


def _check(A, G, V, backend):
    grads, norms, dots = _run_kernels(A, G, V, backend)
    Af, Gf, Vf = A.double(), G.double(), V.double()
    ref_grads = torch.bmm(Gf.transpose(1, 2), Af)
    ref_norms = ref_grads.square().sum((1, 2))
    ref_dots = ref_grads.flatten(1) @ Vf.flatten(1).T
    if A.dtype == torch.float32:
        assert_close(grads, ref_grads, atol=1e-4, rtol=1e-5, name="grads")
        assert_close(norms, ref_norms, atol=1e-3, rtol=1e-5, name="norms")
        assert_close(dots, ref_dots, atol=1e-3, rtol=1e-5, name="dots")
        return
    # low precision: compare errors with the torch path's own in the same dtype
    torch_grads = psl.psg_linear_ref(A, G)
    err_torch = (torch_grads.double() - ref_grads).abs().max().item()
    err_kernel = (grads.double() - ref_grads).abs().max().item()
    assert err_kernel <= _low_precision_tol(err_torch), (err_kernel, err_torch)
    # norms and dots accumulate in fp32 from bf16 inputs: exact products, fp32 sums
    assert_close(norms, ref_norms, atol=1e-2, rtol=1e-4, name="norms")
    assert_close(dots, ref_dots, atol=1e-2, rtol=1e-4, name="dots")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_against_float64(shape, dtype):
    A, G, V = _inputs(*shape, dtype)
    _check(A, G, V, "torch")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_triton_kernels_interpreted(shape, dtype, noncontiguous):
    pytest.importorskip("triton")
    A, G, V = _inputs(*shape, dtype, noncontiguous=noncontiguous)
    _check(A, G, V, "triton")


def test_dispatch_forced_triton_matches_torch(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    A, G, V = _inputs(3, 7, 33, 17, torch.float32)
    _check(A, G, V, "dispatch")


def test_engine_through_triton_backend(monkeypatch):
    """The whole engine gives the same answer with the Triton kernels doing the Linear work."""
    pytest.importorskip("triton")
    import fastdd
    from fastdd.models import ConvNet

    model = ConvNet(1, 10, 8, width=4, depth=2)
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 10, (3,))
    expected = fastdd.per_sample_grads(model, x, y)
    expected_norms = fastdd.per_sample_grad_norms(model, x, y)
    monkeypatch.setenv("FASTDD_BACKEND", "triton")
    got = fastdd.per_sample_grads(model, x, y)
    for n in expected:
        assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4, name=n)
    assert_close(fastdd.per_sample_grad_norms(model, x, y), expected_norms, atol=1e-5, rtol=1e-4, name="norms")


def test_reused_buffer_is_written(monkeypatch):
    A, G, _ = _inputs(2, 3, 5, 4, torch.float32)
    buf = torch.full((2, 4, 5), float("nan"))
    out = psl.psg_linear(A, G, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert_close(buf, torch.bmm(G.transpose(1, 2), A), atol=1e-5, rtol=1e-5, name="buffer")


def test_shape_errors():
    A, G, V = _inputs(2, 3, 5, 4, torch.float32)
    with pytest.raises(ValueError, match=r"agree on \[B, T\]"):
        psl.psg_linear(A, G[:, :2])
    with pytest.raises(ValueError, match=r"V must be \[K, p, d\]"):
        psl.psg_linear_dot(A, G, V[:, :, :3])
    with pytest.raises(ValueError, match="out must be"):
        psl.psg_linear(A, G, out=torch.empty(2, 5, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", SHAPES + [(64, 128, 512, 512), (70_000, 1, 5, 3)])  # B past 65,535
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_gpu_backends(monkeypatch, backend, shape, dtype, noncontiguous):
    if backend == "cuda":
        from fastdd import _ext

        if _ext.load() is None:
            pytest.skip("CUDA extension unavailable")
    monkeypatch.setenv("FASTDD_BACKEND", backend)
    A, G, V = _inputs(*shape, dtype, device="cuda", noncontiguous=noncontiguous)
    grads, norms, dots = psl.psg_linear(A, G), psl.psg_linear_sqnorm(A, G), psl.psg_linear_dot(A, G, V)
    Af, Gf, Vf = A.double(), G.double(), V.double()
    ref = torch.bmm(Gf.transpose(1, 2), Af)
    scale = ref.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(grads, ref, atol=tol * scale, rtol=tol, name="grads")
    assert_close(norms, ref.square().sum((1, 2)), atol=tol * scale**2, rtol=1e-3, name="norms")
    assert_close(dots, ref.flatten(1) @ Vf.flatten(1).T, atol=tol * scale * 50, rtol=1e-3, name="dots")
