"""The CUDA sources compile here: every .cu with nvcc for sm_80 and sm_90, and the
binding file against torch's (CPU) headers. Nothing built here runs: no GPU."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fastdd import _ext

CSRC = Path(_ext.source_files()[0]).parent
CU_FILES = sorted(CSRC.glob("*.cu"))


def test_sources_are_found():
    names = {Path(f).name for f in _ext.source_files()}
    assert "bindings.cpp" in names and "per_sample_linear.cu" in names


def test_cuda_sources_do_not_include_torch_headers():
    for f in CU_FILES:
        text = f.read_text()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, f


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(tmp_path, source, arch):
    cmd = ["nvcc", "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_binding_compiles_against_cpu_torch(tmp_path):
    import torch
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["c++", "-fsyntax-only", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           "-DTORCH_EXTENSION_NAME=fastdd_cuda", *flags, str(CSRC / "bindings.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("FASTDD_NO_CUDA_EXT") == "1", reason="FASTDD_NO_CUDA_EXT=1 turns the extension off")
def test_extension_builds_and_loads():
    assert _ext.load(raise_on_error=True) is not None


SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.mark.skipif(not SETUP.exists(), reason="not a source checkout")
@pytest.mark.parametrize("value, ok, says", [
    ("", True, None),  # a CPU torch: nothing to prebuild, no attempt
    ("0", True, None),
    ("2", False, "FASTDD_BUILD_CUDA must be 0 or 1, got '2'"),
])
def test_setup_prebuild_decision(value, ok, says):
    """setup.py (what pip runs) prebuilds only where it can: with a CPU torch, never; a
    malformed FASTDD_BUILD_CUDA is refused by name."""
    import torch

    if value == "" and torch.version.cuda is not None:
        pytest.skip("a CUDA torch: setup.py would (rightly) prebuild here")
    env = {k: v for k, v in os.environ.items() if k != "FASTDD_BUILD_CUDA"}
    if value:
        env["FASTDD_BUILD_CUDA"] = value
    res = subprocess.run([sys.executable, str(SETUP), "--version"], capture_output=True, text=True, env=env,
                         cwd=SETUP.parent, timeout=300)
    assert (res.returncode == 0) == ok, res.stderr[-2000:]
    assert "prebuilding the CUDA extension" not in res.stdout
    if says:
        assert says in res.stdout + res.stderr
