"""Every Triton kernel compiles natively, ahead of time, for sm_80 and sm_90 (to a cubin),
without a GPU. The interpreter runs the kernels' arithmetic on the CPU but never Triton's
compiler, where native-only errors (layouts, dot shapes and dtypes, constexpr misuse) live;
this is the Triton twin of test_cuda_build.py's nvcc check. Runs in a subprocess because
the test session imports triton with TRITON_INTERPRET=1."""
import os
import subprocess
import sys

import pytest

# kernel module, kernel, its constexprs (the values the launchers use on a GPU), the
# pointers holding the data dtype (the others are fp32 buffers or int64 tables), and
# scalars that are not i32
KERNELS = [
    ("per_sample_linear", "psg_linear_kernel", dict(BLOCK_T=32, BLOCK_P=64, BLOCK_D=64, UPCAST=False), ["a", "g", "out"], {}),
    ("per_sample_linear", "psg_linear_sqnorm_kernel", dict(BLOCK_T=32, BLOCK_P=64, BLOCK_D=64, UPCAST=False), ["a", "g"], {}),
    ("per_sample_linear", "psg_linear_gram_sqnorm_kernel", dict(BLOCK_T=64, BLOCK_K=32, UPCAST=False), ["a", "g"], {}),
    ("per_sample_linear", "psg_linear_dot_kernel", dict(BLOCK_T=32, BLOCK_P=64, BLOCK_D=64, UPCAST=False), ["a", "g", "v"], {}),
    ("cg_update", "cg_update_xr_kernel", dict(HAS_DIAG=True, BLOCK_P=64, BLOCK_K=64), [], {}),
    ("cg_update", "cg_update_p_kernel", dict(HAS_DIAG=False, BLOCK_P=64, BLOCK_K=64), [], {}),
    ("grad_distance", "row_stats_kernel", dict(BLOCK=1024), ["a", "b"], {}),
    ("grad_distance", "row_axpby_kernel", dict(BLOCK=1024), ["a", "b", "out"], {}),
    ("mmd", "segment_mean_kernel", dict(BLOCK_N=32, BLOCK_D=64), ["x"], {}),
    ("mmd", "segment_mean_bwd_kernel", dict(BLOCK_N=32, BLOCK_D=64), [], {}),
    ("mmd", "rbf_row_sums_kernel", dict(BLOCK_Q=32, BLOCK_K=32, BLOCK_D=64), ["q", "k"], {"gamma": "fp32"}),
    ("mmd", "rbf_grad_q_kernel", dict(BLOCK_Q=32, BLOCK_K=32, BLOCK_D=64), ["q", "k"], {"gamma": "fp32"}),
    ("projection", "jl_linear_kernel", dict(HAS_BIAS=True, BLOCK_B=16, BLOCK_P=16, BLOCK_D=16, BLOCK_J=64),
     ["a", "g"], {"inv_sqrt_dim": "fp32"}),
    ("projection", "factorized_linear_kernel", dict(HAS_BIAS=True, BLOCK_T=32, BLOCK_D=64, BLOCK_KA=64, BLOCK_KG=64),
     ["a", "g"], {"inv_sqrt_dim": "fp32"}),
    ("conv_wgrad", "psg_conv2d_wgrad_kernel",
     dict(KH=3, KW=3, BLOCK_O=128, BLOCK_K=128, BLOCK_P=32, UPCAST=False), ["x", "g", "out"], {}),
    ("conv_wgrad", "psg_conv2d_wgrad_sqnorm_kernel",
     dict(KH=3, KW=3, BLOCK_O=64, BLOCK_K=64, BLOCK_P=32, UPCAST=False), ["x", "g"], {}),
]
INT64_TABLES = {"off_ptr", "len_ptr", "seg_ptr", "qseg_ptr", "kseg_ptr"}

SCRIPT = r"""
import importlib, inspect, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

kernels, dtype, arch = json.loads(sys.argv[1])
results = {}
for module, name, constexprs, data_ptrs, scalars in kernels:
    try:
        kernel = getattr(importlib.import_module("fastdd.kernels." + module), name)
        constexprs["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
        params = list(inspect.signature(kernel.fn).parameters)
        signature = {}
        for p in params:
            if p in constexprs:
                signature[p] = "constexpr"
            elif p.endswith("_ptr"):
                signature[p] = "*i64" if p in %(tables)r else ("*" + dtype if p[:-4] in data_ptrs else "*fp32")
            else:
                signature[p] = scalars.get(p, "i32")
        constexprs = {k: v for k, v in constexprs.items() if k in params}
        src = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        results[name] = "ok" if len(compiled.asm["cubin"]) > 0 else "empty cubin"
    except Exception:
        results[name] = traceback.format_exc()[-3000:]
print(json.dumps(results))
""" % {"tables": INT64_TABLES}

_compiled = {}


def _compile_all(dtype: str, arch: int) -> dict:
    """{kernel name: "ok" or the error} for every kernel that takes ``dtype``: one subprocess
    per (dtype, arch), without TRITON_INTERPRET."""
    import json

    if (dtype, arch) not in _compiled:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        todo = [[m, n, dict(c), d, s] for m, n, c, d, s in KERNELS if dtype == "fp32" or d]
        res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([todo, dtype, arch])], capture_output=True,
                             text=True, env=env, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        _compiled[dtype, arch] = json.loads(res.stdout.strip().splitlines()[-1])
    return _compiled[dtype, arch]


def _aot_available() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", [k[1] for k in KERNELS])
def test_kernel_compiles_for_gpu(name, dtype, arch):
    pytest.importorskip("triton")
    if not _aot_available():
        pytest.skip("this triton has no ahead-of-time compile API")
    data_ptrs = next(k[3] for k in KERNELS if k[1] == name)
    if dtype == "bf16" and not data_ptrs:
        pytest.skip("fp32-only kernel")
    assert _compile_all(dtype, arch)[name] == "ok", _compile_all(dtype, arch)[name]


def test_every_kernel_is_listed():
    """A new kernel in kernels/ must join KERNELS (so it is compiled here too)."""
    pytest.importorskip("triton")
    import importlib
    import pkgutil

    import triton

    import fastdd.kernels

    listed = {k[1] for k in KERNELS}
    modules = [m.name for m in pkgutil.iter_modules(fastdd.kernels.__path__) if not m.name.startswith("_")]
    assert modules
    for module in modules:
        mod = importlib.import_module("fastdd.kernels." + module)
        public = {n for n, v in vars(mod).items() if isinstance(v, triton.runtime.jit.JITFunction) and not n.startswith("_")}
        assert public <= listed, f"{module}: {sorted(public - listed)} not in KERNELS"
